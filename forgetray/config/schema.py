"""The run config: one frozen dataclass per stage (loaded by `forgetray.config.loader`).

    forgetray run configs/default.yaml score.shard_size=64 --dry-run

Field types stay simple (str, int, float, bool, Literal, tuples of those or of dataclasses) because
configs travel as Ray `train_loop_config` / Tune `param_space` dicts. Every error names the file (or
"command line") and the dotted key path, and says what would be accepted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from forgetray.config.loader import from_dict, load_dataclass, require, to_plain
from forgetray.data.builtin_tasks import BUILTIN_TASKS


def default_cache_dir() -> str:
    """$FORGETRAY_CACHE, else ~/.cache/forgetray: the built-in model and compiled DeepSpeed ops."""
    return os.environ.get("FORGETRAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "forgetray"))


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
"""A task or model name: it becomes a directory and file name under the run (`scores/<name>/`,
`data/tasks/<name>.parquet`, `checkpoints/<name>.json`) on every filesystem and object store, so
letters, digits, `_` and `-`, starting with a letter or digit, at most 100 characters."""
RESERVED_NAMES = frozenset({"base"})
"""`base` is the base model's scores directory; a task of that name would replace them."""


def check_name(name: Any, key: str) -> str:
    """`name` if it is a safe task or model name, else a ConfigError naming `key` and what is accepted."""
    require(isinstance(name, str), key, f"expected a name (str), got {name!r}")
    require(
        NAME_PATTERN.fullmatch(name) is not None,
        key,
        f"{name!r} is not a usable name: use letters, digits, '_' and '-' (starting with a letter or "
        "digit, at most 100 characters), no '.', '..', '/' or spaces",
    )
    require(name not in RESERVED_NAMES, key, f"{name!r} is reserved (the base model's scores)")
    return name


def check_unique_names(names: Sequence[str], key: str) -> None:
    """Refuse a name given twice: two tasks of one name would train into one directory."""
    seen: set[str] = set()
    for name in names:
        require(name not in seen, key, f"task {name!r} is listed twice; task names must be unique")
        seen.add(name)


@dataclass(frozen=True)
class BuiltinModelConfig:
    """The built-in GPT-2-style model forgetray pretrains on the built-in upstream corpus.

    Deterministic from `seed` and cached on disk under a hash of every field, so a laptop pays for
    pretraining once.
    """

    vocab_size: int = 2048
    """Byte-level BPE vocabulary trained on the corpus."""
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    context_length: int = 256
    """Long enough for every built-in task's prompt and response."""
    pretrain_steps: int = 400
    batch_size: int = 8
    """Sequences of `context_length` tokens per step."""
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "context_length", "batch_size"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.pretrain_steps >= 0, "pretrain_steps", "must be >= 0")
        require(self.vocab_size >= 260, "vocab_size", "must be >= 260 (256 bytes plus specials)")
        require(self.n_embd % self.n_head == 0, "n_embd", f"must be divisible by n_head={self.n_head}")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""`model.attn_implementation` values transformers accepts for `from_pretrained`."""


@dataclass(frozen=True)
class ModelConfig:
    """The base model: `builtin`, a Hugging Face hub id, or a local directory saved by transformers."""

    name_or_path: str = "builtin"
    revision: str | None = None
    trust_remote_code: bool = False
    """Off unless you trust the model repository: it runs the repository's Python code."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    cache_dir: str | None = None
    """Where the built-in model is cached; default $FORGETRAY_CACHE or ~/.cache/forgetray."""
    builtin: BuiltinModelConfig = field(default_factory=BuiltinModelConfig)
    gguf_file: str | None = None
    """A GGUF file as the base model instead of `name_or_path`: a path, or `package:<distribution>`
    (the one .gguf file an installed Python package ships) or `package:<distribution>/<file name>`.
    Dequantised once to `dtype` and cached as a transformers directory under `cache_dir`."""
    attn_implementation: str | None = None
    """Attention kernel passed to `from_pretrained` for fine-tuning and scoring: `eager`, `sdpa`,
    `flash_attention_2` (needs the flash-attn package and a GPU), `flash_attention_3`,
    `flex_attention`, or a hub kernel `org/repo`; null: transformers' default (sdpa where supported)."""

    def __post_init__(self) -> None:
        require(
            self.attn_implementation is None
            or self.attn_implementation in ATTN_IMPLEMENTATIONS
            or "/" in self.attn_implementation,
            "attn_implementation",
            f"expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, a hub kernel org/repo, or null; "
            f"got {self.attn_implementation!r}",
        )
        if self.gguf_file is not None:
            require(
                self.name_or_path == "builtin",
                "gguf_file",
                f"is a model source of its own; leave name_or_path unset (it is {self.name_or_path!r})",
            )
            require(bool(self.gguf_file.strip()), "gguf_file", "must not be empty")

    @property
    def is_builtin(self) -> bool:
        return self.name_or_path == "builtin" and self.gguf_file is None

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or default_cache_dir()


