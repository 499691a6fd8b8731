"""The Ray build of a shard set: read → parse + validate → deduplicate → exclude → split → write.

Stages (each a small function below; `build` runs them in order):

1. prepare_output   refuse to clobber a finished shard set; open (or resume) the work dir.
2. parse_stage      the driver streams each reader's `scan()` in chunks of `chunk_size` entries;
                    one Ray task per chunk parses, validates and encodes its records and writes a
                    chunk file (encoded samples back to back + a JSON index, each renamed into place), so a
                    rerun after kill -9 skips every chunk already done. Results are consumed in
                    chunk order, so everything downstream sees one deterministic record order.
3. dedup_stage      on the driver: repeated keys, exact fingerprints and exact matches against
                    the `exclude` (benchmark test set) structures. Then StructureMatcher where
                    needed: formula buckets cut into pieces by the parse tasks' shape keys, Ray
                    tasks per batch of pieces (largest first), then tiles of representative
                    pairs across pieces, resolved on the driver in global order (dedup.py).
4. split_stage      sha256(seed:group) → split; a seeded hash order inside each split.
5. write_stage      shards planned by the target byte size on the driver; a shuffle writes them:
                    map tasks read each chunk file once into spill files in shard order, reduce
                    tasks write runs of deterministic tars (and statistics) from the spills.
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
from data_pipeline.build.shard_writer import BlobWriter, DeterministicTarWriter, sample_tar_bytes
# What the per-record task uses, imported once here rather than per record (~1 µs an import statement).
from data_pipeline.build.dedup import exact_fingerprint
from data_pipeline.build.readers.base import RecordError
from data_pipeline.build.validate import validate
from data_pipeline.record import reduced_formula
from data_pipeline.shard_format import encode_record

WORK_DIR = "_work"
REJECTS_NAME = "rejects.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"
CHUNK_INDEX_VERSION = 3  # 3: records carry the shape key (dedup.shape_key) when the build matches structurally
BUCKET_BATCH = 256  # candidates per phase-1 structural-matching task (small pieces are packed)
PAIRS_PER_TASK = 1024  # phase-2 comparisons per task (tiles of one split formula bucket are packed)
SHAPE_BATCH = 256  # records per shape-key task in the dedup stage (records of exact sources that meet structural ones)
DEDUP_VERSION = "shape-1"  # in the digests of matching results, so results of another algorithm are redone
SPILL_CHUNKS = 16  # chunk files read by one shuffle map task (its spill file holds their kept samples)


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
    shape: tuple | None = None  # dedup.shape_key, computed by the parse task when the build matches structurally

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
        if isinstance(state.executor, RayExecutor) and config.ray_address:
            log(f"Ray: {state.executor.placement()}")
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


def _on_node(fn, *args):
    """A stage task as Ray runs it: the result, and the address of the Ray node that ran it."""
    import ray

    return ray.util.get_node_ip_address(), fn(*args)


class RayExecutor:
    """Stage tasks as Ray tasks (one CPU each); results are fetched in submission order.
    `tasks_per_node` counts where they ran (node address → tasks), so a build on a cluster can say
    whether every node took part (`build()` logs it)."""

    def __init__(self, num_workers: int | None):
        import ray

        self._ray = ray
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.parallelism = min(num_workers, cpus) if num_workers else cpus
        self._remote = ray.remote(num_cpus=1, max_retries=2)(_on_node)
        self.tasks_per_node: dict[str, int] = {}

    def submit(self, fn, *args):
        return self._remote.options(name=fn.__name__).remote(fn, *args)

    def ready(self, handle) -> bool:
        return bool(self._ray.wait([handle], timeout=0)[0])

    def get(self, handle):
        node, result = self._ray.get(handle)
        self.tasks_per_node[node] = self.tasks_per_node.get(node, 0) + 1
        return result

    def placement(self) -> str:
        """`N task(s) on K Ray node(s) (ADDR: n, ...)`."""
        counts = ", ".join(f"{node}: {n}" for node, n in sorted(self.tasks_per_node.items()))
        return (f"{sum(self.tasks_per_node.values())} task(s) on {len(self.tasks_per_node)} Ray node(s)"
                + (f" ({counts})" if counts else ""))


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
def _chunks(state: BuildState, log) -> Iterator[tuple[int, int, list | dict]]:
    """(source index, chunk number, work) over every source in order. The work is a planned part
    (a dict the task reads itself, `readers.base`) for readers that plan, else a list of scanned
    entries (the driver walks the source)."""
    size = state.config.chunk_size
    for src, spec in enumerate(state.specs):
        try:
            reader = open_reader(spec.kind, spec.path, **spec.options)
            parts = _plan(state, src, reader, size)
        except Exception as exc:  # noqa: BLE001 - a source that cannot be opened is a config error
            raise BuildError(f"source {spec.name!r} ({spec.kind}:{spec.path}) cannot be opened: {exc}") from exc
        if parts is not None:
            number, parts = 0, iter(parts)
            while True:
                try:
                    part = next(parts)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - a plan that dies midway loses the rest, loudly
                    from data_pipeline.build.readers import Reject

                    reason = f"unparsable: planning {spec.path} stopped after {number} parts ({type(exc).__name__}: {exc})"
                    log(f"warning: source {spec.name!r}: {reason}")
                    yield src, number, [Reject(key=f"{spec.name}:<plan>", source=spec.name, location=str(spec.path), reason=reason)]
                    break
                yield src, number, {"part": part}
                number += 1
            continue
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


def _plan(state: BuildState, src: int, reader, entries: int):
    """The reader's parts, or None when it only scans. A reader with an `identity()` (one big
    file whose plan costs a pass over it) has its plan cached in the work folder under that
    identity, so a resumed build reads nothing on the driver."""
    if getattr(reader, "plan", None) is None or not state.config.plan_sources:
        return None
    identity = reader.identity() if hasattr(reader, "identity") else None
    if identity is None:
        return reader.plan(entries)
    import inspect

    if "map_tasks" in inspect.signature(reader.plan).parameters:  # planning that is itself parallel
        plan = lambda: reader.plan(entries, map_tasks=lambda fn, args: _map_tasks(state.executor, fn, args))  # noqa: E731
    else:
        plan = lambda: reader.plan(entries)  # noqa: E731
    digest = hashlib.sha256(json.dumps([identity, entries]).encode()).hexdigest()[:16]
    cache = state.work / "plans" / f"{src:03d}-{digest}.json"
    if cache.exists():
        cached = json.loads(cache.read_bytes())
        return None if cached["parts"] is None else iter(cached["parts"])
    parts = plan()
    parts = None if parts is None else list(parts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(str(cache), dumps({"identity": identity, "parts": parts}))
    return None if parts is None else iter(parts)


def _map_tasks(executor, fn, args_list: list) -> list:
    """fn(*args) for every args as tasks of the build's executor; results in order."""
    handles = [executor.submit(fn, *args) for args in args_list]
    return [executor.get(h) for h in handles]


