"""QuRating annotation: token-weighted chunk scores, atomic resumable shards, clear data errors,
and the same scores from ``tune run --nproc_per_node 2`` as from one process."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import (
    _WORDS,
    REPO_ROOT,
    run_tune_expecting_failure,
    run_tune_subprocess,
    write_tiny_model_dir,
)

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating.annotation import (
    DONE_SUFFIX,
    DocumentScorer,
    open_corpus,
    plan_shards,
    resolve_corpus_files,
)
from acadlm_plugins.qurating.rater import (
    RaterModel,
    frame,
    load_backbone,
    load_rater,
    pad_batch,
    save_rater,
)

TINY_ANNOTATE_CONFIG = REPO_ROOT / "configs" / "tiny" / "qurating_annotate.yaml"
CRITERIA = ("educational_value", "writing_style")


@pytest.fixture(autouse=True)
def quiet_single_threaded(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("annotation")


@pytest.fixture(scope="module")
def rater_dir(setup_dir) -> Path:
    """A rater with random heads on the tiny model: annotation does not care how it was
    trained, only that its scores differ between texts."""
    model_dir = write_tiny_model_dir(setup_dir / "tiny_model")
    backbone = load_backbone(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    model = RaterModel(backbone, CRITERIA, "last")
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.weight, generator=torch.Generator().manual_seed(0))
    return save_rater(setup_dir / "rater", model.state_dict(), criteria=CRITERIA,
                      pooling="last", max_tokens=64, source_dir=model_dir)


def corpus_rows(domain: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(_WORDS[domain]) for _ in range(rng.randint(3, 60))),
             "domain": domain, "id": f"{domain}-{i}"} for i in range(count)]
    rows[1]["text"] = ""  # an empty document: no tokens, NaN scores
    return rows


@pytest.fixture(scope="module")
def corpus_files(setup_dir) -> list[Path]:
    """One jsonl, one parquet and one Arrow file (the formats `datasets` reads for us)."""
    folder = setup_dir / "corpus"
    folder.mkdir()
    jsonl = folder / "a_prose.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in corpus_rows("prose", 13, 0)))
    parquet = folder / "b_numbers.parquet"
    pq.write_table(pa.Table.from_pylist(corpus_rows("numbers", 11, 1)), parquet)
    arrow = folder / "c_code.arrow"
    table = pa.Table.from_pylist(corpus_rows("code", 12, 2))
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return [jsonl, parquet, arrow]


def all_input_rows(files: list[Path]) -> list[dict]:
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    rows += pq.read_table(files[1]).to_pylist()
    with pa.OSFile(str(files[2]), "rb") as source:
        rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def annotate_args(output_dir: Path, rater_dir: Path, files: list[Path], *overrides: str
                  ) -> list[str]:
    return ["--config", str(TINY_ANNOTATE_CONFIG), f"output_dir={output_dir}",
            f"rater_dir={rater_dir}", f"data_files=[{','.join(str(f) for f in files)}]",
            f"cache_dir={output_dir.parent / 'datasets_cache'}", "shard_size=5",
            "chunk_tokens=16", "batch_tokens=128", *overrides]


def run_annotate(monkeypatch, args: list[str]) -> None:
    run_recipe_main(monkeypatch, "acadlm_plugins.annotate_recipe", args)


def output_files(output_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output_dir.iterdir())
            if p.name.startswith("scores-")}


def read_scores(output_dir: Path) -> pa.Table:
    """Every shard in name order: the corpus in its original order."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(output_dir.glob("scores-*.parquet")))


@pytest.fixture(scope="module")
def uninterrupted(setup_dir, rater_dir, corpus_files) -> Path:
    """One uninterrupted single-process run, the reference for the tests below."""
    output_dir = setup_dir / "uninterrupted"
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads(1):
        run_annotate(monkeypatch, annotate_args(output_dir, rater_dir, corpus_files))
    return output_dir


