"""What every long-context task shares: one metric per context length, reproducible datasets
built from lm-eval's metadata, and RULER-style result processing.

lm-eval fixes a task's metric names in its YAML; our lengths are chosen at run time
(``--metadata '{"max_seq_lengths": [1024, 2048]}'``), so :class:`LengthSweepTask` writes the
metric list from the metadata before lm-eval reads it. Task YAMLs use it through
``class: !function utils.LengthSweepTask``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
from lm_eval.api.task import ConfigurableTask

from acadlm_plugins.evaluation.lengths import (
    LengthTokenizer,
    check_lengths_fit,
    load_length_tokenizer,
    parse_lengths,
    task_error,
)
from acadlm_plugins.evaluation.prompting import sample_rng
from acadlm_plugins.evaluation.scoring import match_all, match_part
from acadlm_plugins.evaluation.task_settings import check_task_metadata, declare_settings

log = logging.getLogger(__name__)

DEFAULT_NUM_SAMPLES = 20
DEFAULT_SEED = 1234

#: Builds one document: (rng, target length, sample index, tokenizer) -> row with at least
#: ``input`` (the prompt) and ``outputs`` (the reference strings).
SampleBuilder = Callable[[Any, int, int, LengthTokenizer], dict[str, Any]]


class LengthSweepTask(ConfigurableTask):
    """A ConfigurableTask whose metrics are the context lengths named in its metadata."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        config.pop("class", None)
        metadata = config.get("metadata") or {}
        check_task_metadata(metadata, task=config.get("task", "?"))
        lengths = parse_lengths(metadata.get("max_seq_lengths"), task=config.get("task", "?"))
        config["metric_list"] = [
            {"metric": str(length), "aggregation": "mean", "higher_is_better": True}
            for length in lengths
        ]
        super().__init__(config=config)

    def build_all_requests(self, **kwargs: Any) -> Any:
        """lm-eval's request building, with a warning when its ``limit`` (the first N rows)
        is too small to reach every length (rows come sample by sample, so N below the number of
        lengths leaves the longest ones out) or every sample (:func:`warn_partial_limit`: the
        first samples only, and with depths spread over the samples the shallowest), a refusal
        when the run would generate more tokens than the prompts leave room for
        (:func:`check_generation_room`), and without lm-eval's request cache.

        lm-eval names a cached request file by task name, few-shot count, rank and tokenizer,
        never by the task's metadata; our prompts depend on it (lengths, samples, seed,
        haystack, sizing tokenizer), so a cached run at 1024 tokens would hand its prompts to a
        later run at 2048 and have their answers scored against the new documents. The cache
        would save nothing anyway: the documents are built before lm-eval looks it up.
        """
        limit = kwargs.get("limit")
        metadata = self.config.metadata or {}
        task = self.config.task or "?"
        lengths = parse_lengths(metadata.get("max_seq_lengths"), task=task)
        if limit is not None and int(limit) < len(lengths):
            log.warning("%s: limit=%s evaluates only the first %s of its %d lengths; %s are left "
                        "out (give a limit of at least %d, one sample per length).", task, limit,
                        limit, len(lengths), lengths[int(limit):], len(lengths))
        if limit is not None and not kwargs.get("samples"):
            warn_partial_limit(task, int(limit), self.eval_docs,
                               fixed_depth=depth_setting_value(metadata, task=task) is not None)
        check_generation_room(metadata, self.config.generation_kwargs, task=task)
        if kwargs.get("cache_requests"):
            log.warning("%s: lm-eval's request cache is not used for this task: it is keyed by "
                        "task name, not by the task's metadata (max_seq_lengths, num_samples, "
                        "seed, haystack), and the prompts are rebuilt on every run anyway", task)
            kwargs = {**kwargs, "cache_requests": False, "rewrite_requests_cache": False}
        return super().build_all_requests(**kwargs)


def _column(docs: Any, name: str) -> list[Any]:
    """One field of every row (None where a row lacks it), read as a column from a
    ``datasets.Dataset`` (without decoding the prompts) or from a list of rows."""
    if isinstance(docs, datasets.Dataset):
        return list(docs[name]) if name in docs.column_names else [None] * len(docs)
    return [row.get(name) for row in docs]


