"""Released checkpoints: a directory anyone can load with one call and no pickle.

    <dir>/model.safetensors    consolidated fp32 weights of the whole objective (encoder + heads)
    <dir>/config.json          {"objective": <objective config incl. encoder>, "views": <batch views>,
                                "normalization": {...}, "manifest_sha256": "...", "metrics": {...},
                                "format_version": 1, ...}
    <dir>/MODEL_CARD.md        what it is, how it was trained, on which data (and licences)

`load_pretrained(dir)` rebuilds the objective from config.json and loads the weights strictly.
`.encoder` of the result is the shared encoder interface that fine-tuning and discovery use.

`release_checkpoint(checkpoint, out)` (behind `crystalfm pretrain release`) turns a training
checkpoint into a release: it consolidates DeepSpeed's ZeRO partitions into one fp32 state dict
(`get_fp32_state_dict_from_zero_checkpoint`: the fp32 master weights, also for bf16/fp16 runs),
rebuilds the objective and loads them strictly, writes the files above plus a model card
(method, data and its licences, steps, metrics, intended use), logs the release as artifacts of
the training run and registers it in the MLflow model registry under an alias.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from crystalfm_common.console import captured
from crystalfm_common.metrics import group_of

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "MODEL_CARD.md"


def save_release(
    objective: torch.nn.Module,
    objective_config: dict,
    out_dir: str | os.PathLike,
    *,
    views: dict | None = None,
    normalization: dict | None = None,
    manifest_sha256: str | None = None,
    metrics: dict | None = None,
    card: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a release atomically (to `<out_dir>.tmp`, then rename)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in objective.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    config = {
        "format_version": FORMAT_VERSION,
        "objective": objective_config,
        "views": views or {},
        "normalization": normalization or {},
        "manifest_sha256": manifest_sha256,
        "metrics": metrics or {},
        "weights_sha256": _sha256(tmp / WEIGHTS),
        **(extra or {}),
    }
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / CARD).write_text(card or f"# crystalfm release\n\nObjective: {objective_config.get('name')}\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_release_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a crystalfm release (no {CONFIG}); make one with `crystalfm pretrain release CHECKPOINT --out DIR`"
        )
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: release format {config.get('format_version')} is not {FORMAT_VERSION}")
    return config


def load_pretrained(path: str | os.PathLike, map_location: str = "cpu"):
    """Rebuild a released objective (with its `.encoder`) from a release directory, in eval mode."""
    from pretrain.objectives import build_objective

    path = Path(path)
    config = read_release_config(path)
    objective = build_objective(config["objective"])
    state = load_file(str(path / WEIGHTS), device=map_location)
    objective.load_state_dict(state, strict=True)
    objective.release_config = config
    return objective.eval()


def build_with_init(config: dict):
    """`build_objective(config)`, with the release that `config["init_from"]` names loaded first
    and handed to the objective (stage 2 from stage 1, refinement of a ddpm generator)."""
    from pretrain.objectives import build_objective

    init_from = config.get("init_from")
    if not init_from:
        return build_objective(config)
    if not Path(init_from).is_dir():
        raise FileNotFoundError(
            f"{config.get('name')}.init_from: {init_from} is not a directory. Point it at a release "
            "(`crystalfm pretrain release ...`); to load a stage-2 release use its saved config, which has "
            "init_from removed (export_config())."
        )
    return build_objective(config, load_pretrained(init_from))


def release_id(path: str | os.PathLike) -> str:
    """A short stable id of a release: the first 12 hex digits of its weights' sha256."""
    return read_release_config(path)["weights_sha256"][:12]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- from a training checkpoint
METHODS = {
    "vae": ("CrysLDNet stage 1: a crystal VAE", "an encoder-decoder that maps each atom to a latent vector and "
            "reconstructs species, coordinates and lattice (KL-regularised); its encoder gives per-atom latents"),
    "latent_flow": ("CrysLDNet stage 2: joint latent flow matching", "a diffusion transformer trained with flow "
                    "matching jointly on the VAE's atom latents and the lattice, for generating crystals"),
    "jepa": ("Crys-JEPA", "a joint-embedding predictive architecture: a context encoder predicts the embeddings an "
             "EMA target encoder gives to masked atoms; its encoder gives per-atom and per-crystal embeddings"),
}

