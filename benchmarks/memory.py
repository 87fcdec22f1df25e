"""Memory of AST with N = 1…5 sub-nets vs dense training, in bytes per parameter.

On CPU the allocator keeps no statistics (and tracemalloc does not see torch), so the
persistent training state is counted tensor by tensor after two real ``train_step``
calls: weights, gradients, masks, BatchNorm sets, optimizer state, the GC buffer. The
transient masked weights (w ⊙ m_k, alive from forward to backward, 4 B per sparse
weight) are added analytically. With a GPU, ``torch.cuda.max_memory_allocated`` over
the same steps is reported too (it includes activations, which do not depend on N).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from benchmarks.harness import add_model_argument

log = logging.getLogger("benchmarks.memory")

TITLE = "memory"
NOTES = (
    "Bytes per parameter of the model (all weights, BN included). masks are bool "
    "(1 B per sparse weight per sub-net; the broadcast packs them to 1 bit). 'peak extra' is "
    "the transient masked weight of the active sub-net (4 B per sparse weight)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p, "wrn32")
    p.add_argument("--max-subnets", type=int, default=5)
    p.add_argument("--image-size", type=int, default=64, help="input side (state is size-free)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _cuda_peak(fn) -> int | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measure_ast(n: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from benchmarks.step import build_trainer_variant, trainer_step_fn
    from dist_ast.sparsity.layers import SwitchableBatchNorm2d

    sparsities = [round(0.5 + 0.45 * i / max(1, n - 1), 3) for i in range(n)] if n > 1 else [0.9]
    classes = 1000 if args.image_size >= 64 else 10
    trainer = build_trainer_variant(
        "ast_gc" if n > 1 else "ast",
        model=args.model,
        small_input=args.image_size < 64,
        image_size=args.image_size,
        num_classes=classes,
        batch_size=args.batch_size,
        sparsities=sparsities,
        device=device,
        precision="fp32",
        channels_last=False,
        run_dir=f"runs/bench/memory/n{n}",
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, classes, (args.batch_size,), generator=g).to(device)
    step = trainer_step_fn(trainer, x, y)
    step()
    peak = _cuda_peak(step)
    model = trainer.model
    bn = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    bn_tensors = [t for m in bn for t in (*m.parameters(), *m.buffers())]
    bn_ids = {id(t) for t in bn_tensors}
    sparse = model.sparse_weights()
    params = [p for p in model.parameters() if id(p) not in bn_ids]
    masks = [b for name, b in model.named_buffers() if name.endswith("masks")]
    n_params = sum(p.numel() for p in model.parameters())
    n_sparse = sum(w.numel() for w in sparse)
    # BN's share of the dense model's parameters (one set) for a fair per-parameter base.
    n_bn_one = sum(m.weight.shape[1] * 2 for m in bn)
    base_params = n_params - sum(m.weight.numel() * 2 for m in bn) + n_bn_one
    row = {
        "model": args.model,
        "N": n,
        "weights": _bytes(params),
        "grads": _bytes(p.grad for p in model.parameters()),
        "masks": _bytes(masks),
        "BN sets": _bytes(bn_tensors),
        "optimizer": _bytes(_state_tensors(trainer.optimizer)),
        "GC buffer": _bytes(trainer.gc.prev or []),
        "peak extra": 4 * n_sparse,
    }
    persistent = sum(row[k] for k in ("weights", "grads", "masks", "BN sets", "optimizer"))
    persistent += row["GC buffer"]
    row["total"] = persistent + row["peak extra"]
    row["B/param"] = row["total"] / base_params
    row["cuda peak"] = peak
    return row


def measure_dense(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from dist_ast.config import ModelConfig
    from dist_ast.models import build_model

    classes = 1000 if args.image_size >= 64 else 10
    net = build_model(
        ModelConfig(name=args.model, num_classes=classes, small_input=args.image_size < 64)
    ).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    peak = _cuda_peak(step)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_tensors = [t for m in bn for t in (*m.parameters(), *m.buffers())]
    bn_ids = {id(t) for t in bn_tensors}
    n_params = sum(p.numel() for p in net.parameters())
    row = {
        "model": args.model,
        "N": "dense",
        "weights": _bytes(p for p in net.parameters() if id(p) not in bn_ids),
        "grads": _bytes(p.grad for p in net.parameters()),
        "masks": 0,
        "BN sets": _bytes(bn_tensors),
        "optimizer": _bytes(_state_tensors(opt)),
        "GC buffer": 0,
        "peak extra": 0,
    }
    row["total"] = sum(
        row[k] for k in ("weights", "grads", "masks", "BN sets", "optimizer", "GC buffer")
    )
    row["B/param"] = row["total"] / n_params
    row["cuda peak"] = peak
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    rows = [measure_dense(args, device)]
    for n in range(1, args.max_subnets + 1):
        rows.append(measure_ast(n, args, device))
    mib = 1024 * 1024
    out = []
    for r in rows:
        o = {"model": r["model"], "N": r["N"], "B/param": round(r["B/param"], 2)}
        for k in ("weights", "grads", "masks", "BN sets", "optimizer", "GC buffer", "peak extra"):
            o[f"{k} MiB"] = round(r[k] / mib, 1)
        o["total MiB"] = round(r["total"] / mib, 1)
        if r["cuda peak"] is not None:
            o["cuda peak MiB"] = round(r["cuda peak"] / mib, 1)
        out.append(o)
    return out


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["memory", *sys.argv[1:]]))
