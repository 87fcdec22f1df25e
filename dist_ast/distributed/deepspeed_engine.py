"""DeepSpeed as the second engine (``engine=deepspeed``, ZeRO stage 0, 1 or 2) with the
same AST semantics as the DDP path.

Under ZeRO-1/2 (and bf16/fp16 at any stage) DeepSpeed's optimizer sees flat fp32
partitions, not the model's parameters, and is called once per parameter group. So the
client optimizer, :class:`PartitionMaskedSGD`, runs the trainer's update inside
``step()`` on a :class:`PartitionGrads` view of those partitions: each model parameter is
mapped to its fragment (DeepSpeed's ``_hp_mapping``), the active sub-net's masks are
built over the partition, and GC sums its dot products over the reduce group (the ranks'
partitions are disjoint). Regrowth gets the dense gradient assembled from every rank's
fragments (one all-reduce); grown weights are zeroed in the fp32 master and momentum too.
All sparse weights live in parameter group 0, so GC sees them in one call. Plain torch SGD
would move every weight and is refused; joint mode is not supported by this engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ast.config import ConfigError, RunConfig
from dist_ast.distributed.engine import Engine, Update
from dist_ast.distributed.mask_sync import verify_masks
from dist_ast.distributed.setup import DistInfo, free_port, process_group_backend
from dist_ast.sparsity.layers import SwitchableBatchNorm2d
from dist_ast.sparsity.model import SubnetModel
from dist_ast.sparsity.optim import MaskedSGD

log = logging.getLogger(__name__)


def deepspeed_config(config: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict, built from our config."""
    t, e = config.train, config.engine
    bucket = int(e.bucket_cap_mb * 2**20 / 4)  # elements
    ds: dict = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # our PartitionMaskedSGD
        "zero_optimization": {
            "stage": e.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "overlap_comm": False,
            "contiguous_gradients": True,
        },
    }
    if t.precision in ("bf16", "fp16"):
        if t.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        else:
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        # DeepSpeed casts parameters but keeps buffers fp32 by default; BatchNorm's kernel
        # wants its running statistics in the dtype of its (cast) affine parameters.
        ds["data_types"] = {"buffer_dtype": t.precision}
    return ds


@dataclass
class _Segment:
    """Model parameter ``param``'s elements [lp, lp+n) live at [hp, hp+n) of a flat tensor."""

    param: torch.Tensor
    lp: int
    hp: int
    n: int


