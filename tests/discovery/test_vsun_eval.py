"""V.S.U.N. aggregation and the CHGNet relaxation path (failures are recorded, never dropped)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data_pipeline.record import CrystalRecord
from discovery.matching import NoveltyIndex
from discovery.relax import CHGNetRelaxer, RelaxConfig, RelaxResult
from discovery.stability import HullReference
from discovery.vsun import evaluate_run, fractions, plot_stability_vs_novelty, summarize

A = 5.64
FCC = np.array([[0, A / 2, A / 2], [A / 2, 0, A / 2], [A / 2, A / 2, 0]])
ELEMENTAL = {"Na": -1.3, "Cl": -1.8, "K": -1.1}


def _rs(key, z1=11, z2=17, scale=1.0):
    return CrystalRecord(key, "gen", [z1, z2], [[0, 0, 0], [0.5, 0.5, 0.5]], FCC * scale)


def _ok(record, energy):
    return RelaxResult(record.key, "ok", energy, 5, record)


def test_verdicts_follow_the_definitions():
    nacl, nacl_again, kcl, broken = _rs("g:0"), _rs("g:1", scale=1.01), _rs("g:2", 19, 17, 1.1), _rs("g:3")
    broken = broken.replace(frac_coords=np.array([[0, 0, 0], [0.01, 0, 0]]))
    # Reference: NaCl known with E_f = -2.0; KCl unknown but its system has KCl2 ... only elements
    hull = HullReference([("NaCl", -2.0)])
    novelty = NoveltyIndex([nacl.to_structure()])
    relaxed = [
        _ok(nacl, -1.55 - 2.0 + 0.05),  # E_f = -1.95 → 0.05 above the NaCl hull: stable, not novel
        _ok(nacl_again, -1.55 - 2.0 + 0.05),  # duplicate of sample 0
        _ok(kcl, -1.45 - 1.0),  # E_f = -1.0 below the K-Cl elements hull: stable, novel
        RelaxResult(broken.key, "skipped_invalid"),
    ]
    verdicts = evaluate_run([nacl, nacl_again, kcl, broken], hull, novelty, ELEMENTAL, relaxed=relaxed)
    v = {x.key: x for x in verdicts}
    assert v["g:0"].stable and v["g:0"].unique and not v["g:0"].novel
    assert v["g:0"].e_above_hull == pytest.approx(0.05)
    assert not v["g:1"].unique
    assert v["g:2"].vsun and v["g:2"].e_above_hull == pytest.approx(-1.0)
    assert not v["g:3"].valid and not v["g:3"].stable and "skipped_invalid" in v["g:3"].relax_status
    # The broken sample is a 0.06 Å distortion of NaCl: within CDVAE's loose matcher tolerances it
    # is the same crystal, so it is neither unique nor novel (validity is what rules it out).
    assert not v["g:3"].unique and not v["g:3"].novel
    f = fractions(verdicts)
    assert f == {"V": 0.75, "S": 0.75, "U": 0.5, "N": 0.25, "SUN": 0.25, "VSUN": 0.25}


def test_failed_relaxations_count_as_not_stable_and_keep_their_reason(tmp_path):
    sample = _rs("g:0")
    verdicts = evaluate_run(
        [sample], HullReference([]), NoveltyIndex(), ELEMENTAL, relaxed=[RelaxResult("g:0", "failed", message="boom")]
    )
    assert not verdicts[0].stable and "failed: boom" in verdicts[0].relax_status
    assert math.isnan(verdicts[0].e_above_hull)
    summary = summarize(verdicts + [type(verdicts[0])(**{**verdicts[0].__dict__, "run": 1, "valid": False})])
    assert summary["V"]["runs"] == 2 and summary["V"]["mean"] == pytest.approx(0.5) and summary["V"]["std"] > 0
    plot_stability_vs_novelty(verdicts, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow
def test_chgnet_relaxes_a_real_crystal_and_reports_a_failure():
    relaxer = CHGNetRelaxer(RelaxConfig(steps=5, fmax=0.05))
    good = relaxer.relax(_rs("g:nacl", scale=1.03))
    assert good.usable and good.record is not None and -5 < good.energy_per_atom < -2
    # Fermium is outside CHGNet's element table: the relaxation fails, and says why.
    bad = relaxer.relax(_rs("g:fm", 100, 17))
    assert bad.status == "failed" and bad.message


@pytest.mark.slow
def test_ray_relaxations_keep_input_order_and_record_failures():
    from discovery.relax import relax_records

    crystals = [_rs("g:a", scale=1.02), _rs("g:fm", 100, 17), _rs("g:b", 19, 17, 1.1)]
    results = relax_records(crystals, RelaxConfig(steps=2), num_workers=2, progress=False)
    assert [r.key for r in results] == ["g:a", "g:fm", "g:b"]
    assert results[0].usable and results[2].usable
    assert results[1].status == "failed"
