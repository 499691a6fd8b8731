"""Checkpoints that make a resumed run bit-identical to one that never stopped.

Layout (one directory per saved step, shared by all ranks):

    <dir>/latest                       the tag of the newest complete checkpoint (replaced atomically)
    <dir>/step_00000100/               DeepSpeed's files: module, optimiser (ZeRO partitions), scheduler
    <dir>/step_00000100/trainer_rank00000.pt   per-rank state: loader position, RNG states (torch, numpy, python)
    <dir>/step_00000100/meta.json      step, epoch, world size, config, git commit, manifest digest, metrics

A checkpoint is written to `step_X.tmp/`, every rank waits at a barrier, then rank 0 renames it to
`step_X/` and points `latest` at it: a run killed mid-write leaves only a `.tmp` folder that the
next save removes, never a half-written checkpoint that `latest` names. Only the newest
`keep_last` checkpoints are kept.

The directory must be one file system that every rank sees (NFS, Lustre, GPFS...): every rank
writes its ZeRO partition and its `trainer_rankNNNNN.pt` into `step_X.tmp/`, and rank 0 alone
renames, points `latest` and prunes. `CheckpointManager.preflight()` (run by the trainer before it
resumes or trains) proves it: rank 0 writes a token file, every rank must read the same token back,
else every rank stops with an error naming the directory and the ranks (and hosts) that cannot see it.

The per-rank files hold plain Python containers and tensors only, written with torch.save;
they are internal to a run (released models never contain pickles: see release.py).
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from crystalfm_common.atomic import write_text_atomic

LATEST = "latest"
META = "meta.json"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": _tuple_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_plain_to_numpy_state(state["numpy"]))
    random.setstate(_list_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _plain_to_numpy_state(plain: dict):
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["name"], keys, plain["pos"], plain["has_gauss"], plain["cached"])


def _tuple_to_list(value):
    return [_tuple_to_list(v) for v in value] if isinstance(value, tuple) else value


def _list_to_tuple(value):
    return tuple(_list_to_tuple(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------- manager
class CheckpointManager:
    """Save, find and load the trainer's checkpoints (every method is collective unless noted)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = max(1, int(keep_last))

    # -------------------------------------------------------------- queries (any rank, no comms)
    def latest_tag(self) -> str | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.match(p.name))

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """`auto` → latest in this directory (or None); `none` → None; a path → (its parent, its tag)."""
        if resume in ("", "none", "no", "false"):
            return None
        if resume in ("auto", LATEST):
            tag = self.latest_tag()
            return (self.dir, tag) if tag else None
        path = Path(resume)
        if (path / LATEST).is_file():  # a checkpoint directory: take its latest
            return path, (path / LATEST).read_text().strip()
        if not (path / META).is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume!r} is neither a checkpoint directory nor a step folder with {META}")
        return path.parent, path.name

    # -------------------------------------------------------------- preflight
    def preflight(self, wait_s: float = 10.0) -> None:
        """Collective: fail on every rank, before any training, unless all ranks share `self.dir`.

        Rank 0 creates the directory and writes a random token to `.preflight-<token>`; after a
        barrier every rank reads it (retrying for `wait_s` seconds, for file systems whose
        attribute caches lag); the outcomes are gathered, so all ranks raise the same error.
        """
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        problem = None
        token = secrets.token_hex(8)
        if rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                (self.dir / f".preflight-{token}").write_text(token)
            except OSError as exc:
                problem = f"cannot write there ({exc.strerror or exc})"
        box = [token, problem]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        token, problem = box
        if problem is None:
            problem = _read_token(self.dir, token, wait_s) if rank != 0 else None
        reports = [(rank, socket.gethostname(), str(self.dir.resolve()), problem)]
        if dist.is_initialized():
            reports = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(reports, (rank, socket.gethostname(), str(self.dir.resolve()), problem))
        _barrier()
        if rank == 0 and problem is None:
            (self.dir / f".preflight-{token}").unlink(missing_ok=True)
        failed = [r for r in reports if r[3] is not None]
        if failed:
            lines = "\n".join(f"  rank {r} on {host}: {path}: {why}" for r, host, path, why in failed)
            raise RuntimeError(
                f"checkpoint directory {reports[0][2]} (written by rank 0 on {reports[0][1]}) is not shared by "
                f"every rank:\n{lines}\nCheckpoints need one directory that all {world} ranks see (rank 0 renames and "
                "prunes what every rank wrote): put run.root (or checkpoint.dir) on a shared file system (NFS, Lustre, "
                "GPFS) mounted at the same path on every node, not on a node-local disk such as /tmp.")

    # -------------------------------------------------------------- save
    def save(self, engine, step: int, rank_state: dict, meta: dict, pause_s: float = 0.0) -> Path:
        """Collective. `pause_s` waits that long after the files are written, before the rename (test-only:
        it stands in for a slow parallel file system; the trainer passes CRYSTALFM_TEST_SLOW_SAVE_S)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        tag = tag_for(step)
        tmp_tag = tag + ".tmp"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
        _barrier()
        # DeepSpeed writes module/optimiser/scheduler (all ranks take part: ZeRO partitions).
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
        torch.save(rank_state, self.dir / tmp_tag / rank_file(rank))
        if pause_s > 0:
            if rank == 0:
                print(f"crystalfm pretrain: test hook: saving {tag} takes {pause_s:g} s more (CRYSTALFM_TEST_SLOW_SAVE_S)",
                      flush=True)
            time.sleep(pause_s)
        _barrier()
        if rank == 0:
            (self.dir / tmp_tag / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            final = self.dir / tag
            if final.exists():
                shutil.rmtree(final)
            os.rename(self.dir / tmp_tag, final)
            write_text_atomic(self.dir / LATEST, tag)
            self._prune()
        _barrier()
        return self.dir / tag

    def _prune(self) -> None:
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tags = self.tags()
        for old in tags[: -self.keep_last]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    # -------------------------------------------------------------- load
    def load(self, engine, directory: Path, tag: str, world_size: int) -> tuple[dict, dict]:
        """Load module/optimiser/scheduler into `engine`; return (this rank's state, meta)."""
        meta = json.loads((directory / tag / META).read_text())
        if meta.get("world_size") not in (None, world_size):
            raise RuntimeError(
                f"checkpoint {directory / tag} was written by {meta['world_size']} ranks but this run has {world_size}: "
                "exact resume needs the same world size (release it and start a new run to change it)"
            )
        load_path, _ = engine.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")
        rank = dist.get_rank() if dist.is_initialized() else 0
        # Internal file written by this trainer (plain containers + tensors).
        rank_state = torch.load(directory / tag / rank_file(rank), map_location="cpu", weights_only=False)
        return rank_state, meta


def _read_token(directory: Path, token: str, wait_s: float) -> str | None:
    """None when this rank reads `token` back from directory/.preflight-<token>, else why not."""
    path = directory / f".preflight-{token}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.listdir(directory)  # refreshes NFS directory caches
            if path.read_text() == token:
                return None
            why = "the token file holds something else"
        except FileNotFoundError:
            why = "the directory does not exist here" if not directory.is_dir() else \
                f"rank 0's token file {path.name} is not visible here"
        except OSError as exc:
            why = f"cannot read it ({exc.strerror or exc})"
        if time.monotonic() >= deadline:
            return why
        time.sleep(0.5)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint step folder, or of the `latest` one of a checkpoint directory."""
    path = Path(checkpoint)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a crystalfm checkpoint (no {META}); pass <run>/checkpoints or one step_* folder")
    return json.loads((path / META).read_text())


def resolve_step_dir(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a crystalfm checkpoint (no {META}); pass <run>/checkpoints or one step_* folder")
    return path
