"""Check a raw source before a build: scan, parse and validate it, and count rejects by code.

    python -m data_pipeline.build.readers KIND PATH [--option key=value ...] [--limit N] [--show 3]

Example: `python -m data_pipeline.build.readers mptrj MPtrj_2022.9_full.json.gz --limit 100000`.
Prints the accepted count, rejects by code with the first few keys and reasons each, and exits 0
(rejects are data, not errors); an unknown kind or a missing path exits 2 with the reason.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

from data_pipeline.build.readers import available_readers, open_reader
from data_pipeline.build.readers.base import RecordError, Reject


def parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option needs key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)  # numbers, booleans, lists
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.build.readers", description=__doc__.split("\n")[0])
    parser.add_argument("kind", help=f"one of {available_readers()}")
    parser.add_argument("path")
    parser.add_argument("--option", action="append", default=[], help="reader option key=value (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many scanned items")
    parser.add_argument("--show", type=int, default=3, help="example rejects printed per code")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from data_pipeline.build.validate import reason_code, validate

    try:
        reader = open_reader(args.kind, args.path, **parse_options(args.option))
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    accepted, counts, examples = 0, collections.Counter(), collections.defaultdict(list)
    for number, item in enumerate(tqdm(reader.scan(), desc=f"{args.kind} {args.path}", unit=" entries")):
        if args.limit is not None and number >= args.limit:
            break
        if isinstance(item, Reject):
            reason, location = item.reason, item.location
        else:
            try:
                validate(reader.parse(item))
                accepted += 1
                continue
            except RecordError as error:
                reason, location = str(error), item.location
        code = reason_code(reason)
        counts[code] += 1
        if len(examples[code]) < args.show:
            examples[code].append(f"{item.key} ({location}): {reason}")
    print(f"accepted {accepted}, rejected {sum(counts.values())}")
    for code, count in counts.most_common():
        print(f"  {code}: {count}")
        for line in examples[code]:
            print(f"      {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
