"""Plots of a run, from its files: ``python -m dist_ast.report RUN_DIR [out=DIR] [ckpt=PATH]``.

Reads ``metrics.jsonl``, ``config.json`` and the final masks (``model.pt`` or a
checkpoint, see dist_ast.subnets_io) and writes PNGs to ``RUN_DIR/report/``:
``accuracy.png`` (top-1 solid, top-5 dashed, per sub-net), ``sparsity.png`` (global,
targets dotted), ``layer_sparsity.png`` (final, per layer), ``overlap.png`` (per layer,
the XOR non-overlap of each pair of sub-nets' masks beside their sparsity gap: the
paper's Fig. 6), ``gc.png`` (fraction of checked steps whose gradient conflicted and
was corrected, cumulative and per interval: Fig. 4) and ``lr_loss.png``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from dist_ast.subnets_io import load_model_state

log = logging.getLogger(__name__)


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    steps, evals = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        (evals if "eval" in r else steps).append(r)
    return steps, evals


def final_masks(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """{layer: bool masks [N, *weight.shape]} of a checkpoint, in module order."""
    _, state = load_model_state(ckpt)
    out = {}
    for key, t in state.items():
        if key.endswith(".masks"):
            name = key[: -len(".masks")]
            out[name[len("net.") :] if name.startswith("net.") else name] = t.bool()
    return out


def xor_non_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where exactly one of two masks is live (paper Fig. 6)."""
    return float((a ^ b).float().mean())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # noqa: ANN001 - matplotlib Figure
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_accuracy(evals: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    n = len(evals[0]["eval"]) if evals else 0
    for i in range(n):
        k = evals[0]["eval"][i]["index"]
        steps = [e["step"] for e in evals]
        (line,) = ax.plot(steps, [100 * e["eval"][i]["top1"] for e in evals], "o-", ms=3)
        ax.plot(steps, [100 * e["eval"][i]["top5"] for e in evals], "--", color=line.get_color())
        line.set_label(f"sub-net {k}")
    ax.set(xlabel="step", ylabel="accuracy (%)", title="validation top-1 (solid), top-5 (dashed)")
    ax.grid(alpha=0.3)
    if n:
        ax.legend()
    return _save(fig, path)


def plot_sparsity(steps: list[dict], targets: list[float], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    recs = [r for r in steps if "sparsity" in r]
    for k in range(len(targets)):
        (line,) = ax.plot(
            [r["step"] for r in recs], [r["sparsity"][k] for r in recs], label=f"sub-net {k}"
        )
        ax.axhline(targets[k], ls=":", color=line.get_color())
    ax.set(xlabel="step", ylabel="sparsity", title="global sparsity (targets dotted)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_layer_sparsity(masks: dict[str, torch.Tensor], path: Path) -> Path:
    plt = _plt()
    names = list(masks)
    n = next(iter(masks.values())).shape[0]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(names) * n / 2), 4))
    width = 0.8 / n
    for k in range(n):
        values = [1.0 - float(masks[name][k].float().mean()) for name in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=f"sub-net {k}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set(ylabel="sparsity", title="layer-wise sparsity of the final masks")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_overlap(masks: dict[str, torch.Tensor], path: Path) -> Path:
    plt = _plt()
    names = list(masks)
    n = next(iter(masks.values())).shape[0]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.3 * len(names)), 4))
    x = range(len(names))
    for i in range(n):
        for j in range(i + 1, n):
            xor = [xor_non_overlap(masks[m][i], masks[m][j]) for m in names]
            gap = [
                abs(float(masks[m][i].float().mean()) - float(masks[m][j].float().mean()))
                for m in names
            ]
            (line,) = ax.plot(x, xor, "o-", ms=3, label=f"{i} vs {j}: XOR non-overlap")
            ax.plot(x, gap, "--", color=line.get_color(), label=f"{i} vs {j}: sparsity gap")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set(ylabel="fraction of the layer", title="mask non-overlap between sub-nets (Fig. 6)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_gc(steps: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    recs = [r for r in steps if r.get("gc_checked")]
    xs = [r["step"] for r in recs]
    ax.plot(xs, [r["gc_conflicts"] / r["gc_checked"] for r in recs], label="cumulative")
    interval_x, interval_y = [], []
    for a, b in zip(recs, recs[1:], strict=False):
        checked = b["gc_checked"] - a["gc_checked"]
        if checked > 0:
            interval_x.append(b["step"])
            interval_y.append((b["gc_conflicts"] - a["gc_conflicts"]) / checked)
    ax.plot(interval_x, interval_y, ".", alpha=0.5, label="per logging interval")
    ax.set(
        xlabel="step",
        ylabel="fraction of checked steps",
        title="conflicting gradients corrected by GC (Fig. 4)",
    )
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lr_loss(steps: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    subnets = sorted({r["subnet"] for r in steps if r.get("subnet") is not None})
    for k in subnets:
        recs = [r for r in steps if r.get("subnet") == k]
        ax1.plot([r["step"] for r in recs], [r["loss"] for r in recs], ".-", ms=2, label=f"{k}")
    joint = [r for r in steps if r.get("subnet") is None and "loss" in r]
    if joint:
        ax1.plot([r["step"] for r in joint], [r["loss"] for r in joint], ".-", ms=2, label="all")
    ax1.set(xlabel="step", ylabel="loss", title="training loss by sub-net")
    ax1.grid(alpha=0.3)
    ax1.legend(title="sub-net", fontsize=8)
    ax2.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax2.grid(alpha=0.3)
    return _save(fig, path)


def write_report(
    run_dir: str | Path, out: str | Path | None = None, ckpt: str | Path | None = None
) -> list[Path]:
    """Write every plot the run's files allow; returns their paths."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps, evals = read_metrics(run_dir)
    config_file = run_dir / "config.json"
    targets = (
        json.loads(config_file.read_text())["ast"]["sparsities"] if config_file.is_file() else []
    )
    if not targets and steps and "sparsity" in steps[0]:
        targets = [float("nan")] * len(steps[0]["sparsity"])
    written = []
    if evals:
        written.append(plot_accuracy(evals, out / "accuracy.png"))
    if steps:
        written.append(plot_sparsity(steps, targets, out / "sparsity.png"))
        written.append(plot_lr_loss(steps, out / "lr_loss.png"))
        if any(r.get("gc_checked") for r in steps):
            written.append(plot_gc(steps, out / "gc.png"))
    try:
        masks = final_masks(ckpt if ckpt is not None else run_dir)
    except FileNotFoundError as e:
        log.warning("no masks, skipping the layer-wise plots: %s", e)
        masks = {}
    if masks:
        written.append(plot_layer_sparsity(masks, out / "layer_sparsity.png"))
        if next(iter(masks.values())).shape[0] > 1:
            written.append(plot_overlap(masks, out / "overlap.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    """``python -m dist_ast.report RUN_DIR [out=DIR] [ckpt=PATH]``."""
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(positional) != 1 or set(options) - {"out", "ckpt"} or positional[0].startswith("-"):
        raise SystemExit("usage: python -m dist_ast.report RUN_DIR [out=DIR] [ckpt=PATH]")
    if not (Path(positional[0]) / "metrics.jsonl").is_file():
        raise SystemExit(
            f"{positional[0]} has no metrics.jsonl: pass the run_dir of a dist_ast.train run"
        )
    written = write_report(positional[0], options.get("out"), options.get("ckpt"))
    console = Console()
    for p in written:
        console.print(f"wrote {p}")
    return written


def cli() -> None:
    """Console-script entry point (`dist-ast-report`): exit status 0 on success."""
    main()


if __name__ == "__main__":
    main()
