"""What the learning-beyond-a-flip tests share: a shipped base model that must match its recipe, and a short run of
a CPU preset whose metrics rows the test reads (test_recovery.py, test_selective.py)."""

import json
from pathlib import Path

from jobs.train import main as train_main

REPO = Path(__file__).resolve().parents[2]


def assert_shipped_model_is_current(model: str, recipe: str) -> None:
    """``models/<model>`` ships built (a fresh clone does not wait ten minutes for it) and matches ``recipe``."""
    from torl.models.pretrain import cached_fingerprint, load_recipe, verify_manifest

    path = REPO / "models" / model
    assert verify_manifest(path) == []
    assert cached_fingerprint(path) == load_recipe([str(REPO / recipe)]).fingerprint(), (
        f"{recipe} (or the trace synthesis) changed since models/{model} was built: rebuild it with "
        f"`python jobs/make_base_model.py {recipe} --force` and commit it"
    )


def run_preset(preset: str, out: Path, steps: int, *overrides: str) -> dict[int, dict]:
    """Train ``steps`` steps of ``configs/<preset>`` into ``out``, validating at 0 and ``steps``, nothing saved;
    the metrics row of each step."""
    args = [
        str(REPO / "configs" / preset),
        f"trainer.output_dir={out}",
        f"trainer.total_steps={steps}",
        f"trainer.val_every={steps}",
        "trainer.save_every=0",
        "trainer.log_samples_every=0",
        "wandb.mode=disabled",
        *overrides,
    ]
    assert train_main(args) == 0
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
