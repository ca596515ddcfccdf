"""HELMET-style tasks (json_kv, rag, rerank, cite, icl, the long-document stand-ins and
HELMET's own long-document datasets) from local files: their prompts, sizes, demonstrations,
metrics and category groups.

Unit tests run lm-eval end to end on a tokenizer trained on the spot and small local files (a
tiny stand-in for ALCE's data included), with ACADLM_HOME pointed at an empty folder, so they
prove the tasks need neither the embedded model nor the corpus when given data. Integration
tests build the corpus-derived defaults with the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest
from eval_doubles import ConstantLM, OracleLM
from helmet_fixtures import (
    ReferenceLM,
    alce_prompt_file,
    asqa_items,
    choice_rows,
    distractor_text,
    icl_rows,
    longqa_rows,
    qampari_items,
    summ_rows,
    write_json,
    write_jsonl,
    write_tiny_nli_model,
    write_tokenizer_dir,
)
from lm_eval import simple_evaluate

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import helmet, task_manager
from acadlm_plugins.evaluation.lengths import load_length_tokenizer
from acadlm_plugins.evaluation.local_data import DEFAULT_QA_FILE, Passage, load_qa, load_rerank
from acadlm_plugins.evaluation.prompting import fit_prompt
from acadlm_plugins.evaluation.report import length_table
from acadlm_plugins.evaluation.scoring import (
    asqa_string_em,
    citation_scores,
    ndcg_at_k,
    normalize_answer,
    qampari_scores,
    rouge_l,
    rouge_measures,
)

#: Lengths of the unit runs: two demonstrations take a few hundred tokens of our small test
#: tokenizer, so the prompts start at 2K (HELMET's shortest is 8K).
LENGTHS = [2048, 4096]
#: Lengths of the integration runs with the embedded SmolLM2 tokenizer.
DEFAULT_LENGTHS = [1024, 2048]
RUN = ["acadlm_helmet", "acadlm_helmet_cite", "acadlm_helmet_longqa", "acadlm_helmet_summ"]
#: HELMET's runs of RULER's recall tasks (configs/recall.yaml).
HELMET_NEEDLES = ["acadlm_helmet_niah_multikey_2", "acadlm_helmet_niah_multikey_3",
                  "acadlm_helmet_niah_multivalue"]
EXTRACTIVE = ["acadlm_json_kv", *HELMET_NEEDLES, "acadlm_rag", "acadlm_rerank", "acadlm_icl",
              "acadlm_longqa", "acadlm_cite_asqa", "acadlm_cite_qampari",
              "acadlm_narrativeqa", "acadlm_infbench_qa", "acadlm_infbench_choice"]
#: Tasks whose prompts fill their budget (re-ranking has a passage count per length instead).
FILLED = [task for task in EXTRACTIVE if task != "acadlm_rerank"] + [
    "acadlm_summ", "acadlm_infbench_sum", "acadlm_multi_lexsum"]
CATEGORIES = {"acadlm_helmet_recall": ["acadlm_json_kv", *HELMET_NEEDLES],
              "acadlm_helmet_rag": ["acadlm_rag"],
              "acadlm_helmet_rerank": ["acadlm_rerank"], "acadlm_helmet_icl": ["acadlm_icl"],
              "acadlm_helmet_longqa": ["acadlm_narrativeqa", "acadlm_infbench_qa",
                                       "acadlm_infbench_choice"],
              "acadlm_helmet_summ": ["acadlm_infbench_sum", "acadlm_multi_lexsum"],
              "acadlm_helmet_cite": ["acadlm_cite_asqa", "acadlm_cite_qampari"]}
#: HELMET's tokens to generate, which the budget keeps free (the YAMLs' max_gen_toks).
GENERATED = {"acadlm_json_kv": 100, "acadlm_helmet_niah_multikey_2": 50,
             "acadlm_helmet_niah_multikey_3": 100, "acadlm_helmet_niah_multivalue": 50,
             "acadlm_rag": 20, "acadlm_rerank": 200, "acadlm_icl": 20,
             "acadlm_longqa": 32, "acadlm_summ": 200, "acadlm_cite_asqa": 300,
             "acadlm_cite_qampari": 300, "acadlm_narrativeqa": 100, "acadlm_infbench_qa": 10,
             "acadlm_infbench_choice": 10, "acadlm_infbench_sum": 1200,
             "acadlm_multi_lexsum": 400}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tokenizer folder and one local data file per task that has no shipped example."""
    root = tmp_path_factory.mktemp("helmet")
    return {"model": write_tokenizer_dir(root / "model"),
            "icl": write_jsonl(root / "icl.jsonl", icl_rows()),
            "longqa": write_jsonl(root / "longqa.jsonl", longqa_rows(words=5000)),
            "summ": write_jsonl(root / "summ.jsonl", summ_rows(words=5000)),
            "asqa": write_json(root / "asqa_eval.json", asqa_items()),
            "qampari": write_json(root / "qampari_eval.json", qampari_items()),
            "extra": distractor_text(root / "extra.txt"),
            "choice": write_jsonl(root / "choice.jsonl", choice_rows(words=5000)),
            "short_summ": write_jsonl(root / "short_summ.jsonl", summ_rows(count=6, words=1500))}


@pytest.fixture(scope="module")
def meta(files: dict[str, Path]) -> dict[str, Any]:
    return {"pretrained": str(files["model"]), "max_seq_lengths": LENGTHS, "num_samples": 3,
            "icl_path": str(files["icl"]), "longqa_path": str(files["longqa"]),
            "summ_path": str(files["summ"]), "asqa_path": str(files["asqa"]),
            "qampari_path": str(files["qampari"]), "distractor_path": str(files["extra"]),
            "narrativeqa_path": str(files["longqa"]), "infbench_qa_path": str(files["longqa"]),
            "infbench_choice_path": str(files["choice"]),
            "infbench_sum_path": str(files["short_summ"]),
            "multi_lexsum_path": str(files["summ"]),
            "haystack_path": str(files["extra"])}  # MV's prose haystack (no corpus here)


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


def _scores(results: dict[str, Any], task: str,
            lengths: list[int] = LENGTHS) -> dict[int, float]:
    return {length: results["results"][task][f"{length},none"] for length in lengths}


def _each(value: float, lengths: list[int] = LENGTHS) -> dict[int, float]:
    return {length: value for length in lengths}


