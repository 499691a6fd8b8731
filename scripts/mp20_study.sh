#!/usr/bin/env bash
# The MP-20 study of issue #11 (fourth study in docs/mp20_study.md), end to end with the project's
# own commands, resumable stage by stage:
#
#   1. pretraining shards: every shared source except MP-20, every MP-20 crystal excluded
#      structurally (configs/study_data_pretrain.yaml): no pretrained encoder sees the task
#   2. pretrain CrysLDNet stage 1 + the formation-energy head on clean crystals, the encoder's atom
#      embedding started from element properties (configs/study_pretrain_vae_energy_magpie.yaml),
#      then release it
#   3. composition baseline (Magpie + gradient boosting, and the training mean) at 10% and 100%,
#      formation energy and band gap
#   4. 10% labels × seeds 0/1/2: scratch (same element-property embedding), the release fully
#      fine-tuned and as a frozen probe, the head started from the pretraining head, lr chosen from
#      one grid for every arm (configs/study_finetune_mp20_session4.yaml); 100% labels seed 0
#      (…_full.yaml); band gap at 10% with a random head (…_band_gap.yaml)
#   5. the external-label controls (scripts/external_label_controls.py)
#   6. compare, per task: test MAE mean ± std over seeds, vs scratch and vs baseline → CSV + Markdown + PNG
#
#   bash scripts/mp20_study.sh                                  # outputs under runs/mp20_study/
#   PRETRAIN_STEPS=3000 NICE=10 SHARDS=2 bash scripts/mp20_study.sh
#
# Budget on 2 cores (this VM, loaded by other work): data build ~10 min, pretraining ~45 min,
# baselines ~2 min, fine-tuning ~60 min over two processes, controls ~3 min: about 2 hours.
# Stages whose output exists are skipped (delete runs/mp20_study/<stage> to redo one); pretraining
# resumes from its latest checkpoint. Wall times go to runs/mp20_study/timings.log.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate && -z "${VIRTUAL_ENV:-}" ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

STUDY=runs/mp20_study                       # the configs name runs/mp20_study/... paths
TASK=mp20_formation_energy_per_atom
GAP_TASK=mp20_band_gap
PRETRAIN_STEPS=${PRETRAIN_STEPS:-6000}
NICE=${NICE:-0}
SHARDS=${SHARDS:-2}                         # parallel one-thread fine-tune processes
RUN=(env OMP_NUM_THREADS=1 nice -n "$NICE")
mkdir -p "$STUDY/logs"
log() { printf '[mp20_study %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$STUDY/timings.log"; }
timed() {  # timed NAME CMD...: run it, log its wall time
    local name=$1; shift
    local t0; t0=$(date +%s)
    log "start $name"
    "$@"
    log "done  $name in $(( $(date +%s) - t0 )) s"
}
log "machine: $(nproc) cores, $(uname -m), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. Pretraining shards.
if [[ ! -f "$STUDY/shards/manifest.json" ]]; then
    timed data_build "${RUN[@]}" crystalfm data build configs/study_data_pretrain.yaml --no-progress \
        > "$STUDY/logs/data_build.log" 2>&1
fi

# 2. Pretrain (resumes from its latest checkpoint) and release.
RELEASE="$STUDY/release/vae_energy_magpie"
if [[ ! -f "$RELEASE/model.safetensors" ]]; then
    timed pretrain "${RUN[@]}" crystalfm pretrain train configs/study_pretrain_vae_energy_magpie.yaml \
        "train.max_steps=${PRETRAIN_STEPS}" > "$STUDY/logs/pretrain.log" 2>&1
    timed release "${RUN[@]}" crystalfm pretrain release "$STUDY/pretrain/vae_energy_magpie/checkpoints" \
        --out "$RELEASE" --alias mp20-study > "$STUDY/logs/release.log" 2>&1
fi

# 3. Baselines, one process (it also creates the MLflow store before parallel writers start).
if [[ ! -f "$STUDY/baseline4.done" ]]; then
    timed baseline "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4.yaml --encoders baseline \
        > "$STUDY/logs/sweep_baseline.log" 2>&1
    timed baseline_full "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4_full.yaml \
        --encoders baseline > "$STUDY/logs/sweep_baseline_full.log" 2>&1
    timed baseline_band_gap "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4_band_gap.yaml \
        --encoders baseline > "$STUDY/logs/sweep_baseline_band_gap.log" 2>&1
    touch "$STUDY/baseline4.done"
fi

# 4. Fine-tuning: the 10% sweep split over SHARDS processes, the 100% run beside them. A sweep
#    skips runs that already finished in the store, so a rerun continues where it stopped.
pids=()
for (( i = 0; i < SHARDS; i++ )); do
    "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4.yaml --shard "$i/$SHARDS" \
        > "$STUDY/logs/sweep10_$i.log" 2>&1 &
    pids+=($!)
    sleep 20  # SQLite: let each driver open the store before the next (concurrent first opens race)
done
"${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4_full.yaml \
    > "$STUDY/logs/sweep100.log" 2>&1 &
pids+=($!)

# 5. Controls (cheap) while the sweeps run.
timed controls "${RUN[@]}" python scripts/external_label_controls.py "$STUDY/shards" --release "$RELEASE" \
    --out "$STUDY/controls.csv" > "$STUDY/logs/controls.log" 2>&1
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
# Band gap after the formation-energy runs, over the same number of processes.
pids=()
for (( i = 0; i < SHARDS; i++ )); do
    "${RUN[@]}" crystalfm finetune sweep configs/study_finetune_mp20_session4_band_gap.yaml --shard "$i/$SHARDS" \
        > "$STUDY/logs/sweep_band_gap_$i.log" 2>&1 &
    pids+=($!)
    sleep 20
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
(( failed == 0 )) || log "some fine-tune runs failed: see $STUDY/logs/sweep*.log (compare uses the finished ones)"

# 6. The comparison: CSV, Markdown, PNG.
timed compare crystalfm finetune compare --task "$TASK" --out "$STUDY/finetune4" --save-dir "$STUDY/comparison4"
timed compare_band_gap crystalfm finetune compare --task "$GAP_TASK" --out "$STUDY/finetune4" \
    --save-dir "$STUDY/comparison4_band_gap"
log "finished; tables in $STUDY/comparison4/ and $STUDY/comparison4_band_gap/, controls in $STUDY/controls.csv"
