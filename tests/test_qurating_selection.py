"""QuRating selection (stage 4) and training on it (stage 5)."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_setup import REPO_ROOT, ByteTokenizer, write_tiny_checkpoint, write_tiny_corpus

from acadlm_plugins.data.mixture import LONG_DOCUMENTS_DIRNAME, domain_mixture_dataset
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.qurating import selection as sel
from acadlm_plugins.qurating.dataset import (
    document_probabilities,
    quality_selected_dataset,
    quality_weighted_dataset,
)
from acadlm_plugins.qurating.select import main as select_main
from acadlm_plugins.qurating.selection import (
    Sampling,
    ScoreShards,
    SelectionConfig,
    gumbel_noise,
    plan_selections,
    scan_corpus,
    select,
)

DOMAINS = ("code", "books", "docs", "long")


def corpus_table(n: int, seed: int = 0, *, tokens: np.ndarray | None = None) -> pa.Table:
    """A synthetic annotated corpus: code scores higher on educational_value, texts are short."""
    rng = np.random.default_rng(seed)
    domain = np.asarray(DOMAINS)[rng.integers(0, len(DOMAINS), n)]
    if tokens is None:
        tokens = rng.integers(1, 60, n)
    return pa.table({
        "text": [f"document {i} of {d} " + "x" * int(t % 7) for i, (d, t) in
                 enumerate(zip(domain, tokens))],
        "domain": domain, "source": ["synthetic"] * n, "id": [f"doc-{i}" for i in range(n)],
        "num_tokens": np.asarray(tokens, dtype=np.int64),
        "score_educational_value": rng.normal(size=n) + 1.5 * (domain == "code"),
        "score_writing_style": rng.normal(size=n)})


def write_shards(folder: Path, table: pa.Table, sizes: list[int], *, row_group_size: int = 1000,
                 names: list[str] | None = None) -> Path:
    """Split ``table`` into consecutive shards of ``sizes`` rows, as the annotation names them."""
    folder.mkdir(parents=True, exist_ok=True)
    assert sum(sizes) == table.num_rows
    start = 0
    for i, size in enumerate(sizes):
        name = names[i] if names else f"scores-0-{i:05d}.parquet"
        pq.write_table(table.slice(start, size), folder / name, row_group_size=row_group_size)
        start += size
    return folder


def plans_for(folder: Path, samplings: list[Sampling], budget: int, batch_size: int = 4096):
    shards = ScoreShards.discover(folder)
    weighted = sorted({c for s in samplings for c in s.weights})
    stats = scan_corpus(shards, weighted, weighted, batch_size=batch_size)
    return plan_selections(shards, stats, samplings, budget, batch_size=batch_size)[0]


def sampling(seed: int = 0, tau: float = 1.0, weights=None, **kwargs) -> Sampling:
    return Sampling(weights=weights or {"educational_value": 1.0}, tau=tau,
                    top_k=kwargs.pop("top_k", False), seed=seed,
                    noise_key=kwargs.pop("noise_key", "id"))


def selected_ids(out: Path) -> set[str]:
    return {json.loads(line)["id"] for f in out.glob("*/train.jsonl")
            for line in f.read_text().splitlines()}


# --- inclusion probabilities -----------------------------------------------------------------
#
# Over n seeds, the inclusion frequency of an item with exact probability p has standard
# deviation sqrt(p (1 - p) / n) <= 0.0112 at n = 2000. Each item is allowed 4 standard
# deviations (a correct sampler fails one item with probability ~6e-5); the seeds are fixed, so
# the test is deterministic. The tests also check that the alternative a buggy sampler would
# produce (e.g. inclusion = k * softmax, or tau ignored) is outside that band.

SEEDS = 2000


def exact_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """P(item in the first k of sequential draws without replacement, p ∝ weights)."""
    p = weights / weights.sum()
    inclusion = np.zeros(len(p))
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for item in order:
            prob *= p[item] / left
            left -= p[item]
        inclusion[list(order)] += prob
    return inclusion


def unit_corpus(folder: Path, scores_a: list[float], scores_b: list[float] | None = None) -> Path:
    n = len(scores_a)
    columns = {"text": [f"t{i}" for i in range(n)], "domain": ["d"] * n,
               "id": [f"item-{i}" for i in range(n)], "num_tokens": np.ones(n, dtype=np.int64),
               "score_educational_value": np.asarray(scores_a, dtype=np.float64)}
    if scores_b is not None:
        columns["score_writing_style"] = np.asarray(scores_b, dtype=np.float64)
    return write_shards(folder, pa.table(columns), [n])


def zscore(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean()) / x.std()


def inclusion_frequencies(folder: Path, n: int, k: int, **kwargs) -> np.ndarray:
    plans = plans_for(folder, [sampling(seed=s, **kwargs) for s in range(SEEDS)], budget=k)
    counts = np.zeros(n)
    for plan in plans:
        assert plan.documents == k
        counts[plan.rows] += 1
    return counts / SEEDS


def band(p: np.ndarray) -> np.ndarray:
    return 4 * np.sqrt(p * (1 - p) / SEEDS)


def test_selecting_one_document_has_softmax_inclusion(tmp_path):
    raw = [0.3, 1.9, -0.4, 0.8, -1.2]
    tau = 0.8
    folder = unit_corpus(tmp_path / "s", raw)
    exact = exact_inclusion(np.exp(zscore(raw) / tau), 1)
    np.testing.assert_allclose(exact, np.exp(zscore(raw) / tau) / np.exp(zscore(raw) / tau).sum())
    freq = inclusion_frequencies(folder, 5, 1, tau=tau)
    assert np.all(np.abs(freq - exact) <= band(exact)), (freq, exact)
    ignoring_tau = np.exp(zscore(raw)) / np.exp(zscore(raw)).sum()
    assert np.any(np.abs(ignoring_tau - exact) > 2 * band(exact))


def test_selecting_two_of_five_matches_sequential_sampling_without_replacement(tmp_path):
    raw_a, raw_b = [2.5, 0.6, 0.0, -0.3, -1.0], [1.0, -1.0, 0.4, 0.0, 0.3]
    tau = 0.7
    folder = unit_corpus(tmp_path / "s", raw_a, raw_b)
    weights = {"educational_value": 1.0, "writing_style": 0.5}
    score = zscore(raw_a) + 0.5 * zscore(raw_b)
    exact = exact_inclusion(np.exp(score / tau), 2)
    assert exact.sum() == pytest.approx(2.0)
    freq = inclusion_frequencies(folder, 5, 2, tau=tau, weights=weights)
    assert np.all(np.abs(freq - exact) <= band(exact)), (freq, exact)
    naive = np.minimum(1.0, 2 * np.exp(score / tau) / np.exp(score / tau).sum())
    ignoring_tau = exact_inclusion(np.exp(score), 2)
    for wrong in (naive, ignoring_tau):
        assert np.any(np.abs(wrong - exact) > 2 * band(exact))


# --- limits, reproducibility, invariance ------------------------------------------------------


def test_top_k_and_tiny_tau_are_deterministic_top_k(tmp_path):
    table = corpus_table(500, tokens=np.ones(500, dtype=np.int64))
    folder = write_shards(tmp_path / "s", table, [200, 300])
    score = zscore(table.column("score_educational_value").to_numpy())
    expected = np.sort(np.argsort(-score, kind="stable")[:40])
    top = plans_for(folder, [sampling(seed=s, top_k=True) for s in (0, 1)], budget=40)
    tiny = plans_for(folder, [sampling(seed=s, tau=1e-7) for s in (0, 1)], budget=40)
    for plan in (*top, *tiny):
        np.testing.assert_array_equal(plan.rows, expected)


def test_equal_keys_are_taken_in_row_order(tmp_path, monkeypatch):
    table = corpus_table(300, tokens=np.ones(300, dtype=np.int64))
    table = table.set_column(table.schema.get_field_index("score_educational_value"),
                             "score_educational_value", pa.array(np.full(300, 0.25)))
    folder = write_shards(tmp_path / "s", table, [120, 180], row_group_size=50)
    monkeypatch.setattr(sel, "_MIN_COMPACTION", 8)  # compact after nearly every batch
    plan = plans_for(folder, [sampling(top_k=True)], budget=37, batch_size=25)[0]
    np.testing.assert_array_equal(plan.rows, np.arange(37))


def test_uniform_ignores_scores_and_keeps_domain_token_shares(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(8000), [8000])
    out = tmp_path / "uniform"
    report = select({"scores_dir": str(folder), "output_dir": str(out), "tau": "inf",
                     "criteria": {"educational_value": 1.0}, "budget_fraction": 0.3})["selected"]
    assert report["settings"]["mode"] == "uniform"
    shares = report["token_share_per_domain"]
    for domain in DOMAINS:
        assert shares["after"][domain] == pytest.approx(shares["before"][domain], abs=0.03)
    assert abs(report["mean_score"]["educational_value"]["mean_z_after"]) < 0.06
    sampled = select({"scores_dir": str(folder), "output_dir": str(tmp_path / "q"), "tau": 1.0,
                      "criteria": {"educational_value": 1.0}, "budget_fraction": 0.3})["selected"]
    assert sampled["mean_score"]["educational_value"]["mean_z_after"] > 0.5
    assert sampled["token_share_per_domain"]["after"]["code"] > \
        shares["before"]["code"] + 0.15


def test_same_seed_same_selection_other_seed_differs(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(3000), [1000, 2000])
    first, again, other = plans_for(folder, [sampling(3), sampling(3), sampling(4)], 10_000)
    np.testing.assert_array_equal(first.rows, again.rows)
    overlap = len(np.intersect1d(first.rows, other.rows)) / len(first.rows)
    assert overlap < 0.9


def test_selection_does_not_depend_on_shards_batches_or_shard_order(tmp_path, monkeypatch):
    table = corpus_table(1500, seed=5)
    one = write_shards(tmp_path / "one", table, [1500], row_group_size=1500)
    many = write_shards(tmp_path / "many", table, [7, 493, 700, 300], row_group_size=13)
    # Same rows, shards in another order: the id-keyed noise follows the documents.
    swapped = write_shards(tmp_path / "swapped", table, [750, 750],
                           names=["scores-1-00000.parquet", "scores-0-00000.parquet"])
    config = {"criteria": {"educational_value": 1.0, "writing_style": -0.3}, "tau": 0.5,
              "budget_tokens": 10_000, "seed": 11}
    runs = {}
    for name, folder, batch in (("one", one, 65536), ("many", many, 9), ("swapped", swapped, 64)):
        select({**config, "scores_dir": str(folder), "output_dir": str(tmp_path / f"out-{name}"),
                "batch_size": batch})
        runs[name] = selected_ids(tmp_path / f"out-{name}")
    assert runs["one"] == runs["many"] == runs["swapped"]
    # Row-keyed noise: independent of shard and batch sizes for the same row order.
    by_row = [plans_for(f, [sampling(7, noise_key="row")], 10_000, batch_size=b)[0].rows
              for f, b in ((one, 4096), (many, 9))]
    np.testing.assert_array_equal(*by_row)
    # The running threshold drops rows early; compacting after every batch changes nothing.
    monkeypatch.setattr(sel, "_MIN_COMPACTION", 4)
    compacted = plans_for(many, [sampling(7, noise_key="row")], 10_000, batch_size=9)[0]
    np.testing.assert_array_equal(compacted.rows, by_row[0])
    assert compacted.peak_candidates < 1500


def test_budget_is_hit_within_one_document(tmp_path):
    table = corpus_table(2000, seed=2)
    folder = write_shards(tmp_path / "s", table, [2000])
    tokens = table.column("num_tokens").to_numpy()
    score = zscore(table.column("score_educational_value").to_numpy())
    noise = gumbel_noise(9, ids=table.column("id").combine_chunks())
    keys = score / 0.9 + noise
    order = np.lexsort((np.arange(len(keys)), -keys))
    for budget in (1, 59, 12_345, int(tokens.sum()) - 1, int(tokens.sum())):
        plan = plans_for(folder, [sampling(9, tau=0.9)], budget)[0]
        prefix = int(np.searchsorted(np.cumsum(tokens[order]), budget)) + 1
        np.testing.assert_array_equal(plan.rows, np.sort(order[:prefix]))
        last = tokens[order[prefix - 1]]
        assert budget <= plan.tokens < budget + last


def test_select_reads_and_hashes_the_ids_once_and_matches_the_row_by_row_reference(
        tmp_path, monkeypatch):
    """The ids were read and hashed twice at 10^7 documents (pass 1 for the uniqueness check,
    pass 2 for the noise); pass 2 now draws the noise from pass 1's hashes. Same selection."""
    n, tau, seed = 3000, 0.8, 13
    tokens = np.random.default_rng(4).integers(0, 40, n)
    tokens[::9] = 0  # empty documents: no noise drawn, no hash kept, never selected
    table = corpus_table(n, seed=4, tokens=tokens)
    ids = table.column("id").to_pylist()
    ids[5::7] = [f"{i}-{'x' * (int(i) % 11)}" for i in range(5, n, 7)]  # ids of many lengths
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids))
    folder = write_shards(tmp_path / "s", table, [700, 1100, 1200], row_group_size=170)
    # The row-by-row reference, computed before the hashes are counted.
    live = tokens > 0
    score = zscore(table.column("score_educational_value").to_numpy()[live])
    keys = score / tau + gumbel_noise(seed, ids=table.column("id").combine_chunks().filter(live))
    uniform_keys = gumbel_noise(seed, ids=table.column("id").combine_chunks().filter(live))
    live_tokens, live_ids = tokens[live], np.asarray(ids)[live]
    budget = 11_111

    def reference(keys: np.ndarray) -> set[str]:
        order = np.lexsort((np.arange(keys.size), -keys))
        prefix = int(np.searchsorted(np.cumsum(live_tokens[order]), budget)) + 1
        return set(live_ids[order[:prefix]].tolist())

    hashed, id_reads = [], []
    real_hash, real_batches = sel.hash_strings, ScoreShards.iter_batches
    monkeypatch.setattr(sel, "hash_strings",
                        lambda values: hashed.append(len(values)) or real_hash(values))

    def iter_batches(self, columns, *args, **kwargs):
        id_reads.append("id" in columns)
        return real_batches(self, columns, *args, **kwargs)

    monkeypatch.setattr(ScoreShards, "iter_batches", iter_batches)
    select({"scores_dir": str(folder), "output_dir": str(tmp_path / "q"),
            "uniform_output_dir": str(tmp_path / "u"), "criteria": {"educational_value": 1.0},
            "tau": tau, "seed": seed, "budget_tokens": budget, "batch_size": 256})
    assert sum(hashed) == n, f"{sum(hashed)} ids hashed for {n} rows"
    assert sum(id_reads) == 1, id_reads
    assert selected_ids(tmp_path / "q") == reference(keys)
    assert selected_ids(tmp_path / "u") == reference(uniform_keys)
    # Through the functions: pass 2 uses the kept hashes once, then the ids (same noise).
    shards = ScoreShards.discover(folder)
    stats = scan_corpus(shards, ["educational_value"], ["educational_value"], batch_size=100,
                        unique_ids=True)
    assert stats.id_hashes is not None and stats.id_hashes.size == int(live.sum())
    kept = plan_selections(shards, stats, [sampling(seed, tau)], budget, batch_size=333)[0][0]
    assert stats.id_hashes is None  # sorted by the uniqueness check: no longer in row order
    again = plan_selections(shards, stats, [sampling(seed, tau)], budget, batch_size=333)[0][0]
    np.testing.assert_array_equal(kept.rows, again.rows)
    by_ids = plans_for(folder, [sampling(seed, tau)], budget)[0]  # scanned without unique_ids
    np.testing.assert_array_equal(kept.rows, by_ids.rows)
    # Shards that gain a document between the passes (pass 1 counted one fewer) are refused as
    # soon as a batch holds more documents than pass 1 counted, not misaligned.
    first_pass = scan_corpus(shards, [], [], batch_size=100, unique_ids=True).id_hashes
    assert first_pass is not None
    stats.id_hashes = first_pass[1:]
    with pytest.raises(DataError, match="more documents with tokens than pass 1 counted"):
        plan_selections(shards, stats, [sampling(seed, tau)], budget, batch_size=333)
    # Shards that lose a document (pass 1 counted one more) are refused once every batch is
    # read: the hashes pass 2 used fall short of pass 1's count.
    stats.id_hashes = np.concatenate([first_pass, np.array([7], dtype=first_pass.dtype)])
    lost = rf"hold {first_pass.size:,} documents with tokens, pass 1 counted " \
        rf"{first_pass.size + 1:,}: they changed during the selection"
    with pytest.raises(DataError, match=lost):
        plan_selections(shards, stats, [sampling(seed, tau)], budget, batch_size=333)


