#!/usr/bin/env bash
# Submit one crystalfm stage to SLURM (or run it on this machine with --local).
#
#   cluster/launch.sh STAGE CONFIG [--nodes N] [--gpus-per-node G] [--partition P] [--time T]
#                     [--account A] [--cpus-per-task C] [--shared] [--grace S] [--job-name NAME]
#                     [--log-dir DIR] [--array N] [--dry-run] [--local] [-- EXTRA ARGS...]
#
#   STAGE     data      Ray head on the first node + one worker per other node, then
#                       `python -m data_pipeline build CONFIG --ray-address HEAD:PORT EXTRA...`
#             pretrain  srun starts G ranks per node, one task per GPU, first host is master:
#                       `python -m pretrain train CONFIG EXTRA...` (EXTRA: key.sub=value overrides);
#                       nodes are exclusive, each rank gets C CPUs (default: node CPUs / G)
#             finetune  a sweep (tasks × encoders × fractions × seeds): `python -m finetune sweep CONFIG EXTRA...`;
#                       with --array N, N array tasks each run their share (SLURM_ARRAY_TASK_ID/COUNT)
#   --cpus-per-task C  CPUs per task (pretrain: per GPU rank); env CRYSTALFM_CPUS_PER_TASK
#   --shared  pretrain without --exclusive (needs C); env CRYSTALFM_EXCLUSIVE=0
#   --grace S seconds of warning before the time limit (USR1: checkpoint, then requeue); default
#             180 for pretrain, 120 otherwise; env CRYSTALFM_GRACE_S
#   --dry-run prints the rendered sbatch script instead of submitting it.
#   --local   runs the same stage on this machine (G ranks for pretrain; in-process Ray for data).
#   On CPU-only nodes, G is the number of CPU ranks per node (gloo backend).
#
# This script is thin on purpose: it only fills a template from cluster/templates/ and calls
# sbatch; the templates only set the environment and call `srun python -m <package> ...`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "launch.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; } && { usage; exit 0; }
[ $# -ge 2 ] || { usage >&2; exit 2; }
STAGE=$1; CONFIG=$2; shift 2
case "$STAGE" in data|pretrain|finetune) ;; *) die "unknown stage '$STAGE' (data | pretrain | finetune)";; esac

NODES=1; GPUS=1; PARTITION=""; TIME="24:00:00"; ACCOUNT=""; JOB_NAME=""; DRY_RUN=0; LOCAL=0; ARRAY=
CPUS="${CRYSTALFM_CPUS_PER_TASK:-}"; EXCLUSIVE="${CRYSTALFM_EXCLUSIVE:-1}"; GRACE="${CRYSTALFM_GRACE_S:-}"
LOG_DIR="${CRYSTALFM_LOG_DIR:-$ROOT/runs/slurm}"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; shift 2;;
    --gpus-per-node) GPUS=$2; shift 2;;
    --partition) PARTITION=$2; shift 2;;
    --time) TIME=$2; shift 2;;
    --account) ACCOUNT=$2; shift 2;;
    --cpus-per-task) CPUS=$2; shift 2;;
    --shared) EXCLUSIVE=0; shift;;
    --grace) GRACE=$2; shift 2;;
    --job-name) JOB_NAME=$2; shift 2;;
    --log-dir) LOG_DIR=$2; shift 2;;
    --array) ARRAY=$2; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    --local) LOCAL=1; shift;;
    --) shift; EXTRA+=("$@"); break;;
    *) EXTRA+=("$1"); shift;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'"
if [ -n "$ARRAY" ]; then
  [[ "$ARRAY" =~ ^[1-9][0-9]*$ ]] || die "--array must be a positive integer, got '$ARRAY'"
  [ "$STAGE" = finetune ] || die "--array is for the finetune stage (a sweep split over array tasks)"
