"""The Ray build of a shard set: read → parse + validate → deduplicate → exclude → split → write.

Stages (each a small function below; `build` runs them in order):

1. prepare_output   refuse to clobber a finished shard set; open (or resume) the work dir.
2. parse_stage      the driver streams each reader's `scan()` in chunks of `chunk_size` entries;
                    one Ray task per chunk parses, validates and encodes its records and writes a
                    chunk file (encoded samples back to back + a JSON index, each renamed into place), so a
                    rerun after kill -9 skips every chunk already done. Results are consumed in
                    chunk order, so everything downstream sees one deterministic record order.
3. dedup_stage      on the driver: repeated keys, exact fingerprints and exact matches against
                    the `exclude` (benchmark test set) structures. Then one Ray task per batch
                    of (reduced formula) buckets runs spglib + StructureMatcher where needed.
4. split_stage      sha256(seed:group) → split; a seeded hash order inside each split.
5. write_stage      shards planned by the target byte size on the driver; one Ray task per shard
                    writes a deterministic tar (and its statistics) from the chunk files.
6. finish           rejects.jsonl, duplicates.jsonl, then manifest.json last, atomically.

Why Ray tasks and not Ray Data: the unit of work here is a chunk of one reader's stream, which is
also the unit of resume (a file per chunk) and of ordering (chunk number); tasks give exactly that
with bounded in-flight work and no hidden reordering, while Ray Data would need a custom
datasource for a single sequential scan (one 11 GB JSON file), `preserve_order` everywhere, and its
webdataset writer names files by uuid. Deduplication needs a global view anyway.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from data_pipeline.build.config import BuildConfig, SourceSpec
from data_pipeline.manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    ShardStats,
    dumps,
    manifest_digest,
)
from crystalfm_common.atomic import write_bytes_atomic
from crystalfm_common.provenance import REPO_ROOT, git_commit, git_dirty, package_version
from data_pipeline.build.shard_writer import BlobWriter, DeterministicTarWriter, read_members, sample_tar_bytes

WORK_DIR = "_work"
REJECTS_NAME = "rejects.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"
CHUNK_INDEX_VERSION = 2
BUCKET_BATCH = 256  # candidates per structural-matching task


class BuildError(RuntimeError):
    """A build that cannot start or finish; the message says what to do next."""


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    reused: bool = False  # True when a finished identical build was found and left as it was


# ---------------------------------------------------------------------------- small records
@dataclass(slots=True)
class RecordMeta:
    """What the driver keeps per parsed record (the record itself stays in its chunk file)."""

    name: str
    key: str
    source: int  # index into the build's source list
    group: str
    formula: str
    fingerprint: str
    num_atoms: int
    chunk: int  # index into the chunk path list
    json_ref: tuple[int, int]  # (offset, size) of the .json bytes in the chunk file
    arrays_ref: tuple[int, int]

    def tar_bytes(self) -> int:
        return sample_tar_bytes(self.name, {"json": self.json_ref[1], "safetensors": self.arrays_ref[1]})


@dataclass
class Dropped:
    record: RecordMeta
    how: str  # duplicate_key | exact | structural | excluded_exact | excluded | excluded_group
    matched: str  # the key it duplicates / the exclude-source key it matches


@dataclass
class SourceTally:
    name: str
    kind: str
    role: str  # "source" or "exclude"
    records_in: int = 0
    parsed: int = 0
    rejects: int = 0
    duplicates: int = 0
    excluded: int = 0
    written: int = 0

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "records_in": self.records_in, "parsed": self.parsed, "rejects": self.rejects}
        if self.role == "source":
            out.update(duplicates=self.duplicates, excluded=self.excluded, written=self.written)
        return out


@dataclass
class BuildState:
    """Everything the stages hand to each other, in global order."""

    config: BuildConfig
    out: Path
    work: Path
    specs: list[SourceSpec]
    roles: list[str]
    tallies: list[SourceTally]
    chunk_paths: list[str] = field(default_factory=list)
    records: list[RecordMeta] = field(default_factory=list)  # main sources, global order
    refs: list[RecordMeta] = field(default_factory=list)  # exclude sources
    rejects: list[dict] = field(default_factory=list)
    ref_rejects: int = 0
    dropped: list[Dropped] = field(default_factory=list)
    kept: list[RecordMeta] = field(default_factory=list)
    splits: dict[str, list[RecordMeta]] = field(default_factory=dict)
    executor: object = None


# ---------------------------------------------------------------------------- entry point
def build(config: BuildConfig, *, progress: bool = True, log: Callable[[str], None] | None = None,
          verbose: bool = False, keep_failed: bool = False) -> BuildResult:
    """Build (or resume, or recognise) the shard set described by `config` in `config.out`.

    verbose: print the full config (it is always in the manifest, `build_config`) and let Ray's
    workers print to this terminal. A build that fails with an error removes what this call
    created (`OUT/_work/`, partial shards, `OUT` itself when it made it) unless `keep_failed`;
    an interrupted one (Ctrl-C, a killed job) keeps `_work/` so a rerun resumes, and a failed
    resume keeps the `_work/` it started from."""
    log = log or (lambda msg: print(msg, flush=True))
    if not config.sources:
        raise BuildError("no sources: give a config file with `sources:`, or --source KIND:PATH, or --sample")
    out = Path(config.out)
    if verbose:
        log("crystalfm data build, config:\n" + _indent(config.to_yaml()))
    else:
        names = ", ".join(f"{s.name} ({s.kind})" for s in config.sources)
        log(f"crystalfm data build: {len(config.sources)} source(s) [{names}] → {out} "
            "(full config in manifest.json; --verbose prints it)")
    created = _Created.snapshot(out)
    started_ray = False
    try:
        finished = prepare_output(config, out, log)
        if finished is not None:
            return finished
        started_ray = config.executor == "ray" and connect_ray(config.ray_address, config.num_workers, log, verbose)
        state = _new_state(config, out)
        state.executor = RayExecutor(config.num_workers) if config.executor == "ray" else InlineExecutor()
        parse_stage(state, progress, log)
        dedup_stage(state, progress, log)
        split_stage(state)
        shard_infos = write_stage(state, progress, log)
        manifest = finish(state, shard_infos, log)
    except Exception:
        if not keep_failed:
            removed = created.remove_new(out)
            if removed:
                log(f"build failed: removed what it had created ({removed}); --keep-failed keeps it")
        if (keep_failed or created.work_existed) and (out / WORK_DIR).exists():
            why = "--keep-failed" if keep_failed else "it was there before this run"
            log(f"build failed: kept {out / WORK_DIR} ({why}); a rerun with the same config resumes from it, "
                "--force discards it")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return BuildResult(out=out, manifest=manifest)


@dataclass
class _Created:
    """What was in OUT before a build started, so a failed build removes only what it made."""

    out_existed: bool
    work_existed: bool
    entries: frozenset

    @classmethod
    def snapshot(cls, out: Path) -> "_Created":
        exists = out.is_dir()
        return cls(exists, (out / WORK_DIR).exists(), frozenset(p.name for p in out.iterdir()) if exists else frozenset())

    def remove_new(self, out: Path) -> str:
        """Remove this build's files; returns a short account ('' when nothing was removed)."""
        if self.work_existed or not out.is_dir():  # a failed resume: the earlier work stays resumable
            return ""
        new = [p for p in out.iterdir() if p.name not in self.entries]
        for path in new:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        files = sum(1 for p in new if p.name != WORK_DIR)
        what = " and ".join(([f"{out / WORK_DIR}/"] if any(p.name == WORK_DIR for p in new) else [])
                            + ([f"{files} partial file(s) in {out}"] if files else []))
        if not self.out_existed and not any(out.iterdir()):
            out.rmdir()
            what = f"{out}/ with {what}" if what else f"{out}/"
        return what


