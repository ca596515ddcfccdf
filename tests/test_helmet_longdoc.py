"""HELMET's own long-document datasets (helmet_longdoc.py): NarrativeQA, InfiniteBench En.QA,
En.MC and En.Sum, and Multi-LexSum, from files in the converters' schemas. Their prompts against
HELMET's templates, the cut of the document, the demonstrations, HELMET's metrics (hand-computed
cases) and the score their category counts, on a tokenizer trained on the spot and small files,
with ACADLM_HOME pointed at an empty folder (nothing is downloaded, no corpus is needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helmet_fixtures import (
    choice_rows,
    longqa_rows,
    summ_rows,
    write_jsonl,
    write_tokenizer_dir,
)

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import helmet_longdoc as longdoc
from acadlm_plugins.evaluation.helmet_longdoc import (
    INFBENCH_CHOICE,
    INFBENCH_QA,
    INFBENCH_SUM,
    MULTI_LEXSUM,
    NARRATIVEQA,
    TRUNCATION_MARK,
    longdoc_dataset,
    process_results_longdoc,
)
from acadlm_plugins.evaluation.judge_metrics import DOC_FIELD
from acadlm_plugins.evaluation.lengths import load_length_tokenizer
from acadlm_plugins.evaluation.scoring import (
    answer_line,
    choice_exact_match,
    helmet_answer_scores,
    rouge_measures,
    token_f1,
)

LENGTH = 2048


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("longdoc")
    return {"model": write_tokenizer_dir(root / "model"),
            "qa": write_jsonl(root / "qa.jsonl", longqa_rows(count=8, words=3000)),
            "choice": write_jsonl(root / "choice.jsonl", choice_rows(count=6, words=3000)),
            "summ": write_jsonl(root / "summ.jsonl", summ_rows(count=8, words=3000))}


@pytest.fixture
def meta(files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
         ) -> dict[str, Any]:
    monkeypatch.setenv("ACADLM_HOME", str(tmp_path / "empty_home"))
    return {"pretrained": str(files["model"]), "max_seq_lengths": [LENGTH], "num_samples": 3,
            "narrativeqa_path": str(files["qa"]), "infbench_qa_path": str(files["qa"]),
            "infbench_choice_path": str(files["choice"]),
            "infbench_sum_path": str(files["summ"]), "multi_lexsum_path": str(files["summ"])}


def rows_of(dataset: Any, meta: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    return list(longdoc_dataset(dataset, {**meta, **extra})["test"])


def split_prompt(text: str, head: str, tail: str) -> str:
    """The document part of a prompt: what lies between ``head`` and ``tail``."""
    assert text.startswith(head) and text.endswith(tail), (text[:200], text[-200:])
    return text[len(head): len(text) - len(tail)]


# --------------------------------------------------------------------------------- prompts


def test_narrativeqa_prompt_is_helmets(meta: dict[str, Any]) -> None:
    rows = {row["id"]: row for row in longqa_rows(count=8, words=3000)}
    for doc in rows_of(NARRATIVEQA, meta):
        demos = [rows[i] for i in json.loads(doc["demo_ids"])]
        head = ("You are given a story, which can be either a novel or a movie script, and a "
                "question. Answer the question as concisely as you can, using a single phrase "
                "if possible.\n\nFor example:\n\n"
                + "\n\n".join(f"Question: {d['question']}\nAnswer: {d['answers'][0]}"
                              for d in demos)
                + "\n\nNow, use the following story to answer the question:\n\n")
        tail = f"{TRUNCATION_MARK}\n\nQuestion: {doc['question']}\n"
        body = split_prompt(doc["input"], head, tail)
        assert rows[doc["document_id"]]["document"].startswith(body)
        assert doc["gen_prefix"] == "Answer:" and doc["truncated"]
        assert len(demos) == 2 and doc["document_id"] not in json.loads(doc["demo_ids"])


def test_infbench_prompts_are_helmets(meta: dict[str, Any]) -> None:
    choices = {row["id"]: row for row in choice_rows(count=6, words=3000)}
    for doc in rows_of(INFBENCH_CHOICE, meta):
        row = choices[doc["document_id"]]
        options = "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD",
                                                                             row["options"]))
        demos = [choices[i] for i in json.loads(doc["demo_ids"])]
        shown = "\n\n".join(
            f"[story text]\nQuestion: {d['question']}\nOptions:\n" + "\n".join(
                f"{letter}. {option}" for letter, option in zip("ABCD", d["options"]))
            + f"\nAnswer: {'ABCD'[d['options'].index(d['answer'])]}" for d in demos)
        head = ("You are given a story and a question with multiple choices. Choose the best "
                "answer from the options provided. Only one of the following options is "
                "correct, output the answer using one single letter (A, B, C, or D). Don't say "
                "anything else.\n\nFor example:\n\n" + shown
                + "\n\nNow, read the following story:\n\n")
        tail = f"{TRUNCATION_MARK}\n\nQuestion: {row['question']}\nOptions:\n{options}\n\n"
        assert row["document"].startswith(split_prompt(doc["input"], head, tail))
        letter = "ABCD"[row["options"].index(row["answer"])]
        assert doc["outputs"] == [letter, f"{letter}. {row['answer']}"]
        assert doc["answer_option"] == row["answer"] and doc["gen_prefix"] == "Answer:"
    for doc in rows_of(INFBENCH_QA, meta):
        assert doc["input"].startswith(
            "You are given a story and a question. Answer the question as concisely as you "
            "can, using a single phrase if possible.\n\nFor example:\n\n[story text]\n"
            "Question: ")
        assert doc["input"].endswith(f"\n\nQuestion: {doc['question']}\n\n")


def test_summarization_prompts_are_helmets(meta: dict[str, Any]) -> None:
    summaries = {row["id"]: row["summary"] for row in summ_rows(count=8, words=3000)}
    for doc in rows_of(MULTI_LEXSUM, meta):
        demos = [summaries[i] for i in json.loads(doc["demo_ids"])]
        head = ("You are given the legal documents in a civil rights lawsuit, and you are "
                "tasked to summarize the case. Write a concise summary of one paragraph (200 to "
                "250 words). The summary should contain a short description of the background, "
                "the parties involved, and the outcomes of the case.\n\nExample summaries:\n\n"
                + "\n\n".join(f"Summary: {s}" for s in demos)
                + "\n\nNow, write a summary of the following legal documents.\nLegal documents:\n")
        split_prompt(doc["input"], head, f"{TRUNCATION_MARK}\n\nNow please summarize the case.\n\n")
        assert doc["gen_prefix"] == "Summary:" and "question" not in doc
    for doc in rows_of(INFBENCH_SUM, meta, max_seq_lengths=[4096]):
        assert doc["input"].startswith(
            "You are given a book and you are tasked to summarize it. Write a summary of about "
            "1000 to 1200 words.")
        assert "For example:\n\n[story text]\nSummary: " in doc["input"]
        assert doc["input"].endswith(f"{TRUNCATION_MARK}\n\nNow summarize the book.\n\n")


def test_choice_instruction_names_the_letters_of_its_options(meta: dict[str, Any],
                                                             tmp_path: Path) -> None:
    rows = choice_rows(count=6, words=3000)
    for row in rows:
        row["options"] = row["options"][:3]
        row["answer"] = row["options"][1]
    path = write_jsonl(tmp_path / "three.jsonl", rows)
    for doc in rows_of(INFBENCH_CHOICE, {**meta, "infbench_choice_path": str(path)}):
        assert "using one single letter (A, B, or C)." in doc["input"]
        assert doc["outputs"][0] == "B"


# ------------------------------------------------------------------------------ truncation


def test_document_keeps_its_start_and_fits_with_the_generation(meta: dict[str, Any]) -> None:
    """HELMET cuts the end of the document until the prompt and the tokens to generate fit."""
    tokenizer = load_length_tokenizer(meta, task="t")
    for dataset in (NARRATIVEQA, INFBENCH_QA, INFBENCH_CHOICE, MULTI_LEXSUM):
        for doc in rows_of(dataset, meta):
            assert doc["budget_tokens"] == LENGTH - dataset.generation
            prompt = doc["input"] + doc["gen_prefix"]
            assert tokenizer.count(prompt) == doc["input_tokens"]
            assert 0.99 * doc["budget_tokens"] <= doc["input_tokens"] <= doc["budget_tokens"]
            assert doc["input"].count(TRUNCATION_MARK) == 1


def test_a_document_that_fits_is_shown_whole_without_the_mark(meta: dict[str, Any],
                                                              tmp_path: Path) -> None:
    """A short document (the converters keep documents whole) is not cut: the prompt is then
    shorter than its budget, as HELMET's would be."""
    short = [{**row, "document": row["document"][:300]} for row in longqa_rows(count=6)]
    path = write_jsonl(tmp_path / "short.jsonl", short)
    tokenizer = load_length_tokenizer(meta, task="t")
    fitted, cut = longdoc.fit_long_document(
        INFBENCH_QA, INFBENCH_QA.layout.frame(meta, LENGTH, tokenizer, task="t"),
        longdoc.load_items(INFBENCH_QA, path, task="t", key="k")[0], [],
        longdoc.long_documents(longdoc.load_items(INFBENCH_QA, path, task="t", key="k"))[0],
        tokenizer, task="t")
    assert not cut and TRUNCATION_MARK not in fitted.text
    assert short[0]["document"] in fitted.text and fitted.num_tokens < LENGTH - 10


