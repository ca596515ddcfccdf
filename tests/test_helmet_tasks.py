"""HELMET-style tasks (json_kv, rag, rerank, icl, longqa, summ) and RULER's QA from local files.

Unit tests run lm-eval end to end on a tokenizer trained on the spot and small local files,
with ACADLM_HOME pointed at an empty folder, so they prove the tasks need neither the embedded
model nor the corpus when given data. Integration tests build the corpus-derived defaults with
the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import ConstantLM, OracleLM
from helmet_fixtures import (
    ReferenceLM,
    icl_rows,
    longqa_rows,
    summ_rows,
    write_jsonl,
    write_tokenizer_dir,
)
from lm_eval import simple_evaluate

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import helmet, task_manager
from acadlm_plugins.evaluation.lengths import load_length_tokenizer
from acadlm_plugins.evaluation.local_data import DEFAULT_QA_FILE, load_qa, load_rerank
from acadlm_plugins.evaluation.prompting import fit_prompt
from acadlm_plugins.evaluation.qa import ruler_qa_dataset
from acadlm_plugins.evaluation.scoring import ndcg_at_k, rouge_l

LENGTHS = [1024, 2048]
EXTRACTIVE = ["acadlm_json_kv", "acadlm_rag", "acadlm_ruler_qa", "acadlm_rerank", "acadlm_icl",
              "acadlm_longqa"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer folder and one local data file per task that has no shipped example."""
    root = tmp_path_factory.mktemp("helmet")
    return {"model": write_tokenizer_dir(root / "model"),
            "icl": write_jsonl(root / "icl.jsonl", icl_rows()),
            "longqa": write_jsonl(root / "longqa.jsonl", longqa_rows()),
            "summ": write_jsonl(root / "summ.jsonl", summ_rows())}


@pytest.fixture(scope="module")
def meta(files: dict[str, Path]) -> dict[str, Any]:
    return {"pretrained": str(files["model"]), "max_seq_lengths": LENGTHS, "num_samples": 3,
            "icl_path": str(files["icl"]), "longqa_path": str(files["longqa"]),
            "summ_path": str(files["summ"])}


