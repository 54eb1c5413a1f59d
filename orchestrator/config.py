"""Job configuration: YAML files validated by pydantic v2 at the boundary.

Precedence is ``--set a.b=c`` > job YAML > defaults. Unknown keys are errors that name the key
and the allowed ones. ``mla schema`` exports the JSON Schema for editors.

This module never imports torch.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mla.config import PRESETS, ModelConfig
from orchestrator.contract.errors import ConfigError
from orchestrator.contract.layout import Recompute


def _allows_bool(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


class _Section(BaseModel):
    # allow_inf_nan=False: ``.inf`` / ``.nan`` are refused for every float field (lr, grad_clip, ...).
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False
    )

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        """YAML ``true`` is a bool, and pydantic would read it as 1 for an int field: refuse it."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if (
                    field is not None
                    and isinstance(value, bool)
                    and not _allows_bool(field.annotation)
                ):
                    raise ValueError(f"{name}={str(value).lower()} is a boolean; give a number")
        return data


class ModelSection(_Section):
    """Model shape. Start from ``preset`` and override any field."""

    preset: str | None = None
    """Name of a preset shape (tiny, small, 1b, 7b, 13b, 70b); fields below override it."""
    vocab_size: int | None = Field(None, ge=2)
    """Number of token ids (256 with the byte-level tokenizer)."""
    d_model: int | None = Field(None, ge=1)
    """Hidden size, in features."""
    n_layers: int | None = Field(None, ge=1)
    """Number of transformer blocks."""
    n_heads: int | None = Field(None, ge=1)
    """Number of attention heads."""
    n_kv_heads: int | None = Field(None, ge=1)
    """Number of key/value heads (grouped-query attention); unset means n_heads."""
    ffn_hidden: int | None = Field(None, ge=1)
    """SwiGLU MLP hidden width, in features."""
    attn_head_dim: int | None = Field(None, ge=2)
    """Features per attention head when not d_model / n_heads (a head-pruned model, `mla
    compress`); unset derives it."""
    max_seq_len: int | None = Field(None, ge=1)
    """Longest sequence supported by the rotary embedding, in tokens."""
    attention: Literal["mla", "dense"] | None = None
    """'mla' (sliding window + sparse top-k global, gated) or 'dense' (baseline)."""
    local_window: int | None = Field(None, ge=1)
    """Sliding-window size of the local branch, in tokens."""
    global_k: int | None = Field(None, ge=1)
    """Earlier-key budget of the sparse global branch, in tokens: ceil(global_k / block_size) whole key blocks (indexer 'block'), or k keys per query (indexer 'exact')."""
    mix: Literal["gate", "sum", "local"] | None = None
    """How the two branches are combined: learned sigmoid gate, plain sum, or 'local' (window-only: the global branch switched off, an ablation)."""
    indexer: Literal["exact", "block"] | None = None
    """Global-branch key selection: 'block' (whole key blocks per query block, the fast path) or 'exact' (token top-k, O(n^2) reference)."""
    block_size: int | None = Field(None, ge=1)
    """Block size of the block selection and the blocked local branch, in tokens (128 for FlexAttention on CUDA)."""
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """Dropout probability (0 disables it)."""

    # --- fine-tuning (issue 18, item 4) ---
    init_from: str | None = None
    """Start from these weights (not their optimizer state or step): a checkpoint folder
    (RUN_DIR/checkpoints/step_NNNNNNN), a run folder (its newest verified checkpoint) or an
    `mla export` folder; the shape fields must match it. A checkpoint of this run itself wins
    (the run resumes instead)."""

    @model_validator(mode="after")
    def _known_preset(self) -> ModelSection:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        return self

    def build(self) -> ModelConfig:
        """Return the :class:`mla.config.ModelConfig` (preset, then overrides).

        Raises:
            ConfigError: the combination is inconsistent (e.g. d_model not divisible by n_heads).
        """
        base = PRESETS[self.preset] if self.preset else ModelConfig()
        changes = {
            k: v
            for k, v in self.model_dump(exclude={"preset", "init_from"}).items()
            if v is not None
        }
        try:
            return base.replace(**changes)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None