class PartitionMaskedSGD(MaskedSGD):
    """MaskedSGD that DeepSpeed may call on flat fp32 partitions (see module docstring)."""

    def __init__(self, model: SubnetModel, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.model = model
        self.on_step: Update | None = None  # the trainer's update, set around engine.step()
        self.results: list[tuple[PartitionGrads, object]] = []
        self.reduce_group: object | None = None  # set when gradients are partitioned
        self.partitioned = False
        self._segments: dict[int, list[_Segment]] = {}  # id(flat tensor) -> segments
        self._sparse = {id(w): i for i, w in enumerate(model.sparse_weights())}
        self._bn = {
            id(p): p
            for m in model.modules()
            if isinstance(m, SwitchableBatchNorm2d)
            for p in (m.weight, m.bias)
        }
        self._mask_cache: dict[tuple[int, int], tuple] = {}
        self.capture_dense = False  # this step's regrowth needs the dense gradient
        # build_param_groups puts every sparse weight in group 0; a key in the group (not
        # the dict's identity) survives DeepSpeed's regrouping and checkpoint loads.
        self.param_groups[0]["ast_sparse"] = True

    # -- layout -------------------------------------------------------------------------
    def link(self, partitioned: bool, reduce_group: object | None) -> None:
        """Map every tensor this optimizer steps to the model-parameter fragments in it
        (once, after ``deepspeed.initialize`` has replaced our parameters)."""
        self.partitioned, self.reduce_group = partitioned, reduce_group
        self._segments.clear()
        flats = {id(p): p for g in self.param_groups for p in g["params"]}
        model_params = {id(p): p for p in self.model.parameters()}
        for pid, p in flats.items():
            if pid in model_params:  # ZeRO-0 fp32: the model's own parameters
                self._segments[pid] = [_Segment(p, 0, 0, p.numel())]
        for p in self.model.parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            frag = mapping.hp_fragment
            for fid, flat in flats.items():
                if frag.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                    self._segments.setdefault(fid, []).append(
                        _Segment(
                            p,
                            mapping.lp_fragment_address.start,
                            mapping.hp_fragment_address.start,
                            mapping.hp_fragment_address.numel,
                        )
                    )
                    break
        unmapped = [p for pid, p in flats.items() if pid not in self._segments]
        if unmapped:
            raise RuntimeError(
                "PartitionMaskedSGD cannot map DeepSpeed's flat parameters to the model "
                "(no _hp_mapping): this DeepSpeed optimizer wrapper is not supported; use "
                "engine.zero_stage=1 or 2 with bf16/fp16, or fp32 at any stage"
            )
        self._mask_cache.clear()

    def masks_changed(self) -> None:
        self._mask_cache.clear()

    def _flat_masks(self, flat: torch.Tensor, k: int) -> tuple:
        """(grad/update mask, GC mask) of sub-net k over ``flat``; None = all True / none."""
        key = (id(flat), k)
        masks = self.model.masks(k)
        # In-place writes to the masks (updates, checkpoint loads) bump version counters.
        version = tuple((m.data_ptr(), m._version) for m in masks)
        cached = self._mask_cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        segs = self._segments[id(flat)]
        update = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        gc = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        touched = has_sparse = False
        for s in segs:
            i = self._sparse.get(id(s.param))
            if i is not None:
                m = masks[i].reshape(-1)[s.lp : s.lp + s.n].to(flat.device)
                update[s.hp : s.hp + s.n] = m
                gc[s.hp : s.hp + s.n] = m
                touched = has_sparse = True
            elif id(s.param) in self._bn:
                rows = torch.zeros_like(s.param, dtype=torch.bool)
                rows[k] = True
                update[s.hp : s.hp + s.n] = rows.reshape(-1)[s.lp : s.lp + s.n]
                touched = True
        out = (update.view_as(flat) if touched else None, gc.view_as(flat) if has_sparse else None)
        self._mask_cache[key] = (version, out)
        return out

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, update_masks=None, closure=None) -> None:  # type: ignore[override]
        """DeepSpeed's call (once per parameter group it steps): the trainer's update on
        the flat partitions."""
        if self.on_step is None:
            raise RuntimeError(
                "PartitionMaskedSGD.step() outside the trainer's step: under engine=deepspeed "
                "the trainer's update runs inside engine.step(); plain SGD would move every "
                "weight"
            )
        grads = PartitionGrads(self)
        self.results.append((grads, self.on_step(grads)))

    def _has_sparse_group(self) -> bool:
        return any(g.get("ast_sparse", False) for g in self.param_groups)

    def _gc_reduce_group(self) -> object | None:
        if not self.partitioned:
            return None
        return self.reduce_group if self.reduce_group is not None else dist.group.WORLD

    def _dense_sparse_grads(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full averaged dense gradient of every sparse weight (before masking)."""
        weights = self.model.sparse_weights()
        out = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
        for p in flats:
            for s in self._segments[id(p)]:
                i = self._sparse.get(id(s.param))
                if i is not None:
                    out[i].view(-1)[s.lp : s.lp + s.n] = p.grad.view(-1)[s.hp : s.hp + s.n]
        if self.partitioned:
            flat = torch.cat([o.view(-1) for o in out])
            dist.all_reduce(flat, group=self._gc_reduce_group())  # type: ignore[arg-type]
            offset = 0
            for o in out:
                o.view(-1).copy_(flat[offset : offset + o.numel()])
                offset += o.numel()
        return out

    @torch.no_grad()
    def reset_state(self, param: torch.Tensor, where: torch.Tensor) -> None:
        """Zero a freshly grown weight in the fp32 master and its momentum."""
        flat_where = where.reshape(-1)
        for g in self.param_groups:
            for p in g["params"]:
                for s in self._segments.get(id(p), []):
                    if s.param is not param:
                        continue
                    sel = flat_where[s.lp : s.lp + s.n].to(p.device)
                    p.view(-1)[s.hp : s.hp + s.n].masked_fill_(sel, 0.0)
                    buf = self.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.view(-1)[s.hp : s.hp + s.n].masked_fill_(sel, 0.0)


class PartitionGrads:
    """This rank's flat fp32 partitions (all-reduced, averaged, unscaled) as one call of
    DeepSpeed's optimizer step sees them."""

    finite = None  # DeepSpeed skips an overflowing fp16 step before calling the optimizer

    def __init__(self, opt: PartitionMaskedSGD) -> None:
        self.opt = opt
        self.flats = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.holds_sparse = opt._has_sparse_group()
        self.reduce_group = opt._gc_reduce_group()
        self.masks: dict[int, tuple] = {}
        self.dense: list[torch.Tensor] | None = None

    def mask(self, subnets: list[int]) -> None:
        (k,) = subnets  # RunConfig refuses ast.mode=joint with engine=deepspeed
        self.masks = {id(p): self.opt._flat_masks(p, k) for p in self.flats}
        if self.opt.capture_dense and self.holds_sparse:
            self.dense = self.opt._dense_sparse_grads(self.flats)
        for p in self.flats:
            upd = self.masks[id(p)][0]
            if upd is not None:
                p.grad.mul_(upd)

    def checked(self) -> list[torch.Tensor]:
        return []  # the loss only (train.nonfinite=stop; fp16 overflow is DeepSpeed's)

    def sparse(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        if not self.holds_sparse:
            return None
        gc_flats = [p for p in self.flats if self.masks[id(p)][1] is not None]
        if not gc_flats:  # this rank's partition holds no sparse weight: still join the sum
            device = self.flats[0].device
            zero = torch.zeros(1, device=device)
            return [zero], [torch.zeros(1, dtype=torch.bool, device=device)]
        return [p.grad for p in gc_flats], [self.masks[id(p)][1] for p in gc_flats]

    def step(self, subnets: list[int]) -> None:
        masks = {p: self.masks[id(p)][0] for p in self.flats if self.masks[id(p)][0] is not None}
        MaskedSGD.step(self.opt, masks)


class DeepSpeedEngine(Engine):
    """DeepSpeed: its engine runs forward, backward (reduce-scatter) and the step."""

    def __init__(
        self,
        model: SubnetModel,
        dist: DistInfo,
        engine,
        optimizer: PartitionMaskedSGD,  # noqa: ANN001
    ) -> None:
        self.model, self.dist = model, dist
        self.engine, self.optimizer = engine, optimizer
        self.dense: list[torch.Tensor] | None = None

    def begin_step(self, dense_subnets: list[int]) -> None:
        self.optimizer.capture_dense = bool(dense_subnets)
        self.dense = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x.to(next(self.model.parameters()).dtype))

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, update: Update) -> tuple[bool, torch.Tensor | bool | None]:
        """engine.step() calls the trainer's update once per parameter group; the result
        is the sparse group's. (False, …) when DeepSpeed skipped the step (fp16 overflow)."""
        opt = self.optimizer
        opt.on_step, opt.results = update, []
        try:
            self.engine.step()
        finally:
            opt.on_step = None
        results, opt.results = opt.results, []
        out: torch.Tensor | bool | None = False
        for grads, result in results:
            if grads.holds_sparse:
                out, self.dense = result, grads.dense
        return bool(results), out

    def dense_grads(self, subnets: list[int], k: int) -> list[torch.Tensor] | None:
        """Assembled from every rank's partition on a capture step (None: the step was
        skipped by DeepSpeed's overflow check; the update only prunes)."""
        return self.dense

    def masks_changed(self, k: int) -> None:
        self.optimizer.masks_changed()


