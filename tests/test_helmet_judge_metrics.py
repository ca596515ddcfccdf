"""HELMET's judge metrics for long-document QA and summarization (judge_metrics.py), against an
OpenAI-compatible judge served in-process with canned answers: parsing HELMET's answer formats
(malformed ones give "not computed"), the per-sample formulas and lm-eval's means against hand
computation, the disk cache, failed requests, and no judge -> no judge metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import OracleLM
from helmet_fixtures import (
    ReferenceLM,
    longqa_rows,
    summ_rows,
    write_jsonl,
    write_tokenizer_dir,
)
from judge_server import JudgeServer
from lm_eval import simple_evaluate

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import helmet, judge_metrics, task_manager
from acadlm_plugins.evaluation.judge_metrics import (
    JudgeCache,
    ask,
    judge_samples,
    judge_settings,
    judged_builder,
    last_json_object,
    longqa_answer_text,
    longqa_scores,
    parse_fluency,
    parse_key_points,
    parse_longqa_grades,
    parse_precision,
    parse_recall,
    summary_scores,
)

LENGTH = 2048
PLACES = ("harbour", "mill", "orchard", "library")  # the first four of the fixtures' rows

# ------------------------------------------------------------------------- the fake judge

Respond = Callable[[dict[str, Any]], tuple[int, Any]]


def reply(text: str) -> tuple[int, Any]:
    return 200, {"object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                          "content": text}}]}


def prompt_of(body: dict[str, Any]) -> str:
    return body["messages"][0]["content"]


def kind_of(prompt: str) -> str:
    """Which of our judge prompts this is, by the JSON form it asks for."""
    for marker, kind in (('"correctness"', "longqa"), ('"key_points"', "keypoints"),
                         ('"sentence_count"', "precision"), ('"recall"', "recall"),
                         ('"fluency"', "fluency")):
        if marker in prompt:
            return kind
    raise AssertionError(f"not one of our judge prompts: {prompt[:80]}")


def place_of(text: str) -> str:
    return next(place for place in PLACES if place in text)


# Canned answers in HELMET's formats, by task and by the place the sample is about; None: an
# answer without the JSON asked for. Long-document QA: reasoning then JSON, a fenced JSON, an
# earlier stray object, prose only.
LONGQA_ANSWERS = {
    "harbour": 'The answer names the keeper exactly. {"fluency": 1, "correctness": 3}',
    "mill": 'Repetitive.\n```json\n{"fluency": 0, "correctness": 2}\n```',
    "orchard": 'Compare {"draft": true} with the answers.\nOutput: {"fluency": 1, '
               '"correctness": 1}',
    "library": "I would give it full marks.",
}
LONGQA_EXPECTED = {  # (score, fluency, correctness) on 0-100
    "harbour": (100.0, 100.0, 100.0), "mill": (0.0, 0.0, 200 / 3), "orchard": (100 / 3, 100.0,
                                                                              100 / 3)}
# Summaries: four key points each; per place the fluency, recall and precision answers.
SUMM_ANSWERS = {
    "harbour": ('{"fluency": 1}', 'Points 1 and 3. {"recall": 2}',
                '{"precision": 1, "sentence_count": 1}'),
    "mill": ('{"fluency": 0}', '{"supported_key_points": [1, 2, 3, 4], "recall": 4}',
             '{"precision": 1, "sentence_count": 1}'),
    "orchard": ('{"fluency": 1}', '{"recall": 3}', '{"precision": 0, "sentence_count": 1}'),
    "library": ('{"fluency": 1}', '{"recall": 2}', "precision: 1 of 1"),
}
SUMM_EXPECTED = {  # (f1, recall, precision, fluency) on 0-100
    "harbour": (200 / 3, 50.0, 100.0, 100.0), "mill": (0.0, 100.0, 100.0, 0.0),
    "orchard": (0.0, 75.0, 0.0, 100.0)}
KEY_POINTS = '{"key_points": ["a day of notes", "weather", "sport", "cooking"]}'


def canned(body: dict[str, Any]) -> tuple[int, Any]:
    prompt = prompt_of(body)
    kind = kind_of(prompt)
    if kind == "longqa":
        question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
        return reply(LONGQA_ANSWERS[place_of(question)])
    if kind == "keypoints":
        return reply(KEY_POINTS)
    summary = prompt.rsplit("Summary to grade: ", 1)[-1] if kind != "fluency" else prompt
    fluency, recall, precision = SUMM_ANSWERS[place_of(summary)]
    return reply({"fluency": fluency, "recall": recall, "precision": precision}[kind])


def echo(body: dict[str, Any]) -> tuple[int, Any]:
    return reply(f"seen: {prompt_of(body)}")


@pytest.fixture
def serve():
    servers: list[JudgeServer] = []

    def start(respond: Respond = canned, delay: float = 0.0) -> JudgeServer:
        servers.append(JudgeServer(lambda request, _: (*respond(request["body"]), {}, delay)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def fresh_memory():
    """Each test starts with no verdicts remembered in the process (the disk cache is per
    test, in tmp_path)."""
    judge_metrics._VERDICTS.clear()
    yield
    judge_metrics._VERDICTS.clear()


def judge_block(server: JudgeServer, cache: Path, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, "model": "judge-model", "cache_dir": str(cache),
            "backoff_s": 0.0, "max_retries": 1, **extra}


# ------------------------------------------------------------------------ parsing, formulas


@pytest.mark.parametrize("text, expected", [
    ('Reasoning... {"fluency": 1, "correctness": 3}', (1, 3)),
    ('```json\n{"fluency": 0, "correctness": 2}\n```', (0, 2)),
    ('{"fluency": 1, "correctness": 0} then I revise: {"fluency": 1, "correctness": 1}', (1, 1)),
    ('{"fluency": "1", "correctness": 2.0}', (1, 2)),
    ("no JSON here", None),
    ('{"fluency": 1}', None),                              # a grade missing
    ('{"fluency": 1, "correctness": 4}', None),            # out of range
    ('{"fluency": 2, "correctness": 3}', None),
    ('{"fluency": 1, "correctness": 1.5}', None),          # not a whole number
    ('{"fluency": true, "correctness": 3}', None),
    ('{"fluency": 1, "correctness": "three"}', None),
    ('{"fluency": 1, "correctness": 3', None),             # cut off
])
def test_longqa_answers_parse_as_helmet_writes_them(text: str, expected: Any) -> None:
    assert parse_longqa_grades(text) == expected


def test_summary_answers_parse_as_helmet_writes_them() -> None:
    assert parse_fluency('Coherent. {"fluency": 1}') == 1
    assert parse_fluency('{"fluency": 0.5}') is None
    assert parse_recall('{"supported_key_points": [3, 5], "recall": 2}') == 2
    assert parse_recall('{"recall": -1}') is None
    assert parse_recall('{"supported_key_points": [3, 5]}') is None
    assert parse_precision('Output: {"precision": 10, "sentence_count":  22}') == (10, 22)
    assert parse_precision('{"precision": 10}') is None
    assert parse_key_points('{"key_points": ["a", " b  c "]}') == ("a", "b c")
    assert parse_key_points('{"key_points": []}') is None
    assert parse_key_points('{"key_points": "a; b"}') is None
    assert last_json_object('{"a": {"b": 1}} and {"c": [1, {"d": 2}]}') == {"c": [1, {"d": 2}]}
    assert last_json_object("{not json} {also: not}") is None


def test_the_answer_graded_is_read_as_helmet_reads_it() -> None:
    assert longqa_answer_text(" Answer: Ada\nQuill ") == "Ada Quill"
    assert longqa_answer_text("It was Ada. answer: ADA") == "ADA"
    assert longqa_answer_text("  Ada  Quill ") == "Ada Quill"


def test_per_sample_metrics_equal_hand_computed_values() -> None:
    # HELMET: score = fluency x correctness (0-3), reported x 100/3.
    assert longqa_scores(1, 3) == {"judge_score": 100.0, "judge_fluency": 100.0,
                                   "judge_correctness": 100.0}
    assert longqa_scores(1, 2)["judge_score"] == pytest.approx(200 / 3)
    assert longqa_scores(0, 3)["judge_score"] == 0.0
    # R = 2/4, P = 3/4: F1 = 2 x 0.375 / 1.25 = 0.6.
    assert summary_scores(1, 2, 4, 3, 4) == pytest.approx(
        {"judge_f1": 60.0, "judge_recall": 50.0, "judge_precision": 75.0, "judge_fluency": 100.0})
    assert summary_scores(0, 2, 4, 3, 4)["judge_f1"] == 0.0           # not fluent
    assert summary_scores(1, 0, 4, 0, 4)["judge_f1"] == 0.0           # P + R = 0
    assert summary_scores(1, 3, 0, 1, 0)["judge_f1"] == 0.0           # zero denominators
    assert summary_scores(1, 9, 4, 5, 4)["judge_recall"] == 100.0     # counts capped


# --------------------------------------------------------------------------- configuration


def test_judge_settings_follow_the_qurating_key_names(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = judge_settings({"judge": {"url": "http://h:8000/v1", "model": "m",
                                         "concurrency": 8, "cache_dir": "/tmp/c"}}, task="t")
    assert settings is not None
    assert (settings.url, settings.model, settings.concurrency) == ("http://h:8000/v1", "m", 8)
    assert (settings.temperature, settings.top_p, settings.seed) == (0.1, 0.9, 42)  # HELMET's
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    for block, key in (({"url": "http://h/v1"}, "judge.model"),
                       ({"base_url": "http://h/v1", "model": "m"}, "judge.base_url"),
                       ({"url": "h:8000", "model": "m"}, "judge.url"),
                       ({"url": "http://h/v1", "model": "m", "endpoint": "x"}, "judge.endpoint"),
                       ({"url": "http://h/v1", "model": "m", "concurrency": 0},
                        "judge.concurrency"),
                       ({"url": "http://h/v1", "model": "m", "api_key_env": "NO_SUCH_KEY_VAR"},
                        "judge.api_key_env")):
        with pytest.raises(ConfigError) as caught:
            judge_settings({"judge": block}, task="acadlm_summ")
        assert caught.value.key == f"acadlm_summ: {key}"


def test_no_judge_means_no_judge_field_and_a_logged_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    def builder(rng: Any, length: int, index: int, tokenizer: Any) -> dict[str, Any]:
        return {"input": "x", "outputs": ["y"]}

    with caplog.at_level(logging.WARNING):
        same = judged_builder("acadlm_longqa", "longqa", {}, builder)
    assert same is builder
    assert "acadlm_longqa: the judge metrics are not computed" in caplog.text
    assert "no `judge` in the task metadata" in caplog.text


# ---------------------------------------------------------- requests, cache, failures, batch


def summ_doc(builder_meta: dict[str, Any], document_id: str, reference: str,
             task: str = "acadlm_summ") -> dict[str, Any]:
    def builder(rng: Any, length: int, index: int, tokenizer: Any) -> dict[str, Any]:
        return {"input": "...", "outputs": [reference], "document_id": document_id}

    row = judged_builder(task, "summ", builder_meta, builder)(None, LENGTH, 0, None)
    return {**row, "max_length": LENGTH}


def test_the_cache_answers_a_second_time_without_a_request(serve, tmp_path: Path) -> None:
    server = serve(echo)
    settings = judge_settings({"judge": judge_block(server, tmp_path / "cache")}, task="t")
    assert settings is not None
    prompts = [f"Grade answer {i}." for i in range(3)]
    first = ask(settings, prompts + prompts[:1], [16] * 4)
    assert len(server.requests) == 3                       # each distinct prompt once
    assert [a.cached for a in first] == [False] * 4
    again = ask(settings, prompts, [16] * 3)
    assert len(server.requests) == 3
    assert [a.text for a in again] == [a.text for a in first[:3]] and all(a.cached for a in again)
    # Keyed by (prompt, model): another model asks again.
    other = judge_settings({"judge": judge_block(server, tmp_path / "cache", model="other")},
                           task="t")
    assert other is not None
    ask(other, prompts[:1], [16])
    assert len(server.requests) == 4
    assert JudgeCache(tmp_path / "cache").get("judge-model", prompts[0]) == first[0].text


def test_requests_carry_helmets_sampling_and_the_key_header_only(
        serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve()
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    meta = {"judge": judge_block(server, tmp_path / "cache", api_key_env="JUDGE_TEST_KEY")}
    doc = summ_doc(meta, "report0", "Notes around the harbour.")
    assert "sk-secret-123" not in json.dumps(doc)
    verdict = judge_samples([doc], ["Notes around the harbour."])[0]
    assert verdict is not None and verdict.scores is not None
    bodies = [request["body"] for request in server.requests]
    assert {(b["model"], b["temperature"], b["top_p"], b["seed"], b["max_tokens"])
            for b in bodies} == {("judge-model", 0.1, 0.9, 42, 4096)}
    assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-secret-123"}
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "sk-secret" not in cached


def test_requests_run_concurrently(serve, tmp_path: Path) -> None:
    server = serve(echo, delay=0.2)
    settings = judge_settings({"judge": judge_block(server, tmp_path / "c", concurrency=4)},
                              task="t")
    assert settings is not None
    ask(settings, [f"Grade answer {i}." for i in range(8)], [16] * 8)
    assert server.most_in_flight > 1


def test_a_failed_request_leaves_that_sample_not_computed_and_counted(
        serve, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def flaky(body: dict[str, Any]) -> tuple[int, Any]:
        prompt = prompt_of(body)
        if "mill" in prompt:
            return 503, {"error": "overloaded"}                  # retried, then given up
        if "orchard" in prompt:
            return 400, {"error": "bad request"}                 # not retried
        return canned(body)

    server = serve(flaky)
    meta = {"judge": judge_block(server, tmp_path / "cache")}
    docs = [summ_doc(meta, f"r{i}", f"Notes around the {place}.") for i, place in
            enumerate(("harbour", "mill", "orchard"))]
    with caplog.at_level(logging.WARNING):
        verdicts = judge_samples(docs, [doc["outputs"][0] for doc in docs])
    assert verdicts[0] is not None and verdicts[0].scores == pytest.approx(
        dict(zip(("judge_f1", "judge_recall", "judge_precision", "judge_fluency"),
                 SUMM_EXPECTED["harbour"])))
    assert [v.problem for v in verdicts[1:] if v is not None] == ["failed", "failed"]
    assert "acadlm_summ: judge metrics for 1 of 3 samples; not computed for 2" in caplog.text
    assert "2 with a failed judge request" in caplog.text
    # 1 + 2 attempts for the mill's extraction (max_retries 1), 1 for the orchard's, then the
    # harbour's three grading requests.
    assert len(server.requests) == 1 + 2 + 1 + 3
    # Within the run a failed sample is not asked again; the next run asks again.
    judge_samples(docs[1:], [doc["outputs"][0] for doc in docs[1:]])
    assert len(server.requests) == 7
    judge_metrics._VERDICTS.clear()
    judge_samples(docs[1:], [doc["outputs"][0] for doc in docs[1:]])
    assert len(server.requests) == 7 + 3


def test_scoring_hooks_add_judge_metrics_per_length_only_to_judged_docs(
        serve, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = serve()
    doc = summ_doc({"judge": judge_block(server, tmp_path / "cache")}, "r0",
                   "Notes around the harbour.")
    scores = helmet.process_results_document_summary(doc, ["Notes around the harbour."])
    judged = dict(zip(("judge_f1", "judge_recall", "judge_precision", "judge_fluency"),
                      SUMM_EXPECTED["harbour"]))
    # The length's own metric is what HELMET's category counts: the judge F1, not ROUGE-L.
    assert scores == pytest.approx({
        str(LENGTH): judged["judge_f1"], f"{LENGTH}_rougeL_f1": 100.0,
        **{f"{LENGTH}_{name}": value for name, value in judged.items()}})
    plain = {"outputs": ["Ada"], "max_length": LENGTH}      # a RAG document: no judge
    assert helmet.process_results_substring_em(plain, ["It was Ada."]) == {str(LENGTH): 100.0}
    # Without a judge the stand-in's category score is its model-free metric.
    assert helmet.process_results_document_qa(plain, ["It was Ada."]) == {
        str(LENGTH): 100.0, f"{LENGTH}_substring_exact_match": 100.0}
    # Scored one by one (no filter before): a sample the judge cannot score is logged, and
    # has no category score (left out of the mean, never 0).
    library = summ_doc({"judge": judge_block(server, tmp_path / "cache")}, "r3",
                       "Notes around the library.")
    with caplog.at_level(logging.WARNING):
        assert list(helmet.process_results_document_summary(
            library, ["Notes around the library."])) == [f"{LENGTH}_rougeL_f1"]
    assert "acadlm_summ: judge metrics not computed for a sample" in caplog.text
    assert "does not parse ('precision: 1 of 1')" in caplog.text


def test_helmet_key_points_file_replaces_extraction(serve, tmp_path: Path) -> None:
    server = serve()
    points = write_jsonl(tmp_path / "multi_lexsum_val.jsonl", [
        {"id": "case1", "summary/short_keypoints": ["The harbour closed.", "It reopened."],
         "summary/long": "The long expert account of the harbour."},
        {"id": 7, "keypoints": ["Weather at the harbour."]}])
    meta = {"judge": judge_block(server, tmp_path / "cache"), "summ_keypoints_path": str(points)}
    docs = [summ_doc(meta, "case1", "Short harbour summary."),
            summ_doc(meta, "7", "Notes around the harbour.")]
    verdicts = judge_samples(docs, ["The harbour closed and reopened."] * 2)
    prompts = [prompt_of(request["body"]) for request in server.requests]
    assert not any(kind_of(p) == "keypoints" for p in prompts)
    recall = [p for p in prompts if kind_of(p) == "recall"]
    assert any("1. The harbour closed.\n2. It reopened." in p for p in recall)
    precision = [p for p in prompts if kind_of(p) == "precision"]
    assert any("The long expert account of the harbour." in p for p in precision)
    assert any("Expert summary: <summary>Notes around the harbour.</summary>" in p
               for p in precision)
    # Recall 2 of 2 key points for the first, capped to 1 of 1 for the second.
    assert [v.scores["judge_recall"] for v in verdicts if v and v.scores] == [100.0, 100.0]


def test_each_summarization_task_is_graded_by_helmets_rubric_for_its_documents(
        serve, tmp_path: Path) -> None:
    """HELMET grades novels (En.Sum) more leniently on recall (most facts of a key point) and
    more strictly on precision (commentary is unsupported) than legal cases (Multi-LexSum),
    whose rules also serve any other summary, without the lawsuit."""
    server = serve()
    tasks = ("acadlm_infbench_sum", "acadlm_multi_lexsum", "acadlm_summ")
    points = write_jsonl(tmp_path / "points.jsonl",
                         [{"id": task, "keypoints": [f"Point {task}."]} for task in tasks])
    meta = {"judge": judge_block(server, tmp_path / "cache"), "summ_keypoints_path": str(points)}
    docs = [summ_doc(meta, task, f"Reference {task}.", task=task) for task in tasks]
    judge_samples(docs, ["The harbour closed."] * 3)
    asked: dict[tuple[str, str], str] = {}
    for request in server.requests:
        prompt = prompt_of(request["body"])
        if kind_of(prompt) in ("recall", "precision"):
            task = next(t for t in tasks if f"Point {t}." in prompt or f"Reference {t}." in prompt)
            asked[task, kind_of(prompt)] = prompt
    novel, legal, other = (asked[task, "precision"] for task in tasks)
    assert "of a novel" in novel and "commentary" in novel and "places" in novel
    assert "civil lawsuit" in legal and "commentary" not in legal and "laws" in legal
    assert "civil lawsuit" not in other and "novel" not in other and "commentary" not in other
    assert "most of them" in asked[tasks[0], "recall"]
    assert all("only when the summary clearly states its facts" in asked[task, "recall"]
               for task in tasks[1:])


def test_key_points_file_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "kp.jsonl", [{"id": "a", "keypoints": ["x"]},
                                              {"id": "b", "keypoints": "x"}])
    with pytest.raises(ConfigError, match=r"kp\.jsonl:2 needs `id`"):
        judge_metrics.load_keypoints({"summ_keypoints_path": str(bad)}, task="acadlm_summ")


# ---------------------------------------------------------------------- end to end in lm-eval


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("judged")
    return {"pretrained": str(write_tokenizer_dir(root / "model")), "max_seq_lengths": [LENGTH],
            "num_samples": 4, "longqa_path": str(write_jsonl(root / "longqa.jsonl",
                                                             longqa_rows(words=5000))),
            "summ_path": str(write_jsonl(root / "summ.jsonl", summ_rows(words=5000)))}


class AnswerLM(OracleLM):
    """The right answer for QA (from the prompt), the reference for a summary."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        summaries = ReferenceLM().generate_until(requests)
        answers = OracleLM().generate_until(requests)
        return [a if "question" in r.doc else s
                for r, s, a in zip(requests, summaries, answers)]


