"""Read a trained model back for the tools that use the sub-nets (evaluate, export,
dynamic inference, report), whatever wrote it: a ``torch.save`` file ``{"config",
"model"}`` (``run_dir/model.pt``, written at the end of training), a DCP checkpoint folder
``run_dir/checkpoints/step-<N>/`` (read without a process group; the config from its
meta.json), or a run folder (its ``model.pt``, or a newer complete checkpoint). Neither
reader unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dist_ast.checkpoint import complete_checkpoints
from dist_ast.checkpoint_io import CheckpointError, SafeFileSystemReader, read_meta
from dist_ast.config import RunConfig, to_run_config
from dist_ast.models import build_subnet_model
from dist_ast.sparsity.model import SubnetModel

MODEL_FILE = "model.pt"


def save_model_state(path: str | Path, config_dict: dict, model: SubnetModel) -> Path:
    """Write ``{"config", "model"}`` atomically (tmp + rename), so a reader never sees
    a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"config": config_dict, "model": state}, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """The file or DCP folder that ``path`` names. A run folder resolves to its model.pt
    (written when training ends) unless a checkpoint is newer, else its newest checkpoint."""
    p = Path(path)
    if p.is_file() or (p / ".metadata").exists():
        return p
    if p.is_dir():
        found = complete_checkpoints(p)
        newest = found[-1][1] if found else None
        final = p / MODEL_FILE
        if final.is_file() and (
            newest is None or final.stat().st_mtime >= (newest / ".metadata").stat().st_mtime
        ):
            return final  # the end of training (newer than any checkpoint)
        if newest is not None:
            return newest
    raise FileNotFoundError(
        f"no checkpoint at {p}: give run_dir/{MODEL_FILE}, a run_dir/checkpoints/step-<N> "
        "folder, or a run folder holding one of them"
    )


def _config_from(obj: Any) -> dict | None:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, str):
        try:
            out = json.loads(obj)
        except ValueError:
            return None
        return out if isinstance(out, dict) else None
    return None


def _load_dcp(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A dist_ast checkpoint (meta.json + DCP): only the model's entries are read, into a
    model built from the saved config, with no process group and the checkpoint module's
    restricted metadata unpickler (a DCP folder of another program is refused: reading
    it whole would unpickle whatever it holds)."""
    if not (folder / "meta.json").is_file():
        raise CheckpointError(
            f"{folder} has no meta.json: not a dist_ast checkpoint (give a run folder, "
            "its model.pt or one of its checkpoints/step-<N> folders)"
        )
    config_dict = read_meta(folder)["config"]
    config = to_run_config(config_dict)
    model = build_subnet_model(config.model, config.ast.num_subnets)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
    return config_dict, state["model"]


def load_model_state(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(validated RunConfig, the SubnetModel's state_dict) from a checkpoint; see the
    module docstring for the formats."""
    p = resolve_checkpoint(path)
    if p.is_dir():
        config, model = _load_dcp(p)
    else:  # tensors, dicts and plain values only: nothing in the file runs code
        state = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            raise ValueError(f"{p} is not a dist_ast model file (expected keys config, model)")
        config, model = _config_from(state["config"]), state["model"]
        if config is None:
            raise ValueError(f"{p}: the config entry is not a dict")
    return to_run_config(config), dict(model)


def load_subnet_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[RunConfig, SubnetModel]:
    """The trained SubnetModel (eval mode) and its config."""
    config, state = load_model_state(path)
    model = build_subnet_model(config.model, config.ast.num_subnets)
    model.load_state_dict(state)
    return config, model.to(device).eval()
