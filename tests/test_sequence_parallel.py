"""Ulysses sequence parallelism: two gloo processes must reproduce one process exactly.

A tiny SmolLM2-architecture model (2 layers, 4 query / 2 key-value heads; also 8 / 4, so each
rank holds more than one key-value head) sees one packed batch of several documents with the per-document block-causal mask. Split over two ranks, the loss,
the logits and every parameter gradient must equal the single-process ones to float
tolerance; one document straddles the shard border and, in the other sample, a document starts
exactly at it, so a target lost or counted twice at the border would show. Changing one
document's tokens must leave every other document's logits alone.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.sequence_parallel import (
    check_sequence_length,
    check_sequence_parallel,
    enable_ulysses,
    new_sequence_parallel_group,
    sequence_parallel_loss,
    shard_batch,
    sum_gradients,
)
from acadlm_plugins.training.validation import shifted_token_losses

RANKS = 2
SEQ_LEN = 64
VOCAB = 512
# Sample 0: document 1 (positions 10..39) crosses the border at 32. Sample 1: a document
# starts at 32, so the target of position 31 is ignored.
SEQ_LENS = [[10, 30, 5, 19], [20, 12, 32]]
CHANGED_DOC = (0, 1)  # (sample, document) whose tokens the mask test rewrites
ATOL, RTOL = 1e-5, 1e-4
HEADS = [(4, 2), (8, 4)]  # (num_heads, num_kv_heads) of the models run on two ranks


def tiny_model(num_heads: int = 4, num_kv_heads: int = 2) -> torch.nn.Module:
    from acadlm_plugins.models.smollm2 import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(vocab_size=VOCAB, max_seq_len=SEQ_LEN, num_heads=num_heads,
                      num_kv_heads=num_kv_heads)


def packed_batch(seed: int = 1) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Two packs as our packing makes them: labels ignored at every document start, positions
    restarting per document; ``seq_lens`` kept for the mask."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(SEQ_LENS), SEQ_LEN), generator=generator)
    seq_lens = [torch.tensor(lens) for lens in SEQ_LENS]
    labels, input_pos = tokens.clone(), torch.empty_like(tokens)
    for row, lens in enumerate(seq_lens):
        starts = torch.cumsum(lens, 0) - lens
        labels[row, starts] = -100
        input_pos[row] = torch.arange(SEQ_LEN) - torch.repeat_interleave(starts, lens)
    return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}


def changed_tokens(tokens: torch.Tensor) -> torch.Tensor:
    sample, doc = CHANGED_DOC
    start = sum(SEQ_LENS[sample][:doc])
    changed = tokens.clone()
    changed[sample, start:start + SEQ_LENS[sample][doc]] = (
        changed[sample, start:start + SEQ_LENS[sample][doc]] + 7) % VOCAB
    return changed


def document_spans() -> list[tuple[int, int, int, int]]:
    """(sample, document, start, end) of every document."""
    spans = []
    for sample, lens in enumerate(SEQ_LENS):
        start = 0
        for doc, length in enumerate(lens):
            spans.append((sample, doc, start, start + length))
            start += length
    return spans


def one_process_reference(model: torch.nn.Module, batch: dict) -> dict:
    from torchtune.modules.attention_utils import create_block_causal_mask

    mask = create_block_causal_mask(batch["seq_lens"])
    logits = model(batch["tokens"], mask=mask, input_pos=batch["input_pos"])
    loss_sum, count = shifted_token_losses(logits, batch["labels"])
    loss = loss_sum.sum() / count.sum()
    loss.backward()
    return {"loss": loss.detach(), "logits": logits.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _rank_main(rank: int, store_path: str, out_dir: str) -> None:
    """One sequence-parallel rank: for every model of ``HEADS``, loss, gradients, and logits
    for the original and the changed batch, gathered to full length, saved to
    ``rank<r>_<heads>.pt``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=RANKS, timeout=datetime.timedelta(seconds=60))
    try:
        group = new_sequence_parallel_group(RANKS)
        for heads in HEADS:
            _rank_run(rank, heads, Path(out_dir), group)
    finally:
        dist.destroy_process_group()


