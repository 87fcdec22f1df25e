"""Process-group setup from the launcher's environment: NCCL with gloo beside it on CUDA,
gloo alone on CPU, world size 1 with no launcher at all.

Launchers, in this order of precedence: ``torchrun`` (``RANK``/``WORLD_SIZE``/... are
used as they are); submitit (``SUBMITIT_EXECUTOR``: its ``TorchDistributedEnvironment``);
Slurm inside an srun step (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``;
the head node is the first host of the step's node list and the port comes from
``SLURM_JOB_ID``, so every task computes the same rendezvous without talking to others).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ast.config import ConfigError

log = logging.getLogger(__name__)

SLURM_PORT_BASE = 20000  # MASTER_PORT = base + job id mod span, when none is given
SLURM_PORT_SPAN = 20000
LEAVE_TIMEOUT_S = 120  # how long a finished rank waits for the others at the end (gloo)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a one-machine rendezvous (benches, tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: where it sits and where to meet the others."""

    launcher: str  # torchrun | submitit | slurm | none
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None
    local_world_size: int | None = None  # processes on this node, when the launcher says


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list → host names, e.g. ``gpu[01-03,7],cpu1`` →
    ``[gpu01, gpu02, gpu03, gpu7, cpu1]`` (zero padding kept, as ``scontrol show
    hostnames`` does). Used when ``scontrol`` is not on the PATH."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", nodelist):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def slurm_head_node(nodelist: str) -> str:
    """The first host of ``SLURM_JOB_NODELIST``: ``scontrol show hostnames`` when Slurm's
    client is installed (it knows every syntax), our parser otherwise."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError) as e:
            log.warning("scontrol show hostnames failed (%s); parsing the node list", e)
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise RuntimeError(f"cannot find a head node in SLURM_JOB_NODELIST={nodelist!r}")
    return hosts[0]


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's ``SLURM_STEP_TASKS_PER_NODE`` syntax, e.g.
    ``"2(x3),1"`` = 2 tasks on nodes 0-2 and 1 on node 3."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse Slurm tasks per node {tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise ValueError(f"node {node_id} not in Slurm tasks per node {tasks_per_node!r}")
    return counts[node_id]


def slurm_port(job_id: str | int) -> int:
    """Same port on every task of a job; different jobs on one node rarely collide."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's variables (no side effects)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        local = env.get("LOCAL_WORLD_SIZE")
        return LaunchEnv(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", "0")),
            env.get("MASTER_ADDR"),
            int(port) if port else None,
            int(local) if local else None,
        )
    if env.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        t = TorchDistributedEnvironment()
        return LaunchEnv(
            "submitit",
            t.rank,
            t.world_size,
            t.local_rank,
            t.master_addr,
            t.master_port,
            getattr(t, "local_world_size", None),  # newer submitit only
        )
    # Only inside an srun step (SLURM_STEP_ID set): the batch shell of an --ntasks=8 job
    # also has SLURM_NTASKS=8, but a plain `python` there is one process, not eight.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and tasks > 1:
        port = env.get("MASTER_PORT")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE"))
        nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
        return LaunchEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            tasks,
            int(env.get("SLURM_LOCALID", "0")),
            env.get("MASTER_ADDR") or slurm_head_node(nodelist),
            int(port) if port else slurm_port(env.get("SLURM_JOB_ID", "0")),
            slurm_tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))) if per_node else None,
        )
    return LaunchEnv("none", 0, 1, 0)


def export_launch(launch: LaunchEnv, env: MutableMapping[str, str] | None = None) -> None:
    """Write the variables ``init_process_group(init_method='env://')`` reads."""
    env = os.environ if env is None else env
    env["RANK"] = str(launch.rank)
    env["WORLD_SIZE"] = str(launch.world_size)
    env["LOCAL_RANK"] = str(launch.local_rank)
    if launch.master_addr is not None:
        env["MASTER_ADDR"] = launch.master_addr
    if launch.master_port is not None:
        env["MASTER_PORT"] = str(launch.master_port)


def process_group_backend(device: torch.device) -> str:
    """The default group's backend: CUDA runs still send a few CPU tensors (mask
    checksums, the preemption flag, DCP's planning), which a plain NCCL group fails on."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def cuda_device_index(
    local_rank: int,
    local_world_size: int | None,
    device_count: int,
    gpus_bound_per_task: bool = False,
) -> int:
    """The GPU this process uses: its local rank (device 0 when ``srun --gpus-per-task``
    bound GPUs per task). Two ranks sharing a GPU would fail later and obscurely in NCCL,
    so more processes than visible GPUs is a ``ConfigError`` at start."""
    if device_count < 1:
        raise ConfigError(
            "invalid train.device=cuda: no CUDA device is visible to this process "
            "(check CUDA_VISIBLE_DEVICES and the job's GPU request, or use train.device=cpu)"
        )
    if gpus_bound_per_task:
        return 0
    procs = local_world_size if local_world_size is not None else local_rank + 1
    if procs > device_count or local_rank >= device_count:
        raise ConfigError(
            f"invalid launch: {max(procs, local_rank + 1)} processes on this node but only "
            f"{device_count} visible GPU(s); start one process per GPU "
            "(torchrun --nproc_per_node, GPUS_PER_NODE, submit.py --tasks-per-node)"
        )
    return local_rank


def init_distributed(device: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group the launcher describes. On CUDA also ``cudnn.benchmark``:
    training shapes are fixed, so the algorithm search runs once per shape."""
    launch = detect_launch()
    if launch.world_size > 1:
        export_launch(launch)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    if use_cuda:
        local_rank = cuda_device_index(
            local_rank,
            launch.local_world_size,
            torch.cuda.device_count(),
            gpus_bound_per_task=bool(os.environ.get("SLURM_GPUS_PER_TASK"))
            and launch.launcher == "slurm",
        )
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A collective that waits longer than this for a rank fails on the others
        # (dist_ast.errors: PeerLostError, exit 6) instead of hanging the job.
        dist.init_process_group(
            backend=process_group_backend(dev),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        log.info(
            "rank %d/%d joined (%s, launched by %s)",
            rank,
            world_size,
            dist.get_backend(),
            launch.launcher,
        )
    return DistInfo(rank, world_size, local_rank, dev)


def destroy_distributed(synchronize: bool = False) -> None:
    """Leave the process group; with ``synchronize`` (the success path) first meet every
    rank. Without it rank 0 (which serves the rendezvous store) can close while a peer is
    finishing, and a DDP reducer freed only in interpreter teardown can abort a finished
    process ("terminate called without an active exception"): so a bounded barrier, gc
    while Python is alive, then destroy. After an error a barrier would hang."""
    if not dist.is_initialized():
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=LEAVE_TIMEOUT_S))
            else:
                dist.barrier()
        except RuntimeError as e:  # a peer failed after its last collective: not ours to raise
            log.warning("ranks did not all reach the end together (%s); leaving anyway", e)
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


@contextlib.contextmanager
def leave_together(agreed: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Destroy the process group when the block ends: after all ranks meet if it ended
    normally or with an exception every rank raises at the same point (``agreed``, e.g.
    preemption); at once after any other error, since the other ranks may never arrive."""
    together = False
    try:
        yield
        together = True
    except agreed:
        together = True
        raise
    finally:
        destroy_distributed(synchronize=together)
