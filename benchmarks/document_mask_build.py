"""Building a FlexAttention document mask: torch's ``create_block_mask`` (what torchtune's
``packed_block_causal_mask`` calls) against ours from the document boundaries
(``acadlm_plugins.data.document_masks.document_block_mask``), on the same packs; and the
collate of one packed batch: torchtune's ``padded_collate_packed`` (a dense ``[b, S, S]``
mask where flex attention is unavailable, as on this CPU) against ours without a mask
(``acadlm_plugins.data.packing.collate_packs``, what per-document attention reads).

Uncompiled, ``create_block_mask`` evaluates the mask at every query-key pair into a dense
``[b, 1, S, S]`` boolean before compressing it; ours works per 128 x 128 block. Each
measurement runs in a fresh process. The process first builds (or collates) once on a
256-token pack of two documents, timed apart and printed as the one-time setup (torch's
``create_block_mask`` pays about a second there, once per process); then it builds (collates)
the real pack ``--repeats`` times, and reports the median wall time of those warm builds
(what a training run pays per batch; the ratios use it) and the growth of its peak RSS over
the RSS before them. Both masks are compared (``to_dense``) at the lengths where torch's fits,
and the script exits with status 1 if they differ, or if the two collates' tokens, labels and
positions differ. One pack of documents of 100-2,000 tokens (as
benchmarks/document_masking.py), batch 1, on the CPU (the mask code is the same on a GPU; this
machine has none).

Run::

    .venv/bin/python benchmarks/document_mask_build.py                      # 4K, 8K, 16K
    .venv/bin/python benchmarks/document_mask_build.py --lengths 16384 --ours-only 65536,524288
    .venv/bin/python benchmarks/document_mask_build.py --lengths '' --ours-only '' --collate 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from acadlm_plugins.cli_types import int_at_least

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[5])
from document_masking import document_lengths

method, length, out, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(field)


if method in ("torch", "ours"):
    from torch.nn.attention.flex_attention import create_block_mask
    from acadlm_plugins.data.document_masks import document_block_mask, document_ids

    def run(seq_lens, total):
        if method == "ours":
            return document_block_mask(seq_lens, device="cpu")
        ids = document_ids(seq_lens)
        return create_block_mask(lambda b, h, q, k: (q >= k) & (ids[b, q] == ids[b, k]),
                                 1, None, total, total, device="cpu")
else:
    from torchtune.data import padded_collate_packed
    from acadlm_plugins.data.packing import collate_packs

    def run(seq_lens, total):
        lens = seq_lens[0]
        tokens = torch.arange(total, dtype=torch.long) % 49152
        sample = {"tokens": tokens, "labels": tokens.roll(-1),
                  "input_pos": torch.cat([torch.arange(int(n)) for n in lens]),
                  "seq_lens": lens}
        if method == "collate-torchtune":
            return padded_collate_packed([sample])
        return collate_packs([sample])

started = time.perf_counter()
run([torch.tensor([128, 128])], 256)  # one-time setup, on a small pack
setup = time.perf_counter() - started
seq_lens = [torch.tensor(document_lengths(length, 100, 2000, 0))]
try:  # peak RSS from here on is the builds' own (Linux; else the process's, setup included)
    Path("/proc/self/clear_refs").write_text("5")
except OSError:
    pass
before = status("VmRSS")
seconds, cpu_seconds = [], []
for index in range(repeats):
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run(seq_lens, length)
    seconds.append(time.perf_counter() - started)
    cpu_seconds.append(time.process_time() - cpu_started)
    if index < repeats - 1:
        del result  # not alive during the next build
grown = status("VmHWM") - before
report = {"setup_s": setup, "seconds": seconds, "cpu_seconds": cpu_seconds, "grown_mib": grown}
if method.startswith("collate"):
    report["batch_bytes"] = sum(v.nbytes for v in result.values() if torch.is_tensor(v))
    # a dense tensor on CPU; where torchtune uses flex attention (CUDA) a BlockMask, not counted
    report["mask_bytes"] = result["mask"].nbytes if torch.is_tensor(result.get("mask")) else 0
if out != "-":
    if method.startswith("collate"):
        torch.save({k: result[k] for k in ("tokens", "labels", "input_pos")}, out)
    else:
        torch.save(result.to_dense(), out)
print(json.dumps(report))
"""


