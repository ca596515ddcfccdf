"""HELMET's judge-based metrics for long-document QA and summarization, asked of an
OpenAI-compatible judge when the task metadata names one.

HELMET (Yen et al. 2024, sections 2.6-2.7 and appendix; ``scripts/eval_gpt4_longqa.py``,
``scripts/eval_gpt4_summ.py`` and ``scripts/collect_results.py`` of princeton-nlp/HELMET) scores
NarrativeQA answers and Multi-LexSum / InfiniteBench summaries with GPT-4o because ROUGE
rewards copying and punishes paraphrase. We ask the same questions with our own prompts, read
the same JSON answers and combine them the same way:

* **Long-document QA** (``acadlm_narrativeqa``, as HELMET judges NarrativeQA only, and the
  stand-in ``acadlm_longqa``): the judge sees the question, the correct answers
  and the model's answer (the text after an ``Answer:`` it may repeat, on one line) and grades
  fluency 0-1 and correctness 0-3 as ``{"fluency": f, "correctness": c}``. A sample scores
  ``f * c``; HELMET reports the mean times 100/3, so ``judge_score`` is ``100 f c / 3`` on
  0-100. ``judge_fluency`` (``100 f``) and ``judge_correctness`` (``100 c / 3``) come with it.
* **Summarization** (``acadlm_infbench_sum``, ``acadlm_multi_lexsum`` and the stand-in
  ``acadlm_summ``): three questions per summary. Fluency 0-1
  (``{"fluency": f}``); recall, the number of the reference's key points the summary supports
  (``{"recall": n}``); precision, the number of the summary's sentences the expert summary
  supports (``{"precision": m, "sentence_count": s}``). With ``R = n / #key points`` and
  ``P = m / s`` (each 0 when its denominator is), a sample's F1 is ``f * 2PR / (P + R)``
  (0 when ``P + R`` is), reported times 100 as ``judge_f1``, with ``judge_recall``,
  ``judge_precision`` and ``judge_fluency`` (each times 100). HELMET ships key points that
  GPT-4o extracted from its reference summaries; give them with ``summ_keypoints_path``
  (HELMET's own files: ``id`` with ``keypoints`` or ``summary/short_keypoints``, and
  ``summary/long`` as the expert summary for precision, as HELMET's Multi-LexSum uses it).
  Without them the judge extracts the key points of the first reference summary itself (one
  more cached request per reference), which then also serves as the expert summary.

Each metric is reported per length as ``<length>_<metric>`` next to the model-free ones
(substring EM, ROUGE-L, ...), which are always computed, and the task's metric named by the
length alone becomes the judge's (``judge_score``, ``judge_f1``): the score HELMET's category
counts when a model-based one exists. The tasks declare these metrics to lm-eval. A sample's judge metrics are all or nothing,
as in HELMET: when a request fails after its retries, or an answer holds no JSON object with
the expected integers in range, the sample has no judge metrics -- it is left out of their
means, never counted as 0 -- and the log counts such samples per task. Counts the judge gives
above their maximum (recall above the number of key points) are capped at it; HELMET does not
cap them.

**Configuration** (task metadata, e.g. ``--metadata``): ``judge: {url, model, api_key_env}``
with the key names of the QuRating judge's ``judge.openai`` block; the other keys are in
:data:`DEFAULTS`. Without ``judge`` the judge metrics are absent and the reason is logged.
The key itself is read from the named environment variable, sent in the ``Authorization``
header only, and never written into a document, a log or the cache.

**Requests** go through the QuRating client (:class:`acadlm_plugins.qurating.judges.OpenAIJudge`):
exponential backoff on timeouts, connection errors, 429 and 5xx, an optional rate limit, and
``concurrency`` worker threads. The lm-eval filter :class:`JudgeMetricsFilter` (named in the
task YAMLs) sends the requests of all of a task's samples at once, with a progress bar, before
lm-eval scores them one by one; the scoring hooks then find every verdict ready.

**Cache**: every answer is stored on disk, one JSON file per (model, prompt) under
``cache_dir`` (default ``$ACADLM_HOME/judge_cache``), so a rerun asks nothing that was answered
before. Sampling settings are not part of the key: clear the folder after changing them.
Failed requests are not stored and are asked again by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval.api.filter import Filter
from lm_eval.api.registry import filter_registry, register_filter
from tqdm import tqdm

from acadlm_plugins.evaluation.lengths import task_error
from acadlm_plugins.evaluation.scoring import clean_prediction
from acadlm_plugins.evaluation.task_settings import declare_settings, path_check

log = logging.getLogger(__name__)

#: The metadata key that configures the judge, and the one naming HELMET's key-point file.
JUDGE_KEY = "judge"
KEYPOINTS_KEY = "summ_keypoints_path"
#: The document field that carries what the judge needs (JSON text; absent without a judge).
DOC_FIELD = "judge"
LONGQA, SUMM = "longqa", "summ"
METRICS = {LONGQA: ("judge_score", "judge_fluency", "judge_correctness"),
           SUMM: ("judge_f1", "judge_recall", "judge_precision", "judge_fluency")}
#: Generation budget of the judge per task, as HELMET's scripts set it.
HELMET_MAX_TOKENS = {LONGQA: 2048, SUMM: 4096}
#: Optional keys of ``judge`` and their defaults. Sampling as HELMET asks GPT-4o: temperature
#: 0.1, top-p 0.9, seed 42; ``max_tokens: null`` is HELMET's per-task budget above.
DEFAULTS: dict[str, Any] = {
    "endpoint": "chat", "api_key_env": None, "timeout_s": 300.0, "max_retries": 4,
    "backoff_s": 1.0, "max_backoff_s": 30.0, "requests_per_second": None, "concurrency": 4,
    "temperature": 0.1, "top_p": 0.9, "seed": 42, "max_tokens": None, "cache_dir": None,
}
FILTER_NAME = "acadlm_judge_metrics"
_EXAMPLE = ('--metadata \'{"judge": {"url": "http://localhost:8000/v1", "model": "<served '
            'model>", "api_key_env": "MY_KEY"}}\'')


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how to ask it (see :data:`DEFAULTS`)."""

    url: str
    model: str
    endpoint: str = "chat"
    api_key_env: str | None = None
    timeout_s: float = 300.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    requests_per_second: float | None = None
    concurrency: int = 4
    temperature: float = 0.1
    top_p: float = 0.9
    seed: int | None = 42
    max_tokens: int | None = None
    cache_dir: str = ""

    def to_json(self) -> str:
        """The settings as canonical JSON (documents carry it; it holds no secret)."""
        return json.dumps(asdict(self), sort_keys=True)


