"""Build the project's small base model (tokenizer + Qwen2) from a recipe, once; later calls return at once.

    python jobs/make_base_model.py [configs/base_model.yaml] [key=value ...] [--force]

The output directory (``output_dir``, relative paths anchored at the checkout) holds an ordinary Hugging Face
checkpoint, ``recipe.json`` (recipe, its fingerprint, build figures), ``base_report.json`` (held-out accuracy,
code ratio and execution success through an in-process tool loop, greedy and sampled at temperature 1) and
``SHA256SUMS``. If the directory already holds a model with the same recipe fingerprint whose files match their
checksums, nothing is rebuilt: the CPU default's model ships built in ``models/torl-tiny-base``, so a fresh clone
never waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torl.config import ConfigError  # noqa: E402
from torl.config_help import format_help, wants_help  # noqa: E402
from torl.config_load import split_cli  # noqa: E402
from torl.infra.paths import resolve  # noqa: E402

DEFAULT_RECIPE = REPO / "configs" / "base_model.yaml"


def report(out: Path, eval_n: int, seed: int) -> dict:
    """Held-out figures of the model in ``out``: greedy (as validation) and temperature 1 (as RL rollouts)."""
    from torl.data import tasks
    from torl.models import base_report

    held_out = tasks.make_tasks("test", eval_n, seed=0)
    problems, levels = [t.problem() for t in held_out], [t.level for t in held_out]
    t0 = time.time()
    figures = {
        "greedy": base_report.evaluate(out, problems, levels, temperature=0.0, seed=seed),
        "sampled_t1": base_report.evaluate(out, problems, levels, temperature=1.0, samples_per_problem=4, seed=seed),
        "eval_s": time.time() - t0,
        "held_out": f"synthetic:test ({eval_n} problems, seed 0)",
    }
    (out / "base_report.json").write_text(json.dumps(figures, indent=2))
    return figures


def main(argv: list[str]) -> int:
    if wants_help(argv):
        from torl.models.pretrain import BaseModelRecipe

        print(format_help(BaseModelRecipe, usage=__doc__.strip()))
        return 0
    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    try:
        files, overrides = split_cli(args)
        from torl.models.pretrain import (
            build_base_model,
            cached_fingerprint,
            load_recipe,
            verify_manifest,
            write_manifest,
        )

        recipe = load_recipe(files or [str(DEFAULT_RECIPE)], overrides)
    except ConfigError as exc:
        print(f"[make_base_model] config error: {exc}", file=sys.stderr)
        return 2
    out = resolve(recipe.output_dir)
    if not force and cached_fingerprint(out) == recipe.fingerprint():
        problems = verify_manifest(out)
        if not problems:
            print(f"[make_base_model] {out} is up to date (recipe {recipe.fingerprint()}); nothing to do")
            return 0
        print(f"[make_base_model] {out} fails its checksums ({'; '.join(problems)}); rebuilding")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(recipe.threads or os.cpu_count() or 1)
    print(f"[make_base_model] building {out} (recipe {recipe.fingerprint()})")
    path, info = build_base_model(recipe, out)
    print(
        f"[make_base_model] built in {info['build_s']:.0f} s: {info['params']:,} params, vocab {info['vocab']}, "
        f"final loss {info.get('final_loss', float('nan')):.3f}"
    )
    if recipe.eval_n > 0:
        figures = report(path, recipe.eval_n, recipe.seed)
        for mode in ("greedy", "sampled_t1"):
            print(f"[make_base_model] held-out {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures[mode].items()))
    write_manifest(path)  # last: a directory with a valid manifest is a finished build
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