@dataclass(frozen=True)
class SourceConfig:
    """One dataset of upstream examples: `builtin`, a local .jsonl/.json/.parquet/.csv file or
    directory, a `datasets` builder (`json`, `parquet`, `csv`) with `data_files`, or a hub id loaded
    with `datasets.load_dataset`.

    `format: text` scores every token of `text_field`; `format: instruction` scores only the tokens of
    `response_field`, conditioned on `prompt_field`; `format: messages` reads a conversation
    (`messages_field`: a list of {role, content}, or ShareGPT's {from, value}), renders it with the
    base model's chat template and scores the assistant turns named by `target_turns`.
    """

    path: str = "builtin"
    """Also `builtin_instructions`: questions about built-in corpus chunks, answered by the base model."""
    format: Literal["text", "instruction", "messages"] = "text"
    name: str | None = None
    """Hub dataset configuration name (the second argument of `load_dataset`)."""
    split: str = "train"
    """A split name or a `datasets` slice (`train[:1000]`); local files hold one split, `train`."""
    data_files: tuple[str, ...] = ()
    """Files (globs allowed) of a hub dataset or a `datasets` builder such as `json` to read."""
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """`format: messages`: the column holding each conversation (ShareGPT data: `conversations`)."""
    target_turns: Literal["last", "all"] = "last"
    """`format: messages`: score the last assistant turn only, or every assistant turn."""
    system_prompt: str | None = None
    """`format: messages`: a system turn put first in conversations that have none."""
    id_field: str | None = None
    """Column with stable example ids; default `<source>/<row>`."""
    limit: int | None = None
    """Keep the first `limit` rows of this source (with `streaming`, the `limit` rows sampled)."""
    streaming: bool = False
    """Read the source as a `datasets` stream instead of downloading it whole; needs `limit`."""
    stream_sample: Literal["first", "reservoir"] = "first"
    """`streaming`: the first `limit` examples of the stream, or a seeded uniform reservoir sample
    of `limit` examples from the first `stream_scan` (kept in stream order)."""
    stream_scan: int | None = None
    """`stream_sample: reservoir`: examples read from the stream; null reads the whole stream."""
    seed: int = 0
    """Seeds the reservoir sample."""
    sample: bool = True
    """Whether `upstream.n_examples` is drawn from this source. `false`: every row (up to `limit`)
    joins the examples besides the draw, which leaves the draw over the other sources as it was:
    how an evaluation set is added to a grown run (docs/growing.md)."""

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "must not be empty")
        require(self.limit is None or self.limit > 0, "limit", "must be a positive integer or null")
        require(self.path != "builtin" or self.format == "text", "format", "the builtin corpus is plain text")
        require(
            self.path != "builtin_instructions" or self.format != "messages",
            "format",
            "builtin_instructions are prompt/response rows; use format: instruction",
        )
        require(bool(self.messages_field), "messages_field", "must not be empty")
        require(
            not self.streaming or self.limit is not None,
            "limit",
            "streaming needs limit (how many examples to take from the stream)",
        )
        require(
            not self.streaming or self.path not in ("builtin", "builtin_instructions"),
            "streaming",
            "the built-in sources are in memory; streaming is for datasets",
        )
        require(
            self.stream_scan is None or (self.limit is not None and self.stream_scan >= self.limit),
            "stream_scan",
            "must be >= limit (a reservoir of limit examples from the first stream_scan) or null",
        )
        require(
            self.stream_sample == "first" or self.streaming,
            "stream_sample",
            "applies to streaming sources; set streaming: true or leave it at first",
        )


@dataclass(frozen=True)
class UpstreamConfig:
    """The N upstream examples whose forgetting is measured (the matrix columns)."""

    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    n_examples: int | None = 2000
    """Deterministic sample of this many examples from all sources together (but those with
    `sample: false`, which are kept whole); null keeps all. A larger `n_examples` extends the sample
    (the first n of one seeded order of the examples), never reshuffles it."""
    seed: int = 0
    chat_template: bool = False
    """Render `format: instruction` prompts with the base model's chat template (instruct models).
    `format: messages` sources are always rendered with a chat template (the model's, else
    forgetray's plain role-tag one)."""
    answer_max_new_tokens: int = 48
    """Source `builtin_instructions`: length cap of the base model's greedy answers."""

    def __post_init__(self) -> None:
        require(len(self.sources) > 0, "sources", "needs at least one source")
        require(self.answer_max_new_tokens > 0, "answer_max_new_tokens", "must be a positive integer")
        require(self.n_examples is None or self.n_examples > 0, "n_examples", "must be positive or null")


@dataclass(frozen=True)
class TaskSourceConfig:
    """A user task from a local file, a `datasets` builder with `data_files`, or a hub id:
    (prompt, response) pairs (`format: instruction`) or conversations (`format: messages`, trained on
    the assistant turns named by `target_turns`)."""

    name: str
    path: str
    subset: str | None = None
    """Hub dataset configuration name."""
    split: str = "train"
    """A split name or a `datasets` slice (`train[:1000]`); local files hold one split, `train`."""
    data_files: tuple[str, ...] = ()
    """Files (globs allowed) of a hub dataset or a `datasets` builder such as `json` to read."""
    format: Literal["instruction", "messages"] = "instruction"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """`format: messages`: the column holding each conversation (ShareGPT data: `conversations`)."""
    target_turns: Literal["last", "all"] = "last"
    """`format: messages`: train on the last assistant turn only, or on every assistant turn."""
    system_prompt: str | None = None
    """`format: messages`: a system turn put first in conversations that have none."""
    limit: int | None = None
    family: str | None = None
    """The task's family (e.g. flan, tulu, dolly): `complete.test_family` / `train_family` hold out
    or train on whole families (the authors' out-of-domain split). Null: the family "user"."""

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        require(self.family is None or bool(self.family), "family", "must be a non-empty name or null")
        require(bool(self.path), "path", "must not be empty")
        require(self.limit is None or self.limit > 0, "limit", "must be a positive integer or null")
        require(bool(self.messages_field), "messages_field", "must not be empty")


DEFAULT_TASKS = (
    "addition",
    "sort_numbers",
    "number_to_words",
    "json_format",
    "uppercase",
    "rot13",
    "count_words",
    "first_sentence",
    "snake_case",
    "function_names",
    "strip_comments",
    "code_keywords",
)
"""12 of the 15 built-in tasks (arithmetic, formatting, prose rewriting, code): the built-in default
run fits in 10 minutes on 2 cores with 12; `tasks.builtin=[all]` trains all 15."""