_NUMBERS: dict[str, tuple[type, float, bool]] = {  # key: (type, minimum, may be null)
    "timeout_s": (float, 1e-3, False), "max_retries": (int, 0, False),
    "backoff_s": (float, 0.0, False), "max_backoff_s": (float, 0.0, False),
    "requests_per_second": (float, 1e-6, True), "concurrency": (int, 1, False),
    "temperature": (float, 0.0, False), "top_p": (float, 0.0, False), "seed": (int, 0, True),
    "max_tokens": (int, 1, True),
}


def judge_settings(metadata: Mapping[str, Any], *, task: str) -> JudgeSettings | None:
    """The judge that ``metadata["judge"]`` describes, checked; None (with the reason logged)
    when there is none, so that the judge metrics are absent rather than 0."""
    value = metadata.get(JUDGE_KEY)
    if not value:
        log.warning("%s: the judge metrics are not computed (absent from the results, not 0): "
                    "no `%s` in the task metadata. To compute them as HELMET does, name an "
                    "OpenAI-compatible judge: %s.", task, JUDGE_KEY, _EXAMPLE)
        return None
    judge_type_check(metadata, task=task)
    known = {"url", "model", *DEFAULTS}
    for key in value:
        if key not in known:
            hint = " (the judge's API base is `url`, as in QuRating's judge.openai)" \
                if key == "base_url" else ""
            raise task_error(task, f"{JUDGE_KEY}.{key}", f"unknown key{hint}.",
                             f"Use only {', '.join(sorted(known))}.")
    options = {**DEFAULTS, **value}
    for key in ("url", "model"):
        if not isinstance(options.get(key), str) or not options[key].strip():
            raise task_error(task, f"{JUDGE_KEY}.{key}", "is required (a non-empty string).",
                             f"Give e.g. {_EXAMPLE}.")
    if not str(options["url"]).startswith(("http://", "https://")):
        raise task_error(task, f"{JUDGE_KEY}.url", f"{options['url']!r} is not an http(s) URL.",
                         "Give the server's API base, e.g. http://localhost:8000/v1.")
    if options["endpoint"] not in ("chat", "completions"):
        raise task_error(task, f"{JUDGE_KEY}.endpoint", f"{options['endpoint']!r} is not "
                         "`chat` or `completions`.", "Use `chat` for /v1/chat/completions.")
    key_env = options["api_key_env"]
    if key_env is not None and not os.environ.get(str(key_env)):
        raise task_error(task, f"{JUDGE_KEY}.api_key_env", f"the environment variable "
                         f"{key_env!r} is not set.", f"export {key_env}=<key>, or leave "
                         "`api_key_env` out for a server without a key.")
    for key, (kind, minimum, nullable) in _NUMBERS.items():
        options[key] = _number(options[key], kind, minimum, nullable, task=task, key=key)
    cache = options["cache_dir"]
    if cache is None:
        from acadlm_plugins.defaults.paths import acadlm_home

        cache = acadlm_home() / "judge_cache"
    options["cache_dir"] = str(Path(str(cache)).expanduser().resolve())
    return JudgeSettings(**options)