def test_gumbel_noise_is_standard_gumbel():
    noise = gumbel_noise(0, rows=np.arange(200_000))
    assert noise.mean() == pytest.approx(np.euler_gamma, abs=0.01)
    assert noise.var() == pytest.approx(math.pi ** 2 / 6, abs=0.03)
    ids = pa.array([f"doc-{i}" for i in range(1000)])
    np.testing.assert_array_equal(gumbel_noise(1, ids=ids)[500:], gumbel_noise(1, ids=ids[500:]))


# --- outputs ---------------------------------------------------------------------------------


def test_output_is_a_corpus_the_domain_mixture_reads_with_a_report(tmp_path):
    table = corpus_table(1200, seed=1)
    folder = write_shards(tmp_path / "s", table, [600, 600], row_group_size=100)
    out, uniform = tmp_path / "sel", tmp_path / "uni"
    reports = select({"scores_dir": str(folder), "output_dir": str(out),
                      "uniform_output_dir": str(uniform), "tau": 1.0, "budget_tokens": 9000,
                      "criteria": {"educational_value": 1.0}})
    for path, report in ((out, reports["selected"]), (uniform, reports["uniform"])):
        assert (path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((path / "selection.json").read_text()) == json.loads(
            json.dumps(report))
        rows = [json.loads(line) for f in path.glob("*/train.jsonl")
                for line in f.read_text().splitlines()]
        assert {"text", "domain", "source", "id", "num_tokens",
                "score_educational_value", "score_writing_style"} <= set(rows[0])
        assert sum(r["num_tokens"] for r in rows) == report["selected"]["tokens"] >= 9000
        assert sum(report["tokens_per_domain"]["after"].values()) == report["selected"]["tokens"]
        assert sum(report["token_share_per_domain"]["after"].values()) == pytest.approx(1.0)
        assert report["diversity"]["unique_domain_share"] == 1.0
        for name in ("educational_value", "writing_style"):
            assert sum(report["z_histograms"]["before"][name]) == 1200
            assert sum(report["z_histograms"]["after"][name]) == len(rows)
        # The domain `long` would be skipped by the loader; it gets a folder of its own name.
        assert sel.LOADER_SKIPPED_FOLDER == LONG_DOCUMENTS_DIRNAME
        assert report["domain_folders"]["long"] != "long"
        dataset = domain_mixture_dataset(ByteTokenizer(), data_dir=str(path), max_seq_len=32)
        assert sorted(dataset.domain_names) == sorted(report["domain_folders"].values())
        byte_tokens = sum(len(r["text"].encode()) + 2 for r in rows)
        assert sum(p.stats.tokens_in for p in dataset.corpus._packs) == byte_tokens
    assert reports["uniform"]["settings"]["mode"] == "uniform"
    assert reports["selected"]["mean_score"]["educational_value"]["after"] > \
        reports["uniform"]["mean_score"]["educational_value"]["after"]
    wrapped = quality_selected_dataset(ByteTokenizer(), selection_dir=str(out), max_seq_len=32)
    assert len(wrapped) == len(domain_mixture_dataset(ByteTokenizer(), data_dir=str(out),
                                                      max_seq_len=32))
    sample = wrapped[0]
    assert {"tokens", "labels", "input_pos", "seq_lens", "domain"} <= set(sample)


def test_rerun_replaces_a_selection_but_never_another_folder(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(300), [300])
    out = tmp_path / "out"
    config = {"scores_dir": str(folder), "output_dir": str(out), "budget_tokens": 1000,
              "criteria": {"educational_value": 1.0}}
    select(config)
    first = selected_ids(out)
    select({**config, "seed": 1})
    assert selected_ids(out) != first and not list(tmp_path.glob(".out*"))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="output_dir.*not a selection folder"):
        select({**config, "output_dir": str(precious)})
    assert (precious / "notes.txt").exists()
    with pytest.raises(ConfigError, match="dataset.selection_dir.*acadlm-qurating-select"):
        quality_selected_dataset(ByteTokenizer(), selection_dir=str(precious))


