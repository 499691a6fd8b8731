"""Which shard files make a split: from `<shard_dir>/manifest.json`, a brace pattern, a folder."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from data_pipeline.manifest import read_manifest_json


def split_shards(shard_dir: str | os.PathLike, split: str) -> list[str]:
    """Absolute shard paths of one split, read from `<shard_dir>/manifest.json`.

    Tolerated manifest shapes for the split entry: `{"shards": [...]}` where each item is a
    file name or a dict with "path"/"name"/"file"; or a plain list of such items. The split is
    looked up under manifest["splits"][split], then manifest[split]. A manifest that is itself a
    plain list of tars is accepted for any split. Without a manifest, `<split>-*.tar` or
    `<split>/*.tar` in the folder are used.
    """
    shard_dir = Path(shard_dir)
    manifest_path = shard_dir / "manifest.json"
    if not manifest_path.exists():
        found = sorted(glob.glob(str(shard_dir / f"{split}-*.tar"))) or sorted(glob.glob(str(shard_dir / split / "*.tar")))
        if not found:
            raise FileNotFoundError(
                f"{manifest_path} does not exist and no {split}-*.tar or {split}/*.tar shards are there: "
                "build the shard set first (`crystalfm data build ...`)"
            )
        return found
    manifest = read_manifest_json(shard_dir)
    if isinstance(manifest, list):
        entry = manifest
    else:
        splits = manifest.get("splits", manifest)
        if split not in splits:
            raise KeyError(f"{manifest_path}: no split {split!r}; splits present: {sorted(splits)}")
        entry = splits[split]
    items = entry.get("shards", entry.get("files", [])) if isinstance(entry, dict) else entry
    paths = []
    for item in items:
        name = item if isinstance(item, str) else next((item[k] for k in ("path", "name", "file") if k in item), None)
        if name is None:
            raise ValueError(f"{manifest_path}: split {split!r} has a shard entry without a path: {item!r}")
        path = Path(name)
        paths.append(str(path if path.is_absolute() else shard_dir / path))
    return paths


def expand_shards(shards: list[str] | str) -> list[str]:
    """A list of paths, a brace pattern (`train-{000..015}.tar`), a folder or one tar → paths."""
    if isinstance(shards, (str, os.PathLike)):
        shards = str(shards)
        if os.path.isdir(shards):
            found = sorted(glob.glob(os.path.join(shards, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in folder {shards}")
            return found
        import braceexpand

        return list(braceexpand.braceexpand(shards))
    return [str(s) for s in shards]