def _entries_digest(items: list | dict) -> str:
    sha = hashlib.sha256()
    if isinstance(items, dict):  # a planned part: it names its content (member identities, byte range, file identity)
        sha.update(b"part\0" + json.dumps(items["part"], sort_keys=True).encode())
        return sha.hexdigest()
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
            yield (src, str(path)), _load_chunk_index(path, digest), parse_chunk, (source, items, str(path), digest,
                                                                                 state.config.pdd_k, _parse_shapes(state, src))

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
        _, name, key, group, formula, fingerprint, num_atoms, shape, jo, js, so, ss = item
        meta = RecordMeta(name, key, src, group, formula, fingerprint, num_atoms, chunk, (jo, js), (so, ss),
                          tuple(shape) if shape is not None else None)
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


def parse_chunk(source: dict, items: list, path: str, digest: str, pdd_k: int | None = None,
                shape_matcher: dict | None = None) -> dict:
    """Ray task: parse + validate + encode one chunk; writes `<path>.bin` then `<path>.json`.
    With `pdd_k` each sample also stores the crystal's PDD rows (`record.pdd_features`); with
    `shape_matcher` (the build's matcher config) each record also gets its dedup shape key.

    Stage by stage over the chunk rather than record by record: each stage's loop stays hot in the
    CPU's caches, which took ~25% off the task on MP-20 (the same work, records in the same order).
    A record that fails a stage keeps its reason (`_reject_reason`) and skips the later stages."""
    from data_pipeline.build.readers import Reject

    reader = _worker_reader(source)
    if isinstance(items, dict):
        items = _read_part(reader, source, items["part"])
    entries = list(items)
    reasons = [entry.reason if isinstance(entry, Reject) else None for entry in entries]  # None: still going
    records = list(entries)  # each entry becomes its record, stage by stage
    _each(records, reasons, lambda entry: _parsed(reader, entry))
    _each(records, reasons, _validated)
    if pdd_k is not None:
        from data_pipeline.record import with_pdd

        _each(records, reasons, lambda record: with_pdd(record, pdd_k))
    samples = list(records)
    _each(samples, reasons, encode_record)
    facts = [None if reason is not None else _record_facts(record, shape_matcher) for record, reason in zip(records, reasons)]

    out_items = []
    with BlobWriter(f"{path}.bin") as blob:
        for entry, sample, fact, reason in zip(entries, samples, facts, reasons):
            if reason is not None:
                out_items.append(["reject", entry.key, entry.source, entry.location, reason])
                continue
            json_ref, arrays_ref = blob.write(sample["json"]), blob.write(sample["safetensors"])
            out_items.append(["record", sample["__key__"], *fact, *json_ref, *arrays_ref])
        blob.close()
    index = {"version": CHUNK_INDEX_VERSION, "digest": digest, "source": source["name"], "items": out_items}
    # compact: json's C encoder (an indent makes it encode in Python, ~5 µs a record); only json.loads reads it
    write_bytes_atomic(f"{path}.json", json.dumps(index, separators=(",", ":"), allow_nan=False).encode())
    return index