def judge_type_check(metadata: Mapping[str, Any], *, task: str) -> None:
    """The form of ``judge`` that :func:`judge_settings` reads: unset, empty or a mapping (its
    fields are checked by the judged tasks, which read them)."""
    value = metadata.get(JUDGE_KEY)
    if value and not isinstance(value, Mapping):
        raise task_error(task, JUDGE_KEY, f"{value!r} is not a mapping.", f"Give e.g. {_EXAMPLE}.")


# Read by the judged tasks (judge_settings, load_keypoints).
declare_settings("the judged tasks", {JUDGE_KEY: judge_type_check,
                                      KEYPOINTS_KEY: path_check(KEYPOINTS_KEY)})


def _number(value: Any, kind: type, minimum: float, nullable: bool, *, task: str,
            key: str) -> Any:
    if value is None and nullable:
        return None
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and number != float(value)):
            raise ValueError
    except (TypeError, ValueError):
        raise task_error(task, f"{JUDGE_KEY}.{key}", f"{value!r} is not "
                         f"{'an integer' if kind is int else 'a number'}.") from None
    if number < minimum:
        raise task_error(task, f"{JUDGE_KEY}.{key}", f"{number} is below {minimum}.")
    return number


@dataclass(frozen=True)
class KeyPoints:
    """A reference's key points and, if the file has one, the expert summary for precision."""

    points: tuple[str, ...]
    expert_summary: str | None


def load_keypoints(metadata: Mapping[str, Any], *, task: str) -> dict[str, KeyPoints]:
    """Key points by document id from ``summ_keypoints_path`` (empty when unset), in HELMET's
    formats: ``{"id", "keypoints"}`` (InfiniteBench) or ``{"id", "summary/short_keypoints",
    "summary/long"}`` (Multi-LexSum)."""
    from acadlm_plugins.evaluation.local_data import data_path, iter_json_objects

    path = data_path(metadata, KEYPOINTS_KEY, None, task=task)
    if path is None:
        return {}
    example = '{"id": "d1", "keypoints": ["...", "..."]}'
    found = {}
    for number, row in iter_json_objects(path, task=task, key=KEYPOINTS_KEY, example=example):
        points = row.get("keypoints", row.get("summary/short_keypoints"))
        if row.get("id") is None or not isinstance(points, list) or not all(
                isinstance(point, str) for point in points):
            raise task_error(task, KEYPOINTS_KEY, f"{path}:{number} needs `id` and a list of "
                             "strings under `keypoints` (or `summary/short_keypoints`).",
                             f"Each line must look like {example}.")
        long_summary = row.get("summary/long")
        found[str(row["id"])] = KeyPoints(
            tuple(" ".join(point.split()) for point in points if point.strip()),
            long_summary if isinstance(long_summary, str) and long_summary.strip() else None)
    return found


SampleBuilder = Callable[[Any, int, int, Any], dict[str, Any]]


def judged_builder(task: str, kind: str, metadata: Mapping[str, Any],
                   builder: SampleBuilder) -> SampleBuilder:
    """``builder`` whose rows also carry what the judge needs (field ``judge``), or
    ``builder`` itself when no judge is configured. The judge is checked here, before any
    prompt is built, so that a configuration error stops the task at once."""
    settings = judge_settings(metadata, task=task)
    if settings is None:
        return builder
    keypoints = load_keypoints(metadata, task=task) if kind == SUMM else {}
    missing: set[str] = set()

    def build(rng: Any, length: int, index: int, tokenizer: Any) -> dict[str, Any]:
        row = builder(rng, length, index, tokenizer)
        spec: dict[str, Any] = {"task": task, "kind": kind, "settings": asdict(settings)}
        if kind == SUMM:
            given = keypoints.get(str(row.get("document_id")))
            if given is None and keypoints and not missing:
                log.warning("%s: document %s has no key points in %s; the judge extracts "
                            "them from its reference summary.", task, row.get("document_id"),
                            metadata.get(KEYPOINTS_KEY))
            if given is None:
                missing.add(str(row.get("document_id")))
            spec["keypoints"] = list(given.points) if given else None
            spec["expert_summary"] = given.expert_summary if given else None
        row[DOC_FIELD] = json.dumps(spec, sort_keys=True)
        return row

    log.info("%s: judge metrics %s from %s (model %s).", task, ", ".join(METRICS[kind]),
             settings.url, settings.model)
    return build


