"""Evaluate every sub-net with its own masks and BatchNorm set; ranks split the
validation set and all-reduce the counts, so the result equals one process's."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from dist_ast.cli import compose_config
from dist_ast.config import ConfigError
from dist_ast.data import build_loaders
from dist_ast.distributed.setup import DistInfo, init_distributed, leave_together
from dist_ast.sparsity.model import SubnetModel
from dist_ast.subnets_io import load_subnet_model, resolve_checkpoint


@torch.no_grad()
def evaluate_subnets(
    model: SubnetModel,
    val_loader,
    dist_info: DistInfo,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    subnets: list[int] | None = None,
) -> list[dict]:
    """[{index, top1, top5, samples}] for each sub-net."""
    was_training = model.training
    model.eval()
    results = []
    for k in subnets if subnets is not None else range(model.num_subnets):
        model.set_subnet(k)
        counts = torch.zeros(3, dtype=torch.float64, device=dist_info.device)
        for x, y in val_loader:
            with autocast():
                logits = model(x)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5 == y[:, None]
            counts += torch.tensor(
                [hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(y)],
                dtype=torch.float64,
                device=dist_info.device,
            )
        if dist_info.distributed:
            dist.all_reduce(counts)
        top1, top5, samples = counts.tolist()
        n = max(samples, 1.0)
        results.append({"index": k, "top1": top1 / n, "top5": top5 / n, "samples": int(samples)})
    model.train(was_training)
    return results


# -- command line: python -m dist_ast.evaluate ckpt=… data=… ---------------------------
USAGE = (
    "usage: [torchrun --nproc_per_node=G] python -m dist_ast.evaluate ckpt=PATH "
    "[data=NAME] [data.KEY=VALUE …] [subnets=0,2] [batch_size=256] [json=FILE] "
    "[device=auto|cpu|cuda]"
)


def sparsity_report(model: SubnetModel, k: int) -> dict:
    """Sub-net k's sparsity from its masks: over the sparse layers, over every conv and
    linear weight (dense layers count as dense), per layer; and the measured fraction of
    exact zeros in w ⊙ m_k (a regrown weight starts at 0, so it can exceed the former)."""
    nonzero, total = model.mask_counts(k)
    zeros = 0
    for w, m in zip(model.sparse_weights(), model.masks(k), strict=True):
        zeros += int(((w * m) == 0).sum())
    dense = sum(
        mod.weight.numel()
        for name, mod in model.net.named_modules()
        if isinstance(mod, nn.Conv2d | nn.Linear) and name not in model.sparse_names
    )
    return {
        "sparsity": 1.0 - nonzero / total,
        "sparsity_all_layers": 1.0 - (nonzero + dense) / (total + dense),
        "zero_fraction": zeros / total,
        "nonzero": nonzero,
        "total": total,
        "layers": model.layer_sparsity(k),
    }


def _data_config(base, overrides: list[str], compose):  # noqa: ANN001, ANN202
    """The checkpoint's data config, or the ``data=<group>`` one, with ``data.key=value``
    overrides on top."""
    groups = [o for o in overrides if o.startswith("data=")]
    keys = [o[len("data.") :] for o in overrides if o.startswith("data.")]
    data = compose(groups).data if groups else base
    if keys:
        merged = OmegaConf.merge(OmegaConf.structured(data), OmegaConf.from_dotlist(keys))
        data = OmegaConf.to_object(merged)
    return data


def evaluate_checkpoint(
    ckpt: str,
    data_overrides: list[str] | None = None,
    subnets: list[int] | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict:
    """Top-1/top-5 and sparsity of every sub-net of a checkpoint. Under torchrun the
    ranks split the validation set and all-reduce the counts (same numbers as one rank)."""
    dist_info = init_distributed(device)
    with leave_together():
        config, model = load_subnet_model(ckpt, dist_info.device)
        data = _data_config(config.data, data_overrides or [], compose_config)
        if batch_size % dist_info.world_size:
            raise ConfigError(
                f"invalid batch_size={batch_size}: must divide over {dist_info.world_size} ranks"
            )
        loaders = build_loaders(
            data,
            batch_size=batch_size // dist_info.world_size,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            seed=config.train.seed,
            device=dist_info.device,
        )
        if loaders.num_classes != config.model.num_classes:
            raise ConfigError(
                f"invalid data={data.name}: {loaders.num_classes} classes, but the model "
                f"was trained for {config.model.num_classes}"
            )
        results = evaluate_subnets(model, loaders.val, dist_info, subnets=subnets)
        out = []
        for r in results:
            k = r["index"]
            entry = {**r, "target_sparsity": config.ast.sparsities[k]}
            if config.ast.nm_patterns:
                entry["nm_pattern"] = config.ast.nm_patterns[k]
            entry.update(sparsity_report(model, k))
            out.append(entry)
        return {
            "checkpoint": str(resolve_checkpoint(ckpt)),
            "model": config.model.name,
            "data": data.name,
            "world_size": dist_info.world_size,
            "is_main": dist_info.is_main,
            "subnets": out,
        }


def evaluation_table(report: dict) -> Table:
    table = Table(
        title=f"{report['model']} on {report['data']} · {report['checkpoint']} · "
        f"world size {report['world_size']}"
    )
    for col in ("sub-net", "target", "sparsity", "all conv/fc", "nonzero", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for s in report["subnets"]:
        target = s.get("nm_pattern") or f"{s['target_sparsity']:.4f}"
        table.add_row(
            str(s["index"]),
            target,
            f"{s['sparsity']:.4f}",
            f"{s['sparsity_all_layers']:.4f}",
            f"{s['nonzero']:,}",
            f"{100 * s['top1']:.2f}%",
            f"{100 * s['top5']:.2f}%",
        )
    return table


def layer_table(report: dict) -> Table:
    table = Table(title="layer-wise sparsity")
    table.add_column("layer")
    for s in report["subnets"]:
        table.add_column(f"sub-net {s['index']}", justify="right")
    for name in report["subnets"][0]["layers"]:
        table.add_row(name, *(f"{s['layers'][name]:.4f}" for s in report["subnets"]))
    return table


def _parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    own, data = {}, []
    for a in argv:
        key, sep, value = a.lstrip("-").partition("=")
        if not sep:
            raise SystemExit(f"argument {a!r} is not key=value\n{USAGE}")
        if key == "data" or key.startswith("data."):
            data.append(f"{key}={value}")
        elif key in ("ckpt", "subnets", "batch_size", "json", "device", "layers"):
            own[key] = value
        else:
            raise SystemExit(f"unknown argument {key!r}\n{USAGE}")
    if "ckpt" not in own:
        raise SystemExit(f"ckpt= is required\n{USAGE}")
    return own, data


def main(argv: list[str] | None = None) -> dict:
    """``python -m dist_ast.evaluate ckpt=… [data=…]``: table on rank 0, JSON if asked."""
    own, data = _parse(sys.argv[1:] if argv is None else argv)
    subnets = [int(k) for k in own["subnets"].split(",")] if own.get("subnets") else None
    report = evaluate_checkpoint(
        own["ckpt"],
        data,
        subnets=subnets,
        batch_size=int(own.get("batch_size", 256)),
        device=own.get("device", "auto"),
    )
    if report.pop("is_main"):
        console = Console()
        console.print(evaluation_table(report))
        if own.get("layers", "false").lower() in ("1", "true", "yes"):
            console.print(layer_table(report))
        if own.get("json"):
            path = Path(own["json"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(path)
            console.print(f"wrote {path}")
    return report


def cli() -> None:
    """Console-script entry point (`dist-ast-evaluate`): exit status 0 on success."""
    main()


if __name__ == "__main__":
    main()
