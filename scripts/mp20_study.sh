#!/usr/bin/env bash
# The MP-20 pretrained-vs-scratch study (issue #7), end to end with the project's own commands:
#
#   1. export the fine-tune test split of mp20_formation_energy_per_atom as CIFs
#   2. build pretraining shards from ../shared/data/mp_20 (train.csv.gz + val.csv.gz), excluding
#      every structure that matches a fine-tune test crystal (configs/study_data_mp20.yaml)
#   3. composition baseline arm (Magpie + gradient boosting, and the training mean): about a minute;
#      then the scratch arm: the randomly initialised encoder, {10%, 100%} labels × seeds {0, 1, 2}
#      (started in the background: it needs no pretrained weights, so it overlaps step 4)
#   4. pretrain the CrysLDNet stage-1 VAE (small Matformer) on those shards, then release it
#   5. pretrained arm: fine-tune the release (full and frozen probe), {10%, 100%} × seeds {0, 1, 2}
#   6. compare: test MAE mean ± std over seeds, gain over scratch and vs baseline → CSV + Markdown + PNG
#
#   bash scripts/mp20_study.sh                            # outputs under runs/mp20_study/
#   PRETRAIN_MINUTES=120 PRETRAIN_STEPS=5000 EPOCHS=30 NICE=10 bash scripts/mp20_study.sh
#
# Both neural arms use the same encoder architecture (ENCODER below, also passed to the pretraining),
# the same head, optimiser and protocol (configs/study_finetune_mp20.yaml): early stopping on
# validation MAE (≤100 epochs, patience 15), the learning rate chosen from one grid on validation
# MAE (first seed of each cell), the same fixed validation crystals and the whole test half.
# EPOCHS, when set, overrides the maximum number of epochs (early stopping still applies).
# Post-hoc follow-ups (same-lr arm, longer 10% runs) are listed in docs/mp20_study.md, not run here.
# Stages whose output exists are skipped (delete runs/mp20_study/<stage> to redo one); pretraining
# resumes from its latest checkpoint. Wall times go to runs/mp20_study/timings.log; results and
# discussion: docs/mp20_study.md.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

