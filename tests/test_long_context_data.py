"""Long/short mixtures: streamed token stores, lazy packs equal to pack_documents, token
shares respected, length filters, clear errors and bounded memory."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from tiny_setup import ByteTokenizer, write_tiny_corpus

from acadlm_plugins.data import streaming
from acadlm_plugins.data.documents import iter_texts
from acadlm_plugins.data.long_context import (
    check_source_settings,
    long_short_mixture,
    mixture_efficiency,
    prolong_stage1_sources,
)
from acadlm_plugins.data.mixture import DomainBatchSampler, collate_domain_packs
from acadlm_plugins.data.packing import TokenizedDocuments, pack_documents
from acadlm_plugins.data.streaming import (
    StreamingPackedSequences,
    open_token_store,
    stream_tokenize,
    write_token_store,
)
from acadlm_plugins.data.tokenization import tokenize_texts
from acadlm_plugins.errors import ConfigError, DataError

PAD = 0
doc_lists = st.lists(st.lists(st.integers(3, 200), min_size=1, max_size=40), min_size=1,
                     max_size=25)


def assert_same_samples(lazy, reference, positions):
    assert len(lazy) == len(reference)
    assert lazy.max_seq_len == reference.max_seq_len
    for i in range(len(reference)):
        want, got = reference.sample(i, positions=positions), lazy.sample(i, positions=positions)
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype
            assert got[key].tolist() == want[key].tolist(), (i, key)


@pytest.fixture
def corpus(tmp_path):
    return write_tiny_corpus(tmp_path / "corpus", docs_per_domain=30)


def tiny_sources(corpus, **overrides):
    sources = {name: {"data_files": str(corpus / name / "train.jsonl"), "share": share}
               for name, share in (("prose", 0.5), ("numbers", 0.3), ("code", 0.2))}
    for name, extra in overrides.items():
        sources[name].update(extra)
    return sources


# ------------------------------------------------------------------ equivalence with packing


@settings(max_examples=60, deadline=None)
@given(docs=doc_lists, max_seq_len=st.integers(2, 64), mode=st.sampled_from(["split", "whole"]),
       positions=st.sampled_from(["reset", "continuous"]))
def test_lazy_packs_equal_pack_documents(docs, max_seq_len, mode, positions):
    tokenized = TokenizedDocuments.from_lists(docs)
    reference = pack_documents(tokenized, max_seq_len, PAD, mode=mode)
    lazy = StreamingPackedSequences(tokenized, max_seq_len, PAD, mode=mode)
    assert lazy.stats == reference.stats
    assert_same_samples(lazy, reference, positions)


@settings(max_examples=40, deadline=None)
@given(docs=doc_lists, max_seq_len=st.integers(2, 48), mode=st.sampled_from(["split", "whole"]),
       min_tokens=st.integers(0, 30), extra=st.one_of(st.none(), st.integers(0, 20)))
def test_length_filter_packs_the_selected_documents_only(docs, max_seq_len, mode, min_tokens,
                                                         extra):
    max_tokens = None if extra is None else max(min_tokens, 1) + extra
    selected = [d for d in docs if len(d) >= min_tokens
                and (max_tokens is None or len(d) <= max_tokens)]
    lazy = StreamingPackedSequences(TokenizedDocuments.from_lists(docs), max_seq_len, PAD,
                                    mode=mode, min_tokens=min_tokens, max_tokens=max_tokens)
    assert lazy.filter_stats.documents_kept == len(selected)
    assert lazy.filter_stats.tokens_kept == sum(len(d) for d in selected)
    if not selected:
        assert len(lazy) == 0
        return
    reference = pack_documents(TokenizedDocuments.from_lists(selected), max_seq_len, PAD,
                               mode=mode)
    assert lazy.stats == reference.stats
    assert_same_samples(lazy, reference, "reset")


def cut_into_pieces(docs, min_tokens, max_tokens, piece_tokens):
    """The pieces ProLong's packer makes (``--pack_length P --min_length M``), written out
    plainly: documents in the length bounds cut every P tokens, a last piece under M dropped."""
    shortest = max(min_tokens, 1)
    pieces = []
    for doc in docs:
        if len(doc) < shortest or (max_tokens is not None and len(doc) > max_tokens):
            continue
        for start in range(0, len(doc), piece_tokens):
            piece = doc[start : start + piece_tokens]
            if len(piece) >= shortest:
                pieces.append(piece)
    return pieces


@settings(max_examples=60, deadline=None)
@given(docs=doc_lists, max_seq_len=st.integers(2, 48), mode=st.sampled_from(["split", "whole"]),
       min_tokens=st.integers(0, 30), extra=st.one_of(st.none(), st.integers(0, 60)),
       data=st.data())
def test_pieces_pack_as_documents_of_their_own(docs, max_seq_len, mode, min_tokens, extra, data):
    """`piece_tokens` cuts each kept document into pieces of at most that many tokens, each
    its own segment (so masked apart), a last piece under min_tokens dropped; the packs equal
    pack_documents over the pieces, and kept + filtered-out + dropped tokens add up."""
    min_tokens = min(min_tokens, max_seq_len)
    piece_tokens = data.draw(st.integers(max(min_tokens, 1), max_seq_len), label="piece_tokens")
    max_tokens = None if extra is None else max(min_tokens, 1) + extra
    pieces = cut_into_pieces(docs, min_tokens, max_tokens, piece_tokens)
    lazy = StreamingPackedSequences(TokenizedDocuments.from_lists(docs), max_seq_len, PAD,
                                    mode=mode, min_tokens=min_tokens, max_tokens=max_tokens,
                                    piece_tokens=piece_tokens)
    kept_docs = cut_into_pieces(docs, min_tokens, max_tokens, 1 << 30)
    stats = lazy.filter_stats
    assert stats.documents_kept == len(kept_docs)
    assert stats.pieces_kept == len(pieces) == lazy.stats.documents
    assert stats.tokens_kept == sum(len(p) for p in pieces) == lazy.stats.tokens_in
    assert stats.tokens_dropped_in_pieces == sum(len(d) for d in kept_docs) - stats.tokens_kept
    assert stats.tokens_filtered_out == sum(len(d) for d in docs) - sum(len(d) for d in kept_docs)
    assert (stats.tokens_kept + stats.tokens_filtered_out + stats.tokens_dropped_in_pieces
            == stats.tokens_total == sum(len(d) for d in docs))
    assert stats.pieces_dropped == sum(
        0 < len(d) % piece_tokens < max(min_tokens, 1) for d in kept_docs)
    if not pieces:
        assert len(lazy) == 0
        return
    assert max(len(p) for p in pieces) <= piece_tokens
    reference = pack_documents(TokenizedDocuments.from_lists(pieces), max_seq_len, PAD, mode=mode)
    assert lazy.stats == reference.stats
    assert_same_samples(lazy, reference, "reset")


def test_pieces_are_masked_apart_and_their_first_token_is_not_a_target():
    """A 10-token document cut into pieces of 4 (min_tokens 3): pieces of 4 and 4 packed into
    one 8-token sequence, its last 2 tokens dropped and counted; attention never crosses from
    one piece into the next, and the second piece's first token is not predicted from the
    first piece."""
    from torchtune.modules.attention_utils import create_block_causal_mask

    from acadlm_plugins.data.document_masks import document_ids

    doc = list(range(10, 20))
    packs = StreamingPackedSequences(TokenizedDocuments.from_lists([doc]), 8, PAD,
                                     min_tokens=3, piece_tokens=4)
    sample = packs.sample(0, positions="continuous")
    assert len(packs) == 1
    assert sample["tokens"].tolist() == doc[:8]
    assert sample["seq_lens"].tolist() == [4, 4]
    assert document_ids([sample["seq_lens"]]).tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    mask = create_block_causal_mask([sample["seq_lens"]])[0]
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert not mask[4:, :4].any() and not mask[:4, 4:].any()
    assert torch.equal(mask[:4, :4], causal) and torch.equal(mask[4:, 4:], causal)
    assert sample["labels"][4].item() == -100
    stats = packs.filter_stats
    assert (stats.pieces_kept, stats.pieces_dropped, stats.tokens_dropped_in_pieces) == (2, 1, 2)
    # Token counts are totals: "2 pieces of 8 tokens" read as 8 tokens a piece (they have 4).
    assert "pieces of 4 tokens: 2 pieces packed (8 tokens), 1 last pieces shorter than 3 " \
        "tokens dropped (2 tokens)" in stats.describe()
    # without min_tokens the short last piece is kept: nothing is dropped
    kept = StreamingPackedSequences(TokenizedDocuments.from_lists([doc]), 8, PAD, piece_tokens=4)
    assert [kept.pack(i)[1].tolist() for i in range(len(kept))] == [[4, 4], [2, 6]]
    assert kept.filter_stats.tokens_dropped_in_pieces == 0


@pytest.mark.parametrize("piece_tokens, match", [
    (0, "positive integer"), (-8, "positive integer"), (True, "positive integer"),
    ("8k", "positive integer"), (2.5, "positive integer"),
    (4, "below min_tokens"),            # every piece would be dropped
    (65, "longer than a sequence"),     # packing would cut the pieces again
])
def test_bad_piece_tokens_name_the_source_and_key(piece_tokens, match):
    spec = {"data_files": "x.jsonl", "share": 1.0, "min_tokens": 5, "piece_tokens": piece_tokens}
    with pytest.raises(ConfigError, match=match) as err:
        long_short_mixture(ByteTokenizer(), sources={"long": spec}, max_seq_len=64)
    assert err.value.key == "dataset.sources.long.piece_tokens"
    with pytest.raises(ConfigError, match=match) as err:
        StreamingPackedSequences(TokenizedDocuments.from_lists([[5] * 9]), 64, PAD,
                                 min_tokens=5, piece_tokens=piece_tokens)
    assert err.value.key == "piece_tokens"


def test_min_tokens_longer_than_a_sequence_with_pieces_names_min_tokens():
    """With pieces, min_tokens over the sequence length leaves no piece_tokens that fits both
    bounds: the error names min_tokens and says to lower it. (It used to name piece_tokens and
    say to raise it to min_tokens, whose next error said to lower it below the sequence
    length: a loop.)"""
    spec = {"data_files": "x.jsonl", "share": 1.0, "min_tokens": 100, "piece_tokens": 8}
    for piece_tokens in (8, 100):  # below min_tokens; at min_tokens but over a sequence
        with pytest.raises(ConfigError, match=r"is 100, longer than a sequence \(64 tokens\).*"
                           r"Fix: lower min_tokens to at most 64") as err:
            long_short_mixture(ByteTokenizer(), sources={"long": {
                **spec, "piece_tokens": piece_tokens}}, max_seq_len=64)
        assert err.value.key == "dataset.sources.long.min_tokens"
        with pytest.raises(ConfigError, match="lower min_tokens") as err:
            StreamingPackedSequences(TokenizedDocuments.from_lists([[5] * 9]), 64, PAD,
                                     min_tokens=100, piece_tokens=piece_tokens)
        assert err.value.key == "min_tokens"
    # Following that advice (and then the piece_tokens one) ends in a valid source.
    with pytest.raises(ConfigError, match="set piece_tokens >= min_tokens") as err:
        long_short_mixture(ByteTokenizer(), sources={"long": {**spec, "min_tokens": 64}},
                           max_seq_len=64)
    assert err.value.key == "dataset.sources.long.piece_tokens"
    check_source_settings({"long": {**spec, "min_tokens": 64, "piece_tokens": 64}}, "text",
                          "dataset", 64)
    # Without pieces, documents longer than a sequence are packed across sequences: allowed.
    check_source_settings({"long": {"data_files": "x.jsonl", "share": 1.0,
                                    "min_tokens": 100}}, "text", "dataset", 64)


def test_a_piece_source_logs_what_it_dropped(corpus, caplog):
    """A mixture source with piece_tokens packs pieces of at most that length, and its log line
    counts the pieces and the dropped last pieces with their tokens, which add up."""
    files = [corpus / "prose" / "train.jsonl"]
    lengths = [len(t.encode()) + 2 for t in iter_texts(files)]  # bytes + BOS + EOS
    sources = {"pieces": {"data_files": str(files[0]), "share": 0.5, "min_tokens": 100,
                          "piece_tokens": 128},
               "whole": {"data_files": str(files[0]), "share": 0.5}}
    with caplog.at_level("INFO", logger="acadlm_plugins.data.long_context"):
        ds = long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=256)
    packs = ds.corpus.packs("pieces")
    stats = packs.filter_stats
    kept = [n for n in lengths if n >= 100]
    dropped = [n % 128 for n in kept if 0 < n % 128 < 100]
    assert stats.documents_kept == len(kept) and stats.pieces_dropped == len(dropped)
    assert stats.tokens_dropped_in_pieces == sum(dropped)
    assert stats.tokens_kept == sum(kept) - sum(dropped) == packs.stats.tokens_out
    pieces = []
    for i in range(len(packs)):
        _, segments, filled = packs.pack(i)
        pieces += segments.tolist() if filled == 256 else segments[:-1].tolist()  # less the pad
    assert max(pieces) <= 128 and sum(pieces) == stats.tokens_kept
    assert (f"{stats.pieces_dropped} last pieces shorter than 100 tokens dropped "
            f"({sum(dropped):,} tokens)") in caplog.text
    assert ds.corpus.packs("whole").filter_stats.tokens_kept == sum(lengths)


@pytest.mark.parametrize("mode", ["split", "whole"])
@pytest.mark.parametrize("positions", ["reset", "continuous"])
def test_packs_read_from_a_disk_store_equal_pack_documents(tmp_path, corpus, mode, positions):
    files = [corpus / "prose" / "train.jsonl", corpus / "code" / "train.jsonl"]
    in_memory = tokenize_texts(iter_texts(files), ByteTokenizer())
    on_disk = stream_tokenize(files, ByteTokenizer(), cache_dir=tmp_path / "cache",
                              chunk_tokens=100)  # many small writes
    assert isinstance(on_disk.tokens, np.memmap)
    assert np.array_equal(on_disk.offsets, in_memory.offsets)
    assert np.array_equal(on_disk.tokens, in_memory.tokens)
    reference = pack_documents(in_memory, 96, PAD, mode=mode)
    lazy = StreamingPackedSequences(on_disk, 96, PAD, mode=mode)
    assert lazy.stats == reference.stats
    assert_same_samples(lazy, reference, positions)


# ----------------------------------------------------------------------- token store, memory


def test_token_store_is_cached_by_content_and_written_atomically(tmp_path, corpus, monkeypatch):
    cache = tmp_path / "cache"
    files = [corpus / "numbers" / "train.jsonl"]
    first = stream_tokenize(files, ByteTokenizer(), cache_dir=cache)
    assert [p.name.endswith(".tokens") for p in cache.iterdir()] == [True]  # no partial left

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reusing the store")

    with monkeypatch.context() as patch:
        patch.setattr(streaming, "iter_token_arrays", refuse)
        again = stream_tokenize(files, ByteTokenizer(), cache_dir=cache)
    assert np.array_equal(again.tokens, first.tokens)
    with open(files[0], "a") as handle:
        handle.write(json.dumps({"text": "41 42"}) + "\n")
    changed = stream_tokenize(files, ByteTokenizer(), cache_dir=cache)
    assert changed.num_documents == first.num_documents + 1
    assert len(list(cache.iterdir())) == 2


def _synthetic_documents(count: int, length: int):
    rng = np.random.default_rng(0)
    for _ in range(count):
        yield rng.integers(3, 250, size=length, dtype=np.int32)


def test_memory_is_bounded_by_a_chunk_not_the_corpus(tmp_path):
    """Writing 8 MiB of tokens in 256 KiB chunks, then packing them, allocates about a chunk,
    not the corpus: tokens are appended to disk and read back through a memory map."""
    count, length, chunk = 250, 8192, 1 << 16  # 2,048,000 tokens = 8 MiB of int32
    corpus_bytes = count * length * 4
    warm = write_token_store(_synthetic_documents(3, 50), tmp_path / "warm")  # lazy imports
    StreamingPackedSequences(open_token_store(warm), 64, PAD, mode="whole").sample(0)
    tracemalloc.start()
    write_token_store(_synthetic_documents(count, length), tmp_path / "store", chunk_tokens=chunk)
    _, writing_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    docs = open_token_store(tmp_path / "store")
    split = StreamingPackedSequences(docs, 4096, PAD, mode="split")
    whole = StreamingPackedSequences(docs, 3000, PAD, mode="whole", min_tokens=10)
    _, building_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert docs.num_tokens == count * length
    assert writing_peak < 4 * chunk * 4, writing_peak  # the chunk and its concatenation
    assert building_peak < corpus_bytes / 50, building_peak
    for packs in (split, whole):
        assert isinstance(packs.documents.tokens, np.memmap)  # not an in-memory copy
        assert packs.documents.tokens is docs.tokens
        in_memory = [v for v in vars(packs).values() if isinstance(v, np.ndarray)]
        assert all(v.nbytes <= 8 * (count + 1) for v in in_memory)  # per document, not token
    # a spawned data-loader worker gets where to map the file, not a copy of the tokens
    blob = pickle.dumps(whole)
    assert len(blob) < corpus_bytes / 50
    copy = pickle.loads(blob)
    assert isinstance(copy.documents.tokens, np.memmap)
    assert copy.sample(7)["tokens"].tolist() == whole.sample(7)["tokens"].tolist()


# ---------------------------------------------------------------------------- the mixture


def test_sources_are_tagged_and_token_shares_respected(corpus):
    """Whole packing pads each source differently; token shares still hold, because a
    source's packs are drawn in proportion to share / efficiency."""
    ds = long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus), max_seq_len=256,
                            packing="whole", num_samples=4000, seed=3)
    assert ds.domain_names == ["prose", "numbers", "code"]
    assert ds.packed is True
    efficiencies = [ds.corpus.packs(n).stats.efficiency for n in ds.domain_names]
    assert max(efficiencies) - min(efficiencies) > 0.01  # the correction matters here
    # packs drawn in proportion to share / efficiency: with efficiencies 0.70410, 0.64522 and
    # 0.66233, 0.5 / 0.70410 : 0.3 / 0.64522 : 0.2 / 0.66233, normalized
    assert efficiencies == pytest.approx([0.70410, 0.64522, 0.66233], abs=1e-5)
    assert list(ds.weights) == pytest.approx([0.48077, 0.31479, 0.20444], abs=1e-5)
    real_tokens = Counter()
    for i in range(len(ds)):
        sample = ds[i]
        real_tokens[ds.domain_names[sample["domain"]]] += int((sample["tokens"] != PAD).sum())
        if sample["domain"] == 1:  # numbers: digits, spaces, BOS/EOS only
            text = ByteTokenizer().decode(sample["tokens"].tolist())
            assert set(text) <= set("0123456789 ")
    total = sum(real_tokens.values())
    for name, share in (("prose", 0.5), ("numbers", 0.3), ("code", 0.2)):
        # uncorrected, prose would get 0.5 x 0.70410 / 0.67703 = 0.52 of the tokens
        assert real_tokens[name] / total == pytest.approx(share, abs=0.005)
    assert mixture_efficiency(ds) == pytest.approx(
        sum(real_tokens.values()) / (len(ds) * 256), abs=0.02)


