"""QuRating stage 1 (judgments): criteria prompts, pair sampling, the local and the remote judge
(a loopback HTTP server stands in for an OpenAI-compatible endpoint), order averaging,
retries, rejected answers, resuming after a kill, and the `tune run` recipe."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from judge_server import JudgeServer, Reply
from omegaconf import OmegaConf
from tiny_setup import REPO_ROOT, run_tune_subprocess, write_tiny_corpus, write_tiny_model_dir

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.judge_recipe import check_config, run_judging
from acadlm_plugins.qurating import CRITERIA
from acadlm_plugins.qurating.criteria import load_criteria, load_criterion
from acadlm_plugins.qurating.judges import (
    JudgeRequestError,
    LocalJudge,
    OpenAIJudge,
    RateLimiter,
)
from acadlm_plugins.qurating.judging import (
    EXCERPT_RULE,
    OutputFiles,
    format_summary,
    judge_pairs,
    order_averaged,
    read_jsonl_resumable,
)
from acadlm_plugins.qurating.pairs import (
    Document,
    Excerpt,
    Pair,
    excerpt_of,
    read_documents,
    read_pairs_file,
    sample_pairs,
)

TEST_PROMPT = "Which text is better?\nText A: {text_a}\nText B: {text_b}\nAnswer with A or B."
SECRET = "sk-test-5d1e0c7b9a2f4e8d"
ROW_KEYS = {"pair_id", "text_a", "text_b", "source_a", "source_b", "domain_a", "domain_b",
            "doc_id_a", "doc_id_b", "judgments", "p_b_by_order"}


# ---------------------------------------------------------------------- loopback judge server


@pytest.fixture
def serve():
    servers: list[JudgeServer] = []

    def start(respond: Callable[[dict[str, Any], int], Reply]) -> JudgeServer:
        servers.append(JudgeServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def chat_reply(probs: dict[str, float], answer: str | None = None) -> dict[str, Any]:
    """A /v1/chat/completions response whose first token has these top probabilities."""
    top = [{"token": token, "logprob": math.log(p)}
           for token, p in sorted(probs.items(), key=lambda item: -item[1])]
    first = top[0]
    return {"object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "length",
        "message": {"role": "assistant", "content": answer or first["token"]},
        "logprobs": {"content": [{**first, "top_logprobs": top}]}}]}


def shown_texts(request: dict[str, Any]) -> tuple[str, str]:
    """The texts shown as A and B in a request built from TEST_PROMPT."""
    prompt = request["body"]["messages"][0]["content"]
    shown_a = prompt.split("Text A: ", 1)[1].split("\nText B: ", 1)[0]
    shown_b = prompt.split("\nText B: ", 1)[1].split("\nAnswer with A or B.", 1)[0]
    return shown_a, shown_b


def quality_judge(bias: float = 0.0) -> Callable[[dict[str, Any], int], Reply]:
    """Prefers the shown text containing GOOD (logit +-2), plus a logit ``bias`` towards B."""
    def respond(request: dict[str, Any], number: int) -> Reply:
        shown_a, shown_b = shown_texts(request)
        logit = 2.0 * (("GOOD" in shown_b) - ("GOOD" in shown_a)) + bias
        p_b = 1.0 / (1.0 + math.exp(-logit))
        return 200, chat_reply({"A": 0.9 * (1 - p_b), "B": 0.9 * p_b, "The": 0.1}), {}, 0.0
    return respond


def make_pairs(texts: list[tuple[str, str]]) -> list[Pair]:
    pairs = []
    for index, (text_a, text_b) in enumerate(texts):
        a = Excerpt(f"doc{index}a", text_a, "prose", "test", 0, len(text_a))
        b = Excerpt(f"doc{index}b", text_b, "prose", "test", 0, len(text_b))
        pairs.append(Pair(f"pair{index:02d}", a, b))
    return pairs


@pytest.fixture
def test_criterion(tmp_path) -> list:
    path = tmp_path / "prompts" / "overall.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(TEST_PROMPT)
    return load_criteria([str(path)])


def http_judge(server: JudgeServer, **options: Any) -> OpenAIJudge:
    settings = {"timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, "concurrency": 1}
    settings.update(options)
    return OpenAIJudge(server.url, "test-judge", **settings)


SIX_PAIRS = [("GOOD one", "plain one"), ("plain two", "GOOD two"), ("plain three", "other"),
             ("GOOD four", "GOOD four b"), ("five", "GOOD five {braces} }{"), ("GOOD six", "six")]


# ---------------------------------------------------------------------- criteria


def test_builtin_criteria_load_and_render_texts_with_braces() -> None:
    criteria = load_criteria(None)
    assert [c.name for c in criteria] == list(CRITERIA)
    prompt = criteria[0].render("def f(x): return {x: 1}", "second {text_b} text")
    assert "Text A:\ndef f(x): return {x: 1}" in prompt
    assert "Text B:\nsecond {text_b} text" in prompt
    assert prompt.rstrip().endswith("A or B.")


@pytest.mark.parametrize(("template", "expected"), [
    ("Text A: {text_a}\nAnswer A or B.", "{text_b} appears 0 times"),
    ("{text_a} {text_b} {text_c}", "unknown placeholder(s) {text_c}"),
    ("{text_a} {text_b} {text_a}", "{text_a} appears 2 times"),
    ("{text_a} {text_b} {", "cannot be read"),
    ("{text_a!r} {text_b}", "format spec or conversion"),
])
def test_bad_prompt_templates_are_refused_with_the_fix(tmp_path, template, expected) -> None:
    path = tmp_path / "clarity.txt"
    path.write_text(template)
    with pytest.raises(ConfigError) as err:
        load_criterion(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "Fix:" in str(err.value)


def test_criterion_names_are_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="did you mean `writing_style`"):
        load_criterion("writing_styel")
    bad_name = tmp_path / "My Criterion.txt"
    bad_name.write_text(TEST_PROMPT)
    with pytest.raises(ConfigError, match="not a lower-case identifier"):
        load_criterion(str(bad_name))
    with pytest.raises(ConfigError, match="does not exist"):
        load_criterion(str(tmp_path / "absent.txt"))
    twin = tmp_path / "writing_style.txt"
    twin.write_text(TEST_PROMPT)
    with pytest.raises(ConfigError, match="two criteria are named 'writing_style'"):
        load_criteria(["writing_style", str(twin)])


# ---------------------------------------------------------------------- pairs


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer

    return AcadTokenizer(tiny_model_dir)


def test_pair_sampling_is_reproducible_and_extends(tiny_corpus, tiny_tokenizer) -> None:
    documents = read_documents(tiny_corpus)
    assert {d.domain for d in documents} == {"prose", "numbers", "code"}
    first = sample_pairs(documents, tiny_tokenizer, num_pairs=10, max_tokens=12, min_tokens=4,
                         seed=3)
    again = sample_pairs(read_documents(tiny_corpus), tiny_tokenizer, num_pairs=10,
                         max_tokens=12, min_tokens=4, seed=3)
    longer = sample_pairs(documents, tiny_tokenizer, num_pairs=15, max_tokens=12, min_tokens=4,
                          seed=3)
    other = sample_pairs(documents, tiny_tokenizer, num_pairs=10, max_tokens=12, min_tokens=4,
                         seed=4)
    assert first == again and longer[:10] == first
    assert [p.pair_id for p in other] != [p.pair_id for p in first]
    assert len({p.pair_id for p in longer}) == 15
    texts = {d.doc_id: d.text for d in documents}
    for pair in longer:
        assert len(pair.pair_id) == 16 and pair.a.doc_id != pair.b.doc_id
        for excerpt in (pair.a, pair.b):
            assert texts[excerpt.doc_id][excerpt.start:excerpt.end] == excerpt.text
            assert len(tiny_tokenizer.encode(excerpt.text, add_special_tokens=False)) <= 12 + 1
    same = sample_pairs(documents, tiny_tokenizer, num_pairs=8, max_tokens=12, min_tokens=4,
                        seed=3, same_domain=True)
    assert all(p.a.domain == p.b.domain for p in same)
    shorter = sample_pairs(documents, tiny_tokenizer, num_pairs=10, max_tokens=8, min_tokens=4,
                           seed=3)
    assert {p.pair_id for p in shorter}.isdisjoint({p.pair_id for p in first})


def test_corpus_rows_without_text_are_errors_with_file_and_line(tmp_path, tiny_tokenizer) -> None:
    corpus = tmp_path / "docs.jsonl"
    rows = [{"text": "one two three", "id": "a"}, {"id": "b", "body": "misplaced"}]
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=rf"{corpus}:2: the row has no 'text' field"):
        read_documents(corpus)
    corpus.write_text(json.dumps({"text": "x"}) + "\n\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(DataError, match=rf"{corpus}:3: the row's 'text' is null"):
        read_documents(corpus)
    corpus.write_text(json.dumps({"text": "x", "id": 7}) + "\n" + json.dumps(
        {"text": "y", "id": 7}) + "\n")
    with pytest.raises(DataError, match=r"id '7' was already used at .*docs.jsonl:1"):
        read_documents(corpus)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["fine text", None]}), table)
    with pytest.raises(DataError, match=rf"{table}:2: the row's 'text' is null"):
        read_documents(table)
    pq.write_table(pa.table({"text": ["alpha beta gamma delta " * 3, "one two three four " * 3]}),
                   table)
    documents = read_documents(table)
    assert [d.doc_id for d in documents] == ["docs.parquet:1", "docs.parquet:2"]
    with pytest.raises(DataError, match="only 1 distinct pairs could be drawn of the 5"):
        # Excerpts longer than both documents: the two whole texts make the only pair.
        sample_pairs(documents, tiny_tokenizer, num_pairs=5, max_tokens=64,
                     min_excerpt_tokens=64, min_tokens=2)


def test_pairs_file_referencing_a_missing_text_is_an_error(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"text_a": "x", "text_b": "y", "pair_id": "p1"}) + "\n"
                    + json.dumps({"text_a": "x", "source_b": "lost.txt"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: the pair references no text B"):
        read_pairs_file(path)
    path.write_text(json.dumps({"text_a": "x", "text_b": "y", "pair_id": "p1"}) + "\n"
                    + json.dumps({"text_a": "u", "text_b": "v"}) + "\n")
    pairs = read_pairs_file(path)
    assert pairs[0].pair_id == "p1" and len(pairs[1].pair_id) == 16
    assert pairs[1].row_fields()["text_b"] == "v"


# ---------------------------------------------------------------------- remote judge


def test_logprobs_of_chat_and_completions_responses_are_parsed(serve) -> None:
    probs = {"A": 0.3, " A": 0.1, "B": 0.45, "The": 0.15}
    chat = serve(lambda request, n: (200, chat_reply(probs), {}, 0.0))
    judgment = http_judge(chat).judge(["Text A: x\nText B: y"])[0]
    assert judgment.p_b == pytest.approx(0.45 / 0.85) and judgment.answer_mass == pytest.approx(0.85)
    body = chat.requests[0]["body"]
    assert chat.requests[0]["path"] == "/v1/chat/completions"
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1
    assert body["temperature"] == 0.0 and body["model"] == "test-judge"

    def completion(request: dict[str, Any], number: int) -> Reply:
        top = {"ĠB": math.log(0.6), " A": math.log(0.2), " The": math.log(0.1)}
        return 200, {"choices": [{"text": " B", "logprobs": {
            "tokens": ["ĠB"], "token_logprobs": [top["ĠB"]], "top_logprobs": [top]}}]}, {}, 0.0

    completions = serve(completion)
    judge = http_judge(completions, endpoint="completions")
    judgment = judge.judge(["Which?"])[0]
    assert judgment.p_b == pytest.approx(0.75) and judgment.answer_mass == pytest.approx(0.8)
    request = completions.requests[0]
    assert request["path"] == "/v1/completions"
    assert request["body"]["prompt"].endswith("Which?\n\nAnswer:")
    assert request["body"]["logprobs"] == 5


def test_order_averaging_cancels_a_position_biased_judge(serve, tmp_path,
                                                         test_criterion) -> None:
    always_a = serve(lambda request, n: (200, chat_reply({"A": 0.8, "B": 0.2}), {}, 0.0))
    pairs = make_pairs(SIX_PAIRS)
    summary = judge_pairs(pairs, test_criterion, http_judge(always_a, concurrency=3),
                          tmp_path / "biased" / "judgments.jsonl", batch_pairs=4)
    rows = read_jsonl_resumable(tmp_path / "biased" / "judgments.jsonl")
    assert [row["judgments"]["overall"] for row in rows] == [0.5] * 6
    assert summary["position_bias"] == pytest.approx(-0.3)
    assert summary["per_criterion"]["overall"]["mean_confidence"] == 0.0
    assert len(always_a.requests) == 6 * 2

    # A judge that reads the texts but also leans towards position B: the order average keeps
    # the preference, and swapping a pair gives the complementary probability.
    biased = serve(quality_judge(bias=1.0))
    swapped = [Pair(p.pair_id + "s", p.b, p.a) for p in pairs]
    judge_pairs(pairs + swapped, test_criterion, http_judge(biased),
                tmp_path / "quality" / "judgments.jsonl")
    rows = read_jsonl_resumable(tmp_path / "quality" / "judgments.jsonl")
    p = {row["pair_id"]: row["judgments"]["overall"] for row in rows}
    assert p["pair00"] < 0.5 < p["pair01"] and p["pair04"] > 0.5 and p["pair05"] < 0.5
    assert p["pair02"] == pytest.approx(0.5) and p["pair03"] == pytest.approx(0.5)
    for pair in pairs:
        assert p[pair.pair_id] + p[pair.pair_id + "s"] == pytest.approx(1.0, abs=2e-6)
    assert all(set(row) == ROW_KEYS for row in rows)
    assert order_averaged(0.9, 0.2) == pytest.approx(0.85)


def test_timeouts_are_retried_with_backoff_and_then_fail_clearly(serve) -> None:
    slow_twice = serve(lambda request, n: (200, chat_reply({"A": 0.5, "B": 0.5}), {},
                                           0.6 if n <= 2 else 0.0))
    waits: list[float] = []
    judge = http_judge(slow_twice, timeout_s=0.2, max_retries=3, backoff_s=0.5,
                       sleep=waits.append)
    assert judge.judge(["x"])[0].p_b == pytest.approx(0.5)
    assert waits == [0.5, 1.0]
    assert judge.stats() == {"prompts": 1, "requests": 1, "failed_attempts": 2,
                             "failed_requests": 0}

    always_slow = serve(lambda request, n: (200, chat_reply({"A": 1.0}), {}, 0.6))
    judge = http_judge(always_slow, timeout_s=0.2, max_retries=1, sleep=lambda s: None)
    with pytest.raises(JudgeRequestError) as err:
        judge.judge(["x"])
    message = str(err.value)
    assert always_slow.url + "/chat/completions" in message
    assert "no answer after 2 attempts" in message and "timed out after 0.2 s" in message


def test_server_errors_are_retried_429_waits_and_4xx_fails_at_once(serve) -> None:
    waits: list[float] = []
    flaky = serve(lambda request, n: (
        (500, {"error": "overloaded"}, {}, 0.0) if n == 1 else
        (429, {"error": "slow down"}, {"Retry-After": "3"}, 0.0) if n == 2 else
        (200, chat_reply({"B": 1.0}), {}, 0.0)))
    judge = http_judge(flaky, max_retries=4, backoff_s=0.25, sleep=waits.append)
    assert judge.judge(["x"])[0].p_b == 1.0
    assert waits == [0.25, 3.0]

    refused = serve(lambda request, n: (400, {"error": "unknown model test-judge"}, {}, 0.0))
    judge = http_judge(refused, max_retries=4, sleep=waits.append)
    with pytest.raises(JudgeRequestError, match="HTTP 400.*unknown model test-judge"):
        judge.judge(["x"])
    assert len(refused.requests) == 1

    broken = serve(lambda request, n: (200, b"<html>proxy error</html>", {}, 0.0))
    with pytest.raises(JudgeRequestError, match="the response is not JSON"):
        http_judge(broken).judge(["x"])


def test_a_failing_endpoint_loses_nothing_and_the_run_resumes(serve, tmp_path,
                                                              test_criterion) -> None:
    pairs = make_pairs(SIX_PAIRS)
    reference = tmp_path / "reference" / "judgments.jsonl"
    judge_pairs(pairs, test_criterion, http_judge(serve(quality_judge())), reference,
                batch_pairs=2)
    # Two batches (2 pairs x 1 criterion x 2 orders = 4 requests each) succeed, then HTTP 500.
    failing = serve(lambda request, n: quality_judge()(request, n) if n <= 8 else
                    (500, {"error": "internal"}, {}, 0.0))
    output = tmp_path / "run" / "judgments.jsonl"
    with pytest.raises(JudgeRequestError, match=r"no answer after 3 attempts; last: HTTP 500"):
        judge_pairs(pairs, test_criterion, http_judge(failing), output, batch_pairs=2)
    written = read_jsonl_resumable(output)
    assert [row["pair_id"] for row in written] == ["pair00", "pair01", "pair02", "pair03"]
    assert output.read_bytes() == reference.read_bytes()[:len(output.read_bytes())]
    healthy = serve(quality_judge())
    summary = judge_pairs(pairs, test_criterion, http_judge(healthy), output, batch_pairs=2)
    assert output.read_bytes() == reference.read_bytes()
    assert len(healthy.requests) == 2 * 2 and summary["pairs_judged_this_run"] == 2


def test_resume_after_a_kill_mid_line_gives_the_uninterrupted_file(serve, tmp_path, caplog,
                                                                   test_criterion) -> None:
    pairs = make_pairs(SIX_PAIRS)
    server = serve(quality_judge(bias=-0.5))
    reference = tmp_path / "reference" / "judgments.jsonl"
    judge_pairs(pairs, test_criterion, http_judge(server), reference, batch_pairs=2)
    full = reference.read_bytes()
    lines = full.split(b"\n")
    cut = len(lines[0]) + 1 + len(lines[1]) + 1 + len(lines[2]) // 2  # inside the third row
    killed = tmp_path / "killed" / "judgments.jsonl"
    killed.parent.mkdir()
    killed.write_bytes(full[:cut])
    before = len(server.requests)
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins"):
        summary = judge_pairs(pairs, test_criterion, http_judge(server), killed, batch_pairs=2)
    assert "dropped a partial last line" in caplog.text
    assert killed.read_bytes() == full
    assert len(server.requests) - before == 4 * 2  # pairs 3..6, both orders
    assert summary["pairs_in_file"] == 6 and summary["pairs_judged_this_run"] == 4
    # A finished file resumes to itself without a request.
    judge_pairs(pairs, test_criterion, http_judge(server), killed, batch_pairs=2)
    assert killed.read_bytes() == full and len(server.requests) - before == 8
    # A broken line that is not the last one is not from a kill.
    killed.write_bytes(lines[0] + b"\n{broken\n" + lines[2] + b"\n")
    with pytest.raises(DataError, match=r"judgments.jsonl:2: not valid JSON"):
        judge_pairs(pairs, test_criterion, http_judge(server), killed)


def test_the_position_bias_covers_the_whole_file_across_resumed_runs(serve, tmp_path,
                                                                     test_criterion) -> None:
    """A rerun that judges nothing new keeps the position bias; one that extends the file
    reports it over all pairs, as a single run over all of them would."""
    server = serve(quality_judge(bias=1.0))
    pairs = make_pairs(SIX_PAIRS)
    whole = judge_pairs(pairs, test_criterion, http_judge(server),
                        tmp_path / "whole" / "judgments.jsonl")
    output = tmp_path / "run" / "judgments.jsonl"
    first = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
    assert first["position_bias"] != pytest.approx(whole["position_bias"], abs=1e-3), (
        "the first 4 pairs must have another bias than all 6 for this test to mean something")
    rerun = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
    assert rerun["pairs_judged_this_run"] == 0
    assert rerun["position_bias"] == first["position_bias"] and first["position_bias"] > 0.1
    assert rerun["per_criterion"]["overall"]["position_bias"] == first["position_bias"]
    assert rerun["per_criterion"]["overall"]["position_bias_pairs"] == 4
    stored = json.loads(OutputFiles.for_judgments(output).summary.read_text())
    assert stored["position_bias"] == first["position_bias"]
    extended = judge_pairs(pairs, test_criterion, http_judge(server), output)
    assert extended["pairs_judged_this_run"] == 2
    assert extended["position_bias"] == pytest.approx(whole["position_bias"], abs=1e-6)
    assert extended["per_criterion"]["overall"]["position_bias_pairs"] == 6


def test_the_mean_answer_mass_covers_the_whole_file_across_resumed_runs(serve, tmp_path,
                                                                        test_criterion) -> None:
    """p(A)+p(B) is averaged over every answer in the file's runs, not only the last run's: a
    rerun that judges nothing keeps it, one that extends the file matches a single run."""
    def uneven_mass(request: dict[str, Any], number: int) -> Reply:
        shown_a, shown_b = shown_texts(request)
        mass = 0.5 if "five" in shown_a + shown_b or "six" in shown_a + shown_b else 0.9
        return 200, chat_reply({"A": mass / 2, "B": mass / 2, "The": 1 - mass}), {}, 0.0
    server = serve(uneven_mass)
    pairs = make_pairs(SIX_PAIRS)
    whole = judge_pairs(pairs, test_criterion, http_judge(server),
                        tmp_path / "whole" / "judgments.jsonl")
    output = tmp_path / "run" / "judgments.jsonl"
    first = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
    assert first["mean_answer_mass"] == pytest.approx(0.9, abs=1e-4)
    assert whole["mean_answer_mass"] == pytest.approx((8 * 0.9 + 4 * 0.5) / 12, abs=1e-4)
    rerun = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
    assert rerun["pairs_judged_this_run"] == 0 and rerun["prompts_per_s"] is None
    assert rerun["mean_answer_mass"] == first["mean_answer_mass"]
    assert rerun["answer_mass_answers"] == 8
    extended = judge_pairs(pairs, test_criterion, http_judge(server), output)
    assert extended["mean_answer_mass"] == pytest.approx(whole["mean_answer_mass"], abs=1e-5)
    assert extended["answer_mass_answers"] == whole["answer_mass_answers"] == 12
    assert "over 12 answers" in format_summary(extended)


def test_rows_without_order_answers_keep_the_position_bias_of_the_earlier_summary(
        serve, tmp_path, test_criterion) -> None:
    """A file written before rows stored their two order answers: its rows' share of the
    position bias comes from the summary of the run that judged them, carried from rerun to
    rerun and weighted by its pair count when new pairs are added."""
    server = serve(quality_judge(bias=1.0))
    pairs = make_pairs(SIX_PAIRS)
    whole = judge_pairs(pairs, test_criterion, http_judge(server),
                        tmp_path / "whole" / "judgments.jsonl")
    output = tmp_path / "run" / "judgments.jsonl"
    first = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
    # What the older version left: rows without p_b_by_order, a summary of that run's pairs.
    rows = read_jsonl_resumable(output)
    output.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "p_b_by_order"})
                              + "\n" for row in rows))
    files = OutputFiles.for_judgments(output)
    old = json.loads(files.summary.read_text())
    for stats in old["per_criterion"].values():
        stats.pop("position_bias_pairs", None)
    files.summary.write_text(json.dumps(old))
    for _ in range(2):
        rerun = judge_pairs(pairs[:4], test_criterion, http_judge(server), output)
        assert rerun["position_bias"] == first["position_bias"]
        assert rerun["per_criterion"]["overall"]["position_bias_pairs"] == 4
    extended = judge_pairs(pairs, test_criterion, http_judge(server), output)
    assert extended["position_bias"] == pytest.approx(whole["position_bias"], abs=1e-5)
    assert extended["per_criterion"]["overall"]["position_bias_pairs"] == 6


def test_resuming_with_other_criteria_or_pairs_is_refused(serve, tmp_path,
                                                          test_criterion) -> None:
    server = serve(quality_judge())
    output = tmp_path / "judgments.jsonl"
    judge_pairs(make_pairs(SIX_PAIRS[:2]), test_criterion, http_judge(server), output)
    with pytest.raises(ConfigError, match=r"holds judgments for \['overall'\]"):
        judge_pairs(make_pairs(SIX_PAIRS[:2]), load_criteria(["writing_style"]),
                    http_judge(server), output)
    other = [Pair("other", p.a, p.b) for p in make_pairs(SIX_PAIRS[:1])]
    with pytest.raises(ConfigError, match="2 pairs that are not in this run's sample of 1"):
        judge_pairs(other, test_criterion, http_judge(server), output)


def test_pairs_of_an_earlier_excerpt_rule_are_refused_naming_the_rule_not_only_settings(
        serve, tmp_path, test_criterion) -> None:
    """A file judged before excerpts followed QuRating's rule (2026-12-06) holds pairs the same
    settings no longer sample. Its summary lacks ``excerpt_rule``, so the refusal names that
    cause, whose fix is a new output_dir (restoring settings cannot help); a file of this
    version records the rule, and its refusal names the settings only."""
    server = serve(quality_judge())
    output = tmp_path / "judgments.jsonl"
    files = OutputFiles.for_judgments(output)
    judge_pairs(make_pairs(SIX_PAIRS[:2]), test_criterion, http_judge(server), output)
    assert json.loads(files.summary.read_text())["excerpt_rule"] == EXCERPT_RULE
    other = [Pair("other", p.a, p.b) for p in make_pairs(SIX_PAIRS[:1])]
    with pytest.raises(ConfigError) as caught:
        judge_pairs(other, test_criterion, http_judge(server), output)
    message = str(caught.value)
    assert "2 pairs that are not in this run's sample of 1" in message
    assert "seed" in message and "Fix: restore those settings to resume" in message
    assert "2026-12-06" not in message

    summary = json.loads(files.summary.read_text())
    del summary["excerpt_rule"]  # as a version before the rule wrote it
    files.summary.write_text(json.dumps(summary))
    for _ in range(2):
        with pytest.raises(ConfigError) as caught:
            judge_pairs(other, test_criterion, http_judge(server), output)
        message = str(caught.value)
        assert "2 pairs that are not in this run's sample of 1" in message
        assert "records no `excerpt_rule`" in message and "2026-12-06" in message
        assert "QuRating's rule" in message and "seed" in message  # both causes
        assert re.search(r"Fix: pairs of another excerpt rule cannot be resumed: write to a "
                         r"new `output_dir`, or delete judgments.jsonl", message)
        files.summary.unlink(missing_ok=True)  # and without any summary
    summary["excerpt_rule"] = "another-rule"
    files.summary.write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=r"records excerpt rule 'another-rule', this version "
                       rf"samples by '{EXCERPT_RULE}'"):
        judge_pairs(other, test_criterion, http_judge(server), output)
    assert len(server.requests) == 4  # two pairs, two orders, once

    # An old file whose pairs this rule samples too resumes, and records the rule.
    del summary["excerpt_rule"]
    files.summary.write_text(json.dumps(summary))
    judge_pairs(make_pairs(SIX_PAIRS[:3]), test_criterion, http_judge(server), output)
    assert json.loads(files.summary.read_text())["excerpt_rule"] == EXCERPT_RULE


def test_the_excerpt_rule_is_recorded_before_the_first_row_of_every_run(
        serve, tmp_path, test_criterion) -> None:
    """A run killed after its first rows writes no summary of its own, so the excerpt rule its
    pairs follow must be in the summary before the first row, as ``labelled_by`` is: else a
    later run on other settings would be told the file most likely predates the rule. A file
    whose summary lacks the rule (an older version) and whose pairs this run samples too gets
    it recorded before the resumed run's first row, though its ``labelled_by`` is unchanged."""
    pairs = make_pairs(SIX_PAIRS)
    output = tmp_path / "judgments.jsonl"
    files = OutputFiles.for_judgments(output)
    other = [Pair("other", p.a, p.b) for p in make_pairs(SIX_PAIRS[:1])]

    def killed_after_one_batch() -> None:
        failing = serve(lambda request, n: quality_judge()(request, n) if n <= 4 else
                        (500, {"error": "internal"}, {}, 0.0))
        with pytest.raises(JudgeRequestError):
            judge_pairs(pairs, test_criterion, http_judge(failing), output, batch_pairs=2)

    def refusal_names_the_settings_only(pairs_in_file: int) -> None:
        with pytest.raises(ConfigError) as caught:
            judge_pairs(other, test_criterion, http_judge(serve(quality_judge())), output)
        message = str(caught.value)
        assert f"{pairs_in_file} pairs that are not in this run's sample of 1" in message
        assert "Fix: restore those settings to resume" in message
        assert "2026-12-06" not in message and "records no `excerpt_rule`" not in message

    killed_after_one_batch()
    assert len(read_jsonl_resumable(output)) == 2
    first = json.loads(files.summary.read_text())
    assert first["excerpt_rule"] == EXCERPT_RULE and "pairs_in_file" not in first
    refusal_names_the_settings_only(2)

    del first["excerpt_rule"]  # as a version before the rule wrote it, labelled_by the same
    files.summary.write_text(json.dumps(first))
    killed_after_one_batch()  # resumes the two pairs, judges two more, is killed again
    assert len(read_jsonl_resumable(output)) == 4
    second = json.loads(files.summary.read_text())
    assert second["excerpt_rule"] == EXCERPT_RULE
    assert second["labelled_by"] == first["labelled_by"]
    refusal_names_the_settings_only(4)