# ------------------------------------------------------------------------------- scoring
def test_document_score_is_the_token_weighted_mean_of_its_chunk_scores(rater_dir):
    rater = load_rater(rater_dir)
    scorer = DocumentScorer(rater, chunk_tokens=8, batch_tokens=64)
    document = list(range(10, 30))  # 20 tokens: chunks of 8, 8 and 4 (2.5 chunks)
    short = [40, 41, 42]
    assert scorer.chunks([document, short]) == [(0, 0, 8), (0, 8, 16), (0, 16, 20), (1, 0, 3)]

    num_tokens, scores = scorer.score_documents([document, [], short])
    assert num_tokens.tolist() == [20, 0, 3]
    assert np.isnan(scores[1]).all(), "a document without tokens has no score"

    bos = rater.tokenizer.bos_id
    with torch.no_grad():
        alone = [rater.model(*pad_batch([frame(document[s:e], bos)], 0))[0].numpy()
                 for s, e in ((0, 8), (8, 16), (16, 20))]
    expected = (8 * alone[0] + 8 * alone[1] + 4 * alone[2]) / 20
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone[0], alone[2]), "the chunks score differently"

    # Batching by length is an implementation detail: one chunk per forward gives the same.
    _, one_by_one = DocumentScorer(rater, chunk_tokens=8, batch_tokens=9).score_documents(
        [document, [], short])
    np.testing.assert_allclose(one_by_one, scores, rtol=1e-5, atol=1e-6)


def test_a_chunk_length_other_than_the_raters_training_length_is_a_warning(rater_dir, caplog):
    """The rater records its training max_tokens in rater.json (64 here); chunks of another
    length are scored, with a warning naming both keys, and matching ones without."""
    import logging

    rater = load_rater(rater_dir)
    assert rater.info.max_tokens == 64
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins"):
        DocumentScorer(rater, chunk_tokens=64, batch_tokens=256)
    assert "chunk_tokens" not in caplog.text
    for chunk_tokens in (128, 16):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="acadlm_plugins"):
            scorer = DocumentScorer(rater, chunk_tokens=chunk_tokens, batch_tokens=256)
        assert scorer.chunk_tokens == chunk_tokens
        assert (f"chunk_tokens is {chunk_tokens} but the rater was trained on texts cut at "
                "max_tokens 64") in caplog.text
        assert "rater.json" in caplog.text and "Set chunk_tokens: 64 to match" in caplog.text


def test_ranks_split_the_rows_into_contiguous_shards():
    plan = plan_shards(23, 2, 5)
    assert [(s.start, s.end) for s in plan[0]] == [(0, 5), (5, 10), (10, 11)]
    assert [(s.start, s.end) for s in plan[1]] == [(11, 16), (16, 21), (21, 23)]
    assert [s.name for s in plan[1]][:1] == ["scores-00001-00000.parquet"]
    assert plan_shards(1, 2, 5)[0] == []


# --------------------------------------------------------------------------- the recipe
def test_output_holds_every_input_row_once_with_its_scores(uninterrupted, corpus_files):
    table = read_scores(uninterrupted)
    want = all_input_rows(corpus_files)
    assert table.column("id").to_pylist() == [r["id"] for r in want]
    assert table.column("text").to_pylist() == [r["text"] for r in want]
    assert table.column_names == ["text", "domain", "id", "num_tokens",
                                  "score_educational_value", "score_writing_style"]
    tokens = table.column("num_tokens").to_numpy()
    scores = table.column("score_educational_value").to_numpy()
    assert (tokens[[1, 14, 25]] == 0).all() and np.isnan(scores[[1, 14, 25]]).all()
    assert np.isfinite(scores[tokens > 0]).all() and np.std(scores[tokens > 0]) > 0
    summary = json.loads((uninterrupted / "annotation.json").read_text())
    assert summary["complete"] and summary["shards_total"] == 8
    assert summary["corpus"]["documents"] == 36 and summary["tokens_scored"] == tokens.sum()


