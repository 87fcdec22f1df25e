"""Inference speed of 2:4 semi-structured Linear layers vs dense, on a CUDA GPU.

    python -m benchmarks sparse24 [--ckpt runs/r18_nm/model.pt --subnet 0]
                                  [--batch 256 1024 4096] [--dtype fp16|bf16]
    python -m benchmarks sparse24 --no-record …   # the same table, not recorded

Each Linear weight is put in the 2:4 pattern along its input dimension (the groups
dist_ast's N:M sub-nets use; a 1:4 or 1:8 sub-net is a valid 2:4 tensor too) and
compressed with ``torch.sparse.to_sparse_semi_structured``; ``F.linear`` is timed with
CUDA events against the dense weight, interleaved, and the outputs are checked to agree.
Without ``--ckpt`` the shapes are ResNet-50's classifier (1,000 classes padded to 1,024:
the kernels want rows in multiples of 32 and columns in multiples of 64) and
transformer-sized layers; with it, the sparse Linear layers of one sub-net of a
checkpoint (skipped when their shape does not fit the kernels).

Honest scope: ``to_sparse_semi_structured`` accelerates 2-D matrix products (Linear)
only, on Ampere or newer GPUs in fp16/bf16. Convolutions, most of a ResNet's time, are
not accelerated by it (TensorRT or cuSPARSELt conv paths are needed), so a ResNet
sub-net's end-to-end speed-up from this bench is bounded by its Linear share (the
classifier). On a machine without CUDA the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys

import torch
import torch.nn.functional as F

from dist_ast.sparsity import nm

log = logging.getLogger(__name__)

# (out, in); every one valid for to_sparse_semi_structured (see valid_24_shape)
DEFAULT_SHAPES = [(1024, 2048), (4096, 4096), (11008, 4096), (4096, 11008)]
# torch's CUTLASS limits for fp16/bf16 (the stricter of its two backends; cuSPARSELt's
# are 16 x 16): rows a multiple of 32, columns of 64.
ROW_MULTIPLE, COL_MULTIPLE = 32, 64
TITLE = "sparse24"
NOTES = "Convolutions are not accelerated by to_sparse_semi_structured (see the docstring)."


def valid_24_shape(rows: int, cols: int) -> bool:
    """Whether a [rows, cols] fp16/bf16 weight can be compressed by either 2:4 backend."""
    return (
        rows >= ROW_MULTIPLE
        and cols >= COL_MULTIPLE
        and not (rows % ROW_MULTIPLE or cols % COL_MULTIPLE)
    )


def unavailable_reason() -> str | None:
    """Why the bench cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU: 2:4 semi-structured kernels need an NVIDIA GPU (Ampere or newer)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"GPU compute capability {major}.x: 2:4 sparse tensor cores need 8.0 or newer"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch build has no torch.sparse.to_sparse_semi_structured"
    return None


def to_24(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 2 largest |w| kept in every group of 4 input columns."""
    mask = nm.nm_update(
        weight.float(), torch.ones_like(weight, dtype=torch.bool), None, "2:4",
        fraction=1.0, regrow_fraction=0.0,
    )  # fmt: skip
    return weight * mask


def _time(fn, repeats: int) -> float:  # noqa: ANN001 - a callable
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / max(1, repeats)


def bench_linear(weight: torch.Tensor, batch: int, repeats: int = 50, rounds: int = 5) -> dict:
    """Median seconds of dense vs 2:4 ``F.linear`` for one weight [out, in] and batch."""
    from torch.sparse import to_sparse_semi_structured

    w = to_24(weight)
    ws = to_sparse_semi_structured(w)
    x = torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype)
    ref, got = F.linear(x, w), F.linear(x, ws)
    err = float((ref.float() - got.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))

    def run(weight_: torch.Tensor):  # noqa: ANN202
        return lambda: [F.linear(x, weight_) for _ in range(repeats)]

    for fn in (run(w), run(ws)):  # warm-up
        fn()
    dense, sparse = [], []
    for _ in range(rounds):  # interleaved, so a clock change hits both
        dense.append(_time(run(w), repeats))
        sparse.append(_time(run(ws), repeats))
    d, s = statistics.median(dense), statistics.median(sparse)
    return {
        "shape": list(w.shape),
        "batch": batch,
        "dense_ms": 1e3 * d,
        "sparse24_ms": 1e3 * s,
        "speedup": d / s,
        "max_rel_error": err,
    }


def checkpoint_linears(ckpt: str, subnet: int) -> list[tuple[str, torch.Tensor]]:
    """The sparse Linear weights ⊙ mask of one sub-net of a checkpoint."""
    from dist_ast.subnets_io import load_model_state

    _, state = load_model_state(ckpt)
    out = []
    for key, t in state.items():
        if key.endswith(".masks") and t.ndim == 3:  # [N, out, in]: a Linear
            name = key[: -len(".masks")]
            out.append((name, state[f"{name}.weight"] * t[subnet]))
    return out


def measure(
    shapes: list[tuple[int, int]] | None = None,
    batches: tuple[int, ...] = (256, 1024, 4096),
    dtype: str = "fp16",
    ckpt: str | None = None,
    subnet: int = 0,
) -> dict:
    """The bench's rows, or ``{"skipped": reason}`` where it cannot run."""
    reason = unavailable_reason()
    if reason is not None:
        log.warning("sparse24 bench skipped: %s", reason)
        return {"skipped": reason}
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    weights: list[tuple[str, torch.Tensor]] = []
    if ckpt:
        for name, w in checkpoint_linears(ckpt, subnet):
            if not valid_24_shape(*w.shape):
                log.warning("%s %s: shape unsupported by the 2:4 kernels, skipped", name, w.shape)
                continue
            weights.append((name, w))
    else:
        gen = torch.Generator().manual_seed(0)
        weights = [
            (f"{o}x{i}", torch.randn(o, i, generator=gen)) for o, i in shapes or DEFAULT_SHAPES
        ]
    rows = []
    for name, w in weights:
        w = w.to("cuda", dt)
        for b in batches:
            rows.append({"layer": name, **bench_linear(w, b)})
    return {"device": torch.cuda.get_device_name(), "dtype": dtype, "rows": rows}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", default=None)
    p.add_argument("--subnet", type=int, default=0)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")


def run(args: argparse.Namespace) -> list[dict]:
    """Rows for the bench harness; one row with the reason where the bench cannot run."""
    result = measure(
        batches=tuple(args.batch), dtype=args.dtype, ckpt=args.ckpt, subnet=args.subnet
    )
    if "skipped" in result:
        return [{"skipped": result["skipped"]}]
    return [{"device": result["device"], "dtype": result["dtype"], **r} for r in result["rows"]]


if __name__ == "__main__":
    from benchmarks.harness import main

    sys.exit(main(["sparse24", *sys.argv[1:]]))