# --- killed runs -----------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def run_ids(out: Path) -> set[str]:
    return {json.loads((out / name / "selection.json").read_text())["run"]["id"]
            for name in ("selected", "uniform")}


def two_outputs(tmp_path: Path) -> dict:
    folder = write_shards(tmp_path / "s", corpus_table(300), [300])
    out = tmp_path / "out"
    return {"scores_dir": str(folder), "output_dir": str(out / "selected"),
            "uniform_output_dir": str(out / "uniform"), "budget_tokens": 1000,
            "criteria": {"educational_value": 1.0}}


KILL_AT_RENAME = """
import os, signal, sys
left = [int(sys.argv[1])]
real = os.replace
def replace(*args, **kwargs):
    left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
os.replace = replace
from acadlm_plugins.qurating.selection import select
select({"scores_dir": sys.argv[2], "output_dir": sys.argv[3], "uniform_output_dir": sys.argv[4],
        "budget_tokens": 1000, "criteria": {"educational_value": 1.0}, "seed": 1})
"""


# Each output is published by 4 renames: its report, its plot, the previous output to
# `.<name>.old-<pid>`, the scratch `.<name>.tmp-<pid>` to `<name>`; `selected` comes first.
@pytest.mark.parametrize("kill_at", [2, 4, 6, 8])
def test_a_selection_killed_at_a_rename_leaves_nothing_after_the_rerun(tmp_path, kill_at):
    config = two_outputs(tmp_path)
    out = tmp_path / "out"
    select(config)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, str(kill_at), config["scores_dir"],
         config["output_dir"], config["uniform_output_dir"]],
        env={**os.environ, "ACADLM_NO_PROGRESS": "1"}, capture_output=True, text=True,
        check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = sorted(p.name for p in out.iterdir())
    assert any(name.startswith(".") for name in left)  # a scratch folder (a copy of the texts)
    if kill_at == 4:  # between the two moves: no `selected`, its old and new copies beside it
        assert "selected" not in left and any(n.startswith(".selected.old-") for n in left)
    if kill_at == 6:  # the new `selected` beside the old `uniform`: their run ids differ
        assert len(run_ids(out)) == 2
    reports = select({**config, "seed": 1})
    assert sorted(p.name for p in out.iterdir()) == ["selected", "uniform"]
    assert run_ids(out) == {reports["selected"]["run"]["id"]} == {reports["uniform"]["run"]["id"]}
    for name in ("selected", "uniform"):
        assert len(selected_ids(out / name)) == reports[name]["selected"]["documents"]


