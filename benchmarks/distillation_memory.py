"""Peak memory of one distillation loss step: ours (the teacher projected one vocabulary chunk at
a time) against torchtune 0.6.1's knowledge-distillation losses on the teacher's full logits.

Every setting runs in a fresh process on the same random tensors of SmolLM2's shapes (49,152
words, 576 dims): the student's logits (what the recipe's model returns), the teacher's final
hidden state and output projection, and labels. Each process computes the LM loss mixed half
and half with the distillation loss and runs the backward, then reports the growth of its peak
resident memory over what it held before the loss (the inputs). CPU only: peak RSS is what a
CPU run pays; on a GPU the same buffers are allocated by the CUDA allocator.

    python benchmarks/distillation_memory.py                  # 4,096 tokens, fp32 and bf16
    python benchmarks/distillation_memory.py --tokens 8192 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB, DIM = 49_152, 576
SETTINGS = ("lm_only", "ours_512", "ours_2048", "ours_8192", "torchtune_full", "torchtune_chunked")
LABELS = {
    "lm_only": "LM loss only (no teacher)",
    "ours_512": "ours, vocab_chunk_size 512",
    "ours_2048": "ours, vocab_chunk_size 2048",
    "ours_8192": "ours, vocab_chunk_size 8192 (default)",
    "torchtune_full": "teacher logits + torchtune ForwardKLLoss",
    "torchtune_chunked": "teacher logits + torchtune ForwardKLWithChunkedOutputLoss(8)",
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(setting: str, tokens: int, dtype_name: str) -> dict:
    """One setting's loss and backward in this process; its peak-memory growth in MB."""
    import torch
    import torch.nn.functional as F
    from torchtune.modules.loss import ForwardKLLoss, ForwardKLWithChunkedOutputLoss

    from acadlm_plugins.training.chunked_loss import shifted_targets
    from acadlm_plugins.training.distillation_loss import forward_kl_chunked
    from acadlm_plugins.training.validation import shifted_token_losses

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(1, tokens, VOCAB, generator=generator) * 2).to(dtype).requires_grad_()
    hidden = torch.randn(1, tokens, DIM, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, DIM, generator=generator) * 0.05).to(dtype)
    labels = torch.randint(0, VOCAB, (1, tokens), generator=generator)
    targets = shifted_targets(labels)
    # libraries warmed up on a tiny problem, so that only this step's buffers count
    F.cross_entropy(torch.randn(4, 8, requires_grad=True), torch.zeros(4, dtype=torch.long)).backward()
    before = _resident_mb()
    summed, counted = shifted_token_losses(student, labels)  # the recipe's LM loss
    lm = summed.sum() / counted.sum()
    if setting == "lm_only":
        loss = lm
    elif setting.startswith("ours_"):
        kl_sum, count = forward_kl_chunked(student, hidden, targets, teacher_weight=weight,
                                           vocab_chunk_size=int(setting.split("_")[1]))
        loss = 0.5 * lm + 0.5 * kl_sum / count
    else:
        teacher = hidden @ weight.T
        if setting == "torchtune_full":
            kd = ForwardKLLoss()(student.flatten(0, 1), teacher.flatten(0, 1), targets.flatten())
        else:
            kd = ForwardKLWithChunkedOutputLoss(8)(list(student.chunk(8, 1)),
                                                   list(teacher.chunk(8, 1)), targets)
        loss = 0.5 * lm + 0.5 * kd
    loss.backward()
    assert student.grad is not None and torch.isfinite(loss)
    return {"setting": setting, "peak_growth_mb": max(_peak_mb() - before, 0.0),
            "logits_mb": student.numel() * student.element_size() / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--one", nargs=2, metavar=("SETTING", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    if args.one:
        print(json.dumps(measure(args.one[0], args.tokens, args.one[1])))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           # large blocks through mmap: freed memory leaves the process, so the peak is the peak
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"one micro-batch of {args.tokens:,} tokens, vocabulary {VOCAB:,}, dim {DIM}; "
          "peak RSS growth over the inputs, MB (loss + backward)")
    for dtype in args.dtypes:
        rows = {}
        for setting in SETTINGS:
            done = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens),
                                   "--one", setting, dtype], capture_output=True, text=True,
                                  env=env, check=False)
            if done.returncode != 0:
                print(f"{setting} ({dtype}) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows[setting] = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows["lm_only"]["peak_growth_mb"]
        full = rows["torchtune_full"]["peak_growth_mb"]
        print(f"\n{dtype} (student logits: {rows['lm_only']['logits_mb']:,.0f} MB)")
        print(f"{'setting':<62} {'peak MB':>9} {'/ LM only':>10} {'/ torchtune full':>17}")
        for setting, row in rows.items():
            peak = row["peak_growth_mb"]
            print(f"{LABELS[setting]:<62} {peak:>9,.0f} {peak / base:>10.2f} {peak / full:>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