def _rank_run(rank: int, heads: tuple[int, int], out_dir: Path,
              group: torch.distributed.ProcessGroup) -> None:
    """Train-step results of the model with ``heads`` on this rank of the group."""
    import torch.distributed as dist

    model = tiny_model(*heads)
    model.load_state_dict(torch.load(out_dir / f"weights_{heads[0]}.pt"))
    sp = enable_ulysses(model, group)
    assert (sp.rank, sp.degree) == (rank, RANKS)
    batch = packed_batch()
    shard = shard_batch(batch, sp.rank, sp.degree)
    sp.set_seq_lens(shard["seq_lens"])

    def full_logits(local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(RANKS)]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts, dim=1)

    logits = model(shard["tokens"], input_pos=shard["input_pos"])
    result = sequence_parallel_loss(logits, shard["targets"], group)
    result.loss.backward()
    sum_gradients(model, group)
    with torch.no_grad():
        changed = shard_batch({**batch, "tokens": changed_tokens(batch["tokens"])},
                              sp.rank, sp.degree)
        changed_logits = model(changed["tokens"], input_pos=changed["input_pos"])
    torch.save({"loss": result.mean, "num_tokens": result.num_tokens,
                "logits": full_logits(logits.detach().contiguous()),
                "changed_logits": full_logits(changed_logits.contiguous()),
                "grads": {n: p.grad for n, p in model.named_parameters()}},
               out_dir / f"rank{rank}_{heads[0]}.pt")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict[int, tuple[dict, list[dict]]]:
    """Per number of query heads, the one-process reference and both ranks' results (the
    ranks are spawned once for all models)."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("sequence_parallel")
    references = {}
    for heads in HEADS:
        model = tiny_model(*heads)
        torch.save(model.state_dict(), out_dir / f"weights_{heads[0]}.pt")
        references[heads[0]] = one_process_reference(model, packed_batch())
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.start_processes(_rank_main, args=(str(out_dir / "store"), str(out_dir)),
                           nprocs=RANKS, start_method="spawn", join=True)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return {h: (reference, [torch.load(out_dir / f"rank{r}_{h}.pt") for r in range(RANKS)])
            for h, reference in references.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("num_heads", [h for h, _ in HEADS])
def test_two_ranks_match_one_process(two_rank_runs, num_heads):
    reference, ranks = two_rank_runs[num_heads]
    counted = int((packed_batch()["labels"][:, 1:] != -100).sum())
    for rank, got in enumerate(ranks):
        assert got["num_tokens"] == counted, f"rank {rank} counted the wrong number of targets"
        torch.testing.assert_close(got["loss"], reference["loss"], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got["logits"], reference["logits"], atol=ATOL, rtol=RTOL)
        assert set(got["grads"]) == set(reference["grads"])
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, atol=ATOL, rtol=RTOL,
                                       msg=lambda m, n=name, r=rank: f"rank {r} grad {n}: {m}")


@pytest.mark.distributed
def test_document_mask_holds_across_ranks(two_rank_runs):
    _, ranks = two_rank_runs[HEADS[0][0]]
    before, after = ranks[0]["logits"], ranks[0]["changed_logits"]
    for row, doc, start, end in document_spans():
        changed = (row, doc) == CHANGED_DOC
        same = torch.allclose(after[row, start:end], before[row, start:end], atol=1e-6, rtol=0)
        assert same != changed, f"sample {row} document at {start}:{end} (changed={changed})"


# --------------------------------------------------------------------------- one process


def test_shards_carry_every_target_once():
    batch = packed_batch()
    shards = [shard_batch(batch, rank, 4) for rank in range(4)]
    targets = torch.cat([s["targets"] for s in shards], dim=1)
    expected = torch.cat([batch["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    assert torch.equal(targets, expected)
    assert torch.equal(torch.cat([s["input_pos"] for s in shards], dim=1), batch["input_pos"])
    assert "labels" not in shards[0] and shards[0]["seq_lens"] is batch["seq_lens"]


def test_one_rank_is_the_plain_masked_model():
    model, batch = tiny_model(), packed_batch()
    reference = one_process_reference(model, batch)
    sp = enable_ulysses(model)
    sp.set_seq_lens(batch["seq_lens"])
    shard = shard_batch(batch, 0, 1)
    logits = model(shard["tokens"], input_pos=shard["input_pos"])
    torch.testing.assert_close(logits, reference["logits"], atol=ATOL, rtol=RTOL)
    result = sequence_parallel_loss(logits, shard["targets"])
    torch.testing.assert_close(result.mean, reference["loss"], atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="mask=None"):
        model(shard["tokens"], mask=sp.mask, input_pos=shard["input_pos"])
    sp.remove()  # the model takes its own mask again
    torch.testing.assert_close(model(batch["tokens"], mask=sp.mask, input_pos=batch["input_pos"]),
                               reference["logits"], atol=ATOL, rtol=RTOL)


def test_sum_gradients_is_a_no_op_without_a_group():
    model = tiny_model()
    one_process_reference(model, packed_batch())
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    sum_gradients(model)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("degree", "says"), [(3, "num_heads=4"), (4, "num_kv_heads=2"),
                                              (0, "positive integer")])
def test_degree_must_divide_the_heads(degree, says):
    with pytest.raises(ConfigError, match=says) as error:
        check_sequence_parallel(tiny_model(), degree)
    assert error.value.key == "sequence_parallel.degree"
    assert "one of [1, 2]" in str(error.value) or degree == 0


def test_length_must_split_evenly():
    check_sequence_length(64, 2)
    with pytest.raises(ConfigError, match="e.g. 64 or 66") as error:
        check_sequence_length(65, 2)
    assert error.value.key == "dataset.max_seq_len"
    with pytest.raises(ConfigError):
        shard_batch({**packed_batch(), "tokens": torch.zeros(2, 63, dtype=torch.long)}, 0, 2)


def _group_rank_main(rank, store, out):
    import torch
    import torch.distributed as dist

    from acadlm_plugins.training.sequence_parallel import new_sequence_parallel_group

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = new_sequence_parallel_group(2)
        value = torch.tensor([float(rank)])
        dist.all_reduce(value, group=group)
        torch.save({"group_rank": dist.get_rank(group), "sum": float(value)},
                   os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_four_processes_of_degree_two_form_pairs(tmp_path):
    """Data x sequence parallel: with more processes than the degree, every rank gets the
    group it belongs to (the other tests run one group of 2)."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_group_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=4,
                       start_method="spawn", join=True)
    got = [torch.load(tmp_path / f"r{r}.pt") for r in range(4)]
    assert [g["group_rank"] for g in got] == [0, 1, 0, 1]
    assert [g["sum"] for g in got] == [1.0, 1.0, 5.0, 5.0]  # {0,1} and {2,3}
