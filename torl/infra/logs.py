"""Where the engine's routine logs go: a run's log file gets everything, the terminal only what a user must read.

vLLM logs at INFO on every weight update (pause, reload, prefix-cache reset) and repeats a handful of warnings that
are expected in torl's setting. Those lines went to the terminal through Ray, dozens per step. vLLM reads a logging
``dictConfig`` from ``VLLM_LOGGING_CONFIG_PATH`` in every process it starts, so one config sends its INFO to a file
and lets through to the terminal only warnings and errors that are not on the list below, each with its reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

# (message fragment, why it is expected in torl). Only warnings; errors always reach the terminal.
BENIGN_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        "Failed to load weights",
        "in-place weight reload names RotaryEmbedding: its cos/sin cache is computed, not a weight, so nothing is "
        "missing (checked: the engine's log-probs match Hugging Face's to 1e-4 after every update)",
    ),
    ("Triton is not installed", "CPU engines do not use Triton; scripts/setup.sh removes it on CPU machines"),
    ("Model Runner V2 requires Triton", "same: the V1 model runner is the CPU path"),
    ("Triton not available", "same, from torch's kernel registry"),
    ("Enforce eager set", "rollout.engine.enforce_eager is torl's CPU default: no compile warm-up per engine start"),
    ("Inductor compilation was disabled", "same"),
    ("is not found in LD_PRELOAD", "tcmalloc/iomp speed up large models; a tiny model is not allocation-bound"),
    ("The global random seed is set to", "torl seeds every request itself (rollout.engine.seed, per-sample seeds)"),
    ("Passing raw prompts to InputProcessor is deprecated", "vLLM-internal API notice; nothing for a user to do"),
    ("Reset SSM cache type", "applies to state-space models only"),
    (
        "does not officially support disabling chunked prefill",
        "rollout.engine.chunked_prefill=auto turns it off on CPU on purpose (see its help); "
        "tests/integration/test_generator.py runs prompts that overflow a step with it off",
    ),
)
# Python warnings that vLLM's import raises in the generator process: (message regex, category, why).
BENIGN_PY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    ("`torch.distributed.reduce_op` is deprecated", FutureWarning, "vLLM's kernel dispatcher probes torch attributes"),
)


class DropBenign(logging.Filter):
    """Drop the warnings listed in ``BENIGN_WARNINGS`` (they still go to the log file, which has no filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(fragment in message for fragment, _ in BENIGN_WARNINGS)


def engine_logging_config(log_file: str | None) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for vLLM's processes: INFO and up to ``log_file`` (if any), and warnings that
    are not known benign to the terminal."""
    fmt = {"format": "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"}
    handlers: dict[str, Any] = {
        "console": {
            "class": "logging.StreamHandler",
            "level": "WARNING",
            "filters": ["benign"],
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    }
    if log_file:
        handlers["file"] = {"class": "logging.FileHandler", "filename": log_file, "level": "INFO"}
        handlers["file"]["formatter"] = "plain"
    names = list(handlers)
    quiet = {"level": "INFO", "handlers": names, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"benign": {"()": f"{__name__}.DropBenign"}},
        "formatters": {"plain": fmt},
        "handlers": handlers,
        # torch's own kernel registry warns about Triton in the same processes.
        "loggers": {"vllm": quiet, "torch._library.triton": quiet},
    }


def route_engine_logs(config_dir: str | Path, log_file: str | Path | None) -> str:
    """Write the config into ``config_dir`` and point vLLM at it (this process and those it starts); returns the
    config's path. Call before vLLM is first imported in the process."""
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    path = Path(config_dir) / "vllm_logging.json"
    path.write_text(json.dumps(engine_logging_config(str(log_file) if log_file else None)))
    specs = [s for s in os.environ.get("PYTHONWARNINGS", "").split(",") if s]
    for message, category, _ in BENIGN_PY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        spec = f"ignore:{message}:{category.__name__}"  # the engine-core process vLLM spawns reads this
        if spec not in specs:  # a second engine in the same process (bench/serve.py) must not repeat it
            specs.append(spec)
    os.environ["PYTHONWARNINGS"] = ",".join(specs)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    return str(path)
