#!/usr/bin/env python
"""Mutation check: break the trainer and the sparsity code one rule at a time and make
sure the fast tests notice (issue 15).

    .venv/bin/python scripts/mutation_check.py            # all mutations, against HEAD
    .venv/bin/python scripts/mutation_check.py --worktree # against the working tree
    .venv/bin/python scripts/mutation_check.py --list     # patterns only (checks they match)
    .venv/bin/python scripts/mutation_check.py --only gc-output-dropped stagger-sign

Never touches the checkout it is run from: the tracked files of ``--ref`` (default HEAD;
``--worktree``: the working tree's tracked and untracked, non-ignored files) are copied to
a temporary directory, each mutation is an exact source replacement applied to that copy
(and undone after its run), and pytest runs there with ``PYTHONPATH`` set to the copy, so
that ``import dist_ast`` loads the mutated code (checked before anything runs).

Every pattern must occur exactly once in its file, or the script stops before running
anything: when the code changes, the patterns are updated instead of silently skipped.
The unmutated copy must pass the tests first. A mutation is *killed* when pytest fails
(or times out); the table names the first failing test. Exit status 0 when every
mutation is killed, 1 when one survives, 2 on a stale pattern or a failing baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The fast tests the mutations run against (all run in CI; ~35 s on a loaded 2-core box).
# The trainer-level rule tests come first: with -x the first failure names the killer.
FAST_TESTS = [
    "tests/test_rule_wiring.py",
    "tests/test_train_rules.py",
    "tests/test_sparsity_math.py",
    "tests/test_sparsity_layers.py",
    "tests/test_flops.py",
    "tests/test_nm.py",
]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    edits: tuple[tuple[str, str], ...]  # (exact old source, new source), applied in order
    rule: str  # the DESIGN §1 rule it breaks


MUTATIONS = [
    Mutation(
        "flops-refresh-deleted",
        "dist_ast/train.py",
        (
            (
                "            self.flops.refresh(self.model)  # the cost of the next steps\n",
                "            pass\n",
            ),
        ),
        "11: FLOPs stay at the initial densities",
    ),
    Mutation(
        "flops-wrong-subnet",
        "dist_ast/flops.py",
        (
            (
                "        self.total += sum(self._step_cost[k] for k in subnets)\n",
                "        self.total += sum(self._step_cost[0] for k in subnets)\n",
            ),
        ),
        "11: every step charged at sub-net 0's density",
    ),
    Mutation(
        "apply-zeroes-dropped",
        "dist_ast/sparsity/updater.py",
        (
            (
                "            fresh = new & ~old\n",
                "            w.masked_fill_(old & ~new, 0.0)\n            fresh = new & ~old\n",
            ),
        ),
        "1: the shared weight is zeroed where sub-net k drops it",
    ),
    Mutation(
        "fresh-weights-not-zeroed",
        "dist_ast/sparsity/updater.py",
        (("                w.masked_fill_(fresh, 0.0)\n", "                pass\n"),),
        "7: a newly grown connection keeps its stale value",
    ),
    Mutation(
        "fresh-momentum-kept",
        "dist_ast/sparsity/updater.py",
        (("                    optimizer.reset_state(w, fresh)\n", "                    pass\n"),),
        "7: a newly grown connection keeps its stale momentum",
    ),
    Mutation(
        "forward-mask-of-subnet-0",
        "dist_ast/sparsity/layers.py",
        (
            (
                "        return masked_weight(self.weight, self.masks[self.subnet])\n",
                "        return masked_weight(self.weight, self.masks[0])\n",
            ),
        ),
        "1: every sub-net computes with sub-net 0's mask",
    ),
    Mutation(
        "alternation-off-by-one",
        "dist_ast/sparsity/schedule.py",
        (
            (
                "        return step % self.num_subnets\n",
                "        return (step + 1) % self.num_subnets\n",
            ),
        ),
        "2: step t trains sub-net t+1 mod N",
    ),
    Mutation(
        "gradient-not-masked",
        "dist_ast/distributed/ddp.py",
        (
            (
                "            masked = torch._foreach_mul(per_subnet[0],"
                " self.model.masks(subnets[0]))\n",
                "            masked = list(per_subnet[0])\n",
            ),
        ),
        "3/5: the update (and GC's g_prev) is the dense gradient, not gradient ⊙ m_k",
    ),
    Mutation(
        "momentum-on-inactive",
        "dist_ast/sparsity/optim.py",
        (("            torch.where(m, src, dst, out=dst)\n", "            dst.copy_(src)\n"),),
        "3: momentum moves outside m_k",
    ),
    Mutation(
        "update-not-masked",
        "dist_ast/sparsity/optim.py",
        (
            (
                "    if masked:\n        torch._foreach_mul_(",
                "    if False:\n        torch._foreach_mul_(",
            ),
        ),
        "3: weight decay and momentum move weights outside m_k",
    ),
    Mutation(
        "weight-decay-on-batchnorm",
        "dist_ast/sparsity/model.py",
        (
            (
                "            (no_decay if p.ndim <= 1 or is_bn else decay).append(p)\n",
                "            (no_decay if p.ndim <= 1 else decay).append(p)\n",
            ),
        ),
        "3/4: BatchNorm's [N, C] affine rows get weight decay",
    ),
    Mutation(
        "batchnorm-row-of-next-subnet",
        "dist_ast/sparsity/layers.py",
        (
            (
                "        k = self.subnet\n        if self.training:\n",
                "        k = (self.subnet + 1) % self.num_subnets\n        if self.training:\n",
            ),
        ),
        "4: sub-net k normalizes with BatchNorm set k+1",
    ),
    Mutation(
        "batchnorm-update-row-of-next-subnet",
        "dist_ast/sparsity/model.py",
        (
            (
                "                row[k] = True\n",
                "                row[(k + 1) % self.num_subnets] = True\n",
            ),
        ),
        "4: the optimizer moves BatchNorm row k+1",
    ),
    Mutation(
        "regrowth-from-masked-gradient",
        "dist_ast/distributed/ddp.py",
        (
            (
                "        return self.per_subnet[subnets.index(k)]\n",
                "        return [g * m for g, m in zip(self.per_subnet[subnets.index(k)],"
                " self.model.masks(k))]\n",
            ),
        ),
        "5: regrowth ranks ∂L/∂w ⊙ m_k (zero off the mask)",
    ),
    Mutation(
        "regrow-by-weight",
        "dist_ast/sparsity/prune_regrow.py",
        (
            (
                "    grow_scores = dense_grad.detach().abs().float()",
                "    grow_scores = weight.detach().abs().float()",
            ),
        ),
        "5/7: regrowth ranks |w| instead of |dense gradient|",
    ),
    Mutation(
        "linear-ramp",
        "dist_ast/sparsity/schedule.py",
        (
            (
                "    return final + (initial - final) * (1.0 - progress) ** 3\n",
                "    return final + (initial - final) * (1.0 - progress)\n",
            ),
        ),
        "6/10: linear instead of cubic sparsity (and N:M fraction) ramp",
    ),
    Mutation(
        "ramp-target-final-at-once",
        "dist_ast/sparsity/updater.py",
        (
            (
                "        target = self.schedule.target_count(k, step, self.total)\n",
                "        target = self.schedule.target_count(k, self.schedule.ramp_end,"
                " self.total)\n",
            ),
        ),
        "6: every update prunes to s_k at once",
    ),
    Mutation(
        "prune-after-regrow",
        "dist_ast/sparsity/prune_regrow.py",
        (
            (
                "    pruned = global_magnitude_prune(weights, masks, target_count, protect)\n",
                "    pruned = masks\n",
            ),
            (
                "    total = sum(_count(m) for m in new)\n",
                "    new = global_magnitude_prune(weights, new, target_count, protect)\n"
                "    total = sum(_count(m) for m in new)\n",
            ),
        ),
        "7: drop/regrow first, global pruning last",
    ),
    Mutation(
        "regrow-fraction-constant",
        "dist_ast/sparsity/updater.py",
        (
            (
                "        fraction = self.schedule.regrow_fraction(step)\n",
                "        fraction = self.schedule.regrow_initial\n",
            ),
        ),
        "7: r(t) stays r_0 instead of the cosine decay",
    ),
    Mutation(
        "stagger-sign",
        "dist_ast/sparsity/schedule.py",
        (
            (
                "            first = self.ramp_start + k * self.stagger\n",
                "            first = self.ramp_start - k * self.stagger\n",
            ),
        ),
        "8: sub-net k's updates shifted by -k·Δτ",
    ),
    Mutation(
        "gc-output-dropped",
        "dist_ast/distributed/ddp.py",
        (
            (  # GC corrects a copy; the optimizer steps the uncorrected w.grad
                "        return [w.grad for w in self.model.sparse_weights()],"
                " self.model.masks(k)\n",
                "        return [w.grad.clone() for w in self.model.sparse_weights()],"
                " self.model.masks(k)\n",
            ),
        ),
        "9: the optimizer applies g, not the GC output",
    ),
    Mutation(
        "gc-group-start-not-skipped",
        "dist_ast/train.py",
        (
            (
                "        group_start = self.schedule.is_group_start(step)\n",
                "        group_start = False\n",
            ),
        ),
        "9: the first step of an inner group is corrected too",
    ),
    Mutation(
        "gc-prev-before-projection",
        "dist_ast/sparsity/gradient_correction.py",
        (
            (
                "            self._correct(grads, masks, projection_coef(stats), finite)\n",
                "            raw = [g.clone() for g in grads]\n"
                "            self._correct(grads, masks, projection_coef(stats), finite)\n"
                "            self._keep_direction(raw, finite)\n",
            ),
        ),
        "9: g_prev keeps the uncorrected g",
    ),
    Mutation(
        "gc-prev-overwritten-first",
        "dist_ast/sparsity/gradient_correction.py",
        (
            (
                "        stats = conflict_stats(grads, self._prev, masks",
                "        stats = conflict_stats(grads, grads, masks",
            ),
        ),
        "9: the released code's bug: ĝ is g itself, so GC never fires",
    ),
    Mutation(
        "gc-prev-not-masked",
        "dist_ast/sparsity/gradient_correction.py",
        (
            (
                "        stats = conflict_stats(grads, self._prev, masks",
                "        stats = conflict_stats(grads, self._prev,"
                " [torch.ones_like(m) for m in masks]",
            ),
        ),
        "9: ĝ = g_prev instead of g_prev ⊙ m_k",
    ),
    Mutation(
        "nm-fraction-linear",
        "dist_ast/sparsity/updater.py",
        (
            (
                "        s = self.schedule\n        return cubic_sparsity(\n",
                "        s = self.schedule\n"
                "        return min(1.0, max(0.0, (step - s.ramp_start)"
                " / (s.ramp_end - s.ramp_start)))\n"
                "        return cubic_sparsity(\n",
            ),
        ),
        "10: the fraction of N:M groups ramps linearly",
    ),
]


def say(text: str = "") -> None:
    """A line on stdout, flushed (the runs take minutes)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def copy_tree(dest: Path, ref: str | None) -> None:
    """The tracked files of ``ref`` (git archive), or of the working tree (``ref`` None:
    tracked plus untracked files git does not ignore, as they are on disk)."""
    if ref is not None:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    out = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
        check=True,
        capture_output=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check_patterns(root: Path, mutations: list[Mutation]) -> list[str]:
    """Each edit's old text must occur exactly once (after the previous edits)."""
    problems = []
    for mut in mutations:
        text = (root / mut.path).read_text()
        for old, new in mut.edits:
            n = text.count(old)
            if n != 1:
                problems.append(f"{mut.name}: {n} matches in {mut.path} for {old.strip()!r}")
                break
            text = text.replace(old, new)
    return problems