@pytest.fixture(scope="module")
def oracle_run(meta: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    return _evaluate(OracleLM(), RUN, meta, home=files["model"].parent / "empty_home")


@pytest.fixture(scope="module")
def constant_run(meta: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    return _evaluate(ConstantLM(), RUN, meta, home=files["model"].parent / "empty_home")


@pytest.mark.parametrize("task", EXTRACTIVE)
def test_oracle_scores_100_and_constant_0(task: str, oracle_run: dict, constant_run: dict):
    assert _scores(oracle_run, task) == _each(100.0)
    assert _scores(constant_run, task) == _each(0.0)
    assert len(oracle_run["samples"][task]) == 3 * len(LENGTHS)


@pytest.mark.parametrize("task", FILLED)
def test_prompt_and_generation_fill_their_length_within_one_percent(
        task: str, oracle_run: dict, meta: dict[str, Any]):
    """HELMET's budget: the prompt and the tokens to generate fit the length (the tiny tokenizer
    adds no special tokens), the prompt filling 99% of the rest. Without a chat template the
    model reads the input, then HELMET's answer prefix on a line of its own."""
    tokenizer = load_length_tokenizer(meta, task=task)
    for sample in oracle_run["samples"][task]:
        doc, prompt = sample["doc"], sample["arguments"][0][0]
        assert doc["tokens_to_generate"] == GENERATED[task]
        assert doc["budget_tokens"] == doc["max_length"] - GENERATED[task]
        assert tokenizer.count(prompt) == doc["input_tokens"]
        room = 0.01 * doc["budget_tokens"]
        if task.startswith("acadlm_cite") and doc["num_passages"] == doc["num_retrieved"]:
            # The question's own retrieved passages keep their order: the prompt may stop
            # short of the next one's header.
            room = 30
        assert doc["budget_tokens"] - room <= doc["input_tokens"] <= doc["budget_tokens"], task
        assert prompt == doc["input"] + doc["gen_prefix"] and doc["gen_prefix"]
        assert doc["input"].endswith("\n") and not doc["chat_template"]


@pytest.mark.parametrize("task", ["acadlm_summ", "acadlm_infbench_sum", "acadlm_multi_lexsum"])
def test_summary_rouge_is_100_for_the_reference_and_low_for_a_constant(
        task: str, meta: dict[str, Any], constant_run: dict):
    perfect = _evaluate(ReferenceLM(), [task], meta, home=Path("/nonexistent"))
    assert max(_scores(constant_run, task).values()) < 15.0
    for sample in perfect["samples"][task]:
        assert sample["doc"]["outputs"][0] not in sample["doc"]["input"]
    if task != "acadlm_infbench_sum":
        assert _scores(perfect, task) == _each(100.0)
    else:
        # HELMET puts its prefix back in front of a plain-text generation and reads En.Sum's
        # answer line after "Answer:", so "Summary:" counts against a perfect summary.
        expected = [rouge_measures("Summary:" + s["doc"]["outputs"][0], s["doc"]["outputs"])
                    ["rougeLsum_f1"] for s in perfect["samples"][task]]
        assert _scores(perfect, task) == pytest.approx(_each(sum(expected) / len(expected)))
        assert 90.0 < min(expected) < 100.0
    if task != "acadlm_summ":  # HELMET's: ROUGE-Lsum stands for the task without a judge
        assert all(perfect["results"][task][f"{n}_rougeLsum_f1,none"]
                   == perfect["results"][task][f"{n},none"] for n in LENGTHS)


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
        text = doc["input"]
        end = text.rindex("\n\nQuestion:")
        start = text.index("\n\n", text.rindex("\nAnswer: ", 0, end)) + 2  # after the demos
        context = text[start:end]
        assert context.startswith("Document (Title: ")
        where = context.index(doc["gold_texts"][0]) / len(context)
        assert abs(where - depth) < 0.12, (depth, where)
        # The hard negatives of the question come first among the distractors.
        assert json.loads(doc["distractor_origins"])["hard_negative"] == 2


def _rag_rows(titled: bool) -> list[dict[str, Any]]:
    """Two questions, each with 60 hard negatives of 27 words listed in retrieval order (their
    number in the text, and in the title when ``titled``): more than a 2K prompt holds."""
    rows = []
    for name in ("alpha", "beta"):
        negatives = []
        for i in range(60):
            text = f"{name} negative {i}: " + "the old mill stands by the river " * 3
            negatives.append({"title": f"{name} {i}", "text": text} if titled else text)
        gold = {"title": f"{name} key", "text": f"The {name} key is kept by Zorblat."}
        rows.append({"id": name, "question": f"Who keeps the {name} key?", "answers": ["Zorblat"],
                     "gold": [gold if titled else gold["text"]], "distractors": negatives})
    return rows


def test_rag_shows_the_hard_negatives_in_file_order_with_the_gold_passage_inserted(
        tmp_path: Path, meta: dict[str, Any], no_corpus: None):
    """HELMET's prompt holds the top-retrieved passages in retrieval order, the gold passage
    inserted at a depth: the question's first hard negatives, in the file's order, never a
    random draw of them."""
    path = write_jsonl(tmp_path / "rag.jsonl", _rag_rows(titled=True))
    settings = {**meta, "rag_path": str(path), "num_shots": 0, "num_samples": 2,
                "max_seq_lengths": [2048], "depth": 0.5}
    for doc in helmet.rag_dataset("acadlm_rag", settings)["test"]:
        name = doc["question_id"]
        shown = re.findall(rf"Document \(Title: {name} (\w+)\): ", doc["input"])
        gold = shown.index("key")
        negatives = [int(i) for i in shown[:gold] + shown[gold + 1:]]
        assert len(negatives) > 10
        assert negatives == list(range(len(negatives)))  # the first k, in the file's order
        assert gold == doc["gold_position"] == round(0.5 * len(negatives))
        assert json.loads(doc["distractor_origins"]) == {"hard_negative": len(negatives)}


def test_passages_follow_helmets_templates_with_and_without_a_title(
        tmp_path: Path, meta: dict[str, Any], no_corpus: None):
    """HELMET's RAG passage is `Document (Title: t): text`, with no number; a passage without a
    title has no title clause (`Document: text`, as HELMET's MS MARCO re-ranking passages
    `[ID: n] Document: text`), never an invented `untitled`."""
    settings = {**meta, "num_shots": 0, "num_samples": 2, "max_seq_lengths": [2048]}
    titled = write_jsonl(tmp_path / "titled.jsonl", _rag_rows(titled=True))
    for doc in helmet.rag_dataset("acadlm_rag", {**settings, "rag_path": str(titled)})["test"]:
        assert "Document [" not in doc["input"]
        assert f"Document (Title: {doc['question_id']} 0): {doc['question_id']} negative 0:" \
            in doc["input"]
    untitled = write_jsonl(tmp_path / "untitled.jsonl", _rag_rows(titled=False))
    for doc in helmet.rag_dataset("acadlm_rag", {**settings, "rag_path": str(untitled)})["test"]:
        name = doc["question_id"]
        assert f"\n\nDocument: {name} negative 0: " in doc["input"]
        assert f"Document: The {name} key is kept by Zorblat." in doc["input"]
        assert "untitled" not in doc["input"] and "Title:" not in doc["input"]
    rerank = write_jsonl(tmp_path / "rerank.jsonl", [
        {"id": name, "query": f"which notes mention {name}?", "passages": [
            {"text": f"{name} note {i}.", "relevance": i % 2} for i in range(8)]}
        for name in ("gamma", "delta")])
    for doc in helmet.rerank_dataset("acadlm_rerank", {**settings,
                                                       "rerank_path": str(rerank)})["test"]:
        assert len(re.findall(r"\[ID: \d+\] Document: \w+ note \d\.", doc["input"])) == 7
        assert "untitled" not in doc["input"] and "Title:" not in doc["input"]
    # ALCE's numbered passages likewise.
    assert helmet.ALCE_LAYOUT.documents([Passage("A text.", "A"), Passage("B text.")]) == (
        "Document [1](Title: A): A text.\n\nDocument [2]: B text.")


def test_leading_words_keeps_the_white_space_as_written():
    text = "Ada  Quill\tbuilt\nthe mill. "
    assert helmet.leading_words(text, 2) == "Ada  Quill"
    assert helmet.leading_words(text, 5) == helmet.leading_words(text, 9) == text
    assert helmet.leading_words(text, 0) == ""


def test_alce_items_are_shown_as_their_file_writes_them(tmp_path: Path, meta: dict[str, Any],
                                                        no_corpus: None):
    """HELMET's load_alce formats the question and every passage's title and text as ALCE's
    file writes them; ours collapsed their white space (the prompt file's demonstrations were
    already verbatim). Now the question's block is HELMET's, byte for byte."""
    items = asqa_items(count=4)
    for item in items:
        item["question"] = item["question"].replace("keeper of", "keeper\tof")
        for passage in item["docs"]:
            passage["text"] = passage["text"].replace(". ", ".  ", 1) + "\n"
            passage["title"] += " "
    path = write_json(tmp_path / "asqa.json", items)
    by_id = {item["sample_id"]: item for item in items}
    settings = {**meta, "num_shots": 0, "num_samples": 2, "max_seq_lengths": [4096],
                "asqa_path": str(path)}
    for doc in _asqa("acadlm_cite_asqa", settings)["test"]:
        item = by_id[doc["question_id"]]
        block = "\n\n".join(f"Document [{i + 1}](Title: {d['title']}): {d['text']}"
                             for i, d in enumerate(item["docs"]))
        assert f"Question: {item['question']}\n\n{block}\n\n" in doc["input"]
        assert doc["question"] == item["question"]


def test_rag_spreads_depths_over_samples(meta: dict[str, Any], no_corpus: None):
    settings = {**meta, "num_samples": 5, "max_seq_lengths": [2048]}
    rag = helmet.rag_dataset("acadlm_rag", settings)["test"]
    assert rag["depth"] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_limit_warns_that_rag_reaches_only_the_shallowest_gold_passages(
        meta: dict[str, Any], no_corpus: None, caplog: pytest.LogCaptureFixture):
    """lm-eval's ``limit`` takes the first rows, the first samples of each length: with
    depths spread over the samples, the shallowest gold passages."""
    from lm_eval import simple_evaluate

    settings = {**meta, "num_samples": 5}
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins.evaluation.task_base"):
        simple_evaluate(model=OracleLM(), tasks=["acadlm_rag"], limit=6,
                        task_manager=task_manager(settings, include_defaults=False))
    assert ("acadlm_rag: limit=6 evaluates only the first 6 of its 10 rows" in caplog.text
            and "(3 at 2048, 3 at 4096)" in caplog.text
            and "depths 0.00-0.50 of the context, of the 0.00-1.00" in caplog.text)


def test_generation_stops_where_helmets_runs_stop(oracle_run: dict[str, Any]):
    """HELMET's configs set `stop_new_line` for RAG, re-ranking and ICL, but its argument parser
    reads `--stop_newline`, so its runs never stop at a line break: neither do ours for RAG and
    re-ranking (whose scoring reads past it); ICL stops there, as its score reads only the first
    line. JSON KV and cite: no stop string either."""
    until = {task: oracle_run["configs"][task]["generation_kwargs"]["until"]
             for task in ("acadlm_json_kv", "acadlm_rag", "acadlm_rerank", "acadlm_icl",
                          "acadlm_cite_asqa", "acadlm_cite_qampari")}
    assert until == {"acadlm_json_kv": [], "acadlm_rag": [], "acadlm_rerank": [],
                     "acadlm_icl": ["\n"], "acadlm_cite_asqa": [], "acadlm_cite_qampari": []}


@pytest.mark.parametrize("output, ranking", [
    ("[3] > [7] > [1]", ["3", "7", "1"]),
    ("\nRanking: [3] > [7] > [1]\n[9] > [2]", ["3", "7", "1"]),   # past a line break, longest
    ("ID: 4 > ID: 4 > ID: 12 and then 5", ["4", "12"]),            # "ID:" dropped, first kept
    ("[3] > [7]\n> [1] > [2]", ["3", "7", "1", "2"]),            # a chain may wrap a line
    ("[3] > [7]. Then [1] > [2] > [5]", ["1", "2", "5"]),          # the longer chain wins
    ("no ranking here", []),
])
def test_a_ranking_is_read_as_helmets_parse_rankings(output: str, ranking: list[str]):
    """HELMET's ``parse_rankings``: brackets, colons and "id" dropped, the longest ">" chain
    anywhere in the output, each id once; a bare number outside the chain is not read."""
    assert helmet.parse_ranking(output) == ranking


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
        # HELMET's layout: the prompt opens with the object; the instruction only follows it.
        assert doc["input"].startswith("{\n")
        assert "Reply with the value" in doc["input"][doc["input"].rindex("}"):]


def _asqa(task: str, metadata: dict[str, Any]) -> dict[str, Any]:
    return helmet.cite_dataset(task, helmet.ASQA, metadata)


def _qampari(task: str, metadata: dict[str, Any]) -> dict[str, Any]:
    return helmet.cite_dataset(task, helmet.QAMPARI, metadata)


def test_datasets_are_reproducible_by_seed(meta: dict[str, Any], no_corpus: None):
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2}
    for build in (helmet.rag_dataset, helmet.rerank_dataset, helmet.icl_dataset,
                  helmet.json_kv_dataset, helmet.longqa_dataset, _asqa):
        first = build("t", settings)["test"]["input"]
        assert build("t", settings)["test"]["input"] == first
        assert build("t", {**settings, "seed": 7})["test"]["input"] != first


def _asked(row: dict[str, Any]) -> str:
    """What a row asks about: its question, query or document id; for ICL the text to label."""
    for key in ("question_id", "query_id", "document_id"):
        if key in row:
            return row[key]
    return row["input"].rsplit("\n\n", 1)[1]


def _asked_by_length(rows: list[dict[str, Any]]) -> dict[int, list[str]]:
    asked: dict[int, list[str]] = {}
    for row in rows:
        asked.setdefault(row["max_length"], []).append(_asked(row))
    return asked


@pytest.mark.parametrize("build", [helmet.rag_dataset, helmet.rerank_dataset, helmet.icl_dataset,
                                   helmet.longqa_dataset, helmet.summ_dataset, _asqa, _qampari],
                         ids=["rag", "rerank", "icl", "longqa", "summ", "asqa", "qampari"])
def test_every_length_asks_the_same_items(build: Any, meta: dict[str, Any], no_corpus: None):
    """HELMET runs one shuffled subset (``shuffle(seed).select(n)``) at every length, so that a
    score's change with the length is not a change of questions: sample i asks the same item
    at every length (the distractors and filler still differ)."""
    for seed in (1234, 7):
        rows = build("acadlm_task", {**meta, "num_samples": 3, "seed": seed})["test"].to_list()
        asked = _asked_by_length(rows)
        assert sorted(asked) == LENGTHS
        assert asked[LENGTHS[0]] == asked[LENGTHS[1]], asked
        inputs = {row["max_length"]: row["input"] for row in rows if row["index"] == 0}
        assert inputs[LENGTHS[0]] != inputs[LENGTHS[1]]


def test_long_documents_too_short_for_a_length_leave_nested_sets(meta: dict[str, Any],
                                                                 tmp_path: Path,
                                                                 no_corpus: None):
    """Where only long-enough documents can be asked about, the one order shared by the lengths
    is filtered per length: a longer length asks about those of the shorter length's documents
    that fill it, in the same order, and takes none that the shorter one skipped."""
    rows = [{**row, "id": f"report{i}"} for i, row in enumerate(
        summ_rows(count=4, words=1700, seed=3) + summ_rows(count=4, words=5000, seed=4))]
    path = write_jsonl(tmp_path / "summ.jsonl", rows)
    built = helmet.summ_dataset("acadlm_summ", {**meta, "summ_path": str(path), "num_shots": 0,
                                                "num_samples": 8})["test"].to_list()
    asked = _asked_by_length(built)
    short, long = asked[LENGTHS[0]], asked[LENGTHS[1]]
    fitting = list(dict.fromkeys(long))  # the 4 long documents, then the same again
    assert len(set(short)) == 8 and len(fitting) == 4 and long == fitting * 2
    assert fitting == [doc for doc in short if doc in fitting]


def test_rerank_rows_hold_every_judged_passage_and_the_gold_ranking(meta: dict[str, Any],
                                                                    no_corpus: None):
    dataset = helmet.rerank_dataset("acadlm_rerank", {**meta, "max_seq_lengths": [2048]})
    records = {r.id: r for r in load_rerank(
        helmet.DEFAULT_RERANK_FILE, task="t", key="rerank_path")}
    for doc in dataset["test"]:
        record = records[doc["query_id"]]
        # 7 passages at 2K (HELMET's 14 at 4K, in proportion): the query's 4, then 3 fillers.
        assert doc["num_passages"] == doc["num_shown"] == len(doc["passage_ids"]) == 7
        # The query comes once, after the passages (HELMET's template).
        query = f"\n\nQuery: {record.query}\n"
        assert doc["input"].endswith(query) and doc["input"].count(record.query) == 1
        last_demo = doc["input"].rindex("\nRanking: ")
        assert doc["input"][last_demo:].count("[ID: ") == 7
        for passage in record.passages:
            assert passage.text in doc["input"]
        assert doc["relevant_grades"] == sorted(doc["relevant_grades"], reverse=True)
        assert len(doc["relevant_ids"]) == sum(p.relevance > 0 for p in record.passages)
        assert helmet.process_results_ndcg(doc, [doc["oracle_answer"]]) == {"2048": 100.0}
        reverse = " > ".join(reversed(doc["relevant_ids"]))
        assert helmet.process_results_ndcg(doc, [reverse])["2048"] < 100.0


def test_rerank_query_comes_once_after_the_passages_as_helmets_template(
        tmp_path: Path, meta: dict[str, Any], no_corpus: None):
    """HELMET's re-ranking prompt: instruction, demonstrations, passages, then `Query: ...`;
    the query is not shown before the passages too."""
    path = write_jsonl(tmp_path / "rerank.jsonl", [
        _ranked(name, [1, 0, 2, 0, 3, 0, 1]) for name in ("gamma", "delta")])
    settings = {**meta, "rerank_path": str(path), "num_shots": 0, "num_samples": 2,
                "max_seq_lengths": [2048]}
    for doc in helmet.rerank_dataset("acadlm_rerank", settings)["test"]:
        text = doc["input"]
        query = f"which notes mention {doc['query_id']}?"
        assert text.count(query) == 1 and text.count("Query:") == 1
        assert text.index("[ID: ") < text.index(f"Query: {query}")
        assert text.endswith(f"\n\nQuery: {query}\n")


def test_rerank_passage_count_follows_helmets_files_per_length():
    """HELMET's MS MARCO files hold 14, 50, 130, 285, 600, 1000 passages per query at 4K-128K;
    other lengths interpolate, or scale in proportion outside that range."""
    assert [helmet.rerank_passage_count(2 ** k * 4096) for k in range(6)] == [
        14, 50, 130, 285, 600, 1000]
    assert helmet.rerank_passage_count(6144) == 32           # halfway between 14 and 50
    assert helmet.rerank_passage_count(2048) == 7
    assert helmet.rerank_passage_count(256) == 2             # never fewer than two
    assert helmet.rerank_passage_count(262144) == 2000


def _ranked(query: str, grades: list[float], words: int = 30) -> dict[str, Any]:
    return {"id": query, "query": f"which notes mention {query}?", "passages": [
        {"title": f"{query} {i}", "relevance": grade,
         "text": f"{query} note {i}: " + " ".join(f"{query}word{j}" for j in range(words))}
        for i, grade in enumerate(grades)]}


def test_rerank_shows_the_first_passages_of_the_query_in_file_order(tmp_path: Path,
                                                                    meta: dict[str, Any],
                                                                    no_corpus: None):
    """Not all judged passages: the query's first k (retrieval order), and its most relevant
    passage in the last place when none of those is relevant."""
    path = write_jsonl(tmp_path / "rerank.jsonl", [
        _ranked("alpha", [0, 1, 0, 2, 0, 0, 3, 0, 1, 0, 0, 2]),
        _ranked("beta", [0] * 10 + [2, 3])])
    settings = {**meta, "rerank_path": str(path), "num_shots": 0, "num_samples": 2,
                "max_seq_lengths": [2048]}
    for doc in helmet.rerank_dataset("acadlm_rerank", settings)["test"]:
        assert doc["num_passages"] == doc["num_shown"] == 7
        shown = re.findall(r"Document \(Title: (\w+) (\d+)\)", doc["input"])
        indices = sorted(int(i) for _, i in shown)
        if doc["query_id"] == "alpha":
            assert indices == list(range(7))                 # grades 0 1 0 2 0 0 3
            assert doc["relevant_grades"] == [3.0, 2.0, 1.0]
        else:
            assert indices == [0, 1, 2, 3, 4, 5, 11]         # the grade-3 passage swapped in
            assert doc["relevant_grades"] == [3.0]
        assert len(doc["passage_ids"]) == 7


def test_rerank_passages_that_overflow_are_cut_at_the_end_and_still_scored(
        tmp_path: Path, meta: dict[str, Any], no_corpus: None):
    """Seven passages of 400 words overflow 2K: the prompt is cut at its end, as HELMET
    truncates the context, and the ideal ranking still counts every passage's grade."""
    path = write_jsonl(tmp_path / "long.jsonl", [
        _ranked(name, [1, 0, 2, 0, 3, 0, 1], words=400) for name in ("gamma", "delta")])
    settings = {**meta, "rerank_path": str(path), "num_shots": 0, "num_samples": 2,
                "max_seq_lengths": [2048]}
    tokenizer = load_length_tokenizer(meta, task="t")
    for doc in helmet.rerank_dataset("acadlm_rerank", settings)["test"]:
        assert doc["num_passages"] == 7 and doc["num_shown"] < 7
        prompt = doc["input"] + doc["gen_prefix"]
        assert tokenizer.count(prompt) == doc["input_tokens"]
        assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]
        assert doc["relevant_grades"] == [3.0, 2.0, 1.0, 1.0]
        assert doc["input"].endswith(f"\n\nQuery: which notes mention {doc['query_id']}?\n")


