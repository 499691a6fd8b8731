"""The streaming JSON walker used by the mptrj, mp_docs and jarvis readers."""
from __future__ import annotations

import io
import json
import math

import pytest

from data_pipeline.build.readers._jsonstream import JsonStream, Malformed, Truncated, iter_array, iter_documents, iter_object


def walk_nested(text: str, chunk: int) -> list[tuple[str, str, object]]:
    stream = JsonStream(io.StringIO(text), chunk=chunk)
    out = []
    for outer, _ in iter_object(stream):
        for inner, _ in iter_object(stream):
            out.append((outer, inner, stream.value()))
    return out


DOC = {"m1": {"f1": {"x": [1.5, 2], "s": "a \"quoted\" , NaN }"}, "f2": {"x": [3]}}, "m2": {}, "m3": {"f3": {"y": None}}}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_nested_walk_any_chunk_size(chunk):
    text = json.dumps(DOC, indent=2)
    assert walk_nested(text, chunk) == [(m, f, v) for m, frames in DOC.items() for f, v in frames.items()]


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_bare_nan_and_infinity_and_numbers_at_chunk_edges(chunk):
    text = '[{"a": NaN, "b": [Infinity, -Infinity, 12345678901234567890.5]}, 42, "s", 1e5]'
    items = list(iter_array(JsonStream(io.StringIO(text), chunk=chunk)))
    assert math.isnan(items[0]["a"]) and items[0]["b"][:2] == [math.inf, -math.inf]
    assert items[0]["b"][2] == 12345678901234567890.5 and items[1:] == [42, "s", 1e5]


def test_truncation_and_malformed():
    text = json.dumps(DOC)
    with pytest.raises(Truncated):
        walk_nested(text[: text.index('"f2"') + 8], chunk=4)
    got = []
    with pytest.raises(Truncated):
        for item in walk_nested_lazy(text[: text.index('"m3"')]):
            got.append(item)
    assert [i[1] for i in got] == ["f1", "f2"]  # complete documents before the cut were yielded
    with pytest.raises(Malformed):
        walk_nested('{"m": {"f": {"x": 1}} "oops": 2}' + " " * 5000, chunk=8)
    with pytest.raises(Malformed):
        walk_nested('{"m": {"f": {"x": tru}}}' + " " * 5000, chunk=1 << 20)


def walk_nested_lazy(text):
    stream = JsonStream(io.StringIO(text), chunk=16)
    for outer, _ in iter_object(stream):
        for inner, _ in iter_object(stream):
            yield outer, inner, stream.value()


def test_document_layouts():
    docs = [{"task_id": "mp-1", "structure": {}}, {"task_id": "mp-2", "structure": {}}]
    as_array = list(iter_documents(JsonStream(io.StringIO(json.dumps(docs)))))
    as_lines = list(iter_documents(JsonStream(io.StringIO("\n".join(json.dumps(d) for d in docs) + "\n"))))
    mapping = {"Fe": {"entry_id": "mp-13", "energy": -8.0}, "O": {"entry_id": "mp-12957", "energy": -4.9}}
    as_mapping = list(iter_documents(JsonStream(io.StringIO(json.dumps(mapping)))))
    single = list(iter_documents(JsonStream(io.StringIO(json.dumps(docs[0])))))
    assert [d for _, d in as_array] == [d for _, d in as_lines] == docs
    assert [p for p, _ in as_array] == ["[0]", "[1]"] and [p for p, _ in as_lines] == ["line 0", "line 1"]
    assert as_mapping == list(mapping.items())
    assert single == [("line 0", docs[0])]
    assert list(iter_documents(JsonStream(io.StringIO("  ")))) == []