def test_mixture_works_with_the_batch_sampler_and_collate(corpus):
    ds = long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus), max_seq_len=64)
    sampler = DomainBatchSampler.for_dataset(ds, batch_size=4, seed=0)
    keys = sampler.next_batch()
    batch = collate_domain_packs([ds[key] for key in keys])
    assert batch["domain"].tolist() == [d for d, _ in keys]
    assert batch["tokens"].shape == (4, 64)
    assert len(ds) == sum(ds.corpus.num_packs)


def test_resuming_on_changed_source_text_is_refused_and_on_the_same_text_accepted(corpus,
                                                                                  tmp_path):
    """Streamed packs had no content digest, so the sampler skipped the check that refuses
    changed in-memory domains: a source rewritten with other text and the same pack counts was
    resumed silently. The digest rests on the token store's content key (no second pass over
    the tokens); the same text, even re-tokenized into a fresh cache, resumes."""
    def build(cache):
        return long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus), max_seq_len=64,
                                  cache_dir=cache)

    ds = build(tmp_path / "cache")
    sampler = DomainBatchSampler.for_dataset(ds, batch_size=4, seed=1)
    _ = [sampler.next_batch() for _ in range(3)]
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(5)]
    assert state["content"] is not None and len(set(state["content"])) == 3

    resumed = DomainBatchSampler.for_dataset(build(tmp_path / "other_cache"), batch_size=4,
                                             seed=1)
    resumed.load_state_dict(state)  # unchanged text: accepted, the same batches follow
    assert [resumed.next_batch() for _ in range(5)] == expected

    train = corpus / "prose" / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    rows[0]["text"] = rows[0]["text"].upper()  # same bytes per text: same packs, other tokens
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = build(tmp_path / "cache")
    assert changed.corpus.num_packs == ds.corpus.num_packs
    assert changed[(0, 0)]["tokens"].tolist() != ds[(0, 0)]["tokens"].tolist()
    with pytest.raises(DataError, match=r"the text of domains \['prose'\] changed"):
        DomainBatchSampler.for_dataset(changed, batch_size=4, seed=1).load_state_dict(state)