def _read_part(reader, source: dict, part: dict) -> Iterator:
    """A planned part's entries, read in this task; a reader that fails mid-part loses the rest of
    the part only, with a reject saying so."""
    from data_pipeline.build.readers import Reject

    count = 0
    try:
        for item in reader.scan_part(part):
            count += 1
            yield item
    except Exception as exc:  # noqa: BLE001 - one bad part never stops a build
        reason = (f"unparsable: reading a part of {source['path']} stopped after {count} entries "
                  f"({type(exc).__name__}: {exc})")
        yield Reject(key=f"{source['name']}:<part>", source=source["name"], location=str(source["path"]), reason=reason)


def _each(values: list, reasons: list, step: Callable) -> None:
    """values[i] = step(values[i]) for every item without a reason yet; a failure becomes its reason."""
    for i, value in enumerate(values):
        if reasons[i] is None:
            try:
                values[i] = step(value)
            except Exception as exc:  # noqa: BLE001 - one bad record never stops a build
                reasons[i] = _reject_reason(exc)


def _reject_reason(exc: Exception) -> str:
    """The reject reason of a record whose parse, validation, PDD rows or encoding raised `exc`."""
    if isinstance(exc, RecordError):
        return str(exc)
    if isinstance(exc, ValueError):  # encode_record refuses non-finite labels
        return f"non_finite: {exc}" if "non-finite" in str(exc) else f"unparsable: {type(exc).__name__}: {exc}"
    return f"unparsable: {type(exc).__name__}: {exc}"


def _parsed(reader, entry):
    record = reader.parse(entry)
    if entry.group and record.group == record.key:
        record.group = entry.group
    return record


def _validated(record):
    validate(record)
    return record


def _record_facts(record, shape_matcher: dict | None = None) -> list:
    """[key, group, formula, fingerprint, n_atoms, shape] of a valid record: what the driver's dedup
    needs. The shape key (dedup.shape_key) only with `shape_matcher`, else None."""
    shape = None
    if shape_matcher is not None:
        from data_pipeline.build.config import MatcherConfig
        from data_pipeline.build.dedup import shape_key

        shape = list(shape_key(record, MatcherConfig(**shape_matcher)))
    return [record.key, record.group, reduced_formula(record.atomic_numbers), exact_fingerprint(record), record.num_atoms,
            shape]


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


def needs_shape_keys(config: BuildConfig) -> bool:
    """Whether the build may run StructureMatcher (then records it compares need shape keys)."""
    return any(s.dedup == "structural" for s in config.sources) or (bool(config.exclude) and config.exclude_match == "structural")


def _parse_shapes(state: BuildState, src: int) -> dict | None:
    """The matcher config when the parse tasks of source `src` should compute shape keys, else None.
    Every record meets the references of a structural `exclude`, so then all get one; otherwise only
    records of `structural` sources do, and the few other records that share a formula bucket with
    them get theirs in the dedup stage (`_fill_shapes`): a key costs a Niggli reduction (~5-20 ms),
    which a build with one small structural source used to pay for every record."""
    config = state.config
    if not needs_shape_keys(config):
        return None
    if config.exclude and config.exclude_match == "structural":
        return _asdict(config.matcher)
    if state.roles[src] != "exclude" and state.specs[src].dedup == "structural":
        return _asdict(config.matcher)
    return None