class DataSection(_Section):
    """Training text and tokenization."""

    path: str | None = None
    """Text file, folder of .txt/.md/.py files, .jsonl (field 'text') or .parquet (column
    'text'). Unset: the Python standard library's source files (no download)."""
    seq_len: int = Field(128, ge=2)
    """Tokens per training sequence."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share of files (or documents) held out for validation."""
    # --- tokenizer (issue 18, items 1-3) ---
    tokenizer: str = Field("byte", min_length=1)
    """Tokenizer: 'byte' (each UTF-8 byte is one of 256 ids), 'bpe' (a byte-level BPE of
    model.vocab_size ids trained on the training split at launch, kept in RUN_DIR/tokenizer.json),
    or the path of a tokenizer.json (`mla tokenizer train`). A prepared data.path brings its own."""


class PrivacySection(_Section):
    """Differentially private training (DP-SGD, Abadi et al. 2016): per-sequence gradient
    clipping and Gaussian noise, with Poisson sampling of sequences and a privacy accountant.
    Setting any field turns it on; see :mod:`orchestrator.privacy` for what it checks."""

    target_epsilon: float | None = None
    """Privacy budget epsilon for the whole run; the noise is calibrated to spend it by train.steps."""
    noise_multiplier: float | None = Field(None, ge=0.0)
    """Noise standard deviation / max_grad_norm (sigma); set it instead of (or with) target_epsilon."""
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    """Privacy parameter delta; unset means 1 / (2 N) for N training sequences; must be < 1 / N."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Per-sequence gradient clipping norm C (L2 over all parameters)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Privacy accountant: 'rdp' (Renyi DP, Mironov 2017) or 'prv' (privacy random variables,
    Gopi et al. 2021; tighter, slower)."""
    sampling: Literal["poisson"] = "poisson"
    """How each step's sequences are drawn: 'poisson' (each sequence independently with rate
    global_batch / N), the sampling both accountants assume."""

    @model_validator(mode="after")
    def _budget(self) -> PrivacySection:
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "train.privacy needs target_epsilon or noise_multiplier; set for example "
                "train.privacy.target_epsilon=8"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(
                f"train.privacy.target_epsilon({self.target_epsilon}) must be > 0; a budget "
                "such as 1, 3 or 8 is usual"
            )
        return self


class DistillSection(_Section):
    """Logit distillation from a frozen teacher (Hinton et al. 2015): the training loss becomes
    kl_weight * T^2 * KL(teacher_T || student_T) + lm_weight * CE per token; val_loss stays the
    ordinary CE. See :mod:`orchestrator.distill` for what is checked before launch."""

    teacher: str | None = None
    """The teacher's weights: a run folder (its newest verified checkpoint), a checkpoint folder
    or an `mla export` folder; its vocabulary and tokenizer must be the run's."""
    temperature: float = Field(1.0, gt=0.0)
    """Softening temperature T of both softmaxes (1 is the plain forward KL)."""
    kl_weight: float = Field(1.0, ge=0.0)
    """Weight of the distillation term T^2 * KL."""
    lm_weight: float = Field(0.0, ge=0.0)
    """Weight of the ordinary next-token cross-entropy added to it (0 leaves it out)."""

    @model_validator(mode="after")
    def _has_teacher(self) -> DistillSection:
        if not self.teacher:
            raise ValueError(
                "train.distill needs a teacher; set train.distill.teacher=RUN_DIR (or a "
                "checkpoint or export folder), or remove train.distill"
            )
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise ValueError(
                "train.distill.kl_weight=0 and lm_weight=0 leave no loss; set kl_weight > 0"
            )
        return self


