"""The preflight (torl/infra/preflight.py): shipped presets fit the hardware they are for, impossible ones fail naming
the field to change, and each estimate moves with the settings that should move it."""

from dataclasses import replace
from pathlib import Path

import pytest

from torl.config_load import load_config
from torl.infra.hardware import Hardware, detect_hardware, parse_driver_version
from torl.infra.model_sizes import (
    KNOWN_SHAPES,
    GiB,
    ModelShape,
    activation_bytes,
    head_bytes,
    micro_batch_tokens,
    model_shape,
)
from torl.infra.preflight import PreflightError, check, resource_rows

REPO = Path(__file__).resolve().parents[2]
QWEN_1_5B = ModelShape.from_hf_config(KNOWN_SHAPES["qwen2.5-math-1.5b"])
QWEN_7B = ModelShape.from_hf_config(KNOWN_SHAPES["qwen2.5-math-7b"])


def _cfg(*presets: str, overrides: tuple[str, ...] = ()):
    return load_config([str(REPO / "configs" / p) for p in presets], overrides)


def eight_80gb(cfg) -> Hardware:
    """One 8 x 80 GB node as the GPU presets assume it, with generous CPUs, host memory and disk."""
    disk = {cfg.trainer.output_dir: 2000.0, "/dev/shm": 512.0}
    return Hardware(gpus=8, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1024, cpus=96, free_disk_gb=disk)


def two_core_24gb(cfg) -> Hardware:
    """This kind of machine: 2 cores (Ray counts ray.num_cpus logical CPUs when set), 24 GB, no GPU."""
    disk = {cfg.trainer.output_dir: 50.0, "/dev/shm": 12.0}
    cpus = cfg.ray.num_cpus or 2
    return Hardware(gpus=0, gpus_per_node=0, gpu_memory_gb=0, host_memory_gb=24, cpus=cpus, free_disk_gb=disk)


@pytest.mark.parametrize(
    ("presets", "model", "hardware"),
    [
        (("torl_1.5b.yaml",), "Qwen2.5-Math-1.5B", eight_80gb),
        (("torl_7b.yaml",), "Qwen2.5-Math-7B", eight_80gb),
        (("dapo.yaml",), "Qwen2.5-Math-1.5B", eight_80gb),
        (("torl_1.5b.yaml", "torl_compat.yaml"), "Qwen2.5-Math-1.5B", eight_80gb),
        (("torl_1.5b.yaml", "torl_onpolicy.yaml"), "Qwen2.5-Math-1.5B", eight_80gb),
        (("torl_7b.yaml", "torl_onpolicy.yaml"), "Qwen2.5-Math-7B", eight_80gb),
        (("tiny_cpu.yaml",), None, two_core_24gb),
        (("smollm2_cpu.yaml",), None, two_core_24gb),
    ],
)
def test_shipped_presets_fit_their_hardware(presets, model, hardware):
    cfg = _cfg(*presets)
    # The CPU presets' models: tiny is in the repository, SmolLM2 by name when it was not converted yet.
    report = check(cfg, model_shape(model or str(REPO / cfg.model.path)), hardware(cfg))
    table = report.table()
    assert not report.failures, table
    report.raise_on_failure()
    statuses = {r.what: r.status for r in report.rows}
    assert statuses["host memory per node"] == "ok" and statuses["disk: checkpoints"] == "ok", table
    if cfg.learner.num_gpus:
        assert statuses["learner GPU per rank"] == statuses["learner GPU at model load"] == "ok", table
    assert statuses["engine KV, one sequence"] == "ok", table


def test_7b_on_one_24gb_gpu_fails_naming_the_fields_to_change():
    cfg = _cfg("torl_7b.yaml")
    hw = Hardware(gpus=1, gpus_per_node=1, gpu_memory_gb=24, host_memory_gb=64, cpus=16)
    report = check(cfg, QWEN_7B, hw)
    failed = {r.what for r in report.failures}
    assert {"GPUs for the actors", "host memory per node"} <= failed, report.table()
    with pytest.raises(PreflightError) as exc:
        report.raise_on_failure()
    message = str(exc.value)
    assert "rollout.num_generators/learner.num_workers" in message  # the GPU count
    assert "need 8 GPU, have 1" in message