def test_leftovers_of_a_dead_process_are_removed_and_those_of_a_live_one_kept(tmp_path, caplog):
    folder = write_shards(tmp_path / "s", corpus_table(300), [300])
    out = tmp_path / "out"
    config = {"scores_dir": str(folder), "output_dir": str(out), "budget_tokens": 1000,
              "criteria": {"educational_value": 1.0}}
    select(config)
    dead, live = dead_pid(), os.getppid()  # the parent: alive, and not this process
    names = [f".out.{kind}-{pid}" for kind in ("tmp", "old", "partial") for pid in (dead, live)]
    names += [".out.tmp-notapid", f".other.tmp-{dead}"]
    for name in names:
        (tmp_path / name / "code").mkdir(parents=True)
        (tmp_path / name / "code" / "train.jsonl").write_text('{"text": "x"}\n')
    with caplog.at_level("INFO"):
        select({**config, "seed": 1})
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert kept == sorted(n for n in names if str(dead) not in n or n.startswith(".other"))
    assert all(f".out.{kind}-{dead}" in caplog.text for kind in ("tmp", "old", "partial"))


def test_a_run_killed_between_its_two_moves_is_restored_then_replaced(tmp_path, monkeypatch):
    config = two_outputs(tmp_path)
    out = tmp_path / "out"
    select(config)
    previous, previous_uniform = selected_ids(out / "selected"), selected_ids(out / "uniform")
    pid = dead_pid()  # the state a kill before `.selected.tmp-<pid>` -> `selected` leaves
    os.replace(out / "selected", out / f".selected.old-{pid}")
    (out / f".selected.tmp-{pid}" / "code").mkdir(parents=True)
    (out / f".selected.tmp-{pid}" / "code" / "train.jsonl").write_text('{"text": "x"}\n')

    def fail(*args, **kwargs):
        raise RuntimeError("killed in pass 3")

    with monkeypatch.context() as patch:  # a rerun that fails too keeps the previous selection
        patch.setattr(sel, "write_selections", fail)
        with pytest.raises(RuntimeError):
            select({**config, "seed": 1})
    assert sorted(p.name for p in out.iterdir()) == ["selected", "uniform"]
    assert selected_ids(out / "selected") == previous
    assert len(run_ids(out)) == 1
    reports = select({**config, "seed": 1})
    assert sorted(p.name for p in out.iterdir()) == ["selected", "uniform"]
    assert selected_ids(out / "selected") != previous
    assert selected_ids(out / "uniform") != previous_uniform
    assert len(selected_ids(out / "selected")) == reports["selected"]["selected"]["documents"]
    assert run_ids(out) == {reports["selected"]["run"]["id"]}