def test_streamed_packs_without_a_store_key_digest_their_tokens_and_selection():
    docs = TokenizedDocuments.from_lists([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    other = TokenizedDocuments.from_lists([[5, 6, 7], [8, 9], [10, 11, 12, 14]])

    def digest(documents, **kwargs):
        return StreamingPackedSequences(documents, 4, PAD, **kwargs).content_digest()

    assert digest(docs) == digest(TokenizedDocuments.from_lists([[5, 6, 7], [8, 9],
                                                                 [10, 11, 12, 13]]))
    assert len({digest(docs), digest(other), digest(docs, min_tokens=3),
                digest(docs, mode="whole"), digest(docs, content_key="k"),
                digest(docs, piece_tokens=2)}) == 6


def test_component_from_a_yaml_config(corpus):
    from torchtune import config

    cfg = OmegaConf.create(f"""
    dataset:
      _component_: acadlm_plugins.data.long_context.long_short_mixture
      max_seq_len: 64
      positions: reset
      sources:
        long_prose: {{data_files: "{corpus}/prose/*.jsonl", share: 0.6, min_tokens: 300}}
        short: {{data_files: ["{corpus}/code/train.jsonl", "{corpus}/numbers/train.jsonl"],
                 share: 0.4, max_tokens: 200}}
    """)
    ds = config.instantiate(cfg.dataset, ByteTokenizer())
    assert ds.domain_names == ["long_prose", "short"]
    assert ds.corpus.positions == "reset"
    assert ds[0]["tokens"].shape == (64,)


def test_min_tokens_keeps_only_long_documents(corpus, caplog):
    files = [corpus / "prose" / "train.jsonl"]
    lengths = [len(t.encode()) + 2 for t in iter_texts(files)]  # bytes + BOS + EOS
    threshold = int(np.median(lengths))
    sources = {"long": {"data_files": str(files[0]), "share": 1.0, "min_tokens": threshold},
               "short": {"data_files": str(files[0]), "share": 1.0,
                         "max_tokens": threshold - 1}}
    with caplog.at_level("INFO", logger="acadlm_plugins.data.long_context"):
        ds = long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=1024,
                                packing="whole")
    long, short = ds.corpus.packs("long"), ds.corpus.packs("short")
    assert long.filter_stats.documents_kept == sum(n >= threshold for n in lengths)
    assert long.filter_stats.tokens_kept == sum(n for n in lengths if n >= threshold)
    assert short.filter_stats.documents_kept == sum(n < threshold for n in lengths)
    assert long.filter_stats.documents_total == len(lengths)
    # every document fits in a pack, so whole packing shows each one as a segment
    for packs, keep in ((long, lambda n: n >= threshold), (short, lambda n: n < threshold)):
        segments = [n for i in range(len(packs)) for n in packs.pack(i)[1][:-1].tolist()]
        assert sorted(segments) == sorted(n for n in lengths if keep(n))
    assert long.documents is short.documents  # one token store for both
    log = caplog.text
    assert "[long] length filter" in log and f"of {len(lengths)} documents" in log
    assert "efficiency" in log and "mixture efficiency" in log


def test_split_mode_is_nearly_free_of_padding(corpus):
    ds = long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus), max_seq_len=64)
    for name in ds.domain_names:
        stats = ds.corpus.packs(name).stats
        assert stats.pad_tokens < stats.max_seq_len  # only the last pack is padded
        assert stats.tokens_out == stats.tokens_in