def test_rerank_demonstrations_show_ten_passages_each(tmp_path: Path, meta: dict[str, Any],
                                                      no_corpus: None):
    """HELMET's demonstration file holds 10 passages per query."""
    demos = write_jsonl(tmp_path / "demos.jsonl", [
        _ranked(name, [3, 2, 1] + [0] * 9, words=5) for name in ("eps", "zeta")])
    settings = {**meta, "rerank_demo_path": str(demos), "max_seq_lengths": [4096],
                "num_samples": 2}
    for doc in helmet.rerank_dataset("acadlm_rerank", settings)["test"]:
        rankings = re.findall(r"\nRanking: ([\d >]+)\n\n", doc["input"])
        assert [len(ranking.split(" > ")) for ranking in rankings] == [10, 10]


def test_ndcg_at_10_uses_linear_gain_as_trec_eval():
    """Hand-computed NDCG@10 with graded judgments 0-3, where trec_eval's linear gain (HELMET
    scores with pytrec_eval) and the 2^grade - 1 gain disagree. pytrec_eval 0.5
    (``ndcg_cut.10``) gives the same values: 0.78837739 and 0.69435595."""
    relevance = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    # DCG of c, a, x, b: 1/log2(2) + 3/log2(3) + 0/log2(4) + 2/log2(5) = 1 + 1.892789 + 0.861353
    # IDCG of a, b, c:   3/log2(2) + 2/log2(3) + 1/log2(4)             = 3 + 1.261860 + 0.5
    linear = 100 * (1 + 3 / math.log2(3) + 2 / math.log2(5)) / (3 + 2 / math.log2(3) + 0.5)
    assert linear == pytest.approx(78.837739, abs=1e-5)
    exponential = 100 * (1 + 7 / math.log2(3) + 3 / math.log2(5)) / (7 + 3 / math.log2(3) + 0.5)
    assert ndcg_at_k(["c", "a", "x", "b"], relevance) == pytest.approx(linear)
    assert abs(linear - exponential) > 5
    # d (grade 0) and ids never judged add nothing; a repeated id counts at its first rank.
    assert ndcg_at_k(["c", "d", "c", "a", "x", "b"], relevance) == pytest.approx(
        100 * (1 + 3 / math.log2(4) + 2 / math.log2(6)) / (3 + 2 / math.log2(3) + 0.5))
    assert ndcg_at_k(["a", "b", "c", "d"], relevance) == pytest.approx(100.0)
    assert ndcg_at_k([], relevance) == 0.0
    # Only the first 10 ids count: a relevant id at rank 11 adds nothing.
    assert ndcg_at_k([str(i) for i in range(10)] + ["a"], relevance) == 0.0
    # The ideal is cut at 10 as well: 12 documents of grade 1 and one of grade 3, the ranking
    # shows ten of grade 1.
    many = {f"d{i}": 1.0 for i in range(12)} | {"top": 3.0}
    ideal = 3 + sum(1 / math.log2(r + 2) for r in range(1, 10))
    shown = sum(1 / math.log2(r + 2) for r in range(10))
    assert ndcg_at_k([f"d{i}" for i in range(10)], many) == pytest.approx(100 * shown / ideal)
    assert 100 * shown / ideal == pytest.approx(69.435595, abs=1e-5)
    doc = {"max_length": 2048, "relevant_ids": ["12345", "23456"], "relevant_grades": [2.0, 1.0],
           "passage_ids": ["12345", "23456", "34567"]}
    expected = 100 * (1 / math.log2(2) + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
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


def test_icl_queries_of_a_length_are_balanced_by_label(tmp_path: Path, meta: dict[str, Any]):
    """HELMET balances its test queries by label (``balance_labels``): with 12 test rows of one
    label and 2 of each other, the first 6 samples ask 2 of each, and all 16 are asked before
    any repeats."""
    left = {"weather": 12, "sport": 2, "cooking": 2}
    rows = []
    for row in icl_rows():
        split = "test" if left[row["label"]] > 0 else "demo"
        left[row["label"]] -= split == "test"
        rows.append({**row, "split": split})
    path = write_jsonl(tmp_path / "icl.jsonl", rows)
    settings = {**meta, "icl_path": str(path), "max_seq_lengths": [1024]}
    for seed in (1, 2, 3):
        first = helmet.icl_dataset("acadlm_icl", {**settings, "seed": seed,
                                                  "num_samples": 6})["test"]
        assert sorted(first["label"]) == ["cooking"] * 2 + ["sport"] * 2 + ["weather"] * 2
    whole = helmet.icl_dataset("acadlm_icl", {**settings, "num_samples": 16})["test"]
    assert len({doc["input"].rsplit("\n\n", 1)[1] for doc in whole}) == 16


@pytest.mark.parametrize(("generation", "gen_prefix", "answer"), [
    (" 2", "label:", "2"), (" 2\nlabel: 5", "label:", "2"),
    (" 3 (location)", "label:", "3 (location)"), ("\n3", "label:", ""),
    (" label: 4", "label:", "4"),
    ("label: 2", "", "2"), ("Label: 10.", "", "10."), ("The answer, label: 3", "", "3"),
    ("I do not know.", "", "I do not know."), ("", "", "")])
def test_parse_label(generation: str, gen_prefix: str, answer: str):
    """HELMET's reading: the prompt's answer prefix put back in front of the generation (plain
    text only), then the rest of the line after the first "label:", else the first line."""
    assert helmet.parse_label(generation, gen_prefix) == answer


@pytest.mark.parametrize(("generation", "gen_prefix", "score"), [
    (" 3", "label:", 100.0), (" 3.", "label:", 100.0), (" 3 (location)", "label:", 0.0),
    (" 31", "label:", 0.0), ("\n3", "label:", 0.0), ("label: 3", "", 100.0), ("3", "", 100.0),
    ("The answer is 3", "", 0.0), ("", "", 0.0)])
def test_icl_is_scored_by_exact_match_on_the_answer_line_as_helmet(generation: str,
                                                                   gen_prefix: str, score: float):
    """HELMET scores ICL by exact match (SQuAD-normalized) of the whole answer line: a label
    followed by anything but punctuation is wrong."""
    doc = {"outputs": ["3"], "max_length": 1024, "gen_prefix": gen_prefix}
    assert helmet.process_results_label(doc, [generation]) == {"1024": score}


def test_longqa_truncates_the_document_to_fit(meta: dict[str, Any]):
    dataset = helmet.longqa_dataset("acadlm_longqa", {**meta, "max_seq_lengths": [2048]})
    for doc in dataset["test"]:
        assert doc["input"].startswith(helmet.LONGQA_INTRO)
        assert doc["input"].endswith("\nGive a short answer, a few words only.\n")
        assert doc["gen_prefix"] == "Answer:"
        assert doc["outputs"][0] in doc["input"]


# ------------------------------------------------------------------------ category scores


def test_category_groups_print_the_mean_of_their_tasks(oracle_run: dict):
    results = oracle_run["results"]
    for group, tasks in CATEGORIES.items():
        means = {n: sum(results[t][f"{n},none"] for t in tasks) / len(tasks) for n in LENGTHS}
        assert _scores(oracle_run, group) == pytest.approx(means), group
    assert oracle_run["group_subtasks"]["acadlm_helmet"] == [
        "acadlm_helmet_recall", "acadlm_helmet_rag", "acadlm_helmet_rerank", "acadlm_helmet_icl",
        "acadlm_longqa", "acadlm_summ"]
    # acadlm_helmet prints no mean of its own: lm-eval's would average its nine leaf tasks, not
    # HELMET's categories (the report gives HELMET's).
    assert not any(key[0].isdigit() for key in oracle_run["results"]["acadlm_helmet"])
    # HELMET's own long-document QA: NarrativeQA, En.QA, En.MC, all answered by the oracle.
    assert _scores(oracle_run, "acadlm_helmet_longqa") == _each(100.0)


def test_helmet_full_holds_the_seven_categories_on_helmets_datasets(meta: dict[str, Any],
                                                                     no_corpus: None):
    manager = task_manager({**meta, "max_seq_lengths": [2048], "num_samples": 1},
                           include_defaults=False)
    loaded = manager.load_task_or_group(["acadlm_helmet_full"])
    groups = {group.group_name if hasattr(group, "group_name") else str(group): tasks
              for group, tasks in next(iter(loaded.values())).items()}
    assert sorted(groups) == sorted(CATEGORIES)
    leaves = {task for tasks in groups.values() for task in tasks}
    assert leaves == {task for tasks in CATEGORIES.values() for task in tasks}


def test_report_averages_categories_then_suites(oracle_run: dict):
    table = length_table(oracle_run)
    assert table is not None and "acadlm_helmet_rag" not in table.tasks
    categories = table.categories()
    assert set(categories) == {"recall", "rag", "rerank", "cite", "icl", "longqa", "summ"}
    assert categories["summ"] == pytest.approx(_each(0.0))
    # HELMET's own datasets ran for long-document QA and summarization: the stand-ins (the
    # oracle scores 100 on acadlm_longqa) do not count.
    assert categories["longqa"] == pytest.approx(_each(100.0))
    assert table.scores["acadlm_longqa"] == pytest.approx(_each(100.0))
    suites = table.suites()
    # HELMET: the mean of its seven categories; no RULER task ran, so no RULER suite.
    assert suites["helmet"] == pytest.approx(_each(600 / 7))
    assert "ruler" not in suites
    assert table.averages() == pytest.approx(_each(600 / 7))


# ------------------------------------------------------------------------- demonstrations


def _demo_ids(doc: dict[str, Any]) -> list[str]:
    return json.loads(doc["demo_ids"])


def test_rag_demonstrations_come_from_held_out_rows_in_helmets_layout(meta: dict[str, Any],
                                                                     no_corpus: None):
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 6}
    records = {r.id: r for r in load_qa(DEFAULT_QA_FILE, task="t", key="rag_path")}
    asked, held = helmet.hold_out_demos("acadlm_rag", settings, len(records), 2, key="rag_path")
    ids = list(records)
    held_ids = {ids[i] for i in held}
    assert len(held) == 8 and not set(asked) & set(held)
    for doc in helmet.rag_dataset("acadlm_rag", settings)["test"]:
        demos = _demo_ids(doc)
        assert len(demos) == 2 and set(demos) <= held_ids
        assert doc["question_id"] not in held_ids
        text = doc["input"]
        first_passage = text.index(doc["gold_texts"][0])
        for demo_id in demos:
            demo = records[demo_id]
            block = f"\n\nQuestion: {demo.question}\nAnswer: {demo.answers[0]}\n\n"
            assert text.index(block) < first_passage  # between instruction and passages
            assert demo.gold[0].text in text[: text.index(block)]
        assert text.count("Question:") == 3


