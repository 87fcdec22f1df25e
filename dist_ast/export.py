"""Export one sub-net as a plain model that needs no dist_ast to run.

    python -m dist_ast.export ckpt=runs/demo/model.pt subnet=2 out=runs/demo/subnet2.pt
    python -m dist_ast.export ckpt=runs/r18 subnet=0 out=r18_s0.pt2 format=pt2

Sub-net k becomes the un-converted architecture of ``build_model`` (a torchvision ResNet
for ResNet-18/50): sparse weights w ⊙ m_k, plain ``BatchNorm2d`` holding row k; its logits
equal sub-net k's inside dist_ast. ``format=state_dict`` (default) or ``pt2``
(``torch.export``). ``sparse=csr|nm|none`` also writes ``<out>.sparse.pt``: every sparse
layer in CSR (int32 indices) or, for an N:M sub-net, N values + N uint8 positions per
group of M input channels (the 2:4 kernels' layout); :func:`densify` turns it back.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from dist_ast.config import RunConfig
from dist_ast.models import build_model
from dist_ast.sparsity import nm
from dist_ast.sparsity.layers import SubnetSparseMixin, SwitchableBatchNorm2d
from dist_ast.sparsity.model import SubnetModel
from dist_ast.subnets_io import load_subnet_model

SPARSE_FORMAT = "dist_ast-sparse-v1"


@torch.no_grad()
def subnet_state_dict(model: SubnetModel, k: int) -> dict[str, torch.Tensor]:
    """Sub-net k as the state_dict of the un-converted model: w ⊙ m_k, BN row k."""
    if not 0 <= k < model.num_subnets:
        raise IndexError(f"sub-net {k} does not exist (N={model.num_subnets})")
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, SwitchableBatchNorm2d):
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                out[prefix + key] = getattr(mod, key)[k].detach().clone()
            continue
        sparse = isinstance(mod, SubnetSparseMixin)
        for key, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if sparse and key == "masks":
                continue
            if sparse and key == "weight":
                t = t * mod.masks[k]
            out[prefix + key] = t.detach().clone().contiguous()
    return out


def export_subnet(config: RunConfig, model: SubnetModel, k: int) -> nn.Module:
    """The plain (``build_model``) network of sub-net k, in eval mode."""
    plain = build_model(config.model)
    plain.load_state_dict(subnet_state_dict(model, k), strict=True)
    return plain.to(next(model.parameters()).device).eval()


# -- sparse file -----------------------------------------------------------------------
def _pack_nm(w: torch.Tensor, mask: torch.Tensor, pattern: str) -> dict:
    n, m = nm.parse_pattern(pattern)
    groups = nm.to_groups(w, m)
    live = nm.to_groups(mask, m, fill=False)
    # Positions of the live weights first (lower channel first), N per group.
    idx = torch.sort(live.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n]
    values = torch.gather(groups, 1, idx) * torch.gather(live, 1, idx)
    return {
        "layout": "nm",
        "pattern": pattern,
        "shape": list(w.shape),
        "values": values.contiguous(),
        "index": idx.to(torch.uint8).contiguous(),
    }


def _pack_csr(w: torch.Tensor) -> dict:
    with warnings.catch_warnings():  # "CSR support is in beta": we only store it
        warnings.simplefilter("ignore")
        csr = w.reshape(w.shape[0], -1).to_sparse_csr()
    return {
        "layout": "csr",
        "shape": list(w.shape),
        "crow": csr.crow_indices().to(torch.int32),
        "col": csr.col_indices().to(torch.int32),
        "values": csr.values().contiguous(),
    }


@torch.no_grad()
def sparse_subnet(
    model: SubnetModel, k: int, layout: str = "csr", pattern: str | None = None
) -> dict:
    """Sub-net k with every sparse layer packed (CSR or N:M); other entries plain."""
    state = subnet_state_dict(model, k)
    layers = {}
    for name, mod in model.net.named_modules():
        if not isinstance(mod, SubnetSparseMixin):
            continue
        key = f"{name}.weight"
        mask = mod.masks[k]
        if layout == "nm" and pattern is not None and nm.satisfies(mask, pattern):
            layers[key] = _pack_nm(state.pop(key), mask, pattern)
        else:
            layers[key] = _pack_csr(state.pop(key))
    return {"format": SPARSE_FORMAT, "subnet": k, "layers": layers, "dense": state}


def densify(sparse: dict) -> dict[str, torch.Tensor]:
    """The plain state_dict back from :func:`sparse_subnet`'s output (or its file)."""
    if sparse.get("format") != SPARSE_FORMAT:
        raise ValueError(f"not a {SPARSE_FORMAT} file")
    out = dict(sparse["dense"])
    for key, p in sparse["layers"].items():
        shape = torch.Size(p["shape"])
        if p["layout"] == "csr":
            size = (shape[0], shape.numel() // shape[0])
            crow, col = p["crow"].long(), p["col"].long()
            t = torch.sparse_csr_tensor(crow, col, p["values"], size, check_invariants=True)
            out[key] = t.to_dense().reshape(shape)
        else:
            _, m = nm.parse_pattern(p["pattern"])
            padded_i = shape[1] + (-shape[1]) % m
            g = p["values"].new_zeros(shape.numel() // shape[1] * padded_i // m, m)
            g.scatter_(1, p["index"].long(), p["values"])
            out[key] = nm.from_groups(g, shape)
    return out


# -- command line ----------------------------------------------------------------------
def export_to_files(
    ckpt: str | Path,
    subnet: int,
    out: str | Path,
    fmt: str = "state_dict",
    sparse: str = "auto",
) -> dict:
    """Write sub-net ``subnet`` of ``ckpt`` to ``out`` (+ ``<out>.sparse.pt``); returns
    what was written with the file sizes."""
    config, model = load_subnet_model(ckpt)
    plain = export_subnet(config, model, subnet)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "state_dict":
        torch.save(plain.state_dict(), out)
    elif fmt == "pt2":
        size = config.data.image_size
        batch = {0: torch.export.Dim.DYNAMIC}  # any batch size
        example = torch.zeros(2, 3, size, size)
        program = torch.export.export(plain, (example,), dynamic_shapes=(batch,))
        torch.export.save(program, out)
    else:
        raise ValueError(f"format={fmt!r}: choose state_dict or pt2")
    dense_bytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    report = {
        "subnet": subnet,
        "model": config.model.name,
        "out": str(out),
        "format": fmt,
        "bytes": out.stat().st_size,
        "dense_bytes": dense_bytes,
        "sparsity": model.sparsity(subnet),
    }
    patterns = config.ast.nm_patterns
    pattern = patterns[subnet] if patterns else None
    if sparse == "auto":
        sparse = "nm" if pattern else "csr"
    if sparse != "none":
        packed = sparse_subnet(model, subnet, sparse, pattern)
        sparse_path = out.with_name(out.name + ".sparse.pt")
        torch.save(packed, sparse_path)
        report.update(
            sparse=sparse, sparse_out=str(sparse_path), sparse_bytes=sparse_path.stat().st_size
        )
    return report


def _parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for a in argv:
        key, sep, value = a.lstrip("-").partition("=")
        if not sep:
            raise SystemExit(f"argument {a!r}: expected key=value (ckpt=…, subnet=k, out=…)")
        args[key.replace("-", "_")] = value
    unknown = set(args) - {"ckpt", "subnet", "out", "format", "sparse"}
    if unknown or not {"ckpt", "subnet", "out"} <= set(args):
        raise SystemExit(
            "usage: python -m dist_ast.export ckpt=PATH subnet=K out=FILE "
            "[format=state_dict|pt2] [sparse=auto|csr|nm|none]"
            + (f" (unknown: {sorted(unknown)})" if unknown else "")
        )
    return args


def main(argv: list[str] | None = None) -> dict:
    """``python -m dist_ast.export ckpt=… subnet=k out=…``."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    report = export_to_files(
        args["ckpt"],
        int(args["subnet"]),
        args["out"],
        fmt=args.get("format", "state_dict"),
        sparse=args.get("sparse", "auto"),
    )
    console = Console()
    console.print(
        f"sub-net {report['subnet']} ({report['model']}, sparsity {report['sparsity']:.4f}) "
        f"-> {report['out']} ({report['format']}, {report['bytes']:,} bytes)"
    )
    if "sparse_out" in report:
        console.print(
            f"sparse ({report['sparse']}) -> {report['sparse_out']}: "
            f"{report['sparse_bytes']:,} bytes = "
            f"{report['sparse_bytes'] / report['dense_bytes']:.3f}x of dense"
        )
    return report


def cli() -> None:
    """Console-script entry point (`dist-ast-export`): exit status 0 on success."""
    main()


if __name__ == "__main__":
    main()