def build_param_groups(model: SubnetModel, weight_decay: float) -> list[dict]:
    """Decay on every weight of ndim > 1 (all sparse weights in this one group), none on
    BatchNorm and biases: the same split as :meth:`SubnetModel.param_groups`."""
    groups = model.param_groups(weight_decay)
    sparse = {id(w) for w in model.sparse_weights()}
    assert all(id(p) in {id(q) for q in groups[0]["params"]} for p in model.sparse_weights())
    assert not any(id(p) in sparse for p in groups[1]["params"])
    return groups


def _init_single_process_group(device: torch.device) -> None:
    """A world of one for DeepSpeed, which wants a process group even then: on CUDA the
    same NCCL + gloo group as a multi-rank run (ZeRO's collectives on CUDA tensors are
    written for NCCL), gloo alone on CPU."""
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(process_group_backend(device), rank=0, world_size=1)


def wrap_deepspeed(
    model: SubnetModel, optimizer: MaskedSGD, dist_info: DistInfo, config: RunConfig
) -> tuple[torch.nn.Module, DeepSpeedEngine, PartitionMaskedSGD]:
    """``deepspeed.initialize`` with our optimizer; returns (DeepSpeed's engine, ours, the
    optimizer)."""
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError(
            "invalid engine.name='deepspeed': DeepSpeed is not installed "
            "(pip install 'dist_ast[deepspeed]')"
        ) from e
    o = config.optim
    defaults = optimizer.defaults
    client = PartitionMaskedSGD(
        model,
        build_param_groups(model, o.weight_decay),
        lr=defaults["lr"],
        momentum=defaults["momentum"],
        nesterov=defaults["nesterov"],
    )
    if not dist.is_initialized():  # one process: DeepSpeed still wants a process group
        _init_single_process_group(dist_info.device)
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model,
        optimizer=client,
        config=deepspeed_config(config, dist_info.world_size),
        dist_init_required=False,
    )
    partitioned = engine.zero_optimization_stage() > 0
    client.link(partitioned=partitioned, reduce_group=getattr(ds_opt, "dp_process_group", None))
    verify_masks(model)
    sync = DeepSpeedEngine(model, dist_info, engine, client)
    log.info(
        "DeepSpeed ZeRO-%d (%s), optimizer %s over %s",
        engine.zero_optimization_stage(),
        config.train.precision,
        type(ds_opt).__name__,
        "flat partitions" if partitioned else "the model's parameters",
    )
    return engine, sync, client