STUDY=${STUDY:-runs/mp20_study}        # configs/study_data_mp20.yaml names runs/mp20_study/holdout_test in `exclude`
TASK=mp20_formation_energy_per_atom
ENCODER='{name: matformer, width: 64, num_layers: 3, heads: 2}'
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1200}   # the learning-rate schedule's horizon (warmup + cosine)
PRETRAIN_MINUTES=${PRETRAIN_MINUTES:-30} # wall-clock budget: SIGTERM → the trainer checkpoints and exits 0
EPOCHS=${EPOCHS:-}                       # empty: the config's maximum (100)
NICE=${NICE:-0}                         # e.g. NICE=10 on a shared machine
RUN=(nice -n "$NICE")
mkdir -p "$STUDY"
log() { printf '[mp20_study %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$STUDY/timings.log"; }
timed() {  # timed NAME CMD...: run it, log its wall time
    local name=$1; shift
    local t0; t0=$(date +%s)
    log "start $name: $*"
    "$@"
    log "done  $name in $(( $(date +%s) - t0 )) s"
}
log "machine: $(nproc) cores, $(uname -m), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. The fine-tune test split (half of val.csv.gz, by sha256 of the material id) as CIFs.
if [[ ! -f "$STUDY/holdout_test/keys.txt" ]]; then
    timed export_split "${RUN[@]}" crystalfm finetune export-split "$TASK" --split test \
        --out-dir "$STUDY/holdout_test"
fi

# 2. Pretraining shards: both MP-20 files minus anything structurally matching the test split.
if [[ ! -f "$STUDY/shards/manifest.json" ]]; then
    timed data_build "${RUN[@]}" crystalfm data build configs/study_data_mp20.yaml --out "$STUDY/shards" --no-progress
fi

# Fine-tune sweeps run as SHARDS parallel processes of one thread each (`--shard i/n`), which
# uses 2 cores far better than one process with 2 threads for models this small.
SHARDS=${SHARDS:-3}
sweep_arm() {  # sweep_arm NAME SWEEP-ARGS...: the arm's runs split over SHARDS processes
    local name=$1; shift
    local pids=() i
    for (( i = 0; i < SHARDS; i++ )); do
        OMP_NUM_THREADS=1 "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20.yaml "$@" \
            ${EPOCHS:+--set "epochs=${EPOCHS}"} --out "$STUDY/finetune" --shard "$i/$SHARDS" \
            > "$STUDY/sweep_${name}_$i.log" 2>&1 &
        pids+=($!)
        if (( i == 0 )); then
            # The first driver creates the SQLite schema; drivers migrating a fresh store at the same
            # time race ("table _alembic_tmp_experiments already exists"), so wait for its first line.
            until grep -q '^\[sweep\]' "$STUDY/sweep_${name}_0.log" 2>/dev/null; do
                kill -0 "${pids[0]}" 2>/dev/null || break
                sleep 2
            done
        fi
    done
    local failed=0
    for i in "${pids[@]}"; do wait "$i" || failed=1; done
    return $failed
}

# 3a. Composition baseline arm: one process (validation/test parsed once, features cached under
#     $STUDY/finetune/baseline_cache); it also creates the MLflow store before the sharded arms start.
if [[ ! -f "$STUDY/baseline.done" ]]; then
    timed sweep_baseline env OMP_NUM_THREADS=1 "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20.yaml \
        --encoders baseline --out "$STUDY/finetune" > "$STUDY/sweep_baseline.log" 2>&1 \
        && touch "$STUDY/baseline.done"
fi

# 3b. Scratch arm, in the background: it needs no pretrained weights.
timed sweep_scratch sweep_arm scratch --encoders scratch --set "encoder_config=${ENCODER}" &
SCRATCH_PID=$!
until grep -q '^\[sweep\]' "$STUDY/sweep_scratch_0.log" 2>/dev/null; do  # its store exists: no schema race later
    kill -0 "$SCRATCH_PID" 2>/dev/null || break
    sleep 2
done

# 4. Pretrain (resumes from the latest checkpoint when rerun) and release the last checkpoint.
PRETRAIN_RUN="$STUDY/pretrain/vae_small"
RELEASE="$STUDY/release/vae_small"
if [[ ! -f "$RELEASE/model.safetensors" ]]; then
    timed pretrain "${RUN[@]}" timeout --preserve-status -s TERM "${PRETRAIN_MINUTES}m" \
        env OMP_NUM_THREADS=1 crystalfm pretrain train configs/study_pretrain_vae.yaml \
        "objective.encoder=${ENCODER}" "train.max_steps=${PRETRAIN_STEPS}" \
        "data.shards=$STUDY/shards" "run.root=$STUDY/pretrain" > "$STUDY/pretrain.log" 2>&1
    log "pretraining stopped at: $(tail -1 "$PRETRAIN_RUN/metrics.jsonl" | cut -c1-120)"
    timed release "${RUN[@]}" crystalfm pretrain release "$PRETRAIN_RUN/checkpoints" --out "$RELEASE" \
        --alias mp20-study  # the default alias "latest" is reserved by MLflow (reported)
fi

# 5. Pretrained arm (same MLflow store; SQLite on a local disk takes the concurrent writers).
timed sweep_pretrained sweep_arm pretrained --encoders "$RELEASE" \
    || log "some pretrained-arm runs failed: see $STUDY/sweep_pretrained_*.log (compare uses the finished ones)"
wait "$SCRATCH_PID" || log "some scratch-arm runs failed: see $STUDY/sweep_scratch_*.log"

# 6. The comparison: CSV, Markdown, PNG.
timed compare crystalfm finetune compare --task "$TASK" --out "$STUDY/finetune" --save-dir "$STUDY/comparison"
log "finished; table in $STUDY/comparison/"