def test_a_killed_run_resumes_to_identical_output(uninterrupted, rater_dir, corpus_files,
                                                  tmp_path, monkeypatch):
    output_dir = tmp_path / "interrupted"
    args = annotate_args(output_dir, rater_dir, corpus_files)
    run_annotate(monkeypatch, [*args, "max_shards=2"])  # a time-boxed job: 2 shards, then stop
    assert sorted(p.name for p in output_dir.glob(f"*{DONE_SUFFIX}")) == [
        "scores-00000-00000._done", "scores-00000-00001._done"]
    assert not (output_dir / "annotation.json").exists(), "not complete yet"

    # A kill in the middle of the 2nd shard of the next run ...
    calls = {"n": 0}
    real = DocumentScorer.score_documents

    def dies_on_second_call(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DocumentScorer, "score_documents", dies_on_second_call)
    with pytest.raises(KeyboardInterrupt):
        run_annotate(monkeypatch, args)
    monkeypatch.setattr(DocumentScorer, "score_documents", real)
    # ... leaving a half-written temporary file, and a kill between a shard's rename and its
    # marker (a shard file without a marker is not trusted and is scored again).
    (output_dir / ".scores-00000-00003.parquet.abc.tmp").write_bytes(b"half a parquet")
    (output_dir / "scores-00000-00001._done").unlink()
    stale = (output_dir / "scores-00000-00000.parquet").stat().st_mtime_ns

    run_annotate(monkeypatch, args)
    assert output_files(output_dir) == output_files(uninterrupted), "byte-identical shards"
    assert not list(output_dir.glob(".*")), "no temporary file is left"
    assert (output_dir / "scores-00000-00000.parquet").stat().st_mtime_ns == stale, (
        "a finished shard is never scored again")
    summary = json.loads((output_dir / "annotation.json").read_text())
    # Kept: shard 0 (first run) and shard 2 (second run, before the kill); shard 1 lost its
    # marker and was scored again, like shards 3-7.
    assert summary["complete"] and summary["shards_done_before"] == 2
    assert summary["shards_scored"] == 6


def test_a_rerun_with_every_shard_done_keeps_the_annotation_summary_informative(
        uninterrupted, rater_dir, corpus_files, tmp_path, monkeypatch, capsys):
    """annotation.json of a rerun that found every shard done: the corpus totals, this run's
    zero counts with no throughput (not "0 tokens/s"), and the counts and throughput of the
    run that scored the shards, kept from the previous annotation.json."""
    import shutil

    output_dir = tmp_path / "done"
    shutil.copytree(uninterrupted, output_dir)
    first = json.loads((output_dir / "annotation.json").read_text())
    capsys.readouterr()
    run_annotate(monkeypatch, annotate_args(output_dir, rater_dir, corpus_files))
    rerun = json.loads((output_dir / "annotation.json").read_text())
    assert rerun["complete"] and rerun["shards_scored"] == 0 and rerun["shards_done_before"] == 8
    assert rerun["documents_scored"] == rerun["tokens_scored"] == 0
    assert rerun["tokens_per_second"] is None, "no throughput when nothing was scored"
    assert "scored now: nothing (every shard was done before)" in capsys.readouterr().out
    assert rerun["corpus"] == first["corpus"]
    assert first["last_scoring_run"]["documents"] == first["documents_scored"] == 36
    assert first["last_scoring_run"]["tokens_per_second"] == first["tokens_per_second"] > 0
    assert rerun["last_scoring_run"] == first["last_scoring_run"]
    # The summary of an older version had no last_scoring_run: its own counts are kept.
    old = {k: v for k, v in first.items() if k != "last_scoring_run"}
    (output_dir / "annotation.json").write_text(json.dumps(old))
    run_annotate(monkeypatch, annotate_args(output_dir, rater_dir, corpus_files))
    rerun = json.loads((output_dir / "annotation.json").read_text())
    assert rerun["last_scoring_run"] == first["last_scoring_run"]


def test_a_different_plan_is_refused(uninterrupted, rater_dir, corpus_files, monkeypatch):
    with pytest.raises(ConfigError, match="chunk_tokens changed"):
        run_annotate(monkeypatch, annotate_args(uninterrupted, rater_dir, corpus_files,
                                                "chunk_tokens=32"))


def test_a_corpus_file_edited_in_place_is_refused(rater_dir, corpus_files, tmp_path,
                                                   monkeypatch):
    """The plan named each file by path and row count only: a file rewritten with the same
    number of rows had its shards (holding the old texts) reused, and selection would have
    trained on those."""
    import shutil

    files = []
    for file in corpus_files:
        shutil.copy2(file, tmp_path / file.name)
        files.append(tmp_path / file.name)
    output_dir = tmp_path / "scores"
    args = annotate_args(output_dir, rater_dir, files)
    run_annotate(monkeypatch, [*args, "max_shards=2"])
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    rows[0]["text"] = "EDITED " + rows[0]["text"]
    files[0].write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="files changed"):
        run_annotate(monkeypatch, args)


