"""State as tensors: codecs (int / RNG <-> tensor) and small ``Stateful`` adapters for
state owned by torch, Python or a plain list. A checkpoint holds tensors only (DCP would
``torch.load`` any other object with ``weights_only=False``). Imports nothing of dist_ast.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch


class StateMismatchError(ValueError):
    """A saved state that does not fit the object it is loaded into."""


def int_tensor(v: int) -> torch.Tensor:
    """A Python int of any size as int64 [hi, lo] (FLOPs counters can pass 2**63)."""
    hi, lo = divmod(int(v), 1 << 32)
    return torch.tensor([hi, lo], dtype=torch.int64)


def int_value(t: torch.Tensor) -> int:
    hi, lo = (int(x) for x in t.tolist())
    return (hi << 32) + lo


def ints_to_tensors(d: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: int_tensor(v) for k, v in d.items()}


def tensors_to_ints(d: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {k: int_value(v) for k, v in d.items()}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states as int64 tensors (no pickles); floats by their bits."""
    version, internal, gauss = random.getstate()
    g = [0, 0] if gauss is None else [1, int(np.float64(gauss).view(np.int64))]
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937"
    extra = np.array([pos, has_gauss, np.float64(cached).view(np.int64)], dtype=np.int64)
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *internal, *g], dtype=torch.int64),
        "numpy": torch.from_numpy(np.concatenate([keys.astype(np.int64), extra])),
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    v = state["python"].tolist()
    gauss = float(np.int64(v[-1]).view(np.float64)) if v[-2] else None
    random.setstate((v[0], tuple(v[1:-2]), gauss))
    a = state["numpy"].cpu().numpy()
    cached = float(a[-1:].view(np.float64)[0])
    np.random.set_state(("MT19937", a[:-3].astype(np.uint32), int(a[-3]), int(a[-2]), cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class RngState:
    """The RNG states of this process (torch, CUDA, Python, NumPy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_rng_state(state, self.device)


class IntCounters:
    """A mixin: the state is the int attributes named in ``int_fields``."""

    int_fields: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ints_to_tensors({k: getattr(self, k) for k in self.int_fields})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ints = tensors_to_ints(state)
        for k in self.int_fields:
            setattr(self, k, ints[k])


class IntAttrs:
    """Named ints read and written through callables (the trainer's step)."""

    def __init__(self, get: Callable[[], dict[str, int]], put: Callable[[dict[str, int]], None]):
        self.get, self.put = get, put

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ints_to_tensors(self.get())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.put(tensors_to_ints(state))


class IntState(IntAttrs):
    """An object whose ``state_dict`` is a flat dict of ints (a loader's position)."""

    def __init__(self, obj: Any) -> None:
        super().__init__(obj.state_dict, obj.load_state_dict)


class RankState:
    """Rank-local parts under one key (``rank<r>``): each is loaded when the saved state
    has it (a run on another world size may lack this rank's, or some of them)."""

    def __init__(self, parts: dict[str, Any]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {k: p.state_dict() for k, p in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, p in self.parts.items():
            if k in state:
                p.load_state_dict(state[k])


class MaskUpdateLog:
    """The mask-update log (a list of {"step", "subnet", "reset"}) as one int64 [n, 3]
    tensor: its ``state_dict`` is that tensor (its DCP key is the part's own)."""

    def __init__(self, updates: list[dict]) -> None:
        self.updates = updates  # the owner's list, changed in place

    def state_dict(self) -> torch.Tensor:
        rows = [[u["step"], u["subnet"], u["reset"]] for u in self.updates]
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.updates[:] = [
            {"step": int(a), "subnet": int(b), "reset": int(c)} for a, b, c in state.tolist()
        ]


class OptimizerState:
    """An optimizer's per-parameter state by parameter name (names survive resharding;
    ids do not): ``{"<param>.<slot>": tensor}``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.model.named_parameters():
            for key, v in self.optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    raise StateMismatchError(
                        f"optimizer state {name}.{key} is not a tensor: {type(v)}"
                    )
                out[f"{name}.{key}"] = v
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        slots = [(k, *k.rsplit(".", 1)) for k in state]
        for _, name, _ in slots:
            if name not in params:
                raise StateMismatchError(
                    f"the checkpoint has optimizer state for {name}, which this model lacks"
                )
        for key, name, slot in slots:
            p = params[name]
            self.optimizer.state[p][slot] = state[key].to(p.device)


class ScalerState:
    """A GradScaler's state, every value as a float64 scalar tensor."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, torch.Tensor]:
        sc = self.scaler.state_dict()
        return {k: torch.tensor(float(v), dtype=torch.float64) for k, v in sc.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sc = {k: v.item() for k, v in state.items()}
        sc["_growth_tracker"] = int(sc.get("_growth_tracker", 0))  # an int in GradScaler
        self.scaler.load_state_dict(sc)
