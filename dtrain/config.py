"""Typed run configuration: one dataclass per concern, a doc line per field, validated on construction.

The command line is derived from these classes (``dtrain.cli``), YAML files use the same names nested
by section, and the resolved configuration is written to every run directory and checkpoint.
Validation raises :class:`ConfigError`, which names the flag and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

# Re-exported: they were defined here first, and callers import them from here.
from dtrain.errors import ConfigError as ConfigError
from dtrain.errors import HostError as HostError
from dtrain.errors import UserError as UserError


def doc(default: Any, text: str, **kw: Any) -> Any:
    """A dataclass field with its one-line documentation (shown by --help and the reference)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


MODELS = ("mlp", "linear", "logistic", "cnn")
# The choices spelled as strings, one type each: fields, validation and the code that branches on them
# share these (the command line and docs/config.md show them as str).
Format = Literal["auto", "parquet", "csv", "npy", "zarr"]
TaskChoice = Literal["auto", "classification", "regression"]
Task = Literal["classification", "regression"]  # what "auto" resolves to (dtrain.data.Stats.task)
Optimizer = Literal["sgd", "adam", "adamw", "adagrad"]
Schedule = Literal["constant", "step", "cosine", "invscaling", "exponential"]
Compression = Literal["none", "fp16"]
Reduction = Literal["sum", "adasum"]
Mode = Literal["minibatch", "online"]
DecayPer = Literal["epoch", "step"]
Monitor = Literal["eval_loss", "eval_accuracy", "eval_r2"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
_USER_MODEL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(name, f"must be {bound}, got {value}; pass a value {bound}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, f"unknown value {value!r}; choose one of {', '.join(choices)}")


@dataclass
class ClusterConfig:
    """Where the data lives: an embedded Dask cluster or an existing one."""

    scheduler: str | None = doc(None, "Dask scheduler address (tcp:// or tls://HOST:PORT; tls: certificates from "
                                   "DASK_DISTRIBUTED__COMM__TLS__*); default: start one on rank 0's host (TLS "
                                   "when the ranks span hosts)")
    dask_workers: int = doc(0, "workers of the embedded local cluster (0: sized to the machine)")
    connect_timeout: float = doc(10.0, "seconds to wait for the Dask scheduler before giving up")
    scheduler_wait: float = doc(60.0, "seconds the ranks wait for a lost --scheduler to come back (restarted, "
                                "rescheduled) before they stop with a checkpoint (0: stop at once)")

    def __post_init__(self) -> None:
        if self.scheduler is not None and not re.match(r"^(tcp|tls|inproc|ucx)://[^:/]+(:\d+)?$", self.scheduler):
            raise ConfigError(
                "scheduler", f"{self.scheduler!r} is not an address; use tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786)"
            )
        _positive("dask_workers", self.dask_workers, zero_ok=True)
        _positive("connect_timeout", self.connect_timeout)
        _positive("scheduler_wait", self.scheduler_wait, zero_ok=True)


@dataclass
class DataConfig:
    """What to train on and how it is split, shuffled and streamed."""

    data: str | None = doc(None, "dataset: Parquet dir/glob, CSV glob, .npy/.zarr, or a URL; default: generated")
    format: Format = doc("auto", "dataset format: auto, parquet, csv, npy, zarr")
    label: str = doc("label", "label column (npy: the labels .npy file; zarr: the label array, default y)")
    features: list[str] = doc([], "feature columns, comma-separated (default: every numeric column but label/row_id)")
    task: TaskChoice = doc("auto", "classification, regression, or auto (integer labels: classification)")
    val_fraction: float = doc(0.1, "fraction of rows held out for evaluation (chosen by a hash of the row id)")
    eval_data: str | None = doc(None, "separate evaluation set (same columns as --data), evaluated after every "
                                "epoch instead of the --val-fraction split, which then does not apply")
    eval_label: str | None = doc(None, "--eval-data's label: its column (default: --label's), or with .npy data "
                                 "its labels file (required there)")
    fillna: float | None = doc(None, "value replacing missing features (default: missing values are an error)")
    shuffle: bool = doc(True, "shuffle partitions and rows within the shuffle window every epoch")
    shuffle_window: int = doc(4, "partitions whose rows are shuffled together (bounds memory on the cluster)")
    drop_last: bool = doc(False, "drop the last partial global batch of each epoch")
    prefetch: int | None = doc(None, "steps whose rows each rank keeps in flight (default: as many as make 16 MB; "
                               "Dask round trips cost ms per request, so requests are large)")
    audit_dir: str | None = doc(None, "write the row ids each rank consumes at each step here (debugging)")
    follow: bool = doc(False, "online mode: after the files at start, keep polling the Parquet directory/glob "
                       "--data for new files and train on them as they land (names starting with . or _ are ignored)")
    poll_interval: float = doc(2.0, "--follow: seconds between two listings of --data while waiting for files")
    idle_timeout: float | None = doc(None, "--follow: finish normally after waiting this many seconds with no "
                                     "new file (default: follow until stopped)")
    gen_rows: int = doc(65536, "generated data: rows")
    gen_features: int = doc(32, "generated data: features")
    gen_classes: int = doc(10, "generated data: classes")
    gen_partitions: int = doc(16, "generated data: partitions")
    gen_noise: float = doc(2.0, "generated data: noise around the class clusters")

    def __post_init__(self) -> None:
        _choice("format", self.format, get_args(Format))
        _choice("task", self.task, get_args(TaskChoice))
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        for name in ("shuffle_window", "gen_rows", "gen_features", "gen_partitions"):
            _positive(name, getattr(self, name))
        if self.prefetch is not None:
            _positive("prefetch", self.prefetch)
        if self.gen_classes < 2:
            raise ConfigError("gen_classes", f"needs at least 2 classes, got {self.gen_classes}")
        _positive("gen_noise", self.gen_noise, zero_ok=True)
        _positive("poll_interval", self.poll_interval)
        if self.idle_timeout is not None:
            _positive("idle_timeout", self.idle_timeout, zero_ok=True)
        if self.follow and self.data is None:
            raise ConfigError("follow", "needs --data: the Parquet directory (or glob) where the files land")
        if self.follow and self.format not in ("auto", "parquet"):
            raise ConfigError("follow", f"follows Parquet files only, not --format {self.format}; "
                                        "write the stream as Parquet files")
        if self.eval_data is not None and self.follow:
            raise ConfigError("eval_data", "does not apply with --follow (one pass, evaluated progressively); "
                                           "drop --eval-data")
        if self.eval_label is not None and self.eval_data is None:
            raise ConfigError("eval_label", "applies to --eval-data only; add --eval-data or drop --eval-label")
        if self.idle_timeout is not None and not self.follow:
            raise ConfigError("idle_timeout", "only applies with --follow; add --follow or drop --idle-timeout")


@dataclass
class ModelConfig:
    """The network; models know nothing of distribution."""

    model: str = doc("mlp", f"{', '.join(MODELS)}, or a factory package.module:function(input_shape, outputs)")
    hidden: list[int] = doc([128, 128], "MLP hidden widths, comma-separated")
    dropout: float = doc(0.0, "dropout probability after each hidden layer")

    def __post_init__(self) -> None:
        if self.model not in MODELS and not _USER_MODEL.match(self.model):
            raise ConfigError(
                "model", f"unknown model {self.model!r}; choose {', '.join(MODELS)} or package.module:factory"
            )
        if any(h < 1 for h in self.hidden):
            raise ConfigError("hidden", f"widths must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: Optimizer = doc("adamw", f"one of {', '.join(OPTIMIZERS)}")
    lr: float = doc(1e-3, "peak learning rate")
    momentum: float = doc(0.9, "SGD momentum")
    nesterov: bool = doc(False, "SGD Nesterov momentum")
    weight_decay: float = doc(0.0, "weight decay (decoupled for AdamW)")
    l1: float = doc(0.0, "L1 penalty l1 * sum(abs(w)) on the weights (not biases), as a proximal step after "
                    "each update so that weights become exactly 0 (sgd, adagrad)")
    l2: float = doc(0.0, "L2 penalty l2/2 * sum(w**2) on the weights (not biases), in the gradient; "
                    "scikit-learn's C is 1/(l2 * training rows)")
    schedule: Schedule = doc("constant", f"learning-rate schedule after warm-up: {', '.join(SCHEDULES)}")
    warmup_steps: int = doc(0, "steps of linear warm-up from 0 to --lr")
    power_t: float = doc(0.5, "invscaling schedule: lr / (1 + step) ** power_t (online learning)")
    lr_decay: float = doc(0.9, "exponential schedule: lr * lr_decay ** t, t the epochs or steps trained "
                          "(--decay-per)")
    decay_per: DecayPer = doc("epoch", "exponential schedule: t counts epochs (rows trained / training rows, "
                         "whatever the world size) or optimizer steps after warm-up")
    grad_clip: float | None = doc(None, "clip the global gradient norm to this value")
    compression: Compression = doc("none", "gradient compression for the allreduce: none or fp16")
    reduction: Reduction = doc("sum", "how gradients combine: sum (the global-batch mean) or adasum (needs MPI/NCCL)")
    shard: bool = doc(True, "ranks on one host share the parameters and each steps a shard (ZeRO-1 over shared memory)")

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("compression", self.compression, get_args(Compression))
        _choice("reduction", self.reduction, get_args(Reduction))
        _positive("power_t", self.power_t, zero_ok=True)
        _choice("decay_per", self.decay_per, get_args(DecayPer))
        if not 0 < self.lr_decay <= 1:
            raise ConfigError("lr_decay", f"must be in (0, 1], got {self.lr_decay}; e.g. 0.9 for 10% less a "
                                          "--decay-per")
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, zero_ok=True)
        _positive("l1", self.l1, zero_ok=True)
        _positive("l2", self.l2, zero_ok=True)
        if self.l1 and self.optimizer not in ("sgd", "adagrad"):
            raise ConfigError("l1", f"has no proximal step under --optimizer {self.optimizer} (its moving second "
                                    "moment rescales every step); use --optimizer sgd or adagrad with --l1")
        _positive("warmup_steps", self.warmup_steps, zero_ok=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"must be in [0, 1), got {self.momentum}")
        if self.grad_clip is not None:
            _positive("grad_clip", self.grad_clip)


@dataclass
class TrainConfig:
    """The training loop."""

    mode: Mode = doc("minibatch", "minibatch (epochs over shuffled data) or online (one pass in arrival order)")
    global_batch_size: int = doc(256, "rows per optimizer step across all ranks (fixed whatever the world size)")
    batch_per_rank: int | None = doc(None, "opt-in: rows per rank per step instead; --lr is scaled by the ranks")
    accumulate: int = doc(1, "micro-batches per rank per step, one allreduce (Horovod's backward_passes_per_step)")
    sync_every: int = doc(1, "local SGD: average parameters every k steps instead of allreducing every step")
    amp: bool = doc(False, "mixed precision: the forward pass in torch.autocast bfloat16 (GPU, or CPU)")
    commit_every: int = doc(20, "elastic runs: commit the training state in memory every N steps")
    epochs: int = doc(3, "passes over the training split (online mode: 1)")
    max_steps: int | None = doc(None, "stop after this many optimizer steps in total")
    max_samples: int | None = doc(None, "stop after training this many rows in total (the last batch is cut to fit)")
    seed: int = doc(0, "seed for data order, model initialisation and dropout")
    log_every: int = doc(10, "write a metrics line every N steps")
    eval_batch_size: int = doc(4096, "rows per evaluation batch across all ranks")
    early_stop: int | None = doc(None, "stop after this many evaluations (one an epoch) without improving "
                                 "--monitor; model.pt is then the best evaluated model, model-last.pt the last")
    monitor: Monitor = doc("eval_loss", "--early-stop: the held-out metric watched: eval_loss (lower is better), "
                       "eval_accuracy or eval_r2 (higher is better)")
    stop_diverged: float | None = doc(None, "stop once the smoothed training loss exceeds this many times its "
                                      "lowest, or is not finite (stop_reason: diverged); dtrain.lr_find uses 4")

    def __post_init__(self) -> None:
        _choice("mode", self.mode, get_args(Mode))
        for name in ("global_batch_size", "epochs", "log_every", "eval_batch_size", "accumulate", "sync_every",
                     "commit_every"):
            _positive(name, getattr(self, name))
        if self.batch_per_rank is not None:
            _positive("batch_per_rank", self.batch_per_rank)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.max_samples is not None:
            _positive("max_samples", self.max_samples)
        _choice("monitor", self.monitor, get_args(Monitor))
        if self.stop_diverged is not None and not self.stop_diverged > 1:
            raise ConfigError("stop_diverged", f"must be above 1 (times the lowest loss), got {self.stop_diverged}; "
                                               "e.g. 4")
        if self.early_stop is not None:
            _positive("early_stop", self.early_stop)
            if self.mode == "online":
                raise ConfigError("early_stop", "needs evaluations at epoch ends, which --mode online (one pass) "
                                                "does not make; use --mode minibatch")


@dataclass
class RunConfig:
    """Run directory and checkpoints."""

    run_dir: str | None = doc(None, "run directory (default: runs/<timestamp>)")
    resume: str = doc("auto", "auto (latest good checkpoint in the run dir), never, or a checkpoint path")
    checkpoint_dir: str | None = doc(None, "checkpoint location: a path or fsspec URL (default: <run dir>/checkpoints)")
    checkpoint_every: int = doc(0, "checkpoint every N steps (0: only at the end and when stopped)")
    checkpoint_seconds: float = doc(0.0, "also checkpoint when this many seconds passed since the last (0: off)")
    keep: int = doc(3, "checkpoints to keep")
    force_resume: bool = doc(False, "resume even if the checkpoint was trained on different data")
    progress_seconds: float = doc(10.0, "without a terminal: a progress log line at most every N seconds")
    verbose: bool = doc(False, "let every rank log, not only rank 0")

    def __post_init__(self) -> None:
        _positive("checkpoint_every", self.checkpoint_every, zero_ok=True)
        _positive("checkpoint_seconds", self.checkpoint_seconds, zero_ok=True)
        _positive("progress_seconds", self.progress_seconds)
        _positive("keep", self.keep)


@dataclass
class Config:
    """Everything a run needs; ``dtrain --help`` lists every field."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Checks across sections.
        if self.data.follow and self.train.mode != "online":
            raise ConfigError("follow", "needs --mode online (one pass over the files in arrival order); "
                                        "add --mode online")
        if self.train.early_stop is not None and self.data.val_fraction == 0:
            raise ConfigError("early_stop", "needs held-out rows to evaluate; pass --val-fraction > 0")
        if self.optim.schedule == "exponential" and self.optim.decay_per == "epoch" and self.train.mode == "online":
            raise ConfigError("decay_per", "epoch has no meaning in --mode online (one pass); "
                                           "use --decay-per step")
        if self.data.follow and self.optim.schedule in ("cosine", "step") and self.train.max_steps is None:
            raise ConfigError("schedule", f"{self.optim.schedule} needs the length of training, which --follow "
                                          "does not know; pass --max-steps or use --schedule invscaling/constant")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build from nested ``{section: {field: value}}``, rejecting unknown names."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        hints = get_type_hints(cls)
        kwargs = {}
        for name, values in (raw or {}).items():
            if name not in sections:
                raise UserError(f"config: unknown section {name!r}; sections are {', '.join(sections)}")
            section_cls = hints[name]
            if values is not None and not isinstance(values, dict):
                raise UserError(f"config: section {name!r} must be a mapping of fields, got {values!r}; "
                                "see dtrain --help for the fields")
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(values or {}) - known
            if unknown:
                bad = sorted(unknown)[0]
                raise UserError(f"config: unknown field {name}.{bad}; see dtrain --help for the fields")
            kwargs[name] = section_cls(**{k: coerce(section_cls, k, v) for k, v in (values or {}).items()})
        return cls(**kwargs)


def section_fields() -> list[tuple[str, type, dataclasses.Field[Any]]]:
    """Every ``(section, section class, field)``; field names are unique across sections."""
    out: list[tuple[str, type, dataclasses.Field[Any]]] = []
    hints = get_type_hints(Config)
    for sec in dataclasses.fields(Config):
        cls = hints[sec.name]
        out.extend((sec.name, cls, f) for f in dataclasses.fields(cls))
    names = [f.name for _, _, f in out]
    assert len(names) == len(set(names)), "config field names must be unique across sections"
    return out


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """``(scalar or element type, is_list)`` of a field, with ``X | None`` unwrapped."""
    tp = get_type_hints(cls)[name]
    if get_origin(tp) is Literal:  # a choice among strings: a str on the command line and in YAML
        return str, False
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is not None and get_origin(tp) is not list and args:
        tp = args[0]
    if get_origin(tp) is list:
        return get_args(tp)[0], True
    return tp, False


def choices(cls: type, name: str) -> tuple[str, ...] | None:
    """The strings a ``Literal`` field takes (shown in ``--help`` and docs/config.md), else None."""
    tp = get_type_hints(cls)[name]
    return tuple(get_args(tp)) if get_origin(tp) is Literal else None


def coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError."""
    if value is None:
        return None
    tp, is_list = field_type(cls, name)
    if is_list:
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
        return [_scalar(name, tp, v) for v in items]
    return _scalar(name, tp, value)


def _scalar(name: str, tp: type, value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(name, f"expected {tp.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"--config: no such file {path!r}; pass the path of a YAML config") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config: {path} must hold a mapping of sections; see dtrain --help")
    return raw
