#!/bin/bash
# AST ResNet-50 on ImageNet (experiment=r50_imagenet_ast) on N nodes x G GPUs, preemptible.
#
#   sbatch slurm/r50_ast.sh                                   # 4 nodes x 8 GPUs, as below
#   sbatch --nodes=2 slurm/r50_ast.sh data.root=/data/imagenet-wds train.batch_size=512
#   DATA=/data/imagenet-wds RUN_DIR=runs/r50-a sbatch --nodes=8 slurm/r50_ast.sh
#   EXPERIMENT=wrn32_cifar_ast sbatch --nodes=1 --gpus-per-node=4 slurm/r50_ast.sh
#
# Shape: one task per node; each runs torchrun with G workers (one per GPU), which meet
# through c10d rendezvous on the first node of the step (rdzv id = job id). srun gets the
# allocation's CPUs per task (SRUN_CPUS_PER_TASK, else SLURM_CPUS_PER_TASK): since Slurm
# 22.05 srun no longer inherits #SBATCH --cpus-per-task, and would pin each task to 1 CPU.
# Arguments are Hydra overrides, passed through after the config name; sbatch options
# (--nodes, --gpus-per-node, --time, --partition, --account …) override the #SBATCH lines.
#
# Environment (all optional):
#   EXPERIMENT     experiment config                  (r50_imagenet_ast)
#   RUN_DIR        run folder; keep it to resume       (runs/$EXPERIMENT-$SLURM_JOB_ID)
#   DATA           sets data.root (ImageNet shards)    (from the config)
#   GPUS_PER_NODE  workers per node                    (GPUs allocated on the node, else 1)
#   DEVICE         train.device: auto | cuda | cpu     (auto)
#   PYTHON         interpreter                         (.venv/bin/python if present, else python3)
#   RDZV_PORT      rendezvous port on the head node    (29500 + job id % 1000)
#   SAVE_TIMEOUT   seconds the workers get to save after a signal before SIGKILL (120)
#
# Preemption and resume: --signal=B:USR1@300 warns this script 5 minutes before the time
# limit; it passes the signal to every worker (srun -> torchrun -> workers), the workers
# agree at the next step boundary, save a checkpoint and exit (code 75), and the script
# requeues the job (--requeue). Slurm's own preemption or `scontrol requeue` sends SIGTERM:
# the workers save the same way and Slurm requeues. The requeued job runs this script
# again with the same RUN_DIR (the job id does not change) and training resumes from the
# newest complete checkpoint, run_dir/checkpoints/step-<N> (checkpoint.resume=auto).
# --open-mode=append keeps every run's output in one log.
#
# The local CPU Slurm (scripts/slurm-local.sh) runs it with the demo:
#   EXPERIMENT=demo GPUS_PER_NODE=2 DEVICE=cpu sbatch --nodes=1 --gpus-per-node=0 \
#     --cpus-per-task=2 --time=10 slurm/r50_ast.sh train.max_steps=100
#
#SBATCH --job-name=r50_ast
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

EXPERIMENT=${EXPERIMENT:-r50_imagenet_ast}
RUN_DIR=${RUN_DIR:-runs/${EXPERIMENT}-${SLURM_JOB_ID:-local}}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-}
  [[ -n $GPUS_PER_NODE && $GPUS_PER_NODE != 0 ]] || GPUS_PER_NODE=1
fi
NNODES=${SLURM_JOB_NUM_NODES:-1}
RDZV_PORT=${RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
CPUS=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
SAVE_TIMEOUT=${SAVE_TIMEOUT:-120}

OVERRIDES=("experiment=$EXPERIMENT" "run_dir=$RUN_DIR")
[[ -n ${DATA:-} ]] && OVERRIDES+=("data.root=$DATA")
[[ -n ${DEVICE:-} ]] && OVERRIDES+=("train.device=$DEVICE")
OVERRIDES+=("$@")

echo "[r50_ast] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${NNODES} node(s) x" \
  "${GPUS_PER_NODE} worker(s), ${CPUS:-default} CPU(s) per node task, rendezvous port" \
  "${RDZV_PORT}, run_dir ${RUN_DIR}"

REQUEUE=0
STEP_PID=
forward() {  # $1 = signal: hand it to the workers (srun forwards it to its tasks)
  echo "[r50_ast] caught SIG$1: workers save at the next step boundary"
  [[ -n $STEP_PID ]] && kill -"$1" "$STEP_PID" 2>/dev/null
}
# USR1/USR2: our --signal warning, so this script requeues. TERM: scancel, `scontrol
# requeue` or Slurm's preemption, which requeue (or cancel) the job themselves.
trap 'REQUEUE=1; forward USR1' USR1
trap 'REQUEUE=1; forward USR2' USR2
trap 'forward TERM' TERM

SRUN_ARGS=(--ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0)
[[ -n $CPUS ]] && SRUN_ARGS+=(--cpus-per-task="$CPUS")
# Each task finds the head node in its step's node list (the nodes this srun really
# runs on), then becomes torchrun (exec: srun's signals reach torchrun itself).
# shellcheck disable=SC2016  # expanded by the task's shell, not here
TASK='port=$1 py=$2; shift 2
nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-$(hostname -s)}}
head=$(scontrol show hostnames "$nodes" | head -n 1)
[[ -n $head ]] || { echo "[r50_ast] no head node in node list $nodes" >&2; exit 1; }
[[ ${SLURM_NODEID:-0} != 0 ]] || echo "[r50_ast] rendezvous on $head:$port (step nodes $nodes)"
exec "$py" -m torch.distributed.run --rdzv_endpoint="$head:$port" "$@"'
# torchrun passes SIGTERM/USR1/USR2 on to its workers and waits SAVE_TIMEOUT s for them.
srun "${SRUN_ARGS[@]}" bash -c "$TASK" r50_ast-task "$RDZV_PORT" "$PYTHON" \
  --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_backend=c10d --rdzv_id="${SLURM_JOB_ID:-0}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 \
  --shutdown-timeout="$SAVE_TIMEOUT" \
  -m dist_ast.train "${OVERRIDES[@]}" &
STEP_PID=$!
# `wait` returns early when a trapped signal arrives: wait until srun has really ended.
while true; do
  wait "$STEP_PID"
  rc=$?
  kill -0 "$STEP_PID" 2>/dev/null || break
done

if [[ $rc -ne 0 && $REQUEUE -eq 1 ]]; then
  # the workers saved and exited 75 (REQUEUE_EXIT_CODE); torchrun itself reports 1.
  echo "[r50_ast] preempted (srun exit $rc): requeueing job ${SLURM_JOB_ID:-?}"
  scontrol requeue "${SLURM_JOB_ID}" || echo "[r50_ast] requeue refused (already requeued?)"
  exit 0
fi
echo "[r50_ast] done (exit $rc)"
exit "$rc"
