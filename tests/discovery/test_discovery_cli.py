"""The discovery commands end to end on CPU: a small DDPM trained on real MP-20 crystals generates
CIFs that round-trip through the data pipeline's readers; evaluate writes the V.S.U.N. table with
real CHGNet relaxations; screen ranks with Crys-JEPA's D_C and with the fingerprint baseline."""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import torch

from discovery.cli import main
from discovery.generate import read_samples
from pretrain.objectives import build_objective
from pretrain.release import save_release

pytestmark = pytest.mark.slow

DDPM = {"name": "ddpm", "layers": 2, "width": 64, "heads": 4, "dropout": 0.0, "steps": 32}
JEPA = {"name": "jepa", "encoder": {"name": "jepa_transformer", "width": 32, "num_layers": 1, "heads": 4}}


def trained_ddpm(config: dict, records, steps: int):
    """A small ddpm trained `steps` Adam steps on one batch of real crystals (seed 0)."""
    from data_pipeline.load.collate import collate

    torch.manual_seed(0)
    ddpm = build_objective(config)
    optimizer = torch.optim.Adam(ddpm.parameters(), lr=2e-3)
    batch = collate(records)
    for _ in range(steps):
        loss, _ = ddpm.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ddpm


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mp20_records, shared_data):
    root = tmp_path_factory.mktemp("discovery")
    save_release(trained_ddpm(DDPM, mp20_records[:16], 30), DDPM, root / "ddpm")
    save_release(build_objective(JEPA), JEPA, root / "jepa")
    # A small reference CSV in the MP-20 layout (rows of the real validation file, in tmp only).
    with gzip.open(shared_data / "mp_20" / "val.csv.gz", "rt") as handle:
        reader = csv.reader(handle)
        rows = [next(reader) for _ in range(41)]
    with open(root / "reference.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


def test_generate_writes_cifs_that_round_trip_through_the_readers(workspace, capsys):
    out = workspace / "samples"
    assert main(["generate", str(workspace / "ddpm"), "--n", "6", "--seed", "3", "--steps", "8", "--out", str(out)]) == 0
    records = read_samples(out)
    assert len(records) == 6
    with open(out / "samples.csv") as handle:
        table = list(csv.DictReader(handle))
    # The table and the CIFs describe the same crystals: each row's CIF (read back as `sample:<stem>`)
    # has that row's atom count.
    atoms_by_stem = {r.key.split(":", 1)[1]: r.num_atoms for r in records}
    assert len(table) == 6 and len(atoms_by_stem) == 6
    assert {Path(r["cif"]).stem: int(r["num_atoms"]) for r in table} == atoms_by_stem
    # same seed → same crystals
    again = workspace / "again"
    main(["generate", str(workspace / "ddpm"), "--n", "6", "--seed", "3", "--steps", "8", "--out", str(again)])
    assert (out / "samples.csv").read_text() == (again / "samples.csv").read_text()


def test_generate_keeps_to_the_species_asked_for(workspace, mp20_records):
    import numpy as np

    trained = {int(z) for r in mp20_records[:16] for z in r.atomic_numbers}

    def species(out):
        return set(np.concatenate([r.atomic_numbers for r in read_samples(out)]).tolist())

    base = ["generate", str(workspace / "ddpm"), "--n", "8", "--seed", "5", "--steps", "8"]
    assert main(base + ["--out", str(workspace / "sp_default")]) == 0  # default: trained species, Z ≤ 94
    assert species(workspace / "sp_default") <= trained
    assert main(base + ["--species", "all", "--max-z", "0", "--out", str(workspace / "sp_all")]) == 0
    assert species(workspace / "sp_all") - trained  # unrestricted it strays, so the checks above can fail
    assert main(base + ["--species", "Li,O,Fe", "--out", str(workspace / "sp_list")]) == 0
    assert species(workspace / "sp_list") <= {3, 8, 26}
    assert main(base + ["--species-from", str(workspace / "reference.csv"), "--out", str(workspace / "sp_from")]) == 0
    from discovery.references import load_crystals

    assert species(workspace / "sp_from") <= {int(z) for r in load_crystals(workspace / "reference.csv") for z in r.atomic_numbers}
    assert main(base + ["--species", "Xx", "--out", str(workspace / "sp_bad")]) == 2  # unknown element: a clear error


def test_generate_volume_composition_scales_cells_to_the_volume_model(workspace, capsys):
    """--volume composition: every sample's volume is the release's per-element volume model summed
    over its atoms, with the cell shape and coordinates of the plain sample; a release without the
    model (the volume buffers zeroed, as in an older one) refuses with a clear error."""
    import numpy as np

    from pretrain.release import load_pretrained

    base = ["generate", str(workspace / "ddpm"), "--n", "6", "--seed", "4", "--steps", "8"]
    assert main(base + ["--out", str(workspace / "vol_free")]) == 0
    assert main(base + ["--volume", "composition", "--out", str(workspace / "vol_comp")]) == 0
    volumes = load_pretrained(workspace / "ddpm").element_volumes().numpy()
    free = {r.key: r for r in read_samples(workspace / "vol_free")}
    scaled = read_samples(workspace / "vol_comp")
    assert len(scaled) == 6
    for record in scaled:
        assert record.volume == pytest.approx(volumes[record.atomic_numbers - 1].sum(), rel=1e-4)
        plain = free[record.key]
        np.testing.assert_array_equal(plain.atomic_numbers, record.atomic_numbers)
        np.testing.assert_allclose(plain.frac_coords, record.frac_coords, atol=1e-5)
    old = build_objective(DDPM)  # never trained: no volume model
    old.atom_counts[4] = 1.0
    save_release(old, DDPM, workspace / "ddpm_no_volumes")
    capsys.readouterr()
    code = main(["generate", str(workspace / "ddpm_no_volumes"), "--n", "2", "--steps", "4", "--volume", "composition",
                 "--out", str(workspace / "vol_bad")])
    assert code == 2 and "volume model" in capsys.readouterr().err


def test_generate_from_a_wrapped_coordinate_release_with_and_without_the_corrector(workspace, mp20_records):
    """A ddpm release with wrapped coordinates and the pair head samples through the CLI; the release
    keeps its corrector step, --corrector-lr overrides it, and a different step changes the crystals."""
    import numpy as np

    config = {**DDPM, "coordinates": "wrapped", "coordinate_head": "pair", "corrector_lr": 1e-5}
    save_release(trained_ddpm(config, mp20_records[:16], 10), config, workspace / "ddpm_wrapped")
    base = ["generate", str(workspace / "ddpm_wrapped"), "--n", "4", "--seed", "2", "--steps", "6"]
    assert main(base + ["--out", str(workspace / "w_default")]) == 0
    assert main(base + ["--corrector-lr", "1e-5", "--out", str(workspace / "w_same")]) == 0
    assert main(base + ["--corrector-lr", "0", "--out", str(workspace / "w_none")]) == 0
    default, same, none = (read_samples(workspace / name) for name in ("w_default", "w_same", "w_none"))
    assert len(default) == 4
    for a, b, c in zip(default, same, none):
        np.testing.assert_allclose(a.frac_coords, b.frac_coords, atol=1e-6)
        assert np.all((a.frac_coords >= 0) & (a.frac_coords < 1))
    assert any(not np.allclose(a.frac_coords, c.frac_coords, atol=1e-4) for a, c in zip(default, none))
    # --species-temperature reaches the sampler: 1 is the default chain, 0 another one, a negative one an error
    assert main(base + ["--species-temperature", "1", "--out", str(workspace / "w_t1")]) == 0
    assert main(base + ["--species-temperature", "0", "--out", str(workspace / "w_t0")]) == 0
    t1, t0 = read_samples(workspace / "w_t1"), read_samples(workspace / "w_t0")
    for a, b in zip(default, t1):
        np.testing.assert_allclose(a.frac_coords, b.frac_coords, atol=1e-6)
    assert any(not np.allclose(a.frac_coords, b.frac_coords, atol=1e-4) for a, b in zip(default, t0))
    assert main(base + ["--species-temperature", "-1", "--out", str(workspace / "w_bad")]) == 2


def test_evaluate_and_screen(workspace, shared_data, capsys):
    samples = workspace / "samples"
    if not samples.exists():
        main(["generate", str(workspace / "ddpm"), "--n", "6", "--seed", "3", "--steps", "8", "--out", str(samples)])
    refs = shared_data / "mp_entries" / "mbd_2023-02-07-mp-elemental-reference-entries.json.gz"
    ev = workspace / "vsun"
    code = main(["evaluate", str(samples), str(samples), "--reference", str(workspace / "reference.csv"),
                 "--elemental-refs", str(refs), "--relax-steps", "3", "--out", str(ev)])
    assert code == 0
    summary = json.loads((ev / "vsun_summary.json").read_text())
    assert set(summary) == {"V", "S", "U", "N", "SUN", "VSUN"} and summary["V"]["runs"] == 2
    mean = {metric: summary[metric]["mean"] for metric in summary}
    assert all(0.0 <= value <= 1.0 for value in mean.values()), mean
    # V.S.U.N. needs valid and S.U.N.; S.U.N. needs each of S, U, N (per run, so also on the mean).
    assert mean["VSUN"] <= mean["V"] and mean["VSUN"] <= mean["SUN"] <= min(mean["S"], mean["U"], mean["N"]), mean
    with open(ev / "vsun_table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 12  # every crystal of both runs has a row, whatever happened to it
    for row in table:
        assert (row["VSUN"] == "True") == (row["valid"] == "True" and row["SUN"] == "True"), row
    assert (ev / "stability_vs_novelty.png").stat().st_size > 0

    # V.S.U.N. alone: the same per-crystal verdicts, no CrystalNN fingerprints, no generation metrics
    only = workspace / "vsun_only"
    assert main(["evaluate", str(samples), "--reference", str(workspace / "reference.csv"), "--elemental-refs", str(refs),
                 "--relax-steps", "3", "--no-generation-metrics", "--out", str(only)]) == 0
    assert not (only / "generation_metrics.json").exists()
    with open(only / "vsun_table.csv") as handle:
        assert [r["VSUN"] for r in csv.DictReader(handle)] == [r["VSUN"] for r in table[:6]]
    assert "cov_recall" not in (only / "evaluation.md").read_text() and "VSUN" in (only / "evaluation.md").read_text()
    assert main(["evaluate", str(samples), "--reference", str(workspace / "reference.csv"),
                 "--no-vsun", "--no-generation-metrics"]) == 2

    for ranker in ("jepa", "jepa_probe", "composition_probe", "fingerprint"):
        out = workspace / f"screen_{ranker}"
        args = ["screen", str(samples), "--reference", str(workspace / "reference.csv"), "--ranker", ranker,
                "--keep", "0.5", "--evaluation", str(ev / "vsun_table.csv"), "--out", str(out)]
        if ranker in ("jepa", "jepa_probe"):
            assert main(args) == 2 and "needs --jepa DIR" in capsys.readouterr().err
            args += ["--jepa", str(workspace / "jepa")]
        assert main(args) == 0
        with open(out / "screen.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 6
        ranks = sorted(int(r["rank"]) for r in rows if r["rank"] not in ("", "None"))
        assert ranks == list(range(1, len(ranks) + 1))


def test_one_refinement_round_runs_end_to_end(workspace, shared_data, capsys):
    """generate → relax → V.U.N. → D_C rank → fine-tune the generator with the DeepSpeed trainer →
    release → generate again; V.S.U.N. before and after are reported whatever they are."""
    refs = shared_data / "mp_entries" / "mbd_2023-02-07-mp-elemental-reference-entries.json.gz"
    out = workspace / "refine"
    code = main(["refine", "generator=" + str(workspace / "ddpm"), "jepa=" + str(workspace / "jepa"),
                 "reference=" + str(workspace / "reference.csv"), "elemental_refs=" + str(refs), "out=" + str(out),
                 "n=8", "keep=0.5", "sample_steps=8", "finetune_steps=2", "relax={steps: 3}"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert "V.S.U.N. before" in capsys.readouterr().out
    from pretrain.release import load_pretrained

    refined = load_pretrained(summary["refined_generator"])
    assert refined.config.init_from is None  # a release stands alone: init_from was inlined on export
    fine_tuned = Path(summary["refined_generator"]).resolve() != (workspace / "ddpm").resolve()
    assert fine_tuned == bool(summary["rounds"][0]["kept"])  # refined exactly when round 0 kept crystals