def build(method: str, length: int, out: str, repeats: int) -> dict:
    """One fresh process: a setup build on a 256-token pack, then ``repeats`` builds (or
    collates) of the ``length``-token pack; their times and peak-RSS growth (MiB)."""
    here = str(Path(__file__).resolve().parent)
    # Every large block mapped and unmapped on its own, so peak RSS follows the live tensors
    # (as in document_masking.py), not the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_",
                                                                   str(1 << 20))}
    done = subprocess.run([sys.executable, "-c", CHILD, method, str(length), out,
                           str(repeats), here],
                          capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"{method} at {length} tokens failed (exit code {done.returncode}):\n"
                 f"{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["seconds"])
    result["median_cpu_s"] = statistics.median(result["cpu_seconds"])
    return result


def lengths_of(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,8192,16384",
                        help="lengths built both ways and compared")
    parser.add_argument("--ours-only", default="65536",
                        help="lengths where only ours is built (torch's needs ~10 bytes x S^2)")
    parser.add_argument("--collate", default="8192,16384",
                        help="lengths of the collate comparison ('' skips it)")
    parser.add_argument("--repeats", type=int_at_least(1), default=3,
                        help="warm builds (collates) timed per process; the median is reported")
    args = parser.parse_args(argv)
    import tempfile

    import torch

    print(f"one pack of 100-2,000-token documents, batch 1, CPU; each cell a fresh process: "
          f"a setup build on a 256-token pack first (timed apart, not in the ratios), then "
          f"the median of {args.repeats} warm builds (the ratios use these); peak = growth of peak RSS over "
          f"the RSS before the warm builds\n")
    print("| length | torch create_block_mask: warm s, peak MiB | ours: warm s, peak MiB "
          "| time ratio | memory ratio | same mask | setup build s: torch / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    status = 0
    with tempfile.TemporaryDirectory() as scratch:
        for length in lengths_of(args.lengths):
            theirs_file, ours_file = f"{scratch}/theirs.pt", f"{scratch}/ours.pt"
            theirs = build("torch", length, theirs_file, args.repeats)
            ours = build("ours", length, ours_file, args.repeats)
            same = torch.equal(torch.load(theirs_file), torch.load(ours_file))
            status |= not same
            # Ours often grows by less than 1 MiB once set up: then only a bound is known.
            memory = (f"{theirs['grown_mib'] / ours['grown_mib']:,.0f}x"
                      if ours["grown_mib"] >= 1 else
                      f"> {theirs['grown_mib']:,.0f}x (ours < 1 MiB)")
            print(f"| {length:,} | {theirs['median_s']:.3f}, {theirs['grown_mib']:,.0f} | "
                  f"{ours['median_s']:.3f}, {ours['grown_mib']:,.1f} | "
                  f"{theirs['median_s'] / ours['median_s']:,.0f}x | {memory} | {same} | "
                  f"{theirs['setup_s']:.3f} / {ours['setup_s']:.3f} |", flush=True)
        for length in lengths_of(args.ours_only):
            ours = build("ours", length, "-", args.repeats)
            print(f"| {length:,} | not run (~{10 * length ** 2 / 2 ** 30:,.0f} GiB) | "
                  f"{ours['median_s']:.3f}, {ours['grown_mib']:,.1f} | - | - | - | "
                  f"- / {ours['setup_s']:.3f} |", flush=True)
        collate_lengths = lengths_of(args.collate)
        if collate_lengths:
            print(f"\ncollate of one packed batch: torchtune's padded_collate_packed (on this "
                  f"CPU a dense [b, S, S] mask) against ours, collate_packs without a mask; "
                  f"median of {args.repeats} warm collates after a setup one; MB = 10^6 "
                  f"bytes\n")
            print("| length | batch with torchtune's mask | batch without | peak RSS growth "
                  "of the collate | its CPU time | its wall time | same tokens, labels, "
                  "positions |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
        for length in collate_lengths:
            theirs_file, ours_file = f"{scratch}/tt_batch.pt", f"{scratch}/ours_batch.pt"
            theirs = build("collate-torchtune", length, theirs_file, args.repeats)
            ours = build("collate-ours", length, ours_file, args.repeats)
            a, b = torch.load(theirs_file), torch.load(ours_file)
            same = all(torch.equal(a[k], b[k]) for k in a)
            status |= not same
            print(f"| {length:,} | {theirs['batch_bytes'] / 1e6:.2f} MB (mask "
                  f"{theirs['mask_bytes'] / 1e6:.2f}) | {ours['batch_bytes'] / 1e6:.2f} MB | "
                  f"{theirs['grown_mib'] * 2**20 / 1e6:.1f} MB -> "
                  f"{ours['grown_mib'] * 2**20 / 1e6:.1f} MB | "
                  f"{theirs['median_cpu_s'] * 1e3:.1f} ms -> {ours['median_cpu_s'] * 1e3:.2f} ms | "
                  f"{theirs['median_s'] * 1e3:.1f} ms -> {ours['median_s'] * 1e3:.2f} ms | "
                  f"{same} |", flush=True)
    if status:
        print("\nMISMATCH: the two builds (or collates) above marked False differ",
              file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