def test_learner_memory_names_checkpointing_and_chunking_when_they_would_help():
    # 8 x 24 GB: ToRL's 1.5B run fits with gradient checkpointing and a chunked log-prob head, not without them.
    hw = Hardware(gpus=8, gpus_per_node=8, gpu_memory_gb=24, host_memory_gb=512, cpus=96)
    off = ("learner.gradient_checkpointing=false", "learner.logprob_chunk_tokens=0")
    report = check(_cfg("torl_1.5b.yaml", overrides=off), QWEN_1_5B, hw)
    row = next(r for r in report.failures if r.what == "learner GPU per rank")
    assert "learner.gradient_checkpointing=true" in row.fix and "learner.logprob_chunk_tokens" in row.fix
    on = check(_cfg("torl_1.5b.yaml"), QWEN_1_5B, hw)
    assert not [r for r in on.failures if r.what.startswith("learner")], on.table()


def test_cpu_offload_moves_the_states_off_the_gpu():
    hw = Hardware(gpus=8, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1024, cpus=96)

    def learner_gpu(offload: bool) -> float:
        report = check(_cfg("torl_7b.yaml", overrides=(f"learner.cpu_offload={offload}",)), QWEN_7B, hw)
        return next(r.need for r in report.rows if r.what == "learner GPU per rank")

    # 16 bytes/param (fp32 weights, grads, two AdamW moments) over 4 ranks leave the GPU with offload on.
    assert learner_gpu(False) - learner_gpu(True) == pytest.approx(16 * QWEN_7B.params / 4 / GiB)


def test_activations_follow_korthikanti_and_checkpointing_keeps_one_layer():
    # With a 4h MLP, 16-bit and no checkpointing: 34 * tokens * hidden bytes per layer (plus the packed-row mask).
    shape = replace(QWEN_1_5B, intermediate=4 * QWEN_1_5B.hidden)
    t, h, layers = 4096, shape.hidden, shape.layers
    assert activation_bytes(shape, t, 2, checkpointing=False) == layers * 34 * t * h + t**2
    # Checkpointed: each layer's input plus one layer's full activations.
    assert activation_bytes(shape, t, 2, checkpointing=True) == layers * t * h * 2 + 34 * t * h + t**2
    assert activation_bytes(shape, t, 4, checkpointing=False) == 2 * layers * 34 * t * h + t**2  # fp32 doubles


def test_log_prob_head_chunking():
    unchunked = head_bytes(QWEN_1_5B, 16384, 0, 2)
    assert unchunked / GiB > 30  # the full [16384, 152k] logits and their fp32 companions
    assert head_bytes(QWEN_1_5B, 16384, 1024, 2) == 1024 * QWEN_1_5B.vocab * 10
    assert head_bytes(QWEN_1_5B, 512, 1024, 2) == 512 * QWEN_1_5B.vocab * 10  # a chunk larger than the batch


def test_micro_batch_tokens_is_capped_by_a_ranks_share_and_raised_to_one_sequence():
    assert micro_batch_tokens(_cfg("torl_1.5b.yaml")) == 16384
    assert micro_batch_tokens(_cfg("tiny_cpu.yaml")) == 1024
    # SmolLM2: 4 prompts x 4 samples on one rank hold at most 16 x (400 + 512) tokens, fewer than the 16384 budget.
    assert micro_batch_tokens(_cfg("smollm2_cpu.yaml")) == 16 * 912
    assert micro_batch_tokens(_cfg("tiny_cpu.yaml", overrides=("learner.micro_batch_tokens=100",))) == 192 + 256


def test_kv_cache_partial_fit_warns_one_sequence_not_fitting_fails():
    hw = Hardware(gpus=8, gpus_per_node=8, gpu_memory_gb=80, host_memory_gb=1024, cpus=96)
    # 0.185 x 80 GB leaves ~0.6 GB beside the 7B's 14.2 GB of bf16 weights: two 4096-token sequences.
    tight = check(_cfg("torl_7b.yaml", overrides=("rollout.engine.gpu_memory_utilization=0.185",)), QWEN_7B, hw)
    statuses = {r.what: r.status for r in tight.rows}
    assert statuses["engine KV, one sequence"] == "ok" and statuses["engine KV, max_num_seqs sequences"] == "warn"
    assert not tight.failures
    long = ("rollout.engine.gpu_memory_utilization=0.185", "model.max_model_len=32768")
    report = check(_cfg("torl_7b.yaml", overrides=long), QWEN_7B, hw)
    row = next(r for r in report.failures if r.what == "engine KV, one sequence")
    assert "model.max_model_len" in row.fix and "rollout.engine.gpu_memory_utilization" in row.fix