def test_resuming_with_another_judge_prompt_or_min_answer_mass_is_refused(
        serve, tmp_path, test_criterion, caplog) -> None:
    """The summary records what labelled the rows before the first row is written; a run that
    would label the rest of the pairs otherwise (another model, an edited prompt, another
    min_answer_mass) is refused naming the key, even after a run killed before its summary."""
    server = serve(quality_judge())
    pairs = make_pairs(SIX_PAIRS)
    output = tmp_path / "run" / "judgments.jsonl"
    files = OutputFiles.for_judgments(output)
    failing = serve(lambda request, n: quality_judge()(request, n) if n <= 4 else
                    (500, {"error": "internal"}, {}, 0.0))
    with pytest.raises(JudgeRequestError):  # killed after one batch, no summary of its own
        judge_pairs(pairs, test_criterion, http_judge(failing), output, batch_pairs=2)
    assert len(read_jsonl_resumable(output)) == 2
    recorded = json.loads(files.summary.read_text())["labelled_by"]
    assert recorded["judge.openai.model"] == "test-judge"
    assert recorded["judge.min_answer_mass"] == 0.0
    assert set(recorded) >= {"judge.kind", "judge.openai.endpoint",
                             "judge.openai.top_logprobs", "criteria.overall.prompt_sha256"}

    other_model = OpenAIJudge(server.url, "another-judge", concurrency=1)
    with pytest.raises(ConfigError, match=r"config `judge.openai.model`:.*was 'test-judge', "
                       r"is 'another-judge'.*Fix: write to a new `output_dir`"):
        judge_pairs(pairs, test_criterion, other_model, output)
    edited = tmp_path / "edited" / "overall.txt"
    edited.parent.mkdir()
    edited.write_text(TEST_PROMPT.replace("Which text is better?", "Which text is clearer?"))
    with pytest.raises(ConfigError, match=r"`criteria.overall.prompt_sha256`"):
        judge_pairs(pairs, load_criteria([str(edited)]), http_judge(server), output)
    with pytest.raises(ConfigError, match=r"`judge.min_answer_mass`: .*was 0.0, is 0.5"):
        judge_pairs(pairs, test_criterion, http_judge(server), output, min_answer_mass=0.5)
    with pytest.raises(ConfigError, match=r"judge.openai.top_logprobs"):
        judge_pairs(pairs, test_criterion, http_judge(server, top_logprobs=20), output)
    assert len(server.requests) == 0 and len(read_jsonl_resumable(output)) == 2

    # The same judge on another server, with other retry settings, is the same judge.
    summary = judge_pairs(pairs, test_criterion, http_judge(server, max_retries=5), output)
    assert summary["pairs_in_file"] == 6 and summary["labelled_by"] == recorded
    assert json.loads(files.summary.read_text())["labelled_by"] == recorded

    # A file from before the record: resumed with a warning, then recorded.
    old = json.loads(files.summary.read_text())
    del old["labelled_by"]
    files.summary.write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins"):
        judge_pairs(pairs, test_criterion, http_judge(server), output)
    assert "no record of the judge, prompts and min_answer_mass" in caplog.text
    assert json.loads(files.summary.read_text())["labelled_by"] == recorded
    files.summary.unlink()  # a killed run of an older version: no summary at all
    judge_pairs(pairs, test_criterion, http_judge(server), output)
    assert json.loads(files.summary.read_text())["labelled_by"] == recorded