def test_a_failure_between_the_two_outputs_is_detectable_and_leaves_no_scratch(tmp_path,
                                                                               monkeypatch):
    config = two_outputs(tmp_path)
    out = tmp_path / "out"
    select(config)
    plot, calls = sel.plot_selection, []

    def plot_once(report, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return plot(report, path)

    monkeypatch.setattr(sel, "plot_selection", plot_once)
    with pytest.raises(OSError, match="disk full"):
        select({**config, "seed": 1})
    assert sorted(p.name for p in out.iterdir()) == ["selected", "uniform"]
    assert len(run_ids(out)) == 2  # a new `selected` beside the old `uniform`


# --- bad input -------------------------------------------------------------------------------


def test_budget_larger_than_the_corpus_names_the_field_and_the_corpus_size(tmp_path):
    table = corpus_table(100)
    folder = write_shards(tmp_path / "s", table, [50, 50])
    total = int(table.column("num_tokens").to_numpy().sum())
    with pytest.raises(ConfigError) as err:
        select({"scores_dir": str(folder), "output_dir": str(tmp_path / "o"),
                "budget_tokens": total + 1, "criteria": {"educational_value": 1.0}})
    message = str(err.value)
    assert "`budget_tokens`" in message and f"{total:,} tokens in 100 documents" in message
    assert "2 shards" in message and "Fix:" in message
    assert not (tmp_path / "o").exists()


def test_missing_score_column_names_the_criterion_and_the_file(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(100), [50, 50])
    broken = folder / "scores-0-00001.parquet"
    pq.write_table(pq.read_table(broken).drop_columns(["score_educational_value"]), broken)
    with pytest.raises(DataError) as err:
        select({"scores_dir": str(folder), "output_dir": str(tmp_path / "o"),
                "budget_tokens": 10, "criteria": {"educational_value": 1.0}})
    assert str(broken) in str(err.value)
    assert "`score_educational_value`" in str(err.value) and "criteria.educational_value" in str(
        err.value)
    # A criterion of the user's own that one shard lacks: the same message, not "unknown".
    first = folder / "scores-0-00000.parquet"
    pq.write_table(pq.read_table(first).append_column("score_clarity", pa.array(np.ones(50))),
                   first)
    with pytest.raises(DataError, match=re.escape(str(broken)) + ".*`score_clarity`"):
        select({"scores_dir": str(folder), "output_dir": str(tmp_path / "o"),
                "budget_tokens": 10, "criteria": {"clarity": 1.0}})


def test_shards_missing_from_a_finished_annotation_are_an_error(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(100), [50, 50])
    (folder / "annotation.json").write_text(json.dumps({"complete": True, "shards_total": 3}))
    with pytest.raises(DataError, match="wrote 3 shards.*holds 2"):
        select({"scores_dir": str(folder), "output_dir": str(tmp_path / "o"),
                "budget_tokens": 10, "criteria": {"educational_value": 1.0}})


def test_unknown_criterion_and_unknown_key_suggest_the_fix(tmp_path):
    folder = write_shards(tmp_path / "s", corpus_table(50), [50])
    base = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "budget_tokens": 10}
    with pytest.raises(ConfigError, match=r"criteria\.educational_valu.*did you mean "
                                          r"`educational_value`"):
        select({**base, "criteria": {"educational_valu": 1.0}})
    with pytest.raises(ConfigError, match=r"budget_token`.*did you mean `budget_tokens`"):
        SelectionConfig.from_mapping({**base, "budget_token": 5, "criteria": {"x": 1}})


@pytest.mark.parametrize("tau", [0, -1.0, "nan", "warm"])
def test_tau_must_be_positive_unless_top_k_is_explicit(tmp_path, tau):
    folder = write_shards(tmp_path / "s", corpus_table(50), [50])
    config = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "budget_tokens": 10,
              "criteria": {"educational_value": 1.0}, "tau": tau}
    with pytest.raises(ConfigError, match=r"config `tau`.*top_k: true"):
        select(config)
    if tau == 0:
        report = select({**config, "top_k": True})["selected"]
        assert report["settings"]["mode"] == "top_k"


def test_command_line_runs_a_config_and_reports_errors(tmp_path, capsys):
    folder = write_shards(tmp_path / "s", corpus_table(200), [200])
    config = tmp_path / "select.yaml"
    config.write_text(f"scores_dir: {folder}\noutput_dir: {tmp_path / 'o'}\n"
                      "criteria: {educational_value: 1.0}\ntau: 2.0\nbudget_fraction: 0.5\n")
    assert select_main(["--config", str(config), "seed=3"]) == 0
    assert json.loads((tmp_path / "o" / "selection.json").read_text())["settings"]["seed"] == 3
    assert "domain token share" in capsys.readouterr().out
    assert select_main(["--config", str(config), "budget_tokens=5"]) == 2
    assert "give exactly one of `budget_tokens` and `budget_fraction`" in capsys.readouterr().err