def test_demonstrations_are_fixed_per_question_and_never_the_question(meta: dict[str, Any]):
    pool = [f"row{i}" for i in range(8)]
    first = helmet.pick_demos(pool, 2, meta, task="t", item="row3", key="k",
                              allowed=lambda row: row != "row3")
    assert first == helmet.pick_demos(pool, 2, meta, task="t", item="row3", key="k",
                                      allowed=lambda row: row != "row3")
    assert "row3" not in first and len(set(first)) == 2
    drawn = {tuple(helmet.pick_demos(pool, 2, meta, task="t", item=f"q{i}", key="k"))
             for i in range(20)}
    assert len(drawn) > 5  # different questions get different demonstrations
    with pytest.raises(ConfigError, match="`t: k`.*fewer than `num_shots` = 2"):
        helmet.pick_demos(pool[:2], 2, meta, task="t", item="row0", key="k",
                          allowed=lambda row: row != "row0")


def test_rerank_demonstrations_rank_all_their_passages_by_grade(meta: dict[str, Any],
                                                                no_corpus: None):
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 4}
    records = {r.query: r for r in load_rerank(helmet.DEFAULT_RERANK_FILE, task="t",
                                               key="rerank_path")}
    for doc in helmet.rerank_dataset("acadlm_rerank", settings)["test"]:
        text = doc["input"]
        passages = dict(re.findall(r"\[ID: (\d+)\] Document \(Title: [^)]*\): ([^\n]+)", text))
        demos = re.findall(r"Query: ([^\n]+)\nRanking: ([\d >]+)\n\n", text)
        assert len(demos) == 2 and len(_demo_ids(doc)) == 2
        for query, ranking in demos:
            grades = {p.text: p.relevance for p in records[query].passages}
            ranked = ranking.split(" > ")
            assert len(ranked) == len(grades)
            assert not set(ranked) & set(doc["passage_ids"])  # fresh ids
            shown = [grades[passages[pid]] for pid in ranked]
            assert shown == sorted(shown, reverse=True)
        # A demonstration's ids are no passage of the prompt: copied, they count as unjudged.
        copied = helmet.parse_ranking(demos[0][1])
        assert copied and not set(copied) & set(doc["passage_ids"])