def test_a_local_judge_records_its_model_and_precision_not_its_device_or_batch(
        tiny_model_dir, tmp_path, test_criterion) -> None:
    pairs = make_pairs(SIX_PAIRS[:2])
    output = tmp_path / "judgments.jsonl"
    judge_pairs(pairs[:1], test_criterion, LocalJudge(tiny_model_dir, batch_size=4), output)
    recorded = json.loads(OutputFiles.for_judgments(output).summary.read_text())["labelled_by"]
    assert recorded["judge.kind"] == "local" and recorded["judge.local.dtype"] == "float32"
    assert recorded["judge.local.model_dir"] == tiny_model_dir.name
    assert recorded["judge.local.chat_template"].startswith("sha256:")
    with pytest.raises(ConfigError, match=r"`judge.local.dtype`: .*was 'float32', is "
                       r"'bfloat16'"):
        judge_pairs(pairs, test_criterion, LocalJudge(tiny_model_dir, dtype="bfloat16"), output)
    with pytest.raises(ConfigError, match=r"`judge.local.chat_template`"):
        judge_pairs(pairs, test_criterion, LocalJudge(tiny_model_dir, chat_template=False),
                    output)
    summary = judge_pairs(pairs, test_criterion, LocalJudge(tiny_model_dir, batch_size=1),
                          output)
    assert summary["pairs_in_file"] == 2


