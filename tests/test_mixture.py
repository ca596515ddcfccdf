"""Domain mixtures: weights respected, domains tagged, sampler state resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections import Counter

import numpy as np
import pytest
from tiny_setup import ByteTokenizer, write_tiny_corpus

from acadlm_plugins.data.mixture import (
    DomainBatchSampler,
    domain_mixture_dataset,
    exact_domain_counts,
)
from acadlm_plugins.errors import ConfigError, DataError


@pytest.fixture
def corpus(tmp_path):
    return write_tiny_corpus(tmp_path / "corpus", docs_per_domain=30)


def test_fixed_weights_are_realized_for_stock_recipes(corpus):
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                                weights={"prose": 0.6, "numbers": 0.3, "code": 0.1},
                                num_samples=3000, seed=1)
    assert ds.domain_names == ["code", "numbers", "prose"]
    counts = Counter(ds[i]["domain"] for i in range(len(ds)))
    shares = {ds.domain_names[d]: c / len(ds) for d, c in counts.items()}
    assert shares["prose"] == pytest.approx(0.6, abs=0.03)
    assert shares["code"] == pytest.approx(0.1, abs=0.02)
    sample = ds[0]
    assert set(sample) == {"tokens", "labels", "input_pos", "seq_lens", "domain"}
    assert sample["tokens"].shape == (32,)


def test_default_weights_follow_the_natural_proportions(corpus):
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32)
    packs = np.asarray(ds.corpus.num_packs, dtype=float)
    assert np.allclose(ds.weights, packs / packs.sum())
    assert len(ds) == packs.sum()


def test_one_pass_over_the_natural_mixture_visits_every_pack_once(corpus):
    """A stock recipe's epoch over a selection (natural proportions, default length) trains on
    each selected pack exactly once; drawing each index's domain on its own left about one
    pack in eleven of a domain out and repeated others."""
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=16)
    visited = Counter(ds.pack_address(i) for i in range(len(ds)))
    every_pack = {(d, p) for d, n in enumerate(ds.corpus.num_packs) for p in range(n)}
    assert set(visited) == every_pack and set(visited.values()) == {1}
    domains = [ds.pack_address(i)[0] for i in range(len(ds))]
    assert domains != sorted(domains)  # interleaved, not one domain after another


def test_fixed_weights_give_each_domain_its_exact_share(corpus):
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                                weights={"prose": 0.5, "numbers": 0.3, "code": 0.2},
                                num_samples=101, seed=2)
    counts = Counter(ds[i]["domain"] for i in range(len(ds)))
    assert [counts[d] for d in range(3)] == [20, 30, 51]  # code, numbers, prose: 20.2/30.3/50.5
    assert exact_domain_counts(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    assert exact_domain_counts(np.array([1 / 3] * 3), 10).tolist() == [4, 3, 3]


def test_a_zero_weight_domain_is_left_out(corpus):
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                                weights={"prose": 1.0, "numbers": 1.0, "code": 0})
    assert ds.domain_names == ["numbers", "prose"]


@pytest.mark.parametrize("weights, match", [
    ({"prose": 1.0, "poetry": 1.0}, "unknown domains"),
    ({"prose": -1.0, "code": 2.0}, ">= 0"),
    ({"prose": 0.0}, "positive"),
])
def test_bad_weights_name_the_field(corpus, weights, match):
    with pytest.raises(ConfigError, match=match) as err:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               weights=weights)
    assert "weights" in str(err.value)


def test_missing_files_and_empty_domains_are_clear(tmp_path, corpus):
    with pytest.raises(DataError, match="does not exist"):
        domain_mixture_dataset(ByteTokenizer(), domains={"x": str(tmp_path / "nope.jsonl")},
                               max_seq_len=32)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="domain 'x' has no documents"):
        domain_mixture_dataset(ByteTokenizer(), domains={"x": str(empty)}, max_seq_len=32)
    with pytest.raises(DataError, match="not a directory"):
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(tmp_path / "absent"), max_seq_len=32)
    with pytest.raises(ConfigError, match="exactly one"):
        domain_mixture_dataset(ByteTokenizer(), max_seq_len=32)


@pytest.mark.parametrize(("domains", "key"), [
    ({"x": None}, "dataset.domains.x"),
    ({"x": 123}, "dataset.domains.x"),
    ({"x": {"data_files": None}}, "dataset.domains.x.data_files"),
    ({"x": {"data_files": [7]}}, "dataset.domains.x.data_files"),
])
def test_data_files_of_the_wrong_type_name_the_field(domains, key):
    with pytest.raises(ConfigError, match="path") as err:
        domain_mixture_dataset(ByteTokenizer(), domains=domains, max_seq_len=32,
                               config_key="dataset")
    assert err.value.key == key


def test_corrupt_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        domain_mixture_dataset(ByteTokenizer(), domains={"x": str(bad)}, max_seq_len=32)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no_text\.jsonl:1: the row has no 'text' field"):
        domain_mixture_dataset(ByteTokenizer(), domains={"x": str(no_text)}, max_seq_len=32)


def test_token_cache_is_reused_and_invalidated_by_content(tmp_path, corpus):
    cache = tmp_path / "cache"
    build = lambda: domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus),
                                           max_seq_len=32, cache_dir=str(cache))
    first = build()
    entries = sorted(cache.iterdir())
    assert len(entries) == 3
    second = build()
    assert sorted(cache.iterdir()) == entries
    assert (first[5]["tokens"] == second[5]["tokens"]).all()
    with open(corpus / "code" / "train.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "def extra(): return 1"}) + "\n")
    build()
    assert len(list(cache.iterdir())) == 4


def _draw(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_follows_weights_and_resumes_exactly():
    names, packs = ["a", "b", "c"], [5, 7, 50]
    sampler = DomainBatchSampler(names, packs, np.array([0.7, 0.2, 0.1]), batch_size=8, seed=3)
    _draw(sampler, 20)
    state = sampler.state_dict()
    expected = _draw(sampler, 30)
    resumed = DomainBatchSampler(names, packs, np.array([1.0, 1.0, 1.0]), batch_size=8, seed=3)
    resumed.load_state_dict(state)
    assert _draw(resumed, 30) == expected
    counts = Counter(d for batch in expected for d, _ in batch)
    assert counts[0] > counts[1] > counts[2]


def test_sampler_visits_every_pack_of_a_domain_before_repeating():
    sampler = DomainBatchSampler(["a"], [13], np.array([1.0]), batch_size=13, seed=0)
    first, second = sampler.next_batch(), sampler.next_batch()
    assert sorted(p for _, p in first) == list(range(13))
    assert sorted(p for _, p in second) == list(range(13))
    assert first != second  # reshuffled each pass


def test_ranks_share_one_global_batch_and_take_disjoint_slices():
    args = (["a", "b"], [40, 40], np.array([0.5, 0.5]))
    single = DomainBatchSampler(*args, batch_size=6, seed=9)
    ranks = [DomainBatchSampler(*args, batch_size=3, seed=9, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(5):
        assert ranks[0].next_batch() + ranks[1].next_batch() == single.next_batch()


def test_set_weights_takes_effect_and_rejects_nonsense():
    sampler = DomainBatchSampler(["a", "b"], [10, 10], np.array([0.5, 0.5]), batch_size=50)
    sampler.set_weights([0.0, 1.0])
    assert all(d == 1 for d, _ in sampler.next_batch())
    with pytest.raises(ValueError):
        sampler.set_weights([0.0, 0.0])
    with pytest.raises(ValueError):
        sampler.set_weights([float("nan"), 1.0])


def test_resuming_with_different_data_is_refused():
    sampler = DomainBatchSampler(["a", "b"], [10, 10], np.array([0.5, 0.5]), batch_size=2)
    other = DomainBatchSampler(["a", "b"], [10, 11], np.array([0.5, 0.5]), batch_size=2)
    with pytest.raises(DataError, match="same dataset config"):
        other.load_state_dict(sampler.state_dict())


def test_resume_on_fewer_processes_needs_the_same_global_batch():
    """2 ranks x batch_size 2 resumed by 1 process: batch_size 2 would halve the global batch
    (refused, naming batch_size); batch_size 4 draws exactly what the 2 ranks would have."""
    args = (["a", "b", "c"], [7, 11, 30], np.array([0.5, 0.3, 0.2]))
    ranks = [DomainBatchSampler(*args, batch_size=2, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        for rank in ranks:
            rank.next_batch()
    ranks[0].set_weights([0.2, 0.2, 0.6])  # as dynamic batch loading would, on every rank
    ranks[1].set_weights([0.2, 0.2, 0.6])
    state = ranks[0].state_dict()
    uninterrupted = [ranks[0].next_batch() + ranks[1].next_batch() for _ in range(8)]

    halved = DomainBatchSampler(*args, batch_size=2, seed=5)
    with pytest.raises(ConfigError, match="batch_size") as refused:
        halved.load_state_dict(state)
    message = str(refused.value)
    assert message.startswith("config `batch_size`")
    assert "global batch of 4" in message and "is 2" in message
    assert "--nproc_per_node" in message and "batch_size 4" in message
    assert "new output_dir" in message

    resumed = DomainBatchSampler(*args, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert _draw(resumed, 8) == uninterrupted


def test_resume_on_more_processes_with_the_same_batch_size_is_refused():
    args = (["a", "b"], [10, 10], np.array([0.5, 0.5]))
    single = DomainBatchSampler(*args, batch_size=2, seed=1)
    single.next_batch()
    doubled = DomainBatchSampler(*args, batch_size=2, seed=1, rank=1, world_size=2)
    with pytest.raises(ConfigError, match=r"config `batch_size`.*global batch of 2.*is 4"):
        doubled.load_state_dict(single.state_dict())
    halved = DomainBatchSampler(*args, batch_size=1, seed=1, rank=1, world_size=2)
    halved.load_state_dict(single.state_dict())


def test_resume_with_other_gradient_accumulation_is_refused():
    args = (["a", "b"], [10, 10], np.array([0.5, 0.5]))
    sampler = DomainBatchSampler(*args, batch_size=2, gradient_accumulation_steps=2)
    fewer = DomainBatchSampler(*args, batch_size=2, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="config `gradient_accumulation_steps`.*global batch "
                                          "of 4 samples per step .* is 2"):
        fewer.load_state_dict(sampler.state_dict())
    # the same samples per step in fewer, larger draws: the draws differ
    traded = DomainBatchSampler(*args, batch_size=4, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="config `batch_size`.*drew its 4 samples per step"):
        traded.load_state_dict(sampler.state_dict())


def test_checkpoint_without_a_recorded_global_batch_resumes_with_a_warning(caplog):
    args = (["a", "b"], [10, 10], np.array([0.5, 0.5]))
    sampler = DomainBatchSampler(*args, batch_size=2, seed=4)
    sampler.next_batch()
    state = sampler.state_dict()
    state.pop("global_batch", None)  # as written before the global batch was recorded
    expected = _draw(sampler, 3)
    resumed = DomainBatchSampler(*args, batch_size=2, seed=4)
    with caplog.at_level(logging.WARNING, logger="acadlm_plugins.data.mixture"):
        resumed.load_state_dict(state)
    warnings = [r for r in caplog.records if "global batch" in r.getMessage()]
    assert len(warnings) == 1 and "cannot check" in warnings[0].getMessage()
    assert _draw(resumed, 3) == expected


# ------------------------------------------------------- config errors name the full key


def test_weighted_and_unweighted_domains_entries_are_refused(tmp_path, corpus):
    """An entry without a weight next to weighted ones used to get weight 0 and vanish."""
    domains = {"papers": str(corpus / "prose" / "train.jsonl"),
               "code": {"data_files": str(corpus / "code" / "train.jsonl"), "weight": 0.5},
               "web": {"data_files": str(corpus / "numbers" / "train.jsonl"), "weight": 0.5}}
    with pytest.raises(ConfigError, match=r"\['code', 'web'\] have a `weight` but \['papers'\]"
                       ) as err:
        domain_mixture_dataset(ByteTokenizer(), domains=domains, max_seq_len=32,
                               config_key="dataset")
    assert err.value.key == "dataset.domains"
    assert "give every entry a weight" in str(err.value)
    # All weighted, none weighted, or overridden by top-level weights: accepted.
    domains["papers"] = {"data_files": domains["papers"], "weight": 1.0}
    ds = domain_mixture_dataset(ByteTokenizer(), domains=domains, max_seq_len=32)
    assert ds.domain_names == ["papers", "code", "web"]
    assert ds.weights.tolist() == pytest.approx([0.5, 0.25, 0.25])
    plain = {name: spec["data_files"] for name, spec in domains.items()}
    assert domain_mixture_dataset(ByteTokenizer(), domains=plain,
                                  max_seq_len=32).domain_names == ["papers", "code", "web"]
    domains["papers"] = plain["papers"]
    ds = domain_mixture_dataset(ByteTokenizer(), domains=domains, max_seq_len=32,
                                weights={"papers": 1, "code": 1, "web": 2})
    assert ds.weights.tolist() == pytest.approx([0.25, 0.25, 0.5])


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"weights": {"prose": "x", "code": 1.0}}, "dataset.weights.prose"),
    ({"domains": {"prose": {"data_files": "PROSE", "weight": "heavy"}}},
     "dataset.domains.prose.weight"),
    ({"weights": ["prose"]}, "dataset.weights"),
    ({"max_seq_len": "2048"}, "dataset.max_seq_len"),
    ({"max_seq_len": 1}, "dataset.max_seq_len"),
    ({"positions": "bogus"}, "dataset.positions"),
    ({"packing": "greedy"}, "dataset.packing"),
])
def test_bad_values_are_config_errors_naming_the_full_key(corpus, kwargs, key):
    """These used to surface as a bare ValueError / TypeError, or name the bare key."""
    if "domains" in kwargs:
        kwargs = {"domains": {"prose": {"data_files": str(corpus / "prose" / "train.jsonl"),
                                        "weight": "heavy"}}}
    else:
        kwargs = {"data_dir": str(corpus), **kwargs}
    with pytest.raises(ConfigError) as err:
        domain_mixture_dataset(ByteTokenizer(), **{"max_seq_len": 32, **kwargs},
                               config_key="dataset")
    assert err.value.key == key
    assert f"config `{key}`" in str(err.value)


def test_mode_errors_come_before_tokenizing_and_name_the_block(corpus, monkeypatch):
    """`positions` used to be checked only when the first sample was drawn, after the whole
    corpus was tokenized; without `config_key` the error says which blocks it may be."""
    from acadlm_plugins.data import mixture

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized before the config was checked")

    monkeypatch.setattr(mixture, "load_or_tokenize", no_tokenizing)
    with pytest.raises(ConfigError) as err:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               positions="bogus")
    assert err.value.key == "dataset (or validation_dataset).positions"
    with pytest.raises(ConfigError) as err:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               positions="bogus", config_key="validation_dataset")
    assert err.value.key == "validation_dataset.positions"


def test_a_folder_without_the_split_file_is_named_as_such(corpus):
    only_val = corpus / "onlyval"
    only_val.mkdir()
    (only_val / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    with pytest.raises(DataError, match=r"onlyval has no train\.jsonl or train\.parquet file"
                       ) as err:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               weights={"onlyval": 1.0, "code": 1.0}, config_key="dataset")
    assert "unknown domains" not in str(err.value)
    assert "`dataset.weights`" in str(err.value)
    ds = domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                                split="validation", weights={"onlyval": 1.0, "code": 1.0})
    assert ds.domain_names == ["code", "onlyval"]


def test_a_split_file_that_is_a_folder_is_refused_not_skipped(corpus):
    (corpus / "code" / "train.jsonl").unlink()
    (corpus / "code" / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=r"code/train\.jsonl is not a file") as err:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               config_key="dataset")
    assert "`dataset.data_dir`" in str(err.value)


def test_the_packing_log_line_names_the_split(corpus, caplog):
    with caplog.at_level(logging.INFO, logger="acadlm_plugins.data.mixture"):
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32)
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               split="validation")
    lines = [r.getMessage() for r in caplog.records if "packed" in r.getMessage()]
    assert any(line.startswith("[code/train] packed") for line in lines)
    assert any(line.startswith("[code/validation] packed") for line in lines)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_token_cache_entries_get_the_umask_mode(tmp_path, corpus, umask):
    """mkstemp writes 0600: a cache_dir shared by a group was unreadable to the others."""
    previous = os.umask(umask)
    try:
        domain_mixture_dataset(ByteTokenizer(), data_dir=str(corpus), max_seq_len=32,
                               cache_dir=str(tmp_path / "cache"))
    finally:
        os.umask(previous)
    entries = list((tmp_path / "cache").iterdir())
    assert entries and all(stat.S_IMODE(e.stat().st_mode) == 0o666 & ~umask for e in entries)


def test_bad_weights_inside_domains_name_the_domains_block(corpus):
    """Negative or all-zero weights given per entry of `domains:` name that block, not a
    `weights:` key the config does not have."""
    domains = {"code": {"data_files": str(corpus / "code" / "train.jsonl"), "weight": -1.0},
               "web": {"data_files": str(corpus / "numbers" / "train.jsonl"), "weight": 1.0}}
    with pytest.raises(ConfigError) as err:
        domain_mixture_dataset(ByteTokenizer(), domains=domains, max_seq_len=32,
                               config_key="dataset")
    assert err.value.key == "dataset.domains"
