# Sourced by every crystalfm sbatch script: environment, logs, captured environment.
# Expects ROOT, PYTHON, LOG_DIR set by the rendered script.
set -euo pipefail
cd "$ROOT"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# One folder per job (and per requeue: SLURM_RESTART_COUNT) with what ran and where.
JOB_LOG_DIR="$LOG_DIR/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-local}"
mkdir -p "$JOB_LOG_DIR"
RESTART="${SLURM_RESTART_COUNT:-0}"
{
  echo "job ${SLURM_JOB_ID:-} restart $RESTART on ${SLURM_JOB_NODELIST:-$(hostname)} at $(date -u +%FT%TZ)"
  echo "git $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" --version 2>&1
} > "$JOB_LOG_DIR/job-$RESTART.txt"
env | sort > "$JOB_LOG_DIR/env-$RESTART.txt"
"$PYTHON" -m pip freeze > "$JOB_LOG_DIR/pip-freeze-$RESTART.txt" 2>/dev/null || true
command -v nvidia-smi >/dev/null && nvidia-smi > "$JOB_LOG_DIR/nvidia-smi-$RESTART.txt" 2>&1 || true
scontrol show job "${SLURM_JOB_ID:-0}" > "$JOB_LOG_DIR/scontrol-$RESTART.txt" 2>/dev/null || true

# Rendezvous: the first host of the allocation is the master / Ray head.
MASTER_HOST=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
export MASTER_ADDR="${CRYSTALFM_MASTER_ADDR:-$MASTER_HOST}"
export MASTER_PORT="${CRYSTALFM_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

# Time limits and preemption. `--signal=B:USR1@...` warns this shell before the time limit:
# forward TERM to the job step (srun passes it to every task; the trainer finishes its step, saves
# a checkpoint and exits 0), then requeue; the next start resumes from `latest`. TERM itself
# (preemption, scancel) is only forwarded so ranks checkpoint: preemption with PreemptMode=REQUEUE
# requeues by itself, and scancel must stay a real cancel.
STEP_PID=""
stop_step() {
  [ -n "$STEP_PID" ] && kill -TERM "$STEP_PID" 2>/dev/null || true
  [ -n "$STEP_PID" ] && wait "$STEP_PID" 2>/dev/null || true
}
on_time_limit() {
  echo "[crystalfm] time limit near ($(date -u +%FT%TZ)): checkpointing and requeueing" >&2
  stop_step
  scontrol requeue "$SLURM_JOB_ID" || echo "[crystalfm] requeue failed: resubmit; the run resumes from latest" >&2
  exit 0
}
on_term() {
  echo "[crystalfm] TERM received ($(date -u +%FT%TZ)): asking ranks to checkpoint" >&2
  stop_step
  exit 143
}
trap on_time_limit USR1
trap on_term TERM

# run_step CMD...: run a job step in the background and wait for it (so traps fire promptly).
run_step() {
  "$@" &
  STEP_PID=$!
  local rc=0
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  return $rc
}