@dataclass(frozen=True)
class TasksConfig:
    """The M fine-tuning tasks (the matrix rows): built-in tasks by name and/or user sources."""

    builtin: tuple[str, ...] = DEFAULT_TASKS
    """Built-in task names, or `all` (15); an empty list uses none."""
    sources: tuple[TaskSourceConfig, ...] = ()
    n_examples: int = 256
    """Training examples per built-in task."""
    seed: int = 0
    chat_template: bool = False
    """Render built-in and `format: instruction` task prompts with the base model's chat template
    (instruct models). `format: messages` tasks are always rendered with a chat template."""

    def __post_init__(self) -> None:
        require(self.n_examples > 0, "n_examples", "must be a positive integer")
        if self.builtin != ("all",):
            for i, name in enumerate(self.builtin):
                require(
                    name in BUILTIN_TASKS,
                    f"builtin.{i}",
                    f"unknown built-in task {name!r}; choose from all, {', '.join(BUILTIN_TASKS)}",
                )
        check_unique_names(self.names, "builtin" if len(set(self.builtin)) < len(self.builtin) else "sources")

    @property
    def names(self) -> tuple[str, ...]:
        """Every task's name in row order: the built-in tasks, then the sources."""
        builtin = BUILTIN_TASKS if self.builtin == ("all",) else self.builtin
        return (*builtin, *(s.name for s in self.sources))