# ------------------------------------------------------------------------------- prompts

LONGQA_PROMPT = """\
You are grading an answer to a question about a long document. You do not see the document. \
You see the question, a list of correct answers (an answer that agrees with any one of them \
deserves full marks) and the answer to grade.

Grade two things.

Fluency:
- 0: the answer is incoherent, repeats itself (with the same or other words), breaks off \
unfinished, or is gibberish. An answer that is coherent but repeats itself or is unfinished \
still gets 0.
- 1: the answer is coherent, fluent, grammatical and does not repeat itself.

Correctness:
- 0 (wrong): the answer agrees with none of the correct answers.
- 1 (partly right): the answer agrees with part of a correct answer, e.g. the question asks \
for a place and a year and only the year is right.
- 2 (right, with unrelated content): the answer agrees fully with a correct answer but also \
says things that have nothing to do with the question. Details that bear on the question are \
not unrelated, even when the correct answers leave them out.
- 3 (right and to the point): the answer agrees fully with a correct answer and everything it \
says bears on the question. Length alone costs nothing: if a correct answer is "in Lisbon", \
"She moved to Lisbon after the war" gets 3.

Question: {question}
Correct answers: {answers}
Answer to grade: {answer}

Reason step by step about the answer first. Then, on the last line, give the two grades as \
JSON in exactly this form: {{"fluency": 1, "correctness": 2}}
"""

FLUENCY_PROMPT = """\
You are grading the fluency of a text written as a summary. A fluent text is coherent, \
grammatical and free of repetition.

- 0: the text is incoherent, repeats itself (with the same or other words), is empty or only \
a heading such as "Summary:", or is gibberish. A text that is coherent but repeats itself \
still gets 0.
- 1: the text is coherent, fluent, grammatical and does not repeat itself. A text that is \
fluent throughout but whose last sentence is cut off still gets 1.

Text: "{text}"

Reason step by step first. Then, on the last line, give the grade as JSON in exactly this \
form: {{"fluency": 1}}
"""

RECALL_PROMPT = """\
You are grading a summary{subject}: how much of a reference summary it covers. You are \
given the key points of the reference summary, numbered, and the summary to grade.

For each key point, decide whether the summary supports it: {recall_rule} The recall is the \
number of key points present.

Key points:
{keypoints}

Summary to grade: <summary>{summary}</summary>

Go through the key points one by one and say for each whether the summary supports it. Then, \
on the last line, give the count as JSON in exactly this form: {{"recall": 2}}
"""

PRECISION_PROMPT = """\
You are grading a summary{subject}: how much of it is backed by an expert's summary of the \
same document.

Split the summary to grade into its sentences. A sentence is supported when its main facts \
agree with the expert summary; minor details the expert summary leaves out ({minor_details}) \
do not make it unsupported. A sentence whose main facts the expert summary leaves out or \
contradicts is not supported.{precision_extra} The precision is the number of supported \
sentences.

Expert summary: <summary>{expert}</summary>

Summary to grade: <summary>{summary}</summary>

Go through the sentences of the summary to grade one by one and say for each whether the \
expert summary supports it. Then, on the last line, give the number of supported sentences \
and the number of sentences as JSON in exactly this form: {{"precision": 3, "sentence_count": 5}}
"""


@dataclass(frozen=True)
class SummaryRubric:
    """What the recall and precision prompts say for one kind of document. HELMET grades
    novels (InfiniteBench En.Sum) by other rules than legal cases (Multi-LexSum, and any other
    summary): a key point counts when most of its facts are there rather than all, and a
    sentence of commentary the expert summary lacks is unsupported."""

    subject: str
    recall_rule: str
    minor_details: str
    precision_extra: str = ""


_STRICT_RECALL = "a key point is present only when the summary clearly states its facts."
LEGAL_RUBRIC = SummaryRubric(
    "of a civil lawsuit (its background, the parties and the outcome)", _STRICT_RECALL,
    "exact dates, the names of people, laws or earlier cases")
NOVEL_RUBRIC = SummaryRubric(
    "of a novel (its plot and characters)",
    "a key point is present when the summary states its facts; a key point with several facts "
    "is present when most of them are stated.",
    "exact dates, the names of people or places",
    " Nor is a sentence that adds what the expert summary does not contain, such as analysis "
    "of the story or commentary on it.")
GENERAL_RUBRIC = SummaryRubric("", _STRICT_RECALL, "exact dates or names")
#: The rubric of each summarization task; a task not named here gets GENERAL_RUBRIC, the
#: legal rules (HELMET's default) without the lawsuit.
SUMMARY_RUBRICS = {"acadlm_infbench_sum": NOVEL_RUBRIC, "acadlm_multi_lexsum": LEGAL_RUBRIC}


