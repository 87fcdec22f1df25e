"""Typed run configuration: the one place for defaults and for every check a config alone
can decide. Hydra composes the YAML files of ``configs/`` (only what differs from these
defaults) on top; ``__post_init__`` rejects a value that cannot run, naming the key, before
any process group, data or model exists. Checks that need the world size or the data stay
where those are known. Field comments map keys to the paper's hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

from omegaconf import DictConfig, OmegaConf

from dist_ast.errors import ConfigError as ConfigError  # re-exported: raised for bad values
from dist_ast.errors import require
from dist_ast.models.registry import model_factory
from dist_ast.sparsity.nm import check_nm_patterns

DATASETS = ("digits", "digits_shards", "cifar10", "imagenet", "synthetic")
LOADERS = ("memory", "wds", "dali")
IN_MEMORY_DATASETS = ("digits", "synthetic")  # loader=memory; the others read shards
MODES = ("alternating", "joint", "individual")
MASK_RELATIONS = ("non_disjoint", "completely_subset")
ENGINES = ("ddp", "deepspeed")
REGROW_INITS = ("zero", "kept")  # ast.regrow_init (docs/algorithm.md, authors' options)
PRUNE_SCOPES = ("subnet", "shared")  # ast.prune_scope
INACTIVE_WEIGHTS = ("frozen", "moving")  # optim.inactive_weights
LR_PER = ("step", "epoch")  # optim.lr_per
PRECISIONS = ("fp32", "bf16", "fp16")


class _Checked:
    """``_require(key, ok, allowed)``: ConfigError ``invalid <section>.<key>=<value>:
    <allowed>`` unless ``ok``; the value is read from the key, so a check names it once."""

    _section = ""

    def _require(self, key: str, ok: bool, allowed: str) -> None:
        prefix = f"{self._section}." if self._section else ""
        require(ok, prefix + key, attrgetter(key)(self), allowed)

    def _one_of(self, key: str, choices: tuple[str, ...]) -> None:
        self._require(key, attrgetter(key)(self) in choices, f"choose one of {choices}")


@dataclass
class ModelConfig(_Checked):
    _section = "model"
    # A key of models.registry.BUILTIN_MODELS or any torchvision classification model
    # (torchvision.models.list_models()), built with num_classes and no weights.
    name: str = "tiny_cnn"
    # An importable factory ``package.module.name`` called as f(num_classes=...) that
    # returns the dense nn.Module; replaces ``name``, which then labels the run with it.
    _target_: str | None = None
    num_classes: int = 10
    dense_classifier: bool = False  # the first conv is always dense; the classifier is optional
    zero_init_residual: bool = False  # torchvision ResNets: last BN of each block starts at 0
    small_input: bool = False  # torchvision ResNets on 32x32: 3x3 stem conv, no max-pool
    width: int = 32  # tiny_cnn only: channels of its first block (tests use 8)
    # fnmatch patterns of BatchNorm2d names kept as one plain set for every sub-net instead
    # of switchable (DESIGN §1.4); the authors' CIFAR ResNets (resnet20/32/56) share the
    # stem and shortcut BNs: [bn1,'*.shortcut.1']. A pattern matching none is refused.
    shared_batchnorm: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._require("num_classes", self.num_classes >= 2, "must be >= 2")
        self._require("width", self.width >= 1, "must be >= 1")
        self._require(
            "shared_batchnorm",
            all(isinstance(p, str) and p for p in self.shared_batchnorm),
            "give BatchNorm module-name patterns (fnmatch), e.g. [bn1,'*.shortcut.1']",
        )
        if self._target_ is not None:
            self.name = self._target_  # the label in summaries and checkpoint checks
        model_factory(self)  # the name or target resolves


@dataclass
class DataConfig(_Checked):
    _section = "data"
    name: str = "digits"  # one of DATASETS
    loader: str = "memory"  # memory (in-RAM tensors) | wds (webdataset) | dali
    root: str = ""  # shard directory (wds/dali) or ImageFolder tree, depending on name
    image_size: int = 32  # training crop; validation resizes to image_size / 0.875 then crops
    num_workers: int = 2  # DataLoader workers or DALI threads per rank
    random_resized_crop_min: float = 0.08  # ImageNet recipe: scale (min, 1)
    synthetic_size: int = 1024  # samples per epoch for data=synthetic

    def __post_init__(self) -> None:
        self._one_of("name", DATASETS)
        self._one_of("loader", LOADERS)
        in_memory = self.name in IN_MEMORY_DATASETS
        self._require(
            "loader",
            in_memory == (self.loader == "memory"),
            f"data={self.name} is held in memory: use data.loader=memory"
            if in_memory
            else f"data={self.name} reads shards: choose wds or dali",
        )
        self._require("image_size", self.image_size >= 8, "must be >= 8")
        self._require("num_workers", self.num_workers >= 0, "must be >= 0")


@dataclass
class ASTConfig(_Checked):
    _section = "ast"
    mode: str = "alternating"  # alternating (AST) | joint (Slimmable baseline) | individual
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9])  # s_k, ascending
    initial_sparsity: float = 0.0  # s_i: 0, 0.5, 0.8 or 0.9 in the paper
    gradient_correction: bool = True  # AST+GC
    # Without GC, still count the steps whose gradient conflicts with the previous one
    # (paper Fig. 4 for plain AST). Costs one fp64 pass over the gradient per step (~33 ms
    # of a 2.3 s ResNet-50 CPU step), so it is off unless asked for; GC always counts.
    count_conflicts: bool = False
    mask_relation: str = "non_disjoint"  # non_disjoint (ND, default) | completely_subset (CS)
    update_every: int = 100  # ΔT: steps between two mask updates of one sub-net
    stagger: int = 10  # Δτ in *global* steps (the authors count sub-net steps: ~N times more)
    ramp_start_epoch: float = 0.0  # t0: start of the cubic ramp (after warmup on ImageNet)
    ramp_end_epoch: float = 1.0  # t1: every sub-net reaches s_k here
    update_end_epoch: float | None = None  # last mask update; None = until the end
    regrow_fraction: float = 0.5  # r_0 of the cosine regrow fraction
    regrow_fraction_min: float = 0.005  # r_min
    nm_patterns: list[str] | None = None  # N:M sub-nets, e.g. ["2:4", "1:4", "1:8"]
    # A regrown weight that no other sub-net uses: zero = starts at 0 with zero momentum
    # (DESIGN §1.7); kept = keeps its frozen shared value, as the authors' code (its
    # momentum is zeroed under optim.inactive_weights=frozen, kept under moving).
    regrow_init: str = "zero"
    # Scheduled pruning during the ramp ranks |w| over: subnet = sub-net k's live weights
    # (DESIGN §1.7a; never grows); shared = every entry of the shared tensor, as the
    # authors' code, so a weight k dropped but another sub-net kept large can come back.
    prune_scope: str = "subnet"

    @property
    def num_subnets(self) -> int:
        return len(self.sparsities)

    def __post_init__(self) -> None:
        self._one_of("mode", MODES)
        s = list(self.sparsities)
        self._require("sparsities", len(s) > 0, "need at least one sub-net (N >= 1)")
        self._require("sparsities", all(0 <= v < 1 for v in s), "every sparsity must lie in [0, 1)")
        ascending = all(a < b for a, b in zip(s, s[1:], strict=False))
        self._require("sparsities", ascending, "must be strictly ascending, e.g. [0.8, 0.9, 0.95]")
        self._require(
            "sparsities",
            self.mode != "individual" or len(s) == 1,
            "ast.mode=individual trains one sub-net: give one sparsity (one run per sparsity)",
        )
        self._require(
            "initial_sparsity",
            0.0 <= self.initial_sparsity <= s[0],
            f"must lie in [0, {s[0]}] (the lowest target sparsity)",
        )
        self._one_of("mask_relation", MASK_RELATIONS)
        self._require("update_every", self.update_every >= 1, "must be >= 1")
        self._require("stagger", self.stagger >= 0, "must be >= 0")
        self._require(
            "stagger",
            self.stagger * (len(s) - 1) < self.update_every,
            f"stagger*(N-1) must be < ast.update_every={self.update_every}, so that no two "
            "sub-nets update at once",
        )
        self._require(
            "ramp_end_epoch",
            0.0 <= self.ramp_start_epoch <= self.ramp_end_epoch,
            f"must be >= ast.ramp_start_epoch={self.ramp_start_epoch} >= 0",
        )
        self._require(
            "regrow_fraction",
            0.0 <= self.regrow_fraction_min <= self.regrow_fraction <= 1.0,
            f"need 0 <= regrow_fraction_min ({self.regrow_fraction_min}) <= regrow_fraction <= 1",
        )
        self._require(
            "gradient_correction",
            not (self.gradient_correction and self.mode == "joint"),
            "gradient correction is defined for alternating training; set it false for joint",
        )
        self._one_of("regrow_init", REGROW_INITS)
        self._one_of("prune_scope", PRUNE_SCOPES)
        self._require(
            "prune_scope",
            self.prune_scope == "subnet"
            or (self.mask_relation == "non_disjoint" and self.nm_patterns is None),
            "shared is defined for unstructured non_disjoint sub-nets: use prune_scope=subnet "
            "with ast.mask_relation=completely_subset or ast.nm_patterns",
        )
        if self.nm_patterns is not None:
            check_nm_patterns(self.nm_patterns, s, self.initial_sparsity, self.mask_relation)


@dataclass
class OptimConfig(_Checked):
    _section = "optim"
    lr: float = 0.1  # peak learning rate (after scaling by batch, see lr_reference_batch)
    lr_reference_batch: int | None = None  # ImageNet: 256 -> lr * global_batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # on conv/linear weights (see batchnorm_weight_decay)
    warmup_epochs: float = 0.0  # linear warmup, then cosine to 0
    label_smoothing: float = 0.0
    # The options below reproduce the authors' released code (docs/algorithm.md, "Options
    # that follow the authors' code"); the defaults are the paper's rules (DESIGN §1.3).
    # frozen: only the trained sub-net's weights move (no weight decay, no momentum on the
    # rest); moving: weight decay and the shared momentum move every weight of the sparse
    # layers every step (their gradient off the mask is 0), as plain SGD does.
    inactive_weights: str = "frozen"
    batchnorm_weight_decay: bool = False  # true: weight decay on BN and biases too
    # step: the lr follows warmup + cosine every step; epoch: held for a whole epoch at
    # its value at the epoch's first step (the authors step their scheduler per epoch).
    lr_per: str = "step"

    def __post_init__(self) -> None:
        self._require("lr", self.lr > 0, "must be > 0")
        self._require("momentum", 0 <= self.momentum < 1, "must lie in [0, 1)")
        self._require(
            "nesterov", not self.nesterov or self.momentum > 0, "nesterov needs optim.momentum > 0"
        )
        self._require("weight_decay", self.weight_decay >= 0, "must be >= 0")
        self._require("label_smoothing", 0 <= self.label_smoothing < 1, "must lie in [0, 1)")
        self._require("warmup_epochs", self.warmup_epochs >= 0, ">= 0")
        self._one_of("inactive_weights", INACTIVE_WEIGHTS)
        self._one_of("lr_per", LR_PER)


@dataclass
class EngineConfig(_Checked):
    _section = "engine"
    name: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    compact_allreduce: bool = True  # all-reduce only the active sub-net's gradient entries
    compact_max_density: float = 0.6  # above this active density a plain all-reduce is cheaper
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        self._one_of("name", ENGINES)
        self._require("zero_stage", self.zero_stage in (0, 1, 2), "0, 1 or 2")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_minutes: float = 0.0  # 0 = off
    keep: int = 3  # keep the newest K complete checkpoints
    resume: str = "auto"  # auto (newest in run_dir) | never | a checkpoint path
    async_save: bool = False


@dataclass
class TrainConfig(_Checked):
    _section = "train"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set (a shorter schedule)
    # Try a config: run only the first N steps of the configured schedule (same lr, ramp,
    # ΔT, Δτ), save a checkpoint there if checkpoints are on, evaluate, write summary.json.
    stop_after_steps: int | None = None
    final_eval: bool = True  # evaluate every sub-net at the end (false: summary without top-1)
    batch_size: int = 64  # global batch (split over ranks)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    device: str = "auto"  # auto | cpu | cuda
    # A rank that waits this long in a collective for a dead or stuck peer stops with
    # "peer rank lost" (exit 6) instead of hanging (torchrun --max-restarts then resumes).
    collective_timeout_minutes: float = 10.0
    # A non-finite loss or gradient: stop (exit 5, naming the step and the newest good
    # checkpoint) or skip the step (optimizer, GC, masks untouched; one host read a step)
    # and stop after max_skipped consecutive skips.
    nonfinite: str = "stop"
    max_skipped: int = 10
    progress: bool = True  # rich progress bar on rank 0
    tensorboard: bool = True  # scalars of metrics.jsonl also in run_dir/tb (rank 0)

    def __post_init__(self) -> None:
        self._require("epochs", self.epochs > 0, "must be > 0")
        self._require("batch_size", self.batch_size >= 1, "must be >= 1")
        self._require(
            "stop_after_steps",
            self.stop_after_steps is None or self.stop_after_steps >= 1,
            "must be >= 1 (or null: the whole schedule)",
        )
        self._one_of("precision", PRECISIONS)
        self._require("log_every", self.log_every >= 1, "must be >= 1")
        self._require("nonfinite", self.nonfinite in ("stop", "skip"), "stop | skip")
        self._require("max_skipped", self.max_skipped >= 0, "must be >= 0")
        self._require(
            "collective_timeout_minutes",
            self.collective_timeout_minutes > 0,
            "must be > 0 (minutes a rank waits for its peers in a collective)",
        )
        self._require("device", self.device in ("auto", "cpu", "cuda"), "auto|cpu|cuda")


@dataclass
class RunConfig(_Checked):
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ast: ASTConfig = field(default_factory=ASTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """Checks across sections: what the DeepSpeed engine cannot run."""
        if self.engine.name != "deepspeed":
            return
        self._require(
            "train.nonfinite",
            self.train.nonfinite == "stop",
            "skip needs the step before DeepSpeed's optimizer runs; use stop with engine=deepspeed",
        )
        self._require(
            "engine.name",
            self.ast.mode != "joint",
            "ast.mode=joint needs N backward passes per step, which DeepSpeed's engine "
            "does not take; use engine=ddp",
        )
        self._require(
            "engine.zero_stage",
            self.engine.zero_stage > 0 or self.train.precision == "fp32",
            f"train.precision={self.train.precision} under DeepSpeed needs ZeRO stage 1 or 2 "
            "(stage 0's mixed-precision wrapper keeps unmapped flat fp32 copies; stage 1/2 "
            "use as much memory as DDP's fp32 master weights or less)",
        )
        self._require(
            "optim.inactive_weights",
            self.optim.inactive_weights == "frozen",
            "moving is implemented for engine=ddp only (DeepSpeed's flat partitions apply "
            "m_k to every update); use engine=ddp",
        )
        self._require(
            "ast.regrow_init",
            self.ast.regrow_init == "zero",
            "kept is implemented for engine=ddp only (DeepSpeed's reset of a regrown weight "
            "zeroes its fp32 master copy); use engine=ddp",
        )


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Build the validated dataclasses from a Hydra/OmegaConf config (or a plain dict)."""
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    return obj


def config_as_dict(config: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]
