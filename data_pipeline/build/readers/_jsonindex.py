"""A byte index of the top-level members of a huge `{key: value, ...}` JSON file, without decoding it.

Why: decoding every MPtrj frame on the driver (~100 µs each, 1.58 M frames) and pickling the
dicts into task arguments kept only a handful of workers busy. The index is a numpy pass over the
bytes (~5 ns per byte), in blocks that can run as parallel tasks: it finds the quotes (escaped
ones excluded), the brackets outside strings and their depth, and records where each top-level
member's value ends. Tasks then decode their own byte ranges (`read_members`), and the index is
cached beside the build's work files keyed by the file's identity, so a resume re-reads nothing.

Positions are bytes; each boundary also carries its character position (bytes minus UTF-8
continuation bytes), so error messages name the same character as a sequential walk would.
Only plain files: a gzip stream cannot be read from the middle (readers fall back to their scan).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.build.readers._jsonstream import JsonStream

_BLOCK = 1 << 24  # bytes per numpy pass
# bytes.translate maps at C speed: brackets → +1 / -1 (as int8), everything else → 0
_BRACKETS = bytes(1 if c in b"{[" else 255 if c in b"}]" else 0 for c in range(256))
_QUOTE, _BACKSLASH = 34, 92


def member_boundaries(path: Path, block: int = _BLOCK) -> tuple[list[int], list[int]] | None:
    """(byte positions, character positions) of the top-level member boundaries of `path`:
    the first is just after the outer `{`, then one just after each top-level value that is an
    object or array. None when the file does not start with `{` (the caller scans it instead).
    Sequential here; the build runs `index_block` as tasks and chains the results the same way."""
    return chain_blocks(path, [index_block(*r) for r in block_ranges(path, block)])


def _unescaped(arr: np.ndarray, quotes: np.ndarray, carried: int) -> np.ndarray:
    """Quotes not preceded by an odd run of backslashes (`carried` backslashes end the previous block)."""
    keep = np.ones(len(quotes), dtype=bool)
    after_backslash = np.flatnonzero((quotes > 0) & (arr[np.maximum(quotes - 1, 0)] == _BACKSLASH))
    candidates = after_backslash.tolist() + ([0] if len(quotes) and quotes[0] == 0 and carried else [])
    for k in candidates:
        run, i = 0, int(quotes[k]) - 1
        while i >= 0 and arr[i] == _BACKSLASH:
            run, i = run + 1, i - 1
        if i < 0:
            run += carried
        keep[k] = run % 2 == 0
    return quotes[keep]


def read_members(path: Path, start: int, end: int | None, char_start: int, chunk: int) -> JsonStream:
    """A stream over the members in bytes [start, end) of `path` (`end=None`: to the end of the
    file, whose closing `}` then ends the object), positioned so that `iter_object` walks them as
    one object and error positions are the file's character positions."""
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read() if end is None else handle.read(end - start)
    text = data.decode("utf-8")
    body = text.lstrip(" \t\n\r")
    skipped = len(text) - len(body)
    if body.startswith(","):
        body = body[1:]
        skipped += 1
    stream = JsonStream(io.StringIO("{" + body + ("}" if end is not None else "")), chunk=chunk)
    stream.offset = char_start + skipped - 1  # the "{" added in front stands just before the first member
    return stream


def plan_ranges(boundaries: tuple[list[int], list[int]], target_bytes: int) -> Iterator[dict]:
    """Consecutive ranges of whole members of about `target_bytes` each (the last runs to EOF)."""
    byte_at, char_at = boundaries
    first = 0
    for i in range(1, len(byte_at)):
        if byte_at[i] - byte_at[first] >= target_bytes and i < len(byte_at) - 1:
            yield {"start": byte_at[first], "end": byte_at[i], "char": char_at[first]}
            first = i
    yield {"start": byte_at[first], "end": None, "char": char_at[first]}