# ------------------------------------------------------------------------- demonstrations


def test_infbench_demonstrations_are_other_rows_and_every_row_can_be_asked(
        meta: dict[str, Any]) -> None:
    """HELMET draws InfiniteBench's demonstrations from the same file, leaving out the row
    asked; NarrativeQA's come from a train split, here a held-out part never asked."""
    asked = set()
    for doc in rows_of(INFBENCH_QA, meta, num_samples=8):
        assert doc["document_id"] not in json.loads(doc["demo_ids"])
        asked.add(doc["document_id"])
    assert asked == {f"doc{i}" for i in range(8)}
    held: set[str] = set()
    narrative = rows_of(NARRATIVEQA, meta, num_samples=8)
    for doc in narrative:
        held.update(json.loads(doc["demo_ids"]))
    assert not held & {doc["document_id"] for doc in narrative}


@pytest.mark.parametrize("dataset", [NARRATIVEQA, INFBENCH_QA, INFBENCH_CHOICE, INFBENCH_SUM,
                                     MULTI_LEXSUM], ids=lambda dataset: dataset.name)
def test_every_length_asks_about_the_same_documents(dataset: Any, meta: dict[str, Any]) -> None:
    """HELMET runs one shuffled subset at every length: sample i is about the same document at
    2K and 4K tokens (every document here fills both), only its cut differs."""
    asked: dict[int, list[str]] = {}
    for doc in rows_of(dataset, meta, max_seq_lengths=[2048, 4096]):
        asked.setdefault(doc["max_length"], []).append(doc["document_id"])
    assert asked[2048] == asked[4096] and len(set(asked[2048])) == 3


