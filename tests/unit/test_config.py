"""Config loading: YAML presets, dotted overrides, clear errors, and defaults equal to ToRL's values."""

from pathlib import Path

import pytest

from torl.config import Config, ConfigError, to_dict
from torl.config_load import load_config, split_cli

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_torl_values():
    cfg = Config()
    assert cfg.prompt.template == "tir_base_0309"
    assert cfg.prompt.max_prompt_tokens == 400
    assert cfg.tool.max_calls == 1 and cfg.tool.stop == "```output"
    assert (cfg.tool.truncate_chars, cfg.tool.truncate_keep) == (256, 128)
    assert cfg.tool.error_last_line is True
    assert cfg.tool.compat_fake_timeout is False and cfg.tool.compat_error_substring is False  # bugs fixed by default
    assert (cfg.reward.correct, cfg.reward.wrong, cfg.reward.exec_error_penalty) == (1.0, -1.0, 0.0)
    assert cfg.reward.compat_penalty_without_code is False
    t = cfg.tool
    assert not (t.compat_newline_before_output or t.compat_round_per_request)
    assert not (t.compat_retokenise or t.compat_code_ok)
    assert cfg.rollout.n == 16 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.rollout.top_k == -1 and cfg.rollout.max_response_tokens == 3072
    assert cfg.data.batch_size == 128 and cfg.data.shuffle is True and cfg.data.seed == 1
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.01 and cfg.optim.grad_clip == 1.0
    assert cfg.algo.clip_low == 0.2 and cfg.algo.kl_coef == 0.0 and cfg.algo.loss_agg == "token-mean"
    assert cfg.sandbox.timeout_s == 10.0
    assert cfg.trainer.val_every == 4 and cfg.trainer.save_every == 20 and cfg.trainer.max_staleness == 0


def test_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "rollout:\n  n: 4\n  temperature: 0.7\ntool:\n  max_calls: 2\ndata:\n  train_files: [a.parquet]\n"
    )
    cfg = load_config([str(preset)], ["rollout.n=8", "reward.exec_error_penalty=0.5", "data.val_files=[x,y]"])
    assert cfg.rollout.n == 8  # the override wins over the file
    assert cfg.rollout.temperature == 0.7 and cfg.tool.max_calls == 2
    assert cfg.reward.exec_error_penalty == 0.5  # int/float coercion
    assert cfg.data.train_files == ("a.parquet",) and cfg.data.val_files == ("x", "y")
    assert cfg.prompt.template == "tir_base_0309"  # untouched fields keep defaults


def test_later_files_win_and_presets_can_extend(tmp_path):
    (tmp_path / "base.yaml").write_text("rollout:\n  n: 4\n  top_p: 0.9\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\nrollout:\n  n: 2\n")
    cfg = load_config([str(tmp_path / "child.yaml")])
    assert cfg.rollout.n == 2 and cfg.rollout.top_p == 0.9


@pytest.mark.parametrize(
    "override, match",
    [
        ("rollout.temprature=0.5", r"unknown config key 'rollout.temprature'; did you mean temperature"),
        ("tool.max_call=2", r"unknown config key 'tool.max_call'; did you mean max_calls"),
        ("rewrd.correct=1", r"unknown config key 'rewrd'; did you mean reward"),
    ],
)
def test_unknown_key_suggests_close_match(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.n=many", "rollout.n"),
        ("tool.enabled=maybe", "tool.enabled"),
        ("reward.grade_timeout_s=fast", "reward.grade_timeout_s"),
        ("prompt.template=tir_base_0310", "prompt.template"),
        ("rollout.n=1.5", "rollout.n"),
        ("optim.betas=[0.9]", "optim.betas"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_yaml_section_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tool: 3\n")
    with pytest.raises(ConfigError, match="tool: expected a mapping"):
        load_config([str(bad)])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([str(tmp_path / "missing.yaml")])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="tool.max_calls"):
        load_config([], ["tool.max_calls=-1"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_config([], ["data.batch_size=10", "learner.mini_batch_prompts=3"])
    with pytest.raises(ConfigError, match="learner.logprob_chunk_tokens"):
        load_config([], ["learner.logprob_chunk_tokens=-1"])


@pytest.mark.parametrize("correction", ["tis", "mis", "mis_reject"])
def test_engine_old_logprobs_with_a_rollout_correction_is_refused(correction):
    """The correction's weights would be engine / engine = 1: refused at load, naming both fields (#30)."""
    with pytest.raises(ConfigError, match=rf"algo\.old_logprobs=engine .*algo\.rollout_correction={correction}"):
        load_config([], ["algo.old_logprobs=engine", f"algo.rollout_correction={correction}"])
    assert load_config([], ["algo.old_logprobs=engine", "algo.rollout_correction=none"]).algo.old_logprobs == "engine"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["rollout.top_p=0.9"], r"rollout\.top_p cannot be honoured by algo\.rollout_correction=tis"),
        (["rollout.top_k=20", "algo.rollout_correction=mis"], r"rollout\.top_k .*algo\.rollout_correction=mis"),
        (
            ["rollout.top_k=20", "rollout.top_p=0.95", "algo.rollout_correction=none", "algo.old_logprobs=engine"],
            r"rollout\.top_p and rollout\.top_k cannot be honoured by algo\.old_logprobs=engine",
        ),
        (["rollout.temperature=0"], r"rollout\.temperature=0\.0: training samples at a temperature > 0"),
    ],
)
def test_training_refuses_sampling_its_correction_cannot_honour(overrides, named):
    """Top-p/top-k renormalise the engine's distribution, not the learner's: refused for training with a correction
    or the engine's ratio, naming the fields (#30); the training job's loader is where it happens."""
    from jobs.setup_run import load_run_config
    from torl.config import check_training_sampling

    with pytest.raises(ConfigError, match=named):
        check_training_sampling(load_config([], overrides))
    with pytest.raises(ConfigError, match=named):
        load_run_config(overrides)
    load_config([], overrides)  # evaluation and serving may sample so


