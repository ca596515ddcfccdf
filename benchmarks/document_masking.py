"""What per-document attention masking costs on packed sequences of many short documents.

One attention call (forward and backward, as in training) with SmolLM2-135M's attention shapes
(9 heads, head_dim 64, batch 1, fp32) on a pack of documents whose lengths are drawn uniformly
from 100..2000 tokens (the last one cut to fill the pack), timed and measured four ways in the
same run:

* (a) ``causal``: SDPA with ``is_causal=True`` over the whole pack. Fast, but wrong for packing
  (tokens attend across document boundaries); it is the baseline the ratios refer to.
* (b) ``doc mask``: SDPA with the explicit bool block-causal mask (what torchtune's
  ``padded_collate_packed`` builds when flex attention is unavailable, e.g. on CPU).
* (c) ``doc loop``: each document's causal attention on its own, outputs concatenated. The
  exact result by construction, the reference (b) is checked against.
* (d) ``flex``: ``flex_attention`` with a document ``BlockMask`` built as our collate builds
  it (``document_masks.document_block_mask``; only where CUDA is available, as torchtune's
  flex path needs it).

Each method runs in a fresh process so its peak memory is its own: on CPU the growth of peak
RSS (``VmHWM``, reset before the measurement) over the inputs, on CUDA
``torch.cuda.max_memory_allocated`` over the inputs (children get ``MALLOC_MMAP_THRESHOLD_``
so that freed tensors leave RSS at once). The mask is built inside the measured
region (it has to exist at training time) but outside the timed one. Times are medians of
wall time and of process CPU time; on CPU the ratios use CPU time, which other jobs on a
shared machine disturb less (torch runs single-threaded by default here). The script exits
with status 1 if (b) or (d) differ from (c).

Run::

    .venv/bin/python benchmarks/document_masking.py                        # 8K and 16K
    .venv/bin/python benchmarks/document_masking.py --lengths 4096 --repeats 5 --forward-only
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("causal", "doc mask", "doc loop", "flex")
CHECK_TOL = 1e-4  # fp32; the loop and the masked call sum in a different order


def document_lengths(seq_len: int, low: int, high: int, seed: int) -> list[int]:
    """Uniform lengths in ``[low, high]`` laid end to end until ``seq_len``; the last is cut."""
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - seq_len
    return lengths


def _rss_reset() -> None:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0; else a no-op)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _attention(method: str, lengths: list[int], device: torch.device):
    """A function ``(q, k, v) -> out`` for ``method``, with its mask already built."""
    import torch.nn.functional as F

    if method == "causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if method == "doc mask":
        from torchtune.modules.attention_utils import create_block_causal_mask

        mask = create_block_causal_mask([torch.tensor(lengths, device=device)])[:, None]
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if method == "doc loop":
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()

        def loop(q, k, v):
            return torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e],
                                                             v[:, :, s:e], is_causal=True)
                              for s, e in itertools.pairwise(bounds)], dim=2)
        return loop
    from torch.nn.attention.flex_attention import flex_attention

    from acadlm_plugins.data.document_masks import document_block_mask

    block_mask = document_block_mask([torch.tensor(lengths)], device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _measure(method: str, lengths: list[int], cfg: dict, out_file: str, queue) -> None:
    """Child process: time ``cfg['repeats']`` calls of ``method`` after ``cfg['warmup']``,
    record the peak memory, save the output (and dq) for the numerical check."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    shape = (1, cfg["heads"], sum(lengths), cfg["head_dim"])
    backward = not cfg["forward_only"]
    q, k, v, grad_out = (torch.randn(shape, generator=generator, device=device) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(backward)

    # One small call first, so that loading kernels (code pages, compilation) is not counted.
    warm = [torch.randn(1, cfg["heads"], 256, cfg["head_dim"], device=device,
                        requires_grad=backward) for _ in range(3)]
    warm_out = _attention(method, [128, 128], device)(*warm)
    if backward:
        warm_out.sum().backward()
    del warm, warm_out
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_reset()
        base = _rss_now_bytes()
    attention = _attention(method, lengths, device)
    times, cpu_times = [], []
    for step in range(cfg["warmup"] + cfg["repeats"]):
        for t in (q, k, v):
            t.grad = None
        if cuda:
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        out = attention(q, k, v)
        if backward:
            out.backward(grad_out)
        if cuda:
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()) - base
    torch.save({"out": out.detach().cpu(), "dq": q.grad.cpu() if backward else None}, out_file)
    queue.put({"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
               "peak_bytes": peak})