class TrainSection(_Section):
    """Optimisation schedule."""

    steps: int = Field(200, ge=1)
    """Optimizer steps to run."""
    micro_batch: int = Field(8, ge=1)
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch: int = Field(32, ge=1)
    """Sequences per optimizer step over all data-parallel ranks."""
    lr: float = Field(3e-3, gt=0.0)
    """Peak learning rate (AdamW)."""
    min_lr: float = Field(3e-4, ge=0.0)
    """Final learning rate of the cosine decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clipping threshold (0 disables it)."""
    seed: int = Field(1234, ge=0, lt=2**63)
    """Seed of weights, data order and dropout (>= 0)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; 'auto' is bf16 on GPU and fp32 on CPU."""
    log_every: int = Field(10, ge=1)
    """Steps between progress lines and metrics.jsonl records."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation passes (also at the last step)."""
    eval_batches: int = Field(4, ge=1)
    """Validation pass size, in global batches of held-out sequences (same for every layout)."""
    privacy: PrivacySection | None = None
    """Differentially private training (DP-SGD); unset trains without privacy."""
    distill: DistillSection | None = None
    """Logit distillation from a teacher model (recovery of a pruned model); unset trains on
    the next-token loss alone."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tb (rank 0: scalars, gate histograms, config)."""
    max_bad_steps: int = Field(5, ge=1)
    """Consecutive optimizer steps with a non-finite loss or gradient norm, or skipped by DeepSpeed
    (overflow), that stop the run as diverged."""

    # --- fine-tuning (issue 18, item 4): see mla.freeze ---
    freeze: list[str] = []
    """Parameter-name patterns (fnmatch, e.g. 'blocks.0.*', '*.attn.w_gate.*') to freeze, in the
    unsharded model's names whatever the layout; each must match at least one parameter."""
    trainable_last_layers: int | None = Field(None, ge=0)
    """Train only the last N transformer blocks (plus the head while train_head); unset trains
    every block not frozen by train.freeze."""
    train_head: bool = True
    """Train the final norm and the output head, which is tied to the token embedding (so the
    embedding trains with it, and freezes with it when false)."""


class ParallelSection(_Section):
    """Parallel layout: data x tensor x pipeline, ZeRO stage and recomputation."""

    auto: bool = False
    """Let the planner choose every field from the cluster's resources (`parallel: auto`)."""
    data: int | None = Field(None, ge=1)
    """Data-parallel degree; unset means num_workers / (tensor * pipeline)."""
    tensor: int = Field(1, ge=1)
    """Tensor-parallel degree."""
    pipeline: int = Field(1, ge=1)
    """Pipeline-parallel degree (number of stages)."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage (0-3); pipelines allow at most 1."""
    recompute: Recompute = "none"
    """Activation recomputation policy."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism alongside tensor parallelism."""
    virtual_stages: int = Field(1, ge=1)
    """Virtual pipeline stages per rank (interleaved schedule)."""


class RuntimeEnvSection(_Section):
    """A Ray runtime environment for the job's driver and workers, passed to Ray unchanged
    (merged with the uploaded project code). Leave it unset when the cluster runs the project's
    image; see https://docs.ray.io/en/latest/ray-core/handling-dependencies.html."""

    pip: list[str] | str | dict[str, Any] | None = None
    """Packages (or a requirements file, or Ray's ``{packages, pip_check, pip_version}`` form)
    Ray installs into a virtualenv on every node."""
    uv: list[str] | str | dict[str, Any] | None = None
    """Like ``pip``, installed with uv."""
    py_executable: str | None = None
    """Python (or a command such as ``uv run``) that runs the job's driver and workers on every
    node, e.g. the path of a virtual environment's ``bin/python`` present on all nodes."""
    env_vars: dict[str, str] | None = None
    """Environment variables of the driver and the workers."""
    container: dict[str, Any] | None = None
    """Ray's ``container`` field (``image``, ``run_options``; deprecated by Ray for ``image_uri``)."""
    image_uri: str | None = None
    """Container image the workers run in (Ray's ``image_uri``; needs podman on the nodes)."""
    setup_timeout_s: int = Field(600, ge=1)
    """Seconds Ray may spend setting the environment up (installs) before it fails the job with
    the runtime-env logs (``RuntimeEnvConfig.setup_timeout_seconds``)."""

    def to_ray(self) -> dict[str, Any]:
        """The ``runtime_env`` dict for Ray: the fields set, plus ``config.setup_timeout_seconds``."""
        env = self.model_dump(exclude={"setup_timeout_s"}, exclude_none=True)
        env["config"] = {"setup_timeout_seconds": self.setup_timeout_s}
        return env