def test_training_accepts_any_temperature_and_top_p_without_a_correction():
    from torl.config import check_training_sampling

    check_training_sampling(load_config([], ["rollout.temperature=0.6"]))  # honoured on both sides
    check_training_sampling(load_config([], ["rollout.top_k=0", "rollout.top_p=1.0"]))  # 0 is off in vLLM too
    check_training_sampling(load_config([], ["rollout.top_p=0.9", "algo.rollout_correction=none"]))


def test_geometric_level_has_thresholds_of_its_own():
    algo = load_config([], ["algo.correction_level=geometric", "algo.geo_low=0.99", "algo.geo_high=1.02"]).algo
    assert algo.correction_thresholds() == (1.02, 0.99, 1.02)  # tis truncates at the band's top
    with pytest.raises(ConfigError, match=r"algo\.geo_low <= 1 <= algo\.geo_high"):
        load_config([], ["algo.geo_low=1.01"])


def test_rollout_correction_choices_include_mis_reject():
    assert load_config([], ["algo.rollout_correction=mis_reject"]).algo.rollout_correction == "mis_reject"
    with pytest.raises(ConfigError, match=r"algo\.rollout_correction: 'icepop' is not one of .*'mis', 'mis_reject'"):
        load_config([], ["algo.rollout_correction=icepop"])


def test_split_cli():
    files, overrides = split_cli(["configs/a.yaml", "rollout.n=2", "b.yml"])
    assert files == ["configs/a.yaml", "b.yml"] and overrides == ["rollout.n=2"]
    with pytest.raises(ConfigError, match="neither a .yaml preset nor a key=value"):
        split_cli(["rollout.n"])


def test_torl_compat_preset_turns_quirks_on():
    cfg = load_config([str(REPO / "configs/torl_compat.yaml")])
    assert cfg.tool.compat_fake_timeout and cfg.tool.compat_error_substring
    assert cfg.reward.compat_penalty_without_code
    t = cfg.tool
    assert t.compat_newline_before_output and t.compat_round_per_request and t.compat_retokenise and t.compat_code_ok
    assert to_dict(cfg)["prompt"] == to_dict(Config())["prompt"]  # it changes nothing else


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_preset_loads(preset):
    path = REPO / "configs" / preset
    text = path.read_text()
    if preset.startswith("base_model") or "\napplications:" in "\n" + text:
        pytest.skip("not a run config (model recipe or Ray Serve deployment file)")
    if preset.startswith("data_"):  # jobs/prepare_data.py's own config
        from torl.prepare.config import load_prepare_config

        load_prepare_config([str(path)], [])
        return
    load_config([str(path)])


def test_learner_threads_use_every_core_only_when_the_learner_runs_alone():
    from torl.config import learner_threads
    from torl.config_load import load_config

    on_policy = load_config(overrides=["trainer.max_staleness=0", "learner.num_cpus=1"])
    assert learner_threads(on_policy, cores=2) == 2
    two_ranks = load_config(overrides=["trainer.max_staleness=0", "learner.num_workers=2"])
    assert learner_threads(two_ranks, cores=8) == 4
    pipelined = load_config(overrides=["trainer.max_staleness=1", "learner.num_cpus=1"])
    assert learner_threads(pipelined, cores=2, engine_busy=True) == 1  # the engine decodes beside it
    assert learner_threads(pipelined, cores=2) == 2  # ... until the rollouts ahead have finished
    gpu = load_config(overrides=["learner.num_gpus=1", "learner.num_cpus=2"])
    assert learner_threads(gpu, cores=96) == 2
    pinned = load_config(overrides=["trainer.max_staleness=0", "learner.num_threads=3"])
    assert learner_threads(pinned, cores=2) == 3


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["eval.greedy=false"], r"eval\.n must be >= 0, and >= 1 with eval\.greedy=false"),
        (["eval.n=-1"], r"eval\.n must be >= 0"),
        (["eval.n=4", "eval.temperature=0"], r"eval\.temperature=0\.0, eval\.top_p=0\.7: sampling needs"),
        (["eval.n=4", "eval.top_p=0"], r"eval\.top_p=0\.0: sampling needs"),
        (["eval.n=4", "eval.pass_k=[8]"], r"eval\.pass_k values must lie in 1\.\.eval\.n=4"),
    ],
)
def test_evaluation_sampling_is_checked(overrides, named):
    """Greedy is ToRL's evaluation; eval.n adds SimpleTIR-style samples at settings that must be able to sample."""
    with pytest.raises(ConfigError, match=named):
        load_config([], overrides)
    e = load_config([], ["eval.n=32"]).eval
    assert (e.greedy, e.n, e.temperature, e.top_p, e.top_k) == (True, 32, 1.0, 0.7, -1)  # SimpleTIR's avg@32
    assert load_config([], ["eval.greedy=false", "eval.n=8"]).eval.n == 8


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.val_samples=-1", r"trainer\.val_samples must be >= 0"),
        ("reward.tool_call_cost=-0.5", r"reward\.tool_call_cost must be >= 0"),
    ],
)
def test_selective_settings_are_checked(override, named):
    """The selective preset's settings fail at load time naming the key, not deep in a run (#33)."""
    with pytest.raises(ConfigError, match=named):
        load_config([], [override])
    assert load_config([], [override.replace("-", "")]) is not None