def measure_in_fresh_process(method: str, lengths: list[int], cfg: dict,
                             out_file: Path) -> dict:
    # glibc serves blocks below a (growing, up to 32 MiB) threshold from its heap and keeps
    # them after free, so RSS would depend on the allocation history; with every large block
    # mapped and unmapped on its own, peak RSS follows the live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_measure, args=(method, lengths, cfg, str(out_file), queue))
    child.start()
    child.join()
    if child.exitcode:
        sys.exit(f"{method} at {sum(lengths)} tokens failed (exit code {child.exitcode}).")
    return queue.get()


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference of the outputs (and of dq, if saved) of two methods."""
    x, y = torch.load(a), torch.load(b)
    worst = (x["out"] - y["out"]).abs().max().item()
    if x["dq"] is not None:
        worst = max(worst, (x["dq"] - y["dq"]).abs().max().item())
    return worst


def pack_lengths(values: list[str]) -> list[int]:
    """The ``--lengths`` values as ints, each value either one length or a comma-separated
    list (``--lengths 8192 16384`` and ``--lengths 8192,16384`` mean the same, as in
    long_context_memory.py); anything else raises ValueError naming the bad item."""
    lengths = []
    for value in values:
        for item in value.split(","):
            try:
                length = int(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an integer") from None
            if length < 1:
                raise ValueError(f"{length} is not a positive length")
            lengths.append(length)
    return lengths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", default=["8192", "16384"],
                        help="pack lengths in tokens, space- or comma-separated "
                             "(default: 8192 16384)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--doc-min", type=int, default=100, help="shortest document")
    parser.add_argument("--doc-max", type=int, default=2000, help="longest document")
    parser.add_argument("--heads", type=int, default=9, help="attention heads (SmolLM2: 9)")
    parser.add_argument("--head-dim", type=int, default=64, help="head size (SmolLM2: 64)")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.lengths = pack_lengths(args.lengths)
    except ValueError as err:
        parser.error(f"--lengths: {err}")

    cfg = {k: getattr(args, k) for k in ("repeats", "warmup", "heads", "head_dim",
                                         "forward_only", "threads", "device", "seed")}
    methods = [m for m in METHODS if m != "flex" or args.device.startswith("cuda")]
    print(f"attention {'forward' if args.forward_only else 'forward + backward'}, batch 1, "
          f"{args.heads} heads x {args.head_dim}, fp32, {args.device}"
          f"{f' ({args.threads} thread(s))' if args.device == 'cpu' else ''}, "
          f"documents of {args.doc_min}..{args.doc_max} tokens, median of {args.repeats} "
          f"after {args.warmup} warm-up; ratios are against (a) causal in this run"
          f"{' (time ratio from process CPU time)' if args.device == 'cpu' else ''}")
    if "flex" not in methods:
        print("(d) flex: skipped, needs CUDA")
    # On a shared CPU, process time is steadier than wall time; the ratio uses it there.
    clock = "cpu_seconds" if args.device == "cpu" else "seconds"
    header = (f"{'tokens':>7} {'docs':>5} {'method':<13} {'wall s':>8} {'cpu s':>8} "
              f"{'x causal':>9} {'peak MiB':>9} {'x causal':>9}")
    print(header)
    print("-" * len(header))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in args.lengths:
            lengths = document_lengths(seq_len, args.doc_min, args.doc_max, args.seed)
            results = {m: measure_in_fresh_process(m, lengths, cfg, Path(tmp) / f"{i}.pt")
                       for i, m in enumerate(methods)}
            base = results["causal"]
            for method, r in results.items():
                label = f"({'abcd'[METHODS.index(method)]}) {method}"
                print(f"{seq_len:>7} {len(lengths):>5} {label:<13} {r['seconds']:>8.3f} "
                      f"{r['cpu_seconds']:>8.3f} {r[clock] / base[clock]:>9.2f} "
                      f"{r['peak_bytes'] / 2**20:>9.0f} "
                      f"{r['peak_bytes'] / max(base['peak_bytes'], 1):>9.2f}")
            useful = sum(n * n for n in lengths) / seq_len**2
            checks = []
            for method in ("doc mask", "flex"):
                if method in results:
                    diff = max_difference(Path(tmp) / f"{methods.index(method)}.pt",
                                          Path(tmp) / f"{methods.index('doc loop')}.pt")
                    failed |= not diff <= CHECK_TOL
                    checks.append(f"{method} vs doc loop: max |diff| {diff:.1e} "
                                  f"({'ok' if diff <= CHECK_TOL else 'MISMATCH'})")
            print(f"{'':>7} in-document share of the causal attention work "
                  f"{useful:.1%}; " + "; ".join(checks))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