def _depths(depth: Any, depths: Any) -> list[float]:
    """Where a row's evidence sits (``depth``, or ``depths`` for several needles), leaving out
    the -1 of rows that have none."""
    values = depths if depths is not None else [] if depth is None else [depth]
    return [float(value) for value in values if 0.0 <= float(value) <= 1.0]


def warn_partial_limit(task: str, limit: int, docs: Any, *, fixed_depth: bool = False) -> None:
    """Warn when lm-eval's ``limit`` (its first ``limit`` rows of ``docs``) leaves rows out:
    rows come sample by sample (:func:`sample_major`), so the limit evaluates the first samples
    of each length, not a random subset of them; where a task spreads its evidence over the
    samples (sample i of n at depth i/(n-1)), they are also its shallowest depths, which the
    warning names unless the metadata fixes one ``depth``. The depths stay as they are
    (reordering them would change every prompt); a smaller ``num_samples`` gives fewer prompts
    that still span every depth."""
    total = len(docs)
    if limit >= total:
        return
    lengths = [int(length) for length in _column(docs, "max_length")]
    taken = Counter(lengths[:limit])
    counts = ", ".join(f"{taken[length]} at {length}" for length in sorted(set(lengths)))
    depth_note = ""
    if not fixed_depth:
        rows = [_depths(*pair) for pair in zip(_column(docs, "depth"), _column(docs, "depths"))]
        chosen = [d for row in rows[:limit] for d in row]
        every = [d for row in rows for d in row]
        if chosen and (min(chosen), max(chosen)) != (min(every), max(every)):
            depth_note = (f"; their evidence sits at depths {min(chosen):.2f}-{max(chosen):.2f} "
                          f"of the context, of the {min(every):.2f}-{max(every):.2f} the whole "
                          "run covers")
    log.warning("%s: limit=%d evaluates only the first %d of its %d rows, which come sample by "
                "sample: the first samples of each length (%s), not a random subset%s. For "
                "fewer prompts that still span every depth, lower `num_samples` in --metadata "
                "instead of giving a limit.", task, limit, limit, total, counts, depth_note)


def check_generation_room(metadata: Mapping[str, Any], generation_kwargs: Any, *,
                          task: str) -> None:
    """Refuse a run that generates more tokens than the prompts were sized to leave room for.

    The documents are built when the task is made, leaving ``tokens_to_generate`` (the YAML's
    ``max_gen_toks`` unless the metadata gives it) between each prompt and its length; lm-eval
    applies ``--gen_kwargs`` only afterwards. A larger ``max_gen_toks`` (from ``--gen_kwargs``,
    or the YAML's under a smaller metadata ``tokens_to_generate``) would make prompt plus
    answer pass the length the metric is named by, and at a model's maximum the prompt be cut
    from the left (lm-eval's ``hf``) or the answer capped.
    """
    reserved = metadata.get("tokens_to_generate")
    asked = (generation_kwargs or {}).get("max_gen_toks")
    if reserved is None or asked is None or int(asked) <= int(reserved):
        return
    raise task_error(task, "tokens_to_generate", f"the run generates up to {asked} tokens "
                     "(`max_gen_toks`, from the task's YAML or --gen_kwargs), but the prompts "
                     f"leave room for {reserved}: prompt and answer would pass the length each "
                     "score is named by.", "size the prompts for it with --metadata "
                     f"'{{\"tokens_to_generate\": {asked}}}', or generate at most {reserved} "
                     f"tokens (--gen_kwargs max_gen_toks={reserved}).")


def int_setting(metadata: Mapping[str, Any], key: str, default: int, *, task: str,
                minimum: int = 1) -> int:
    """An integer metadata field, with an error naming the task and the field if it is wrong."""
    value = metadata.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise task_error(task, key, f"{value!r} is not an integer.") from None
    if number < minimum:
        raise task_error(task, key, f"{number} is below the minimum of {minimum}.")
    return number


