"""Distributed plumbing without a process group: launcher detection, Slurm node lists,
bit-packed masks, checksums, the DeepSpeed config built from ours, hook planning."""

from __future__ import annotations

import pytest
import torch

from dist_ast.cli import compose_config
from dist_ast.distributed.mask_sync import mask_checksum, pack_bits, unpack_bits
from dist_ast.distributed.setup import (
    detect_launch,
    expand_nodelist,
    export_launch,
    slurm_head_node,
    slurm_port,
)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
        ("a[1-2],b5,c[09-10]", ["a1", "a2", "b5", "c09", "c10"]),
        ("rack1-n[8-9]-ib", ["rack1-n8-ib", "rack1-n9-ib"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_slurm_head_node_without_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert slurm_head_node("gpu[12-15]") == "gpu12"


def test_detect_torchrun_wins_over_slurm() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "29500",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "x[1-2]",
    }
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "torchrun",
        3,
        8,
        1,
    )
    assert (launch.master_addr, launch.master_port) == ("h", 29500)


def test_detect_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    launch = detect_launch(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == (
        "slurm",
        5,
        8,
        1,
    )
    assert launch.master_addr == "gpu03"
    assert launch.master_port == slurm_port(123456) == 20000 + 123456 % 20000
    out: dict[str, str] = {}
    export_launch(launch, out)
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu03",
        "MASTER_PORT": str(slurm_port(123456)),
    }


def test_detect_single_task_slurm_and_no_launcher() -> None:
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1
    # The batch shell of a multi-task job (no srun step) is one process.
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1
    launch = detect_launch({})
    assert (launch.launcher, launch.world_size) == ("none", 1)