def test_rows_name_their_documents_and_ready_made_pairs_keep_or_lack_them(
        serve, tmp_path, test_criterion) -> None:
    """doc_id_a/doc_id_b let the rater count held-out pairs sharing a training document; a
    ready-made pair without them gets null, never a made-up id."""
    output = tmp_path / "judgments.jsonl"
    judge_pairs(make_pairs(SIX_PAIRS[:2]), test_criterion, http_judge(serve(quality_judge())),
                output)
    rows = read_jsonl_resumable(output)
    assert [(r["doc_id_a"], r["doc_id_b"]) for r in rows] == [("doc0a", "doc0b"),
                                                              ("doc1a", "doc1b")]
    again = read_pairs_file(output)
    assert [(p.a.doc_id, p.b.doc_id) for p in again] == [("doc0a", "doc0b"), ("doc1a", "doc1b")]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"text_a": "one", "text_b": "two"}) + "\n")
    assert read_pairs_file(bare)[0].row_fields()["doc_id_a"] is None


def test_answers_that_are_not_a_or_b_reject_the_pair_with_a_count(serve, tmp_path,
                                                                 test_criterion) -> None:
    def respond(request: dict[str, Any], number: int) -> Reply:
        if "ODD" in "".join(shown_texts(request)):
            return 200, chat_reply({"The": 0.7, "Text": 0.3}), {}, 0.0
        return quality_judge()(request, number)

    server = serve(respond)
    texts = SIX_PAIRS[:3] + [("ODD text", "plain")]
    output = tmp_path / "judgments.jsonl"
    summary = judge_pairs(make_pairs(texts), test_criterion, http_judge(server), output)
    rows = read_jsonl_resumable(output)
    assert [row["pair_id"] for row in rows] == ["pair00", "pair01", "pair02"]
    rejected = read_jsonl_resumable(OutputFiles.for_judgments(output).rejected)
    assert [(r["pair_id"], r["criterion"], r["order"]) for r in rejected] == [
        ("pair03", "overall", "ab"), ("pair03", "overall", "ba")]
    assert "neither A nor B" in rejected[0]["problem"] and rejected[0]["answer"] == "The"
    assert summary["pairs_rejected"] == 1 and summary["pairs_in_file"] == 3
    on_disk = json.loads(OutputFiles.for_judgments(output).summary.read_text())
    assert on_disk["pairs_rejected"] == 1
    before = len(server.requests)
    judge_pairs(make_pairs(texts), test_criterion, http_judge(server), output)
    assert len(server.requests) == before  # rejected pairs count as done

    # Without log-probabilities the answer letter is used, and a non-letter is rejected.
    def letters(request: dict[str, Any], number: int) -> Reply:
        answer = "Maybe" if "ODD" in "".join(shown_texts(request)) else "Text B."
        return 200, {"choices": [{"message": {"role": "assistant", "content": answer}}]}, {}, 0.0

    output = tmp_path / "letters" / "judgments.jsonl"
    summary = judge_pairs(make_pairs(texts), test_criterion, http_judge(serve(letters)), output)
    assert [row["judgments"]["overall"] for row in read_jsonl_resumable(output)] == [0.5] * 3
    assert summary["letter_only_answers"] == 8 and summary["pairs_rejected"] == 1
    rejected = read_jsonl_resumable(OutputFiles.for_judgments(output).rejected)
    assert "not a letter A or B" in rejected[0]["problem"]