def test_kv_bytes_per_token_split_over_tensor_parallel_ranks():
    assert QWEN_7B.kv_bytes_per_token(2) == 2 * 28 * 4 * 128 * 2
    assert QWEN_7B.kv_bytes_per_token(2, tensor_parallel=2) == 2 * 28 * 2 * 128 * 2
    assert QWEN_7B.kv_bytes_per_token(2, tensor_parallel=8) == 2 * 28 * 1 * 128 * 2  # KV heads are replicated


def test_engine_spanning_more_gpus_than_its_actor_reserves_fails():
    cfg = _cfg("torl_7b.yaml", overrides=("rollout.engine.tensor_parallel_size=2",))
    row = next(r for r in check(cfg, QWEN_7B, eight_80gb(cfg)).failures if r.what == "GPUs per generator")
    assert "rollout.num_gpus" in row.fix


def test_checkpoint_disk_counts_keep_last_plus_one_less_those_present():
    cfg = _cfg("torl_1.5b.yaml")
    hw = replace(eight_80gb(cfg), free_disk_gb={cfg.trainer.output_dir: 40.0})
    row = next(r for r in check(cfg, QWEN_1_5B, hw).rows if r.what == "disk: checkpoints")
    # 12 bytes/param (fp32 model.safetensors, AdamW's two moments in optimizer.pt), keep_last 2 + the one written
    assert row.need == pytest.approx(3 * 12 * QWEN_1_5B.params / GiB)
    assert row.status == "FAIL" and "trainer.output_dir" in row.fix and "trainer.keep_last" in row.fix
    resumed = next(r for r in check(cfg, QWEN_1_5B, hw, existing_checkpoints=2).rows if r.what == "disk: checkpoints")
    assert resumed.status == "ok" and resumed.need == pytest.approx(row.need / 3)


def test_weight_files_need_disk_only_on_the_file_route():
    def rows(route: str) -> dict:
        cfg = _cfg("torl_7b.yaml", overrides=(f"rollout.weight_sync={route}",))
        hw = replace(eight_80gb(cfg), free_disk_gb={"/dev/shm": 32.0})
        return {r.what: r for r in check(cfg, QWEN_7B, hw).rows}

    assert "disk: weight files (file route)" not in rows("collective")
    row = rows("file")["disk: weight files (file route)"]
    # 4 generators on the node, each writing the 7B in bf16 (untied, so no lm_head copy): 4 x 14.2 GB > 32 GB
    assert row.need == pytest.approx(4 * QWEN_7B.params * 2 / GiB) and row.status == "FAIL"
    assert "rollout.weight_sync=collective" in row.fix


def test_resource_rows_name_what_to_lower():
    cfg = _cfg("tiny_cpu.yaml")
    rows = {r.what: r for r in resource_rows(cfg, {"CPU": 2.0})}
    assert rows["CPUs for the actors"].need == 2.5 and rows["CPUs for the actors"].status == "FAIL"
    assert "ray.num_cpus=N" in rows["CPUs for the actors"].message()
    assert rows["GPUs for the actors"].status == "ok"
    # Evaluation starts no learner: its CPU is not counted.
    assert {r.what: r.need for r in resource_rows(cfg, {"CPU": 2.0}, learner=False)}["CPUs for the actors"] == 1.5


def test_shape_from_a_checkpoint_directory_and_unknown_names(tmp_path):
    assert model_shape(str(REPO / "models" / "torl-tiny-base")).hidden == 128
    assert model_shape("/anywhere/Qwen2.5-Math-7B") == QWEN_7B  # by the directory's name, any case
    with pytest.raises(Exception, match="not a known model name"):
        model_shape(str(tmp_path / "mystery-model"))


def test_parameter_count_matches_transformers():
    # Built on the meta device: no memory, exact counts (tied weights counted once, Qwen2's q/k/v biases).
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, hf in KNOWN_SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
        assert ModelShape.from_hf_config(hf).params == sum(p.numel() for p in model.parameters()), name
    assert QWEN_1_5B.params == 1_543_714_304 and QWEN_7B.params == 7_615_616_512


def test_detect_hardware_takes_ray_counts_and_overrides():
    cfg = _cfg("torl_7b.yaml", overrides=("preflight.gpus=8", "preflight.gpu_memory_gb=80", "preflight.cpus=96"))
    hw = detect_hardware(cfg)  # preflight.only: the overrides stand in for the cluster
    assert (hw.gpus, hw.gpu_memory_gb, hw.cpus, hw.gpus_per_node) == (8, 80, 96, 8)
    assert cfg.trainer.output_dir in hw.free_disk_gb and hw.weight_dir in hw.free_disk_gb and hw.host_memory_gb > 0
    # A running job counts what Ray has, whatever preflight.gpus says.
    assert detect_hardware(cfg, {"GPU": 16.0, "CPU": 128.0}).gpus == 16