def _fill_shapes(state: BuildState, missing: list[RecordMeta], progress: bool) -> None:
    """Shape keys, in Ray tasks, for the records about to be matched whose parse did not compute one
    (same function, same bytes in: the same key the parse task would have stored)."""
    matcher = _asdict(state.config.matcher)
    jobs = []
    for number, start in enumerate(range(0, len(missing), SHAPE_BATCH)):
        batch = missing[start : start + SHAPE_BATCH]
        payload = [_member(state, m) for m in batch]
        path = state.work / "shapes" / f"s{number:07d}.json"
        digest = hashlib.sha256(json.dumps([DEDUP_VERSION, matcher, payload]).encode()).hexdigest()
        done = json.loads(path.read_bytes()) if path.exists() else None
        done = done if done is not None and done.get("digest") == digest else None
        jobs.append((batch, done, shape_keys_task, (payload, matcher, str(path), digest)))

    def absorb(batch, result) -> None:
        for meta, shape in zip(batch, result["shapes"]):
            meta.shape = tuple(shape)

    (state.work / "shapes").mkdir(parents=True, exist_ok=True)
    run_resumable(state.executor, jobs, absorb, desc="dedup (shape keys)", unit="task", progress=progress)


def shape_keys_task(payload: list, matcher: dict, path: str, digest: str) -> dict:
    """Ray task: the dedup shape key of each member (read back from its chunk file)."""
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import shape_key

    cfg = MatcherConfig(**matcher)
    shapes = [list(shape_key(c.record, cfg)) for c in _candidates(payload, "record")]
    result = {"digest": digest, "shapes": shapes}
    write_bytes_atomic(path, dumps(result))
    return result


