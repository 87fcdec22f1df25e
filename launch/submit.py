"""Submit a dist_ast training run with submitit: to Slurm, or ``--cluster local`` on this
machine. Preempted or timed-out jobs requeue and resume from the newest checkpoint.

    python launch/submit.py --nodes 4 --gpus-per-node 8 --timeout-min 1440 \\
        --partition gpu -- experiment=r50_imagenet_ast data.root=/data/imagenet-wds
    python launch/submit.py --cluster local --tasks-per-node 2 --wait -- experiment=demo \\
        run_dir=runs/demo_submitit train.device=cpu

Everything after ``--`` is Hydra overrides (as for ``python -m dist_ast.train``). One
task per GPU: submitit starts ``nodes x tasks-per-node`` processes and
``TorchDistributedEnvironment`` gives each the RANK/WORLD_SIZE/MASTER_* that torchrun
would. ``run_dir`` defaults to ``runs/<experiment>-submitit``; keep it stable, since a
requeued job resumes from ``run_dir/checkpoints`` (``checkpoint.resume=auto``).
``--wait`` blocks until the job has finished (requeues included), logs its summary and
exits 0, or 1 with the job's error. On Slurm, ``--cpus-per-task`` is passed to the job's
``srun`` too: since Slurm 22.05 srun no longer inherits it from sbatch.

Preemption: submitit asks Slurm for ``--signal=USR2@<signal_delay_s>`` and installs its
own USR2 handler, which would requeue from rank 0 at once. While training runs, dist_ast's
handler replaces it: every rank sets a flag, the ranks agree at the next step boundary,
save together and leave ``run()`` with ``Preempted``. Only then is submitit's handler put
back and re-raised, so rank 0 calls ``TrainJob.checkpoint`` (the same job: the state is on
disk) and requeues (``scontrol requeue`` on Slurm; exit code 144, which the local
executor reruns, with ``--cluster local``). A SIGTERM preemption is requeued by Slurm
itself; the ranks just save and exit with 75.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import submitit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python launch/submit.py` from a clone
    sys.path.insert(0, str(REPO))

log = logging.getLogger("dist_ast.launch")


class TrainJob(submitit.helpers.Checkpointable):
    """The job submitit pickles: Hydra overrides in, the run's summary dict out."""

    def __init__(self, overrides: list[str]) -> None:
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from dist_ast.cli import compose_config
        from dist_ast.preemption import REQUEUE_EXIT_CODE, Preempted
        from dist_ast.train import run

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # overwrite: a MASTER_ADDR/RANK left in the submitting shell's environment
            # (a torchrun or an earlier job) is stale here; submitit's values are the job's.
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
        logging.basicConfig(level=logging.INFO)
        config = compose_config(self.overrides)
        try:
            return run(config)
        except Preempted as p:
            if p.signum is not None and p.signum != signal.SIGTERM:
                # submitit's handler is back in place: rank 0 checkpoints and requeues
                # (and exits); the other ranks fall through and exit below.
                signal.raise_signal(env._usr_sig())
            raise SystemExit(REQUEUE_EXIT_CODE) from None

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Requeue the same job: it resumes from the checkpoint the ranks just wrote."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides))


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    """The submitit executor for ``--cluster``: Slurm (sbatch + srun) or this machine."""
    folder = Path(args.log_dir)
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster)
    params = dict(
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node or max(1, args.gpus_per_node),
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout_min,
        name=args.name,
    )
    if args.cluster == "slurm":
        params["slurm_signal_delay_s"] = args.signal_delay_s
        # srun does not inherit sbatch's --cpus-per-task since Slurm 22.05: without this,
        # each task (one per GPU) would be confined to one CPU for its data loading.
        params["slurm_srun_args"] = [f"--cpus-per-task={args.cpus_per_task}"]
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.account:
            params["slurm_account"] = args.account
    else:  # one machine: no node count, no CPU reservation
        params.pop("nodes")
        params.pop("cpus_per_task")
    executor.update_parameters(**params)
    return executor


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Our options before ``--``, Hydra overrides after it (``run_dir`` added if missing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--timeout-min", type=int, default=24 * 60)
    p.add_argument("--signal-delay-s", type=int, default=300, help="USR2 this long before")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--name", default="dist_ast")
    p.add_argument("--log-dir", default="runs/submitit/%j")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job (and its requeues) to end; log its summary, exit 1 if it failed",
    )
    args = p.parse_args(argv)
    if args.cluster == "local" and args.tasks_per_node is None:
        args.tasks_per_node = 1
    if not any(o.startswith("run_dir=") for o in overrides):
        exps = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
        overrides.append(f"run_dir=runs/{(exps or ['default'])[-1]}-submitit")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """Submit; with ``--wait``, the exit code says whether the job succeeded."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args, overrides = parse(argv)
    job = build_executor(args).submit(TrainJob(overrides))
    logs = args.log_dir.replace("%j", str(job.job_id))
    log.info("submitted job %s (logs: %s)", job.job_id, logs)
    if args.wait:
        try:
            summary = job.results()[0]  # one per task (result() refuses several); rank 0's
        except submitit.core.utils.UncompletedJobError as e:
            log.error("job %s failed (logs: %s): %s", job.job_id, logs, e)
            return 1
        top1 = [None if s.get("top1") is None else round(s["top1"], 4) for s in summary["subnets"]]
        log.info("finished: %d steps, top-1 per sub-net %s", summary["steps"], top1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