def test_a_copied_rater_resumes_and_a_retrained_one_is_refused(uninterrupted, rater_dir,
                                                               corpus_files, tmp_path,
                                                               monkeypatch):
    """The rater counts by its fingerprint, not by its folder: a copy of the rater (a run moved
    to another disk) resumes; a rater with other heads is refused."""
    import shutil

    output_dir = tmp_path / "moved"
    shutil.copytree(uninterrupted, output_dir)
    copied_rater = shutil.copytree(rater_dir, tmp_path / "rater_copy")
    run_annotate(monkeypatch, annotate_args(output_dir, copied_rater, corpus_files))
    assert output_files(output_dir) == output_files(uninterrupted)
    summary = json.loads((output_dir / "annotation.json").read_text())
    assert summary["complete"] and summary["shards_scored"] == 0
    info = copied_rater / "rater.json"
    info.write_text(info.read_text().replace("{", '{"retrained": true, ', 1))
    with pytest.raises(ConfigError, match="rater changed"):
        run_annotate(monkeypatch, annotate_args(output_dir, copied_rater, corpus_files))


@pytest.mark.parametrize(("override", "key", "problem"), [
    ("chunk_tokens=1k", "chunk_tokens", "is '1k', not an integer"),
    ("batch_tokens=lots", "batch_tokens", "is 'lots', not an integer"),
    ("shard_size=0", "shard_size", "is 0, below its minimum 1"),
    ("max_documents_per_file=all", "max_documents_per_file", "is 'all', not an integer"),
    ("max_shards=2.5", "max_shards", "is 2.5, not a whole number"),
    ("metric_logger.log_dir=logs", "metric_logger._component_", "is missing"),
])
def test_a_value_of_the_wrong_type_is_named_before_the_rater_is_loaded(
        rater_dir, corpus_files, tmp_path, monkeypatch, override, key, problem):
    output_dir = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"config `{re.escape(key)}`: {re.escape(problem)}"
                                          r".* Fix:"):
        run_annotate(monkeypatch, annotate_args(output_dir, rater_dir, corpus_files, override))
    assert not output_dir.exists()


def test_the_metric_logger_gets_the_annotation_throughput(rater_dir, corpus_files, tmp_path,
                                                          monkeypatch):
    output_dir = tmp_path / "out"
    run_annotate(monkeypatch, annotate_args(
        output_dir, rater_dir, corpus_files, "max_shards=2",
        "metric_logger._component_=torchtune.training.metric_logging.DiskLogger",
        f"metric_logger.log_dir={tmp_path / 'logs'}"))
    lines = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.txt")).splitlines()
    assert [line.split(" |")[0] for line in lines] == ["Step 1", "Step 2", "Step 2"]
    assert all(float(rate) > 0 for rate in re.findall(r"\btokens_per_second:(\S+)",
                                                      "\n".join(lines[:2])))
    assert "documents_per_second:" in lines[0]
    assert re.search(r"total_tokens_per_second:\S+ total_documents:10 total_tokens:\d+",
                     lines[2]), lines[2]


def test_a_row_without_text_names_the_file_and_row(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a b", "id": 1}\n\n{"text": "c", "id": 2}\n{"id": 3}\n')
    with pytest.raises(DataError, match=rf"{jsonl}:4: the row has no text \('text' is missing"):
        open_corpus(jsonl, cache_dir=tmp_path / "cache")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "id": [1, 2, 3]}), parquet)
    with pytest.raises(DataError, match=rf"{parquet}, row 3: the row has no text"):
        open_corpus(parquet, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="no column 'body'"):
        open_corpus(jsonl, text_field="body", cache_dir=tmp_path / "cache")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="holds int64, not text"):
        open_corpus(numbers, cache_dir=tmp_path / "cache")


