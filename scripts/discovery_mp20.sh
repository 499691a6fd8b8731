#!/usr/bin/env bash
# Small CPU run of the discovery chain on MP-20 (see docs/discovery_mp20.md for results).
# Run from the repository root with the venv active. Every process single-threaded: the
# shared 2-core machine collapses under multi-threading.
set -euo pipefail
export OMP_NUM_THREADS=1
R=runs/discovery_mp20
SHARDS=runs/mp20_study/shards          # existing MP-20 shard set (has manifest.json)
REF=../shared/data/mp_20/train.csv.gz
ELEM=../shared/data/mp_entries/mbd_2023-02-07-mp-elemental-reference-entries.json.gz
mkdir -p $R
# If no shard set exists yet:
# crystalfm data build --source cdvae_csv:../shared/data/mp_20/train.csv.gz:mp20 --out $R/shards && SHARDS=$R/shards

# 1. tiny DDPM generator (2 layers, width 128, 4 heads, T=64), 200 steps
crystalfm pretrain train configs/pretrain_cpu_smoke.yaml \
  'objective={name: ddpm, layers: 2, width: 128, heads: 4, steps: 64}' \
  train.max_steps=200 train.zero_stage=0 train.log_every=25 checkpoint.every_steps=100 \
  data.shards=$SHARDS run.root=$R run.name=ddpm tracking.experiment=discovery-mp20
crystalfm pretrain release $R/ddpm/checkpoints --out $R/releases/ddpm --no-register

# 2. tiny Crys-JEPA (jepa_transformer width 64, 2 layers, 4 heads), 150 steps
crystalfm pretrain train configs/pretrain_cpu_smoke.yaml \
  'objective={name: jepa, encoder: {name: jepa_transformer, width: 64, num_layers: 2, heads: 4}}' \
  train.max_steps=150 train.zero_stage=0 train.log_every=25 checkpoint.every_steps=75 \
  data.shards=$SHARDS run.root=$R run.name=jepa tracking.experiment=discovery-mp20
crystalfm pretrain release $R/jepa/checkpoints --out $R/releases/jepa --no-register

# 3. two sampling runs of 24 crystals, 32 denoising steps
crystalfm discovery generate $R/releases/ddpm --n 24 --seed 0 --steps 32 --out $R/samples0
crystalfm discovery generate $R/releases/ddpm --n 24 --seed 1 --steps 32 --out $R/samples1

# 4. V.S.U.N. over both runs (CHGNet relaxation, 50 FIRE steps, valid crystals only)
#    (6 min: SMACT validity is very slow on two 12-element compositions in run 0, see the doc)
crystalfm discovery evaluate $R/samples0 $R/samples1 --reference $REF --elemental-refs $ELEM \
  --relax-steps 50 --out $R/vsun

#    also run, on the second core while the above was busy: run 1 alone
crystalfm discovery evaluate $R/samples1 --reference $REF --elemental-refs $ELEM \
  --relax-steps 50 --out $R/vsun_run1

# 5. Crys-JEPA screen, Spearman rho of D_C vs E_hull (run 0 with the two-run table, run 1
#    with the run-1-only table); screen_noeval was an earlier call without --evaluation
crystalfm discovery screen $R/samples0 --jepa $R/releases/jepa --reference $REF \
  --keep 0.25 --out $R/screen_noeval
crystalfm discovery screen $R/samples1 --jepa $R/releases/jepa --reference $REF \
  --evaluation $R/vsun_run1/vsun_table.csv --keep 0.25 --out $R/screen_run1
crystalfm discovery screen $R/samples0 --jepa $R/releases/jepa --reference $REF \
  --evaluation $R/vsun/vsun_table.csv --keep 0.25 --out $R/screen

# 6. one refinement round
crystalfm discovery refine generator=$R/releases/ddpm jepa=$R/releases/jepa reference=$REF \
  elemental_refs=$ELEM out=$R/refine n=16 keep=0.5 sample_steps=32 finetune_steps=20 \
  relax="{steps: 30}"