def _indent(text: str) -> str:
    return "".join("  " + line for line in text.splitlines(True))


def _new_state(config: BuildConfig, out: Path) -> BuildState:
    specs = list(config.sources) + list(config.exclude)
    roles = ["source"] * len(config.sources) + ["exclude"] * len(config.exclude)
    return BuildState(
        config=config,
        out=out,
        work=out / WORK_DIR,
        specs=specs,
        roles=roles,
        tallies=[SourceTally(s.name, s.kind, r) for s, r in zip(specs, roles)],
    )


# ---------------------------------------------------------------------------- 1. output dir
def prepare_output(config: BuildConfig, out: Path, log) -> BuildResult | None:
    """Return the finished build if one with the same config is there; else make the work dir."""
    fingerprint = config.fingerprint()
    manifest_file = out / MANIFEST_NAME
    work = out / WORK_DIR
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_bytes())
        same = manifest.get("config_fingerprint") == fingerprint
        if same and not config.force:
            log(
                f"{out} already holds a finished build of this config "
                f"(manifest sha256 {manifest_digest(out)}); nothing to do. Use --force to rebuild it."
            )
            shutil.rmtree(work, ignore_errors=True)  # a crash after the manifest can leave it
            return BuildResult(out=out, manifest=manifest, reused=True)
        if not config.force:
            raise BuildError(
                f"{out} holds a finished shard set built from a different config; choose another --out, "
                "or pass --force to replace it"
            )
        log(f"--force: removing the previous shard set in {out}")
        _remove_outputs(out)
    work_config = work / "config.json"
    if work_config.exists():
        previous = json.loads(work_config.read_bytes())
        if previous.get("fingerprint") != fingerprint:
            if not config.force:
                raise BuildError(
                    f"{work} holds an unfinished build of a different config; rerun with the same config to "
                    "resume it, or pass --force to discard it"
                )
            shutil.rmtree(work)
        else:
            log(f"resuming the unfinished build in {work}")
    elif out.exists() and any(p.name != WORK_DIR for p in out.iterdir()) and not config.force:
        raise BuildError(f"{out} exists and is not a shard set built by crystalfm; choose an empty or new --out")
    for sub in ("chunks", "buckets", "shards"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    if not work_config.exists():
        write_bytes_atomic(work_config, dumps({"fingerprint": fingerprint, "config": config.data_dict()}))
    for stale in [*out.glob("*.tmp*"), *work.glob("*/*.tmp*")]:  # left by a killed build
        stale.unlink()
    return None


def _remove_outputs(out: Path) -> None:
    for path in out.iterdir():
        if path.name == WORK_DIR:
            shutil.rmtree(path)
        elif path.suffix in (".tar", ".npy", ".json", ".jsonl") or ".tmp" in path.name:
            path.unlink()


# ---------------------------------------------------------------------------- executors
def connect_ray(address: str | None, num_workers: int | None, log, verbose: bool = True) -> bool:
    """Start local Ray in-process, or join a cluster; returns True when this call started Ray.
    Not verbose: workers' prints stay in Ray's session logs (errors still reach this process)."""
    import ray

    from crystalfm_common.console import local_ray_auth

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level="WARNING", configure_logging=True, log_to_driver=verbose)
    try:
        if address:
            log(f"joining the Ray cluster at {address}")
            ray.init(address=address, **kwargs)
        else:
            local_ray_auth()  # a local cluster runs without token auth: no warning about it on every start
            # address="local": always a fresh in-process cluster, never a stale or foreign one that
            # /tmp/ray/ray_current_cluster happens to name (ray.init() would try to attach to it).
            ray.init(address="local", num_cpus=num_workers or os.cpu_count(), **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray's start-up errors are generic; say what to do
        if ray.is_initialized():
            ray.shutdown()
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise BuildError(f"could not start {where} ({type(exc).__name__}: {exc}); on a busy machine retry when "
                         "the load is lower, or run the stages in this process with --inline") from exc
    return True


class RayExecutor:
    """Stage tasks as Ray tasks (one CPU each); results are fetched in submission order."""

    def __init__(self, num_workers: int | None):
        import ray

        self._ray = ray
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.parallelism = min(num_workers, cpus) if num_workers else cpus
        self._remotes: dict = {}

    def submit(self, fn, *args):
        if fn not in self._remotes:
            self._remotes[fn] = self._ray.remote(num_cpus=1, max_retries=2)(fn)
        return self._remotes[fn].remote(*args)

    def ready(self, handle) -> bool:
        return bool(self._ray.wait([handle], timeout=0)[0])

    def get(self, handle):
        return self._ray.get(handle)


class InlineExecutor:
    """The same task functions run in this process, one after another (debugging, tiny inputs).
    Gives byte-identical output to the Ray executor: the tests check that."""

    parallelism = 1

    def submit(self, fn, *args):
        return fn(*args)

    def ready(self, handle) -> bool:
        return True

    def get(self, handle):
        return handle


def run_resumable(ex, jobs, consume: Callable, *, desc: str, unit: str, progress: bool, window: int | None = None) -> int:
    """The loop every stage shares: reuse by digest or submit, then drain.

    jobs: (tag, finished result or None, task function, task args); a job whose result was found
    on disk (same digest) is not run again. `consume(tag, result)` sees the results in job order.
    window: a streaming stage keeps at most this many unconsumed jobs (it waits on the oldest
    beyond that, so a long scan never holds every chunk in memory); None submits all first.
    Returns how many jobs were reused."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs) if isinstance(jobs, list) else None, desc=desc, unit=unit, disable=not progress,
               dynamic_ncols=True)
    in_flight: deque = deque()  # (tag, done, result or task handle)
    reused = 0

    def consume_ready(drain: bool) -> None:
        while in_flight:
            tag, done, value = in_flight[0]
            if not done:
                if not (drain or len(in_flight) >= window) and not ex.ready(value):
                    return
                value = ex.get(value)
            in_flight.popleft()
            consume(tag, value)
            bar.update(1)

    for tag, result, fn, args in jobs:
        if result is not None:
            reused += 1
            in_flight.append((tag, True, result))
        else:
            in_flight.append((tag, False, ex.submit(fn, *args)))
        if window is not None:
            consume_ready(drain=False)
    consume_ready(drain=True)
    bar.close()
    return reused


# ---------------------------------------------------------------------------- 2. parse
def _chunks(state: BuildState, log) -> Iterator[tuple[int, int, list]]:
    """(source index, chunk number, entries) over every source's scan, in order."""
    size = state.config.chunk_size
    for src, spec in enumerate(state.specs):
        try:
            reader = open_reader(spec.kind, spec.path, **spec.options)
        except Exception as exc:  # noqa: BLE001 - a source that cannot be opened is a config error
            raise BuildError(f"source {spec.name!r} ({spec.kind}:{spec.path}) cannot be opened: {exc}") from exc
        chunk, number = [], 0
        scan = iter(reader.scan())
        while True:
            try:
                item = next(scan)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - a reader that dies mid-scan loses the rest, loudly
                from data_pipeline.build.readers import Reject

                reason = f"unparsable: scan of {spec.path} stopped after {number * size + len(chunk)} entries ({type(exc).__name__}: {exc})"
                log(f"warning: source {spec.name!r}: {reason}")
                chunk.append(Reject(key=f"{spec.name}:<scan>", source=spec.name, location=str(spec.path), reason=reason))
                break
            chunk.append(item)
            if len(chunk) == size:
                yield src, number, chunk
                chunk, number = [], number + 1
        if chunk:
            yield src, number, chunk


def _entries_digest(items: list) -> str:
    sha = hashlib.sha256()
    for item in items:
        sha.update(f"{type(item).__name__}\0{item.key}\0{item.location}\n".encode())
    return sha.hexdigest()


def parse_stage(state: BuildState, progress: bool, log) -> None:
    def jobs():
        for src, number, items in _chunks(state, log):
            spec = state.specs[src]
            path = state.work / "chunks" / f"{src:03d}-{number:07d}"
            digest = _entries_digest(items)
            source = {"kind": spec.kind, "path": spec.path, "options": spec.options, "name": spec.name}
            yield (src, str(path)), _load_chunk_index(path, digest), parse_chunk, (source, items, str(path), digest, state.config.pdd_k)

    reused = run_resumable(state.executor, jobs(), lambda tag, index: _absorb_chunk(state, *tag, index),
                           desc="parse (chunks)", unit="chunk", progress=progress, window=2 * state.executor.parallelism + 1)
    if reused:
        log(f"resumed: {reused} chunk(s) were already parsed")


def _load_chunk_index(path: Path, digest: str) -> dict | None:
    index_file = Path(f"{path}.json")
    if not index_file.exists() or not Path(f"{path}.bin").exists():
        return None
    index = json.loads(index_file.read_bytes())
    if index.get("version") != CHUNK_INDEX_VERSION or index.get("digest") != digest:
        return None  # the input changed under the same name: parse the chunk again
    return index


def _absorb_chunk(state: BuildState, src: int, path: str, index: dict) -> None:
    chunk = len(state.chunk_paths)
    state.chunk_paths.append(f"{path}.bin")
    tally = state.tallies[src]
    is_ref = state.roles[src] == "exclude"
    for item in index["items"]:
        tally.records_in += 1
        if item[0] == "reject":
            tally.rejects += 1
            if is_ref:
                state.ref_rejects += 1
            else:
                _, key, source, location, reason = item
                state.rejects.append({"key": key, "source": source, "location": location, "reason": reason})
            continue
        tally.parsed += 1
        _, name, key, group, formula, fingerprint, num_atoms, jo, js, so, ss = item
        meta = RecordMeta(name, key, src, group, formula, fingerprint, num_atoms, chunk, (jo, js), (so, ss))
        (state.refs if is_ref else state.records).append(meta)


def open_reader(kind: str, path: str, **options):
    """A registered reader kind, or `package.module:Class` for a reader outside the registry
    (it must be importable on every Ray worker, e.g. installed in the same environment)."""
    if ":" in kind:
        import importlib

        module, _, attr = kind.partition(":")
        return getattr(importlib.import_module(module), attr)(path, **options)
    from data_pipeline.build.readers import open_reader as open_registered

    return open_registered(kind, path, **options)


# Worker side: readers are opened once per worker process and reused across chunks.
_READERS: dict[str, object] = {}


def _worker_reader(source: dict):
    cache_key = json.dumps([source["kind"], source["path"], source["options"]], sort_keys=True)
    if cache_key not in _READERS:
        _READERS[cache_key] = open_reader(source["kind"], source["path"], **source["options"])
    return _READERS[cache_key]


def parse_chunk(source: dict, items: list, path: str, digest: str, pdd_k: int | None = None) -> dict:
    """Ray task: parse + validate + encode one chunk; writes `<path>.bin` then `<path>.json`."""
    from data_pipeline.build.readers import Reject

    reader = _worker_reader(source)
    out_items = []
    with BlobWriter(f"{path}.bin") as blob:
        for item in items:
            if isinstance(item, Reject):
                out_items.append(["reject", item.key, item.source, item.location, item.reason])
                continue
            result = process_entry(reader, item, pdd_k)
            if isinstance(result, str):
                out_items.append(["reject", item.key, item.source, item.location, result])
                continue
            sample, facts = result
            json_ref, arrays_ref = blob.write(sample["json"]), blob.write(sample["safetensors"])
            out_items.append(["record", sample["__key__"], *facts, *json_ref, *arrays_ref])
        blob.close()
    index = {"version": CHUNK_INDEX_VERSION, "digest": digest, "source": source["name"], "items": out_items}
    write_bytes_atomic(f"{path}.json", dumps(index))
    return index


def process_entry(reader, entry, pdd_k: int | None = None) -> tuple[dict, list] | str:
    """One raw entry → (encoded sample, [key, group, formula, fingerprint, n_atoms]) or a reason.
    With `pdd_k` the sample also stores the crystal's PDD rows (`record.pdd_features`)."""
    from data_pipeline.build.dedup import exact_fingerprint
    from data_pipeline.record import reduced_formula
    from data_pipeline.build.readers import RecordError
    from data_pipeline.shard_format import encode_record
    from data_pipeline.build.validate import validate

    try:
        record = reader.parse(entry)
        if entry.group and record.group == record.key:
            record.group = entry.group
        validate(record)
        if pdd_k is not None:
            from data_pipeline.record import with_pdd

            record = with_pdd(record, pdd_k)
        sample = encode_record(record)
    except RecordError as exc:
        return str(exc)
    except ValueError as exc:  # encode_record refuses non-finite labels
        return f"non_finite: {exc}" if "non-finite" in str(exc) else f"unparsable: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - one bad record never stops a build
        return f"unparsable: {type(exc).__name__}: {exc}"
    facts = [record.key, record.group, reduced_formula(record.atomic_numbers), exact_fingerprint(record), record.num_atoms]
    return sample, facts


# ---------------------------------------------------------------------------- 3. dedup + exclude
def dedup_stage(state: BuildState, progress: bool, log) -> None:
    """Drop repeated keys, exact duplicates and excluded structures, in global order (first wins)."""
    config = state.config
    dropped: list[Dropped] = []
    ref_fingerprints: dict[str, str] = {}
    for ref in state.refs:
        ref_fingerprints.setdefault(ref.fingerprint, ref.key)
    seen_names: dict[str, str] = {}
    seen_fingerprints: dict[str, str] = {}
    survivors = []
    for meta in state.records:
        mode = state.specs[meta.source].dedup
        if meta.name in seen_names:
            dropped.append(Dropped(meta, "duplicate_key", seen_names[meta.name]))
            continue
        seen_names[meta.name] = meta.key
        if meta.fingerprint in ref_fingerprints:
            dropped.append(Dropped(meta, "excluded_exact", ref_fingerprints[meta.fingerprint]))
            continue
        if mode != "none" and meta.fingerprint in seen_fingerprints:
            dropped.append(Dropped(meta, "exact", seen_fingerprints[meta.fingerprint]))
            continue
        seen_fingerprints.setdefault(meta.fingerprint, meta.key)
        survivors.append(meta)

    by_name = {m.name: m for m in survivors}
    gone: set[str] = set()
    for name, how, matched in structural_matches(state, survivors, progress, log):
        dropped.append(Dropped(by_name[name], how, matched))
        gone.add(name)

    if config.exclude_whole_group:
        excluded_groups: dict[str, str] = {}
        for d in dropped:
            if d.how.startswith("excluded"):
                excluded_groups.setdefault(d.record.group, d.matched)
        for meta in survivors:
            if meta.name not in gone and meta.group in excluded_groups:
                dropped.append(Dropped(meta, "excluded_group", excluded_groups[meta.group]))
                gone.add(meta.name)

    order = {id(m): i for i, m in enumerate(state.records)}
    state.dropped = sorted(dropped, key=lambda d: order[id(d.record)])
    state.kept = [m for m in survivors if m.name not in gone]
    for d in state.dropped:
        tally = state.tallies[d.record.source]
        if d.how.startswith("excluded"):
            tally.excluded += 1
        else:
            tally.duplicates += 1


def structural_matches(state: BuildState, survivors: list[RecordMeta], progress: bool, log) -> list[tuple[str, str, str]]:
    """Bucket by reduced formula; run StructureMatcher tasks only on buckets that need them."""
    config = state.config
    ex = state.executor
    check_exclude = config.exclude_match == "structural" and bool(state.refs)
    buckets: dict[str, list[tuple[str, RecordMeta]]] = {}
    if check_exclude:
        for ref in state.refs:
            buckets.setdefault(ref.formula, []).append(("ref", ref))
    for meta in survivors:
        buckets.setdefault(meta.formula, []).append(("record", meta))

    def needs_matching(members) -> bool:
        records = [m for role, m in members if role == "record"]
        if not records:
            return False
        if members[0][0] == "ref" and check_exclude:
            return True
        # A structural-dedup record needs matching when any record came before it in the bucket.
        return any(state.specs[m.source].dedup == "structural" for m in records[1:])

    work = [(formula, members) for formula, members in buckets.items() if len(members) > 1 and needs_matching(members)]
    batches, current, size = [], [], 0
    for formula, members in sorted(work, key=lambda fm: fm[0]):
        current.append((formula, members))
        size += len(members)
        if size >= BUCKET_BATCH:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    if not batches:
        return []

    matcher = config.matcher
    jobs = []
    for number, batch in enumerate(batches):
        path = state.work / "buckets" / f"{number:07d}.json"
        payload = [
            [[role, m.name, m.key, state.specs[m.source].dedup == "structural", state.chunk_paths[m.chunk], *m.json_ref, *m.arrays_ref]
             for role, m in members]
            for _, members in batch
        ]
        digest = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
        done = json.loads(path.read_bytes()) if path.exists() else None
        done = done if done is not None and done.get("digest") == digest else None
        jobs.append((number, done, match_buckets, (payload, _asdict(matcher), check_exclude, str(path), digest)))
    results: list[tuple[str, str, str]] = []
    run_resumable(ex, jobs, lambda _, result: results.extend(tuple(x) for x in result["dropped"]),
                  desc="dedup (formula buckets)", unit="batch", progress=progress)
    return results


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def match_buckets(payload: list, matcher: dict, check_exclude: bool, path: str, digest: str) -> dict:
    """Ray task: StructureMatcher within each bucket; writes its result file for resume."""
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import Candidate, match_bucket
    from data_pipeline.shard_format import decode_sample

    matcher_cfg = MatcherConfig(**matcher)
    dropped = []
    for members in payload:
        candidates = []
        for role, name, key, structural, tar, jo, js, so, ss in members:
            raw_json, raw_arrays = read_members(tar, [("json", jo, js), ("safetensors", so, ss)])
            record = decode_sample({"__key__": name, "json": raw_json, "safetensors": raw_arrays})
            candidates.append(Candidate(name=name, role=role, structural=structural, record=record))
        keys = {c.name: c.record.key for c in candidates}
        for name, how, matched in match_bucket(candidates, matcher_cfg, check_exclude):
            dropped.append([name, how, keys[matched]])
    result = {"digest": digest, "dropped": dropped}
    write_bytes_atomic(path, dumps(result))
    return result


# ---------------------------------------------------------------------------- 4. split
def split_stage(state: BuildState) -> None:
    from data_pipeline.build.split import assign_split, shuffle_key, split_group

    config = state.config
    state.splits = {name: [] for name in config.splits}
    for meta in state.kept:
        group = split_group(meta.group, meta.formula, config.split_by)
        state.splits[assign_split(group, config.splits, config.seed)].append(meta)
    for name, metas in state.splits.items():
        metas.sort(key=lambda m: shuffle_key(m.name, config.seed))


# ---------------------------------------------------------------------------- 5. write
def plan_shards(state: BuildState) -> list[tuple[str, str, list[RecordMeta]]]:
    """[(split, file name, records)] with each shard closed before it passes `shard_bytes`."""
    plan = []
    for split, metas in state.splits.items():
        current, size = [], 1024  # the tar end-of-archive blocks
        for meta in metas:
            extra = meta.tar_bytes()
            if current and size + extra > state.config.shard_bytes:
                plan.append((split, f"{split}-{len([p for p in plan if p[0] == split]):06d}.tar", current))
                current, size = [], 1024
            current.append(meta)
            size += extra
        if current:
            plan.append((split, f"{split}-{len([p for p in plan if p[0] == split]):06d}.tar", current))
    return plan


def write_stage(state: BuildState, progress: bool, log) -> list[dict]:
    from data_pipeline.shard_format import index_path

    jobs = []
    for split, file_name, metas in plan_shards(state):
        refs = [[state.chunk_paths[m.chunk], m.name, *m.json_ref, *m.arrays_ref] for m in metas]
        digest = hashlib.sha256(json.dumps(refs).encode()).hexdigest()
        sidecar = state.work / "shards" / f"{file_name}.json"
        target = state.out / file_name
        done = None
        if sidecar.exists() and target.exists() and Path(index_path(str(target))).exists():
            info = json.loads(sidecar.read_bytes())
            if info.get("digest") == digest and info.get("bytes") == target.stat().st_size and "index" in info:
                done = info
        jobs.append((file_name, done, write_shard, (refs, str(target), str(sidecar), split, digest)))
    infos: list[dict] = []
    run_resumable(state.executor, jobs, lambda _, info: infos.append(info), desc="write (shards)", unit="shard",
                  progress=progress)
    return infos


def write_shard(refs: list, target: str, sidecar: str, split: str, digest: str) -> dict:
    """Ray task: copy encoded samples from chunk files into one deterministic shard tar."""
    from data_pipeline.shard_format import ARRAYS_EXT, JSON_EXT, decode_sample, index_file_bytes, index_path

    by_chunk: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_chunk.setdefault(ref[0], []).append(i)
    samples: list[dict | None] = [None] * len(refs)
    for tar, positions in by_chunk.items():
        positions.sort(key=lambda i: refs[i][2])  # read each chunk file front to back
        wanted = [(m, off, size) for i in positions for m, off, size in (("json", refs[i][2], refs[i][3]), ("st", refs[i][4], refs[i][5]))]
        data = iter(read_members(tar, wanted))
        for i in positions:
            samples[i] = {"__key__": refs[i][1], "json": next(data), "safetensors": next(data)}
    stats = ShardStats()
    rows = []  # the shard's index (shard_format.INDEX_COLUMNS), so loaders need not scan the tar
    with DeterministicTarWriter(target) as writer:
        for sample in samples:
            writer.write(sample)
            record = decode_sample(sample)
            stats.add(record)
            name = sample["__key__"]
            rows.append([*writer.offsets[f"{name}.{JSON_EXT}"], *writer.offsets[f"{name}.{ARRAYS_EXT}"], record.num_atoms])
        sha, size = writer.close()
    index_bytes = index_file_bytes(rows)
    write_bytes_atomic(index_path(target), index_bytes)  # after the tar, before the sidecar that marks it done
    info = {
        "file": Path(target).name,
        "split": split,
        "num_samples": len(samples),
        "bytes": size,
        "sha256": sha,
        "index": {"file": Path(index_path(target)).name, "sha256": hashlib.sha256(index_bytes).hexdigest()},
        "digest": digest,
        "stats": stats.to_state(),
    }
    write_bytes_atomic(sidecar, dumps(info))
    return info


# ---------------------------------------------------------------------------- 6. finish
def finish(state: BuildState, shard_infos: list[dict], log) -> dict:
    """Side files, then manifest.json last (atomically): from then on the shard set exists."""
    out = state.out
    _remove_stray_shards(out, shard_infos)
    _write_jsonl(out / REJECTS_NAME, state.rejects)
    _write_jsonl(
        out / DUPLICATES_NAME,
        [{"key": d.record.key, "source": state.specs[d.record.source].name, "how": d.how, "matched": d.matched} for d in state.dropped],
    )
    splits, split_stats, total = _split_summary(state.config, shard_infos)
    counts = _counts(state, total)
    manifest = _manifest(state, splits, split_stats, total, counts)
    write_bytes_atomic(out / MANIFEST_NAME, dumps(manifest))  # last: the shard set now exists
    log(
        f"wrote {counts['written']} samples in {len(shard_infos)} shard(s) to {out} "
        f"(records in {counts['records_in']} = written {counts['written']} + rejects {counts['rejects']} + "
        f"duplicates {counts['duplicates']} + excluded {counts['excluded']}); manifest sha256 {manifest_digest(out)}"
    )
    if not state.config.keep_work:
        shutil.rmtree(state.work, ignore_errors=True)
    return manifest


def _remove_stray_shards(out: Path, shard_infos: list[dict]) -> None:
    planned = {info["file"] for info in shard_infos} | {info["index"]["file"] for info in shard_infos}
    for stray in [*out.glob("*.tar"), *out.glob("*.tar.idx.npy")]:  # of an earlier, different plan (--force)
        if stray.name not in planned:
            stray.unlink()


def _split_summary(config: BuildConfig, shard_infos: list[dict]) -> tuple[dict, dict, ShardStats]:
    """The manifest's per-split shard lists and the statistics per split and overall."""
    split_stats = {name: ShardStats() for name in config.splits}
    total = ShardStats()
    splits = {name: {"num_samples": 0, "num_atoms": 0, "shards": []} for name in config.splits}
    for info in shard_infos:
        stats = ShardStats.from_state(info["stats"])
        split_stats[info["split"]].merge(stats)
        total.merge(stats)
        splits[info["split"]]["shards"].append(
            {"file": info["file"], "num_samples": info["num_samples"], "bytes": info["bytes"], "sha256": info["sha256"],
             "index": info["index"]}
        )
    for name, stats in split_stats.items():
        splits[name]["num_samples"] = stats.num_samples
        splits[name]["num_atoms"] = stats.num_atoms
    return splits, split_stats, total


def _counts(state: BuildState, total: ShardStats) -> dict:
    """records_in = written + rejects + duplicates + excluded, checked (a build that loses records
    writes no manifest); also fills each source tally's `written`."""
    from data_pipeline.build.validate import reason_code

    main = [t for t in state.tallies if t.role == "source"]
    records_in = sum(t.records_in for t in main)
    rejects = len(state.rejects)
    duplicates = sum(1 for d in state.dropped if not d.how.startswith("excluded"))
    excluded = sum(1 for d in state.dropped if d.how.startswith("excluded"))
    written = total.num_samples
    balanced = records_in == written + rejects + duplicates + excluded
    if not balanced:
        raise BuildError(
            f"internal error: counts do not add up (records in {records_in} != written {written} + rejects {rejects} "
            f"+ duplicates {duplicates} + excluded {excluded}); the manifest was not written"
        )
    # Written per configured source (record.source is the reader's name, which sources may share).
    per_spec_written: dict[int, int] = {}
    for metas in state.splits.values():
        for m in metas:
            per_spec_written[m.source] = per_spec_written.get(m.source, 0) + 1
    for i, t in enumerate(state.tallies):
        if t.role == "source":
            t.written = per_spec_written.get(i, 0)

    rejects_by_code: dict[str, int] = {}
    for r in state.rejects:
        code = reason_code(r["reason"])
        rejects_by_code[code] = rejects_by_code.get(code, 0) + 1
    dup_by_how: dict[str, int] = {}
    for d in state.dropped:
        dup_by_how[d.how] = dup_by_how.get(d.how, 0) + 1
    return {
        "records_in": records_in,
        "written": written,
        "rejects": rejects,
        "duplicates": duplicates,
        "excluded": excluded,
        "balanced": balanced,
        "equation": "records_in = written + rejects + duplicates + excluded",
        "rejects_by_code": dict(sorted(rejects_by_code.items())),
        "dropped_by_how": dict(sorted(dup_by_how.items())),
    }


def _manifest(state: BuildState, splits: dict, split_stats: dict, total: ShardStats, counts: dict) -> dict:
    from data_pipeline.record import UNITS

    config = state.config
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "format": "webdataset tar; per sample <name>.json + <name>.safetensors (data_pipeline.shard_format)",
        "shard_format_version": _shard_format_version(),
        "code_version": code_version(),
        "config_fingerprint": config.fingerprint(),
        "build_config": config.data_dict(),
        "units": dict(UNITS),
        "counts": counts,
        "sources": {t.name: t.as_dict() for t in state.tallies if t.role == "source"},
        "exclude": {
            "match": config.exclude_match,
            "whole_group": config.exclude_whole_group,
            "sources": {t.name: t.as_dict() for t in state.tallies if t.role == "exclude"},
            "reference_structures": len(state.refs),
        },
        "splits": splits,
        "statistics": {"all": total.summary(), **{name: s.summary() for name, s in split_stats.items()}},
        "files": {"rejects": REJECTS_NAME, "duplicates": DUPLICATES_NAME},
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    payload = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows).encode()
    write_bytes_atomic(path, payload)


def _shard_format_version() -> int:
    from data_pipeline.shard_format import SCHEMA_VERSION

    return SCHEMA_VERSION


def code_version() -> dict:
    """The git commit of the code that built the shards (if it runs from a checkout) and the package version."""
    out: dict = {"package_version": package_version()}
    commit = git_commit()
    if commit is not None:
        out["git_commit"] = commit
        dirty = git_dirty(REPO_ROOT, "data_pipeline")
        out["git_dirty"] = bool(dirty)
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `crystalfm data build`")