# Licence of each data source a shard set may contain: matched against the tokens of the source
# name (`demo_gnome` → gnome), then against the reader kind recorded in the manifest.
LICENCES = {
    "gnome": "CC BY-NC 4.0 (non-commercial use only)",
    "mptrj": "CC BY 4.0 (Materials Project)",
    "mp": "CC BY 4.0 (Materials Project)",
    "mp20": "CC BY 4.0 (Materials Project)",
    "mp_docs": "CC BY 4.0 (Materials Project)",
    "mpts": "CC BY 4.0 (Materials Project)",
    "mpts52": "CC BY 4.0 (Materials Project)",
    "alex": "CC BY 4.0 (Alexandria)",
    "alexandria": "CC BY 4.0 (Alexandria)",
    "jarvis": "NIST public data (see JARVIS terms)",
    "perov": "MIT (CDVAE benchmark copy)",
    "carbon": "MIT (CDVAE benchmark copy)",
    "cdvae_csv": "that of the benchmark it copies (MP-20, MPTS-52: CC BY 4.0; perov-5, carbon-24: MIT)",
    "structure_files": "as licensed by the provider of the structure files",
}


def licence_of(source: str, kind: str | None = None) -> str:
    import re

    tokens = [t for t in re.split(r"[^a-z0-9]+", source.lower()) if t]
    for token in tokens + [source.lower(), (kind or "").lower()]:
        if token in LICENCES:
            return LICENCES[token]
    for token in tokens:
        for prefix in sorted(LICENCES, key=len, reverse=True):
            if token.startswith(prefix):
                return LICENCES[prefix]
    return "unknown: check the licence of this source before sharing the model"