def structural_matches(state: BuildState, survivors: list[RecordMeta], progress: bool, log) -> list[tuple[str, str, str]]:
    """Bucket by reduced formula; cut big buckets into pieces by shape (dedup.plan_pieces); match
    pieces in Ray tasks, largest first (phase 1); compare representatives across the pieces of a
    cut bucket in tiles (phase 2) and resolve them in global order. [(name, how, matched key)]."""
    from data_pipeline.build.dedup import UNKNOWN_SHAPE, pair_tiles, plan_pieces, resolve_representatives, shape_tolerance

    config = state.config
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

    tol = shape_tolerance(config.matcher)
    shape = lambda m: m.shape if m.shape is not None else UNKNOWN_SHAPE  # noqa: E731
    matched = [(formula, members) for formula, members in sorted(buckets.items())
               if len(members) >= 2 and needs_matching(members)]
    missing = [m for _, members in matched for _, m in members if m.shape is None]
    if missing:
        _fill_shapes(state, missing, progress)
    pieces = []  # (formula, refs, records of the piece in global order)
    cut_buckets = []  # (formula, records, piece number of each record)
    for formula, members in matched:
        refs = [m for role, m in members if role == "ref"]
        records = [m for role, m in members if role == "record"]
        cut = plan_pieces([shape(m) for m in records], config.dedup_group_size, tol)
        piece_of = [0] * len(records)
        for p, positions in enumerate(cut):
            for i in positions:
                piece_of[i] = p
            pieces.append((formula, refs, [records[i] for i in positions]))
        if len(cut) > 1:
            cut_buckets.append((formula, records, piece_of))
    if not pieces:
        return []

    # Phase 1: pieces packed into tasks, largest (most comparisons) first; results merged by position.
    order = sorted(range(len(pieces)), key=lambda p: (-len(pieces[p][2]) * (len(pieces[p][2]) + len(pieces[p][1])), p))
    batches, current, size = [], [], 0
    for p in order:
        current.append(p)
        size += len(pieces[p][1]) + len(pieces[p][2])
        if size >= BUCKET_BATCH:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    matcher = _asdict(config.matcher)
    jobs = []
    for number, batch in enumerate(batches):
        payload = [[[_member(state, m) for m in pieces[p][1]], [_member(state, m) for m in pieces[p][2]]] for p in batch]
        jobs.append(_matching_job(state, f"p{number:07d}", payload, match_pieces_task, matcher, check_exclude, batch))
    dropped_at: dict[int, tuple[str, str]] = {}  # id(record meta) → (how, matched key)
    stats = {"tasks": 0, "fits": 0, "max_fits": 0}

    def absorb_pieces(batch, result) -> None:
        for (k, i, how, j) in result["dropped"]:
            _, refs, records = pieces[batch[k]]
            dropped_at[id(records[i])] = (how, refs[j].key if how == "excluded" else records[j].key)
        _count(stats, result)

    run_resumable(state.executor, jobs, absorb_pieces, desc="dedup (pieces)", unit="task", progress=progress)

    # Phase 2: representatives of different pieces of a cut bucket, compared in tiles.
    resolve = []
    jobs = []
    for formula, records, piece_of in sorted(cut_buckets, key=lambda b: (-len(b[1]), b[0])):
        reps = [i for i, m in enumerate(records) if id(m) not in dropped_at]
        structural = [state.specs[m.source].dedup == "structural" for m in records]
        shapes = [shape(m) for m in records]
        resolve.append((records, reps, structural, set()))
        packed: list[tuple[int, int]] = []
        for tile in pair_tiles(reps, shapes, piece_of, structural, tol) + [None]:
            if packed and (tile is None or len(packed) + len(tile) > PAIRS_PER_TASK):
                involved = sorted({i for pair in packed for i in pair})
                at = {i: k for k, i in enumerate(involved)}
                payload = [[_member(state, records[i]) for i in involved], [[at[a], at[b]] for a, b in packed]]
                jobs.append(_matching_job(state, f"t{len(jobs):07d}", payload, match_pairs_task, matcher, False,
                                          (len(resolve) - 1, involved)))
                packed = []
            if tile is not None:
                packed.extend(tile)

    def absorb_pairs(tag, result) -> None:
        bucket, involved = tag
        for a, b in result["fits"]:
            resolve[bucket][3].add((involved[a], involved[b]))
        _count(stats, result)

    if jobs:
        run_resumable(state.executor, jobs, absorb_pairs, desc="dedup (merge tiles)", unit="task", progress=progress)
    for records, reps, structural, fits in resolve:
        for b, a in resolve_representatives(reps, structural, fits):
            dropped_at[id(records[b])] = ("structural", records[a].key)

    log(f"dedup: {stats['fits']} structure comparisons in {stats['tasks']} task(s) over {len(pieces)} piece(s) "
        f"({len(cut_buckets)} formula bucket(s) cut); most in one task: {stats['max_fits']}")
    return [(m.name, *dropped_at[id(m)]) for m in survivors if id(m) in dropped_at]


def _member(state: BuildState, m: RecordMeta) -> list:
    """What a matching task needs of one structure: where its bytes are, its role and shape."""
    return [m.name, state.specs[m.source].dedup == "structural", state.chunk_paths[m.chunk], *m.json_ref, *m.arrays_ref,
            list(m.shape) if m.shape is not None else None]


def _matching_job(state: BuildState, name: str, payload: list, fn, matcher: dict, check_exclude: bool, tag):
    path = state.work / "buckets" / f"{name}.json"
    digest = hashlib.sha256(json.dumps([DEDUP_VERSION, matcher, check_exclude, payload]).encode()).hexdigest()
    done = json.loads(path.read_bytes()) if path.exists() else None
    done = done if done is not None and done.get("digest") == digest else None
    return tag, done, fn, (payload, matcher, check_exclude, str(path), digest)


def _count(stats: dict, result: dict) -> None:
    stats["tasks"] += 1
    stats["fits"] += result["fits_run"]
    stats["max_fits"] = max(stats["max_fits"], result["fits_run"])


def _asdict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _candidates(members: list, role: str) -> list:
    from data_pipeline.build.dedup import Candidate
    from data_pipeline.shard_format import decode_sample

    out = []
    for name, structural, tar, jo, js, so, ss, shape in members:
        with open(tar, "rb") as handle:
            raw_json, raw_arrays = _read_exact(handle, tar, name, jo, js), _read_exact(handle, tar, name, so, ss)
        try:
            record = decode_sample({"__key__": name, "json": raw_json, "safetensors": raw_arrays})
        except Exception as exc:  # noqa: BLE001 - a damaged work file: say which file and record
            raise BuildError(f"work file {tar}: record {name!r} cannot be decoded for matching "
                             f"({type(exc).__name__}: {exc}); rerun with --force to rebuild it") from exc
        out.append(Candidate(name=name, role=role, structural=structural, record=record,
                             shape=tuple(shape) if shape is not None else None))
    return out


