"""Typed run configuration, validated at the boundary.

The dataclasses are the one place for defaults and for every check a config alone can
decide: Hydra composes the YAML files of ``configs/`` (which hold only what differs from
these defaults) on top of them (struct mode: an unknown key is an error that names it);
``OmegaConf.to_object`` then builds the dataclasses, whose ``__post_init__`` reject a
value that cannot run with the key, the value and what is allowed, before any process
group, data or model exists. Checks that need the world size or the data (batch per
rank, number of classes, the ramp in steps) stay where those are known. Field comments
map each key to the paper's hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from dist_ast.errors import ConfigError as ConfigError  # re-exported: raised for bad values
from dist_ast.errors import require
from dist_ast.models.registry import check_model
from dist_ast.sparsity.nm import check_nm_patterns

DATASETS = ("digits", "digits_shards", "cifar10", "imagenet", "synthetic")
LOADERS = ("memory", "wds", "dali")
IN_MEMORY_DATASETS = ("digits", "synthetic")  # loader=memory; the others read shards
MODES = ("alternating", "joint", "individual")
MASK_RELATIONS = ("non_disjoint", "completely_subset")
ENGINES = ("ddp", "deepspeed")
REGROW_INITS = ("zero", "kept")  # ast.regrow_init (docs/algorithm.md, authors' options)
INACTIVE_WEIGHTS = ("frozen", "moving")  # optim.inactive_weights
LR_PER = ("step", "epoch")  # optim.lr_per
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    # A built-in model (dist_ast.models.registry.BUILTIN_MODELS: tiny_cnn, wrn32, resnet18,
    # resnet50, resnet20, resnet32, resnet56) or any torchvision classification model
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
    # BatchNorm module names (fnmatch patterns on the dense model's module names) kept as
    # one plain BatchNorm2d shared by every sub-net instead of switchable (one set per
    # sub-net, DESIGN §1.4). The authors' CIFAR ResNet shares the stem and shortcut BNs:
    # model.shared_batchnorm=[bn1,'*.shortcut.1'] for resnet20/32/56. A pattern matching
    # no BatchNorm2d is refused when the model is built.
    shared_batchnorm: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(self.num_classes >= 2, "model.num_classes", self.num_classes, "must be >= 2")
        require(self.width >= 1, "model.width", self.width, "must be >= 1")
        require(
            all(isinstance(p, str) and p for p in self.shared_batchnorm),
            "model.shared_batchnorm",
            list(self.shared_batchnorm),
            "give BatchNorm module-name patterns (fnmatch), e.g. [bn1,'*.shortcut.1']",
        )
        if self._target_ is not None:
            self.name = self._target_  # the label in summaries and checkpoint checks
        check_model(self)


@dataclass
class DataConfig:
    name: str = "digits"  # one of DATASETS
    loader: str = "memory"  # memory (in-RAM tensors) | wds (webdataset) | dali
    root: str = ""  # shard directory (wds/dali) or ImageFolder tree, depending on name
    image_size: int = 32  # training crop; validation resizes to image_size / 0.875 then crops
    num_workers: int = 2  # DataLoader workers or DALI threads per rank
    random_resized_crop_min: float = 0.08  # ImageNet recipe: scale (min, 1)
    synthetic_size: int = 1024  # samples per epoch for data=synthetic

    def __post_init__(self) -> None:
        require(self.name in DATASETS, "data.name", self.name, f"choose one of {DATASETS}")
        require(self.loader in LOADERS, "data.loader", self.loader, f"choose one of {LOADERS}")
        in_memory = self.name in IN_MEMORY_DATASETS
        require(
            in_memory == (self.loader == "memory"),
            "data.loader",
            self.loader,
            f"data={self.name} is held in memory: use data.loader=memory"
            if in_memory
            else f"data={self.name} reads shards: choose wds or dali",
        )
        require(self.image_size >= 8, "data.image_size", self.image_size, "must be >= 8")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")


@dataclass
class ASTConfig:
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

    @property
    def num_subnets(self) -> int:
        return len(self.sparsities)

    def __post_init__(self) -> None:
        require(self.mode in MODES, "ast.mode", self.mode, f"choose one of {MODES}")
        s = list(self.sparsities)
        require(len(s) > 0, "ast.sparsities", s, "need at least one sub-net (N >= 1)")
        for v in s:
            require(0.0 <= v < 1.0, "ast.sparsities", s, "every sparsity must lie in [0, 1)")
        require(
            all(a < b for a, b in zip(s, s[1:], strict=False)),
            "ast.sparsities",
            s,
            "must be strictly ascending, e.g. [0.8, 0.9, 0.95]",
        )
        require(
            self.mode != "individual" or len(s) == 1,
            "ast.sparsities",
            s,
            "ast.mode=individual trains one sub-net: give one sparsity (one run per sparsity)",
        )
        require(
            0.0 <= self.initial_sparsity <= s[0],
            "ast.initial_sparsity",
            self.initial_sparsity,
            f"must lie in [0, {s[0]}] (the lowest target sparsity)",
        )
        require(
            self.mask_relation in MASK_RELATIONS,
            "ast.mask_relation",
            self.mask_relation,
            f"choose one of {MASK_RELATIONS}",
        )
        require(self.update_every >= 1, "ast.update_every", self.update_every, "must be >= 1")
        require(self.stagger >= 0, "ast.stagger", self.stagger, "must be >= 0")
        require(
            self.stagger * (len(s) - 1) < self.update_every,
            "ast.stagger",
            self.stagger,
            f"stagger*(N-1) must be < ast.update_every={self.update_every}, so that no two "
            "sub-nets update at once",
        )
        require(
            0.0 <= self.ramp_start_epoch <= self.ramp_end_epoch,
            "ast.ramp_end_epoch",
            self.ramp_end_epoch,
            f"must be >= ast.ramp_start_epoch={self.ramp_start_epoch} >= 0",
        )
        require(
            0.0 <= self.regrow_fraction_min <= self.regrow_fraction <= 1.0,
            "ast.regrow_fraction",
            self.regrow_fraction,
            f"need 0 <= regrow_fraction_min ({self.regrow_fraction_min}) <= regrow_fraction <= 1",
        )
        require(
            not (self.gradient_correction and self.mode == "joint"),
            "ast.gradient_correction",
            self.gradient_correction,
            "gradient correction is defined for alternating training; set it false for joint",
        )
        require(
            self.regrow_init in REGROW_INITS,
            "ast.regrow_init",
            self.regrow_init,
            f"choose one of {REGROW_INITS}",
        )
        if self.nm_patterns is not None:
            check_nm_patterns(self.nm_patterns, s, self.initial_sparsity, self.mask_relation)


@dataclass
class OptimConfig:
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
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must lie in [0, 1)")
        require(
            not self.nesterov or self.momentum > 0,
            "optim.nesterov",
            self.nesterov,
            "nesterov needs optim.momentum > 0",
        )
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        require(
            0 <= self.label_smoothing < 1,
            "optim.label_smoothing",
            self.label_smoothing,
            "must lie in [0, 1)",
        )
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        require(
            self.inactive_weights in INACTIVE_WEIGHTS,
            "optim.inactive_weights",
            self.inactive_weights,
            f"choose one of {INACTIVE_WEIGHTS}",
        )
        require(self.lr_per in LR_PER, "optim.lr_per", self.lr_per, f"choose one of {LR_PER}")


@dataclass
class EngineConfig:
    name: str = "ddp"  # ddp | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    compact_allreduce: bool = True  # all-reduce only the active sub-net's gradient entries
    compact_max_density: float = 0.6  # above this active density a plain all-reduce is cheaper
    bucket_cap_mb: float = 25.0

    def __post_init__(self) -> None:
        require(self.name in ENGINES, "engine.name", self.name, f"choose one of {ENGINES}")
        require(self.zero_stage in (0, 1, 2), "engine.zero_stage", self.zero_stage, "0, 1 or 2")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_minutes: float = 0.0  # 0 = off
    keep: int = 3  # keep the newest K complete checkpoints
    resume: str = "auto"  # auto (newest in run_dir) | never | a checkpoint path
    async_save: bool = False


@dataclass
class TrainConfig:
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
        require(self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(
            self.stop_after_steps is None or self.stop_after_steps >= 1,
            "train.stop_after_steps",
            self.stop_after_steps,
            "must be >= 1 (or null: the whole schedule)",
        )
        require(
            self.precision in PRECISIONS,
            "train.precision",
            self.precision,
            f"choose one of {PRECISIONS}",
        )
        require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        require(
            self.nonfinite in ("stop", "skip"), "train.nonfinite", self.nonfinite, "stop | skip"
        )
        require(self.max_skipped >= 0, "train.max_skipped", self.max_skipped, "must be >= 0")
        require(
            self.collective_timeout_minutes > 0,
            "train.collective_timeout_minutes",
            self.collective_timeout_minutes,
            "must be > 0 (minutes a rank waits for its peers in a collective)",
        )
        require(
            self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "auto|cpu|cuda"
        )


@dataclass
class RunConfig:
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
        require(
            self.train.nonfinite == "stop",
            "train.nonfinite",
            self.train.nonfinite,
            "skip needs the step before DeepSpeed's optimizer runs; use stop with engine=deepspeed",
        )
        require(
            self.ast.mode != "joint",
            "engine.name",
            self.engine.name,
            "ast.mode=joint needs N backward passes per step, which DeepSpeed's engine "
            "does not take; use engine=ddp",
        )
        require(
            self.engine.zero_stage > 0 or self.train.precision == "fp32",
            "engine.zero_stage",
            self.engine.zero_stage,
            f"train.precision={self.train.precision} under DeepSpeed needs ZeRO stage 1 or 2 "
            "(stage 0's mixed-precision wrapper keeps unmapped flat fp32 copies; stage 1/2 "
            "use as much memory as DDP's fp32 master weights or less)",
        )
        require(
            self.optim.inactive_weights == "frozen",
            "optim.inactive_weights",
            self.optim.inactive_weights,
            "moving is implemented for engine=ddp only (DeepSpeed's flat partitions apply "
            "m_k to every update); use engine=ddp",
        )
        require(
            self.ast.regrow_init == "zero",
            "ast.regrow_init",
            self.ast.regrow_init,
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
