"""jobs/plot_run.py: the panels read what a run logged; a pattern panel draws one line per difficulty level."""

from pathlib import Path

from jobs import plot_run


def test_a_level_pattern_draws_every_logged_level_of_every_run():
    main = [{"step": 1, "level/easy/code_ratio": 0.2, "level/hard/code_ratio": 0.4}]
    other = [{"step": 1, "level/Level 5/code_ratio": 0.9, "val_sampled/level/easy/code_ratio": 0.1}]
    keys = plot_run._expand(["acc/mean", "level/*/code_ratio", "val_sampled/level/*/code_ratio"], [main, other])
    assert keys == [
        "acc/mean",
        "level/Level 5/code_ratio",
        "level/easy/code_ratio",
        "level/hard/code_ratio",
        "val_sampled/level/easy/code_ratio",
    ]


def test_the_plot_has_a_code_ratio_by_level_panel(tmp_path: Path):
    rows = [{"step": s, "acc/mean": 0.5, "level/easy/code_ratio": 0.2, "level/hard/code_ratio": 0.3} for s in (1, 2)]
    out = tmp_path / "curves.png"
    plot_run.plot(rows, out, "run")
    assert out.stat().st_size > 0
    assert any(name == "code ratio by level" for name, _ in plot_run.PANELS)