DEFAULT_IMAGE = "mla-train:0.1.0-gpu"
"""Tag that the documented ``docker build --target gpu`` gives the CUDA image (see Dockerfile);
push it to a registry the cluster pulls from and set ``cluster.image`` to that name."""


class ClusterSection(_Section):
    """Where the job runs."""

    address: str | None = None
    """Ray address to connect to ('auto', 'ray://host:10001'); unset starts an embedded Ray."""
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (one per GPU, or per CPU slot locally)."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic lower bound; set it to let Ray Train run with min_workers..num_workers."""
    use_gpu: bool = False
    """One GPU per worker (NCCL) instead of CPU workers (gloo)."""
    gpu: str = "h100"
    """GPU model the planner sizes `parallel: auto` for (see `mla plan --help` for the catalogue)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPU cores reserved per worker."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per worker; unset uses cpus_per_worker."""
    startup_timeout_s: float = Field(600.0, gt=0.0)
    """Seconds to wait for the worker group to be placed and started before the job fails with
    the resources asked vs available."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts Ray Train allows before failing the run (-1 is unlimited)."""
    ray_num_cpus: int | None = Field(None, ge=1)
    """CPUs the embedded Ray may use; unset uses the workers' needs plus one."""
    object_store_mb: int = Field(256, ge=78)
    """Object-store size of the embedded Ray, in MiB."""
    metrics_port: int | None = Field(None, ge=1024, le=65535)
    """Port of the embedded Ray's Prometheus endpoint (``http://127.0.0.1:PORT/metrics``: the
    workers' ``ray_mla_*`` metrics and Ray's own); unset lets Ray pick a free one. Ignored with
    cluster.address (a cluster's nodes export on their own metrics port, 8080 on KubeRay)."""
    storage_path: str | None = None
    """Folder (or URI) all nodes can reach for run folders and checkpoints; unset is run.dir."""
    image: str = DEFAULT_IMAGE
    """Container image of every Ray node on Kubernetes (`mla k8s render`): this project's image
    (Dockerfile) as pushed to your registry."""
    runtime_env: RuntimeEnvSection | None = None
    """Ray runtime environment for clusters whose Python lacks the project (pip, uv,
    py_executable, env_vars, container); unset uses the cluster's Python as it is."""


class CheckpointSection(_Section):
    """Checkpointing and resume."""

    every: int = Field(50, ge=1)
    """Steps between checkpoints (also at the last step)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Resume from the latest checkpoint of a run with the same name."""


