# Sourced by every crystalfm sbatch script: environment, logs, captured environment.
# Expects ROOT, PYTHON, LOG_DIR set by the rendered script.
set -euo pipefail
cd "$ROOT"
export PYTHONUNBUFFERED=1
# Intra-op threads = the CPUs SLURM gave each task (a template may refine it; CRYSTALFM_OMP_NUM_THREADS
# overrides). Not inherited from the submitting shell, whose OMP_NUM_THREADS is about the login node.
export OMP_NUM_THREADS="${CRYSTALFM_OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
source "$ROOT/cluster/templates/netaddr.sh"
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

# Rendezvous: the first host of the allocation is the master / Ray head. This batch shell runs on
# that host, so its address is looked up here: one that other nodes can reach (netaddr.sh), not
# what `hostname -i` says (127.0.1.1 on stock Debian/Ubuntu /etc/hosts).
ALL_HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null || hostname)
MASTER_HOST=$(printf '%s\n' "$ALL_HOSTS" | head -n 1)
if [ -z "${CRYSTALFM_MASTER_ADDR:-}" ]; then
  CRYSTALFM_MASTER_ADDR=$(node_addr "$MASTER_HOST" $ALL_HOSTS) || {
    echo "[crystalfm] no address of $MASTER_HOST reachable from the other nodes: set CRYSTALFM_MASTER_ADDR" >&2; exit 1; }
fi
export MASTER_ADDR="$CRYSTALFM_MASTER_ADDR"
export MASTER_PORT="${CRYSTALFM_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

# Time limits and preemption. `--signal=B:USR1@GRACE` warns this shell GRACE seconds before the time
# limit: ask the job step to stop (stop_step), wait for it, then requeue; the next start resumes from
# `latest`. How a step is asked (STEP_STOP, set by the template):
#   step-signal  USR1 to every task of the job's steps (scancel --signal, not this shell): the ranks
#                themselves get it (no launcher in between), finish their step, save and exit 0,
#                within the whole GRACE period (pretrain);
#   term         TERM to the step's process (srun passes it to its tasks) (data, finetune).
# TERM to this shell (preemption, scancel) reached the steps' tasks from SLURM already; it is passed on
# the same way in case only this shell got it, then the step is awaited; no requeue here: preemption
# with PreemptMode=REQUEUE requeues by itself, and scancel must stay a real cancel. Their grace period
# is the site's (KillWait, GraceTime), not GRACE.
STEP_PID=""
STEP_STOP=${STEP_STOP:-term}
stop_step() {
  [ -n "$STEP_PID" ] || return 0
  if [ "$STEP_STOP" = step-signal ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$STEP_PID" 2>/dev/null || true
  else
    kill -TERM "$STEP_PID" 2>/dev/null || true
  fi
  local rc=0
  wait "$STEP_PID" 2>/dev/null || rc=$?
  echo "[crystalfm] step ended with status $rc ($(date -u +%FT%TZ))" >&2
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