# ----------------------------------------------------------------------------- the errors


def test_min_tokens_above_every_document_names_the_field_and_the_longest(corpus):
    longest = max(len(t.encode()) + 2 for t in iter_texts([corpus / "code" / "train.jsonl"]))
    sources = tiny_sources(corpus, code={"min_tokens": 100_000})
    with pytest.raises(ConfigError) as err:
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    message = str(err.value)
    assert err.value.key == "dataset.sources.code.min_tokens"
    assert f"the longest has {longest:,}" in message
    assert f"lower `min_tokens` to at most {longest}" in message


def test_max_tokens_below_every_document_names_max_tokens(corpus):
    sources = tiny_sources(corpus, numbers={"min_tokens": 1, "max_tokens": 2})
    with pytest.raises(ConfigError) as err:
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    assert err.value.key == "dataset.sources.numbers.max_tokens"


@pytest.mark.parametrize("shares, key, match", [
    ({"prose": -0.1}, "dataset.sources.prose.share", ">= 0"),
    ({"numbers": float("nan")}, "dataset.sources.numbers.share", "finite"),
    ({"code": "a lot"}, "dataset.sources.code.share", "finite"),
    ({"code": True}, "dataset.sources.code.share", "finite"),  # was read as 1.0
    ({"prose": 0, "numbers": 0, "code": 0}, "dataset.sources.prose.share", "share 0"),
])
def test_bad_shares_name_the_source(corpus, shares, key, match):
    sources = tiny_sources(corpus, **{n: {"share": s} for n, s in shares.items()})
    with pytest.raises(ConfigError, match=match) as err:
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    assert err.value.key == key