class RunSection(_Section):
    """Run identity and output folder."""

    name: str = Field("tiny", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name; a run with the same name resumes from its latest checkpoint."""
    dir: str = "runs"
    """Parent folder of run folders (RUN_DIR = dir/name)."""


def expand_shorthand(section: str, value: Any) -> Any:
    """A section written as a shorthand string, as the mapping it stands for (the one place of
    the ``parallel: auto`` sentinel); any other value is returned unchanged.

    Example:
        >>> expand_shorthand("parallel", "auto"), expand_shorthand("parallel", {"tensor": 2})
        ({'auto': True}, {'tensor': 2})
    """
    return {"auto": True} if (section, value) == ("parallel", "auto") else value


class JobConfig(_Section):
    """A training job: what to train, on what data, how, and where."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    parallel: ParallelSection = ParallelSection()
    cluster: ClusterSection = ClusterSection()
    checkpoint: CheckpointSection = CheckpointSection()
    run: RunSection = RunSection()

    @model_validator(mode="before")
    @classmethod
    def _parallel_auto(cls, data: Any) -> Any:
        if isinstance(data, dict) and "parallel" in data:
            data = {**data, "parallel": expand_shorthand("parallel", data["parallel"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.train.global_batch % self.train.micro_batch:
            raise ValueError(
                f"train.global_batch({self.train.global_batch}) is not a multiple of "
                f"train.micro_batch({self.train.micro_batch}); make global_batch a multiple of it"
            )
        if not all(0.0 <= b < 1.0 for b in self.train.betas):
            raise ValueError(
                f"train.betas={list(self.train.betas)}: each AdamW beta must be in [0, 1), "
                "e.g. [0.9, 0.95]"
            )
        if self.model.max_seq_len is not None and self.model.max_seq_len < self.data.seq_len:
            raise ValueError(
                f"model.max_seq_len({self.model.max_seq_len}) < data.seq_len({self.data.seq_len}): "
                "the model could not take the training windows; raise model.max_seq_len to at "
                f"least {self.data.seq_len} or leave it unset (it then follows data.seq_len)"
            )
        if self.train.min_lr > self.train.lr:
            raise ValueError(f"train.min_lr({self.train.min_lr}) > train.lr({self.train.lr})")
        if self.cluster.min_workers and self.cluster.min_workers > self.cluster.num_workers:
            raise ValueError(
                f"cluster.min_workers({self.cluster.min_workers}) > "
                f"cluster.num_workers({self.cluster.num_workers})"
            )
        return self

    def model_config_(self) -> ModelConfig:
        """The :class:`ModelConfig` of this job; a preset's max_seq_len is raised to data.seq_len
        (an explicit model.max_seq_len below it is refused by validation), and vocab_size follows
        a non-byte tokenizer (:mod:`workers.tokenizer_spec`).

        Raises:
            ConfigError: inconsistent model fields, or an explicit model.vocab_size smaller
                than the tokenizer's vocabulary.
        """
        cfg = self._with_tokenizer_vocab(self.model.build())
        if cfg.max_seq_len < self.data.seq_len:
            cfg = cfg.replace(max_seq_len=self.data.seq_len)
        return cfg

    # --- tokenizer vocabulary (issue 18, items 1-3) ---
    def _with_tokenizer_vocab(self, cfg: ModelConfig) -> ModelConfig:
        if self.data.tokenizer == "byte" and self.data.path is None:
            return cfg  # the default: nothing to read
        from workers.tokenizer_spec import tokenizer_vocab_size

        ids, what = tokenizer_vocab_size(self)
        if self.model.vocab_size is not None and self.model.vocab_size < ids:
            raise ConfigError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the {ids} ids of "
                f"{what}; unset model.vocab_size (it follows the tokenizer) or set it >= {ids}"
            )
        if self.model.vocab_size is None and ids != 256:
            return cfg.replace(vocab_size=ids)
        return cfg

    @property
    def run_dir(self) -> Path:
        """RUN_DIR: ``cluster.storage_path or run.dir``, then ``run.name``."""
        return Path(self.cluster.storage_path or self.run.dir) / self.run.name


def load_job_config(
    path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
) -> JobConfig:
    """Load a job YAML, apply ``--set`` overrides and validate.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``"a.b=value"`` strings; values are parsed as YAML (``3``, ``true``, ``[1, 2]``).

    Raises:
        ConfigError: missing file, YAML syntax error, malformed override, or a validation error
            (the message names each bad field, its value and the allowed keys or range).
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(
                f"config file {str(p)!r} is a folder; pass a YAML file such as configs/tiny.yaml"
            )
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist; pass a YAML file such as configs/tiny.yaml"
            )
        data = load_yaml_file(p)
        if not isinstance(data, dict):
            raise ConfigError(
                f"{p}: the top level must be a mapping of sections "
                f"({', '.join(JobConfig.model_fields)})"
            )
        if not data:
            raise ConfigError(
                f"{p}: the file is empty (no sections); a job config needs its sections "
                f"({', '.join(JobConfig.model_fields)}): start from configs/tiny.yaml"
            )
    for item in overrides:
        apply_override(data, item)
    origins = {item.partition("=")[0].strip(): item for item in overrides}
    return validate_job_dict(data, source=str(path) if path else "config", overrides=origins)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (first at line {seen[key] + 1}); "
                    "keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path) -> Any:
    """Parse a YAML file (UTF-8, no duplicate keys); an empty file is ``{}``.

    Raises:
        ConfigError: not UTF-8, not valid YAML, or a key given twice (names the file and line).
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); save it as UTF-8 YAML"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def apply_override(data: dict, item: str) -> None:
    """Apply one ``a.b=value`` override to the nested dict ``data`` in place.

    Raises:
        ConfigError: ``item`` has no ``=`` or an empty key.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set train.steps=100")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = expand_shorthand(part, child)
            child = child if isinstance(child, dict) else {}
            node[part] = child
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def validate_job_dict(
    data: dict, source: str = "config", overrides: dict[str, str] | None = None
) -> JobConfig:
    """Validate a plain dict as a :class:`JobConfig`.

    Args:
        data: The job as nested dicts.
        source: Where ``data`` came from (the YAML path), named in the message.
        overrides: ``{"train.steps": "train.steps=-1"}``: the ``--set`` items applied to
            ``data``; a bad field they set is blamed on the ``--set``, not on ``source``.

    Raises:
        ConfigError: with one line per problem, naming the field path, the value and the fix.
    """
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc, overrides or {})
        raise ConfigError(f"{source}: invalid job config:\n" + lines) from None


def _set_by(loc: str, overrides: dict[str, str]) -> str | None:
    """The ``--set`` item that set field ``loc`` (or a section holding it), if any."""
    for key, item in overrides.items():
        if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
            return item
    return None


def format_validation_error(exc: ValidationError, overrides: dict[str, str] | None = None) -> str:
    """Render pydantic errors as ``- field.path: message`` lines with allowed keys for typos.

    A field set by a ``--set`` override (``overrides``: key → item) says so, and pydantic's own
    messages (which name no fix) get one: change that ``--set`` or the field in the YAML.
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        origin = _set_by(loc, overrides or {})
        if err["type"] == "extra_forbidden":
            section = _section_model(err["loc"][:-1])
            allowed = list(section.model_fields) if section else []
            bad = str(err["loc"][-1])
            hint = difflib.get_close_matches(bad, allowed, n=1)
            msg = f"unknown key {bad!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            msg += f"; allowed keys: {', '.join(allowed)}"
        elif err["type"] == "value_error":  # our own validators: the message names field and value
            msg = err["msg"].removeprefix("Value error, ")
        else:
            got = f"got {err.get('input')!r}" + (f" from --set {origin}" if origin else "")
            fix = "change that --set" if origin else f"change {loc} in the YAML"
            msg = f"{err['msg']} ({got}); {fix}"
        if origin and "--set" not in msg:
            msg += f" (from --set {origin})"
        lines.append(f"- {loc}: {msg}" if loc else f"- {msg}")
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobConfig
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        ann = field.annotation if field else None
        for arg in getattr(ann, "__args__", ()):  # ``Section | None``
            ann = arg if isinstance(arg, type) and issubclass(arg, BaseModel) else ann
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def job_json_schema() -> dict:
    """JSON Schema of the job YAML (for editors: ``mla schema > job.schema.json``)."""
    return JobConfig.model_json_schema()