def test_separate_demonstration_file_is_used_whole(meta: dict[str, Any], tmp_path: Path,
                                                   no_corpus: None):
    demo_file = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"train{i}", "question": f"Which colour is flag {i}?", "answers": [f"hue{i}"],
         "gold": [f"Flag {i} is hue{i}."]} for i in range(3)])
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 4,
                "rag_demo_path": str(demo_file)}
    dataset = helmet.rag_dataset("acadlm_rag", settings)["test"]
    assert all(set(_demo_ids(doc)) <= {"train0", "train1", "train2"} for doc in dataset)
    assert all("Flag " in doc["input"] for doc in dataset)


def test_json_kv_demonstrations_are_other_pairs_of_the_object(meta: dict[str, Any]):
    for doc in helmet.json_kv_dataset("acadlm_json_kv", meta)["test"]:
        text = doc["input"]
        pairs = json.loads(text[text.index("{"): text.rindex("}") + 1])
        tail = text[text.rindex("}"):]
        demos = re.findall(r'Key: "([^"]+)"\nValue: (\S+)\n\n', tail)
        assert [key for key, _ in demos] == _demo_ids(doc) and len(demos) == 2
        assert all(pairs[key] == value for key, value in demos)
        assert doc["outputs"][0] not in dict(demos).values()
        assert tail.endswith('"\n') and doc["gen_prefix"] == "Value:"


def test_long_document_demonstrations_show_other_questions_and_summaries(meta: dict[str, Any]):
    settings = {**meta, "max_seq_lengths": [2048]}
    rows = {row["id"]: row for row in longqa_rows(words=5000)}
    for doc in helmet.longqa_dataset("acadlm_longqa", settings)["test"]:
        demos = _demo_ids(doc)
        assert len(demos) == 2 and doc["document_id"] not in demos
        head = doc["input"][: doc["input"].index("Document:\n")]
        assert head.startswith(helmet.LONGQA_INTRO + helmet.EXAMPLES_HEAD)
        for demo in demos:
            assert f"Question: {rows[demo]['question']}\nAnswer: {rows[demo]['answers'][0]}" \
                in head
    summaries = {row["id"]: row["summary"] for row in summ_rows(words=5000)}
    for doc in helmet.summ_dataset("acadlm_summ", settings)["test"]:
        head = doc["input"][: doc["input"].index("Document:\n")]
        assert all(f"Summary: {summaries[demo]}" in head for demo in _demo_ids(doc))
        assert doc["outputs"][0] not in head


def test_num_shots_zero_turns_demonstrations_off(meta: dict[str, Any], no_corpus: None):
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2, "num_shots": 0}
    checks = {helmet.rag_dataset: ("Question:", 1), helmet.json_kv_dataset: ("Key: ", 1),
              helmet.rerank_dataset: ("\nRanking:", 0), helmet.longqa_dataset: ("Question:", 1),
              _asqa: ("Question:", 1)}
    for build, (marker, count) in checks.items():
        for doc in build("t", settings)["test"]:
            assert _demo_ids(doc) == [] and doc["input"].count(marker) == count, build
    # Nothing is held out: every question of the file may be asked.
    assert helmet.hold_out_demos("t", settings, 5, 0, key="k") == ([0, 1, 2, 3, 4], [])


