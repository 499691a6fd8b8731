#!/usr/bin/env bash
# The CPU discovery run on MP-20 of docs/discovery_mp20.md (#12): a DDPM generator trained
# on one core (65 min since session 9), 3 sampling runs of 200 crystals, CDVAE's generation metrics, V.S.U.N. with CHGNet
# relaxations, and one refinement round. Run from the repository root with the venv active.
# Every heavy process is single-threaded and pinned to one core (CORE, default 1): the machine has
# 2 cores and the other one is someone else's.
set -euo pipefail
export OMP_NUM_THREADS=1
CORE=${CORE:-1}
PIN="nice taskset -c $CORE"
R=runs/discovery_mp20
TRAIN=../shared/data/mp_20/train.csv.gz
TEST=../shared/data/mp_20/val.csv.gz:test      # MP-20's held-out test half (finetune's val_test rule)
ELEM=../shared/data/mp_entries/mbd_2023-02-07-mp-elemental-reference-entries.json.gz
mkdir -p $R

# 1. shards: both MP-20 files minus every structure matching a test-half crystal (1.5 min)
$PIN crystalfm finetune export-split mp20_formation_energy_per_atom --split test --out-dir $R/holdout_test
$PIN crystalfm data build configs/data_mp20_generator.yaml --inline --no-progress

# 2. the DDPM generator: 6 layers × 128, T = 256, 5,500 steps of 1,024 atoms (107 epochs; the CSPNet
#    denoiser of session 9 with the softmax species output of session 10, 65 min)
$PIN crystalfm pretrain train configs/pretrain_ddpm_cpu.yaml
crystalfm pretrain release $R/ddpm/checkpoints --out $R/releases/ddpm --no-register
#    quick validity checks of the checkpoints (100 samples each, struct + comp only)
for step in 00001000 00003000 00005500; do
  $PIN python scripts/ddpm_quick_validity.py $R/ddpm/checkpoints/step_$step --n 100 --steps 64 >> $R/quick_validity.jsonl
done
$PIN python scripts/ddpm_quick_validity.py $R/ddpm/checkpoints/step_00005500 --n 100 --steps 256 >> $R/quick_validity.jsonl
#    why structural validity fails (collisions inside the cell / across a face / self-image)
$PIN crystalfm discovery generate $R/releases/ddpm --n 100 --seed 1000 --steps 256 --out $R/samples_check
$PIN python scripts/ddpm_collisions.py $R/samples_check
python scripts/plot_learning_curve.py $R/ddpm/metrics.jsonl docs/discovery_mp20/ddpm_learning_curve.png \
  --validity $R/quick_validity.jsonl

# ---- Session 6 (docs/discovery_mp20.md) ran steps 1-2 with part_weights [1, 1, 1] (now in the config),
# the variants of its table by overriding objective.part_weights / self_condition / pair_frequencies
# (run.name=ddpm_X), 600-sample validity with
#   python scripts/ddpm_quick_validity.py $R/ddpm/checkpoints/step_00005500 --n 200 --steps 64 --seed S >> $R/validity600.jsonl
#   python scripts/validity_table.py $R/validity600.jsonl
# and steps 3, 5 and 6 below with --steps 64 (256 gave the same validity), refine with n=128 and a
# JEPA trained on $R/shards instead of $R/shards_train. Step 4 (COV) was not run. ----

# 3. three sampling runs of 200 crystals, full chain (256 steps), species: trained ones, Z <= 94
for seed in 0 1 2; do
  $PIN crystalfm discovery generate $R/releases/ddpm --n 200 --seed $seed --steps 256 --out $R/samples$seed
done

# 4. CDVAE's generation metrics of the 3 runs against 500 test-half crystals (seeded subsample)
$PIN crystalfm discovery evaluate $R/samples0 $R/samples1 $R/samples2 --test-set $TEST --no-vsun \
  --subsample 250 --seed 0 --out $R/genmetrics
#    the same metrics for the training crystals themselves (a baseline: real vs real)
$PIN crystalfm discovery evaluate $TRAIN --test-set $TEST --no-vsun --subsample 250 --seed 0 --out $R/genmetrics_train

# 5. V.S.U.N. of each run (CHGNet, 50 FIRE steps; reference = the generator's training shards)
for seed in 0 1 2; do
  $PIN crystalfm discovery evaluate $R/samples$seed --reference $R/shards --reference-splits train,val \
    --elemental-refs $ELEM --relax-steps 50 --no-generation-metrics --out $R/vsun$seed
done

# 6. one refinement round, ranked by the small Crys-JEPA of the ranker table (gen12)
$PIN crystalfm data build --source cdvae_csv:$TRAIN:mp20 --out $R/shards_train --inline --no-progress
$PIN crystalfm pretrain train configs/pretrain_cpu_smoke.yaml \
  'objective={name: jepa, encoder: {name: jepa_transformer, width: 64, num_layers: 2, heads: 4}}' \
  train.max_steps=400 train.zero_stage=0 data.shards=$R/shards_train run.root=$R run.name=jepa
crystalfm pretrain release $R/jepa/checkpoints --out $R/releases/jepa --no-register
$PIN crystalfm discovery refine generator=$R/releases/ddpm jepa=$R/releases/jepa reference=$R/shards \
  elemental_refs=$ELEM out=$R/refine n=64 keep=0.25 sample_steps=256 finetune_steps=50 relax="{steps: 50}"