def summary_rubric(task: str) -> SummaryRubric:
    """The rubric HELMET applies to the summaries of ``task``."""
    return SUMMARY_RUBRICS.get(task, GENERAL_RUBRIC)


KEYPOINTS_PROMPT = """\
Below is the summary of a document. List its key points: the separate facts that a good \
summary of the document must state, each as one short sentence that stands on its own, in \
the order the summary gives them. Add nothing the summary does not say.

Summary: <summary>{summary}</summary>

Give the list as JSON in exactly this form: {{"key_points": ["first point", "second point"]}}
"""

_ANSWER_PREFIX = re.compile(r"answer:", re.IGNORECASE)


def longqa_answer_text(prediction: str) -> str:
    """The answer the judge grades: the generation on one line, from after the first
    ``Answer:`` when the model wrote one (chat models often repeat the prefix), as HELMET
    reads it."""
    text = " ".join(prediction.split())
    prefix = _ANSWER_PREFIX.search(text)
    return text[prefix.end():].strip() if prefix else text


def longqa_prompt(question: str, answers: Sequence[str], prediction: str) -> str:
    """The judge's prompt for one long-document QA answer."""
    return LONGQA_PROMPT.format(question=question, answer=longqa_answer_text(prediction),
                                answers=json.dumps(list(answers), ensure_ascii=False))


def numbered(points: Sequence[str]) -> str:
    """Key points as a numbered list, one a line."""
    return "\n".join(f"{i}. {point}" for i, point in enumerate(points, start=1))


# ------------------------------------------------------------------------------- answers


def last_json_object(text: str) -> dict[str, Any] | None:
    """The last JSON object written in ``text`` (after the judge's reasoning, in a code fence
    or not), or None if it holds none."""
    decoder = json.JSONDecoder()
    found, position = None, text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            found = value
        position = text.find("{", end)
    return found


def _count(grades: Mapping[str, Any], key: str, high: float = math.inf) -> int | None:
    """``grades[key]`` as a whole number in ``0..high``, else None."""
    value = grades.get(key)
    if isinstance(value, str):
        value = value.strip()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if isinstance(value, bool) or not number.is_integer() or not 0 <= number <= high:
        return None
    return int(number)


def parse_longqa_grades(text: str) -> tuple[int, int] | None:
    """(fluency 0-1, correctness 0-3) from a long-document QA verdict, or None if malformed."""
    grades = last_json_object(text)
    if grades is None:
        return None
    fluency, correctness = _count(grades, "fluency", 1), _count(grades, "correctness", 3)
    return None if fluency is None or correctness is None else (fluency, correctness)


def parse_fluency(text: str) -> int | None:
    """Fluency 0-1 from a summary fluency verdict, or None if malformed."""
    grades = last_json_object(text)
    return None if grades is None else _count(grades, "fluency", 1)


def parse_recall(text: str) -> int | None:
    """The number of key points present from a recall verdict, or None if malformed."""
    grades = last_json_object(text)
    return None if grades is None else _count(grades, "recall")


def parse_precision(text: str) -> tuple[int, int] | None:
    """(supported sentences, sentences) from a precision verdict, or None if malformed."""
    grades = last_json_object(text)
    if grades is None:
        return None
    supported, sentences = _count(grades, "precision"), _count(grades, "sentence_count")
    return None if supported is None or sentences is None else (supported, sentences)


def parse_key_points(text: str) -> tuple[str, ...] | None:
    """The key points the judge extracted, or None unless it gave a non-empty list of
    strings."""
    answer = last_json_object(text)
    points = answer.get("key_points") if answer else None
    if not isinstance(points, list) or not points or not all(
            isinstance(point, str) and point.strip() for point in points):
        return None
    return tuple(" ".join(point.split()) for point in points)


def longqa_scores(fluency: int, correctness: int) -> dict[str, float]:
    """One QA sample's judge metrics on 0-100: HELMET's score ``fluency x correctness`` (0-3)
    times 100/3, and its two parts."""
    return {"judge_score": 100.0 * fluency * correctness / 3.0,
            "judge_fluency": 100.0 * fluency, "judge_correctness": 100.0 * correctness / 3.0}


def summary_scores(fluency: int, found: int, key_points: int, supported: int,
                   sentences: int) -> dict[str, float]:
    """One summary's judge metrics on 0-100: recall ``found / key_points``, precision
    ``supported / sentences`` (each 0 with a zero denominator, counts capped at it) and HELMET's
    F1 ``fluency x 2PR / (P + R)``."""
    recall = min(found, key_points) / key_points if key_points else 0.0
    precision = min(supported, sentences) / sentences if sentences else 0.0
    f1 = fluency * 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"judge_f1": 100.0 * f1, "judge_recall": 100.0 * recall,
            "judge_precision": 100.0 * precision, "judge_fluency": 100.0 * fluency}


