"""Denoise 200 MP-20 training crystals from step t (one forward, self-conditioned as in sampling) and report how
often x̂0's species argmax is right, beside the argmax of the noisy one-hot x_t itself, how often x̂0 says O where
the data has it 10 % of the time, and what the wrong picks are (atomic numbers). One JSON line per t. The crystals
were trained on: this measures how the denoiser uses its input, not generalisation (docs/discovery_mp20.md, session 10).

    python scripts/ddpm_denoise_probe.py RUN/checkpoints/step_00005500
"""
import sys, json, collections, gzip, csv
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import numpy as np, torch
from pathlib import Path
from ddpm_quick_validity import load
from pymatgen.core import Structure
from data_pipeline.load.collate import collate
from data_pipeline.record import CrystalRecord, MAX_Z
from pretrain.objectives.dit import pad_atoms
from pretrain.objectives.ddpm import TOKEN_PARTS

objective, _ = load(Path(sys.argv[1]))
records = []
TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_20" / "train.csv.gz"
if not TRAIN.is_file():
    sys.exit(f"{TRAIN} not found: this probe reads MP-20's training CSV from ../shared/data")
with gzip.open(TRAIN, "rt") as h:
    for i, row in enumerate(csv.DictReader(h)):
        if i >= 200: break
        s = Structure.from_str(row["cif"], fmt="cif")
        records.append(CrystalRecord(row["material_id"], "mp20", np.array(s.atomic_numbers), s.frac_coords, s.lattice.matrix))
batch = collate(records)
x0, mask = pad_atoms(objective.encode_tokens(batch), batch.batch_index, batch.num_atoms)
truth = x0[..., TOKEN_PARTS["species"]].argmax(-1)[mask]
g = torch.Generator().manual_seed(0)
for t in [16, 64, 128, 160, 192, 224]:
    abar = objective.alphas_cumprod[t]
    noise = torch.randn(x0.shape, generator=g)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    if objective.config.coordinates == "wrapped":
        sigma = objective.coord_sigmas[t]
        frac = torch.remainder((x0[..., :3] + 1) / 2 + sigma * torch.randn(x0[..., :3].shape, generator=g), 1.0)
        xt[..., :3] = 2 * frac - 1
    steps = torch.full((x0.shape[0],), t)
    with torch.no_grad():
        out = objective.predict(xt, steps, mask, None)[0]
        est = objective.estimate_x0(xt, out, steps)
        if objective.config.self_condition:
            out = objective.predict(xt, steps, mask, est)[0]
            est = objective.estimate_x0(xt, out, steps)
    pred = est[..., TOKEN_PARTS["species"]].argmax(-1)[mask]
    raw = xt[..., TOKEN_PARTS["species"]].argmax(-1)[mask]
    wrong = pred != truth
    picks = collections.Counter((pred[wrong] + 1).tolist())
    print(json.dumps({"t": t, "abar": round(float(abar), 3), "species_acc": round(float((~wrong).float().mean()), 3), "argmax_xt_acc": round(float((raw == truth).float().mean()), 3),
                      "pred_O_frac": round(float((pred == 7).float().mean()), 3), "true_O_frac": round(float((truth == 7).float().mean()), 3),
                      "wrong_top": picks.most_common(4)}))
