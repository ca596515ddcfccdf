"""Stage 1 of QuRating: judge every pair on every criterion, in both orders, into a jsonl file.

Each pair is shown twice per criterion, as (A, B) and swapped as (B, A). A judge LM tends to
prefer one position whatever the texts are; averaging over the two orders cancels that
preference (to first order)::

    p(B better than A) = ( p_B[order A,B] + (1 - p_B[order B,A]) ) / 2

since in the swapped order text B is shown first, so the judge's "A" is a vote for B. A judge
that always answers "A" thus gives exactly 0.5: no information, as it should. The rows follow
the schema of :mod:`acadlm_plugins.qurating` (``pair_id``, the two texts, sources, domains and
``judgments: {criterion: p}``), probabilities rounded to 6 decimals. Each row also keeps the
judge's two answers it was averaged from, ``p_b_by_order: {criterion: [p_B[A,B], p_B[B,A]]}``
(only for the criteria judged in both orders), from which the summary's position bias is
computed over the whole file.

**Resuming.** Rows are appended a batch of pairs at a time and each batch is flushed and
fsync'ed, so after a kill the file holds whole batches plus at most one partial last line. A new
run drops that partial line (with a warning), skips the pairs already written, and appends the
rest in the same order: the final file equals that of an uninterrupted run. A run whose config
no longer matches the file (other criteria, or pairs that are not in the new sample) is refused
rather than mixed in. So is a run that would label its pairs differently: the summary records,
under ``labelled_by``, what gives the rows their values (the judge's model, precision, prompting
and answer tokens, or a remote judge's model, endpoint, ``top_logprobs`` and ``max_tokens``; a
sha256 of each criterion's prompt template; ``judge.min_answer_mass``), written before the
first row, and a resumed or extended run whose values differ is a :class:`ConfigError` naming
the key. The device, batch sizes, URL and retry settings are not recorded: they do not change
the labels. A file written before ``labelled_by`` existed has no record to compare with: it is
resumed with a warning, and from then on records that run's values.

The summary also records ``excerpt_rule``, the rule the sampled pairs' excerpts follow
(:data:`EXCERPT_RULE`). A file whose summary lacks it was written before 2026-12-06, when
excerpts began to follow QuRating's rule (:mod:`acadlm_plugins.qurating.pairs`): the same
settings now sample other pairs, so its pairs are refused as not in this run's sample, and the
error says that this, not a changed setting, is the likely cause (a new ``output_dir`` is the
fix); with the record, the error names the settings that choose the pairs.

**Failed answers.** An answer that is neither A nor B (see :mod:`acadlm_plugins.qurating.judges`)
is never turned into a made-up 0.5, which would train the rater towards "no preference". When
either order of a criterion fails, that criterion is written as ``null`` for the pair and the
pair's other criteria are kept: the rater masks a missing criterion and trains on the rest, as
QuRating keeps a comparison per criterion. Only a pair with no criterion left is not written.
Each failing answer goes to ``<name>.rejected.jsonl`` (pair id, criterion, order, problem,
answer); a pair counts as done once it is in either file (a resumed run does not ask again;
delete its lines to retry it) and the summary counts the missing criteria.

**Summary** (``<name>.summary.json``, also printed): pairs judged, pairs rejected (no criterion
judged), pairs with a missing criterion, per criterion the pairs judged and missing, the mean p
and the mean confidence ``|p - 0.5|`` over the whole file, the position bias over the whole
file (mean of ``(p_B[A,B] + p_B[B,A]) / 2 - 0.5``: 0 for an unbiased judge, positive when it
favours the text shown second; per criterion with ``position_bias_pairs``, the pairs it is
measured on, and file-wide over every judged (pair, criterion)), the mean probability mass the
judge put on the two answer letters in this run, throughput, the request counters of a
remote judge, and ``labelled_by`` (see *Resuming*). A rerun that judges nothing new therefore
reports the same position bias. Rows written before ``p_b_by_order`` was stored carry no order
answers: their share of the position bias is taken from the summary already beside the file
(``position_bias_unstored``, kept from run to run) and weighted by its pair count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating.criteria import Criterion
from acadlm_plugins.qurating.judges import Judge, Judgment
from acadlm_plugins.qurating.pairs import Pair

log = logging.getLogger(__name__)

ORDERS = ("ab", "ba")
ORDERS_FIELD = "p_b_by_order"  # {criterion: [p_B[A,B], p_B[B,A]]} in each row
LABELS_FIELD = "labelled_by"  # in the summary: {setting: value} that gave the rows their values
EXCERPT_RULE_FIELD = "excerpt_rule"  # in the summary: the rule its pairs' excerpts follow
#: How :func:`acadlm_plugins.qurating.pairs.excerpt_of` cuts excerpts since 2026-12-06
#: (QuRating's ``extract_excerpt``: a document of at most ``max_tokens`` tokens shown whole,
#: the start drawn from ``[0, tokens - max_tokens]``). Summaries written before then lack the
#: field; a rule that samples other pairs from the same settings gets a new value.
EXCERPT_RULE = "qurating-extract_excerpt-2026-12-06"
DECIMALS = 6


def order_averaged(p_b_ab: float, p_b_ba: float) -> float:
    """p(B better than A) from the judge's p(B) with B shown second (``p_b_ab``) and with B
    shown first (``p_b_ba``, where the judge's "B" means text A)."""
    return 0.5 * (p_b_ab + (1.0 - p_b_ba))


@dataclass(frozen=True)
class OutputFiles:
    """The judgments file and the two files named after it."""

    judgments: Path
    rejected: Path
    summary: Path

    @classmethod
    def for_judgments(cls, path: str | Path) -> OutputFiles:
        """``x.jsonl`` -> ``x.jsonl``, ``x.rejected.jsonl``, ``x.summary.json``."""
        path = Path(path)
        stem = path.name.removesuffix(".jsonl")
        return cls(judgments=path, rejected=path.with_name(f"{stem}.rejected.jsonl"),
                   summary=path.with_name(f"{stem}.summary.json"))


def read_jsonl_resumable(path: Path) -> list[dict[str, Any]]:
    """The rows of a jsonl file this stage appends to, after dropping a partial last line.

    A last line without its newline is what a kill during a write leaves: it is cut off the
    file (a warning says how many bytes) and will be written again. A broken line *before* the
    last one is not from a kill, so it is a :class:`DataError` naming ``file:line``.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        log.warning("%s: dropped a partial last line (%d bytes) left by an interrupted run; "
                    "it is judged again.", path, len(data) - complete)
        with open(path, "r+b") as handle:
            handle.truncate(complete)
            handle.flush()
            os.fsync(handle.fileno())
        data = data[:complete]
    rows = []
    for line_no, line in enumerate(data.decode("utf-8").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}); only the last line "
                            "can be cut short by an interrupted run. Fix: delete that line (its "
                            "pair is judged again) or start a new output file.") from None
        if not isinstance(row, dict) or not isinstance(row.get("pair_id"), str):
            raise DataError(f"{path}:{line_no}: not a row with a `pair_id`. Fix: delete that "
                            "line, or start a new output file.")
        rows.append(row)
    return rows


def _append(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as one write, then flush and fsync: a batch is on disk before the next."""
    if not rows:
        return
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "ab") as handle:
        handle.write(payload.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def check_min_answer_mass(value: float) -> float:
    """``value`` if it is a usable ``judge.min_answer_mass`` (in [0, 1)), else a ConfigError."""
    if not 0.0 <= value < 1.0:
        raise ConfigError("judge.min_answer_mass", f"is {value!r}, outside [0, 1).",
                          "use 0 to keep every A/B answer (QuRating's effective rule), 0.5 "
                          "for a capable judge.")
    return value


def _with_answer_mass_floor(judgment: Judgment, floor: float) -> Judgment:
    """``judgment`` rejected (``p_b`` None, with the reason) when its answer mass is known and
    below ``floor``: a judge that mostly answers something else than A or B."""
    mass = judgment.answer_mass
    if judgment.p_b is None or mass is None or mass >= floor:
        return judgment
    return replace(judgment, p_b=None, problem=(
        f"p(A) + p(B) = {mass:.3f} is below judge.min_answer_mass {floor:g} (p(B) among the "
        f"two: {judgment.p_b:.3f})"))


def _check_existing(files: OutputFiles, rows: list[dict[str, Any]],
                    rejected: list[dict[str, Any]], criteria: Sequence[Criterion],
                    pairs: Sequence[Pair]) -> set[str]:
    """Pair ids already done, after checking that the files belong to this config."""
    names = sorted(c.name for c in criteria)
    for line_no, row in enumerate(rows, start=1):
        judged = row.get("judgments")
        if not isinstance(judged, dict) or sorted(judged) != names:
            shown = sorted(judged) if isinstance(judged, dict) else judged
            raise ConfigError("criteria", f"{files.judgments} (row {line_no}) holds judgments "
                              f"for {shown}, but this run asks for {names}.",
                              "keep the criteria of the first run, or write to a new "
                              "`output_dir`.")
    done = {row["pair_id"] for row in rows} | {row["pair_id"] for row in rejected}
    stray = done - {pair.pair_id for pair in pairs}
    if stray:
        raise _stray_pairs_error(files, len(stray), min(stray), len(pairs))
    return done


def _stray_pairs_error(files: OutputFiles, count: int, example: str,
                       sampled: int) -> ConfigError:
    """The refusal of a file holding ``count`` pairs not in this run's sample, naming the
    cause its summary points to: a changed setting when it records this version's excerpt
    rule; else an excerpt rule of an earlier version (which no setting can bring back), with
    the settings as the other possible cause."""
    problem = (f"{files.judgments} holds {count} pairs that are not in this run's sample of "
               f"{sampled} (e.g. {example})")
    settings = ("the corpus, seed, excerpt lengths (max_tokens, min_excerpt_tokens, "
                "p_max_tokens), tokenizer or num_pairs")
    summary = _read_summary(files)
    recorded = summary.get(EXCERPT_RULE_FIELD) if summary is not None else None
    if recorded == EXCERPT_RULE:
        return ConfigError("pairs", f"{problem}: {settings} changed since it was written.",
                           "restore those settings to resume, or write to a new `output_dir`.")
    if recorded is None:
        version = (f"{files.summary.name} records no `{EXCERPT_RULE_FIELD}`, so an earlier "
                   "version most likely wrote the file, before excerpts followed QuRating's rule "
                   "(2026-12-06: a document of at most max_tokens tokens shown whole, the start "
                   "drawn from [0, tokens - max_tokens]); the same settings now sample other "
                   "pairs")
    else:
        version = (f"{files.summary.name} records excerpt rule {recorded!r}, this version "
                   f"samples by {EXCERPT_RULE!r}, so the same settings now sample other pairs")
    return ConfigError(
        "pairs", f"{problem}. {version}. (Else {settings} changed since it was written.)",
        "pairs of another excerpt rule cannot be resumed: write to a new `output_dir`, or "
        f"delete {files.judgments.name} and the files named after it to judge afresh "
        "(if a setting changed instead, restoring it resumes).")


def labelling_settings(judge: Judge, criteria: Sequence[Criterion],
                       min_answer_mass: float) -> dict[str, Any]:
    """``{setting: value}`` of what gives the judgments their values, recorded in the summary
    (``labelled_by``): the judge's ``label_settings`` (its ``description`` for a judge without
    them), ``criteria.<name>.prompt_sha256`` of each criterion's template as rendered, and
    ``judge.min_answer_mass``. Values survive a JSON round trip unchanged."""
    own = getattr(judge, "label_settings", None)
    settings: dict[str, Any] = (json.loads(json.dumps(dict(own))) if isinstance(own, Mapping)
                                else {"judge": judge.description})
    for criterion in criteria:
        settings[f"criteria.{criterion.name}.prompt_sha256"] = hashlib.sha256(
            criterion.template.encode("utf-8")).hexdigest()
    settings["judge.min_answer_mass"] = float(min_answer_mass)
    return settings


def _read_summary(files: OutputFiles) -> dict[str, Any] | None:
    """The summary beside the file as a dict; None when there is none or it is unreadable."""
    try:
        summary = json.loads(files.summary.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _write_summary(files: OutputFiles, summary: dict[str, Any]) -> None:
    """Write the summary through a temporary file: a kill never leaves half a summary."""
    partial = files.summary.with_name(f".{files.summary.name}.partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, files.summary)


def _shown(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"(sha256:)?[0-9a-f]{64}", value):
        return value[:-52] + "..."  # a hash: its first 12 digits say enough
    return repr(value)


_ABSENT = object()


def _check_and_record_labelling(files: OutputFiles, settings: dict[str, Any],
                                resuming: bool) -> None:
    """Refuse to add to a file that was labelled with other settings, then record ours.

    ``resuming``: the file (or its rejected file) already holds pairs. Their settings are the
    summary's ``labelled_by``; a setting recorded there with another value, or recorded there
    and absent now (another kind of judge), is a :class:`ConfigError` naming it. Without a
    record (a file written before it existed) the run goes on with a warning. The record is
    written before the first row, so a run killed before its summary still leaves it."""
    previous = _read_summary(files) if resuming else None
    recorded = previous.get(LABELS_FIELD) if previous is not None else None
    if resuming and not isinstance(recorded, dict):
        log.warning("%s: no record of the judge, prompts and min_answer_mass its pairs were "
                    "labelled with (the file was written before `%s` was recorded in %s), so "
                    "this run cannot check that it labels its pairs the same way; it goes on "
                    "and records its own settings from now on.", files.judgments, LABELS_FIELD,
                    files.summary.name)
    elif resuming:
        changed = [key for key in recorded if settings.get(key, _ABSENT) != recorded[key]]
        if changed:
            details = "; ".join(
                f"{key}: was {_shown(recorded[key])}, is "
                f"{_shown(settings[key]) if key in settings else 'not set (another judge)'}"
                for key in changed)
            raise ConfigError(
                changed[0], f"{files.judgments} was labelled with other settings than this "
                f"run's ({details}); its rows and this run's would be mixed in one file.",
                "write to a new `output_dir` (a new judgments file), or restore the settings "
                f"the file was labelled with (`{LABELS_FIELD}` in {files.summary}).")
        new = sorted(set(settings) - set(recorded))
        if new:
            log.warning("%s: %s not recorded for the pairs already in it (an older version "
                        "wrote it); this run assumes they match.", files.judgments,
                        ", ".join(new))
        if recorded == settings and previous is not None \
                and previous.get(EXCERPT_RULE_FIELD) == EXCERPT_RULE:
            return
    record = dict(previous) if previous is not None else {
        "judgments_file": str(files.judgments)}
    record[LABELS_FIELD] = settings
    record[EXCERPT_RULE_FIELD] = EXCERPT_RULE  # the pairs in the file passed _check_existing
    _write_summary(files, record)


ThroughputCallback = Callable[[dict[str, float], int], None]


def judge_pairs(pairs: Sequence[Pair], criteria: Sequence[Criterion], judge: Judge,
                output: str | Path, *, batch_pairs: int = 4, progress: bool = True,
                on_batch: ThroughputCallback | None = None,
                min_answer_mass: float = 0.0) -> dict[str, Any]:
    """Judge ``pairs`` on ``criteria`` in both orders into ``output`` (resuming it), write the
    rejected and summary files next to it, and return the summary.

    An answer whose p(A) + p(B) is below ``min_answer_mass`` is rejected like one that is
    neither letter; its criterion is then missing for that pair. (QuRating biases its judge's
    sampling to the two letters, so its own rule keeps nearly every order: ``0`` here.)

    ``on_batch(metrics, pairs_done)``, when given, is called after every written batch with
    this run's throughput so far (``prompts_per_second``, ``pairs_per_second``) and
    ``pairs_done`` (resumed ones included): the judge recipe logs it to its metric logger."""
    if batch_pairs < 1:
        raise ConfigError("batch_pairs", f"{batch_pairs!r} is not a positive integer.",
                          "use e.g. 4.")
    check_min_answer_mass(min_answer_mass)
    files = OutputFiles.for_judgments(output)
    files.judgments.parent.mkdir(parents=True, exist_ok=True)
    existing = read_jsonl_resumable(files.judgments)
    existing_rejected = read_jsonl_resumable(files.rejected)
    done = _check_existing(files, existing, existing_rejected, criteria, pairs)
    labelled_by = labelling_settings(judge, criteria, min_answer_mass)
    _check_and_record_labelling(files, labelled_by,
                                resuming=bool(existing or existing_rejected))
    todo = [pair for pair in pairs if pair.pair_id not in done]
    if done:
        log.info("Resuming %s: %d of %d pairs already done, %d to judge.", files.judgments,
                 len(pairs) - len(todo), len(pairs), len(todo))
    log.info("Judging %d pairs x %d criteria x 2 orders with %s.", len(todo), len(criteria),
             judge.description)
    masses: list[float] = []
    letter_only = 0
    written = rejected_now = 0
    started = time.perf_counter()
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="pair", desc="judging",
               disable=not progress or os.environ.get("ACADLM_NO_PROGRESS") == "1")
    try:
        for begin in range(0, len(todo), batch_pairs):
            batch = todo[begin:begin + batch_pairs]
            prompts = [prompt for pair in batch for criterion in criteria for prompt in (
                criterion.render(pair.a.text, pair.b.text),
                criterion.render(pair.b.text, pair.a.text))]
            answers = iter(judge.judge(prompts))
            rows, rejected = [], []
            for pair in batch:
                judged: dict[str, float | None] = {}
                found: list[tuple[str, float, float]] = []
                for criterion in criteria:
                    both: tuple[Judgment, Judgment] = (next(answers), next(answers))
                    both = (_with_answer_mass_floor(both[0], min_answer_mass),
                            _with_answer_mass_floor(both[1], min_answer_mass))
                    for order, judgment in zip(ORDERS, both, strict=True):
                        letter_only += judgment.letter_only
                        if judgment.answer_mass is not None:
                            masses.append(judgment.answer_mass)
                        if judgment.p_b is None:
                            rejected.append({"pair_id": pair.pair_id,
                                             "criterion": criterion.name, "order": order,
                                             "problem": judgment.problem,
                                             "answer": judgment.answer})
                    p_ab, p_ba = both[0].p_b, both[1].p_b
                    if p_ab is None or p_ba is None:
                        judged[criterion.name] = None  # this criterion only is missing
                        continue
                    found.append((criterion.name, p_ab, p_ba))
                    judged[criterion.name] = round(order_averaged(p_ab, p_ba), DECIMALS)
                if not found:
                    continue  # nothing judged: the pair is in the rejected file only
                rows.append({**pair.row_fields(), "judgments": judged, ORDERS_FIELD: {
                    name: [round(p_ab, DECIMALS), round(p_ba, DECIMALS)]
                    for name, p_ab, p_ba in found}})
            # Rows first: a kill between the two writes re-judges a fully rejected pair (never
            # duplicated) and at worst loses the failure notes of a row already written.
            _append(files.judgments, rows)
            _append(files.rejected, rejected)
            written += len(rows)
            rejected_now += len({row["pair_id"] for row in rejected}
                                - {row["pair_id"] for row in rows})
            bar.update(len(batch))
            if on_batch is not None:
                seconds = max(time.perf_counter() - started, 1e-9)
                judged = begin + len(batch)
                on_batch({"prompts_per_second": 2 * len(criteria) * judged / seconds,
                          "pairs_per_second": judged / seconds},
                         len(pairs) - len(todo) + judged)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    if done:  # the earlier runs' answers on this same file (checked above) count too
        masses = _earlier_answer_masses(files) + masses
    summary = summarize(files, criteria, masses=masses,
                        letter_only=letter_only, judged_now=written, rejected_now=rejected_now,
                        elapsed_s=elapsed, judge=judge, pairs_total=len(pairs),
                        labelled_by=labelled_by)
    _write_summary(files, summary)
    if summary["pairs_rejected"] or summary["pairs_with_missing_criteria"]:
        log.warning("%d pairs were rejected (no criterion answered with A or B) and %d lack "
                    "some criteria; see %s.", summary["pairs_rejected"],
                    summary["pairs_with_missing_criteria"], files.rejected)
    return summary


def summarize(files: OutputFiles, criteria: Sequence[Criterion], *,
              masses: Sequence[float], letter_only: int, judged_now: int, rejected_now: int,
              elapsed_s: float, judge: Judge, pairs_total: int,
              labelled_by: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary: file-wide means and position bias per criterion, this run's counters.

    ``masses`` are the answer masses to average: ``judge_pairs`` passes the earlier runs' on
    the same file (as their summary recorded them) followed by this run's. ``labelled_by``
    (:func:`labelling_settings`) is kept in it for the next run to compare with."""
    rows = read_jsonl_resumable(files.judgments)
    written_ids = {row["pair_id"] for row in rows}
    rejected_ids = {row["pair_id"] for row in read_jsonl_resumable(files.rejected)}
    unstored = _unstored_position_bias(files, rows)
    per_criterion = {}
    bias_sum = bias_pairs = 0.0
    for criterion in criteria:
        found = [row["judgments"].get(criterion.name) for row in rows]
        values = [float(v) for v in found if v is not None]
        both_orders = [(row.get(ORDERS_FIELD) or {}).get(criterion.name) for row in rows]
        biases = [(p_ab + p_ba) / 2 - 0.5 for p_ab, p_ba in filter(None, both_orders)]
        total, count = sum(biases), len(biases)
        if criterion.name in unstored:
            total += unstored[criterion.name]["mean"] * unstored[criterion.name]["pairs"]
            count += unstored[criterion.name]["pairs"]
        bias_sum, bias_pairs = bias_sum + total, bias_pairs + count
        per_criterion[criterion.name] = {
            "judged": len(values),
            "missing": len(found) - len(values),
            "mean_p": _mean(values),
            "mean_confidence": _mean([abs(v - 0.5) for v in values]),
            "position_bias": round(total / count, DECIMALS) if count else None,
            "position_bias_pairs": count,
        }
    partial = sum(any(v is None for v in row["judgments"].values()) for row in rows)
    prompts = 2 * len(criteria) * (judged_now + rejected_now)
    return {
        "judgments_file": str(files.judgments),
        "judge": judge.description,
        "criteria": [c.name for c in criteria],
        "pairs_sampled": pairs_total,
        "pairs_in_file": len(rows),
        "pairs_judged_this_run": judged_now,
        "pairs_rejected": len(rejected_ids - written_ids),
        "pairs_with_missing_criteria": partial,
        "pairs_rejected_this_run": rejected_now,
        "per_criterion": per_criterion,
        "position_bias": round(bias_sum / bias_pairs, DECIMALS) if bias_pairs else None,
        **({"position_bias_unstored": unstored} if unstored else {}),
        "mean_answer_mass": _mean(list(masses)),
        "answer_mass_answers": len(masses),
        "letter_only_answers": letter_only,
        "elapsed_s": round(elapsed_s, 2),
        "prompts_per_s": round(prompts / elapsed_s, 3) if elapsed_s > 0 and prompts else None,
        "requests": judge.stats(),
        **({LABELS_FIELD: labelled_by} if labelled_by is not None else {}),
        EXCERPT_RULE_FIELD: EXCERPT_RULE,
    }


def _unstored_position_bias(files: OutputFiles, rows: Sequence[dict[str, Any]]
                            ) -> dict[str, dict[str, float]]:
    """``{criterion: {"mean", "pairs"}}``: the position bias of rows written before each row
    stored its order answers (``p_b_by_order``), as the summary beside the file last knew it.

    Such rows cannot be recomputed, so their part is carried from summary to summary: a summary
    of this version keeps it as ``position_bias_unstored``; one of an older version measured
    its position bias on the pairs its own run judged (``pairs_judged_this_run``). Empty when
    every row stores its order answers or no earlier summary measured any."""
    if all(ORDERS_FIELD in row for row in rows) or not files.summary.is_file():
        return {}
    try:
        previous = json.loads(files.summary.read_text())
        if LABELS_FIELD in previous and "per_criterion" not in previous:
            return {}  # only the record written before the first row: no run finished
        per_criterion = previous["per_criterion"]
        if any("position_bias_pairs" in stats for stats in per_criterion.values()):
            return dict(previous.get("position_bias_unstored", {}))
        pairs = int(previous.get("pairs_judged_this_run") or 0)
        return {name: {"mean": float(stats["position_bias"]), "pairs": pairs}
                for name, stats in per_criterion.items()
                if stats.get("position_bias") is not None and pairs}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: unreadable, so the position bias leaves out the rows that do not "
                    "store their order answers.", files.summary)
        return {}


def _earlier_answer_masses(files: OutputFiles) -> list[float]:
    """The earlier runs' answer masses on this file, as a list that averages like them: the
    previous summary's mean repeated over its answer count (0 answers when it predates the
    count, is missing or is unreadable; a killed run never wrote its summary, so its answers
    are left out of the mean, which says over how many answers it is)."""
    try:
        previous = json.loads(files.summary.read_text())
        mean, count = previous.get("mean_answer_mass"), int(previous.get("answer_mass_answers") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [float(mean)] * count if mean is not None and count > 0 else []


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), DECIMALS) if values else None


def format_summary(summary: dict[str, Any]) -> str:
    """A short table of the summary for the terminal."""
    def show(value: float | None, fmt: str = "+.3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = ["", "=== QuRating judgments ===",
             f"judge: {summary['judge']}",
             (f"pairs: {summary['pairs_in_file']} in {summary['judgments_file']} "
              f"({summary['pairs_judged_this_run']} judged now), "
              f"{summary['pairs_rejected']} rejected, "
              f"{summary['pairs_with_missing_criteria']} with a missing criterion, "
              f"{summary['pairs_sampled']} sampled"),
             (f"{'criterion':<22}{'missing':>8}{'mean p':>8}{'mean |p-0.5|':>14}"
              f"{'position bias':>15}")]
    for name, stats in summary["per_criterion"].items():
        lines.append(f"{name:<22}{stats['missing']:>8}{show(stats['mean_p'], '.3f'):>8}"
                     f"{show(stats['mean_confidence'], '.3f'):>14}"
                     f"{show(stats['position_bias']):>15}")
    requests = summary["requests"]
    lines.append(f"position bias (all pairs in the file, >0 favours the text shown second): "
                 f"{show(summary['position_bias'])}; mean p(A)+p(B): "
                 f"{show(summary['mean_answer_mass'], '.3f')} over "
                 f"{summary.get('answer_mass_answers', 0)} answers")
    lines.append(f"this run: {summary['elapsed_s']} s, {show(summary['prompts_per_s'], '.2f')} prompts/s; "
                 f"requests {requests['requests']}, failed attempts "
                 f"{requests['failed_attempts']}, failed requests {requests['failed_requests']}, "
                 f"letter-only answers {summary['letter_only_answers']}")
    return "\n".join(lines)
