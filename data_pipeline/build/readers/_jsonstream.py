"""Streaming JSON: walk a huge `{key: {key: doc}}` object or `[doc, ...]` array one document at a time.

Why not ijson: its C backend (yajl2) and its pure-Python backend both reject the bare `NaN` and
`Infinity` tokens that real files (MPtrj, many pymatgen dumps) contain, and building documents
from ijson's events in Python runs at ~3 MB/s here. Instead this walks the outer containers by
hand and hands each *document* to the C-accelerated `json.JSONDecoder.raw_decode`, which accepts
NaN/Infinity (as Python's json does) and decodes at C speed. The text buffer holds one document
plus one read chunk, so memory does not grow with the file (a benchmark checks 1x vs 20x files).

Errors are reported as exceptions the readers turn into rejects:
  `Truncated`   the file ends inside a document (everything complete before it was yielded);
  `Malformed`   a syntax error that is not at the end of the data (the walk cannot resync).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterator, TextIO

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER_END = re.compile(r"[\s,\]}]")
_CHUNK = 1 << 20  # characters per read
_MAX_DOCUMENT = 1 << 30  # characters: a single document larger than this is not a document
_decoder = json.JSONDecoder()


class Truncated(ValueError):
    pass


class Malformed(ValueError):
    pass


class JsonStream:
    """A cursor over a text handle with just enough JSON to walk containers."""

    def __init__(self, handle: TextIO, chunk: int = _CHUNK):
        self.handle = handle
        self.chunk = chunk
        self.buf = ""
        self.pos = 0
        self.offset = 0  # characters dropped from the front of buf (for error positions)
        self.eof = False

    # ----------------------------------------------------------------------------- buffer
    def _read_more(self, at_least: int | None = None) -> bool:
        if self.eof:
            return False
        if self.pos > self.chunk:  # drop what has been consumed
            self.offset += self.pos
            self.buf = self.buf[self.pos :]
            self.pos = 0
        data = self.handle.read(max(self.chunk, at_least or 0))
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def position(self) -> int:
        return self.offset + self.pos

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the data)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read_more():
                return ""

    def expect(self, char: str, what: str) -> None:
        got = self.peek()
        if got != char:
            if got == "":
                raise Truncated(f"file ends where {what} ({char!r}) was expected, at character {self.position()}")
            raise Malformed(f"expected {char!r} ({what}) at character {self.position()}, found {got!r}")
        self.pos += 1

    def value(self) -> Any:
        """Decode one complete JSON value at the cursor (an object, array or string)."""
        self.peek()
        need = self.chunk
        while True:
            try:
                obj, end = _decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as error:
                near_end = error.pos >= len(self.buf) - 4096
                if not near_end:
                    raise Malformed(f"JSON syntax error at character {self.offset + error.pos}: {error.msg}") from None
                if len(self.buf) - self.pos > _MAX_DOCUMENT:
                    raise Malformed(f"a document larger than {_MAX_DOCUMENT} characters") from None
                if not self._read_more(need):
                    raise Truncated(
                        f"file ends inside a document starting at character {self.position()} ({error.msg})"
                    ) from None
                need *= 2  # a document spanning many chunks: grow reads so retries stay linear
                continue
            # A bare number can be cut by the buffer ("1" of "1e5"): only trust it once a delimiter
            # or the end of the data follows (containers and strings are always complete).
            if not isinstance(obj, (dict, list, str)):
                if _NUMBER_END.match(self.buf, end) is None and self._read_more():
                    continue
            self.pos = end
            return obj

    def key(self) -> str:
        key = self.value()
        if not isinstance(key, str):
            raise Malformed(f"object key is {type(key).__name__} at character {self.position()}")
        self.expect(":", "colon after a key")
        return key

    def next_member(self, first: bool, closing: str) -> bool:
        """After `{`/`[` or a member: True when another member follows (consumes the comma)."""
        char = self.peek()
        if char == closing:
            self.pos += 1
            return False
        if not first:
            if char != ",":
                if char == "":
                    raise Truncated(f"file ends inside a container, at character {self.position()}")
                raise Malformed(f"expected ',' or {closing!r} at character {self.position()}, found {char!r}")
            self.pos += 1
        elif char == "":
            raise Truncated(f"file ends inside a container, at character {self.position()}")
        return True


def iter_object(stream: JsonStream) -> Iterator[tuple[str, JsonStream]]:
    """Members of the object at the cursor: yields (key, stream positioned at the value). The
    caller must consume the value (with `stream.value()` or a nested iter_*) before continuing."""
    stream.expect("{", "an object")
    first = True
    while stream.next_member(first, "}"):
        first = False
        yield stream.key(), stream


def iter_array(stream: JsonStream) -> Iterator[Any]:
    """Elements of the array at the cursor, each decoded as one document."""
    stream.expect("[", "an array")
    first = True
    while stream.next_member(first, "]"):
        first = False
        yield stream.value()


def iter_documents(stream: JsonStream) -> Iterator[tuple[str, Any]]:
    """Documents of a JSON file in any of the common layouts, with a position label:
    `[doc, ...]` → ("[i]", doc); `{key: doc, ...}` → (key, doc); JSON lines / concatenated
    documents → ("line i", doc)."""
    first = stream.peek()
    if first == "[":
        for index, doc in enumerate(iter_array(stream)):
            yield f"[{index}]", doc
        return
    if first == "{":
        # One object: either a mapping of documents, or a single document / first JSON line. Decode
        # the whole first value only when it is small; a large one is walked member by member.
        doc = stream.value()
        if stream.peek() == "":
            if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()) and not _looks_like_document(doc):
                for key, value in doc.items():
                    yield key, value
            else:
                yield "line 0", doc
            return
        yield "line 0", doc
        index = 1
        while stream.peek() != "":
            yield f"line {index}", stream.value()
            index += 1
        return
    if first == "":
        return
    raise Malformed(f"a JSON file of documents must start with '[' or '{{', found {first!r}")


def _looks_like_document(doc: dict) -> bool:
    """A single MP-style document (has a structure or an id) rather than a mapping of documents."""
    return any(k in doc for k in ("structure", "material_id", "task_id", "entry_id", "@class", "jid", "atoms"))