def shards_numbering_their_rows(folder: Path, n: int = 100) -> Path:
    """Two files that both number their rows 0..n-1: the same ids in both shards."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k, domain in enumerate(("web", "books")):
        pq.write_table(pa.table({
            "text": [f"{domain} {i}" for i in range(n)], "domain": [domain] * n,
            "id": [str(i) for i in range(n)], "num_tokens": np.full(n, 10, dtype=np.int64),
            "score_educational_value": rng.normal(size=n)}), folder / f"scores-0-{k:05d}.parquet")
    return folder


def test_repeated_ids_are_refused_naming_both_rows_and_noise_key_row_samples_independently(
        tmp_path):
    folder = shards_numbering_their_rows(tmp_path / "s")
    config = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "tau": "inf",
              "criteria": {"educational_value": 1.0}, "budget_tokens": 1000}
    with pytest.raises(DataError) as err:
        select(config)
    message = str(err.value)
    first, second = (str(folder / f"scores-0-{k:05d}.parquet") for k in (0, 1))
    assert re.search(r"the id '(\d+)' is used twice: " + re.escape(first) + r" row \1 and "
                     + re.escape(second) + r" row \1 \(99 more ids repeat", message), message
    assert "Fix: give every document a unique id" in message and "`noise_key: row`" in message
    assert not (tmp_path / "o").exists()
    # Without ids in the noise the two files are sampled independently (the bug: they were
    # selected together, symmetric difference 0 for every seed).
    web_books = []
    for seed in range(3):
        out = tmp_path / f"row-{seed}"
        select({**config, "output_dir": str(out), "noise_key": "row", "seed": seed})
        web = {json.loads(line)["id"] for line in (out / "web" / "train.jsonl").open()}
        books = {json.loads(line)["id"] for line in (out / "books" / "train.jsonl").open()}
        web_books.append(len(web ^ books))
    assert min(web_books) > 20, web_books
    # Deterministic top-k without a uniform baseline draws no noise: ids are not needed.
    assert select({**config, "output_dir": str(tmp_path / "k"), "top_k": True})["selected"]


def test_a_null_id_or_a_hash_collision_names_the_rows(tmp_path, monkeypatch):
    table = corpus_table(60)
    ids = table.column("id").to_pylist()
    ids[37] = None
    folder = write_shards(tmp_path / "s", table.set_column(
        table.schema.get_field_index("id"), "id", pa.array(ids)), [30, 30])
    config = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "budget_tokens": 100,
              "criteria": {"educational_value": 1.0}}
    with pytest.raises(DataError, match=re.escape(str(folder / "scores-0-00001.parquet"))
                       + r": row 7 has no `id` \(null\).*`noise_key: row`"):
        select(config)
    # Two different ids with one 64-bit hash would share their noise just the same.
    clean = write_shards(tmp_path / "clean", corpus_table(60), [60])
    monkeypatch.setattr(sel, "hash_strings", lambda values: np.zeros(len(values), np.uint64))
    with pytest.raises(DataError, match=r"the ids 'doc-0' \(.*row 0\) and 'doc-1' \(.*row 1\) "
                                        r"have the same 64-bit hash"):
        select({**config, "scores_dir": str(clean)})


@pytest.mark.parametrize("inner", ["uniform", "selected"])
def test_one_output_folder_inside_the_other_is_refused_before_any_work(tmp_path, inner):
    folder = write_shards(tmp_path / "s", corpus_table(200), [200])
    outer = tmp_path / "run"
    paths = ({"output_dir": str(outer), "uniform_output_dir": str(outer / "uniform")}
             if inner == "uniform" else
             {"output_dir": str(outer / "selected"), "uniform_output_dir": str(outer)})
    config = {"scores_dir": str(folder), "criteria": {"educational_value": 1.0},
              "budget_tokens": 2000, **paths}
    name = "uniform_output_dir" if inner == "uniform" else "output_dir"
    with pytest.raises(ConfigError, match=rf"config `uniform_output_dir`: `{name}` .* is inside"):
        select(config)
    assert not outer.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    # Siblings work, and a rerun keeps both.
    siblings = {"output_dir": str(outer / "selected"), "uniform_output_dir": str(outer / "uniform")}
    for _ in range(2):
        select({**config, **siblings})
    assert sorted(p.name for p in outer.iterdir()) == ["selected", "uniform"]


@pytest.mark.parametrize("name", ["output_dir", "uniform_output_dir"])
def test_an_output_folder_that_cannot_be_created_is_refused_before_the_passes(tmp_path,
                                                                              monkeypatch, name):
    """It failed with a NotADirectoryError traceback after scanning the whole corpus."""
    folder = write_shards(tmp_path / "s", corpus_table(200), [200])
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = {"scores_dir": str(folder), "criteria": {"educational_value": 1.0},
              "budget_tokens": 2000, "output_dir": str(tmp_path / "selected"),
              "uniform_output_dir": str(tmp_path / "uniform"), name: str(blocker / "x")}
    monkeypatch.setattr(sel, "hash_strings", lambda values: pytest.fail("a pass started"))
    with pytest.raises(ConfigError, match="is a file") as err:
        select(config)
    assert err.value.key == name and blocker.read_text() == "not a folder"


BAD_VALUES = [("seed", "abc", "not an integer"), ("batch_size", "abc", "not an integer"),
              ("batch_size", "0", "below its minimum"),
              ("budget_fraction", "half", "not a number"),
              ("budget_fraction", "1.5", r"must be in \(0, 1\]"),
              ("top_k", "maybe", "not true or false"),
              ("budget_tokens", "ten", "not an integer")]


@pytest.mark.parametrize(("key", "value", "problem"), BAD_VALUES)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_key(tmp_path, capsys, key,
                                                                   value, problem):
    folder = write_shards(tmp_path / "s", corpus_table(50), [50])
    config = tmp_path / "select.yaml"
    config.write_text(f"scores_dir: {folder}\noutput_dir: {tmp_path / 'o'}\n"
                      "criteria: {educational_value: 1.0}\ntau: 2.0\nbudget_fraction: 0.5\n")
    extra = ["budget_fraction=null"] if key == "budget_tokens" else []
    assert select_main(["--config", str(config), *extra, f"{key}={value}"]) == 2
    assert re.search(rf"error: config `{key}`: .*{problem}.* Fix:", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
    mapping = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "budget_tokens": 10,
               "criteria": {"educational_value": 1.0}, key: value}
    if key == "budget_fraction":
        mapping["budget_tokens"] = None
    with pytest.raises(ConfigError, match=rf"config `{key}`"):
        select(mapping)


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--config", "nope.yaml"], r"config `--config`: nope.yaml does not exist\. Fix: give"),
    (["criteria=[educational_value]"], (r"config `criteria`: the override .* cannot be "
                                        r"applied.* Fix: set its entries one by one")),
    (["tau"], r"config `tau`: the override 'tau' has no `=`.* Fix: write `tau=<value>`"),
    (["x=${nope:}"], r"config `x`: cannot be resolved"),
])
def test_command_line_refuses_a_missing_file_bad_overrides_and_a_bare_key(tmp_path, capsys,
                                                                         arguments, expected):
    folder = write_shards(tmp_path / "s", corpus_table(50), [50])
    config = tmp_path / "select.yaml"
    config.write_text(f"scores_dir: {folder}\noutput_dir: {tmp_path / 'o'}\n"
                      "criteria: {educational_value: 1.0}\ntau: 2.0\nbudget_fraction: 0.5\n")
    if arguments[0] != "--config":
        arguments = ["--config", str(config), *arguments]
    assert select_main(arguments) == 2  # before the fix: a traceback, or (tau) exit 0, uniform
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_the_documented_uniform_command_runs_against_the_shipped_config(tmp_path, capsys):
    """The ``python -m acadlm_plugins.qurating.select`` example of the module docstring, with
    only the folders pointed at a synthetic corpus large enough for its budget."""
    from acadlm_plugins.qurating import select as select_module

    lines = iter(select_module.__doc__.splitlines())
    line = next(x for x in lines if "python -m acadlm_plugins.qurating.select" in x)
    command = line
    while line.rstrip().endswith("\\"):
        line = next(lines)
        command = command.rstrip().rstrip("\\") + " " + line
    command = command.split()
    overrides = command[command.index("--config") + 2:]
    assert "tau=inf" in overrides
    folder = write_shards(tmp_path / "s", corpus_table(6000), [6000])
    shipped = str(REPO_ROOT / command[command.index("--config") + 1])
    assert select_main(["--config", shipped, *overrides, f"scores_dir={folder}",
                        f"output_dir={tmp_path / 'o'}"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "selection.json").read_text())
    budget = int(next(o for o in overrides if o.startswith("budget_tokens="))
                 .split("=")[1])
    assert report["settings"]["mode"] == "uniform" and report["settings"]["budget_tokens"] == budget


def test_every_pass_shows_a_progress_bar_unless_silenced(tmp_path, capsys, monkeypatch):
    folder = write_shards(tmp_path / "s", corpus_table(300), [100, 200])
    config = {"scores_dir": str(folder), "output_dir": str(tmp_path / "o"), "budget_tokens": 500,
              "criteria": {"educational_value": 1.0}}
    monkeypatch.delenv("ACADLM_NO_PROGRESS", raising=False)
    select(config)
    shown = capsys.readouterr().err
    for label in ("selection 1/3: moments", "selection 2/3: keys", "selection 3/3: write"):
        assert re.search(re.escape(label) + r".*300/300", shown), (label, shown[-800:])
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    select(config)
    assert "selection 1/3" not in capsys.readouterr().err


# --- per-domain budgets (QuRating's --domain_field) --------------------------------------------


def test_domain_budgets_follow_token_shares_or_weights_and_add_up():
    tokens = {"web": 600, "books": 300, "code": 100, "empty": 0}
    # 101 tokens: floors 60 + 30 + 10, the spare token to the largest remainder (web, 0.6).
    assert sel.domain_budgets(tokens, 101) == {"books": 30, "code": 10, "web": 61}
    assert sum(sel.domain_budgets(tokens, 997).values()) == 997
    assert sel.domain_budgets(tokens, 100, {"web": 1, "books": 3}) == {
        "books": 75, "code": 0, "web": 25}
    with pytest.raises(ConfigError, match=r"domain_weights.code.*asks for 150 tokens.*holds 100"):
        sel.domain_budgets(tokens, 200, {"web": 1, "code": 3})
    with pytest.raises(ConfigError, match="did you mean `books`"):
        sel.domain_budgets(tokens, 100, {"bookz": 1})
    with pytest.raises(ConfigError, match="all weights are 0"):
        sel.domain_budgets(tokens, 100, {"web": 0})


def per_domain_tokens(out: Path, field: str = "domain") -> dict[str, int]:
    counts: dict[str, int] = {}
    for file in out.glob("*/train.jsonl"):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            counts[row[field]] = counts.get(row[field], 0) + row["num_tokens"]
    return counts


@pytest.mark.parametrize("tau", [1.0, "inf"])
def test_domain_field_gives_every_domain_its_share_of_the_budget(tmp_path, tau):
    table = corpus_table(4000, seed=3)
    folder = write_shards(tmp_path / "s", table, [1500, 2500], row_group_size=700)
    config = {"scores_dir": str(folder), "criteria": {"educational_value": 1.0}, "tau": tau,
              "budget_tokens": 20_000, "seed": 2, "batch_size": 512}
    out = tmp_path / "strata"
    report = select({**config, "output_dir": str(out), "domain_field": "domain",
                     "uniform_output_dir": str(tmp_path / "uni")})
    corpus = {d: int(np.asarray(table["num_tokens"])[np.asarray(table["domain"]) == d].sum())
              for d in DOMAINS}
    budgets = sel.domain_budgets(corpus, 20_000)
    longest = int(np.asarray(table["num_tokens"]).max())
    for name, path in (("selected", out), ("uniform", tmp_path / "uni")):
        per_domain = report[name]["budget_per_domain"]
        assert per_domain["domain_field"] == "domain"
        assert per_domain["split_by"] == "corpus token shares"
        written = per_domain_tokens(path)
        for domain in DOMAINS:
            row = per_domain["domains"][domain]
            assert row["budget_tokens"] == budgets[domain]
            assert row["corpus_tokens"] == corpus[domain]
            # Each domain is filled to its own budget, crossing it by less than one document.
            assert budgets[domain] <= written[domain] == row["tokens"] < budgets[domain] + longest
    # Within a domain the scores still decide (code is not over-represented, the rest is).
    if tau == 1.0:
        assert report["selected"]["mean_score"]["educational_value"]["mean_z_after"] > 0.3
        unstratified = select({**config, "output_dir": str(tmp_path / "global")})["selected"]
        share = unstratified["token_share_per_domain"]
        assert share["after"]["code"] > share["before"]["code"] + 0.15
        assert "budget_per_domain" not in unstratified
        assert unstratified["settings"]["domain_field"] is None


def test_without_domain_field_the_selection_is_the_global_one(tmp_path):
    table = corpus_table(3000, seed=8)
    folder = write_shards(tmp_path / "s", table, [3000])
    base = {"scores_dir": str(folder), "criteria": {"educational_value": 1.0}, "tau": 1.0,
            "budget_tokens": 15_000, "seed": 4}
    select({**base, "output_dir": str(tmp_path / "off"), "domain_field": None})
    global_plan = plans_for(folder, [sampling(4, tau=1.0)], 15_000)[0]
    ids = np.asarray(table["id"])
    assert selected_ids(tmp_path / "off") == set(ids[global_plan.rows])
    # One domain holding the whole corpus: per-domain budgets are the global selection.
    one = table.set_column(table.schema.get_field_index("domain"), "domain",
                           pa.array(["all"] * table.num_rows))
    single = write_shards(tmp_path / "single", one, [3000])
    select({**base, "scores_dir": str(single), "output_dir": str(tmp_path / "one"),
            "domain_field": "domain"})
    assert selected_ids(tmp_path / "one") == set(ids[global_plan.rows])


def test_domain_field_reads_struct_fields_takes_weights_and_names_mistakes(tmp_path, capsys):
    table = corpus_table(2000, seed=6)
    languages = np.where(np.arange(2000) % 4 == 0, "de", "en")
    table = table.append_column("meta", pa.array([{"lang": lang} for lang in languages]))
    folder = write_shards(tmp_path / "s", table, [2000])
    base = {"scores_dir": str(folder), "criteria": {"educational_value": 1.0}, "tau": 2.0,
            "budget_tokens": 8_000, "seed": 1}
    report = select({**base, "output_dir": str(tmp_path / "w"), "domain_field": "meta.lang",
                     "domain_weights": {"de": 1, "en": 1}})["selected"]
    assert report["budget_per_domain"]["split_by"] == "domain_weights"
    domains = report["budget_per_domain"]["domains"]
    assert domains["de"]["budget_tokens"] == domains["en"]["budget_tokens"] == 4_000
    for row in domains.values():
        assert 4_000 <= row["tokens"] < 4_060
    with pytest.raises(ConfigError, match="`domain_field`.*has no column 'lang'"):
        select({**base, "output_dir": str(tmp_path / "x"), "domain_field": "lang"})
    with pytest.raises(ConfigError, match="`domain_weights`.*`domain_field` is not set"):
        select({**base, "output_dir": str(tmp_path / "x"), "domain_weights": {"de": 1}})
    with pytest.raises(ConfigError, match="did you mean `de`"):
        select({**base, "output_dir": str(tmp_path / "x"), "domain_field": "meta.lang",
                "domain_weights": {"dee": 1}})
    # The command line takes it as an override.
    config = tmp_path / "select.yaml"
    config.write_text(f"scores_dir: {folder}\noutput_dir: {tmp_path / 'cli'}\n"
                      "criteria: {educational_value: 1.0}\ntau: 2.0\nbudget_fraction: 0.5\n")
    assert select_main(["--config", str(config), "domain_field=domain"]) == 0
    assert "budget per domain" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cli" / "selection.json").read_text())
    assert saved["settings"]["domain_field"] == "domain"


# --- sampling on the fly ---------------------------------------------------------------------


def test_quality_weighted_dataset_draws_in_proportion_to_exp_score(tmp_path):
    table = corpus_table(400, seed=4)
    folder = write_shards(tmp_path / "s", table, [150, 250], row_group_size=40)
    rows, probs = document_probabilities(ScoreShards.discover(folder),
                                         {"educational_value": 1.0}, 0.5)
    expected = np.exp(zscore(table.column("score_educational_value").to_numpy()) / 0.5)
    np.testing.assert_array_equal(rows, np.arange(400))
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-12)
    dataset = quality_weighted_dataset(ByteTokenizer(), scores_dir=str(folder),
                                       criteria={"educational_value": 1.0}, tau=0.5,
                                       max_seq_len=64, num_samples=40, seed=0)
    assert len(dataset) == 40 and dataset.unique_documents < dataset.draws
    sample = dataset[0]
    assert sample["tokens"].shape == (64,) and int(sample["seq_lens"].sum()) == 64
    text = b"".join(bytes(int(t) - 3 for t in dataset[i]["tokens"] if t >= 3)
                    for i in range(len(dataset))).decode()
    drawn_domains = re.findall(r"document \d+ of (\w+)", text)
    assert drawn_domains.count("code") / len(drawn_domains) > 0.5  # code scores 1.5 sd higher


# --- stock torchtune recipe ------------------------------------------------------------------


def test_stock_full_finetune_trains_on_a_selection(tmp_path):
    """torchtune's own full_finetune_single_device, fed by quality_selected_dataset."""
    corpus = write_tiny_corpus(tmp_path / "corpus")
    rows = [json.loads(line) for f in sorted(corpus.glob("*/train.jsonl"))
            for line in f.read_text().splitlines()]
    rng = np.random.default_rng(0)
    table = pa.table({**{k: [r[k] for r in rows] for k in ("text", "domain", "source", "id")},
                      "num_tokens": [len(r["text"].encode()) + 2 for r in rows],
                      "score_educational_value": rng.normal(size=len(rows))})
    folder = write_shards(tmp_path / "scores", table, [len(rows)])
    selection = tmp_path / "selection"
    select({"scores_dir": str(folder), "output_dir": str(selection), "budget_fraction": 0.5,
            "criteria": {"educational_value": 1.0}})
    model_dir = write_tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "ACADLM_NO_PROGRESS": "1"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "tune"), "run", "full_finetune_single_device",
         "--config", str(REPO_ROOT / "configs" / "tiny" / "stock_qurating_selected.yaml"),
         f"output_dir={out}", f"checkpointer.checkpoint_dir={model_dir}",
         f"dataset.selection_dir={selection}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log_text = "\n".join(p.read_text() for p in (out / "logs").glob("*.txt"))
    losses = [float(x) for x in re.findall(r"loss:([0-9.]+)", log_text)]
    assert len(losses) == 5
    assert losses[-1] < losses[0]
