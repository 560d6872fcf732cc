"""The base-model recipe end to end at its seconds-to-build size: the job builds and caches, the build is
deterministic, vLLM loads the checkpoint with the same token ids, and the tool-loop report runs on it."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_RECIPE = REPO / "configs" / "base_model_test.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _job(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / "make_base_model.py"), str(TEST_RECIPE), "threads=1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)


def test_job_builds_once_then_returns_from_cache(tmp_path):
    out = tmp_path / "base"
    first = _job(f"output_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    meta = json.loads((out / "recipe.json").read_text())
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    second = _job(f"output_dir={out}")
    assert second.returncode == 0 and "up to date" in second.stdout
    changed = _job(f"output_dir={out}", "seed=2")
    assert changed.returncode == 0 and "building" in changed.stdout
    assert json.loads((out / "recipe.json").read_text())["fingerprint"] != meta["fingerprint"]
    bad = _job(f"output_dir={out}", "layerz=3")
    assert bad.returncode == 2 and "layers" in bad.stderr


def test_build_is_deterministic_given_the_seed(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from torl.models.pretrain import build_base_model, load_recipe

    again, _ = build_base_model(load_recipe([str(TEST_RECIPE)], [f"output_dir={tmp_path / 'again'}", "threads=1"]))
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from torl.data.prompts import build_prompt
    path = sys.argv[1]
    llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, block_size=32, seed=0)
    prompt = build_prompt("What is $4821 \\\\times 397$?", "tir_base_0309")
    text = prompt + "```python\\nprint(4821 * 397)\\n```\\n```output\\n1913937\\n```\\n\\\\boxed{1913937}"
    same = llm.get_tokenizer().encode(text, add_special_tokens=False) == AutoTokenizer.from_pretrained(path).encode(
        text, add_special_tokens=False)
    outs = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=48, stop=["```output"], seed=1))
    print(json.dumps({"same_ids": same, "n": [len(o.outputs[0].token_ids) for o in outs]}))
    """
)


def test_vllm_loads_the_checkpoint_with_identical_token_ids(tiny_model_dir):
    env = {**ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_ids"] is True and all(n > 0 for n in result["n"])


def test_tool_loop_report_runs_on_the_tiny_model(tiny_model_dir):
    from torl.data import tasks
    from torl.models import base_report

    held_out = tasks.make_tasks("test", 6, seed=0)
    figures = base_report.evaluate(
        tiny_model_dir,
        [t.problem() for t in held_out],
        [t.level for t in held_out],
        temperature=1.0,
        max_new_tokens=48,
    )
    assert figures["n"] == 6
    for key in ("acc", "code_ratio", "well_formed"):
        assert 0.0 <= figures[key] <= 1.0


@pytest.mark.parametrize(
    "code,status,body",
    [
        ("print(6 * 7)", "ok", "42"),
        ("print(undefined_name)", "error", "NameError: name 'undefined_name' is not defined"),
    ],
)
def test_run_snippet_reports_like_the_sandbox(code, status, body):
    from torl.config import ToolConfig
    from torl.models import base_report
    from torl.rollout import tool_protocol

    result = base_report.run_snippet(code)
    assert result.status == status
    assert tool_protocol.format_observation(result, ToolConfig()) == body


SHIPPED = REPO / "models" / "torl-tiny-base"


def test_shipped_base_model_is_intact_and_current():
    """The CPU default's model ships built; its files match their checksums and the recipe still names it."""
    from torl.models.pretrain import load_recipe, verify_manifest

    assert verify_manifest(SHIPPED) == []
    meta = json.loads((SHIPPED / "recipe.json").read_text())
    assert meta["fingerprint"] == load_recipe([str(REPO / "configs" / "base_model.yaml")]).fingerprint(), (
        "configs/base_model.yaml (or the trace synthesis) changed since models/torl-tiny-base was built: rebuild it "
        "with `python jobs/make_base_model.py --force`, then commit the model with the recipe"
    )


def test_recipe_still_reproduces_the_shipped_model(tmp_path):
    """Rebuild the start of the shipped model from its recipe: the same tokenizer, the same initial weights, and the
    same first training losses as recorded at build time. The full build (about 10 minutes) is not bit-identical
    across CPUs, so the replay stops where floating-point differences are still far below the tolerance."""
    import torch
    from transformers import AutoTokenizer

    from torl.models.pretrain import FIRST_LOSSES, initial_state, load_recipe, train

    meta = json.loads((SHIPPED / "recipe.json").read_text())
    recipe = load_recipe([str(REPO / "configs" / "base_model.yaml")], [f"steps={FIRST_LOSSES}", "threads=1"])
    tokenizer, examples, model = initial_state(recipe)
    shipped = AutoTokenizer.from_pretrained(SHIPPED)
    assert tokenizer.get_vocab() == shipped.get_vocab()
    probe = examples[0].ids
    assert shipped.encode(tokenizer.decode(probe), add_special_tokens=False) == probe
    torch.set_num_threads(1)
    losses = train(model, examples, recipe, tokenizer.pad_token_id)["first_losses"]
    assert len(losses) == len(meta["first_losses"]) == FIRST_LOSSES
    assert max(abs(a - b) for a, b in zip(losses, meta["first_losses"], strict=True)) < 1e-3, (
        losses,
        meta["first_losses"],
    )