def test_num_shots_must_be_a_count(meta: dict[str, Any]):
    assert "`acadlm_x: num_shots`" in _error(helmet.json_kv_dataset, {**meta, "num_shots": -1})
    assert "`acadlm_x: num_shots`" in _error(helmet.rag_dataset, {**meta, "num_shots": "two"})


def test_demonstrations_that_do_not_fit_name_num_shots(meta: dict[str, Any], no_corpus: None):
    message = _error(helmet.rerank_dataset, {**meta, "max_seq_lengths": [256]})
    assert "demonstrations" in message and "`num_shots`" in message


# ---------------------------------------------------------------------------- cite (ALCE)


def test_asqa_string_em_on_hand_computed_cases():
    short = [["Zorvath", "Zorvath Sr"], ["Quenby"]]
    assert asqa_string_em("The old keeper was zorvath [1].", short) == (50.0, 0.0)
    assert asqa_string_em("It was Zorvath [1][2], and now Quenby!\n[3]", short) == (100.0, 100.0)
    assert asqa_string_em("Nobody knows.", short) == (0.0, 0.0)
    # Normalized as SQuAD: punctuation deleted, articles dropped.
    assert normalize_answer("The Wal-Mart, a store.") == "walmart store"
    assert asqa_string_em("walmart", [["Wal-Mart"]]) == (100.0, 100.0)


def test_qampari_scores_on_hand_computed_cases():
    answers = [["A Lane", "Ann Lane"], ["B Oak"], ["C Reed"], ["D Holt"], ["E Moss"],
               ["F Hale"], ["G Pike"]]
    # Items: "ann lane", "b oak", "x", "b oak": 3 of 4 are answers (a repeat counts again);
    # 2 of 7 answers found; top-5 recall: min(5, 2) / min(5, 7) = 2/5.
    scores = qampari_scores("Ann Lane [1], B Oak [2], X, B Oak.", answers)
    assert scores.num_predictions == 4
    assert scores.precision == pytest.approx(75.0)
    assert scores.recall == pytest.approx(100 * 2 / 7)
    assert scores.recall_top5 == pytest.approx(40.0)
    assert scores.f1 == pytest.approx(100 * 2 * 0.75 * (2 / 7) / (0.75 + 2 / 7))
    assert scores.f1_top5 == pytest.approx(100 * 2 * 0.75 * 0.4 / 1.15)
    assert qampari_scores("", answers).precision == 0.0
    assert qampari_scores("A Lane, B Oak, C Reed, D Holt, E Moss", answers).recall_top5 == 100.0


def _words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


def word_judge(premise: str, hypothesis: str) -> bool:
    """A stand-in NLI model: entailed when every word of the hypothesis after its question, if
    it starts with one (QAMPARI's "question answer" claims), is in the premise."""
    return _words(hypothesis.rsplit("?", 1)[-1]) <= _words(premise)


def test_citation_recall_and_precision_on_a_hand_computed_case():
    documents = [("T1", "Ada built the mill."), ("T2", "Bram rebuilt the mill."),
                 ("T3", "Unrelated text.")]
    answer = ("Ada built the mill [1]. Bram rebuilt the mill [1][2]. The mill is old [3]. "
              "No citation here. Ada built it [9].")
    # Statement 1: supported, one citation, precise. Statement 2: supported by [1][2] together;
    # [1] alone does not entail it and [2] without [1] does, so [1] is redundant, [2] precise.
    # Statement 3: not supported (its citation counts, imprecise). Statements 4 and 5: no
    # citation / a citation no passage has: not supported, no citation counted.
    scores = citation_scores(answer, documents, word_judge)
    assert scores is not None
    assert scores.recall == pytest.approx(100 * 2 / 5)
    assert scores.precision == pytest.approx(100 * 2 / 4)
    assert citation_scores("", documents, word_judge) is None
    # QAMPARI: each listed answer, prefixed with the question, is a statement.
    listed = citation_scores("Ada [1], Bram [1].", documents, word_judge,
                             list_question="Who built the mill?")
    assert listed is not None and listed.recall == 50.0 and listed.precision == 50.0


def test_cite_refuses_without_alce_files_and_says_where_to_get_them(meta: dict[str, Any],
                                                                    tmp_path: Path):
    settings = {k: v for k, v in meta.items() if k != "asqa_path"}
    message = _error(_asqa, settings)
    # HELMET's configs/cite.yaml: data/alce/*_eval_gtr_top2000.json, prompts/*_revised.json.
    assert "`acadlm_x: asqa_path`" in message and "asqa_eval_gtr_top2000.json" in message
    assert "download_data.sh" in message and "never downloaded" in message
    message = _error(_qampari, {**meta, "qampari_demo_path": str(tmp_path / "absent.json")})
    assert "`acadlm_x: qampari_demo_path`" in message
    assert "prompts/qampari_revised.json" in message
    message = _error(_qampari, {**meta, "qampari_path": str(tmp_path / "absent.json")})
    assert "`acadlm_x: qampari_path`" in message and "absent.json does not exist" in message


@pytest.mark.parametrize(("build", "field", "row"), [
    (_asqa, "qa_pairs", {"question": "q", "docs": [{"text": "t"}], "qa_pairs": []}),
    (_asqa, "docs[0].text", {"question": "q", "docs": [{"title": "t"}],
                             "qa_pairs": [{"short_answers": ["a"]}]}),
    (_qampari, "answers", {"question": "q", "docs": [{"text": "t"}], "answers": "a"}),
    (_qampari, "question", {"docs": [{"text": "t"}], "answers": [["a"]]}),
])
def test_malformed_alce_item_names_file_item_and_field(build: Any, field: str, row: dict,
                                                       meta: dict[str, Any], tmp_path: Path):
    key = "asqa_path" if build is _asqa else "qampari_path"
    good = (asqa_items if build is _asqa else qampari_items)(count=1)[0]
    path = write_json(tmp_path / "alce.json", [good, row])
    message = _error(build, {**meta, key: str(path)})
    assert f"`acadlm_x: {key}`" in message and f"{path} item 2" in message
    assert f"`{field}`" in message


def test_cite_prompt_lists_retrieved_passages_in_order_and_cites_by_number(
        meta: dict[str, Any], files: dict[str, Path], no_corpus: None):
    items = {item["sample_id"]: item for item in asqa_items()}
    for doc in _asqa("acadlm_cite_asqa", {**meta, "max_seq_lengths": [4096]})["test"]:
        item = items[doc["question_id"]]
        text = doc["input"]
        question = text.rindex(f"Question: {item['question']}")
        for i, passage in enumerate(item["docs"][: doc["num_retrieved"]]):
            entry = f"Document [{i + 1}](Title: {passage['title']}): {passage['text']}"
            assert entry in text[question:]
        assert doc["num_passages"] > doc["num_retrieved"] == len(item["docs"])
        assert text.endswith("\n\n") and doc["gen_prefix"] == "Answer:"
        assert doc["nli_model_path"] == ""
        assert "passages" not in doc  # kept only for citation scoring


def test_alce_prompt_file_gives_instruction_and_cited_demonstrations(
        meta: dict[str, Any], tmp_path: Path, no_corpus: None):
    prompts = alce_prompt_file(tmp_path / "qampari_default.json", qampari=True)
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 12,
                "qampari_demo_path": str(prompts)}
    dataset = _qampari("acadlm_cite_qampari", settings)["test"]
    for doc in dataset:
        assert doc["input"].count("Instruction: answer and cite.") == 3
        assert "Answer: Ada Quill [1], Bram Oak [2].\n\n\n" in doc["input"] \
            or "Answer: Cora Lane [1].\n\n\n" in doc["input"]
    # With a demonstration file nothing of the data is held out: all 12 items are asked.
    assert len(set(dataset["question_id"])) == 12


#: A prompt file in the field layout of HELMET's prompts/*_revised.json, with our own content:
#: ``demo_prompt`` is filled in per test.
PROMPT_FIELDS = {
    "instruction": "Instruction: list the answers and cite.", "demo_sep": "\n\n\n",
    "doc_prompt": "Document [{ID}](Title: {title}): {text}",
    "demos": [{"question": "Who built the mill?", "answer": "Ada Quill [1], Bram Oak [2].",
               "docs": [{"title": "Mill", "text": "Ada Quill built the mill."},
                        {"title": "Mill repairs", "text": "Bram Oak rebuilt the mill."}]}]}


@pytest.mark.parametrize(("gap", "style"), [("\n", "qampari_revised"),
                                            ("\n\n", "asqa_revised")])