@dataclass(frozen=True)
class LoraConfig:
    """LoRA through peft; used when `finetune.method` is `lora`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)
    """Module names to adapt, or `all-linear` (peft's shorthand for every linear layer but the head)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank."""

    def __post_init__(self) -> None:
        require(self.rank > 0, "rank", "must be a positive integer")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(len(self.target_modules) > 0, "target_modules", "needs at least one module name")


@dataclass(frozen=True)
class SamConfig:
    """Sharpness-aware minimisation (Foret et al. 2021) around the base optimizer, as Li et al. 2024
    use it against forgetting (their code: AdamW, rho 2.0 for full fine-tuning, lr 5e-6)."""

    enabled: bool = False
    rho: float = 0.05
    """Radius of the weight perturbation rho * g / ||g||."""
    adaptive: bool = False
    """ASAM (Kwon et al. 2021): perturbation scaled per weight by |w|, e = rho * w^2 g / || |w| g ||."""

    def __post_init__(self) -> None:
        require(self.rho >= 0, "rho", "must be >= 0 (0 makes SAM the base optimizer at twice the cost)")


@dataclass(frozen=True)
class IVGuidedConfig:
    """IV-guided fine-tuning (Jiang et al. 2024, forgetray/studies/iv/guided.py): cross-entropy plus KL to the
    frozen base model with the task's instruction vector added, plus head-output consistency. The
    defaults are the reference code's (T 2, weights 20 / 0.1 / 1, thresholds 0.1 / 0.01). Needs the
    task's vector from `forgetray iv RUN` (`forgetray iv RUN --train` runs both)."""

    enabled: bool = False
    temperature: float = 2.0
    """T of the softmaxes compared by both KL terms."""
    weight_last: float = 20.0
    """Weight of KL(p_theta || p_ref) at the last prompt token."""
    weight_all: float = 0.1
    """Weight of the same KL summed over all (non-padding) positions and divided by the batch size
    (the authors' `batchmean`)."""
    threshold: float = 0.1
    """A KL term counts only while it exceeds this (value and gradient are 0 below it)."""
    weight_consistency: float = 1.0
    """Weight of the sum over the selected heads of the MSE between the fine-tuned model's outputs and
    the frozen base model's without the vector."""
    consistency_threshold: float = 0.01
    """A head's MSE counts only while it exceeds this."""

    def __post_init__(self) -> None:
        require(self.temperature > 0, "temperature", "must be > 0")
        for name in ("weight_last", "weight_all", "threshold", "weight_consistency", "consistency_threshold"):
            require(getattr(self, name) >= 0, name, "must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning one model per task: a DeepSpeed loop in Ray Train workers, tasks run through Ray Tune.

    The defaults are sized for the built-in model on a laptop; `configs/paper.yaml` holds Jin & Ren's
    (lr 2e-6, 1000 steps capped at 3 epochs, effective batch 8, 10 warm-up steps, max length 1024).
    """

    method: Literal["full", "lora"] = "full"
    learning_rate: float = 1e-3
    max_steps: int = 60
    """Optimizer steps, capped by `max_epochs`."""
    max_epochs: float = 3.0
    micro_batch_size: int = 8
    """Examples per worker per forward pass."""
    gradient_accumulation_steps: int = 1
    """Effective batch = micro_batch_size x gradient_accumulation_steps x num_workers."""
    warmup_steps: int = 10
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """After warm-up: constant, linear decay to 0, or cosine decay (DeepSpeed WarmupLR /
    WarmupDecayLR / WarmupCosineLR)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024
    """Task examples are truncated to min(max_length, the model's context)."""
    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = "torch_adamw"
    """torch's AdamW as DeepSpeed's client optimizer (no compilation, runs anywhere), or DeepSpeed's
    own AdamW (FusedAdam on GPU, DeepSpeedCPUAdam on CPU: compiled on first use)."""
    zero_stage: int = 0
    """ZeRO-3 builds the model already partitioned (each rank loads its shard, `zero.Init`) and
    gathers the weights layer by layer onto rank 0 to save them."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them: about a
    third more compute for activation memory that no longer grows with the number of layers."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON to use as is (batch sizes must agree with the fields above)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    """`sam.enabled: true` wraps the optimizer above in SAM (forgetray/finetune/sam.py)."""
    iv_guided: IVGuidedConfig = field(default_factory=IVGuidedConfig)
    """`iv_guided.enabled: true` adds the instruction-vector terms to the loss
    (forgetray/studies/iv/guided.py)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks) per task."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_tasks: int | None = None
    """At most this many tasks in flight; default: every task. Each task in flight is a Ray Tune
    trial whose TorchTrainer asks for its workers' resources: those the cluster cannot place yet
    wait, which is the demand that makes an autoscaler add (GPU) nodes, and on a fixed cluster they
    start as earlier tasks finish. Nothing is sized from the resources present at start, so set
    this to bound what one run may ask an autoscaler for (or the waiting trials' memory)."""
    checkpoint_every: int = 0
    """Report a resumable checkpoint every this many steps (0: only the final one)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before a task fails."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "num_workers",
        ):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.max_epochs > 0, "max_epochs", "must be > 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        require(
            not (self.sam.enabled and self.zero_stage == 3),
            "zero_stage",
            "SAM (sam.enabled) supports ZeRO stages 0, 1 and 2, not 3: set zero_stage to 2",
        )
        require(
            not (self.iv_guided.enabled and self.zero_stage == 3),
            "zero_stage",
            "IV-guided training (iv_guided.enabled) supports ZeRO stages 0, 1 and 2, not 3: "
            "set zero_stage to 2",
        )
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        require(self.max_failures >= 0, "max_failures", "must be >= 0")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        require(
            self.max_concurrent_tasks is None or self.max_concurrent_tasks > 0,
            "max_concurrent_tasks",
            "must be positive or null",
        )
        require(
            self.deepspeed_config is None or os.path.isfile(self.deepspeed_config),
            "deepspeed_config",
            f"file not found: {self.deepspeed_config}",
        )

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers


@dataclass(frozen=True)
class ScoreConfig:
    """Per-example NLL scoring, shard by shard on a Ray Data actor pool."""

    max_length: int = 128
    """Examples are truncated to min(max_length, the model's context) tokens, keeping the start.
    128 keeps the built-in default within minutes on 2 cores; raise it for real models (the paper
    scored up to 1024 tokens, as `configs/paper.yaml` does)."""
    max_batch_tokens: int = 16384
    """Padded tokens per forward pass; batches are length-bucketed so padding stays small."""
    shard_size: int = 256
    """Examples per shard: the unit of parallelism, of the parquet part files and of resumption."""
    num_actors: int | None = None
    """A fixed pool of this many scoring actors (min_actors = max_actors); null: an autoscaling pool."""
    min_actors: int = 1
    """The autoscaling pool's smallest size: actors kept while scoring runs."""
    max_actors: int | None = None
    """The autoscaling pool's largest size; null: one actor per shard left to score. The pool grows
    while shards wait and resources (or an autoscaler's new nodes) can place another actor, so it is
    never sized from the resources present at start."""
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    packing: bool = True
    """Score examples packed into rows with no padding, attention kept within each example
    (`forgetray.score.packed`); false: length-bucketed padded batches (`forgetray.score.nll`).
    Packing also interleaves the shards (each holds the whole length mix), so the two settings cut
    different shards and a partial run resumes only under the setting it started with."""
    metric: Literal["nll", "kl_ce"] = "nll"
    """`nll`: mean token NLL, Z = NLL_after - NLL_before (Jin & Ren's log-perplexity increase).
    `kl_ce`: cross-entropy against the base model's next-token distribution (Kalajdzievski 2024,
    `forgetray.score.soft_ce`); score parts then hold that CE in their `nll` column (the base
    model's own entry is its entropy), so Z = CE_after - H_base = KL(p_base || p_ft) per token."""

    def __post_init__(self) -> None:
        for name in ("max_length", "max_batch_tokens", "shard_size"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.max_batch_tokens >= self.max_length, "max_batch_tokens", "must be >= max_length")
        require(self.num_actors is None or self.num_actors > 0, "num_actors", "must be positive or null")
        require(self.min_actors > 0, "min_actors", "must be a positive integer")
        require(self.max_actors is None or self.max_actors > 0, "max_actors", "must be positive or null")
        require(
            self.max_actors is None or self.max_actors >= self.min_actors,
            "max_actors",
            f"must be >= min_actors ({self.min_actors}) or null",
        )
        require(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0")
        require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0")


@dataclass(frozen=True)
class AnalyseConfig:
    """Fits of the forgetting matrix (additive, multiplicative, SVD rank 1..max_rank), as the paper.

    R^2 at a rank depends on the row count: compare two matrices at equal rows (`last_tasks`).
    """

    max_rank: int = 10
    max_columns: int | None = 10000
    """Fits use a deterministic column subsample of at most this many examples (the paper: 10,000,
    drawn as the authors' `deterministic_random_indices`: default_rng(seed), without replacement)."""
    last_tasks: int | None = None
    """Fit only the last this many rows (the authors' cross-model table: 19); null: every row."""
    heatmap_rank: int = 3
    """Rank of the reconstruction drawn beside Z (and of the residual heatmap)."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.max_rank > 0, "max_rank", "must be a positive integer")
        require(self.max_columns is None or self.max_columns > 0, "max_columns", "must be positive or null")
        require(self.heatmap_rank > 0, "heatmap_rank", "must be a positive integer")
        require(self.last_tasks is None or self.last_tasks > 0, "last_tasks", "must be positive or null")


@dataclass(frozen=True)
class ScalingConfig:
    """`forgetray scaling CONFIG`: Kalajdzievski 2024's scaling laws for forgetting on one task.

    One LoRA fine-tune per rank (Ray Tune trials through the finetune stage's TorchTrainer path, the
    `finetune` section's settings with `method: lora` and `lora.rank` set per trial); every
    `eval_every` steps each trial scores a fixed upstream sample (forgetting L_f, soft cross-entropy
    against the base) and a fixed sample of the task (fine-tuning loss L_ft). Outputs in
    `<run>/scaling/`.
    """

    task: str = "addition"
    """The task fine-tuned (a built-in task name or a `tasks.sources` name)."""
    ranks: tuple[int, ...] = (1, 2, 4, 8)
    """LoRA ranks of the grid; P (parameters fine-tuned) is counted from each peft model."""
    eval_every: int = 5
    """Steps between evaluations (also at step 0 and at the last step)."""
    n_upstream: int = 200
    """Upstream examples scored at every evaluation (the first of the run's upstream sample)."""
    n_task_eval: int = 64
    """Task examples (the first of the task's training set) on which L_ft is measured."""
    min_step: int = 10
    """Fits use steps >= min_step (Kalajdzievski excluded the first 50 of 260)."""

    def __post_init__(self) -> None:
        require(bool(self.task), "task", "must name a task")
        require(len(self.ranks) >= 2, "ranks", "needs at least two LoRA ranks to fit a law in P")
        require(all(r > 0 for r in self.ranks), "ranks", "must be positive integers")
        require(len(set(self.ranks)) == len(self.ranks), "ranks", f"must be distinct, got {list(self.ranks)}")
        for name in ("eval_every", "n_upstream", "n_task_eval"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.min_step >= 1, "min_step", "must be >= 1 (the power law needs N > 0)")


COMPLETION_METHODS = ("global_mean", "additive", "knn", "als_mf")
"""forgetray's own completers (`forgetray.stats.completion`)."""
LRF_COMPLETION_METHODS = ("baseline_sgd", "knn_msd", "svd_sgd")
"""The authors' completers exactly as their code runs them (`forgetray.stats.lrf`)."""
COMPLETION_PROTOCOLS = ("forgetray", "lrf")


@dataclass(frozen=True)
class CompleteConfig:
    """Predicting held-out tasks' rows from `revealed_k` measured entries.

    Two protocols (`protocol`); either may run any method, ours or the authors':
    - forgetray: `n_test_tasks` held-out tasks drawn with `split_seed` (or `test_tasks` /
      `test_family`), for each seed and test task k distinct columns drawn per (seed, task);
    - lrf: as the authors' `run_matrix_completion.py`: the same k columns for every test task of a
      seed, drawn with replacement (so k or fewer distinct), test tasks fixed by name (`test_tasks`)
      or a whole family held out (`test_family`, trained on `train_family`; with neither, drawn
      as under forgetray), default methods the authors' (`LRF_COMPLETION_METHODS`, and their
      logistic MF for binary forgetting).
    Both pool the squared errors of a seed's test tasks into one RMSE and report mean and std over
    `n_seeds` seeds.
    """

    protocol: str = "forgetray"
    """forgetray or lrf (above)."""
    revealed_k: int = 30
    n_seeds: int = 10
    n_test_tasks: int | None = None
    """Held-out tasks drawn at random when neither test_tasks nor test_family is set; default a
    quarter of the tasks (at least 1)."""
    split_seed: int = 0
    test_tasks: tuple[str, ...] = ()
    """Held-out tasks by name (the authors' in-domain split: 20 fixed FLAN tasks)."""
    test_family: str | None = None
    """Hold out every task of this family (out-of-domain; families from the tasks' `family`)."""
    train_family: str | None = None
    """Train only on this family's tasks (the authors train on FLAN); null: every task not held out."""
    exclude_tasks: tuple[str, ...] = ()
    """Tasks used neither for training nor testing (the authors' out-of-domain split also leaves
    their 20 in-domain test tasks out of the FLAN training rows)."""
    methods: tuple[str, ...] | None = None
    """Completers to run, forgetray's and/or the authors'; null: the protocol's own
    (forgetray: COMPLETION_METHODS, lrf: LRF_COMPLETION_METHODS)."""
    rank: int = 5
    """Rank of the matrix factorisations (ALS MF, SGD SVD, both logistic MFs)."""
    reg: float = 0.03
    """L2 weight of forgetray's ALS MF and Newton logistic MF (the authors' methods keep theirs)."""
    knn_k: int = 40
    binary: bool = True
    """Also run the binary protocol (forgotten = Z > binary_threshold) with logistic MF added
    (forgetray's Newton logistic MF; under lrf the authors' gradient-ascent one as well)."""
    binary_threshold: float | None = None
    """Null: the 75th percentile of the training rows' Z, so a quarter of entries count as forgotten."""
    distributed_above: int | None = 100_000_000
    """ALS MF fits (here and in the replay experiment's predictions) run as Ray tasks, each reading
    its column block of `matrix/forgetting.npy` (`forgetray.stats.als_ray`), when the matrix has
    more than this many entries (1e8: 1,000 tasks x 100,000 examples, 400 MB float32); null: only
    when `distributed` is true."""
    distributed: bool = False
    """Run the ALS MF fits as Ray tasks whatever the matrix size."""

    @property
    def method_names(self) -> tuple[str, ...]:
        """`methods`, or the protocol's default methods."""
        if self.methods is not None:
            return self.methods
        return LRF_COMPLETION_METHODS if self.protocol == "lrf" else COMPLETION_METHODS

    def __post_init__(self) -> None:
        require(
            self.protocol in COMPLETION_PROTOCOLS,
            "protocol",
            f"got {self.protocol!r}; choose from {', '.join(COMPLETION_PROTOCOLS)}",
        )
        require(self.revealed_k > 0, "revealed_k", "must be a positive integer")
        require(
            self.distributed_above is None or self.distributed_above > 0,
            "distributed_above",
            "must be a positive number of matrix entries or null",
        )
        require(self.n_seeds > 0, "n_seeds", "must be a positive integer")
        require(
            self.n_test_tasks is None or self.n_test_tasks > 0, "n_test_tasks", "must be positive or null"
        )
        require(
            not (self.test_tasks and self.test_family),
            "test_tasks",
            "give test_tasks or test_family, not both",
        )
        require(len(set(self.test_tasks)) == len(self.test_tasks), "test_tasks", "names must be unique")
        require(
            not self.exclude_tasks or bool(self.test_tasks) or self.test_family is not None,
            "exclude_tasks",
            "needs held-out tasks by name (test_tasks) or family (test_family)",
        )
        require(
            not set(self.exclude_tasks) & set(self.test_tasks),
            "exclude_tasks",
            "a task cannot be both excluded and in test_tasks",
        )
        require(
            self.train_family is None or self.train_family != self.test_family,
            "train_family",
            f"must differ from test_family {self.test_family!r}",
        )
        known = (*COMPLETION_METHODS, *LRF_COMPLETION_METHODS)
        unknown = [m for m in self.method_names if m not in known]
        require(not unknown, "methods", f"unknown {unknown}; choose from {', '.join(known)}")
        require(self.rank > 0 and self.knn_k > 0, "rank", "rank and knn_k must be positive integers")


REPLAY_SAMPLERS = ("random", "predicted", "ground_truth", "top_k")
PROBE_STRATEGIES = ("random", "leverage", "variance", "pivoted_qr", "coverage")


@dataclass(frozen=True)
class ReplayConfig:
    """Replay weighted by predicted forgetting (`forgetray replay`, `forgetray finetune --protect`).

    Sized for the built-in default on 2 CPU cores. The paper's values (Jin & Ren 2024): ratio 1/32
    (OLMo-1B/7B; 1/8 for OLMo-7B-Instruct), temperature 0.1, revealed_k 30, 10,000 never-replayed
    examples of 141,871, online fraction 0.1. The built-in tasks have 256 examples, where 1/32 places
    8 upstream examples (lrf mixing), so the default ratio here is 1/4 (64). Measured on the built-in
    model (benchmarks/RESULTS.md): at T 0.1 predicted (ALS MF) replay forgot more than random replay
    at ratio 1/32 and 1/4 (95% CIs over task x seed units above 0); no measured regime has it beat
    random.
    """

    ratio: float = 0.25
    """Upstream examples per task example (lrf mixing) or replay steps per task step (steps
    mixing); training runs max_steps x (1 + ratio) steps."""
    mixing: Literal["lrf", "steps"] = "lrf"
    """lrf: the authors' code, one upstream example after every 1 / ratio task examples, the
    mixture shuffled into batches; steps: whole optimizer steps of upstream examples
    (forgetray.studies.replay.samplers). The online variant always uses steps."""
    samplers: tuple[str, ...] = ("random", "predicted", "ground_truth")
    """Conditions besides no replay: random, predicted and top_k (one condition per predictor,
    `predicted_<method>`), ground_truth (upper bound), and online (the partition method: random
    replay for `online_fraction` of steps, then predicted by ALS MF)."""
    predictors: tuple[str, ...] = ("additive", "knn", "als_mf")
    """Completion methods (`complete.methods` names) whose predictions drive predicted and top_k."""
    temperature: float = 0.1
    """T of softmax(forgetting / T) for the predicted and ground_truth samplers."""
    n_tasks: int = 3
    """Held-out tasks of the offline experiment (each costs one fine-tune per condition and seed)."""
    n_seeds: int = 3
    """Training seeds per condition (finetune.seed + 0, 1, ...): seed s changes the batch order,
    the initialisation noise and the replay draw. Effects are judged over (task, seed) units."""
    task_seed: int = 0
    n_never_replayed: int = 500
    """Upstream examples never replayed: the only ones replay runs are judged on (paper: 10,000)."""
    split_seed: int = 0
    revealed_k: int = 30
    """Entries of a held-out task's row measured before predicting the rest."""
    probe: str = "random"
    """How the revealed_k entries are chosen: random (the paper), leverage, variance, pivoted_qr,
    coverage."""
    rank: int = 5
    reg: float = 0.03
    """ALS MF (the completion stage's best method) fits the predictions; rank and reg as `complete`."""
    online_fraction: float = 0.1
    """Online variant: share of training steps with random replay before measuring and completing."""
    probe_eval_seeds: int = 10
    """Seeds of random probes in the active-probe evaluation."""
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.ratio > 0, "ratio", "must be > 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        allowed = (*REPLAY_SAMPLERS, "online")
        unknown = [s for s in self.samplers if s not in allowed]
        require(not unknown, "samplers", f"unknown {unknown}; choose from {', '.join(allowed)}")
        require(self.n_tasks > 0, "n_tasks", "must be a positive integer")
        require(self.mixing in ("lrf", "steps"), "mixing", f"got {self.mixing!r}; choose from lrf, steps")
        require(bool(self.predictors), "predictors", "needs at least one completion method")
        bad = [m for m in self.predictors if m not in COMPLETION_METHODS]
        require(not bad, "predictors", f"unknown {bad}; choose from {', '.join(COMPLETION_METHODS)}")
        require(len(set(self.predictors)) == len(self.predictors), "predictors", "has repeated methods")
        require(self.n_seeds > 0, "n_seeds", "must be a positive integer")
        require(self.n_never_replayed > 0, "n_never_replayed", "must be a positive integer")
        require(self.revealed_k > 0, "revealed_k", "must be a positive integer")
        require(
            self.probe in PROBE_STRATEGIES,
            "probe",
            f"got {self.probe!r}; choose from {', '.join(PROBE_STRATEGIES)}",
        )
        require(self.rank > 0 and self.reg > 0, "rank", "rank and reg must be positive")
        require(0 < self.online_fraction < 1, "online_fraction", "must be in (0, 1)")
        require(self.probe_eval_seeds > 0, "probe_eval_seeds", "must be a positive integer")


@dataclass(frozen=True)
class FlatnessConfig:
    """Loss landscape around the base and every fine-tuned model (`forgetray flatness RUN`,
    forgetray/studies/flatness/measure.py): a resolution x resolution grid of filter-normalised directions."""

    data: Literal["upstream", "task"] = "upstream"
    """Loss on a fixed sample of the upstream examples (every model alike), or on each fine-tuned
    model's own task (the base model on an equal share of every task)."""
    n_examples: int = 32
    max_length: int = 128
    """Tokens per example (its start), as in scoring."""
    resolution: int = 11
    """Grid points per direction (odd, so theta itself is on the grid)."""
    span: float = 0.5
    """The grid covers [-span, span]^2 in units of the filter-normalised directions."""
    seed: int = 0
    """Seeds the example sample and the directions (the same for every model)."""

    def __post_init__(self) -> None:
        require(self.n_examples > 0, "n_examples", "must be a positive integer")
        require(self.max_length > 1, "max_length", "must be > 1")
        require(self.resolution >= 3 and self.resolution % 2 == 1, "resolution", "must be odd and >= 3")
        require(self.span > 0, "span", "must be > 0")


@dataclass(frozen=True)
class ExactMatchConfig:
    """Exact-match (binary) forgetting (`forgetray exact-match RUN`, forgetray/studies/exact_match/metric.py):
    greedy answers of the base and every fine-tuned model to probes built from the upstream examples;
    forgotten = the base model was right and the fine-tuned model is wrong (Jin & Ren 2024)."""

    prompt_tokens: int = 128
    """Plain-text examples become continuation probes: the text's first `prompt_tokens` tokens are
    the prompt (fewer when the text is short, so that a reference is left)."""
    reference_tokens: int = 1
    """...and its next `reference_tokens` tokens the reference the greedy continuation must equal."""
    max_new_tokens: int = 512
    """Instruction examples: greedy generation of up to this many tokens, stopped at EOS or at the
    first blank line (the authors' 512), within `max_length`."""
    max_length: int = 256
    """Prompt + generated tokens, at most (also capped by the model's context); longer prompts keep
    their last tokens. The authors generate 512 tokens within the model's whole context; 256 bounds
    the cost of the built-in default (whose context is 256): raise it to a real model's context to
    give long instruction prompts the authors' full 512 tokens."""
    max_batch_tokens: int = 8192
    """Padded prompt + generated tokens per `generate` call."""
    shard_size: int = 256
    """Examples per shard: the unit of parallelism, of the part files and of resumption."""
    num_actors: int | None = None
    """A fixed pool of this many generation actors; null: a pool that autoscales from 1 to one
    actor per shard left (`forgetray.score.sharded.actor_count`)."""
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "reference_tokens", "max_new_tokens", "max_batch_tokens", "shard_size"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.max_length > 1, "max_length", "must be > 1 (a prompt token and a generated one)")
        require(self.max_batch_tokens >= self.max_length, "max_batch_tokens", "must be >= max_length")
        require(self.num_actors is None or self.num_actors > 0, "num_actors", "must be positive or null")
        require(self.cpus_per_actor > 0, "cpus_per_actor", "must be > 0")
        require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0")


@dataclass(frozen=True)
class ForecastConfig:
    """LM-based forecasting (`forgetray forecast RUN`, forgetray/stats/forecast.py): scorers of (task,
    upstream example) pairs from the base model's last-token hidden states, trained on the training
    tasks' rows and evaluated with the completion protocol of `complete` (same split, k, seeds):
    lm_forecast (the authors': one shared head, encoder fine-tuned, binary Z > 0) and
    frozen_forecast (forgetray's: frozen encoder, two MLPs, real-valued Z)."""

    n_task_examples: int = 64
    """Training examples per task (a seeded sample) whose hidden states are averaged into the task's."""
    max_length: int = 128
    """Tokens per example (its start) fed to the model, as in scoring."""
    batch_size: int = 32
    hidden_size: int = 64
    depth: int = 1
    """Hidden layers of the projections f and g (0: linear)."""
    dim: int = 16
    """Dimension of the space f(h_task) and g(h_example) meet in."""
    tau: float = 1.0
    learning_rate: float = 0.01
    epochs: int = 300
    weight_decay: float = 0.001
    example_bias: bool = True
    """A learned per-example bias b_j (the paper's prior) added to -<f, g> / tau."""
    calibration_shrinkage: float = 15.0
    """The calibrated variant fits a per-task offset and scale on the k revealed entries, shrunk by
    k / (k + calibration_shrinkage) (the additive baseline's reg_task)."""
    train_encoder: bool = True
    """lm_forecast (the authors' forecaster): fine-tune the LM encoder with the shared head, as their
    `fpd.freeze_lm: false`; false: train the head alone on frozen states (much cheaper)."""
    head_output_dim: int = 768
    """lm_forecast: output of the shared head Linear(H, H) - ReLU - Linear(H, this) (`fpd.output_dim`)."""
    head_learning_rate: float = 1e-3
    """lm_forecast: Adam learning rate of the head (the authors' lr 5e-6 x lr_scale 200)."""
    encoder_learning_rate: float = 5e-6
    """lm_forecast: Adam learning rate of the encoder (`fpd.lr`)."""
    steps: int = 300
    """lm_forecast: training steps (the authors ran 10k-100k on OLMo)."""
    tasks_per_step: int = 8
    """lm_forecast: (task, task example) draws per step, each paired with one forgotten (Z > 0) and
    one kept upstream example of that task's row."""
    prior: bool = True
    """lm_forecast: add each upstream example's fixed log prior odds of being forgotten over the
    training tasks (`fpd.prior: odd`)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_task_examples",
            "max_length",
            "batch_size",
            "hidden_size",
            "dim",
            "epochs",
            "head_output_dim",
            "steps",
            "tasks_per_step",
        ):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.max_length > 1, "max_length", "must be > 1")
        require(self.depth >= 0, "depth", "must be >= 0")
        require(self.tau > 0, "tau", "must be > 0")
        for name in ("learning_rate", "head_learning_rate", "encoder_learning_rate"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.calibration_shrinkage >= 0, "calibration_shrinkage", "must be >= 0")


@dataclass(frozen=True)
class IVConfig:
    """Instruction vectors (`forgetray iv RUN`, forgetray/studies/iv/): head outputs, indirect effects and the
    vector per task, and (`--train`) IV-guided vs plain fine-tuning of a few of the run's tasks."""

    tasks: tuple[str, ...] = ()
    """Tasks to extract vectors for; empty: every task of the run."""
    n_prompts: int = 16
    """Task prompts averaged over and corrupted (the paper: about 100); cost grows with
    n_prompts x layers x heads forward rows."""
    top_k: int = 10
    """Heads summed into the vector (the paper's 10). A model with fewer heads sums all of them, with
    a logged warning (the authors' code fails there)."""
    layer: int | None = None
    """Decoder layer whose attention output (projection output, last prompt token) the vector is added
    to; null: round(9 x n_layers / 32), the authors' layer 9 of Llama-2-7B's 32 scaled by depth."""
    instruction_share: float = 0.9
    """A line in this share of a task's prompts and in no other task's is its instruction (removed
    to corrupt the prompt)."""
    batch_rows: int = 32
    """Prompts (or patched prompt copies) per forward pass."""
    n_compare_tasks: int = 3
    """`--train`: the first this many of the tasks are fine-tuned with IV guidance and compared."""
    n_task_eval: int = 64
    """`--train`: task examples on which the plain and guided models' task loss is measured."""
    seed: int = 0
    """Seeds which of a task's prompts are used."""

    def __post_init__(self) -> None:
        for name in ("n_prompts", "top_k", "batch_rows", "n_compare_tasks", "n_task_eval"):
            require(getattr(self, name) > 0, name, "must be a positive integer")
        require(self.layer is None or self.layer >= 0, "layer", "must be >= 0 or null")
        require(0 < self.instruction_share <= 1, "instruction_share", "must be in (0, 1]")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking of every fine-tuning run through Ray's own integrations.

    Each task's learning curve (loss, learning rate, tokens/s and the loss parts of replay, SAM and
    IV-guided training every `log_every` steps) is always kept in `<run>/curves/<task>.json`, whatever
    the backend; a backend also receives it live (MLflow through `setup_mlflow`, W&B through
    `setup_wandb`, on rank 0), plus the run's matrix summary and report as artifacts at the end.
    """

    backend: Literal["none", "mlflow", "tensorboard", "wandb"] = "none"
    log_every: int = 10
    """Optimizer steps between two reports (and the last step always)."""
    experiment: str | None = None
    """MLflow experiment / W&B project; default: the run directory's name."""
    tracking_uri: str | None = None
    """MLflow only: where runs are stored; default a local store `file:<run>/mlruns` (works offline)."""
    log_dir: str | None = None
    """TensorBoard event files (default `<run>/tensorboard`) or W&B's local files (default `<run>`)."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B only: `offline` writes runs locally (`wandb sync` uploads them later)."""

    def __post_init__(self) -> None:
        require(self.log_every > 0, "log_every", "must be a positive integer")
        require(
            self.tracking_uri is None or self.backend == "mlflow",
            "tracking_uri",
            f"is for backend mlflow only (backend is {self.backend!r}); use log_dir",
        )
        require(self.experiment is None or bool(self.experiment.strip()), "experiment", "must not be empty")


@dataclass(frozen=True)
class RunConfig:
    """Everything one forgetray run needs; the resolved copy is saved as `<run>/config.yaml`."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    analyse: AnalyseConfig = field(default_factory=AnalyseConfig)
    complete: CompleteConfig = field(default_factory=CompleteConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    flatness: FlatnessConfig = field(default_factory=FlatnessConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    exact_match: ExactMatchConfig = field(default_factory=ExactMatchConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    iv: IVConfig = field(default_factory=IVConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require(bool(self.run_dir.strip()), "run_dir", "must not be empty (give --out DIR or run_dir=DIR)")
        require(
            len(self.tasks.names) > 0,
            "tasks",
            "no tasks to fine-tune: tasks.builtin is empty and tasks.sources has none",
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RETIRED_KEYS: dict[str, dict[str, str]] = {
    "exact_match": {
        "answer_margin": "instruction answers are now generated up to exact_match.max_new_tokens (512), "
        "stopped at EOS or the first blank line (the authors' rule)",
    },
}
"""{section: {key: why}}: keys earlier versions wrote into a run's config.yaml that no longer mean
anything; ignored with a warning, so that those run directories still load."""


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    return from_dict(RunConfig, raw, source, RETIRED_KEYS)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The config in `path` (or the built-in default when None) with `overrides` applied."""
    return load_dataclass(
        RunConfig,
        path,
        overrides,
        defaults=RunConfig().to_dict(),
        top_level=" of stage names to settings",
        retired=RETIRED_KEYS,
    )