def test_corpus_paths_resolve_as_training_data_paths_do_plus_saved_datasets(tmp_path):
    """Annotation resolves its `data_files` with the training data's resolver, plus the
    folders `datasets`' save_to_disk writes and arrow files; a value that is not a path was a
    TypeError traceback."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("b.arrow", "a.jsonl", "notes.txt"):
        (folder / name).write_text("")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    assert resolve_corpus_files([folder, saved, str(folder / "*.jsonl")]) == [
        folder / "a.jsonl", folder / "b.arrow", saved, folder / "a.jsonl"]
    with pytest.raises(ConfigError) as err:
        resolve_corpus_files([folder, 5])
    assert err.value.key == "data_files" and "holds 5, which is not a path" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="`data_files`: the directory .* holds no "
                                        "jsonl/json/parquet/arrow file"):
        resolve_corpus_files(empty)
    with pytest.raises(DataError, match="`data_files`: data file .* does not exist"):
        resolve_corpus_files(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="notes.txt is not a jsonl/json/parquet/arrow file"):
        resolve_corpus_files(folder / "notes.txt")


@pytest.mark.distributed
def test_two_processes_give_the_scores_of_one(uninterrupted, rater_dir, corpus_files,
                                              setup_dir):
    output_dir = setup_dir / "two_processes"
    run_tune_subprocess("acadlm_plugins/annotate_recipe",
                        annotate_args(output_dir, rater_dir, corpus_files), cwd=setup_dir,
                        log_file=setup_dir / "two_processes.log", nproc=2)
    names = sorted(p.name for p in output_dir.glob("scores-*.parquet"))
    assert names[0].startswith("scores-00000-") and names[-1].startswith("scores-00001-")
    assert len(list(output_dir.glob(f"*{DONE_SUFFIX}"))) == len(names)
    one, two = read_scores(uninterrupted), read_scores(output_dir)
    for column in ("id", "text", "num_tokens"):
        assert two.column(column).to_pylist() == one.column(column).to_pylist(), column
    # Each process batches its own shard's chunks, so a chunk may be scored next to other
    # chunks, padded to another length: fp32 matmuls blocked for another shape differ in the
    # last digits (6e-6 on a score of -0.10 on an AVX-512/AMX Xeon).
    for criterion in CRITERIA:
        np.testing.assert_allclose(two.column(f"score_{criterion}").to_numpy(),
                                   one.column(f"score_{criterion}").to_numpy(),
                                   rtol=1e-4, atol=1e-5)
    summary = json.loads((output_dir / "annotation.json").read_text())
    assert summary["processes"] == 2 and summary["complete"]
    assert summary["documents_scored"] == 36


@pytest.mark.distributed
def test_a_rank_that_fails_while_scoring_stops_every_rank(rater_dir, corpus_files, setup_dir):
    """Rank 1 cannot write its first shard (a folder stands at its name: a stand-in for a full
    disk): it used to stop alone while rank 0 waited for it in the run's totals (gloo's
    "Connection closed by peer" traceback; on NCCL a hang). Now rank 0 stops too, naming it."""
    output_dir = setup_dir / "rank_one_fails"
    (output_dir / "scores-00001-00000.parquet").mkdir(parents=True)
    stderr = run_tune_expecting_failure(
        "acadlm_plugins/annotate_recipe", annotate_args(output_dir, rater_dir, corpus_files),
        cwd=setup_dir)
    assert re.search(r"error \(rank 0\): rank 1 stopped while scoring its shards", stderr), \
        stderr[-3000:]
    assert "Connection closed" not in stderr, stderr[-3000:]
    assert not (output_dir / "annotation.json").exists()


@pytest.mark.distributed
def test_two_processes_on_a_one_process_output_dir_are_refused_by_every_rank(
        uninterrupted, rater_dir, corpus_files, setup_dir):
    """Only rank 0 compared the plan before a barrier: it printed the refusal while rank 1,
    left in the barrier, died with gloo's "Connection closed by peer" (on NCCL: hung). Now
    every rank prints it and exits with 2; the launcher (torchrun) exits with 1 and its own
    ChildFailedError traceback, which lists each rank's exit code."""
    stderr = run_tune_expecting_failure(
        "acadlm_plugins/annotate_recipe", annotate_args(uninterrupted, rater_dir, corpus_files),
        cwd=setup_dir)
    assert set(re.findall(r"exitcode\s*: (\d+)", stderr)) == {"2"}, \
        stderr[-3000:]
    for rank in (0, 1):
        assert re.search(rf"error \(rank {rank}\): config `output_dir`: .* holds shards of a "
                         r"different annotation \(world_size changed: was \[1\], is \[2\]\)",
                         stderr), stderr[-3000:]
    # the launcher's own traceback only, none from a rank
    tracebacks = re.split(r"(?m)^Traceback \(most recent call last\):$", stderr)[1:]
    assert all("raise ChildFailedError(" in t for t in tracebacks), stderr[-3000:]
    assert "Connection closed" not in stderr, stderr[-3000:]