def test_alce_demonstrations_follow_the_prompt_files_layout(
        gap: str, style: str, meta: dict[str, Any], tmp_path: Path, no_corpus: None):
    """HELMET fills each demonstration from the prompt file's demo_prompt, doc_prompt and
    demo_sep: QAMPARI's file puts "Answer:" on the line right after the passages (one line
    break), ASQA's after a blank line. The single line break used to become a blank line (the
    layout was hard-coded as ASQA's); ASQA's layout comes out as before."""
    demo_prompt = "{instruction}\n\nQuestion: {question}\n\n{context}" + gap + "Answer: {answer}"
    path = write_json(tmp_path / f"{style}.json", {**PROMPT_FIELDS, "demo_prompt": demo_prompt})
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2, "num_shots": 1,
                "qampari_demo_path": str(path)}
    demonstration = ("Instruction: list the answers and cite.\n\nQuestion: Who built the mill?"
                     "\n\nDocument [1](Title: Mill): Ada Quill built the mill.\n\nDocument [2]"
                     "(Title: Mill repairs): Bram Oak rebuilt the mill." + gap
                     + "Answer: Ada Quill [1], Bram Oak [2].\n\n\n")
    for doc in _qampari("acadlm_cite_qampari", settings)["test"]:
        assert doc["input"].startswith(demonstration + "Instruction: list the answers and cite."
                                       "\n\nQuestion: ")
        assert doc["input"].endswith("\n\n") and doc["gen_prefix"] == "Answer:"


def test_alce_prompt_file_fields_are_checked(meta: dict[str, Any], tmp_path: Path):
    path = write_json(tmp_path / "bad.json", {**PROMPT_FIELDS,
                                              "demo_prompt": "{instruction} {answers}"})
    message = _error(_qampari, {**meta, "qampari_demo_path": str(path)})
    assert "`acadlm_x: qampari_demo_path`" in message and "`demo_prompt`" in message
    # The refusal names the placeholders it accepts, HELMET's and ALCE's, rather than asking
    # for "one of ALCE's prompt files" (which it used to refuse).
    assert "{context}" in message and "{D}" in message and "Give one of" not in message
    mixed = write_json(tmp_path / "mixed.json", {**PROMPT_FIELDS,
                                                 "doc_prompt": "Document [{ID}]: {T} {text}"})
    message = _error(_qampari, {**meta, "qampari_demo_path": str(mixed)})
    assert "`doc_prompt`" in message and "{title}" in message and "{P}" in message


#: A prompt file in the field layout of ALCE's own prompts/*_default.json (its placeholder names
#: and its doc_prompt ending in a line break), with our own content.
ALCE_RUN_FIELDS = {
    **PROMPT_FIELDS, "demo_prompt": "{INST}\n\nQuestion: {Q}\n\n{D}\nAnswer: {A}",
    "doc_prompt": "Document [{ID}](Title: {T}): {P}\n"}


def alce_run_prompt(fields: dict[str, Any], question: str, docs: list[list[str]],
                    answer: str | None) -> str:
    """A demonstration (``answer``) or the question (None) as ALCE's run.py writes it
    (``make_demo`` and ``make_doc_prompt``): placeholders replaced as text, passages joined by
    nothing, the answer glued to the stripped text before ``{A}``."""
    prompt = fields["demo_prompt"].replace("{INST}", fields["instruction"]).replace(
        "{Q}", question)
    prompt = prompt.replace("{D}", "".join(
        fields["doc_prompt"].replace("{T}", title).replace("{P}", text).replace("{ID}", str(i))
        for i, (title, text) in enumerate(docs, start=1)))
    return prompt.replace("{A}", "").rstrip() + (answer or "")


def test_alce_own_prompt_files_render_as_alces_run_does(
        meta: dict[str, Any], tmp_path: Path, no_corpus: None):
    """ALCE's prompts/*_default.json name their placeholders {INST}/{Q}/{D}/{A} and
    {ID}/{T}/{P} and end doc_prompt with a line break, the passages joined by nothing; they
    were refused (only HELMET's names were accepted). They load, and the prompt (demonstration,
    then the question with ``Answer:``) is the one ALCE's run.py writes."""
    path = write_json(tmp_path / "qampari_default.json", ALCE_RUN_FIELDS)
    helmet.register_entailment_judge("word-judge", word_judge)  # keeps the passages shown
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2, "num_shots": 1,
                "qampari_demo_path": str(path), "nli_model_path": "word-judge"}
    demo = PROMPT_FIELDS["demos"][0]
    head = alce_run_prompt(ALCE_RUN_FIELDS, demo["question"],
                           [[d["title"], d["text"]] for d in demo["docs"]], demo["answer"])
    assert head.startswith("Instruction: list the answers and cite.\n\nQuestion: Who built")
    assert "Ada Quill built the mill.\nDocument [2]" in head
    assert "mill.\n\nAnswer:Ada Quill [1]" in head  # ALCE glues the answer to "Answer:"
    for doc in _qampari("acadlm_cite_qampari", settings)["test"]:
        passages = json.loads(doc["passages"])
        question = alce_run_prompt(ALCE_RUN_FIELDS, doc["question"], passages, None)
        assert doc["input"] + doc["gen_prefix"] == head + "\n\n\n" + question


def test_alce_own_prompt_files_put_demonstration_passages_in_verbatim(
        meta: dict[str, Any], tmp_path: Path, no_corpus: None):
    """ALCE's make_doc_prompt puts a demonstration passage's title and text in as the file
    writes them (its qampari_default.json has the title "The Trouble with Girls (film) ", whose
    space ALCE keeps before the closing parenthesis); their white space used to be collapsed.
    A file in ALCE's names renders them so, double spaces and a trailing space included."""
    docs = [{"title": "Mill ", "text": "Ada Quill  built the mill."},
            {"title": "Mill repairs", "text": "Bram Oak rebuilt\tthe mill. "}]
    demo = {**PROMPT_FIELDS["demos"][0], "docs": docs}
    fields = {**ALCE_RUN_FIELDS, "demos": [demo]}
    path = write_json(tmp_path / "qampari_default.json", fields)
    head = alce_run_prompt(fields, demo["question"], [[d["title"], d["text"]] for d in docs],
                           demo["answer"])
    assert "(Title: Mill ): Ada Quill  built" in head and "rebuilt\tthe mill. \n" in head
    prompts = helmet.load_alce_prompts(path, helmet.QAMPARI, task="t")
    assert prompts.layout.demo_text(prompts.instruction, prompts.demos) == head + "\n\n\n"
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2, "num_shots": 1,
                "qampari_demo_path": str(path)}
    for doc in _qampari("acadlm_cite_qampari", settings)["test"]:
        assert doc["input"].startswith(head + "\n\n\n")


def test_cite_reports_citation_metrics_only_with_an_nli_model(meta: dict[str, Any],
                                                             caplog: pytest.LogCaptureFixture,
                                                             no_corpus: None):
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2}
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins.evaluation.helmet"):
        doc = _qampari("acadlm_cite_qampari", settings)["test"][0]
    assert "citation_rec and citation_prec are not computed" in caplog.text
    answer = doc["oracle_answer"]
    assert set(helmet.process_results_cite(doc, [answer])) == {
        "2048", "2048_qampari_prec", "2048_qampari_rec", "2048_qampari_f1",
        "2048_qampari_f1_top5"}

    helmet.register_entailment_judge("word-judge", word_judge)
    judged = _qampari("acadlm_cite_qampari", {**settings, "nli_model_path": "word-judge"})
    doc = judged["test"][0]
    passages = json.loads(doc["passages"])
    assert len(passages) == doc["num_passages"]
    # Cite, for each answer, the passage that names it: every statement is supported.
    where = {name: next(i + 1 for i, (_, text) in enumerate(passages) if name in text)
             for name in doc["outputs"]}
    cited = ", ".join(f"{name} [{number}]" for name, number in where.items())
    scores = helmet.process_results_cite(doc, [cited])
    assert scores["2048_citation_rec"] == 100.0 and scores["2048_citation_prec"] == 100.0
    assert scores["2048"] == 100.0
    uncited = helmet.process_results_cite(doc, [answer])
    assert uncited["2048_citation_rec"] == 0.0 and uncited["2048_citation_prec"] == 0.0


def test_cite_task_declares_its_measures_to_lm_eval(meta: dict[str, Any], files: dict[str, Path]):
    helmet.register_entailment_judge("word-judge", word_judge)
    settings = {**meta, "max_seq_lengths": [2048], "num_samples": 2,
                "nli_model_path": "word-judge"}
    run = _evaluate(OracleLM(), ["acadlm_cite_asqa"], settings,
                    home=files["model"].parent / "empty_home")
    metrics = run["results"]["acadlm_cite_asqa"]
    assert metrics["2048,none"] == 100.0 and metrics["2048_str_hit,none"] == 100.0
    # The oracle answers without citations: measured, and 0.
    assert metrics["2048_citation_rec,none"] == 0.0
    assert "2048_citation_rec,none" not in oracle_metrics_without_nli(meta, files)


