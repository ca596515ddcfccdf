"""``acadlm-eval-data``: convert the real RULER/HELMET datasets, downloaded elsewhere, to the
jsonl files our tasks read.

acadlm-eval-data list
acadlm-eval-data convert DATASET SOURCE [-o OUT.jsonl] [--test FILE] [--qrels FILE]
                 [--max-passages N] [--popularity-below X] [--encoding ENC] [--skip-invalid]
                 [--sample N] [--seed S]

Nothing is downloaded: SOURCE is the file as its publisher (or HELMET) distributes it. A bad row
stops the conversion with ``file:line`` (or the item of a JSON file), the field and the fix;
``--skip-invalid`` skips such rows instead and lists them at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from acadlm_plugins.cli_types import int_at_least
from acadlm_plugins.errors import DataError
from acadlm_plugins.evaluation.converters.base import INVALID, Options
from acadlm_plugins.evaluation.converters.catalog import DATASETS, Report, convert_file

PROG = "acadlm-eval-data"
#: How many skipped-row messages ``--skip-invalid`` prints before summing up the rest.
SHOWN_PROBLEMS = 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert downloaded RULER/HELMET datasets to the jsonl files of "
        "the acadlm long-context tasks (schemas in docs/evaluation_data.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the datasets, the file each needs and what it writes")
    convert = commands.add_parser("convert", help="convert one downloaded file")
    convert.add_argument("dataset", help="a dataset name from `list`, e.g. kilt_nq")
    convert.add_argument("source", type=Path, help="the downloaded file")
    convert.add_argument("-o", "--output", type=Path, default=None,
                         help="the jsonl to write (default: <source stem>.<dataset>.jsonl "
                         "next to the source)")
    convert.add_argument("--test", type=Path, help="ICL: the test-split file (rows to ask about)")
    convert.add_argument("--qrels", type=Path, help="msmarco run file: its TREC qrels")
    convert.add_argument("--max-passages", type=int_at_least(1), metavar="N",
                         help="keep the first N passages/documents of each row")
    convert.add_argument("--popularity-below", type=float, metavar="X",
                         help="kilt_popqa: keep rows with s_pop < 10^X (default 3, as HELMET; "
                         "inf keeps all)")
    convert.add_argument("--encoding", default="utf-8", help="text encoding of the source "
                         "(default utf-8)")
    convert.add_argument("--skip-invalid", action="store_true",
                         help="skip bad rows (listed at the end) instead of stopping")
    convert.add_argument("--sample", type=int_at_least(1), metavar="N",
                         help="keep a seeded random sample of N rows, in source order")
    convert.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    return parser


def print_catalog() -> None:
    """Each dataset: what to give, what is written, which key and task read it."""
    for spec in DATASETS.values():
        flags = " ".join(f"--{name.replace('_', '-')}" for name in spec.options)
        print(f"{spec.name}: {spec.title}")
        print(f"    give:   {spec.source}")
        print(f"    writes: {spec.schema} rows -> --metadata {spec.metadata_key} "
              f"(task {spec.task})")
        if flags:
            print(f"    options: {flags}")
        if spec.note:
            print(f"    note:   {spec.note}")


def print_report(report: Report) -> None:
    """The counts of a conversion and how to use its output."""
    for message in report.problems[:SHOWN_PROBLEMS]:
        print(f"skipped: {message}", file=sys.stderr)
    hidden = report.skipped.get(INVALID, 0) - min(len(report.problems), SHOWN_PROBLEMS)
    if hidden > 0:
        print(f"skipped: ... and {hidden:,} more bad rows", file=sys.stderr)
    left_out = sum(report.skipped.values())
    print(f"{report.spec.name}: read {report.read:,} rows, wrote {report.written:,}, skipped "
          f"{left_out:,} -> {report.output}")
    for reason, count in sorted(report.skipped.items(), key=lambda item: (-item[1], item[0])):
        print(f"    skipped {count:,}: {reason}")
    metadata = json.dumps({report.spec.metadata_key: str(report.output.resolve())})
    print(f"use: --tasks {report.spec.task} --metadata '{metadata}'")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acadlm-eval-data`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        print_catalog()
        return 0
    options = Options(test=args.test, qrels=args.qrels, max_passages=args.max_passages,
                      popularity_below=args.popularity_below, encoding=args.encoding,
                      skip_invalid=args.skip_invalid, sample=args.sample, seed=args.seed)
    try:
        "".encode(options.encoding)
    except LookupError:
        print(f"{PROG}: error: unknown encoding {options.encoding!r}. Fix: give one Python "
              "knows, e.g. utf-8 or latin-1.", file=sys.stderr)
        return 2
    try:
        report = convert_file(args.dataset, args.source, args.output, options)
    except DataError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
