"""QuRating stage 3: score every document of a local corpus with a trained rater.

Run::

    tune run acadlm_plugins/annotate_recipe --config configs/smollm2/qurating_annotate.yaml
    tune run --nproc_per_node 2 acadlm_plugins/annotate_recipe --config ...

Each process scores a contiguous share of the documents (``torch.distributed`` is used only to
agree on the plan and to add up the totals), writing parquet shards with the input columns plus
``num_tokens`` and ``score_<criterion>`` (see :mod:`acadlm_plugins.qurating.annotation`). A
run that is killed resumes where it stopped: finished shards are kept, the rest are scored.

``annotation.json`` (written when every shard is done) holds ``corpus``, the documents, tokens
and score statistics of all finished shards, whichever run scored them; this run's own counts
(``shards_scored``, ``shards_done_before``, ``documents_scored``, ``tokens_scored`` and
``tokens_per_second``, which is null when this run scored no shard); and ``last_scoring_run``
(``documents``, ``tokens``, ``tokens_per_second``, ``processes``, ``wall_seconds``): the
counts of the latest run that scored shards, this one or, on a rerun that found everything done,
the one recorded in the previous ``annotation.json`` (null if none is known).

An optional ``metric_logger`` block (any torchtune metric logger, e.g. ``DiskLogger``) gets, on
rank 0, rank 0's throughput after every shard (``tokens_per_second``,
``documents_per_second``, at the step of its finished shards) and at the end the totals of all
ranks (``total_tokens_per_second`` when this run scored a shard, ``total_documents``,
``total_tokens``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from torchtune import config, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.qurating.annotation import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_SHARD_SIZE,
    SUMMARY_FILENAME,
    DocumentScorer,
    RankResult,
    annotate_rank,
    check_or_write_plan,
    open_corpus,
    plan_record,
    plan_shards,
    remove_stale_temporaries,
    score_statistics,
)
from acadlm_plugins.qurating.metrics import check_metric_logger, optional_metric_logger
from acadlm_plugins.qurating.rater import load_rater
from acadlm_plugins.training import runtime
from acadlm_plugins.training.config_checks import check_config_keys, config_value
from acadlm_plugins.training.run_checks import output_dir_setting

log = utils.get_logger("INFO")

KNOWN_KEYS = {
    "output_dir", "rater_dir", "data_files", "text_field", "chunk_tokens", "batch_tokens",
    "shard_size", "max_documents_per_file", "cache_dir", "device", "dtype", "max_shards",
    "metric_logger",
}
REQUIRED_KEYS = ("output_dir", "rater_dir", "data_files")
T = TypeVar("T")


def checked_settings(cfg: DictConfig) -> tuple[int, int, int, int | None, int | None]:
    """The config's keys and the values setup reads before it loads the rater: ``chunk_tokens``,
    ``batch_tokens``, ``shard_size``, ``max_documents_per_file``, ``max_shards`` (and the
    metric logger's), refused naming the key; a pipeline makes the same check before its first
    stage (:mod:`acadlm_plugins.stages`)."""
    check_config_keys(cfg, known=KNOWN_KEYS, required=REQUIRED_KEYS, recipe="annotate",
                      example="configs/smollm2/qurating_annotate.yaml")
    chunk_tokens = config_value(cfg.get("chunk_tokens", DEFAULT_CHUNK_TOKENS), "chunk_tokens",
                                int, minimum=1)
    batch_tokens = config_value(cfg.get("batch_tokens", DEFAULT_BATCH_TOKENS), "batch_tokens",
                                int, minimum=1)
    shard_size = config_value(cfg.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size", int,
                              minimum=1)
    per_file = config_value(cfg.get("max_documents_per_file", None), "max_documents_per_file",
                            int, minimum=1, allow_none=True)
    max_shards = config_value(cfg.get("max_shards", None), "max_shards", int, minimum=1,
                              allow_none=True)
    check_metric_logger(cfg)
    return chunk_tokens, batch_tokens, shard_size, per_file, max_shards


class AnnotateRecipe:
    """Load the rater and the corpus, agree on the plan, score this rank's shards, report."""

    def __init__(self, cfg: DictConfig) -> None:
        (self._distributed, self._device, self._dtype, self._world_size,
         self._rank) = runtime.init_process(cfg)
        self._is_rank_zero = self._rank == 0
        self._metric_logger = None  # set last in setup; cleanup works even if setup stopped

    def setup(self, cfg: DictConfig) -> None:
        chunk_tokens, batch_tokens, shard_size, per_file, self._max_shards = checked_settings(cfg)
        self._cfg = cfg
        self._output_dir = output_dir_setting(cfg).expanduser()
        self._rater_dir = Path(str(cfg.rater_dir)).expanduser()

        self._rater = load_rater(self._rater_dir, device=self._device, dtype=self._dtype,
                                 max_seq_len=chunk_tokens + 1)
        self._scorer = DocumentScorer(self._rater, chunk_tokens=chunk_tokens,
                                      batch_tokens=batch_tokens, device=self._device)
        data_files = cfg.data_files
        paths = ([str(p) for p in data_files] if isinstance(data_files, (list, ListConfig))
                 else [str(data_files)])

        def open_it():
            return open_corpus(paths, text_field=str(cfg.get("text_field", "text")),
                               cache_dir=cfg.get("cache_dir", None),
                               max_documents_per_file=per_file)

        # Rank 0 converts the files into the datasets cache first; the others then reuse it.
        # Each step below that can refuse the run ends with every rank learning whether it
        # failed anywhere (see `runtime.together`), so that all stop with an error: a rank
        # stopped alone would leave the others waiting in a collective.
        first = self._together(open_it, "reading `data_files`", everyone=False)
        self._corpus = self._together(lambda: open_it() if first is None else first,
                                      "reading `data_files`")
        record = plan_record(self._corpus, self._rater_dir, chunk_tokens=chunk_tokens,
                             shard_size=shard_size, world_size=self._world_size,
                             max_documents_per_file=per_file)
        # Every rank compares with the plan already in output_dir (the same file, so the same
        # verdict) before rank 0 writes one where there was none.
        self._together(lambda: check_or_write_plan(self._output_dir, record, write=False),
                       "checking the plan in `output_dir`")

        def write_plan() -> None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            check_or_write_plan(self._output_dir, record, write=True)

        self._together(write_plan, "writing the plan in `output_dir`", everyone=False)
        self._shards = plan_shards(self._corpus.num_rows, self._world_size,
                                   shard_size)[self._rank]
        remove_stale_temporaries(self._output_dir, self._rank)
        if self._is_rank_zero:
            log.info("annotating %d documents of %d files with %s (criteria %s), %d processes, "
                     "chunks of %d tokens", self._corpus.num_rows, len(self._corpus.files),
                     self._rater_dir, ", ".join(self._scorer.criteria), self._world_size,
                     chunk_tokens)
        if self._is_rank_zero:
            self._metric_logger = optional_metric_logger(cfg)

    def _together(self, work: Callable[[], T], what: str, *, everyone: bool = True) -> T | None:
        """``work()`` on every rank (on rank 0 alone unless ``everyone``; the others get None),
        then stop every rank if it raised on any: see
        :func:`~acadlm_plugins.training.runtime.together`."""
        return runtime.together(work, what, run_here=everyone or self._is_rank_zero,
                                distributed=self._distributed, device=self._device)

    def run(self) -> dict[str, Any]:
        """Score the shards and write ``annotation.json`` (rank 0); returns the summary."""
        started = time.perf_counter()
        # A rank that fails while scoring (a full disk, say) stops every rank, not only itself
        # while the others wait for it in the totals below.
        result = self._together(lambda: annotate_rank(
            self._corpus, self._scorer, self._output_dir, self._shards,
            max_shards=self._max_shards, progress=self._is_rank_zero, on_shard=self._log),
            "scoring its shards")
        log.info("rank %d: %d shards scored (%d were done before), %d documents, %d tokens, "
                 "%.0f tokens/s", self._rank, result.shards_scored, result.shards_done_before,
                 result.documents, result.tokens, result.tokens / max(result.seconds, 1e-9))
        totals = self._gather(result)
        runtime.barrier(self._distributed)
        scored = totals["scored"] > 0
        summary: dict[str, Any] = {
            "complete": bool(totals["incomplete"] == 0),
            "processes": self._world_size,
            "documents_scored": int(totals["documents"]), "tokens_scored": int(totals["tokens"]),
            "shards_scored": int(totals["scored"]), "shards_done_before": int(totals["before"]),
            "shards_total": int(totals["total"]), "wall_seconds": round(
                time.perf_counter() - started, 2),
            "tokens_per_second": (totals["tokens"] / max(totals["seconds"], 1e-9) if scored
                                  else None),
            "rater_dir": str(self._rater_dir), "criteria": self._scorer.criteria,
            "chunk_tokens": self._scorer.chunk_tokens, "output_dir": str(self._output_dir),
        }
        metrics = {"total_documents": summary["documents_scored"],
                   "total_tokens": summary["tokens_scored"]}
        if scored:
            metrics = {"total_tokens_per_second": summary["tokens_per_second"], **metrics}
        self._log(metrics, int(totals["before"] + totals["scored"]))
        if self._is_rank_zero:
            summary["last_scoring_run"] = (
                {"documents": summary["documents_scored"], "tokens": summary["tokens_scored"],
                 "tokens_per_second": summary["tokens_per_second"],
                 "processes": self._world_size, "wall_seconds": summary["wall_seconds"]}
                if scored else previous_scoring_run(self._output_dir / SUMMARY_FILENAME))
            summary["corpus"] = score_statistics(self._output_dir, self._scorer.criteria)
            if summary["complete"]:
                (self._output_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2))
            print(format_summary(summary), flush=True)
        return summary

    def _gather(self, result: RankResult) -> dict[str, float]:
        """Totals over ranks; seconds is the slowest rank's (the run's wall time)."""
        sums = torch.tensor([result.documents, result.tokens, result.shards_scored,
                             result.shards_done_before, result.shards_total,
                             0 if result.complete else 1], dtype=torch.float64)
        seconds = torch.tensor([result.seconds], dtype=torch.float64)
        if self._distributed:
            sums, seconds = sums.to(self._device), seconds.to(self._device)
            dist.all_reduce(sums)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        names = ("documents", "tokens", "scored", "before", "total", "incomplete")
        totals = dict(zip(names, sums.cpu().tolist()))
        totals["seconds"] = float(seconds.cpu()[0])
        return totals

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics, step=step)

    def cleanup(self) -> None:
        runtime.close_process(self._distributed, self._metric_logger)