def depth_setting_value(metadata: Mapping[str, Any], *, task: str) -> float | None:
    """``depth`` of the metadata (where the evidence goes: 0 = start of the context, 1 = end)
    as a number in [0, 1], None when unset, or an error naming the task and ``depth``."""
    fixed = metadata.get("depth")
    if fixed is None:
        return None
    try:
        depth = math.nan if isinstance(fixed, bool) else float(fixed)
    except (TypeError, ValueError):
        depth = math.nan
    if math.isnan(depth):
        raise task_error(task, "depth", f"{fixed!r} is not a number.",
                         "Give one fraction of the context, e.g. 0.5 for the middle, or leave "
                         "depth out to spread the evidence over the samples.")
    if not 0.0 <= depth <= 1.0:
        raise task_error(task, "depth", f"{fixed} is outside [0, 1].",
                         "Give a fraction of the context, e.g. 0.5 for the middle.")
    return depth


def build_length_dataset(task: str, metadata: Mapping[str, Any],
                         build_sample: SampleBuilder) -> dict[str, datasets.Dataset]:
    """The ``test`` split of ``task``: ``num_samples`` rows per length, seeded by ``seed``.

    Each row gets ``max_length`` (its target) and ``input_tokens`` (its measured length) so that
    results are reported per length and tests can check the sizing. Each length's rows are
    built in turn, from a stream of their own, then listed sample by sample (sample 0 at every
    length, then sample 1, ...): lm-eval's ``--limit N`` takes the first N rows, which so cover
    every length (:func:`sample_major`). The metadata is checked first
    (:func:`~acadlm_plugins.evaluation.task_settings.check_task_metadata`), as when the task is
    built, for callers of the dataset functions.
    """
    check_task_metadata(metadata, task=task)
    lengths = parse_lengths(metadata.get("max_seq_lengths"), task=task)
    check_lengths_fit(lengths, metadata, task=task)
    tokenizer = load_length_tokenizer(metadata, task=task)
    num_samples = int_setting(metadata, "num_samples", DEFAULT_NUM_SAMPLES, task=task)
    seed = int_setting(metadata, "seed", DEFAULT_SEED, task=task, minimum=0)
    by_length = []
    for length in lengths:
        started = time.perf_counter()
        rng = sample_rng(task, seed, length)
        built = []
        for index in range(num_samples):
            row = dict(build_sample(rng, length, index, tokenizer))
            row["max_length"] = length
            row.setdefault("input_tokens", tokenizer.count(row["input"]))
            row["index"] = index
            built.append(row)
        sizes = [row["input_tokens"] for row in built]
        log.info("%s @ %d: %d prompts, %d-%d tokens (mean %.0f), built in %.1fs", task, length,
                 len(built), min(sizes), max(sizes), statistics.fmean(sizes),
                 time.perf_counter() - started)
        by_length.append(built)
    rows = sample_major(by_length)
    return {"test": datasets.Dataset.from_list(rows, split=datasets.Split.TEST)}


# The settings read above, by every task: lengths, samples, seed, depth and the generation the
# length budget keeps free.
declare_settings("every task", {
    "max_seq_lengths": lambda metadata, task: parse_lengths(metadata.get("max_seq_lengths"),
                                                            task=task),
    "num_samples": lambda metadata, task: int_setting(metadata, "num_samples",
                                                      DEFAULT_NUM_SAMPLES, task=task),
    "seed": lambda metadata, task: int_setting(metadata, "seed", DEFAULT_SEED, task=task,
                                               minimum=0),
    "depth": lambda metadata, task: depth_setting_value(metadata, task=task),
    "tokens_to_generate": lambda metadata, task: int_setting(metadata, "tokens_to_generate", 0,
                                                             task=task, minimum=0),
})


def sample_major(by_length: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of every length interleaved: the first of each length (in the order given),
    then the second of each, and so on; a length with fewer rows drops out when it runs out."""
    rows: list[dict[str, Any]] = []
    for index in range(max((len(built) for built in by_length), default=0)):
        rows.extend(built[index] for built in by_length if index < len(built))
    return rows


def per_length(doc: Mapping[str, Any], score: float) -> dict[str, float]:
    """Report ``score`` under the metric named by the document's length."""
    return {str(doc["max_length"]): float(score)}


def process_results_match_all(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """RULER's string-match-all: share of the references found in the generation."""
    return per_length(doc, match_all(results[0], doc["outputs"]))


def process_results_match_part(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """RULER's string-match-part: full credit if any reference is found (QA tasks)."""
    return per_length(doc, match_part(results[0], doc["outputs"]))