def test_a_train_split_gives_the_demonstrations(meta: dict[str, Any], tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"train{i}", "document": "A short story.", "question": f"Who is {i}?",
         "answers": [f"Person {i}"]} for i in range(3)])
    for doc in rows_of(NARRATIVEQA, meta, narrativeqa_demo_path=str(train)):
        assert set(json.loads(doc["demo_ids"])) <= {"train0", "train1", "train2"}
        assert "\nAnswer: Person " in doc["input"]
    documents = {row["id"]: row["document"] for row in longqa_rows(count=8, words=3000)}
    first = rows_of(NARRATIVEQA, meta, num_shots=0)[0]
    assert first["input"].startswith(  # no demonstrations: the document follows at once
        NARRATIVEQA.instruction + "\n\n" + documents[first["document_id"]][:40])


# --------------------------------------------------------------------------------- metrics


def test_answer_line_is_read_as_helmet_parses_it() -> None:
    assert answer_line("Answer: Ada Quill\nMore text.") == "Ada Quill"
    assert answer_line("It was answer:  answer: Bram") == "Bram"   # a repeated prefix dropped
    assert answer_line("Ada Quill\nAnswer: ignored? no") == "ignored? no"
    assert answer_line("  first line \nsecond") == "first line"
    assert answer_line("Summary: The case.\nMore.", "Summary:") == "The case."


