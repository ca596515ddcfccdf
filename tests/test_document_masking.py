"""Packed sequences on CPU: document masks through SDPA, loss masking at document boundaries,
and the chunked loss that long-context training uses instead of full logits."""

from __future__ import annotations

import pytest
import torch
from recipe_runs import torch_threads
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION as SUPPORTS_FLEX

from acadlm_plugins.data.mixture import collate_domain_packs
from acadlm_plugins.data.packing import (
    CROSS_ENTROPY_IGNORE_INDEX,
    TokenizedDocuments,
    pack_documents,
)
from acadlm_plugins.models.smollm2 import tiny_llama
from acadlm_plugins.training.chunked_loss import chunked_token_losses, shifted_targets
from acadlm_plugins.training.validation import shifted_token_losses

LENGTH = 48
DOCS = [list(range(3, 3 + n)) for n in (11, 17, 9, 11)]  # 48 tokens: exactly one pack


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    with torch_threads():
        net = tiny_llama(max_seq_len=128)
        for p in net.parameters():  # a livelier random model than the default 0.02 init
            torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def packed_batch(docs: list[list[int]], positions: str = "reset") -> dict[str, torch.Tensor]:
    packs = pack_documents(TokenizedDocuments.from_lists(docs), LENGTH, pad_id=0)
    sample = packs.sample(0, positions=positions)
    sample["domain"] = 0
    return collate_domain_packs([sample])


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), torch_threads():
        return model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])


@pytest.mark.parametrize("positions", ["reset", "continuous"])
def test_changing_one_document_leaves_the_others_outputs_unchanged(model, positions) -> None:
    batch = packed_batch(DOCS, positions)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (1, LENGTH, LENGTH)
    changed_docs = [DOCS[0], [t + 40 for t in DOCS[1]], DOCS[2], DOCS[3]]
    changed = packed_batch(changed_docs, positions)
    before, after = forward(model, batch), forward(model, changed)
    second = slice(11, 28)  # the tokens of document 2
    outside = torch.ones(LENGTH, dtype=torch.bool)
    outside[second] = False
    assert torch.allclose(before[0, outside], after[0, outside], atol=1e-5)
    assert not torch.allclose(before[0, second], after[0, second], atol=1e-3)


def test_a_document_in_a_pack_scores_as_it_does_alone(model) -> None:
    """Block-causal masking + reset positions: the third document's logits are those of the
    document run on its own."""
    packed = forward(model, packed_batch(DOCS, "reset"))
    alone = forward(model, {"tokens": torch.tensor([DOCS[2]]), "mask": None, "input_pos": None})
    assert torch.allclose(packed[0, 28:37], alone[0], atol=1e-4)


def test_no_target_crosses_a_document_boundary() -> None:
    batch = packed_batch(DOCS)
    targets = shifted_targets(batch["labels"])[0]
    ends = torch.cumsum(torch.tensor([len(d) for d in DOCS]), 0) - 1
    # the last token of every document predicts nothing (not the next document's first token)
    assert torch.all(targets[ends] == CROSS_ENTROPY_IGNORE_INDEX)
    counted = int((targets != CROSS_ENTROPY_IGNORE_INDEX).sum())
    assert counted == sum(len(d) - 1 for d in DOCS)


