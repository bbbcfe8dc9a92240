#!/bin/bash
# AIME world model on SLURM: data-parallel training with srun + torchrun, requeued on preemption and
# resumed from the run's latest checkpoint.
#
#   sbatch VRNN/run_VRNN_minimum.sh
#   ENV_NAME=walker-walk PRESET=paper RUN_DIR=runs/walker-walk/exp1 sbatch --nodes 2 VRNN/run_VRNN_minimum.sh
#
# Run from the repository root after `pip install -e .` (activate the environment first, or set PY).
# Environment overrides (defaults in brackets):
#   ENV_NAME [cheetah-run]  PRESET [paper]  RUN_DIR [runs/<env>/slurm-<job id>]  DATA_DIR [data/<env>]
#   GPUS_PER_NODE [$SLURM_GPUS_ON_NODE or 1]  MASTER_PORT [29500]  PY [python]  EXTRA_ARGS [] (more flags
#   for VRNN/training_vrnn.py, e.g. "--batch-size 32 --max-steps 200000")
#   EPISODES [50]  EVAL_EPISODES [10]  EPISODE_LENGTH [500]  POLICY [ou]  SEED [0]  (data collection)
#
# Preemption and time limit: SLURM sends SIGUSR1 to this batch shell 120 s before the limit
# (--signal=B:USR1@120; a preemption sends SIGTERM). The trap below creates the run's stop file, which
# every rank checks at each step boundary: the ranks agree to stop, rank 0 writes
# checkpoints/latest.pt, the processes exit with code 0; then the job requeues itself and the next
# start resumes (--resume). The stop file is used rather than forwarding the signal because torchrun's
# agent does not pass SIGUSR1 on to its workers. The RUN_DIR default includes the job id, which a
# requeued job keeps, so the requeued job finds its checkpoint.
#
#SBATCH --job-name=aime-vrnn
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

ENV_NAME="${ENV_NAME:-cheetah-run}"
PRESET="${PRESET:-paper}"
JOB_ID="${SLURM_JOB_ID:-local}"
RUN_DIR="${RUN_DIR:-runs/${ENV_NAME}/slurm-${JOB_ID}}"
DATA_DIR="${DATA_DIR:-data/${ENV_NAME}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
NNODES="${SLURM_JOB_NUM_NODES:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PY="${PY:-python}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
STOP_FILE="${RUN_DIR}/STOP"

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
else
    MASTER_ADDR="127.0.0.1"
fi

mkdir -p "${RUN_DIR}"
rm -f "${STOP_FILE}"
echo "[$(date +%T)] job ${JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${ENV_NAME}, preset ${PRESET}," \
     "${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"

# Collect the dataset once, in this shell, before the distributed job (no rank waits on a barrier).
if [ ! -f "${DATA_DIR}/train.h5" ] || [ ! -f "${DATA_DIR}/eval.h5" ]; then
    "${PY}" VRNN/collect_dmc.py --env "${ENV_NAME}" --episodes "${EPISODES:-50}" \
        --eval-episodes "${EVAL_EPISODES:-10}" --episode-length "${EPISODE_LENGTH:-500}" \
        --policy "${POLICY:-ou}" --seed "${SEED:-0}" --out "${DATA_DIR}" --quiet
fi

SRUN_PID=""
on_preempt() {
    echo "[$(date +%T)] stop signal: asking every rank to checkpoint and stop"
    touch "${STOP_FILE}"
    if [ -n "${SRUN_PID}" ]; then
        wait "${SRUN_PID}" || true
    fi
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "[$(date +%T)] requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    exit 0
}
trap on_preempt USR1 TERM

# One srun task per node; each starts torchrun with one worker per GPU; c10d rendezvous on the first node.
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
srun --kill-on-bad-exit=1 "${PY}" -m torch.distributed.run \
    --nnodes="${NNODES}" --nproc-per-node="${GPUS_PER_NODE}" \
    --rdzv-id="${JOB_ID}" --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}" \
    VRNN/training_vrnn.py --env "${ENV_NAME}" --preset "${PRESET}" --run-dir "${RUN_DIR}" \
    --data-dir "${DATA_DIR}" --resume --stop-file "${STOP_FILE}" ${EXTRA_ARGS} &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; the trap then finishes the job.
wait "${SRUN_PID}"