def test_driver_version_is_read_from_the_kernel_modules_banner():
    banner = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert parse_driver_version(banner) == "535.104.05"
    assert parse_driver_version("GCC version:  gcc version 12.2.0\n") is None


@pytest.mark.parametrize(
    ("torch_cuda", "driver", "status"),
    [
        ("13.0", "535.104.05", "FAIL"),  # PyPI's CUDA 13 torch on a common H100 driver
        ("13.0", "570.86.10", "FAIL"),
        ("13.0", "580.65.06", "ok"),
        ("12.8", "535.104.05", "ok"),
        ("12.8", "520.61.05", "FAIL"),
        (None, "580.65.06", "FAIL"),  # a CPU-only torch on a GPU node
    ],
)
def test_a_gpu_run_needs_a_driver_of_torchs_cuda_branch(torch_cuda, driver, status):
    cfg = _cfg("torl_1.5b.yaml")
    hw = replace(eight_80gb(cfg), torch_cuda=torch_cuda, nvidia_driver=driver)
    report = check(cfg, QWEN_1_5B, hw)
    (row,) = [r for r in report.rows if r.what.startswith(("NVIDIA driver", "torch CUDA build"))]
    assert row.status == status, report.table()
    if status == "FAIL":
        fix = "upgrade the NVIDIA driver" if torch_cuda else "install the cuda extra"
        with pytest.raises(PreflightError, match=fix):
            report.raise_on_failure()


def test_the_driver_is_not_checked_without_one_here_or_without_gpus_asked():
    # preflight.only on a laptop, or a head node without GPUs: nothing here says what the workers run.
    cfg = _cfg("torl_1.5b.yaml")
    assert not [r for r in check(cfg, QWEN_1_5B, eight_80gb(cfg)).rows if "driver" in r.what]
    cpu = _cfg("tiny_cpu.yaml")
    hw = replace(two_core_24gb(cpu), torch_cuda=None, nvidia_driver="535.104.05")
    assert not [r for r in check(cpu, model_shape(str(REPO / cpu.model.path)), hw).rows if "driver" in r.what]


def test_gpus_the_actors_leave_idle_are_a_warning():
    cfg = _cfg("torl_1.5b.yaml")  # 4 generators + 4 learner ranks, one GPU each
    on_8 = check(cfg, QWEN_1_5B, eight_80gb(cfg))
    assert not [r for r in on_8.rows if r.what == "GPUs the actors use"], on_8.table()
    hw = replace(eight_80gb(cfg), gpus=16)
    report = check(cfg, QWEN_1_5B, hw)
    (row,) = [r for r in report.rows if r.what == "GPUs the actors use"]
    assert (row.status, row.need, row.have) == ("warn", 16, 8) and "8 of the cluster's 16 GPUs" in row.detail
    assert row not in report.failures


@pytest.mark.parametrize(("preset", "shape"), [("torl_1.5b.yaml", QWEN_1_5B), ("torl_7b.yaml", QWEN_7B)])
def test_gpu_presets_pipeline_and_the_onpolicy_layer_restores_torls_schedule(preset, shape):
    """The presets keep both halves of the node busy; torl_onpolicy.yaml is ToRL's own schedule (#28)."""
    cfg = _cfg(preset)
    assert (cfg.trainer.max_staleness, cfg.algo.rollout_correction, cfg.algo.old_logprobs) == (1, "tis", "recompute")
    assert not cfg.rollout.engine.enforce_eager and not cfg.learner.cpu_offload
    exact = _cfg(preset, "torl_onpolicy.yaml")
    assert (exact.trainer.max_staleness, exact.algo.rollout_correction) == (0, "none")
    assert exact.rollout.engine.enforce_eager
    # What the 7B preset's comment says: without offload a rank fits 80 GB, and 40 GB only with it.
    hw40 = replace(eight_80gb(cfg), gpu_memory_gb=40)
    row = {r.what: r for r in check(cfg, shape, eight_80gb(cfg)).rows}["learner GPU per rank"]
    assert row.status == "ok" and row.need < 50, row.detail
    if preset == "torl_7b.yaml":
        assert {r.what: r for r in check(cfg, shape, hw40).rows}["learner GPU per rank"].status == "FAIL"
        offload = _cfg(preset, overrides=("learner.cpu_offload=true",))
        assert {r.what: r for r in check(offload, shape, hw40).rows}["learner GPU per rank"].status == "ok"
