"""The datasets the converter knows, and one conversion from start to report."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from acadlm_plugins.errors import DataError
from acadlm_plugins.evaluation.converters import alce, icl, longdoc, rag, rerank
from acadlm_plugins.evaluation.converters.base import (
    SPECIFIC_OPTIONS,
    DatasetSpec,
    Options,
    Run,
)
from acadlm_plugins.evaluation.converters.writing import seeded_sample, write_jsonl_atomically

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (*rag.SPECS, *rerank.SPECS, *icl.SPECS, *longdoc.SPECS, *alce.SPECS)
}


@dataclass(frozen=True)
class Report:
    """What a conversion did: rows read from the source(s), written, and left out by reason."""

    spec: DatasetSpec
    source: Path
    output: Path
    read: int
    written: int
    skipped: dict[str, int]
    problems: tuple[str, ...]  # the bad rows skipped with --skip-invalid, as messages


def dataset_spec(name: str) -> DatasetSpec:
    """The dataset called ``name``, or an error listing the close names."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(name, list(DATASETS), n=3)
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    raise DataError(f"unknown dataset {name!r}. {hint}Known: {', '.join(DATASETS)} "
                    "(`acadlm-eval-data list` says what each needs).")


def default_output(spec: DatasetSpec, source: Path) -> Path:
    """``<source folder>/<source stem>.<dataset>.jsonl``."""
    return source.with_name(f"{source.stem}.{spec.name}.jsonl")


def _checked_options(spec: DatasetSpec, options: Options) -> Options:
    """``options`` with the dataset's defaults filled in; an option the dataset does not use is
    an error rather than silently ignored."""
    for name, flag in SPECIFIC_OPTIONS.items():
        if getattr(options, name) is not None and name not in spec.options:
            users = [s.name for s in DATASETS.values() if name in s.options]
            raise DataError(f"{flag} is not used by {spec.name}; it applies to "
                            f"{', '.join(users)}. Fix: drop {flag}.")
    filled = {name: value for name, value in spec.defaults.items()
              if getattr(options, name) is None}
    _check_popularity_below(options.popularity_below)
    return dataclasses.replace(options, **filled)


def _check_popularity_below(value: float | None) -> None:
    """``--popularity-below`` is a power of ten, or ``inf`` (documented: keep every row); NaN
    (every comparison false, so every row was kept) and ``-inf`` (no row kept) are refused."""
    if value is None or math.isfinite(value) or value == math.inf:
        return
    problem = "is not a number" if math.isnan(value) else "would keep no row"
    raise DataError(f"--popularity-below {value} {problem}. Fix: give the power of ten below "
                    "which a subject's s_pop is kept, e.g. 3 (HELMET's kilt_popqa_3, the "
                    "default), or inf to keep every row.")


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"{what} {path} {state}. Fix: give the path of the file you downloaded.")
    return path


def _why_empty(run: Run) -> str:
    reasons = "; ".join(f"{count:,} {reason}" for reason, count in run.skipped.most_common())
    return f": {run.read:,} rows read" + (f", left out: {reasons}" if reasons else "")


def convert_file(dataset: str, source: Path, output: Path | None = None,
                 options: Options | None = None) -> Report:
    """Convert ``source`` (a file of ``dataset`` in its published format) to the jsonl schema our
    task reads, written atomically to ``output`` (default :func:`default_output`)."""
    spec = dataset_spec(dataset)
    options = _checked_options(spec, options or Options())
    source = _existing_file(Path(source).expanduser(), "the source file")
    options = dataclasses.replace(options, **{
        name: _existing_file(Path(path).expanduser(), f"the --{name} file")
        for name, path in (("test", options.test), ("qrels", options.qrels)) if path is not None})
    output = Path(output).expanduser() if output else default_output(spec, source)
    inputs = {path.resolve() for path in (source, options.test, options.qrels) if path}
    if output.resolve() in inputs:
        raise DataError(f"the output {output} is one of the input files. Fix: give another -o.")
    run = Run(spec, source, options)
    try:
        rows = spec.convert(run)
        if options.sample is not None:
            kept, seen = seeded_sample(rows, options.sample, options.seed)
            run.skip(f"not drawn by --sample {options.sample}", seen - len(kept))
            rows = iter(kept)
        written = write_jsonl_atomically(rows, output, why_empty=lambda: _why_empty(run))
    except OSError as error:
        raise DataError(f"cannot convert {source}: {error}. Fix: check the paths and that the "
                        "output folder is writable.") from None
    return Report(spec, source, output, run.read, written, dict(run.skipped), tuple(run.problems))
