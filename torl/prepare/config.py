"""The data-preparation job's settings: typed, frozen, loaded like the training config (YAML presets + key=value).

Its own tree rather than a section of ``torl.config.Config``: preparing data needs no model, cluster or trainer,
and a training run should not carry fields it never reads. Paths that do not exist as given are taken relative to
the checkout (``torl.infra.paths``), so a preset's ``../shared/data/...`` works from any working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torl.config import ConfigError, opt, section
from torl.config_load import load_dataclass
from torl.models.qwen_tokenizer import QWEN25_MATH_SYSTEM

EVALUATION_SETS = ("aime24", "aime25", "math500", "olympiadbench", "amc23", "torl_val", "train_limr/test")


@dataclass(frozen=True)
class SourceConfig:
    path: str = opt("", "a parquet/jsonl/json file, a directory of them, or a save_to_disk directory (train split)")
    name: str = opt(
        "",
        'label in counts and rejects, and the data_source column unless output.data_source is set; "" = the '
        "file or directory name",
    )
    question_field: str = opt(
        "", 'dotted path of the question ("" = problem/question/context, or the user turn of a veRL prompt)'
    )
    answer_field: str = opt(
        "", 'dotted path of the answer ("" = answer/final_answer/ground_truth, or reward_model.ground_truth)'
    )
    id_field: str = opt("", 'dotted path of the row id, shown in rejects ("" = id/unique_id/idx/uid if present)')


@dataclass(frozen=True)
class FilterConfig:
    proof: bool = opt(True, "drop proof-style problems (no single final answer; ToRL removed them)")
    multiple_choice: bool = opt(True, "drop multiple-choice leftovers (options listed, or an option letter as answer)")
    unverifiable: bool = opt(
        True, "drop answers the grader cannot match: unbalanced, a sentence, or failing math-verify's self-check"
    )
    answer_timeout_s: float = opt(5.0, "math-verify deadline per answer check")
    tokenizer: str = opt(
        "qwen2.5",
        'tokenizer for the prompt-length filter: a Hugging Face tokenizer directory, "qwen2.5" = Qwen2.5(-Math)\'s '
        '(built offline by torl.models.qwen_tokenizer), "" = no length filter',
    )
    template: Literal["tir_base_0309", "tir_base_0307"] = opt(
        "tir_base_0309", "prompt template whose token count is limited (the training job's prompt.template)"
    )
    max_prompt_tokens: int = opt(
        390, "longest templated prompt kept (ToRL: max_prompt_length 400 - 10, as the training job drops)"
    )
    exact_duplicates: bool = opt(True, "drop repeated questions (same text after normalisation); the first stays")
    near_duplicate_threshold: float = opt(
        0.75,
        "drop questions whose word n-gram Jaccard similarity with a kept one reaches this and whose answer is the "
        "same (a variant with another answer is another problem: MATH has many that change one number); 0 = off",
    )
    near_duplicate_ngram: int = opt(3, "n of the word n-grams compared for near duplicates")


@dataclass(frozen=True)
class DecontaminationConfig:
    against: tuple[str, ...] = opt(
        EVALUATION_SETS,
        "evaluation sets (torl.data.problems benchmark names or paths) no training question may overlap; () = off",
    )
    threshold: float = opt(
        0.75,
        "character similarity (difflib ratio of the two texts with typesetting spaces, braces and boilerplate "
        "sentences removed) from which a training question with the same answer and numbers is a copy of an "
        "evaluation problem. On the shared pool the 11 copies score 0.84-1.0, the next same-answer same-numbers "
        "pair 0.62",
    )
    keep_variants: bool = opt(
        True,
        "a similar question is a copy only when its answer is equivalent and it states the same numbers; a "
        "variant (a number or the answer changed) is another problem and stays. false = drop every question "
        "similar enough, variants too",
    )
    boilerplate_min_questions: int = opt(
        3,
        "a sentence found in this many questions (pool and evaluation sets, each counted once) is boilerplate "
        '("Express your answer as a common fraction.", MATH\'s factorial reminder) and does not count toward '
        "similarity; 0 = every sentence counts",
    )


@dataclass(frozen=True)
class LimrConfig:
    rewards: str = opt(
        "",
        "problem_rewards.jsonl of a training run on this pool (or its run directory); set = keep only problems "
        'with a high LIMR learning-impact score; "" = off',
    )
    min_score: float = opt(0.6, "lowest score kept (LIMR: 0.6)")
    max_keep: int = opt(0, "keep at most this many, best first (0 = every problem at or above min_score)")
    min_points: int = opt(2, "problems sampled fewer times than this are not scored (and dropped)")


@dataclass(frozen=True)
class BalanceConfig:
    pass_rates: str = opt(
        "",
        "pass_rates.jsonl of jobs/eval.py run on this pool with eval.greedy=false eval.n=<n> eval.top_p=1.0 (or its "
        'output directory); set = balance difficulty; "" = off',
    )
    drop_solved: bool = opt(True, "drop problems every sample solved (no GRPO signal)")
    drop_unsolved: bool = opt(True, "drop problems no sample solved (no GRPO signal, or a wrong answer key)")
    bins: int = opt(4, "equal-width pass-rate bins")
    per_bin: int = opt(0, "problems kept per bin; 0 = as many as the smallest non-empty bin holds (flat)")
    keep_unmeasured: bool = opt(False, "keep problems the evaluation did not cover (False = drop and count them)")
    seed: int = opt(1, "which problems an over-full bin keeps")


@dataclass(frozen=True)
class OutputConfig:
    path: str = opt("runs/data/train.parquet", "the training file (veRL/ToRL parquet schema)")
    data_source: str = opt(
        "",
        'data_source of every row; "" = each source\'s name. Stock veRL picks its reward function by data_source '
        "(default_compute_score): DigitalLearningGmbH/MATH-lighteval or lighteval/MATH get its MATH grader (last "
        "\\boxed{}; configs/data_math_hard_limr.yaml sets the first), an unknown name raises; torl and ToRL grade any",
    )
    system_prompt: str = opt(
        QWEN25_MATH_SYSTEM, "prompt[0], the system turn (ToRL's template ignores it; veRL's chat template uses it)"
    )
    ability: str = opt("math", "the ability column")
    rejects: bool = opt(False, "also write rejects.jsonl beside the output: every dropped row with its reason")


@dataclass(frozen=True)
class PrepareConfig:
    sources: tuple[SourceConfig, ...] = opt((), "problem sources, read in order (the first copy of a duplicate stays)")
    filters: FilterConfig = section(FilterConfig, "which problems can train a verifiable-reward policy")
    decontamination: DecontaminationConfig = section(DecontaminationConfig, "overlap with evaluation sets")
    limr: LimrConfig = section(LimrConfig, "LIMR selection from a training run's per-problem rewards")
    balance: BalanceConfig = section(BalanceConfig, "difficulty balancing from evaluation pass rates")
    output: OutputConfig = section(OutputConfig, "where and how the training file is written")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: name at least one problem source (sources=[{path: ...}] or a preset)")
        if any(not s.path for s in self.sources):
            raise ConfigError("sources: every source needs a path")
        if not 0.0 <= self.filters.near_duplicate_threshold <= 1.0:
            raise ConfigError("filters.near_duplicate_threshold must lie in [0, 1] (0 = off)")
        if not 0.0 < self.decontamination.threshold <= 1.0:
            raise ConfigError("decontamination.threshold must lie in (0, 1]")
        if self.decontamination.boilerplate_min_questions == 1 or self.decontamination.boilerplate_min_questions < 0:
            raise ConfigError(
                "decontamination.boilerplate_min_questions must be 0 (off) or >= 2 (1 would call every sentence "
                "boilerplate)"
            )
        if self.filters.near_duplicate_ngram < 1:
            raise ConfigError("filters.near_duplicate_ngram must be >= 1")


def load_prepare_config(files: list[str], overrides: list[str]) -> PrepareConfig:
    """The job's config from YAML presets (later files win) and dotted ``key=value`` overrides."""
    return load_dataclass(PrepareConfig, files, overrides)