def run_tests(root: Path, tests: list[str], timeout: float, stop_first: bool) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout', first failing test or the output's last line)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    cmd += ["-m", "not slow", *(["-x"] if stop_first else []), *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"> {timeout:.0f} s"
    if proc.returncode == 0:
        return "passed", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    if failed:
        return "failed", ", ".join(dict.fromkeys(f.split(" - ")[0] for f in failed))
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return "failed", tail[-1] if tail else f"exit {proc.returncode}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="HEAD", help="git revision to copy (default HEAD)")
    p.add_argument("--worktree", action="store_true", help="copy the working tree instead")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--list", action="store_true", help="check the patterns and list them")
    p.add_argument("--all-killers", action="store_true", help="no -x: list every failing test")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy")
    p.add_argument("tests", nargs="*", default=FAST_TESTS, help="test files to run")
    a = p.parse_args(argv)

    mutations = MUTATIONS
    if a.only:
        unknown = set(a.only) - {m.name for m in MUTATIONS}
        if unknown:
            p.error(f"unknown mutations: {sorted(unknown)}")
        mutations = [m for m in MUTATIONS if m.name in a.only]
    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"

    root = Path(tempfile.mkdtemp(prefix="mut-"))
    try:
        copy_tree(root, None if a.worktree else a.ref)
        where = "working tree" if a.worktree else a.ref
        problems = check_patterns(root, mutations)
        if problems:
            say(f"stale mutation patterns against {where}:\n  " + "\n  ".join(problems))
            return 2
        if a.list:
            for m in mutations:
                say(f"{m.name:38} {m.path:42} rule {m.rule}")
            return 0
        env = {**os.environ, "PYTHONPATH": str(root)}
        probe = [sys.executable, "-c", "import dist_ast; print(dist_ast.__file__)"]
        origin = subprocess.run(probe, cwd=root, env=env, capture_output=True, text=True)
        if not origin.stdout.strip().startswith(str(root)):
            say(f"import dist_ast does not load the copy: {origin.stdout}{origin.stderr}")
            return 2
        say(f"copy of {where} in {root}; tests: {' '.join(a.tests)}")
        start = time.perf_counter()
        status, detail = run_tests(root, a.tests, a.timeout, stop_first=False)
        base = time.perf_counter() - start
        say(f"baseline: {status} in {base:.0f} s {detail}")
        if status != "passed":
            return 2
        rows = []
        for m in mutations:
            target = root / m.path
            original = target.read_text()
            text = original
            for old, new in m.edits:
                text = text.replace(old, new)
            target.write_text(text)
            try:
                start = time.perf_counter()
                status, detail = run_tests(root, a.tests, a.timeout, not a.all_killers)
                took = time.perf_counter() - start
            finally:
                target.write_text(original)
            verdict = "survived" if status == "passed" else "killed"
            rows.append((m, verdict, detail, took))
            say(f"{m.name:38} {verdict:8} {took:5.0f} s  {detail}")
        say("\n| mutation | file | rule broken | result | killed by | s |")
        say("|---|---|---|---|---|---|")
        for m, verdict, detail, took in rows:
            say(f"| {m.name} | {m.path} | {m.rule} | {verdict} | {detail} | {took:.0f} |")
        survived = [m.name for m, v, _, _ in rows if v == "survived"]
        say(
            f"\n{len(rows) - len(survived)}/{len(rows)} killed"
            + (f"; survived: {survived}" if survived else "")
        )
        return 1 if survived else 0
    finally:
        if a.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
