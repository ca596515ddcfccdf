"""Packing keeps every token, marks document boundaries and never trains across them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acadlm_plugins.data.mixture import collate_domain_packs
from acadlm_plugins.data.packing import (
    CROSS_ENTROPY_IGNORE_INDEX,
    TokenizedDocuments,
    pack_documents,
)
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.smollm2 import tiny_llama

PAD = 0

doc_lists = st.lists(st.lists(st.integers(3, 200), min_size=1, max_size=40), min_size=1,
                     max_size=25)


@settings(max_examples=60, deadline=None)
@given(docs=doc_lists, max_seq_len=st.integers(2, 64), mode=st.sampled_from(["split", "whole"]))
def test_no_token_is_lost_and_segments_cover_each_pack(docs, max_seq_len, mode):
    packed = pack_documents(TokenizedDocuments.from_lists(docs), max_seq_len, PAD, mode=mode)
    stats = packed.stats
    assert stats.tokens_in == stats.tokens_out == sum(len(d) for d in docs)
    assert stats.tokens_out + stats.pad_tokens == len(packed) * max_seq_len
    real = np.concatenate([packed.tokens[i, : packed.pad_start[i]] for i in range(len(packed))])
    assert real.tolist() == [t for d in docs for t in d]  # order preserved, nothing dropped
    for i in range(len(packed)):
        assert packed.segment_lens[i].sum() == max_seq_len
        assert (packed.tokens[i, packed.pad_start[i]:] == PAD).all()


def test_split_mode_continues_a_long_document_in_the_next_pack():
    docs = TokenizedDocuments.from_lists([[5] * 10, [6] * 3])
    packed = pack_documents(docs, 4, PAD, mode="split")
    assert packed.tokens.tolist() == [[5, 5, 5, 5], [5, 5, 5, 5], [5, 5, 6, 6], [6, 0, 0, 0]]
    assert [s.tolist() for s in packed.segment_lens] == [[4], [4], [2, 2], [1, 3]]
    assert packed.stats.documents_split == 3  # the 10-token doc twice, the 3-token doc once
    assert packed.stats.pad_tokens == 3


def test_whole_mode_pads_instead_of_cutting_a_document_that_fits():
    docs = TokenizedDocuments.from_lists([[5] * 3, [6] * 3, [7] * 9])
    packed = pack_documents(docs, 4, PAD, mode="whole")
    assert packed.tokens[:2].tolist() == [[5, 5, 5, 0], [6, 6, 6, 0]]
    # only the 9-token document, longer than a pack: 3 pieces (4 + 4 + 1 padded), 2 cuts
    assert packed.tokens[2:].tolist() == [[7] * 4, [7] * 4, [7, 0, 0, 0]]
    assert packed.stats.documents_split == 2
    assert packed.stats.tokens_out == 15


def pack_boundaries_inside_documents(docs: list[list[int]], packed) -> int:
    """Counted from the packs themselves: both modes keep the documents' order, so pack i holds
    the next ``pad_start[i]`` tokens of the concatenation; a boundary between two packs is
    inside a document when the last token before it and the first after it are one document's."""
    owner = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    ends = np.cumsum(packed.pad_start)[:-1]  # position in the concatenation after each pack
    return int(sum(owner[end - 1] == owner[end] for end in ends))


