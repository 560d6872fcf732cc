"""The configuration explained from its own dataclasses: ``--help`` for every job and ``docs/config.md``.

Each field carries its help in ``metadata["help"]`` (``torl.config.opt``), so what a user reads is what the code
declares; ``python -m torl.config_help > docs/config.md`` regenerates the reference and a unit test fails when the
checked-in copy is stale.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

from torl.config import Config


@dataclass(frozen=True)
class FieldDoc:
    key: str  # dotted, as an override names it: rollout.engine.seed
    type: str
    default: str
    help: str


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def sections(cls: type = Config, prefix: str = "") -> list[tuple[str, str, list[FieldDoc]]]:
    """(section key, section help, its leaf fields) in declaration order, nested sections after their parent."""
    leaves: list[FieldDoc] = []
    nested: list[tuple[str, str, list[FieldDoc]]] = []
    for f in dataclasses.fields(cls):
        key, doc = prefix + f.name, f.metadata.get("help", "")
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            inner = sections(f.default_factory, key + ".")
            nested += [(key, doc, inner[0][2]), *inner[1:]] if inner and inner[0][0] == "" else inner
            continue
        leaves.append(FieldDoc(key, str(f.type), _show(_default(f)), doc))
    return [("", "", leaves), *nested] if leaves or not prefix else nested


def format_help(cls: type = Config, usage: str = "") -> str:
    """Plain text for ``--help``: every field with its type, default and help, grouped by section."""
    lines = [usage, ""] if usage else []
    lines.append("Settings (presets in configs/*.yaml set them; key=value overrides them, e.g. rollout.n=8):")
    for key, doc, fields in sections(cls):
        if not fields:
            continue
        if key:
            lines += ["", f"{key}: {doc}" if doc else f"{key}:"]
        for fd in fields:
            lines.append(f"  {fd.key} ({fd.type}, default {fd.default})")
            if fd.help:
                lines.append(f"      {fd.help}")
    return "\n".join(lines)


def markdown(cls: type = Config) -> str:
    """``docs/config.md``: one table per section."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `torl/config.py` by `python -m torl.config_help > docs/config.md`; "
        "do not edit by hand (a test fails when this file is stale). Presets in `configs/` set these fields; "
        "`key=value` arguments override them. Defaults reproduce ToRL except where a field's help says why not.",
    ]
    for key, doc, fields in sections(cls):
        if not fields:
            continue
        out += ["", f"## `{key}`" if key else "## top level", ""]
        if doc:
            out += [doc[0].upper() + doc[1:] + ".", ""]
        out += ["| key | type | default | help |", "|---|---|---|---|"]
        for fd in fields:
            cells = [f"`{fd.key}`", f"`{fd.type}`", f"`{fd.default}`", fd.help]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


if __name__ == "__main__":
    sys.stdout.write(markdown())