def match_pieces_task(payload: list, matcher: dict, check_exclude: bool, path: str, digest: str) -> dict:
    """Ray task, phase 1: each piece against its formula's references and its own representatives;
    writes its result file for resume. dropped: [piece in batch, record, how, matched ref/record]."""
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import PairMatcher, match_piece

    pm = PairMatcher(MatcherConfig(**matcher))
    dropped = []
    for k, (refs, records) in enumerate(payload):
        refs_c, records_c = _candidates(refs, "ref"), _candidates(records, "record")
        pm._reduced.clear()
        pm._shapes.clear()
        dropped.extend([k, i, how, j] for i, how, j in match_piece(records_c, refs_c, check_exclude, pm))
    result = {"digest": digest, "dropped": dropped, "fits_run": pm.fits}
    write_bytes_atomic(path, dumps(result))
    return result


def match_pairs_task(payload: list, matcher: dict, _check_exclude: bool, path: str, digest: str) -> dict:
    """Ray task, phase 2: which (earlier a, later b) pairs of representatives fit (b onto a)."""
    from data_pipeline.build.config import MatcherConfig
    from data_pipeline.build.dedup import PairMatcher

    members, pairs = payload
    pm = PairMatcher(MatcherConfig(**matcher))
    structures = _candidates(members, "record")
    fits = [[a, b] for a, b in pairs if pm.fit(b, structures[b], a, structures[a])]
    result = {"digest": digest, "fits": fits, "fits_run": pm.fits}
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
    """Shards through a shuffle, so no task opens every chunk file for every shard.

    Map tasks (`spill_chunks`): each reads SPILL_CHUNKS consecutive chunk files once, front to
    back, and writes one spill file holding their kept samples ordered by (shard, position in
    shard). Reduce tasks (`write_shards`): each writes a contiguous run of shards, opening every
    spill file once and reading one contiguous range of it per shard. File opens are chunks +
    maps + maps × reducers (reducers ≤ 2 × workers) instead of Σ over shards of the chunks they
    draw from (≈ shards × chunks). The driver computes every offset, so a shard's bytes depend
    only on the plan: they are the bytes the direct copy wrote, for any number of workers.
    """
    from data_pipeline.shard_format import index_path

    plan = plan_shards(state)
    infos: dict[str, dict] = {}
    pending = []  # (shard number, split, file name, metas, digest)
    for number, (split, file_name, metas) in enumerate(plan):
        refs = [[state.chunk_paths[m.chunk], m.name, *m.json_ref, *m.arrays_ref] for m in metas]
        digest = hashlib.sha256(json.dumps(refs).encode()).hexdigest()  # the shard's content, layout-free
        sidecar = state.work / "shards" / f"{file_name}.json"
        target = state.out / file_name
        if sidecar.exists() and target.exists() and Path(index_path(str(target))).exists():
            info = json.loads(sidecar.read_bytes())
            if info.get("digest") == digest and info.get("bytes") == target.stat().st_size and "index" in info:
                infos[file_name] = info
                continue
        pending.append((number, split, file_name, metas, digest))
    if pending:
        _shuffle_write(state, plan, pending, infos, progress)
        if not state.config.keep_work:
            shutil.rmtree(state.work / "spill", ignore_errors=True)
    return [infos[file_name] for _, file_name, _ in plan]