def test_answers_with_little_mass_on_a_and_b_are_rejected_below_min_answer_mass(
        serve, tmp_path, test_criterion) -> None:
    """QuRating keeps an order only when most of its sampled answers are A or B; with
    ``min_answer_mass: 0.5`` an answer whose p(A) + p(B) is 0.3 is rejected the same way (a
    confident-looking 0.67 among the two letters included), and by default it counts."""
    def respond(request: dict[str, Any], number: int) -> Reply:
        if "ODD" in "".join(shown_texts(request)):
            return 200, chat_reply({"A": 0.1, "B": 0.2, "The": 0.7}), {}, 0.0
        return quality_judge()(request, number)

    texts = SIX_PAIRS[:3] + [("ODD text", "plain")]
    kept = judge_pairs(make_pairs(texts), test_criterion, http_judge(serve(respond)),
                       tmp_path / "all" / "judgments.jsonl")
    assert kept["pairs_in_file"] == 4 and kept["pairs_rejected"] == 0
    output = tmp_path / "floor" / "judgments.jsonl"
    summary = judge_pairs(make_pairs(texts), test_criterion, http_judge(serve(respond)),
                          output, min_answer_mass=0.5)
    assert [row["pair_id"] for row in read_jsonl_resumable(output)] == [
        "pair00", "pair01", "pair02"]
    rejected = read_jsonl_resumable(OutputFiles.for_judgments(output).rejected)
    assert [(r["pair_id"], r["order"]) for r in rejected] == [("pair03", "ab"), ("pair03", "ba")]
    assert "p(A) + p(B) = 0.300 is below judge.min_answer_mass 0.5" in rejected[0]["problem"]
    assert summary["pairs_rejected"] == 1 and summary["pairs_in_file"] == 3
    assert summary["mean_answer_mass"] == kept["mean_answer_mass"]  # still every answer's
    with pytest.raises(ConfigError, match="judge.min_answer_mass"):
        judge_pairs(make_pairs(texts), test_criterion, http_judge(serve(respond)),
                    tmp_path / "bad" / "judgments.jsonl", min_answer_mass=1.0)


def test_rate_limiter_spaces_requests() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        limiter.wait()
    assert slept == [0.25, 0.5, 0.75]
    now[0] = 200.0
    limiter.wait()
    assert slept == [0.25, 0.5, 0.75]
    RateLimiter(None, sleep=sleep).wait()
    assert len(slept) == 3