def test_a_validation_block_names_its_own_key_in_errors(corpus):
    """Built as `validation_dataset`, a bad share used to be reported as `dataset.sources...`,
    a key the user never wrote there."""
    from acadlm_plugins.training.components import instantiate_component

    cfg = OmegaConf.create({"validation_dataset": {
        "_component_": "acadlm_plugins.data.long_context.long_short_mixture",
        "max_seq_len": 64,
        "sources": tiny_sources(corpus, code={"share": -1.0})}})
    with pytest.raises(ConfigError) as err:
        instantiate_component(cfg, "validation_dataset", ByteTokenizer())
    assert err.value.key == "validation_dataset.sources.code.share"
    cfg.validation_dataset.sources = tiny_sources(corpus)
    cfg.validation_dataset.positions = "sideways"
    with pytest.raises(ConfigError) as err:
        instantiate_component(cfg, "validation_dataset", ByteTokenizer())
    assert err.value.key == "validation_dataset.positions"


def test_a_zero_share_source_is_not_read(corpus, tmp_path):
    sources = tiny_sources(corpus, code={"share": 0})
    sources["code"]["data_files"] = str(tmp_path / "missing.jsonl")  # never opened
    ds = long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    assert ds.domain_names == ["prose", "numbers"]


@pytest.mark.parametrize("spec, key", [
    ({"data_files": "x.jsonl"}, "dataset.sources.bad.share"),
    ({"share": 1.0}, "dataset.sources.bad.data_files"),
    ({"data_files": "x.jsonl", "share": 1.0, "weight": 2}, "dataset.sources.bad"),
    ({"data_files": "x.jsonl", "share": 1.0, "min_tokens": -1}, "dataset.sources.bad.min_tokens"),
    ({"data_files": "x.jsonl", "share": 1.0, "min_tokens": 50, "max_tokens": 10},
     "dataset.sources.bad.max_tokens"),
])
def test_malformed_source_settings_name_the_key(spec, key):
    with pytest.raises(ConfigError) as err:
        long_short_mixture(ByteTokenizer(), sources={"bad": spec}, max_seq_len=64)
    assert err.value.key == key


