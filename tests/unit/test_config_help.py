"""The configuration explains itself: every field has help, --help prints it, docs/config.md is current."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from torl.config import Config
from torl.config_help import format_help, markdown, sections
from torl.models.pretrain import BaseModelRecipe
from torl.prepare.config import PrepareConfig, SourceConfig

REPO = Path(__file__).resolve().parents[2]


def test_every_field_has_help():
    for cls in (Config, BaseModelRecipe, PrepareConfig, SourceConfig):
        missing = [fd.key for _, _, fields in sections(cls) for fd in fields if not fd.help.strip()]
        assert not missing, f"fields without help: {missing}"
    assert all(f.metadata.get("help") for f in dataclasses.fields(Config)), "a config section has no help"


def test_docs_config_md_is_generated_from_the_dataclasses():
    assert (REPO / "docs" / "config.md").read_text() == markdown(), (
        "docs/config.md is stale: python -m torl.config_help > docs/config.md"
    )


def test_help_lists_each_field_with_type_default_and_help():
    text = format_help(Config)
    assert "  rollout.engine.chunked_prefill (Literal" in text and "default 'auto'" in text
    assert "  trainer.max_staleness (int, default 0)" in text


def test_train_job_help_exits_cleanly():
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "rollout.n (int, default 16)" in proc.stdout and "Tool-integrated GRPO" in proc.stdout
