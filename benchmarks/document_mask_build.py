"""Building a FlexAttention document mask: torch's ``create_block_mask`` (what torchtune's
``packed_block_causal_mask`` calls) against ours from the document boundaries
(``acadlm_plugins.data.document_masks.document_block_mask``), on the same packs.

Uncompiled, ``create_block_mask`` evaluates the mask at every query-key pair into a dense
``[b, 1, S, S]`` boolean before compressing it; ours works per 128 x 128 block. Each build runs
in a fresh process, which reports its wall time and the growth of its peak RSS; both masks are
compared (``to_dense``) at the lengths where torch's fits, and the script exits with status 1 if
they differ. One pack of documents of 100-2,000 tokens (as benchmarks/document_masking.py),
batch 1, on the CPU (the code is the same on a GPU; this machine has none).

Run::

    .venv/bin/python benchmarks/document_mask_build.py                      # 4K, 8K, 16K
    .venv/bin/python benchmarks/document_mask_build.py --lengths 16384 --ours-only 65536,524288
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from torch.nn.attention.flex_attention import create_block_mask
sys.path.insert(0, sys.argv[4])
from document_masking import document_lengths
from acadlm_plugins.data.document_masks import document_block_mask, document_ids

method, length, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seq_lens = [torch.tensor(document_lengths(length, 100, 2000, 0))]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
if method == "ours":
    mask = document_block_mask(seq_lens, device="cpu")
else:
    ids = document_ids(seq_lens)
    mask = create_block_mask(lambda b, h, q, k: (q >= k) & (ids[b, q] == ids[b, k]),
                             1, None, length, length, device="cpu")
seconds = time.perf_counter() - started
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
if out != "-":
    torch.save(mask.to_dense(), out)
print(json.dumps({"seconds": seconds, "grown_mib": grown / 1024}))
"""


def build(method: str, length: int, out: str) -> dict[str, float]:
    """One build in a fresh process: its seconds and peak-RSS growth (MiB)."""
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", CHILD, method, str(length), out, here],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384",
                        help="lengths built both ways and compared")
    parser.add_argument("--ours-only", default="65536",
                        help="lengths where only ours is built (torch's needs ~10 bytes x S^2)")
    args = parser.parse_args()
    import tempfile

    import torch

    print("| length | torch create_block_mask: s, peak MiB | ours: s, peak MiB | time ratio "
          "| memory ratio | same mask |")
    print("| --- | --- | --- | --- | --- | --- |")
    status = 0
    with tempfile.TemporaryDirectory() as scratch:
        for length in [int(x) for x in args.lengths.split(",") if x]:
            theirs_file, ours_file = f"{scratch}/theirs.pt", f"{scratch}/ours.pt"
            theirs = build("torch", length, theirs_file)
            ours = build("ours", length, ours_file)
            same = torch.equal(torch.load(theirs_file), torch.load(ours_file))
            status |= not same
            print(f"| {length:,} | {theirs['seconds']:.3f}, {theirs['grown_mib']:,.0f} | "
                  f"{ours['seconds']:.3f}, {ours['grown_mib']:,.0f} | "
                  f"{theirs['seconds'] / ours['seconds']:,.0f}x | "
                  f"{theirs['grown_mib'] / max(ours['grown_mib'], 1):,.0f}x | {same} |")
        for length in [int(x) for x in args.ours_only.split(",") if x]:
            ours = build("ours", length, "-")
            print(f"| {length:,} | not run (~{10 * length ** 2 / 2 ** 30:,.0f} GiB) | "
                  f"{ours['seconds']:.3f}, {ours['grown_mib']:,.0f} | - | - | - |")
    return status


if __name__ == "__main__":
    sys.exit(main())