fi
[ -z "$CPUS" ] || [[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, got '$CPUS'"
if [ -z "$GRACE" ]; then GRACE=120; [ "$STAGE" = pretrain ] && GRACE=180; fi
[[ "$GRACE" =~ ^[1-9][0-9]*$ ]] || die "--grace must be a positive number of seconds, got '$GRACE'"
if [ "$STAGE" = pretrain ] && [ "$EXCLUSIVE" = 0 ] && [ -z "$CPUS" ] && [ "$LOCAL" = 0 ]; then
  die "--shared nodes need --cpus-per-task C (CPUs for each GPU rank and its loader workers), or drop --shared"
fi
[ -f "$CONFIG" ] || die "config file '$CONFIG' not found"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
# The Python of the active virtualenv, else the repository's .venv, else the one on PATH.
if [ -n "${CRYSTALFM_PYTHON:-}" ]; then PYTHON=$CRYSTALFM_PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON=$VIRTUAL_ENV/bin/python
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
else PYTHON=$(command -v python3 || command -v python); fi
JOB_NAME="${JOB_NAME:-crystalfm-$STAGE}"

# ---------------------------------------------------------------- local: same stage, this machine
if [ "$LOCAL" = 1 ]; then
  cd "$ROOT"
  case "$STAGE" in
    data) exec "$PYTHON" -m data_pipeline build "$CONFIG" "${EXTRA[@]}";;
    pretrain)
      if [ "$GPUS" = 1 ]; then exec "$PYTHON" -m pretrain train "$CONFIG" "${EXTRA[@]}"; fi
      WORLD_INFO=$("$PYTHON" -c "import base64,json,sys; print(base64.urlsafe_b64encode(json.dumps({'localhost': list(range(int(sys.argv[1])))}).encode()).decode())" "$GPUS")
      PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
      exec "$PYTHON" -m deepspeed.launcher.launch --world_info="$WORLD_INFO" --node_rank=0 \
        --master_addr=127.0.0.1 --master_port="$PORT" --no_local_rank --module pretrain train "$CONFIG" "${EXTRA[@]}";;
    finetune) exec "$PYTHON" -m finetune sweep "$CONFIG" "${EXTRA[@]}";;
  esac
fi

# ---------------------------------------------------------------- SLURM: render the template
TEMPLATE="$HERE/templates/$STAGE.sbatch"
[ -f "$TEMPLATE" ] || die "template $TEMPLATE missing"
quote_args() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; printf '%s' "$out"; }
SBATCH_EXTRA=""
[ -n "$PARTITION" ] && SBATCH_EXTRA+="#SBATCH --partition=$PARTITION"$'\n'
[ -n "$ACCOUNT" ] && SBATCH_EXTRA+="#SBATCH --account=$ACCOUNT"$'\n'
[ -n "$CPUS" ] && SBATCH_EXTRA+="#SBATCH --cpus-per-task=$CPUS"$'\n'
[ "$STAGE" = pretrain ] && [ "$EXCLUSIVE" != 0 ] && SBATCH_EXTRA+="#SBATCH --exclusive"$'\n'
[ -n "$ARRAY" ] && SBATCH_EXTRA+="#SBATCH --array=0-$((ARRAY - 1))"$'\n'
if [ "$STAGE" = pretrain ] && [ "${CRYSTALFM_CPU_RANKS:-0}" != 1 ]; then
  SBATCH_EXTRA+="#SBATCH --gpus-per-node=$GPUS"$'\n'
fi

render() {
  local line
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      *@SBATCH_EXTRA@*) printf '%s' "$SBATCH_EXTRA";;
      *)
        line=${line//@JOB_NAME@/$JOB_NAME}
        line=${line//@NODES@/$NODES}
        line=${line//@GPUS_PER_NODE@/$GPUS}
        line=${line//@TIME@/$TIME}
        line=${line//@GRACE@/$GRACE}
        line=${line//@LOG_DIR@/$LOG_DIR}
        line=${line//@ROOT@/$ROOT}
        line=${line//@PYTHON@/$PYTHON}
        line=${line//@CONFIG@/$(printf '%q' "$CONFIG")}
        line=${line//@EXTRA@/$(quote_args "${EXTRA[@]}")}
        printf '%s\n' "$line";;
    esac
  done < "$TEMPLATE"
}

SCRIPT="$(render)"
if [ "$DRY_RUN" = 1 ]; then
  printf '%s\n' "$SCRIPT"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run on a SLURM login node, or use --local"
mkdir -p "$LOG_DIR"
printf '%s\n' "$SCRIPT" | sbatch --parsable
