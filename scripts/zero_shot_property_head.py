"""Zero-shot test MAE of a release's pretraining property head on mp20_formation_energy_per_atom (no MP-20 label used).

    python scripts/zero_shot_property_head.py runs/mp20_study/release/vae_energy
"""
import sys, numpy as np, torch
torch.set_num_threads(1)
from finetune.data import load_task_data
from finetune.tasks import get_task
from pretrain.release import load_pretrained
from data_pipeline.load.collate import BatchViews, collate
from pretrain.objectives.config import encoder_views
obj = load_pretrained(sys.argv[1]).eval()
data = load_task_data(get_task("mp20_formation_energy_per_atom"), fraction=1.0, seed=0, max_eval=None)
views = BatchViews.from_dict(encoder_views(obj.encoder))
for split in ("train", "test"):
    recs = getattr(data, split); ys, ps = [], []
    with torch.no_grad():
        for i in range(0, len(recs), 128):
            b = collate(recs[i:i+128], views)
            e = obj.encoder.readout(obj.encoder(b), b, "mean")
            ps.append(obj.property_head.mlp(e).squeeze(-1).numpy()); ys.append(b.labels["formation_energy_per_atom"].numpy())
    y, p = np.concatenate(ys), np.concatenate(ps)
    print(split, len(y), "zero-shot MAE", np.abs(y-p).mean(), "mean-predictor MAE", np.abs(y-y.mean()).mean())