def csv_record_ends(path: Path, block: int = _BLOCK) -> list[int]:
    """Byte positions just after every newline that ends a CSV record (a `\\n` outside quotes; a
    quoted field may hold line breaks, and `""` inside one toggles twice). One numpy pass."""
    ends: list[int] = []
    in_quotes, offset = False, 0
    with open(path, "rb") as handle:
        while True:
            data = handle.read(block)
            if not data:
                break
            arr = np.frombuffer(data, dtype=np.uint8)
            quotes = np.flatnonzero(arr == _QUOTE)
            newlines = np.flatnonzero(arr == 10)
            outside = (np.searchsorted(quotes, newlines) + in_quotes) % 2 == 0
            ends.extend((newlines[outside] + 1 + offset).tolist())
            in_quotes = bool((len(quotes) + in_quotes) % 2)
            offset += len(data)
    return ends


# ------------------------------------------------------------- the same index, in parallel blocks
# A block cannot know whether it starts inside a string, nor its depth. Quotes and escapes do not
# depend on that, so each block is indexed under both string-parity hypotheses, with depths relative
# to its start, and `chain_blocks` walks the blocks in order picking the hypothesis the previous
# block ends in. Only closing brackets at the block's lowest or next-lowest relative level can be
# member ends (the file's depth is ≥ 1 inside the outer object), so a block returns few positions.
def index_block(path: str, start: int, end: int) -> dict:
    """Ray task: the block [start, end) of `path` under both hypotheses (see above)."""
    with open(path, "rb") as handle:
        carried, look = 0, start
        while look > 0:  # a backslash run ending just before the block escapes its first quote
            step = min(look, 256)
            handle.seek(look - step)
            before = handle.read(step)
            run = len(before) - len(before.rstrip(b"\\"))
            carried += run
            if run < step:
                break
            look -= step
        handle.seek(start)
        data = handle.read(end - start)
    arr = np.frombuffer(data, dtype=np.uint8)
    quotes = np.flatnonzero(arr == _QUOTE)
    if carried or data.find(b"\\") >= 0:
        quotes = _unescaped(arr, quotes, carried)
    kinds = np.frombuffer(data.translate(_BRACKETS), dtype=np.int8)
    brackets = np.flatnonzero(kinds)
    parity = np.searchsorted(quotes, brackets) % 2
    ascii_only = data.isascii()
    cont = None if ascii_only else np.flatnonzero((arr & 0xC0) == 0x80)
    out = {"start": start, "quotes": int(len(quotes)), "continuations": 0 if ascii_only else int(len(cont)),
           "hypotheses": []}
    for in_string in (0, 1):
        outside = brackets[(parity + in_string) % 2 == 0]
        rel = np.cumsum(kinds[outside], dtype=np.int64)
        low = int(min(0, rel.min())) if len(rel) else 0
        closing = (kinds[outside] == -1) & (rel <= low + 1)
        ends = outside[closing] + 1
        out["hypotheses"].append({
            "delta": int(rel[-1]) if len(rel) else 0,
            "ends": (ends + start).tolist(),
            "levels": rel[closing].tolist(),
            "cont_before": [] if ascii_only else np.searchsorted(cont, ends).tolist(),
        })
    return out


def block_ranges(path: Path, block: int) -> list[tuple[str, int, int]]:
    size = Path(path).stat().st_size
    return [(str(path), start, min(start + block, size)) for start in range(0, size, block)]


def chain_blocks(path: Path, blocks: list[dict]) -> tuple[list[int], list[int]] | None:
    """`member_boundaries` from the blocks' results, in file order."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    opening = len(head) - len(head.lstrip())
    if head[opening : opening + 1] != b"{":
        return None
    byte_at = [opening + 1]
    char_at = [opening + 1 - sum(1 for b in head[: opening + 1] if b & 0xC0 == 0x80)]
    depth, in_string, chars_before = 0, 0, 0
    for block in blocks:
        h = block["hypotheses"][in_string]
        for position, level, cont in zip(h["ends"], h["levels"], h["cont_before"] or [0] * len(h["ends"])):
            if depth + level == 1:
                byte_at.append(position)
                char_at.append(position - chars_before - cont)
        depth += h["delta"]
        in_string = (in_string + block["quotes"]) % 2
        chars_before += block["continuations"]
    return byte_at, char_at