def test_answer_scores_keep_the_better_of_generation_and_answer_line() -> None:
    # The whole generation has extra words; its answer line is the reference exactly.
    scores = helmet_answer_scores("Answer: Ada Quill\nShe kept the mill key.", ["Ada Quill"])
    assert scores["exact_match"] == 100.0 and scores["rougeL_f1"] == 100.0
    # "ada quill was there" against "ada quill": P = 2/4, R = 1, F1 = 2/3 (token and ROUGE-L).
    scores = helmet_answer_scores("Ada Quill was there", ["Ada Quill", "Bram"])
    assert scores["exact_match"] == 0.0 and scores["substring_exact_match"] == 100.0
    assert scores["f1"] == pytest.approx(200 / 3) and scores["rougeL_f1"] == pytest.approx(200 / 3)
    assert scores["rougeL_recall"] == 100.0
    # SQuAD's rule: a yes/no answer scores only when both sides agree exactly.
    assert token_f1("yes it is", ["yes"]) == 0.0 and token_f1("No.", ["no"]) == 100.0


def test_rouge_lsum_unions_the_lines_where_rouge_l_does_not() -> None:
    # One LCS over "a b c d" vs "c d a b" covers 2 of 4 words; per line, "a b" and "c d" are
    # both found in the reference: ROUGE-Lsum 100.
    found = rouge_measures("alpha beta\ngamma delta", ["gamma delta alpha beta"])
    assert found["rougeL_f1"] == pytest.approx(50.0)
    assert found["rougeLsum_f1"] == pytest.approx(100.0)


@pytest.mark.parametrize(("generation", "score"), [
    ("B", 100.0), (" B", 100.0), ("Answer: B\nbecause she walked", 100.0), ("(B)", 100.0),
    ("B. the mill of ward 1", 100.0), ("I pick b. THE MILL of ward 1 here", 100.0),
    ("The answer is B.", 0.0), ("C", 0.0), ("the mill of ward 1", 0.0), ("", 0.0)])
def test_choice_is_scored_on_the_letter_as_helmet_does(generation: str, score: float) -> None:
    assert choice_exact_match(generation, "B", "the mill of ward 1") == score