@pytest.mark.parametrize("data_files", [None, 123, {"path": "x.jsonl"}, ["x.jsonl", 5]])
def test_data_files_of_the_wrong_type_name_the_field(data_files):
    """null or a number used to end in `TypeError: 'NoneType' object is not iterable`."""
    with pytest.raises(ConfigError, match="path") as err:
        long_short_mixture(ByteTokenizer(), sources={"bad": {"data_files": data_files,
                                                             "share": 1.0}}, max_seq_len=64)
    assert err.value.key == "dataset.sources.bad.data_files"


def test_a_text_field_that_is_not_a_name_names_the_field(corpus):
    sources = tiny_sources(corpus, code={"text_field": 5})
    with pytest.raises(ConfigError) as err:
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    assert err.value.key == "dataset.sources.code.text_field"


def test_a_source_reads_its_own_text_field(corpus, tmp_path):
    """`text_field` set on one source applies to that source only; the others keep the
    mixture's `text`."""
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"body": f"zz{i} qq", "text": ""}) + "\n"
                              for i in range(3)))
    sources = tiny_sources(corpus, code={"data_files": str(bodies), "text_field": "body"})
    ds = long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64, packing="whole")
    assert ds.corpus.packs("code").filter_stats.documents_kept == 3
    assert ds.corpus.packs("prose").filter_stats.documents_kept == 30
    code = ds.corpus.packs("code").sample(0, positions="reset")["tokens"].tolist()
    assert "zz0 qq" in ByteTokenizer().decode([t for t in code if t != PAD])


