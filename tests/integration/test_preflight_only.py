"""``jobs/train.py ... preflight.only=true``: the preflight table for a cluster described on the command line, checked
from this machine without data, Ray or actors; exit status 0 when it fits, 2 with the fields to change when not."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EIGHT_80GB = ["preflight.gpus=8", "preflight.gpu_memory_gb=80", "preflight.cpus=96", "preflight.host_memory_gb=1024"]


def _train_main():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job.main


def test_preflight_only_prints_the_table_and_exits(tmp_path, capsys):
    main = _train_main()
    # No checkpoints in this test (this machine's disk need not hold 7B ones); data.train_files is not needed.
    argv = [str(REPO / "configs" / "torl_7b.yaml"), "model.path=Qwen2.5-Math-7B", "preflight.only=true"]
    assert main([*argv, *EIGHT_80GB, f"trainer.output_dir={tmp_path}", "trainer.save_every=0"]) == 0
    out = capsys.readouterr().out
    assert "7.62B-param model" in out and "8 GPUs x 80 GB" in out
    assert "learner GPU per rank" in out and "FAIL" not in out

    one_gpu = ["preflight.gpus=1", "preflight.gpu_memory_gb=24", "preflight.cpus=16", "preflight.host_memory_gb=64"]
    assert main([*argv, *one_gpu, f"trainer.output_dir={tmp_path}"]) == 2
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "learner.num_workers" in captured.err  # the GPU count names the fields to change


def test_preflight_of_the_cpu_default_on_this_machine(capsys):
    from jobs.setup_run import load_run_config, run_preflight

    cfg = load_run_config([])  # configs/tiny_cpu.yaml, measured against what this machine has
    run_preflight(cfg, cfg.model.path, {"CPU": 4.0, "GPU": 0.0}, total_steps=cfg.trainer.total_steps)
    out = capsys.readouterr().out
    assert "host memory per node" in out and "disk: checkpoints" in out