# -------------------------------------------------------------------------------- cache


class JudgeCache:
    """Judge answers on disk, one JSON file per (model, prompt), written atomically so that
    threads and data-parallel processes can share the folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, model: str, prompt: str) -> Path:
        digest = hashlib.sha256(json.dumps([model, prompt]).encode("utf-8")).hexdigest()
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, model: str, prompt: str) -> str | None:
        """The stored answer, or None."""
        path = self._path(model, prompt)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if entry.get("model") != model or entry.get("prompt") != prompt:
            return None
        return entry.get("output") if isinstance(entry.get("output"), str) else None

    def put(self, model: str, prompt: str, output: str) -> None:
        """Store an answer (a temporary file renamed into place)."""
        path = self._path(model, prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         suffix=".tmp", delete=False) as handle:
            json.dump({"model": model, "prompt": prompt, "output": output}, handle)
        os.replace(handle.name, path)


# ------------------------------------------------------------------------------- client


class TextJudge:
    """An OpenAI-compatible server asked for whole answers, through the QuRating client's
    transport (URL forms, API key header, retries with backoff, rate limit, counters)."""

    def __init__(self, settings: JudgeSettings) -> None:
        from acadlm_plugins.qurating.judges import OpenAIJudge

        self.settings = settings
        self.transport = OpenAIJudge(
            settings.url, settings.model, endpoint=settings.endpoint,
            api_key_env=settings.api_key_env, timeout_s=settings.timeout_s,
            max_retries=settings.max_retries, backoff_s=settings.backoff_s,
            max_backoff_s=settings.max_backoff_s,
            requests_per_second=settings.requests_per_second,
            concurrency=settings.concurrency)

    def request_body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """The JSON body asking for one answer to ``prompt``."""
        body: dict[str, Any] = {"model": self.settings.model, "max_tokens": max_tokens,
                                "temperature": self.settings.temperature,
                                "top_p": self.settings.top_p}
        if self.settings.seed is not None:
            body["seed"] = self.settings.seed
        if self.transport.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def complete(self, prompt: str, max_tokens: int) -> str:
        """The judge's answer text; a JudgeRequestError when the server gives none."""
        from acadlm_plugins.qurating.judges import JudgeRequestError

        # The QuRating client's retrying POST (it asks for log-probabilities, we for text).
        response = self.transport._post(self.request_body(prompt, max_tokens))
        try:
            choice = response["choices"][0]
            text = (choice.get("message") or {}).get("content") \
                if self.transport.endpoint == "chat" else choice.get("text")
        except (KeyError, IndexError, TypeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise JudgeRequestError(f"{self.transport.url}: the response holds no answer text: "
                                    f"{json.dumps(response)[:200]}")
        return text


_CLIENTS: dict[str, TextJudge] = {}
_CLIENTS_LOCK = threading.Lock()


def judge_client(settings: JudgeSettings) -> TextJudge:
    """One client per judge configuration, shared by all tasks of the process."""
    key = settings.to_json()
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = TextJudge(settings)
        return _CLIENTS[key]


@dataclass(frozen=True)
class Answer:
    """A judge's answer text (None when the request failed, with the error) and whether it
    came from the cache."""

    text: str | None
    error: str = ""
    cached: bool = False


def ask(settings: JudgeSettings, prompts: Sequence[str], max_tokens: Sequence[int], *,
        desc: str = "judge") -> list[Answer]:
    """The judge's answers to ``prompts``, in order: from the cache where it has them, else
    asked ``concurrency`` at a time (each distinct prompt once) and stored. A request that
    fails after its retries gives an :class:`Answer` without text, not an exception."""
    from acadlm_plugins.qurating.judges import JudgeRequestError

    cache = JudgeCache(settings.cache_dir)
    found: dict[str, Answer] = {}
    budget: dict[str, int] = {}
    for prompt, tokens in zip(prompts, max_tokens, strict=True):
        if prompt in found or prompt in budget:
            continue
        stored = cache.get(settings.model, prompt)
        if stored is not None:
            found[prompt] = Answer(stored, cached=True)
        else:
            budget[prompt] = tokens
    if budget:
        client = judge_client(settings)

        def one(prompt: str) -> Answer:
            try:
                text = client.complete(prompt, budget[prompt])
            except (JudgeRequestError, OSError) as err:
                return Answer(None, error=str(err))
            cache.put(settings.model, prompt, text)
            return Answer(text)

        with ThreadPoolExecutor(max_workers=settings.concurrency) as pool:
            futures = {pool.submit(one, prompt): prompt for prompt in budget}
            with tqdm(total=len(futures), desc=desc, disable=len(futures) < 2) as bar:
                for future in as_completed(futures):
                    found[futures[future]] = future.result()
                    bar.update()
    return [found[prompt] for prompt in prompts]


# ------------------------------------------------------------------------ scoring samples


@dataclass(frozen=True)
class Verdict:
    """A sample's judge metrics, or why there are none (``failed``: a request failed;
    ``malformed``: an answer did not parse), with a detail for the log."""

    scores: dict[str, float] | None
    problem: str = ""
    detail: str = ""


@dataclass(frozen=True)
class _Sample:
    spec: dict[str, Any]
    doc: Mapping[str, Any]
    prediction: str

    @property
    def kind(self) -> str:
        return str(self.spec["kind"])


def _failure(answer: Answer) -> Verdict | None:
    return Verdict(None, "failed", answer.error) if answer.text is None else None


def _malformed(answer: Answer) -> Verdict:
    text = " ".join((answer.text or "").split())
    return Verdict(None, "malformed", repr(text if len(text) <= 160 else "..." + text[-160:]))


def _longqa_verdict(answers: Sequence[Answer]) -> Verdict:
    failed = _failure(answers[0])
    if failed:
        return failed
    grades = parse_longqa_grades(answers[0].text or "")
    return _malformed(answers[0]) if grades is None else Verdict(longqa_scores(*grades))


def _summary_verdict(answers: Sequence[Answer], key_points: int) -> Verdict:
    for answer in answers:
        failed = _failure(answer)
        if failed:
            return failed
    fluency = parse_fluency(answers[0].text or "")
    found = parse_recall(answers[1].text or "")
    precision = parse_precision(answers[2].text or "")
    for answer, parsed in zip(answers, (fluency, found, precision)):
        if parsed is None:
            return _malformed(answer)
    assert fluency is not None and found is not None and precision is not None
    return Verdict(summary_scores(fluency, found, key_points, *precision))


def _summary_prompts(sample: _Sample, points: Sequence[str]) -> list[str]:
    summary = clean_prediction(sample.prediction)
    expert = sample.spec.get("expert_summary") or sample.doc["outputs"][0]
    rubric = summary_rubric(str(sample.spec["task"]))
    subject = f" {rubric.subject}" if rubric.subject else ""
    return [FLUENCY_PROMPT.format(text=summary),
            RECALL_PROMPT.format(keypoints=numbered(points), summary=summary, subject=subject,
                                 recall_rule=rubric.recall_rule),
            PRECISION_PROMPT.format(expert=expert, summary=summary, subject=subject,
                                    minor_details=rubric.minor_details,
                                    precision_extra=rubric.precision_extra)]


def _judge(settings: JudgeSettings, samples: Sequence[_Sample], desc: str) -> list[Verdict]:
    """Verdicts of samples that share one judge: key points first where they are missing,
    then every grading request of every sample in one concurrent batch."""
    verdicts: list[Verdict | None] = [None] * len(samples)
    points: dict[int, tuple[str, ...]] = {}
    extract = []
    for i, sample in enumerate(samples):
        if sample.kind == SUMM:
            if sample.spec.get("keypoints") is not None:
                points[i] = tuple(sample.spec["keypoints"])
            else:
                extract.append(i)
    if extract:
        prompts = [KEYPOINTS_PROMPT.format(summary=samples[i].doc["outputs"][0])
                   for i in extract]
        answers = ask(settings, prompts, [_budget(settings, SUMM)] * len(prompts),
                      desc=f"{desc} key points")
        for i, answer in zip(extract, answers):
            parsed = parse_key_points(answer.text or "")
            if answer.text is None or parsed is None:
                verdicts[i] = _failure(answer) or _malformed(answer)
            else:
                points[i] = parsed
    prompts, budgets, spans = [], [], []
    for i, sample in enumerate(samples):
        if verdicts[i] is not None:
            continue
        if sample.kind == LONGQA:
            asked = [longqa_prompt(str(sample.doc.get("question", "")), sample.doc["outputs"],
                                   sample.prediction)]
        else:
            asked = _summary_prompts(sample, points[i])
        spans.append((i, len(prompts), len(asked)))
        prompts.extend(asked)
        budgets.extend([_budget(settings, sample.kind)] * len(asked))
    answers = ask(settings, prompts, budgets, desc=desc)
    for i, start, count in spans:
        given = answers[start:start + count]
        verdicts[i] = _longqa_verdict(given) if samples[i].kind == LONGQA \
            else _summary_verdict(given, len(points[i]))
    return [verdict or Verdict(None, "failed", "not judged") for verdict in verdicts]


def _budget(settings: JudgeSettings, kind: str) -> int:
    return settings.max_tokens or HELMET_MAX_TOKENS[kind]


_VERDICTS: dict[str, Verdict] = {}
_VERDICTS_LOCK = threading.Lock()


def _memo_key(doc: Mapping[str, Any], prediction: str) -> str:
    material = [doc[DOC_FIELD], doc.get("question"), list(doc["outputs"]), prediction]
    return hashlib.sha256(json.dumps(material).encode("utf-8")).hexdigest()


def judge_samples(docs: Sequence[Mapping[str, Any]], predictions: Sequence[str], *,
                  summarize: bool = True) -> list[Verdict | None]:
    """Verdicts of ``docs`` and their generations (None for a document without a judge),
    remembered for this process so that each sample is judged once per run; with
    ``summarize``, one log line per task counts the samples left without judge metrics."""
    results: list[Verdict | None] = [None] * len(docs)
    todo: dict[str, list[tuple[int, _Sample, str]]] = {}
    for i, (doc, prediction) in enumerate(zip(docs, predictions, strict=True)):
        if not doc.get(DOC_FIELD):
            continue
        key = _memo_key(doc, prediction)
        with _VERDICTS_LOCK:
            results[i] = _VERDICTS.get(key)
        if results[i] is None:
            spec = json.loads(doc[DOC_FIELD])
            todo.setdefault(json.dumps(spec["settings"], sort_keys=True), []).append(
                (i, _Sample(spec, doc, prediction), key))
    for settings_json, entries in todo.items():
        settings = JudgeSettings(**json.loads(settings_json))
        tasks = sorted({sample.spec["task"] for _, sample, _ in entries})
        verdicts = _judge(settings, [sample for _, sample, _ in entries],
                          desc=f"judge {', '.join(tasks)}")
        with _VERDICTS_LOCK:
            for (i, _, key), verdict in zip(entries, verdicts, strict=True):
                _VERDICTS[key] = results[i] = verdict
        for task in tasks:
            mine = [v for (_, s, _), v in zip(entries, verdicts) if s.spec["task"] == task]
            if summarize:
                _log_counts(task, settings, mine)
            else:
                for verdict in mine:
                    if verdict.scores is None:
                        log.warning("%s: judge metrics not computed for a sample (left out of "
                                    "the judge means, not 0): %s.", task, _reason(verdict))
    return results


def _reason(verdict: Verdict) -> str:
    if verdict.problem == "failed":
        return f"the judge request failed ({verdict.detail})"
    return f"the judge answer does not parse ({verdict.detail})"


def _log_counts(task: str, settings: JudgeSettings, verdicts: Sequence[Verdict]) -> None:
    failed = [v for v in verdicts if v.problem == "failed"]
    malformed = [v for v in verdicts if v.problem == "malformed"]
    scored = len(verdicts) - len(failed) - len(malformed)
    if not failed and not malformed:
        log.info("%s: judge metrics for all %d samples (answers cached in %s).", task,
                 len(verdicts), settings.cache_dir)
        return
    parts = []
    if failed:
        parts.append(f"{len(failed)} with a failed judge request (last: {failed[-1].detail}); "
                     "failed requests are asked again by the next run")
    if malformed:
        parts.append(f"{len(malformed)} with a judge answer that does not parse (e.g. "
                     f"{malformed[0].detail})")
    log.warning("%s: judge metrics for %d of %d samples; not computed for %d (left out of the "
                "judge means, not 0): %s.", task, scored, len(verdicts), len(verdicts) - scored,
                "; ".join(parts))


def judge_scores(doc: Mapping[str, Any], prediction: str) -> dict[str, float]:
    """The judge metrics of one sample (empty when its task has no judge or the sample could
    not be judged): what lm-eval's scoring hooks add to the model-free metric."""
    if not doc.get(DOC_FIELD):
        return {}
    verdict = judge_samples([doc], [prediction], summarize=False)[0]
    if verdict is None or verdict.scores is None:
        return {}
    return dict(verdict.scores)


class JudgeMetricsFilter(Filter):
    """lm-eval filter that judges all of a task's generations at once (concurrently, with a
    progress bar and one count of failures in the log) and passes them on unchanged; place it
    after ``take_first``."""

    def apply(self, resps: Iterable[Any], docs: list[dict[str, Any]]) -> list[Any]:
        """The responses as they came, after judging those of judged documents."""
        resps = list(resps)
        judged = [i for i, doc in enumerate(docs) if doc.get(DOC_FIELD)]
        if judged:
            texts = [resps[i] if isinstance(resps[i], str) else resps[i][0] for i in judged]
            judge_samples([docs[i] for i in judged], texts)
        return resps


if FILTER_NAME not in filter_registry:
    register_filter(FILTER_NAME)(JudgeMetricsFilter)
