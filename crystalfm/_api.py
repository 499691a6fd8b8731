"""`crystalfm.load(...)`: a released encoder or a fine-tuned model, ready for structures.

    model = crystalfm.load("releases/jepa")                      # or a fine-tuned model directory,
    vectors = model.embed([structure, atoms, "CsCl.cif"])        # or "models:/crystalfm-<task>@best"
    values = model.predict("my_cifs/")                           # fine-tuned models only

Inputs: a pymatgen `Structure`, an ASE `Atoms`, a CIF / POSCAR path (or a folder or archive of
them), or a list of any of these. Each becomes a `CrystalRecord` checked by the data pipeline's
`validate`; a bad input raises `ValueError` naming its position and what is wrong. Batches of
`batch_size` crystals are collated with the batch views the model was trained with.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

STRUCTURE_HELP = "a pymatgen Structure, an ASE Atoms, or a CIF/POSCAR path (file, folder or archive)"


def load(source: str | os.PathLike, *, tracking_uri: str | None = None, device: str = "cpu",
         batch_size: int = 64) -> "Pretrained | FineTuned":
    """A release directory, a fine-tuned model directory, or an MLflow URI (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/ID/PATH`; the store is `tracking_uri` or $MLFLOW_TRACKING_URI)."""
    from finetune.model_dir import META
    from pretrain.release import CONFIG

    text = str(source)
    path = download(text, tracking_uri) if text.startswith(("models:/", "runs:/")) else Path(text).expanduser()
    if (path / META).is_file():
        return FineTuned(path, device=device, batch_size=batch_size)
    if (path / CONFIG).is_file():
        return Pretrained(path, device=device, batch_size=batch_size)
    raise FileNotFoundError(
        f"{source}: not a crystalfm model. Expected a release directory ({CONFIG}, from `crystalfm pretrain "
        f"release`), a fine-tuned model directory ({META}, from `crystalfm finetune train`) or an MLflow URI "
        "such as models:/crystalfm-<task>@best"
    )


def download(uri: str, tracking_uri: str | None = None) -> Path:
    """A local copy of the model directory an MLflow registry or run URI points at."""
    from finetune.predict import _download

    return _download(uri, tracking_uri)


# ---------------------------------------------------------------------------------------------- inputs
def as_records(structures: Any) -> list:
    """Every input as a validated `CrystalRecord`, in order (a folder contributes its files, sorted)."""
    from data_pipeline.build.validate import validate
    from data_pipeline.record import CrystalRecord

    items = list(structures) if isinstance(structures, (list, tuple)) else [structures]
    records = []
    for i, item in enumerate(items):
        where = f"input {i} ({_describe(item)})"
        try:
            if isinstance(item, (str, os.PathLike)):
                found = _records_from_path(item)
            elif _is_structure(item):
                found = [CrystalRecord.from_structure(item, key=f"input:{i}", source="input")]
            elif _is_atoms(item):
                if not all(item.pbc):
                    raise ValueError("an ASE Atoms must be periodic in all three directions (pbc=True) with a cell")
                found = [CrystalRecord.from_ase(item, key=f"input:{i}", source="input")]
            else:
                raise TypeError(f"got {type(item).__name__}; expected {STRUCTURE_HELP}")
            for record in found:
                validate(record)
        except (TypeError, ValueError, OSError) as error:
            raise ValueError(f"{where}: {error}") from None
        records += found
    if not records:
        raise ValueError(f"no structures given; pass {STRUCTURE_HELP}, or a list of them")
    return records


def _records_from_path(path) -> list:
    from data_pipeline.build.readers import Reject
    from finetune.structures import iter_structure_entries

    records = []
    for item in iter_structure_entries([path]):
        if isinstance(item, Reject):
            raise ValueError(f"{item.location}: {item.reason}")
        reader, entry = item
        records.append(reader.parse(entry))
    return records


def _is_structure(item) -> bool:
    from pymatgen.core import Structure

    return isinstance(item, Structure)


def _is_atoms(item) -> bool:
    from ase import Atoms

    return isinstance(item, Atoms)


def _describe(item) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(str(item))
    formula = getattr(getattr(item, "composition", None), "reduced_formula", None)
    if formula is None and hasattr(item, "get_chemical_formula"):
        formula = item.get_chemical_formula()
    return f"{type(item).__name__} {formula}" if formula else type(item).__name__


# ---------------------------------------------------------------------------------------------- models
class _Model:
    encoder: torch.nn.Module
    views: Any

    def __init__(self, path: Path, device: str, batch_size: int):
        self.path = Path(path)
        self.device = device
        self.batch_size = batch_size

    def _batches(self, structures) -> Iterable:
        from data_pipeline.load.collate import collate

        records = as_records(structures)
        for start in range(0, len(records), self.batch_size):
            yield collate(records[start : start + self.batch_size], self.views).to(self.device)

    @torch.no_grad()
    def embed(self, structures, readout: str = "mean") -> np.ndarray:
        """Per-crystal embeddings [n_crystals, d] (float32) from the encoder, pooled by `readout`."""
        self.encoder.eval()
        return np.concatenate([self.encoder.embed(batch, readout).float().cpu().numpy() for batch in self._batches(structures)])


class Pretrained(_Model):
    """A released checkpoint: `.objective` (the whole pretraining model), `.encoder`, `.config`."""

    def __init__(self, path: Path, device: str = "cpu", batch_size: int = 64):
        from data_pipeline.load.collate import BatchViews
        from pretrain.objectives.config import encoder_views
        from pretrain.release import load_pretrained

        super().__init__(path, device, batch_size)
        self.objective = load_pretrained(path).to(device)
        self.config = self.objective.release_config
        self.encoder = self.objective.encoder
        self.views = BatchViews.from_dict(encoder_views(self.encoder))

    def __repr__(self) -> str:
        return f"crystalfm.Pretrained({self.config['objective'].get('name')}, {self.path})"


class FineTuned(_Model):
    """A fine-tuned property model: `predict` gives `.target` in `.unit` per crystal."""

    def __init__(self, path: Path, device: str = "cpu", batch_size: int = 64):
        from finetune.model_dir import load_model

        super().__init__(path, device, batch_size)
        loaded = load_model(path)
        self.model = loaded.model.to(device).eval()
        self.meta = loaded.meta
        self.views = loaded.views
        self.encoder = self.model.encoder
        self.target, self.unit = loaded.target, loaded.unit

    @torch.no_grad()
    def predict(self, structures) -> np.ndarray:
        """One value per crystal [n_crystals] (float64), in `self.unit`."""
        return np.concatenate([self.model.predict(batch).double().cpu().numpy() for batch in self._batches(structures)])

    def calculator(self):
        """An ASE calculator giving `energy` = prediction × number of atoms, for models of a
        per-atom energy (eV/atom: energy per atom, formation energy per atom). No forces."""
        if self.unit != "eV/atom":
            raise ValueError(f"{self.target} is in {self.unit or 'no unit'}, not eV/atom: it is not an energy an ASE calculator can report")
        return _calculator(self)

    def __repr__(self) -> str:
        return f"crystalfm.FineTuned({self.target} [{self.unit}], {self.path})"


def _calculator(model: FineTuned):
    from ase.calculators.calculator import Calculator, all_changes

    class CrystalfmCalculator(Calculator):
        implemented_properties = ["energy"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            self.results["energy"] = float(model.predict(self.atoms)[0]) * len(self.atoms)

    return CrystalfmCalculator()