def consolidate_fp32(step_dir: str | os.PathLike, verbose: bool = False) -> dict[str, torch.Tensor]:
    """One fp32 state dict from a DeepSpeed checkpoint step folder (ZeRO stage 0 to 3)."""
    step_dir = Path(step_dir)
    # ZeRO 0-2 write mp_rank_00_model_states.pt; ZeRO-3 writes zero_pp_rank_R_mp_rank_00_model_states.pt.
    model_files = sorted(step_dir.glob("mp_rank_*_model_states.pt")) or sorted(step_dir.glob("*mp_rank_*_model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{step_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    # DeepSpeed's own internal files (pickled); module holds every key incl. buffers and frozen params.
    module = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    if any(step_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # fp32 master weights gathered from every rank's ZeRO partition (also for bf16/fp16 runs);
        # its dozen print()s per release are shown with verbose, or when it fails.
        with captured(verbose):
            state.update(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _find(tree, key):
    """First value under `key` anywhere in a nested manifest (its layout is the builder's)."""
    if isinstance(tree, dict):
        if key in tree and isinstance(tree[key], dict):
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def model_card(meta: dict, manifest: dict | None, metrics: dict, registry: str | None) -> str:
    objective = meta["objective"].get("name", "?")
    title, method = METHODS.get(objective, (objective, "a crystalfm pretraining objective"))
    encoder = meta["objective"].get("encoder", {})
    sources = (_find(manifest, "sources") or {}) if manifest else {}
    lines = [f"# {title}", "", f"Released by crystalfm from a training checkpoint at step {meta['step']}.", "",
             "## Method", "", f"{title}: {method}.", ""]
    if encoder:
        lines += [f"Encoder: `{json.dumps(encoder, sort_keys=True)}`.", ""]
    lines += ["## Training", "",
              f"- steps: {meta['step']} optimiser steps on {meta.get('world_size')} rank(s), "
              f"ZeRO stage {meta.get('zero_stage')}, precision {meta.get('precision')}",
              f"- code: git commit `{meta.get('git_commit')}`",
              f"- optimiser: `{json.dumps(meta.get('config', {}).get('optim', {}), sort_keys=True)}`",
              f"- schedule: `{json.dumps(meta.get('config', {}).get('schedule', {}), sort_keys=True)}`", "",
              "## Data", "", f"- shard set manifest sha256: `{meta.get('manifest_sha256')}`"]
    if sources:
        lines += ["", "| source | crystals | licence |", "| --- | --- | --- |"]
        licences = {}
        for name, tally in sorted(sources.items()):
            count = tally.get("written", tally.get("records_in", "?")) if isinstance(tally, dict) else tally
            licences[name] = licence_of(name, tally.get("kind") if isinstance(tally, dict) else None)
            lines.append(f"| {name} | {count} | {licences[name]} |")
        if any("BY-NC" in licence for licence in licences.values()):
            lines += ["", "**This model was trained on GNoME data (CC BY-NC 4.0): it may be used for "
                      "non-commercial purposes only, with attribution.**"]
    else:
        lines += ["- sources: not recorded (no manifest found beside the run); check the data's licences"]
    lines += ["", "## Metrics (last logged training step)", ""]
    # The names of metrics.jsonl and MLflow (crystalfm_common/metrics.py); rates and memory left out.
    shown = {k: v for k, v in sorted(metrics.items()) if group_of(k) in ("train", "val")}
    lines += [f"- {k}: {v:.6g}" if isinstance(v, (int, float)) else f"- {k}: {v}" for k, v in shown.items()] or ["- none"]
    lines += ["", "## Intended use", "",
              "A pretrained crystal encoder to fine-tune property heads on (`crystalfm finetune`) and, for "
              "generative objectives, to sample and screen candidate crystals (`crystalfm discovery`). Not a "
              "substitute for DFT validation of predicted properties or stability.", "",
              "## Loading", "", "```python", "import crystalfm",
              "model = crystalfm.load('<this directory>')  # safetensors, no pickle",
              "vectors = model.embed([structure, atoms, 'crystal.cif'])  # pymatgen, ASE or CIF/POSCAR paths",
              "```", "", "The bare objective: `pretrain.release.load_pretrained('<this directory>')` "
              "(its `.encoder` is the shared encoder interface)."]
    if registry:
        lines += ["", f"MLflow model registry: `{registry}`."]
    return "\n".join(lines) + "\n"


def release_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, register: bool = True,
                       registry_name: str | None = None, alias: str = "current",
                       tracking_uri: str | None = None, verbose: bool = False) -> Path:
    """Consolidate a training checkpoint into a release directory (and register it in MLflow)."""
    from pretrain.checkpoint import resolve_step_dir
    from pretrain.objectives import build_objective

    if register and alias.lower() == "latest":  # checked before anything is written
        raise ValueError("MLflow reserves the alias 'latest' (it always means the newest version): choose another, e.g. --alias current")
    step_dir = resolve_step_dir(checkpoint)
    meta = json.loads((step_dir / "meta.json").read_text())
    state = consolidate_fp32(step_dir, verbose=verbose)
    objective = build_objective(meta["objective"])
    objective.load_state_dict(state, strict=True)  # every weight accounted for, nothing extra

    shards = meta.get("config", {}).get("data", {}).get("shards")
    manifest = None
    if shards and (Path(shards) / "manifest.json").is_file():
        from data_pipeline.manifest import read_manifest_json

        manifest = read_manifest_json(shards)
    normalization = {"labels": _find(manifest, "labels") or {}} if manifest else {}
    if hasattr(objective, "normalization_stats"):
        normalization["objective"] = objective.normalization_stats()
    mlflow_info = meta.get("mlflow") or {}
    uri = tracking_uri or mlflow_info.get("tracking_uri")
    tracking = meta.get("config", {}).get("tracking", {})
    name = registry_name or tracking.get("registry_name") or f"crystalfm-{meta['objective'].get('name')}"
    do_register = register and bool(uri)
    card = model_card(meta, manifest, meta.get("metrics", {}), f"{name}@{alias}" if do_register else None)
    out = save_release(objective, meta["objective"], out_dir, views=meta.get("views"), normalization=normalization,
                       manifest_sha256=meta.get("manifest_sha256"), metrics=meta.get("metrics", {}), card=card,
                       extra={"step": meta["step"], "source_checkpoint": str(step_dir.resolve()),
                              "training": {k: meta.get(k) for k in ("world_size", "zero_stage", "precision", "git_commit")},
                              "mlflow_run_id": mlflow_info.get("run_id")})
    if do_register:
        register_release(out, uri, name, alias, mlflow_info.get("run_id"))
    return out


def register_release(release_dir: Path, tracking_uri: str, name: str, alias: str, run_id: str | None) -> str:
    """Log the release as artifacts of its training run and register a model version with `alias`."""

    import mlflow

    from crystalfm_common.tracking import open_client

    client = open_client(tracking_uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:  # the run is not in this store: make a run that holds the release
        experiment = client.get_experiment_by_name("crystalfm-releases") or None
        if experiment is None:
            from crystalfm_common.tracking import artifact_root

            experiment_id = client.create_experiment("crystalfm-releases", artifact_location=artifact_root(tracking_uri))
        else:
            experiment_id = experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=f"release {release_id(release_dir)}").info.run_id
        client.set_terminated(run_id)
    artifact_path = f"release-{release_id(release_dir)}"
    client.log_artifacts(run_id, str(release_dir), artifact_path)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="crystalfm pretrained models (see each version's MODEL_CARD.md)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"release_id": release_id(release_dir)},
                                          description=(release_dir / CARD).read_text()[:5000])
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