def test_prolong_stage1_long_min_tokens_applies_to_the_long_sources_only(tmp_path):
    sources = prolong_stage1_sources(tmp_path, long_min_tokens=5)
    assert {name: spec["min_tokens"] for name, spec in sources.items()} == {
        "code_repos": 5, "books": 5, "short_code": 0, "short_books": 0, "short_scripture": 0,
        "short_docs": 0}
    assert sources["books"]["data_files"] == str(tmp_path / "long" / "books.jsonl")


def test_missing_file_names_the_field(corpus, tmp_path):
    sources = tiny_sources(corpus, numbers={"data_files": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError, match=r"dataset\.sources\.numbers\.data_files.*does not exist"):
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)


def test_corrupt_jsonl_line_names_file_and_line(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "broken\n')
    sources = tiny_sources(corpus, code={"data_files": str(bad)})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        long_short_mixture(ByteTokenizer(), sources=sources, max_seq_len=64)
    assert not list(tmp_path.glob("**/*.partial"))


def test_a_source_without_text_is_a_data_error(corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match=r"dataset\.sources\.code\.data_files.*no document"):
        long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus, code={
            "data_files": str(empty)}), max_seq_len=64)


def test_unknown_modes_and_unpacked_are_refused(corpus):
    for kwargs, key in (({"packing": "greedy"}, "dataset.packing"),
                        ({"positions": "absolute"}, "dataset.positions"),
                        ({"packed": False}, "dataset.packed"),
                        ({"max_seq_len": 1}, "dataset.max_seq_len")):
        with pytest.raises(ConfigError) as err:
            long_short_mixture(ByteTokenizer(), sources=tiny_sources(corpus),
                               **{"max_seq_len": 64, **kwargs})
        assert err.value.key == key


# ----------------------------------------------------------------- the ProLong stage configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LONG_SOURCE_KEYS = ("share", "min_tokens", "max_tokens", "piece_tokens")


def long_sources(path: Path) -> dict[str, tuple]:
    """The config's sources with a length bound, as (share, min, max, piece) tuples."""
    sources = OmegaConf.load(path).dataset.sources
    return {name: tuple(spec.get(key) for key in LONG_SOURCE_KEYS)
            for name, spec in sources.items() if spec.get("min_tokens")}


def checked_dataset_block(path: Path, *overrides: str) -> None:
    """The config's dataset block checked as `acadlm-plan` and the recipe check it (no file
    read; `max_seq_len` resolved through `${long_context.max_seq_len}`)."""
    import acadlm_plugins.defaults  # noqa: F401  (registers ${acadlm_home:})
    from acadlm_plugins.training.components import check_component

    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    check_component(cfg.dataset, "dataset")


def test_the_demo_stage2_mixes_stage_length_documents_and_stage1_length_pieces():
    """train_512K.sh: code 15% at 512K + 15% at 64K, books 5% + 25%, the 64K ones being 64K
    pieces of longer documents. The demo's stage 2 (16K after an 8K stage 1) had 30% + 30% of
    >= 16K documents only."""
    stage1 = OmegaConf.load(CONFIGS / "smollm2/long_context_stage1.yaml").long_context.max_seq_len
    path = CONFIGS / "smollm2/long_context_stage2.yaml"
    stage2 = OmegaConf.load(path).long_context.max_seq_len
    assert (stage1, stage2) == (8192, 16384)
    assert long_sources(path) == {
        "code_repos_16k": (0.15, stage2, None, stage2),
        "code_repos_8k": (0.15, stage1, None, stage1),
        "books_16k": (0.05, stage2, None, stage2),
        "books_8k": (0.25, stage1, None, stage1)}
    shares = [spec.share for spec in OmegaConf.load(path).dataset.sources.values()]
    assert sum(shares) == pytest.approx(1.0)
    checked_dataset_block(path)


@pytest.mark.parametrize("config, length", [("smollm2/long_context_stage1.yaml", 8192),
                                            ("llama3/prolong_64k_stage1.yaml", 65536)])
def test_stage1_cuts_its_long_sources_into_stage_length_pieces(config: str, length: int):
    """train_64K.sh's long data (book-65536, thestackv1_concat_by_repo-65536) is documents of
    >= 64K tokens cut into 64K pieces, a last piece under 64K dropped (datatools' `pack
    --pack_length 65536 --min_length 65536`); the stage-1 configs kept those documents whole,
    continuing each into the next sequence, where its last part shared a sequence with the
    next document."""
    path = CONFIGS / config
    assert OmegaConf.load(path).long_context.max_seq_len == length
    assert long_sources(path) == {"code_repos": (0.30, length, None, length),
                                  "books": (0.30, length, None, length)}
    checked_dataset_block(path)