def test_detect_submitit(monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit.helpers

    class FakeEnv:
        rank, world_size, local_rank = 2, 4, 0
        master_addr, master_port = "head", 31000

    monkeypatch.setattr(submitit.helpers, "TorchDistributedEnvironment", FakeEnv)
    launch = detect_launch({"SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "2"})
    assert (launch.launcher, launch.rank, launch.world_size) == ("submitit", 2, 4)
    assert (launch.master_addr, launch.master_port) == ("head", 31000)


def test_bit_packing_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(3, 5, generator=g) < 0.3, torch.rand(7, generator=g) < 0.9]
    packed = pack_bits(masks)
    assert packed.dtype == torch.uint8 and packed.numel() == (15 + 7 + 7) // 8
    back = unpack_bits(packed, masks)
    assert all(torch.equal(a, b) for a, b in zip(masks, back, strict=True))


def test_checksum_sees_one_moved_weight() -> None:
    m = torch.zeros(1000, dtype=torch.bool)
    m[torch.arange(0, 1000, 7)] = True
    moved = m.clone()
    moved[7], moved[8] = False, True  # same count, one position moved
    assert mask_checksum(m)[0] == mask_checksum(moved)[0]
    assert mask_checksum(m) != mask_checksum(moved)
    assert mask_checksum(m) == mask_checksum(m.clone())


def test_deepspeed_config_from_ours() -> None:
    from dist_ast.distributed.deepspeed_engine import deepspeed_config

    cfg = compose_config(
        ["engine=deepspeed", "engine.zero_stage=1", "train.precision=bf16", "train.batch_size=64"]
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_allow_untested_optimizer"] is True
    assert compose_config(["engine=deepspeed"]).engine.zero_stage == 2


def test_hook_plan_falls_back_to_dense_above_threshold() -> None:
    from dist_ast.distributed.comm_hook import MaskedAllReduceState
    from dist_ast.sparsity.model import convert_to_subnets

    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))
    model = convert_to_subnets(net, 2)
    m0 = [torch.rand(w.shape) < 0.2 for w in model.sparse_weights()]
    model.set_masks(0, m0)
    state = MaskedAllReduceState(model, max_density=0.6)
    params = list(model.parameters())
    buf = torch.zeros(sum(p.numel() for p in params))
    plan = state.plan(0, buf, params, 0)
    assert plan.compact
    biases = sum(p.numel() for p in params if p.ndim == 1)
    assert plan.active == sum(int(m.sum()) for m in m0) + biases
    assert not state.plan(0, buf, params, 1).compact  # sub-net 1 is dense: plain all-reduce
    # Cached until the masks change; rebuilt after.
    assert state.plan(0, buf, params, 0) is plan
    model.set_masks(0, [torch.ones_like(m) for m in m0])
    state.masks_changed(0)
    assert not state.plan(0, buf, params, 0).compact
    # A checkpoint load writes the mask buffers in place: seen without masks_changed().
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state_dict:
        if k.endswith("masks"):
            state_dict[k][0] = torch.rand(state_dict[k][0].shape) < 0.2
    model.load_state_dict(state_dict)
    new = sum(int(v[0].sum()) for k, v in state_dict.items() if k.endswith("masks"))
    assert state.plan(0, buf, params, 0).active == new + biases


@pytest.mark.slow
@pytest.mark.distributed
def test_comm_bench_rows_bytes_follow_density() -> None:
    """The benchmark's own run (2 gloo processes, ResNet-20 buckets): it checks the compact
    result against a dense all-reduce then masking, and sends density's share of bytes
    plus the always-dense entries (first conv, BatchNorm, biases: < 1% of the total)."""
    from benchmarks import comm, harness

    options = ["--model", "resnet20", "--densities", "0.1", "0.5", "--repeats", "1"]
    rows = comm.run(harness.parse_args(comm, options))
    assert [r["density"] for r in rows] == [0.1, 0.5]
    for r in rows:
        assert r["bytes_default"] == r["elements"] * 4
        assert r["density"] <= r["bytes_ratio"] < r["density"] + 0.01
        assert r["time_default_ms"] > 0 and r["time_masked_ms"] > 0


# -- process-group backend, GPUs per node, DeepSpeed's group (issue 11 item 4/5) -----------
def test_process_group_backend_gives_cpu_tensors_a_backend_on_cuda() -> None:
    from torch.distributed.distributed_c10d import BackendConfig

    from dist_ast.distributed.setup import process_group_backend

    cuda = process_group_backend(torch.device("cuda", 3))
    assert cuda == "cpu:gloo,cuda:nccl"
    assert BackendConfig(cuda).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize(
    ("local_rank", "local_world", "count", "want"),
    [(0, 1, 1, 0), (3, 4, 4, 3), (1, 2, 8, 1), (0, None, 1, 0), (1, None, 2, 1)],
)
def test_cuda_device_index_one_process_per_gpu(
    local_rank: int, local_world: int | None, count: int, want: int
) -> None:
    from dist_ast.distributed.setup import cuda_device_index

    assert cuda_device_index(local_rank, local_world, count) == want


@pytest.mark.parametrize(
    ("local_rank", "local_world", "count"), [(0, 2, 1), (0, 8, 4), (1, None, 1), (3, None, 2)]
)
def test_more_processes_than_gpus_is_a_config_error(
    local_rank: int, local_world: int | None, count: int
) -> None:
    from dist_ast.config import ConfigError
    from dist_ast.distributed.setup import cuda_device_index

    with pytest.raises(ConfigError, match=f"only {count} visible GPU") as e:
        cuda_device_index(local_rank, local_world, count)
    assert "\n" not in str(e.value)


def test_cuda_device_index_no_gpu_and_per_task_binding() -> None:
    from dist_ast.config import ConfigError
    from dist_ast.distributed.setup import cuda_device_index

    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        cuda_device_index(0, 1, 0)
    # srun --gpus-per-task=1: each task sees only its own GPU, as device 0
    assert cuda_device_index(5, 8, 1, gpus_bound_per_task=True) == 0


@pytest.mark.parametrize(
    ("spec", "node", "n"), [("4", 0, 4), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("8(x2)", 1, 8)]
)
def test_slurm_tasks_on_node(spec: str, node: int, n: int) -> None:
    from dist_ast.distributed.setup import slurm_tasks_on_node

    assert slurm_tasks_on_node(spec, node) == n


def test_detect_slurm_step_nodelist_and_tasks_per_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    env = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_ID": "1",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[01-08]",  # the job has 8 nodes, this step runs on 2
        "SLURM_STEP_NODELIST": "gpu[05-06]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_ID": "7",
    }
    launch = detect_launch(env)
    assert (launch.master_addr, launch.local_world_size) == ("gpu05", 2)
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"] = "3", "4", "2"
    assert detect_launch(env).local_world_size == 2  # torchrun's variable


def test_init_distributed_on_cuda_uses_nccl_with_gloo_and_checks_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No GPU needed: CUDA calls and the group creation are replaced by spies."""
    import torch.distributed as dist

    from dist_ast.config import ConfigError
    from dist_ast.distributed import setup

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(dist, "get_backend", lambda: calls[-1])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(f"set_device {i}"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for k, v in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    info = setup.init_distributed("cuda")
    assert info.device == torch.device("cuda", 1)
    assert calls == ["set_device 1", "cpu:gloo,cuda:nccl"]
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # 2 ranks, 1 GPU
    with pytest.raises(ConfigError, match="2 processes on this node but only 1 visible GPU"):
        setup.init_distributed("cuda")
    calls.clear()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert setup.init_distributed("cpu").device == torch.device("cpu")
    assert calls == ["gloo"] and torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize(("device", "backend"), [("cuda", "cpu:gloo,cuda:nccl"), ("cpu", "gloo")])
def test_deepspeed_single_process_group_backend(
    monkeypatch: pytest.MonkeyPatch, device: str, backend: str
) -> None:
    """engine=deepspeed on one GPU: ZeRO's CUDA collectives get NCCL, not a gloo group."""
    import torch.distributed as dist

    from dist_ast.distributed import deepspeed_engine

    got: list[tuple] = []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: got.append((a, kw)))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    deepspeed_engine._init_single_process_group(torch.device(device))
    assert got == [((backend,), {"rank": 0, "world_size": 1})]
