"""Every collective of a real 2-rank run sends tensors that the group of a CUDA run can
carry.

gloo on CPU forgives what NCCL does not: a CPU tensor sent to a group whose only backend
is NCCL fails on a cluster ("No backend type associated with device type cpu"), and no
gloo test notices. Here a 2-rank gloo run of the trainer (mask updates with the rank-0
broadcast and the checksum gather, BatchNorm averaging, async and blocking checkpoints,
evaluation, the preemption agreement at every step boundary) goes through spies on every
``torch.distributed`` collective. Each call records its tensors' device types and the
group; the test then asks, for each call, which backend string a CUDA run gives that
group (the default group: :func:`process_group_backend` for a CUDA device; a
``new_group(backend=...)``: that backend) and whether it serves those device types.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from dist_ast.distributed.setup import free_port, process_group_backend

CUDA = torch.device("cuda", 0)
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "reduce",
    "send",
    "recv",
    "isend",
    "irecv",
)
OVERRIDES = [
    "experiment=demo",
    "model.width=8",
    "train.batch_size=32",
    "train.max_steps=30",
    "train.progress=false",
    "train.tensorboard=false",
    "train.eval_every=15",
    "ast.ramp_end_epoch=0.3",
    "ast.update_every=9",
    "ast.stagger=3",
    "checkpoint.every_steps=10",
    "checkpoint.async_save=true",
]


def served_device_types(backend: str) -> set[str]:
    """Device types a backend string serves: "cpu:gloo,cuda:nccl" -> {cpu, cuda}."""
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu"}}[backend]


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def install_spies(calls: list[dict]) -> None:
    """Wrap torch.distributed's collectives and new_group in this process."""
    import torch.distributed as dist

    group_backends: dict[int, str | None] = {}
    new_group = dist.new_group

    def spy_new_group(*args, **kwargs):
        group = new_group(*args, **kwargs)
        bound = inspect.signature(new_group).bind(*args, **kwargs)
        group_backends[id(group)] = bound.arguments.get("backend")
        return group

    dist.new_group = spy_new_group

    def wrap(name: str):
        original = getattr(dist, name)
        signature = inspect.signature(original)

        def spy(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group")
            devices = sorted(
                {
                    t.device.type
                    for key, v in bound.arguments.items()
                    if key != "group"
                    for t in _tensors(v)
                }
            )
            default = group is None or group is dist.group.WORLD
            calls.append(
                {
                    "op": name,
                    "devices": devices,
                    # None: the default group, or a subgroup created with its backend
                    "group_backend": None if default else group_backends.get(id(group), "?"),
                }
            )
            return original(*args, **kwargs)

        setattr(dist, name, spy)

    for name in COLLECTIVES:
        if hasattr(dist, name):
            wrap(name)


def _worker(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    calls: list[dict] = []
    install_spies(calls)
    from dist_ast.cli import compose_config
    from dist_ast.train import run

    run(compose_config([*OVERRIDES, f"run_dir={run_dir}", "train.device=cpu"]))
    Path(out, f"calls{rank}.json").write_text(json.dumps(calls))


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("spy")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, port, str(tmp / "run"), str(tmp))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(400)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "the 2-rank run hung"
    assert [p.exitcode for p in procs] == [0, 0]
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 30
    return [c for r in range(2) for c in json.loads((tmp / f"calls{r}.json").read_text())]


def cuda_backend(call: dict) -> str:
    """The backend string a CUDA run gives the call's group."""
    return call["group_backend"] or process_group_backend(CUDA)


def device_problems(calls: list[dict], cuda_default: str) -> list[str]:
    problems = []
    for c in calls:
        backend = c["group_backend"] or cuda_default
        missing = set(c["devices"]) - served_device_types(backend)
        if missing:
            problems.append(f"{c['op']} sends {sorted(missing)} tensors to a {backend!r} group")
    return sorted(set(problems))


@pytest.mark.slow
def test_every_collective_has_a_backend_for_its_tensors_on_cuda(calls: list[dict]) -> None:
    ops = {c["op"] for c in calls}
    # The run went through every kind of collective the trainer uses.
    assert {"all_reduce", "broadcast", "all_gather"} <= ops, ops
    assert device_problems(calls, process_group_backend(CUDA)) == []


@pytest.mark.slow
def test_a_plain_nccl_default_group_would_fail_on_the_mask_checksum(calls: list[dict]) -> None:
    """The check is live: with the "nccl" default of old, it names the CPU gathers."""
    problems = device_problems(calls, "nccl")
    assert any(p.startswith("all_gather sends ['cpu']") for p in problems), problems


def test_backend_strings_and_the_device_types_they_serve() -> None:
    assert served_device_types(process_group_backend(CUDA)) == {"cpu", "cuda"}
    assert served_device_types(process_group_backend(torch.device("cpu"))) == {"cpu"}
    assert served_device_types("nccl") == {"cuda"}
    bad = {"op": "all_reduce", "devices": ["cpu"], "group_backend": "nccl"}
    good = {"op": "all_reduce", "devices": ["cuda"], "group_backend": None}
    assert device_problems([bad, good], "cpu:gloo,cuda:nccl") == [
        "all_reduce sends ['cpu'] tensors to a 'nccl' group"
    ]
    assert cuda_backend(good) == "cpu:gloo,cuda:nccl"