@settings(max_examples=60, deadline=None)
@given(docs=doc_lists, max_seq_len=st.integers(2, 64), mode=st.sampled_from(["split", "whole"]))
def test_cuts_inside_documents_count_the_same_thing_in_both_modes(docs, max_seq_len, mode):
    """``documents_split`` is the number of pack boundaries inside documents in either mode,
    in the in-memory and the streaming packer (in ``whole`` mode a document of ``n`` tokens
    contributes ``ceil(n / S) - 1``; it used to count 1 per long document)."""
    from acadlm_plugins.data.streaming import StreamingPackedSequences

    tokenized = TokenizedDocuments.from_lists(docs)
    packed = pack_documents(tokenized, max_seq_len, PAD, mode=mode)
    expected = pack_boundaries_inside_documents(docs, packed)
    assert packed.stats.documents_split == expected
    if mode == "whole":
        assert expected == sum(-(-len(d) // max_seq_len) - 1 for d in docs)
    lazy = StreamingPackedSequences(tokenized, max_seq_len, PAD, mode=mode)
    assert lazy.stats.documents_split == expected


def test_labels_ignore_document_starts_and_padding_and_positions_reset():
    docs = TokenizedDocuments.from_lists([[10, 11, 12], [20, 21]])
    sample = pack_documents(docs, 8, PAD).sample(0)
    ignore = CROSS_ENTROPY_IGNORE_INDEX
    assert sample["labels"].tolist() == [ignore, 11, 12, ignore, 21, ignore, ignore, ignore]
    assert sample["input_pos"].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert sample["seq_lens"].tolist() == [3, 2, 3]
    continuous = pack_documents(docs, 8, PAD).sample(0, positions="continuous")
    assert continuous["input_pos"].tolist() == list(range(8))


def test_unknown_modes_name_the_config_key():
    docs = TokenizedDocuments.from_lists([[5, 6]])
    with pytest.raises(ConfigError, match="packing"):
        pack_documents(docs, 4, PAD, mode="greedy")
    with pytest.raises(ConfigError, match="positions"):
        pack_documents(docs, 4, PAD).sample(0, positions="absolute")
    with pytest.raises(ConfigError, match="max_seq_len"):
        pack_documents(docs, 1, PAD)


def test_document_mask_isolates_documents_through_sdpa_on_cpu():
    """A token's output must not change when another document in its pack changes."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    first = [list(range(3, 20)), list(range(30, 45))]
    second = [list(range(3, 20)), list(range(100, 115))]  # same first doc, other second doc
    outs = []
    for docs in (first, second):
        sample = pack_documents(TokenizedDocuments.from_lists(docs), 40, PAD).sample(0)
        sample["domain"] = 0
        batch = collate_domain_packs([sample])
        with torch.no_grad():
            outs.append(model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"]))
    assert torch.allclose(outs[0][0, :17], outs[1][0, :17], atol=1e-5)
    assert not torch.allclose(outs[0][0, 17:32], outs[1][0, 17:32], atol=1e-3)


# ----------------------------------------------------------- the accounting check is real


def _stats(**changes):
    from acadlm_plugins.data.packing import PackingStats

    fields = {"documents": 2, "tokens_in": 10, "tokens_out": 10, "pad_tokens": 6, "packs": 2,
              "documents_split": 0, "max_seq_len": 8, "mode": "split", **changes}
    return PackingStats(**fields)


def test_the_accounting_check_fires_on_a_mismatch():
    from acadlm_plugins.data.packing import check_token_accounting

    check_token_accounting(_stats())
    with pytest.raises(AssertionError, match="10 read, 9 placed"):
        check_token_accounting(_stats(tokens_out=9, pad_tokens=7))


def test_a_packing_step_that_drops_a_token_is_caught(monkeypatch):
    """The check used to compare the tokens in with a count derived from `pad_start`, which a
    step that drops a token without fixing `pad_start` leaves unchanged: it could not fail."""
    from acadlm_plugins.data import packing

    real = packing._pack_split

    def lossy(docs, max_seq_len):
        packs, segments, pad_start, split = real(docs, max_seq_len)
        packs[0] = [packs[0][0][:-1]]  # one token lost, the bookkeeping unchanged
        return packs, segments, pad_start, split

    monkeypatch.setattr(packing, "_pack_split", lossy)
    docs = TokenizedDocuments.from_lists([[5, 6, 7], [8, 9]])
    with pytest.raises(AssertionError, match="bug in acadlm_plugins.data"):
        pack_documents(docs, 4, PAD)


@pytest.mark.parametrize("mode", ["split", "whole"])
def test_a_streaming_plan_that_drops_tokens_is_caught(monkeypatch, mode):
    """Streaming set tokens_out = tokens_in, so its check could not fail either."""
    from acadlm_plugins.data import streaming

    if mode == "split":
        real_count = streaming.StreamingPackedSequences._count_split_packs
        monkeypatch.setattr(streaming.StreamingPackedSequences, "_count_split_packs",
                            lambda self: (real_count(self)[0] - 1, real_count(self)[1]))
    else:
        real_plan = streaming._plan_whole_packs

        def lossy_plan(lengths, max_seq_len):
            first, stop, skip, filled = real_plan(lengths, max_seq_len)
            stop = stop.copy()
            stop[0] -= 1  # the first pack's last document is never read
            return first, stop, skip, filled

        monkeypatch.setattr(streaming, "_plan_whole_packs", lossy_plan)
    docs = TokenizedDocuments.from_lists([[5, 6], [7, 8], [9, 10, 11]])
    with pytest.raises(AssertionError, match="7 read, [0-9] placed"):
        streaming.StreamingPackedSequences(docs, 4, PAD, mode=mode)


def test_streaming_stats_count_what_the_packs_hold():
    from acadlm_plugins.data.streaming import StreamingPackedSequences

    docs = TokenizedDocuments.from_lists([[5] * 3, [6] * 9, [7] * 2, [8] * 4])
    for mode in ("split", "whole"):
        lazy = StreamingPackedSequences(docs, 4, PAD, mode=mode)
        held = sum(lazy.pack(i)[2] for i in range(len(lazy)))
        assert lazy.stats.tokens_out == held == 18


@pytest.mark.parametrize("bad", ["2048", 2048.0, True, None])
def test_a_max_seq_len_that_is_not_an_integer_is_a_config_error(bad):
    """A string used to fail with a bare TypeError ('<' between str and int)."""
    from acadlm_plugins.data.streaming import StreamingPackedSequences

    docs = TokenizedDocuments.from_lists([[5, 6]])
    with pytest.raises(ConfigError, match="max_seq_len.*not an integer"):
        pack_documents(docs, bad, PAD)
    with pytest.raises(ConfigError, match="max_seq_len.*not an integer"):
        StreamingPackedSequences(docs, bad, PAD)


def test_whole_mode_keeps_a_document_that_exactly_fills_the_pack():
    """A document whose length is exactly the room left goes in the open pack (no padding):
    [5,5,5] + [6] fill one 4-token pack; closing it early would add a pack of 3 pads."""
    from acadlm_plugins.data.packing import TokenizedDocuments, pack_documents
    from acadlm_plugins.data.streaming import StreamingPackedSequences

    docs = TokenizedDocuments.from_lists([[5, 5, 5], [6], [7, 7]])
    packed = pack_documents(docs, 4, 0, mode="whole")
    assert packed.tokens.tolist() == [[5, 5, 5, 6], [7, 7, 0, 0]]
    assert packed.stats.pad_tokens == 2
    lazy = StreamingPackedSequences(docs, 4, 0, mode="whole")
    assert len(lazy) == 2 and lazy.stats.pad_tokens == 2