def evaluate(metadata: dict[str, Any], home: Path) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACADLM_HOME", str(home))
        return simple_evaluate(model=AnswerLM(), tasks=["acadlm_longqa", "acadlm_summ"],
                               log_samples=True, verbosity="ERROR",
                               task_manager=task_manager(metadata, include_defaults=False))


def expected_means(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """The judge means lm-eval should report, from the canned answers of the samples it ran."""
    metrics = {"acadlm_longqa": ("judge_score", "judge_fluency", "judge_correctness"),
               "acadlm_summ": ("judge_f1", "judge_recall", "judge_precision", "judge_fluency")}
    means = {}
    for task, names in metrics.items():
        rows = []
        for sample in results["samples"][task]:
            doc = sample["doc"]
            place = place_of(doc["question"] if task == "acadlm_longqa" else doc["outputs"][0])
            table = LONGQA_EXPECTED if task == "acadlm_longqa" else SUMM_EXPECTED
            if place in table:
                rows.append(table[place])
        for k, name in enumerate(names):
            means[task, name] = sum(row[k] for row in rows) / len(rows)
    return means


def test_lm_eval_reports_judge_means_next_to_the_model_free_metric(
        serve, data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = serve()
    meta = {**data, "judge": judge_block(server, tmp_path / "cache")}
    with caplog.at_level(logging.INFO, logger="acadlm_plugins.evaluation.judge_metrics"):
        results = evaluate(meta, tmp_path / "home")
    for task in ("acadlm_longqa", "acadlm_summ"):
        places = sorted(place_of(s["doc"].get("question") or s["doc"]["outputs"][0])
                        for s in results["samples"][task])
        assert places == sorted(PLACES)                     # each canned case ran once
    # The model-free metrics stay; the length's own metric is the judge's, as HELMET's
    # category uses the model-based score when there is one.
    metrics = {task: results["results"][task] for task in ("acadlm_longqa", "acadlm_summ")}
    assert metrics["acadlm_longqa"][f"{LENGTH}_substring_exact_match,none"] == 100.0
    assert metrics["acadlm_summ"][f"{LENGTH}_rougeL_f1,none"] == 100.0
    means = expected_means(results)
    for (task, name), mean in means.items():
        assert metrics[task][f"{LENGTH}_{name},none"] == pytest.approx(mean), name
    assert metrics["acadlm_longqa"][f"{LENGTH},none"] == pytest.approx(
        means["acadlm_longqa", "judge_score"])
    assert metrics["acadlm_summ"][f"{LENGTH},none"] == pytest.approx(
        means["acadlm_summ", "judge_f1"])
    # The library samples did not parse: left out of the means, counted in the log.
    for task in ("acadlm_longqa", "acadlm_summ"):
        assert f"{task}: judge metrics for 3 of 4 samples; not computed for 1" in caplog.text
        library = [s for s in results["samples"][task]
                   if "library" in (s["doc"].get("question") or s["doc"]["outputs"][0])]
        assert not any(key.startswith(f"{LENGTH}_judge") for key in library[0]["metrics"])
    # One request per QA sample; per summary one key-point extraction and three gradings.
    assert len(server.requests) == 4 + 4 * (1 + 3)

    # A rerun (a new process: nothing remembered) costs no request and gives the same means.
    judge_metrics._VERDICTS.clear()
    again = evaluate(meta, tmp_path / "home")
    assert len(server.requests) == 20
    for task in ("acadlm_longqa", "acadlm_summ"):
        assert again["results"][task] == results["results"][task]


def test_without_a_judge_the_judge_metrics_are_absent(
        data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        results = evaluate(dict(data), tmp_path / "home")
    for task in ("acadlm_longqa", "acadlm_summ"):
        metrics = results["results"][task]
        assert f"{LENGTH},none" in metrics
        assert not [key for key in metrics if "judge" in key]
        assert f"{task}: the judge metrics are not computed" in caplog.text
        assert "judge" not in results["samples"][task][0]["doc"]
    assert results["results"]["acadlm_longqa"][f"{LENGTH},none"] == 100.0   # substring EM
    assert results["results"]["acadlm_summ"][f"{LENGTH},none"] == 100.0     # ROUGE-L


# ------------------------------------------------- HELMET's own datasets and their categories


def test_helmet_datasets_count_the_judge_in_their_category_without_unknown_metrics(
        serve, data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NarrativeQA, En.Sum and Multi-LexSum with a judge: every ``<length>_judge_*`` metric is
    declared to lm-eval (no "No aggregation function" warning), the metric named by the length
    is the judge's mean, and the summ group averages those, as HELMET's categories do."""
    server = serve()
    meta = {**data, "judge": judge_block(server, tmp_path / "cache"),
            "narrativeqa_path": data["longqa_path"], "infbench_sum_path": data["summ_path"],
            "multi_lexsum_path": data["summ_path"]}
    with caplog.at_level(logging.WARNING, logger="lm_eval"), pytest.MonkeyPatch.context() as p:
        p.setenv("ACADLM_HOME", str(tmp_path / "home"))
        results = simple_evaluate(
            model=AnswerLM(), tasks=["acadlm_narrativeqa", "acadlm_helmet_summ"],
            log_samples=True, task_manager=task_manager(meta, include_defaults=False))
    assert "No aggregation function defined" not in caplog.text
    scores = {task: results["results"][task] for task in
              ("acadlm_narrativeqa", "acadlm_infbench_sum", "acadlm_multi_lexsum")}
    judged = [LONGQA_EXPECTED[place_of(s["doc"]["question"])][0]
              for s in results["samples"]["acadlm_narrativeqa"]
              if place_of(s["doc"]["question"]) in LONGQA_EXPECTED]
    assert scores["acadlm_narrativeqa"][f"{LENGTH},none"] == pytest.approx(
        sum(judged) / len(judged))
    assert scores["acadlm_narrativeqa"][f"{LENGTH}_judge_score,none"] == pytest.approx(
        sum(judged) / len(judged))
    for task in ("acadlm_infbench_sum", "acadlm_multi_lexsum"):
        f1 = [SUMM_EXPECTED[place_of(s["doc"]["outputs"][0])][0]
              for s in results["samples"][task]
              if place_of(s["doc"]["outputs"][0]) in SUMM_EXPECTED]
        assert scores[task][f"{LENGTH},none"] == pytest.approx(sum(f1) / len(f1)), task
        assert f"{LENGTH}_rougeLsum_f1,none" in scores[task]
    assert results["results"]["acadlm_helmet_summ"][f"{LENGTH},none"] == pytest.approx(
        (scores["acadlm_infbench_sum"][f"{LENGTH},none"]
         + scores["acadlm_multi_lexsum"][f"{LENGTH},none"]) / 2)


def test_summary_precision_count_is_capped_like_recall():
    """The judge's supported-sentence count above the sentence count is capped (docstring:
    "counts capped at it"), so precision never exceeds 100."""
    from acadlm_plugins.evaluation.judge_metrics import summary_scores

    scores = summary_scores(1, 2, 4, 6, 4)
    assert scores["judge_precision"] == 100.0
    assert scores["judge_f1"] == pytest.approx(100 * 2 * 1.0 * 0.5 / 1.5)