def test_the_llama3_stage2_cuts_its_64k_sources_into_64k_pieces():
    """ProLong's -65536 data is 64K-token pieces (`pack --pack_length 65536 --min_length
    65536`); `max_tokens: 524287` kept 64K-512K documents whole (attending up to 512K) and
    left every longer one out of the 64K data."""
    stage1 = OmegaConf.load(CONFIGS / "llama3/prolong_64k_stage1.yaml").long_context.max_seq_len
    path = CONFIGS / "llama3/prolong_512k_stage2.yaml"
    assert long_sources(path) == {
        "code_repos_512k": (0.15, 524288, None, 524288),
        "code_repos_64k": (0.15, stage1, None, stage1),
        "books_512k": (0.05, 524288, None, 524288),
        "books_64k": (0.25, stage1, None, stage1)}
    checked_dataset_block(path)
    with pytest.raises(ConfigError, match="longer than a sequence") as err:
        checked_dataset_block(path, "dataset.sources.books_64k.piece_tokens=1048576")
    assert err.value.key == "dataset.sources.books_64k.piece_tokens"


# --------------------------------------------------------------------------- integration


def default_long_corpus() -> Path:
    """The embedded corpus with its long documents, which these integration tests read. A
    missing embedded default fails them (``DefaultsMissingError`` names the build command), as
    in the other integration tests, rather than skipping them."""
    from acadlm_plugins.defaults.paths import require_default_corpus, require_default_model

    corpus_dir = require_default_corpus()
    require_default_model()
    assert (corpus_dir / "long" / "books.jsonl").is_file(), (
        f"{corpus_dir}/long is missing: rebuild with `acadlm-defaults build`")
    return corpus_dir


@pytest.mark.integration
def test_prolong_stage1_mix_on_the_default_corpus_packs_at_99_percent(tmp_path):
    corpus_dir = default_long_corpus()
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    ds = long_short_mixture(smollm2_tokenizer(), sources=prolong_stage1_sources(corpus_dir),
                            max_seq_len=8192, cache_dir=tmp_path / "tokens", num_samples=256)
    packs = {name: ds.corpus.packs(name) for name in ds.domain_names}
    assert packs["books"].filter_stats.documents_kept == 116
    assert packs["code_repos"].filter_stats.documents_kept == 33
    for name, source in packs.items():
        print(source.stats.describe(name))
        assert source.stats.tokens_out == source.stats.tokens_in
        assert isinstance(source.documents.tokens, np.memmap)
    tokens = sum(p.stats.tokens_out for p in packs.values())
    positions = sum(p.stats.packs * 8192 for p in packs.values())
    print(f"overall efficiency {tokens / positions:.4f}, mixture {mixture_efficiency(ds):.4f}")
    assert tokens / positions >= 0.99
    assert mixture_efficiency(ds) >= 0.99
    sample = ds[0]
    assert sample["tokens"].shape == (8192,) and int(sample["seq_lens"].sum()) == 8192


@pytest.mark.integration
def test_the_demo_stage2_long_sources_on_the_default_corpus(tmp_path):
    """The demo stage 2's long sources, built as its config says on the embedded corpus: each
    class has documents, the 8K sources pack 8,192-token pieces two to a 16K sequence (never
    cut), and every token is packed, filtered out or counted as a dropped last piece."""
    import acadlm_plugins.defaults  # noqa: F401  (registers ${acadlm_home:})
    from acadlm_plugins.training.components import instantiate_component

    default_long_corpus()  # the config reads it through ${acadlm_home:}
    cfg = OmegaConf.load(CONFIGS / "smollm2/long_context_stage2.yaml")
    cfg.dataset.sources = {name: spec for name, spec in cfg.dataset.sources.items()
                           if name in long_sources(CONFIGS / "smollm2/long_context_stage2.yaml")}
    cfg.dataset.cache_dir = str(tmp_path / "tokens")
    ds = instantiate_component(cfg, "dataset", instantiate_component(cfg, "tokenizer"))
    assert ds.domain_names == ["code_repos_16k", "code_repos_8k", "books_16k", "books_8k"]
    for name in ds.domain_names:
        packs = ds.corpus.packs(name)
        stats = packs.filter_stats
        print(stats.describe(name))
        assert stats.documents_kept >= 20 and packs.stats.packs >= 100
        assert (stats.tokens_kept + stats.tokens_filtered_out + stats.tokens_dropped_in_pieces
                == stats.tokens_total)
        if name.endswith("_8k"):
            assert stats.pieces_kept == stats.tokens_kept // 8192
            assert packs.stats.documents_split == 0
            full = [packs.pack(i)[1].tolist() for i in range(len(packs) - 1)]
            assert all(segments == [8192, 8192] for segments in full)