def previous_scoring_run(path: Path) -> dict[str, Any] | None:
    """``last_scoring_run`` of an earlier ``annotation.json`` (for one of an older version that
    lacks it: its own counts, when that run scored documents), or None."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(previous, dict):
        return None
    if "last_scoring_run" in previous:
        return previous["last_scoring_run"]
    if previous.get("documents_scored") and previous.get("tokens_per_second") is not None:
        return {"documents": previous["documents_scored"], "tokens": previous["tokens_scored"],
                "tokens_per_second": previous["tokens_per_second"],
                "processes": previous.get("processes"),
                "wall_seconds": previous.get("wall_seconds")}
    return None


def format_summary(summary: dict[str, Any]) -> str:
    """Shards, documents, tokens/s and the score distribution per criterion."""
    scored_now = (f"scored now: {summary['documents_scored']} documents, "
                  f"{summary['tokens_scored']} tokens, {summary['tokens_per_second']:,.0f} "
                  f"tokens/s over {summary['processes']} process(es)"
                  if summary["tokens_per_second"] is not None
                  else "scored now: nothing (every shard was done before)")
    lines = ["", "=== annotation summary ===",
             f"shards: {summary['shards_scored']} scored now, {summary['shards_done_before']} "
             f"done before, {summary['shards_total']} in all"
             + ("" if summary["complete"] else "  (INCOMPLETE: run again to continue)"),
             scored_now]
    corpus = summary.get("corpus", {})
    if corpus.get("scores"):
        lines.append(f"{'criterion':<22}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}")
        for name, stats in corpus["scores"].items():
            if stats:
                lines.append(f"{name:<22}{stats['mean']:>9.3f}{stats['std']:>9.3f}"
                             f"{stats['min']:>9.3f}{stats['max']:>9.3f}")
        lines.append(f"({corpus['documents']} documents, {corpus['tokens']} tokens in finished "
                     f"shards; {corpus['empty_documents']} without tokens)")
    lines.append(f"output: {summary['output_dir']}")
    return "\n".join(lines)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/annotate_recipe --config ...``."""
    runtime.run_recipe(cfg, AnnotateRecipe, AnnotateRecipe.run)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