def _shuffle_write(state: BuildState, plan: list, pending: list, infos: dict, progress: bool) -> None:
    spill_dir = state.work / "spill"
    spill_dir.mkdir(parents=True, exist_ok=True)
    # Every kept sample's place: map task (by its chunk) and (shard, position) order inside the map.
    placed: dict[int, list[tuple[int, int, RecordMeta]]] = {}
    for number, (_, _, metas) in enumerate(plan):
        for position, m in enumerate(metas):
            placed.setdefault(m.chunk // SPILL_CHUNKS, []).append((number, position, m))
    where: dict[int, tuple[str, int]] = {}  # id(meta) → (spill path, offset of its json bytes)
    map_jobs: dict[int, tuple] = {}
    for spill in sorted(placed):
        rows = sorted(placed[spill], key=lambda t: (t[0], t[1]))
        path = str(spill_dir / f"{spill:07d}.bin")
        reads, offset = [], 0
        for _, _, m in rows:
            where[id(m)] = (path, offset)
            reads.append([state.chunk_paths[m.chunk], m.name, *m.json_ref, *m.arrays_ref])
            offset += m.json_ref[1] + m.arrays_ref[1]
        digest = hashlib.sha256(json.dumps([path, reads]).encode()).hexdigest()
        sidecar = Path(f"{path}.json")
        done = json.loads(sidecar.read_bytes()) if sidecar.exists() and Path(path).exists() else None
        if done is not None and (done.get("digest") != digest or Path(path).stat().st_size != offset):
            done = None
        map_jobs[spill] = (spill, done, spill_chunks, (reads, path, digest))
    needed = sorted({m.chunk // SPILL_CHUNKS for _, _, _, metas, _ in pending for m in metas})
    run_resumable(state.executor, [map_jobs[k] for k in needed], lambda *_: None, desc="write (shuffle map)",
                  unit="spill", progress=progress)

    reducers = max(1, min(len(pending), 2 * state.executor.parallelism))
    per = -(-len(pending) // reducers)
    jobs = []
    for start in range(0, len(pending), per):
        shards = []
        for _, split, file_name, metas, digest in pending[start:start + per]:
            refs = []
            for m in metas:
                path, offset = where[id(m)]
                refs.append([path, m.name, offset, m.json_ref[1], offset + m.json_ref[1], m.arrays_ref[1]])
            shards.append([refs, str(state.out / file_name), str(state.work / "shards" / f"{file_name}.json"), split, digest])
        jobs.append((start, None, write_shards, (shards,)))
    run_resumable(state.executor, jobs, lambda _, result: infos.update((info["file"], info) for info in result),
                  desc="write (shards)", unit="reducer", progress=progress)


def spill_chunks(reads: list, path: str, digest: str) -> dict:
    """Ray task (shuffle map): copy samples from chunk files into one spill file, in the given order,
    reading each chunk file once front to back; a sidecar marks it done."""
    by_chunk: dict[str, list[int]] = {}
    for i, (chunk, *_) in enumerate(reads):
        by_chunk.setdefault(chunk, []).append(i)
    data: list[bytes] = [b""] * len(reads)
    for chunk, positions in by_chunk.items():
        positions.sort(key=lambda i: reads[i][2])
        with open(chunk, "rb") as handle:
            for i in positions:
                _, name, jo, js, so, ss = reads[i]
                data[i] = _read_exact(handle, chunk, name, jo, js) + _read_exact(handle, chunk, name, so, ss)
    with BlobWriter(path) as blob:
        for item in data:
            blob.write(item)
        blob.close()
    result = {"digest": digest, "samples": len(reads)}
    write_bytes_atomic(f"{path}.json", dumps(result))
    return result


def _read_exact(handle, path: str, name: str, offset: int, size: int) -> bytes:
    """size bytes at offset, or an error naming the work file and the record (a truncated file)."""
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise BuildError(f"work file {path} is truncated: record {name!r} needs bytes {offset}..{offset + size}, "
                         f"got {len(data)}; rerun with --force to rebuild it")
    return data


def write_shards(shards: list) -> list[dict]:
    """Ray task (shuffle reduce): write a run of shards, each spill file opened once for all of them."""
    handles: dict = {}
    try:
        return [write_shard(*shard, handles) for shard in shards]
    finally:
        for handle in handles.values():
            handle.close()


def write_shard(refs: list, target: str, sidecar: str, split: str, digest: str, handles: dict | None = None) -> dict:
    """Copy encoded samples, located by [file, name, json offset, size, arrays offset, size], into
    one deterministic shard tar (+ its index and statistics). handles: open files to reuse."""
    from data_pipeline.shard_format import ARRAYS_EXT, JSON_EXT, decode_sample, index_file_bytes, index_path

    handles = {} if handles is None else handles
    by_file: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_file.setdefault(ref[0], []).append(i)
    samples: list[dict | None] = [None] * len(refs)
    for path, positions in by_file.items():
        if path not in handles:
            handles[path] = open(path, "rb")
        handle = handles[path]
        for i in sorted(positions, key=lambda i: refs[i][2]):  # read front to back
            _, name, jo, js, so, ss = refs[i]
            samples[i] = {"__key__": name, "json": _read_exact(handle, path, name, jo, js),
                          "safetensors": _read_exact(handle, path, name, so, ss)}
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