def oracle_metrics_without_nli(meta: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    run = _evaluate(OracleLM(), ["acadlm_cite_asqa"],
                    {**meta, "max_seq_lengths": [2048], "num_samples": 1},
                    home=files["model"].parent / "empty_home")
    return run["results"]["acadlm_cite_asqa"]


def test_nli_model_path_must_exist(meta: dict[str, Any], tmp_path: Path):
    message = _error(_asqa, {**meta, "nli_model_path": str(tmp_path / "no_model")})
    assert "`acadlm_x: nli_model_path`" in message and "t5_xxl_true_nli_mixture" in message


def test_a_local_nli_model_directory_loads_offline(files: dict[str, Path], tmp_path: Path):
    model_dir = write_tiny_nli_model(tmp_path / "nli", files["model"])
    judge = helmet.entailment_judge(str(model_dir))
    assert isinstance(judge("Ada built the mill.", "Ada built it."), bool)
    assert helmet.ENTAILMENT_JUDGES[str(model_dir)] is judge


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
    message = _error(helmet.rag_dataset, {**meta, "rag_path": str(tiny), "num_shots": 0,
                                          "distractor_path": str(extra)})
    assert "`acadlm_x: rag_path`" in message and "distractor_path" in message
    # With demonstrations, two rows cannot also give two held-out demonstrations.
    message = _error(helmet.rag_dataset, {**meta, "rag_path": str(tiny)})
    assert "`acadlm_x: rag_path`" in message and "`num_shots`" in message


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
    return {"pretrained": str(require_default_model()), "max_seq_lengths": DEFAULT_LENGTHS,
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
    assert _scores(default_runs["oracle"], task, DEFAULT_LENGTHS) == _each(100.0, DEFAULT_LENGTHS)
    assert _scores(default_runs["constant"], task, DEFAULT_LENGTHS) == _each(0.0, DEFAULT_LENGTHS)
    for sample in default_runs["oracle"]["samples"][task]:
        doc = sample["doc"]
        if task == "acadlm_rerank":  # HELMET's passage count, not a filled length
            assert doc["num_passages"] == helmet.rerank_passage_count(doc["max_length"])
        else:
            assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]
        assert doc["budget_tokens"] <= doc["max_length"] - doc["tokens_to_generate"]


@pytest.mark.integration
def test_stdlib_summaries_default(default_runs: dict):
    assert _scores(default_runs["reference"], "acadlm_summ", DEFAULT_LENGTHS) == _each(
        100.0, DEFAULT_LENGTHS)
    assert max(_scores(default_runs["constant"], "acadlm_summ", DEFAULT_LENGTHS).values()) < 15.0
    for sample in default_runs["reference"]["samples"]["acadlm_summ"]:
        doc = sample["doc"]
        assert doc["outputs"][0] not in " ".join(doc["input"].split())
        assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]


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
@pytest.mark.parametrize("task", ["acadlm_icl", "acadlm_longqa", "acadlm_rag", "acadlm_rerank"])
def test_corpus_defaults_ask_the_same_items_at_every_length(task: str, default_runs: dict):
    """(The stdlib summaries are left out: many modules fill 1K tokens but not 2K, so the
    lengths ask about nested sets, as test_long_documents_too_short_for_a_length_leave_nested_sets
    checks.)"""
    docs = [sample["doc"] for sample in default_runs["oracle"]["samples"][task]]
    if task == "acadlm_longqa":  # the plays: a quoted line, not an id
        docs = [{**doc, "document_id": doc["question"]} for doc in docs]
    asked = _asked_by_length(sorted(docs, key=lambda doc: doc["index"]))
    assert asked[DEFAULT_LENGTHS[0]] == asked[DEFAULT_LENGTHS[1]]


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


def _first_word_entails(premise: str, hypothesis: str) -> bool:
    """A stand-in entailment judge: the premise entails a claim that starts with a word it
    holds."""
    return hypothesis.split()[0] in premise


def test_citation_scores_read_only_the_first_three_citations():
    """ALCE (``at_most_citations=3``): citations after the third are ignored, so a statement
    whose only supporting passage is its 4th citation is unsupported, and 3 citations count."""
    documents = [("T1", "nothing"), ("T2", "nothing"), ("T3", "nothing"), ("T4", "Ada is here.")]
    from acadlm_plugins.evaluation.scoring import citation_scores

    scores = citation_scores("Ada built the mill [1][2][3][4].", documents, _first_word_entails)
    assert scores is not None
    assert scores.recall == 0.0
    # with at_most=4 the 4th passage supports it
    wider = citation_scores("Ada built the mill [1][2][3][4].", documents, _first_word_entails, at_most=4)
    assert wider is not None and wider.recall == 100.0


def test_a_citation_that_entails_alone_is_precise_even_when_the_others_do_too():
    """ALCE's condition A: a cited passage that entails the statement on its own is precise;
    only one that does not (while the others do) is redundant. Both passages say it: 2 of 2."""
    documents = [("T1", "Ada is here."), ("T2", "Ada again.")]
    from acadlm_plugins.evaluation.scoring import citation_scores

    scores = citation_scores("Ada built the mill [1][2].", documents, _first_word_entails)
    assert scores is not None
    assert scores.recall == 100.0
    assert scores.precision == 100.0


def test_a_reference_that_normalizes_to_nothing_matches_nothing():
    """"The" or "." normalize to "", which is a substring of every text: such a reference must
    not give every generation full substring-EM credit."""
    from acadlm_plugins.evaluation.scoring import substring_exact_match

    assert substring_exact_match("Bram kept the key", ["The"]) == 0.0
    assert substring_exact_match("Bram kept the key", ["...", "Ada"]) == 0.0
    assert substring_exact_match("Ada kept the key", ["...", "Ada"]) == 100.0


def test_statements_shorter_than_five_characters_are_not_checked():
    """ALCE cuts sentences and checks those of 5 characters or more: "Yes." is no statement,
    so it neither lowers citation recall nor counts."""
    documents = [("T1", "Ada is here.")]
    from acadlm_plugins.evaluation.scoring import citation_scores

    scores = citation_scores("Ada built the mill [1]. Yes.", documents, _first_word_entails)
    assert scores is not None and scores.recall == 100.0


def test_asqa_reports_str_em_under_the_length_and_str_hit_apart():
    """HELMET's cite category counts ASQA's STR-EM (the share of sub-questions answered), not
    STR-HIT (all answered): one of two short answers found is 50, hit 0."""
    from acadlm_plugins.evaluation.helmet import process_results_cite

    doc = {"max_length": 2048, "alce_dataset": "asqa", "answer_sets": [["Zorvath"], ["Quenby"]]}
    scores = process_results_cite(doc, ["The keeper was Zorvath [1]."])
    assert scores["2048"] == 50.0 and scores["2048_str_hit"] == 0.0


def test_qampari_main_score_is_recall_top5_and_claims_carry_the_question():
    """HELMET's cite category counts QAMPARI's recall-top5 (5 of 7 answers found: 100, plain
    recall 71.4), and each listed answer is judged as "<question> <answer>"."""
    import json

    from acadlm_plugins.evaluation.helmet import process_results_cite, register_entailment_judge

    seen = []

    def judge(premise: str, hypothesis: str) -> bool:
        seen.append(hypothesis)
        return hypothesis.startswith("Who built it?")

    register_entailment_judge("test-qampari-judge", judge)
    answers = [["Ann"], ["Bob"], ["Cy"], ["Dee"], ["Eve"], ["Fay"], ["Gus"]]
    doc = {"max_length": 2048, "alce_dataset": "qampari", "answer_sets": answers,
           "question": "Who built it?", "nli_model_path": "test-qampari-judge",
           "passages": json.dumps([["T1", "Ann Bob Cy Dee Eve"]])}
    scores = process_results_cite(doc, ["Ann [1], Bob [1], Cy [1], Dee [1], Eve [1]."])
    assert scores["2048"] == 100.0
    assert scores["2048_qampari_rec"] == pytest.approx(100 * 5 / 7)
    assert seen and all(h.startswith("Who built it? ") for h in seen)
    assert scores["2048_citation_rec"] == 100.0


def test_helmet_prompt_files_put_demonstration_passages_in_verbatim(tmp_path: Path):
    """HELMET's load_alce formats a demonstration passage's title and text as the file writes
    them (its qampari_revised.json has the title "The Trouble with Girls (film) "): a file in
    HELMET's names keeps them too (their white space used to be collapsed)."""
    docs = [{"title": "Mill ", "text": "Ada Quill  built the mill."},
            {"title": "Mill repairs", "text": "Bram Oak rebuilt\tthe mill. "}]
    demo_prompt = "{instruction}\n\nQuestion: {question}\n\n{context}\nAnswer: {answer}"
    fields = {**PROMPT_FIELDS, "demo_prompt": demo_prompt,
              "demos": [{**PROMPT_FIELDS["demos"][0], "docs": docs}]}
    path = write_json(tmp_path / "qampari_revised.json", fields)
    prompts = helmet.load_alce_prompts(path, helmet.QAMPARI, task="t")
    text = prompts.layout.demo_text(prompts.instruction, prompts.demos)
    assert ("Document [1](Title: Mill ): Ada Quill  built the mill.\n\nDocument [2](Title: "
            "Mill repairs): Bram Oak rebuilt\tthe mill. \nAnswer: Ada Quill [1]") in text