@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 1000])
def test_chunked_loss_equals_the_full_logits_loss_and_gradients(chunk) -> None:
    torch.manual_seed(1)
    with torch_threads():
        net = tiny_llama(max_seq_len=128)
        batch = packed_batch(DOCS)
        batch = {k: torch.cat([v, v.flip(-1) if k == "tokens" else v]) for k, v in batch.items()}
        full_logits = net(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        full, full_count = shifted_token_losses(full_logits, batch["labels"])
        full.sum().backward()
        want = {n: p.grad.clone() for n, p in net.named_parameters()}
        net.zero_grad(set_to_none=True)
        chunked, count = chunked_token_losses(
            net, batch["tokens"], shifted_targets(batch["labels"]), chunk_tokens=chunk,
            mask=batch["mask"], input_pos=batch["input_pos"])
        chunked.sum().backward()
    assert torch.equal(count, full_count)
    assert torch.allclose(chunked, full, rtol=1e-5, atol=1e-4)
    for name, param in net.named_parameters():
        assert torch.allclose(param.grad, want[name], rtol=1e-4, atol=1e-6), name
    assert not hasattr(net, "unembed") or callable(type(net).unembed)
    assert "unembed" not in vars(net), "the loss head must not outlive the call"


def test_chunked_loss_rejects_a_zero_chunk(model) -> None:
    batch = packed_batch(DOCS)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_losses(model, batch["tokens"], shifted_targets(batch["labels"]),
                             chunk_tokens=0)


def test_per_document_attention_equals_the_masked_model_and_its_gradients(model) -> None:
    from acadlm_plugins.training.document_attention import DocumentAttention

    torch.manual_seed(2)
    with torch_threads():
        net = tiny_llama(max_seq_len=128)
        batch = packed_batch(DOCS)
        masked = net(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        masked.square().mean().backward()
        want = {n: p.grad.clone() for n, p in net.named_parameters()}
        net.zero_grad(set_to_none=True)
        documents = DocumentAttention(net)
        documents.set_seq_lens(batch["seq_lens"])
        looped = net(batch["tokens"], mask=None, input_pos=batch["input_pos"])
        looped.square().mean().backward()
        with pytest.raises(ValueError, match="mask=None"):
            net(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        documents.remove()
        restored = net(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
    assert batch["seq_lens"].tolist() == [[len(d) for d in DOCS]]
    assert torch.allclose(looped, masked, atol=1e-5)
    for name, param in net.named_parameters():
        assert torch.allclose(param.grad, want[name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(restored, masked, atol=1e-6)


def test_per_document_attention_needs_the_batch_segment_lengths(model) -> None:
    from acadlm_plugins.training.document_attention import DocumentAttention, segment_bounds

    assert segment_bounds(torch.tensor([[3, 2, 0], [5, 0, 0]])) == [[(0, 3), (3, 5)], [(0, 5)]]
    documents = DocumentAttention(model)
    try:
        batch = packed_batch(DOCS)
        with pytest.raises(ValueError, match="set_seq_lens"), torch.no_grad():
            model(batch["tokens"], mask=None, input_pos=batch["input_pos"])
        documents.set_seq_lens(torch.tensor([[10, 10]]))
        with pytest.raises(ValueError, match="cover 20 tokens"), torch.no_grad():
            model(batch["tokens"], mask=None, input_pos=batch["input_pos"])
    finally:
        documents.remove()


# ------------------------------------------------- document masking off (ProLong's ablation)
def per_position_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad(), torch_threads():
        logits = model(batch["tokens"], mask=batch.get("mask"), input_pos=batch["input_pos"])
    targets = shifted_targets(batch["labels"])
    return torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none",
                                             ignore_index=CROSS_ENTROPY_IGNORE_INDEX)


@pytest.mark.parametrize("positions", ["reset", "continuous"])
def test_without_document_masking_a_document_reads_the_ones_before_it(model, positions) -> None:
    """Change only the first document: with masking the second document's losses stay the
    same (its first token's included); without, they move, since attention crosses into it."""
    from acadlm_plugins.training.document_attention import without_document_masking

    changed_docs = [[t + 40 for t in DOCS[0]], *DOCS[1:]]
    second = slice(11, 28)  # document 2; position 11 is its first token
    masked = [per_position_losses(model, packed_batch(d, positions)) for d in (DOCS, changed_docs)]
    assert torch.allclose(masked[0][second], masked[1][second], atol=1e-5)
    plain = [per_position_losses(model, without_document_masking(packed_batch(d, positions)))
             for d in (DOCS, changed_docs)]
    assert abs(float(plain[0][11] - plain[1][11])) > 1e-3  # the first token of document 2
    assert not torch.allclose(plain[0][second], plain[1][second], atol=1e-3)
    # the same targets are scored in both arms; only attention and positions differ
    unmasked = without_document_masking(packed_batch(DOCS, positions))
    assert "mask" not in unmasked
    assert torch.equal(unmasked["labels"], packed_batch(DOCS, positions)["labels"])
    assert unmasked["input_pos"].tolist() == [list(range(LENGTH))]


def test_without_document_masking_equals_one_document_of_the_whole_pack(model) -> None:
    from acadlm_plugins.training.document_attention import without_document_masking

    unmasked = without_document_masking(packed_batch(DOCS))
    whole = packed_batch([[t for d in DOCS for t in d]])
    with torch.no_grad(), torch_threads():
        a = model(unmasked["tokens"], mask=None, input_pos=unmasked["input_pos"])
        b = model(whole["tokens"], mask=whole["mask"], input_pos=whole["input_pos"])
    assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------- batch size in memory
def batch_bytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values())


def pack_of_documents(length: int, seed: int = 0) -> dict:
    """One full pack of documents of 100-2000 tokens."""
    generator = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < length:
        n = min(int(torch.randint(100, 2001, (1,), generator=generator)), length - total)
        docs.append(torch.randint(3, 500, (n,), generator=generator).tolist())
        total += n
    sample = pack_documents(TokenizedDocuments.from_lists(docs), length, pad_id=0).sample(0)
    sample["domain"] = 0
    return sample


def test_collate_without_a_mask_is_the_masked_collate_minus_the_mask() -> None:
    from acadlm_plugins.data.packing import collate_packs

    samples = [pack_of_documents(LENGTH * 4, seed) for seed in (0, 1)]
    reference = collate_domain_packs(samples)
    with_mask = collate_packs(samples, block_mask=True)
    without = collate_packs(samples)
    assert set(with_mask) == set(reference) and "mask" not in without
    for key, value in reference.items():
        assert torch.equal(with_mask[key], value), key
        if key != "mask":
            assert torch.equal(without[key], value), key


def test_a_16k_batch_for_per_document_attention_is_linear_in_its_length() -> None:
    """torchtune's CPU collate adds a dense [b, S, S] boolean mask: S^2 bytes, 268 MB per
    pack at 16K. The batch that per-document (or unmasked) attention gets has no mask: 24 bytes
    per token (tokens, labels, positions as int64) plus the segment lengths."""
    from acadlm_plugins.data.packing import collate_packs

    sizes = {}
    for length in (2048, 16384):
        batch = collate_packs([pack_of_documents(length), pack_of_documents(length, 1)])
        assert "mask" not in batch
        sizes[length] = batch_bytes(batch)
        assert sizes[length] < 2 * 25 * length
    assert sizes[16384] / sizes[2048] == pytest.approx(8, rel=0.05)
    if SUPPORTS_FLEX:
        return  # torchtune's collate builds a BlockMask instead of the dense mask
    masked = collate_domain_packs([pack_of_documents(2048), pack_of_documents(2048, 1)])
    assert masked["mask"].shape == (2, 2048, 2048)  # what the 16K batch would carry: 2 x 268 MB
    assert batch_bytes(masked) - sizes[2048] == 2 * 2048 * 2048


# --------------------------------------------------------- validation without a dense mask
def test_validation_without_the_mask_builds_none_and_gives_the_masked_losses(model,
                                                                             monkeypatch):
    """Per-document attention reads segment lengths, not a mask: its validation batches are
    collated without torchtune's mask (never built), and the per-domain losses are those of
    the explicit-mask path."""
    from acadlm_plugins.data import document_masks
    from acadlm_plugins.data.mixture import PackedDomainCorpus
    from acadlm_plugins.training.document_attention import DocumentAttention
    from acadlm_plugins.training.validation import evaluate_domain_losses

    generator = torch.Generator().manual_seed(0)

    def documents(count: int) -> TokenizedDocuments:
        lengths = torch.randint(5, 40, (count,), generator=generator).tolist()
        return TokenizedDocuments.from_lists(
            [torch.randint(3, 500, (n,), generator=generator).tolist() for n in lengths])

    corpus = PackedDomainCorpus({name: pack_documents(documents(count), LENGTH, pad_id=0)
                                 for name, count in (("code", 9), ("prose", 14))})
    with torch_threads():
        masked = evaluate_domain_losses(model, corpus, batch_size=2,
                                        device=torch.device("cpu"))
    built = []
    original = document_masks.document_causal_mask

    def counted(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(document_masks, "document_causal_mask", counted)
    per_document = DocumentAttention(model)

    def losses(net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        assert "mask" not in batch
        per_document.set_seq_lens(batch["seq_lens"])
        logits = net(batch["tokens"], mask=None, input_pos=batch["input_pos"])
        return shifted_token_losses(logits, batch["labels"])

    try:
        with torch_threads():
            unmasked = evaluate_domain_losses(model, corpus, batch_size=2,
                                              device=torch.device("cpu"), token_losses=losses,
                                              block_mask=False)
    finally:
        per_document.remove()
    assert built == [], "a validation batch built the document mask"
    assert unmasked == pytest.approx(masked, rel=1e-5)
    with torch_threads():
        evaluate_domain_losses(model, corpus, batch_size=2, device=torch.device("cpu"))
    assert built, "the masked path builds its mask through the counted function"