def _judge_config(tmp_path: Path, corpus: Path, tokenizer_dir: Path, url: str,
                  **judge_extra: Any) -> Any:
    prompt = tmp_path / "overall.txt"
    prompt.write_text(TEST_PROMPT)
    return OmegaConf.create({
        "output_dir": str(tmp_path / "out"), "criteria": [str(prompt)],
        "pairs": {"data": str(corpus), "file": None, "num_pairs": 5, "max_tokens": 16,
                  "min_tokens": 4, "seed": 1, "tokenizer": str(tokenizer_dir)},
        "judge": {"kind": "openai", "local": {"model_dir": "unused"},
                  "openai": {"url": url, "model": "test-judge", "api_key_env": "QR_TEST_KEY",
                             "backoff_s": 0.01, "max_retries": 1, "timeout_s": 2,
                             "requests_per_second": 200, **judge_extra}},
        "batch_pairs": 2, "progress": False})


def test_api_key_is_sent_but_never_logged_or_written(serve, tmp_path, tiny_corpus,
                                                     tiny_model_dir, monkeypatch, caplog,
                                                     capsys) -> None:
    monkeypatch.setenv("QR_TEST_KEY", SECRET)
    server = serve(quality_judge())
    cfg = _judge_config(tmp_path, tiny_corpus, tiny_model_dir, server.url)
    with caplog.at_level(logging.DEBUG):
        summary = run_judging(cfg)
        failing = serve(lambda request, n: (503, {"error": "down"}, {}, 0.0))
        cfg.output_dir = str(tmp_path / "out2")
        cfg.judge.openai.url = failing.url
        with pytest.raises(JudgeRequestError) as err:
            run_judging(cfg)
    assert summary["pairs_in_file"] == 5 and summary["requests"]["requests"] == 10
    assert {r["headers"]["Authorization"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert failing.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    captured = capsys.readouterr()
    seen = [caplog.text, captured.out, captured.err, str(err.value), repr(err.value)]
    seen += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert "retry 1/1" in caplog.text  # the retry was logged -- without the key
    assert all(SECRET not in text for text in seen)
    monkeypatch.delenv("QR_TEST_KEY")
    with pytest.raises(ConfigError, match="environment variable 'QR_TEST_KEY' is not set"):
        run_judging(cfg)


def test_recipe_config_checks_name_keys_with_suggestions(tmp_path, tiny_corpus,
                                                         tiny_model_dir) -> None:
    cfg = _judge_config(tmp_path, tiny_corpus, tiny_model_dir, "http://127.0.0.1:9/v1")
    check_config(cfg)
    bad = cfg.copy()
    bad.pairs.num_pair = 3
    with pytest.raises(ConfigError, match=r"`pairs.num_pair`.*did you mean `pairs.num_pairs`"):
        check_config(bad)
    bad = cfg.copy()
    bad.judge.openai.requests_per_sec = 3
    with pytest.raises(ConfigError, match="did you mean `judge.openai.requests_per_second`"):
        check_config(bad)
    bad = cfg.copy()
    bad.judge.kind = "vllm"
    with pytest.raises(ConfigError, match="`judge.kind`"):
        check_config(bad)
    bad = cfg.copy()
    bad.pairs.file = "pairs.jsonl"
    with pytest.raises(ConfigError, match="exactly one of `pairs.data`"):
        check_config(bad)
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me\n")
    for output_dir in (blocker, blocker / "sub"):  # was a NotADirectoryError when writing
        bad = cfg.copy()
        bad.output_dir = str(output_dir)
        with pytest.raises(ConfigError, match="`output_dir`"):
            check_config(bad)
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("pairs.num_pairs", "ten", "is 'ten', not an integer"),
    ("pairs.max_tokens", "1k", "is '1k', not an integer"),
    ("pairs.min_excerpt_tokens", "half", "is 'half', not an integer"),
    ("pairs.p_max_tokens", "often", "is 'often', not a number"),
    ("pairs.min_tokens", 0, "is 0, below its minimum 1"),
    ("pairs.seed", "abc", "is 'abc', not an integer"),
    ("pairs.same_domain", "maybe", "is 'maybe', not true or false"),
    ("batch_pairs", "two", "is 'two', not an integer"),
    ("progress", "maybe", "is 'maybe', not true or false"),
    ("judge.min_answer_mass", "half", "is 'half', not a number"),
    ("judge.min_answer_mass", 1.0, "is 1.0, outside [0, 1)"),
    ("metric_logger", {"log_dir": "x"}, "is missing"),
])
def test_a_value_of_the_wrong_type_is_named_before_the_judge_is_loaded(
        tmp_path, tiny_corpus, tiny_model_dir, key, value, problem) -> None:
    cfg = _judge_config(tmp_path, tiny_corpus, tiny_model_dir, "http://127.0.0.1:9/v1")
    OmegaConf.update(cfg, key, value, force_add=True)
    name = key + "._component_" if key == "metric_logger" else key
    with pytest.raises(ConfigError, match=rf"config `{re.escape(name)}`: {re.escape(problem)}"
                                          r".* Fix:"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=rf"config `{re.escape(name)}`"):
        run_judging(cfg)
    assert not (tmp_path / "out").exists()
    if key.startswith("pairs."):  # the library entry point reads them the same way
        from acadlm_plugins.qurating.pairs import pairs_from_config

        with pytest.raises(ConfigError, match=rf"config `{re.escape(key)}`"):
            pairs_from_config(OmegaConf.to_container(cfg.pairs), None)


def test_the_metric_logger_gets_the_judging_throughput(serve, tmp_path, tiny_corpus,
                                                       tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setenv("QR_TEST_KEY", SECRET)
    server = serve(quality_judge())
    cfg = _judge_config(tmp_path, tiny_corpus, tiny_model_dir, server.url)
    cfg.metric_logger = {"_component_": "torchtune.training.metric_logging.DiskLogger",
                         "log_dir": str(tmp_path / "logs")}
    summary = run_judging(cfg)
    lines = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.txt")).splitlines()
    steps = [int(re.match(r"Step (\d+) \|", line).group(1)) for line in lines]
    assert steps == [2, 4, 5]  # pairs done after each batch of 2 (5 pairs)
    rates = [float(x) for x in re.findall(r"prompts_per_second:(\S+)", "\n".join(lines))]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)
    assert "pairs_per_second:" in lines[-1] and summary["pairs_in_file"] == 5


# ---------------------------------------------------------------------- local judge


def test_local_judge_probabilities_match_the_model_and_batching(tiny_model_dir,
                                                                test_criterion) -> None:
    judge = LocalJudge(tiny_model_dir, batch_size=3)
    assert judge.use_chat and set(judge.answer_ids["A"]).isdisjoint(judge.answer_ids["B"])
    criterion = test_criterion[0]
    prompts = [criterion.render(a, b) for a, b in SIX_PAIRS[:4]]
    results = judge.judge(prompts)
    judge.batch_size = 1
    one_by_one = judge.judge(prompts)
    for prompt, result, single in zip(prompts, results, one_by_one, strict=True):
        tokens = torch.tensor([judge.tokenizer.encode_prompt(judge.format_prompt(prompt))])
        assert judge.format_prompt(prompt).endswith("<|im_start|>assistant\n")
        with torch.inference_mode():
            probs = torch.softmax(judge.model(tokens)[0, -1].float(), dim=-1)
        p_a = float(probs[judge.answer_ids["A"]].sum())
        p_b = float(probs[judge.answer_ids["B"]].sum())
        assert 0.0 < result.p_b < 1.0 and 0.0 < result.answer_mass <= 1.0
        assert result.p_b == pytest.approx(p_b / (p_a + p_b), abs=1e-5)
        assert result.answer_mass == pytest.approx(p_a + p_b, rel=1e-4)
        assert single.p_b == pytest.approx(result.p_b, abs=1e-5)
    with pytest.raises(ConfigError, match="`pairs.max_tokens`.*does not fit"):
        judge.judge([criterion.render("seven " * 300, "x")])


