"""FlexAttention document masks built from the segment boundaries: the same mask as torch's
``create_block_mask`` (which torchtune calls, and which evaluates every query-key pair into a
dense ``[b, 1, S, S]`` first), at a memory cost that lets a 512K pack have one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torchtune.modules.attention_utils import create_block_causal_mask

from acadlm_plugins.data.document_masks import document_block_mask, document_ids


def random_seq_lens(generator: torch.Generator, length: int, longest: int) -> torch.Tensor:
    """Segment lengths of one pack of ``length`` tokens, documents of 1..``longest`` tokens."""
    lens, left = [], length
    while left:
        size = min(left, int(torch.randint(1, longest + 1, (1,), generator=generator)))
        lens.append(size)
        left -= size
    return torch.tensor(lens)


def torch_reference(seq_lens: list[torch.Tensor]):
    ids = document_ids(seq_lens)
    batch, length = ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    return create_block_mask(mask_mod, batch, None, length, length, device="cpu")


@pytest.mark.parametrize(("length", "longest"), [(1024, 700), (1024, 40), (1000, 300),
                                                 (384, 384), (200, 1)])
def test_the_block_mask_equals_torchs_and_torchtunes_masks(length: int, longest: int) -> None:
    generator = torch.Generator().manual_seed(length + longest)
    seq_lens = [random_seq_lens(generator, length, longest) for _ in range(3)]
    seq_lens.append(torch.tensor([length]))  # one document filling the pack
    ours, theirs = document_block_mask(seq_lens, device="cpu"), torch_reference(seq_lens)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    for b in range(len(seq_lens)):  # the same blocks listed (the order past the count is free)
        for q in range(ours.kv_num_blocks.shape[-1]):
            for count, ours_idx, theirs_idx in (
                    (ours.kv_num_blocks, ours.kv_indices, theirs.kv_indices),
                    (ours.full_kv_num_blocks, ours.full_kv_indices, theirs.full_kv_indices)):
                n = int(count[b, 0, q])
                assert sorted(ours_idx[b, 0, q, :n].tolist()) == sorted(
                    theirs_idx[b, 0, q, :n].tolist())
    # Element by element the mask is torchtune's dense SDPA mask of the same packs.
    dense = create_block_causal_mask(seq_lens=seq_lens)
    mask_mod = ours.mask_mod
    q_idx = torch.arange(length)[:, None]
    kv_idx = torch.arange(length)[None, :]
    for b in range(len(seq_lens)):
        assert torch.equal(mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx), dense[b])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_with_the_block_mask_equals_sdpa_with_the_dense_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    seq_lens = [random_seq_lens(generator, 384, 150) for _ in range(2)]
    q, k, v = (torch.randn(2, 2, 384, 16, generator=generator) for _ in range(3))
    flex = flex_attention(q, k, v, block_mask=document_block_mask(seq_lens, device="cpu"))
    dense = create_block_causal_mask(seq_lens=seq_lens)[:, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


MEMORY_PROBE = """
import json, resource, sys, torch
from acadlm_plugins.data.document_masks import document_block_mask
length = int(sys.argv[1])
generator = torch.Generator().manual_seed(0)
sizes = torch.randint(1, 20000, (length // 1000,), generator=generator)
sizes = sizes[torch.cumsum(sizes, 0) < length]
seq_lens = [torch.cat([sizes, torch.tensor([length - int(sizes.sum())])])]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mask = document_block_mask(seq_lens, device="cpu")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_kib": after - before, "shape": list(mask.kv_indices.shape),
                  "blocks": int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())}))
"""


def test_a_512k_pack_gets_its_mask_in_a_few_hundred_mib() -> None:
    """torch's create_block_mask would first evaluate 2^38 query-key pairs into a dense
    boolean (256 GiB before its intermediates); the mask from the boundaries needs the
    (S / 128)^2 block table only."""
    length = 512 * 1024
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(length)], check=True,
                          capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 1, 4096, 4096]
    assert report["grown_kib"] < 2 * 1024 * 1024, report  # measured 0.7 GiB
    assert 4096 <= report["blocks"] < 4096 * 4097 // 2  # causal and documents skip blocks