def test_process_results_name_the_category_score_by_the_length(
        meta: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    [choice] = rows_of(INFBENCH_CHOICE, meta, num_samples=1)
    letter = choice["outputs"][0]
    # Without a chat template the prefix is put back: "Answer:" + " B" reads as B.
    assert process_results_longdoc(choice, [f" {letter}"]) == {
        str(LENGTH): 100.0, f"{LENGTH}_exact_match": 100.0}
    [qa] = rows_of(INFBENCH_QA, meta, num_samples=1)
    plain = process_results_longdoc(qa, [f" {qa['outputs'][0]}"])
    assert plain[str(LENGTH)] == plain[f"{LENGTH}_rougeL_f1"] == 100.0
    assert set(plain) == {str(LENGTH), *(f"{LENGTH}_{m}" for m in INFBENCH_QA.measures)}
    [summary] = rows_of(MULTI_LEXSUM, meta, num_samples=1)
    scores = process_results_longdoc(summary, [summary["outputs"][0]])
    assert scores[str(LENGTH)] == scores[f"{LENGTH}_rougeLsum_f1"] == 100.0
    # With a judge the category score is the judge's; a sample it could not score has none.
    judged = {**qa, "helmet_dataset": "narrativeqa", DOC_FIELD: "{}"}
    monkeypatch.setattr(longdoc, "judge_scores", lambda doc, text: {"judge_score": 200 / 3})
    assert process_results_longdoc(judged, [" x"])[str(LENGTH)] == pytest.approx(200 / 3)
    monkeypatch.setattr(longdoc, "judge_scores", lambda doc, text: {})
    left_out = process_results_longdoc(judged, [f" {qa['outputs'][0]}"])
    assert str(LENGTH) not in left_out and left_out[f"{LENGTH}_rougeL_f1"] == 100.0


# ---------------------------------------------------------------------------------- errors


def test_a_missing_file_says_how_to_convert_one(meta: dict[str, Any]) -> None:
    settings = {k: v for k, v in meta.items() if k != "narrativeqa_path"}
    with pytest.raises(ConfigError) as caught:
        longdoc_dataset(NARRATIVEQA, settings)
    message = str(caught.value)
    assert "`acadlm_narrativeqa: narrativeqa_path`" in message
    assert "acadlm-eval-data convert narrativeqa" in message and "never downloaded" in message


@pytest.mark.parametrize(("change", "field"), [
    ({"answer": "somewhere else"}, "field `answer`"),
    ({"options": ["one"]}, "field `options`"),
    ({"options": ["x", "x", "y", "z"], "answer": "x"}, "field `options`")])
def test_a_bad_choice_row_names_file_line_and_field(change: dict[str, Any], field: str,
                                                    meta: dict[str, Any], tmp_path: Path) -> None:
    rows = choice_rows(count=2)
    rows[1].update(change)
    path = write_jsonl(tmp_path / "choice.jsonl", rows)
    with pytest.raises(ConfigError) as caught:
        longdoc_dataset(INFBENCH_CHOICE, {**meta, "infbench_choice_path": str(path)})
    assert f"{path}:2" in str(caught.value) and field in str(caught.value)


def test_a_letter_names_the_correct_option_too(meta: dict[str, Any], tmp_path: Path) -> None:
    rows = choice_rows(count=6, words=3000)
    for row in rows:
        row["answer"] = "ABCD"[row["options"].index(row["answer"])]
    path = write_jsonl(tmp_path / "letters.jsonl", rows)
    for doc in rows_of(INFBENCH_CHOICE, {**meta, "infbench_choice_path": str(path)}):
        assert doc["answer_option"] in doc["input"] and doc["outputs"][1].startswith(
            doc["outputs"][0] + ". ")


def test_each_summarization_dataset_has_its_own_key_points_file(meta: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """HELMET ships one key-point file per dataset: ``<dataset>_keypoints_path`` names it, and
    ``summ_keypoints_path`` serves a dataset without one. The rows then carry those key points
    for the judge (nothing is asked of the judge while the prompts are built)."""
    ids = [row["id"] for row in summ_rows(count=8, words=3000)]
    lexsum = write_jsonl(tmp_path / "multi_lexsum_val.jsonl", [
        {"id": i, "summary/short_keypoints": [f"legal point of {i}"],
         "summary/long": f"expert account of {i}"} for i in ids])
    shared = write_jsonl(tmp_path / "shared.jsonl", [
        {"id": i, "keypoints": [f"shared point of {i}"]} for i in ids])
    judge = {"url": "http://127.0.0.1:9/v1", "model": "judge", "cache_dir": str(tmp_path)}
    settings = {**meta, "judge": judge, "multi_lexsum_keypoints_path": str(lexsum),
                "summ_keypoints_path": str(shared)}
    for doc in rows_of(MULTI_LEXSUM, settings):
        spec = json.loads(doc[DOC_FIELD])
        assert spec["keypoints"] == [f"legal point of {doc['document_id']}"]
        assert spec["expert_summary"] == f"expert account of {doc['document_id']}"
    for doc in rows_of(INFBENCH_SUM, settings, max_seq_lengths=[4096]):
        assert json.loads(doc[DOC_FIELD])["keypoints"] == [
            f"shared point of {doc['document_id']}"]