@pytest.fixture
def no_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ACADLM_HOME at an empty folder: any use of the embedded corpus would fail."""
    monkeypatch.setenv("ACADLM_HOME", str(tmp_path / "empty_home"))


def _evaluate(model: Any, tasks: list[str], metadata: dict[str, Any], *,
              home: Path | None = None) -> dict[str, Any]:
    """lm-eval on ``tasks``; with ``home``, with ACADLM_HOME pointed there (an empty folder)."""
    with pytest.MonkeyPatch.context() as patch:
        if home is not None:
            patch.setenv("ACADLM_HOME", str(home))
        return simple_evaluate(model=model, tasks=tasks, log_samples=True, verbosity="ERROR",
                               task_manager=task_manager(metadata, include_defaults=False))


def _scores(results: dict[str, Any], task: str) -> dict[int, float]:
    return {length: results["results"][task][f"{length},none"] for length in LENGTHS}


@pytest.fixture(scope="module")
def oracle_run(meta: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    return _evaluate(OracleLM(), EXTRACTIVE, meta, home=files["model"].parent / "empty_home")


@pytest.fixture(scope="module")
def constant_run(meta: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    return _evaluate(ConstantLM(), EXTRACTIVE + ["acadlm_summ"], meta,
                     home=files["model"].parent / "empty_home")


@pytest.mark.parametrize("task", EXTRACTIVE)
def test_oracle_scores_100_and_constant_0(task: str, oracle_run: dict, constant_run: dict):
    assert _scores(oracle_run, task) == {1024: 100.0, 2048: 100.0}
    assert _scores(constant_run, task) == {1024: 0.0, 2048: 0.0}
    assert len(oracle_run["samples"][task]) == 3 * len(LENGTHS)


@pytest.mark.parametrize("task", EXTRACTIVE)
def test_prompts_fill_their_length_within_one_percent(task: str, oracle_run: dict,
                                                      meta: dict[str, Any]):
    tokenizer = load_length_tokenizer(meta, task=task)
    for sample in oracle_run["samples"][task]:
        doc = sample["doc"]
        measured = tokenizer.count(sample["arguments"][0][0])
        assert measured == doc["input_tokens"]
        assert 0.99 * doc["max_length"] <= measured <= doc["max_length"], (task, measured)


def test_summary_rouge_l_is_100_for_the_reference_and_low_for_a_constant(
        meta: dict[str, Any], constant_run: dict):
    perfect = _evaluate(ReferenceLM(), ["acadlm_summ"], meta, home=Path("/nonexistent"))
    assert _scores(perfect, "acadlm_summ") == {1024: 100.0, 2048: 100.0}
    assert max(_scores(constant_run, "acadlm_summ").values()) < 15.0
    for sample in perfect["samples"]["acadlm_summ"]:
        assert sample["doc"]["outputs"][0] not in sample["doc"]["input"]


def test_rouge_l_of_a_partial_summary():
    # 4 of 6 reference words in order, 4-word prediction: P = 1, R = 2/3, F1 = 0.8.
    assert rouge_l("weather sport cooking harbour", ["weather and sport and cooking harbour"]) \
        == pytest.approx(80.0)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_rag_puts_the_gold_passage_at_the_requested_depth(depth: float, meta: dict[str, Any],
                                                          no_corpus: None):
    dataset = helmet.rag_dataset("acadlm_rag", {**meta, "depth": depth, "max_seq_lengths":
                                                [2048]})["test"]
    for doc in dataset:
        assert doc["depth"] == depth
        assert doc["gold_position"] == round(depth * (doc["num_passages"] - 1))
        assert doc["num_passages"] > 10
        context = doc["input"][: doc["input"].rindex("Question:")]
        where = context.index(doc["gold_texts"][0]) / len(context)
        assert abs(where - depth) < 0.12, (depth, where)
        # The hard negatives of the question come first among the distractors.
        assert json.loads(doc["distractor_origins"])["hard_negative"] == 2


def test_rag_spreads_depths_over_samples_and_ruler_qa_draws_them(meta: dict[str, Any],
                                                                 no_corpus: None):
    settings = {**meta, "num_samples": 5, "max_seq_lengths": [1024]}
    rag = helmet.rag_dataset("acadlm_rag", settings)["test"]
    assert rag["depth"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    qa = ruler_qa_dataset("acadlm_ruler_qa", settings)["test"]
    assert len(set(qa["depth"])) == 5
    assert all("hard_negative" not in json.loads(o) for o in qa["distractor_origins"])


def test_json_kv_key_depth(meta: dict[str, Any]):
    dataset = helmet.json_kv_dataset("acadlm_json_kv", {**meta, "num_samples": 3})["test"]
    for doc in dataset:
        body = doc["input"][doc["input"].index("{"): doc["input"].rindex("}") + 1]
        pairs = list(json.loads(body).items())
        key = doc["input"].rsplit('Key: "', 1)[1].split('"', 1)[0]
        position = [k for k, _ in pairs].index(key)
        assert pairs[position][1] == doc["outputs"][0]
        assert position == doc["key_position"]
        assert abs(position / (len(pairs) - 1) - doc["depth"]) < 0.05


def test_datasets_are_reproducible_by_seed(meta: dict[str, Any], no_corpus: None):
    settings = {**meta, "max_seq_lengths": [1024], "num_samples": 2}
    for build in (helmet.rag_dataset, helmet.rerank_dataset, helmet.icl_dataset,
                  helmet.json_kv_dataset):
        first = build("t", settings)["test"]["input"]
        assert build("t", settings)["test"]["input"] == first
        assert build("t", {**settings, "seed": 7})["test"]["input"] != first


def test_rerank_rows_hold_every_judged_passage_and_the_gold_ranking(meta: dict[str, Any],
                                                                    no_corpus: None):
    dataset = helmet.rerank_dataset("acadlm_rerank", {**meta, "max_seq_lengths": [1024]})
    records = {r.id: r for r in load_rerank(
        helmet.DEFAULT_RERANK_FILE, task="t", key="rerank_path")}
    for doc in dataset["test"]:
        record = records[doc["query_id"]]
        for passage in record.passages:
            assert passage.text in doc["input"]
        assert doc["relevant_grades"] == sorted(doc["relevant_grades"], reverse=True)
        assert len(doc["relevant_ids"]) == sum(p.relevance > 0 for p in record.passages)
        assert helmet.process_results_ndcg(doc, [doc["oracle_answer"]]) == {"1024": 100.0}
        reverse = " > ".join(reversed(doc["relevant_ids"]))
        assert helmet.process_results_ndcg(doc, [reverse])["1024"] < 100.0


def test_ndcg_at_10_on_a_hand_computed_case():
    relevance = {"a": 3.0, "b": 2.0, "c": 1.0}
    # DCG of c, a, x, b: 1/log2(2) + 7/log2(3) + 0 + 3/log2(5) = 1 + 4.41650 + 1.29203
    # IDCG of a, b, c:   7/log2(2) + 3/log2(3) + 1/log2(4)     = 7 + 1.89279 + 0.5
    assert ndcg_at_k(["c", "a", "x", "b"], relevance) == pytest.approx(
        100 * 6.70853 / 9.39279, abs=1e-3)
    assert ndcg_at_k(["a", "b", "c"], relevance) == pytest.approx(100.0)
    assert ndcg_at_k([], relevance) == 0.0
    # Only the first 10 ids count: a relevant id at rank 11 adds nothing.
    assert ndcg_at_k([str(i) for i in range(10)] + ["a"], relevance) == 0.0
    doc = {"max_length": 2048, "relevant_ids": ["12345", "23456"], "relevant_grades": [2.0, 1.0],
           "passage_ids": ["12345", "23456", "34567"]}
    expected = 100 * (1 / math.log2(2) + 3 / math.log2(3)) / (3 + 1 / math.log2(3))
    assert helmet.process_results_ndcg(doc, ["Ranking: 23456 > 12345 > 99999"]) == {
        "2048": pytest.approx(expected)}


def test_icl_maps_labels_to_numbers_and_balances_demonstrations(meta: dict[str, Any]):
    dataset = helmet.icl_dataset("acadlm_icl", {**meta, "max_seq_lengths": [2048]})["test"]
    for doc in dataset:
        mapping = json.loads(doc["label_mapping"])
        assert sorted(mapping) == ["cooking", "sport", "weather"]
        assert sorted(mapping.values()) == ["0", "1", "2"]
        assert doc["outputs"] == [mapping[doc["label"]]]
        shown = json.loads(doc["demos_per_label"]).values()
        assert max(shown) - min(shown) <= 1 and doc["num_demos"] > 30
        assert not any(name in doc["input"] for name in ("weather\n", "label: sport"))
        query = doc["input"].rsplit("\n\n", 1)[1]
        assert doc["input"].count(query) == 1  # the query is never among the demonstrations


@pytest.mark.parametrize(("generation", "label"), [
    ("label: 2", "2"), (" 2\n", "2"), ("Label: 10.", "10"), ("The answer, label: 3", "3"),
    ("I do not know.", "i"), ("", "")])
def test_parse_label(generation: str, label: str):
    assert helmet.parse_label(generation) == label


def test_longqa_truncates_the_document_to_fit(meta: dict[str, Any]):
    dataset = helmet.longqa_dataset("acadlm_longqa", {**meta, "max_seq_lengths": [1024]})
    for doc in dataset["test"]:
        assert doc["input"].startswith(helmet.LONGQA_HEAD)
        assert doc["input"].endswith("Answer:")
        assert doc["outputs"][0] in doc["input"]


# ----------------------------------------------------------------------------------- errors


def _error(build: Any, metadata: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        build("acadlm_x", metadata)
    return str(caught.value)


@pytest.mark.parametrize(("build", "key"), [
    (helmet.rag_dataset, "rag_path"), (helmet.rerank_dataset, "rerank_path"),
    (helmet.icl_dataset, "icl_path"), (helmet.longqa_dataset, "longqa_path"),
    (helmet.summ_dataset, "summ_path")])
def test_missing_file_names_task_and_field(build: Any, key: str, meta: dict[str, Any],
                                           tmp_path: Path):
    message = _error(build, {**meta, key: str(tmp_path / "absent.jsonl")})
    assert f"`acadlm_x: {key}`" in message and "absent.jsonl does not exist" in message
    assert "Fix:" in message


@pytest.mark.parametrize(("rows", "where", "field"), [
    (['{"question": "q", "answers": ["a"], "gold": ["g"]}', "{not json"], 2, "not valid JSON"),
    ([{"question": "q", "answers": ["a"], "gold": ["g"]}, {"question": "q", "gold": ["g"]}], 2,
     "field `answers` is missing"),
    ([{"question": "q", "answers": [], "gold": ["g"]}], 1, "field `answers` must be"),
    ([{"question": "q", "answers": ["a"], "gold": [{"title": "t"}]}], 1,
     "field `gold[0].text` must be"),
    ([{"question": " ", "answers": ["a"], "gold": ["g"]}], 1, "field `question` must be"),
    (["[1, 2]"], 1, "is a JSON list, not an object"),
])
def test_malformed_qa_row_names_file_line_and_field(rows: list[Any], where: int, field: str,
                                                    meta: dict[str, Any], tmp_path: Path):
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    message = _error(helmet.rag_dataset, {**meta, "rag_path": str(path)})
    assert "`acadlm_x: rag_path`" in message
    assert f"{path}:{where}" in message and field in message


@pytest.mark.parametrize(("build", "key", "row", "field"), [
    (helmet.rerank_dataset, "rerank_path",
     {"query": "q", "passages": [{"text": "p", "relevance": "high"}]}, "passages[0].relevance"),
    (helmet.rerank_dataset, "rerank_path",
     {"query": "q", "passages": [{"text": "p", "relevance": 0}]}, "has no passage with relevance"),
    (helmet.icl_dataset, "icl_path", {"text": "t", "label": ["x"]}, "field `label`"),
    (helmet.icl_dataset, "icl_path", {"text": "t", "label": "x", "split": "dev"}, "field `split`"),
    (helmet.longqa_dataset, "longqa_path", {"document": "d", "question": "q", "answers": 3},
     "field `answers`"),
    (helmet.summ_dataset, "summ_path", {"document": "d"}, "field `summary` is missing"),
])
def test_malformed_rows_of_each_schema(build: Any, key: str, row: dict, field: str,
                                       meta: dict[str, Any], tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    message = _error(build, {**meta, key: str(path)})
    assert f"`acadlm_x: {key}`" in message and f"{path}:1" in message and field in message


def test_icl_needs_two_labels(meta: dict[str, Any], tmp_path: Path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": "t", "label": "x"}] * 3)
    assert "at least 2" in _error(helmet.icl_dataset, {**meta, "icl_path": str(path)})


def test_length_over_the_model_maximum_is_refused(meta: dict[str, Any]):
    message = _error(helmet.json_kv_dataset, {**meta, "max_seq_lengths": [16384]})
    assert "`acadlm_x: max_seq_lengths`" in message and "8192" in message


def test_too_little_data_for_the_length_names_the_field(meta: dict[str, Any], tmp_path: Path):
    short = write_jsonl(tmp_path / "short.jsonl", longqa_rows(count=1, words=80))
    assert "no document is long enough" in _error(
        helmet.longqa_dataset, {**meta, "longqa_path": str(short)})
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [
        {"question": "q?", "answers": ["a"], "gold": ["a is the answer."]},
        {"question": "r?", "answers": ["b"], "gold": ["b is the answer."]}])
    extra = tmp_path / "extra.txt"
    extra.write_text("Only a few words of extra text here.\n" * 5)
    message = _error(helmet.rag_dataset, {**meta, "rag_path": str(tiny),
                                          "distractor_path": str(extra)})
    assert "`acadlm_x: rag_path`" in message and "distractor_path" in message


def test_depth_out_of_range_is_refused(meta: dict[str, Any]):
    assert "`acadlm_x: depth`" in _error(helmet.json_kv_dataset, {**meta, "depth": 1.5})


def test_shipped_examples_are_valid():
    records = load_qa(DEFAULT_QA_FILE, task="t", key="qa_path")
    assert len(records) >= 30
    for record in records:
        gold = " ".join(p.text for p in record.gold).lower()
        assert any(answer.lower() in gold for answer in record.answers), record.id
        assert record.distractors
    ranked = load_rerank(helmet.DEFAULT_RERANK_FILE, task="t", key="rerank_path")
    assert len(ranked) >= 20
    assert all(len({p.relevance for p in r.passages}) >= 3 for r in ranked)


@pytest.mark.parametrize("target", [300, 1024, 1500, 4000])
def test_interpolated_fit_finds_what_binary_search_finds(target: int, meta: dict[str, Any]):
    tokenizer = load_length_tokenizer(meta, task="t")
    rows = longqa_rows(count=1, words=2000)
    pieces = helmet.pieces_of(rows[0]["document"])

    def render(units: int) -> str:
        return "Read this.\n" + "".join(pieces[:units]) + "\nDone?"

    fast = helmet.fit_units(render, tokenizer, target, max_units=len(pieces), task="t", key="k")
    slow = fit_prompt(render, tokenizer, target, max_units=len(pieces), task="t")
    assert (fast.num_words, fast.num_tokens, fast.text) == (slow.num_words, slow.num_tokens,
                                                            slow.text)
    assert "".join(pieces) == rows[0]["document"]


def test_fit_units_errors_name_the_field(meta: dict[str, Any]):
    tokenizer = load_length_tokenizer(meta, task="t")
    with pytest.raises(ConfigError, match="`t: my_path`: the filler ran out"):
        helmet.fit_units(lambda n: "word " * n, tokenizer, 1024, max_units=10, task="t",
                         key="my_path")
    with pytest.raises(ConfigError, match="`t: max_seq_lengths`"):
        helmet.fit_units(lambda n: "word " * (2000 + n), tokenizer, 1024, max_units=10,
                         task="t", key="my_path")


def test_take_counts():
    assert helmet.take_counts([3, 4, 5], 0) == []
    assert helmet.take_counts([3, 4, 5], 5) == [3, 2]
    assert helmet.take_counts([3, 4, 5], 99) == [3, 4, 5]


# ------------------------------------------------------------------------------ integration

def default_settings(**overrides: Any) -> dict[str, Any]:
    """Task metadata on the embedded default, found where ``$ACADLM_HOME`` says (never a literal
    home path: a user who sets ``ACADLM_HOME`` has nothing in the default home)."""
    from acadlm_plugins.defaults.paths import require_default_corpus, require_default_model

    require_default_corpus()
    return {"pretrained": str(require_default_model()), "max_seq_lengths": LENGTHS,
            "num_samples": 2, **overrides}


@pytest.fixture(scope="module")
def default_runs() -> dict[str, dict[str, Any]]:
    settings = default_settings()
    tasks = ["acadlm_icl", "acadlm_longqa", "acadlm_summ", "acadlm_rag", "acadlm_rerank"]
    return {"oracle": _evaluate(OracleLM(), tasks, settings),
            "constant": _evaluate(ConstantLM(), tasks, settings),
            "reference": _evaluate(ReferenceLM(), ["acadlm_summ"], settings)}


@pytest.mark.integration
@pytest.mark.parametrize("task", ["acadlm_icl", "acadlm_longqa", "acadlm_rag", "acadlm_rerank"])
def test_corpus_defaults_oracle_100_constant_0(task: str, default_runs: dict):
    assert _scores(default_runs["oracle"], task) == {1024: 100.0, 2048: 100.0}
    assert _scores(default_runs["constant"], task) == {1024: 0.0, 2048: 0.0}
    for sample in default_runs["oracle"]["samples"][task]:
        doc = sample["doc"]
        assert 0.99 * doc["max_length"] <= doc["input_tokens"] <= doc["max_length"]


@pytest.mark.integration
def test_stdlib_summaries_default(default_runs: dict):
    assert _scores(default_runs["reference"], "acadlm_summ") == {1024: 100.0, 2048: 100.0}
    assert max(_scores(default_runs["constant"], "acadlm_summ").values()) < 15.0
    for sample in default_runs["reference"]["samples"]["acadlm_summ"]:
        doc = sample["doc"]
        assert doc["outputs"][0] not in " ".join(doc["input"].split())
        assert 0.99 * doc["max_length"] <= doc["input_tokens"] <= doc["max_length"]


@pytest.mark.integration
def test_play_questions_quote_a_line_whose_speech_is_in_the_window(default_runs: dict):
    for sample in default_runs["oracle"]["samples"]["acadlm_longqa"]:
        doc = sample["doc"]
        line = doc["question"].split('"')[1]
        text = doc["input"]
        assert text.count(line) == 2  # once in the excerpt, once in the question
        # The last speaker named before the line is the answer.
        assert helmet.SPEAKER_TAG.findall(text[: text.index(line) + 1])[-1] == doc["outputs"][0]


@pytest.mark.integration
def test_corpus_icl_queries_come_from_validation_and_cover_the_domains(default_runs: dict):
    docs = [s["doc"] for s in default_runs["oracle"]["samples"]["acadlm_icl"]]
    assert {doc["label"] for doc in docs} <= set(helmet.CORPUS_DOMAINS)
    assert all(json.loads(doc["demos_per_label"]).keys() == set(helmet.CORPUS_DOMAINS)
               for doc in docs)


@pytest.mark.integration
def test_corpus_defaults_follow_a_relocated_acadlm_home(relocated_acadlm_home: Path):
    """Issue 17: with ``ACADLM_HOME`` elsewhere (and nothing in the default home under ``~``), the
    corpus-derived tasks find the embedded model and corpus in the new home."""
    from acadlm_plugins.defaults.paths import default_model_dir

    settings = default_settings(max_seq_lengths=[1024], num_samples=1)
    assert settings["pretrained"] == str(default_model_dir(relocated_acadlm_home))
    dataset = helmet.icl_dataset("acadlm_icl", settings)["test"]
    assert len(dataset) == 1 and dataset[0]["label"] in helmet.CORPUS_DOMAINS
