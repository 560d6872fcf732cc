"""Progress lines for non-interactive runs, and the engine log routing (file gets all, terminal gets real warnings)."""

import io
import logging
import logging.config

from torl.infra.logs import BENIGN_WARNINGS, DropBenign, engine_logging_config
from torl.infra.progress import Progress


def test_progress_prints_plain_lines_off_a_terminal(monkeypatch):
    monkeypatch.delenv("TORL_PROGRESS", raising=False)
    out = io.StringIO()  # not a tty
    with Progress(3, "train", unit="step", log_every_s=0.0, stream=out) as bar:
        for i in range(3):
            bar.update(1, reward=0.25 * i, acc="0.50")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[-1].startswith("train: 100%") and "3/3" in lines[-1]
    assert "reward 0.5" in lines[-1] and "acc 0.50" in lines[-1]


def test_progress_throttles_lines_and_always_prints_the_last(monkeypatch):
    monkeypatch.setenv("TORL_PROGRESS", "lines")
    out = io.StringIO()
    bar = Progress(100, "build", log_every_s=3600.0, stream=out)
    for _ in range(100):
        bar.update(1)
    assert out.getvalue().count("\n") == 1 and "100/100" in out.getvalue()


def _record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.x", level, __file__, 1, message, None, None)


def test_benign_warnings_are_dropped_from_the_terminal_only():
    drop = DropBenign()
    fragment = BENIGN_WARNINGS[0][0]
    assert not drop.filter(_record(logging.WARNING, f"RotaryEmbedding: {fragment}"))
    assert drop.filter(_record(logging.WARNING, "KV cache is almost full"))
    assert drop.filter(_record(logging.ERROR, f"{fragment} and the engine died"))  # errors always pass
    assert all(why for _, why in BENIGN_WARNINGS)


def test_engine_logging_config_sends_info_to_the_file_and_real_warnings_to_the_terminal(tmp_path, capsys):
    log_file = tmp_path / "engine.log"
    logging.config.dictConfig(engine_logging_config(str(log_file)))
    logger = logging.getLogger("vllm.engine.test")
    try:
        logger.info("setting pause state to PAUSED_NEW")
        logger.warning("RotaryEmbedding: Failed to load weights")
        logger.warning("KV cache is almost full")
        err = capsys.readouterr().err
    finally:
        for h in logging.getLogger("vllm").handlers:
            h.close()
        logging.getLogger("vllm").handlers.clear()
    written = log_file.read_text()
    assert "PAUSED_NEW" in written and "Failed to load weights" in written and "almost full" in written
    assert "almost full" in err and "PAUSED_NEW" not in err and "Failed to load" not in err