def test_local_judge_order_averaging_is_consistent(tiny_model_dir, tmp_path,
                                                   test_criterion) -> None:
    judge = LocalJudge(tiny_model_dir, batch_size=4)
    pairs = make_pairs(SIX_PAIRS[:3])
    swapped = [Pair(p.pair_id + "s", p.b, p.a) for p in pairs]
    summary = judge_pairs(pairs + swapped, test_criterion, judge, tmp_path / "j.jsonl",
                          batch_pairs=6)
    p = {row["pair_id"]: row["judgments"]["overall"]
         for row in read_jsonl_resumable(tmp_path / "j.jsonl")}
    for pair in pairs:
        assert 0.0 <= p[pair.pair_id] <= 1.0
        assert p[pair.pair_id] + p[pair.pair_id + "s"] == pytest.approx(1.0, abs=1e-5)
    assert summary["requests"]["prompts"] == 12 and summary["mean_answer_mass"] > 0


def test_tune_run_judges_the_tiny_corpus_and_resumes(tmp_path, tiny_model_dir,
                                                     tiny_corpus) -> None:
    out = tmp_path / "judge_run"
    args = ["--config", str(REPO_ROOT / "configs/tiny/qurating_judge.yaml"), f"output_dir={out}",
            f"judge.local.model_dir={tiny_model_dir}", f"pairs.data={tiny_corpus}"]
    run_tune_subprocess("acadlm_plugins/judge_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / "run.log")
    rows = read_jsonl_resumable(out / "judgments.jsonl")
    assert len(rows) == 6 and all(set(row) == ROW_KEYS for row in rows)
    assert all(set(row["judgments"]) == {"writing_style", "educational_value"} for row in rows)
    assert all(0.0 <= v <= 1.0 for row in rows for v in row["judgments"].values())
    summary = json.loads((out / "judgments.summary.json").read_text())
    assert summary["pairs_in_file"] == 6 and summary["requests"]["prompts"] == 24
    assert "=== QuRating judgments ===" in (tmp_path / "run.log").read_text()
    before = (out / "judgments.jsonl").read_bytes()
    run_tune_subprocess("acadlm_plugins/judge_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / "rerun.log")
    assert (out / "judgments.jsonl").read_bytes() == before
    assert "6 of 6 pairs already done, 0 to judge" in (tmp_path / "rerun.log").read_text()


@pytest.mark.integration
def test_smollm2_judge_through_tune_run(tmp_path) -> None:
    from acadlm_plugins.defaults import require_default_corpus, require_default_model

    require_default_model()
    require_default_corpus()
    out = tmp_path / "smollm2_judge"
    started = time.perf_counter()
    run_tune_subprocess(
        "acadlm_plugins/judge_recipe",
        ["--config", str(REPO_ROOT / "configs/smollm2/qurating_judge.yaml"), f"output_dir={out}",
         "pairs.num_pairs=4", "pairs.max_tokens=48", "criteria=[writing_style,educational_value]"],
        cwd=REPO_ROOT, log_file=tmp_path / "run.log", timeout=300)
    elapsed = time.perf_counter() - started
    rows = read_jsonl_resumable(out / "judgments.jsonl")
    assert len(rows) == 4 and all(set(row) == ROW_KEYS for row in rows)
    summary = json.loads((out / "judgments.summary.json").read_text())
    assert summary["pairs_in_file"] == 4 and summary["pairs_rejected"] == 0
    # SmolLM2-Instruct answers the prompt with a letter most of the time.
    assert summary["mean_answer_mass"] > 0.2
    assert all(0.0 <= v <= 1.0 for row in rows for v in row["judgments"].values())
    print(f"SmolLM2 judge: 4 pairs x 2 criteria x 2 orders in {elapsed:.1f} s; "
          f"{summary['prompts_per_s']} prompts/s; "
          f"mean |p-0.5| {summary['per_criterion']['writing_style']['mean_confidence']}")


# ---------------------------------------------------------------------- fidelity to QuRating


def overlapping_tokens(spans: list[tuple[int, int]], start: int, end: int) -> int:
    """How many of a document's tokens overlap the character span ``[start, end)``."""
    return sum(1 for left, right in spans if left < end and right > start)


def test_excerpt_lengths_follow_quratings_rule_with_one_length_per_pair(
        tiny_corpus, tiny_tokenizer) -> None:
    import random

    from acadlm_plugins.qurating.pairs import DEFAULT_MAX_TOKENS, ExcerptLengths, pairs_from_config

    # The paper's defaults: 512 tokens half of the time, else uniform in [256, 512].
    assert DEFAULT_MAX_TOKENS == 512
    rule = ExcerptLengths()
    assert (rule.max_tokens, rule.min_tokens, rule.p_max_tokens) == (512, 256, 0.5)
    draws = [rule.draw(random.Random(seed)) for seed in range(4000)]
    assert min(draws) >= 256 and max(draws) == 512
    at_max = draws.count(512) / len(draws)
    assert abs(at_max - (0.5 + 0.5 / 257)) < 0.03
    assert len(set(draws)) > 150  # the other half spreads over the range
    assert ExcerptLengths(max_tokens=128).min_tokens == 64  # the range scales with max_tokens
    with pytest.raises(DataError, match="min_excerpt_tokens"):
        ExcerptLengths(max_tokens=64, min_tokens=65)
    with pytest.raises(DataError, match="p_max_tokens"):
        ExcerptLengths(p_max_tokens=1.5)

    # Both excerpts of a pair have the same length when both documents are longer than
    # max_tokens (min_tokens=25); lengths vary between pairs.
    documents = read_documents(tiny_corpus)
    texts = {d.doc_id: d.text for d in documents}
    pairs = sample_pairs(documents, tiny_tokenizer, num_pairs=40, max_tokens=24,
                         min_tokens=25, seed=5)
    lengths = []
    for pair in pairs:
        counts = [overlapping_tokens(list(tiny_tokenizer.rust.encode(
            texts[e.doc_id], add_special_tokens=False).offsets), e.start, e.end)
            for e in (pair.a, pair.b)]
        assert counts[0] == counts[1], (pair.pair_id, counts)
        lengths.append(counts[0])
    assert min(lengths) >= 12 and max(lengths) == 24
    assert 8 <= lengths.count(24) <= 32 and len(set(lengths)) >= 4
    # A fixed length on request.
    fixed = sample_pairs(documents, tiny_tokenizer, num_pairs=10, max_tokens=16,
                         min_excerpt_tokens=16, min_tokens=24, seed=5)
    for pair in fixed:
        for e in (pair.a, pair.b):
            spans = list(tiny_tokenizer.rust.encode(texts[e.doc_id],
                                                    add_special_tokens=False).offsets)
            assert overlapping_tokens(spans, e.start, e.end) == 16
    # The config block reads the same keys (what the judge recipe passes on).
    from_config = pairs_from_config({"data": str(tiny_corpus), "num_pairs": 10,
                                     "max_tokens": 16, "min_excerpt_tokens": 16,
                                     "p_max_tokens": 0.5, "min_tokens": 24, "seed": 5},
                                    tiny_tokenizer)
    assert from_config == fixed


def word_document(num_words: int, *, doc_id: str = "doc", pad: str = "") -> tuple[
        Document, list[tuple[int, int]]]:
    """A document of ``num_words`` distinct words (``pad`` around them) and the words'
    character spans, standing in for token spans: :func:`excerpt_of` only reads spans."""
    words = [f"w{i}" for i in range(num_words)]
    text = pad + " ".join(words) + pad
    spans, start = [], len(pad)
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return Document(doc_id=doc_id, text=text, domain="d", source="s", where="here"), spans


def test_a_document_of_at_most_max_tokens_is_shown_whole_whatever_length_was_drawn() -> None:
    """QuRating's extract_excerpt: a 400-token document with 300 tokens drawn for its pair, the
    rule's longest excerpt being 512, is shown whole (all 400 tokens), not cut to 300; so is
    one of exactly 512 tokens. Surrounding whitespace is trimmed; no random draw is made."""
    import random

    for num_words, drawn in ((400, 300), (512, 256), (400, 512), (3, 1)):
        document, spans = word_document(num_words, pad=" \n ")
        rng = random.Random(0)
        state = rng.getstate()
        excerpt = excerpt_of(document, spans, max_tokens=512, num_tokens=drawn, rng=rng)
        assert excerpt.text == document.text.strip() and len(excerpt.text.split()) == num_words
        assert (excerpt.start, excerpt.end) == (3, len(document.text) - 3)
        assert document.text[excerpt.start:excerpt.end] == excerpt.text
        assert rng.getstate() == state, "a whole document draws no start"
    for drawn in (0, 513):
        with pytest.raises(ValueError, match=r"num_tokens .* must be in \[1, max_tokens=512\]"):
            excerpt_of(document, spans, max_tokens=512, num_tokens=drawn, rng=rng)


def test_a_longer_document_gives_the_drawn_length_from_a_start_in_the_max_tokens_range() -> None:
    """Over ``max_tokens`` tokens: the first token is drawn uniformly from
    ``[0, tokens - max_tokens]`` (the range of a ``max_tokens`` excerpt, whatever length was
    drawn) and the drawn number of tokens is taken from there, as QuRating does."""
    import random

    document, spans = word_document(1000)
    firsts = []
    for seed in range(400):
        excerpt = excerpt_of(document, spans, max_tokens=512, num_tokens=300,
                             rng=random.Random(seed))
        first = random.Random(seed).randrange(1000 - 512 + 1)
        assert (excerpt.start, excerpt.end) == (spans[first][0], spans[first + 299][1])
        assert excerpt.text.split() == [f"w{i}" for i in range(first, first + 300)]
        firsts.append(first)
    assert min(firsts) < 20 and 470 < max(firsts) <= 488  # never past 1000 - 512
    # Just over the rule's longest excerpt: two possible starts, for any drawn length.
    document, spans = word_document(513)
    starts = {excerpt_of(document, spans, max_tokens=512, num_tokens=256,
                         rng=random.Random(seed)).text.split()[0] for seed in range(40)}
    assert starts == {"w0", "w1"}


def test_sampled_pairs_show_short_documents_whole_and_cut_long_ones_to_the_pair_length(
        tiny_tokenizer) -> None:
    """Our own documents of 10 to 70 tokens, excerpts of at most 32 tokens (else 16-32): a
    document of at most 32 tokens is always shown whole, even when the pair's length is
    shorter; both excerpts of longer documents have the pair's length and start within the
    first ``tokens - 32`` tokens."""
    import random

    rng = random.Random(11)
    documents = [Document(doc_id=f"doc-{i}", text=" ".join(str(rng.randrange(40))
                                                          for _ in range(words)),
                          domain="numbers", source="ours", where=f"ours:{i}")
                 for i, words in enumerate(range(10, 71, 4))]
    spans = {d.doc_id: list(tiny_tokenizer.rust.encode(d.text, add_special_tokens=False).offsets)
             for d in documents}
    texts = {d.doc_id: d.text for d in documents}
    assert {len(v) <= 32 for v in spans.values()} == {True, False}
    pairs = sample_pairs(documents, tiny_tokenizer, num_pairs=60, max_tokens=32,
                         min_excerpt_tokens=16, min_tokens=1, seed=2)
    whole_but_longer_than_its_partner = 0
    for pair in pairs:
        cut_lengths = []
        for excerpt, partner in ((pair.a, pair.b), (pair.b, pair.a)):
            token_spans = spans[excerpt.doc_id]
            count = overlapping_tokens(token_spans, excerpt.start, excerpt.end)
            if len(token_spans) <= 32:
                assert excerpt.text == texts[excerpt.doc_id], pair.pair_id
                partner_spans = spans[partner.doc_id]
                if len(partner_spans) > 32 and count > overlapping_tokens(
                        partner_spans, partner.start, partner.end):
                    whole_but_longer_than_its_partner += 1
            else:
                first = next(i for i, (_, right) in enumerate(token_spans)
                             if right > excerpt.start)
                assert first <= len(token_spans) - 32, pair.pair_id
                cut_lengths.append(count)
        assert len(set(cut_lengths)) <= 1, pair.pair_id  # one length per pair
        assert all(16 <= n <= 32 for n in cut_lengths)
    assert whole_but_longer_than_its_partner > 0  # the case the rule decides occurred


def test_builtin_prompts_rule_out_order_length_and_language_and_reward_more_obscure_facts(
) -> None:
    for criterion in load_criteria(None):
        text = " ".join(criterion.template.split()).lower()
        rule = re.search(r"do not let (.*?) influence", text)
        assert rule is not None, criterion.name
        for aspect in ("order", "length", "language"):
            assert aspect in rule.group(1), (criterion.name, aspect)
    facts = " ".join(load_criterion("facts_and_trivia").template.split()).lower()
    assert "specific" in facts and ("obscure" in facts or "little-known" in facts)
    # QuRating's template: "choose the text which contains more facts and trivia. Prefer
    # specific facts and obscure trivia over more common knowledge" -- both, not one of them
    assert "more facts and trivia" in facts and "common knowledge" in facts
    assert "do not count facts" not in facts


def test_a_failed_criterion_is_missing_only_for_that_pair_and_the_rater_masks_it(
        serve, tmp_path, test_criterion, tiny_model_dir) -> None:
    from acadlm_plugins.qurating.rater import (
        PairwiseJudgments,
        RaterTokenizer,
        bradley_terry_loss,
        read_judgments,
    )

    style = tmp_path / "prompts" / "style.txt"
    style.write_text("Style check.\n" + TEST_PROMPT)
    criteria = [*test_criterion, load_criterion(str(style))]

    def respond(request: dict[str, Any], number: int) -> Reply:
        prompt = request["body"]["messages"][0]["content"]
        if prompt.startswith("Style check.") and "ODD" in "".join(shown_texts(request)):
            return 200, chat_reply({"The": 0.7, "Text": 0.3}), {}, 0.0
        return quality_judge()(request, number)

    server = serve(respond)
    texts = [("GOOD one", "plain one"), ("ODD GOOD", "plain two"), ("plain", "GOOD three")]
    output = tmp_path / "judgments.jsonl"
    summary = judge_pairs(make_pairs(texts), criteria, http_judge(server), output)
    rows = read_jsonl_resumable(output)
    assert [row["pair_id"] for row in rows] == ["pair00", "pair01", "pair02"]
    assert rows[1]["judgments"]["style"] is None
    assert rows[1]["judgments"]["overall"] < 0.5  # A (GOOD) is preferred on the other criterion
    assert all(isinstance(row["judgments"]["style"], float) for row in (rows[0], rows[2]))
    rejected = read_jsonl_resumable(OutputFiles.for_judgments(output).rejected)
    assert {(r["pair_id"], r["criterion"]) for r in rejected} == {("pair01", "style")}
    assert summary["pairs_rejected"] == 0 and summary["pairs_with_missing_criteria"] == 1
    assert summary["per_criterion"]["style"]["missing"] == 1
    assert summary["per_criterion"]["style"]["judged"] == 2
    assert summary["per_criterion"]["overall"]["missing"] == 0
    before = len(server.requests)
    judge_pairs(make_pairs(texts), criteria, http_judge(server), output)
    assert len(server.requests) == before  # the pair is done, with one criterion missing

    # The rater reads the missing criterion as not judged and trains the pair on the other.
    names, judged = read_judgments(output)
    assert names == ["overall", "style"] and math.isnan(judged[1].p_b[1])
    data = PairwiseJudgments.build(names, judged, RaterTokenizer(tiny_model_dir), margin=0.1,
                                   validation_fraction=0.0, max_tokens=16)
    row = data.pair_ids.index("pair01")
    assert data.mask[row].tolist() == [True, False]
    batch = data.collate([row])
    s_a = torch.zeros(1, 2, requires_grad=True)
    s_b = torch.zeros(1, 2, requires_grad=True)
    bradley_terry_loss(s_a, s_b, batch["targets"], batch["mask"]).backward()
    assert s_b.grad is not None and s_b.grad[0, 1] == 0 and s_b.grad[0, 0] != 0
