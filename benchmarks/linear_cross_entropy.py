"""One training step's peak memory and time through a stock recipe's loss: torchtune 0.6.1's
``CEWithChunkedOutputLoss`` on the model's logits, against ``model.project_in_loss`` +
``LinearCrossEntropyLoss`` (the projection a chunk of positions at a time).

Every setting runs in a fresh process on the embedded SmolLM2-135M (its real weights, 49,152
words) and the same random tokens: the model's forward, the loss and the backward pass, as the
stock recipes run them (labels shifted with torchtune's ignore index; the layers under
activation checkpointing by default, as ProLong's SFT config). Memory is the growth of
the process's peak resident memory over one step, with glibc returning freed buffers at once
(CPU: peak RSS is what a CPU run pays; on a GPU the CUDA allocator holds the same buffers);
time is the median of the next steps.

    python benchmarks/linear_cross_entropy.py                    # 4,096 tokens, fp32
    python benchmarks/linear_cross_entropy.py --tokens 8192 --steps 2 --no-checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("torchtune", "ours_512", "ours_2048")
LABELS = {"torchtune": "logits + torchtune CEWithChunkedOutputLoss(8)",
          "ours_512": "project_in_loss + LinearCrossEntropyLoss(512)",
          "ours_2048": "project_in_loss + LinearCrossEntropyLoss(2048)"}


def _peak_mb() -> float:
    """The process's peak resident memory since the last :func:`_reset_peak` (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Start the peak over from the current resident memory (loading the model peaks higher
    than a step of the smaller settings)."""
    Path("/proc/self/clear_refs").write_text("5")


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(setting: str, tokens: int, steps: int, checkpoint_layers: bool) -> dict:
    """One setting in this process: peak-memory growth (MB) of the first step, median seconds
    of the next ``steps``, and the first step's loss."""
    import torch
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    from acadlm_plugins.defaults import require_default_model
    from acadlm_plugins.models import hf_model_spec
    from acadlm_plugins.training.linear_cross_entropy import (
        LinearCrossEntropyLoss,
        project_in_loss,
    )

    ours = setting.startswith("ours_")
    model = hf_model_spec(require_default_model()).load(
        max_seq_len=None, device=torch.device("cpu"), dtype=torch.float32)
    model.requires_grad_(True)
    if checkpoint_layers:  # as the stock recipes' enable_activation_checkpointing
        from torchtune import training
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(
            model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if ours:
        project_in_loss(model)
    if ours:
        loss_fn = LinearCrossEntropyLoss(chunk_tokens=int(setting.split("_")[1]))
    else:
        loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    vocab = model.tok_embeddings.num_embeddings
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (1, tokens), generator=generator)
    labels = torch.hstack((batch[:, 1:], torch.full((1, 1), -100)))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch), labels)
        loss.backward()
        return float(loss)

    model(batch[:, :16])  # libraries warmed up on a tiny forward
    before = _resident_mb()
    _reset_peak()
    loss = step()
    growth = _peak_mb() - before
    seconds = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - begin)
    return {"setting": setting, "peak_growth_mb": round(growth, 1), "loss": loss,
            "seconds": round(statistics.median(seconds), 3) if seconds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=1, help="timed steps after the first")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every layer's activations (default: checkpointed, as "
                             "ProLong's SFT config)")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.steps,
                                 not args.no_checkpointing)))
        return
    rows = []
    for setting in SETTINGS:
        # Large buffers mmapped and returned when freed, so that resident memory follows the
        # live tensors (glibc keeps freed heap memory otherwise, and the peak would be the
        # allocator's, not the step's).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, __file__, "--child", setting, "--tokens",
                               str(args.tokens), "--steps", str(args.steps),
                               *(["--no-checkpointing"] if args.no_checkpointing else [])],
                              capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    layers = "all activations kept" if args.no_checkpointing else "layers checkpointed"
    print(f"one step of SmolLM2-135M (fp32, CPU, {os.cpu_count()} cores, {layers}), "
          f"{args.tokens:,} tokens; torchtune's loss keeps {args.tokens:,} x 49,152 logits and "
          f"their log-softmax: {args.tokens * 49152 * 8 / 2**20:,.0f} MB")
    print(f"{'setting':50s} {'peak growth MB':>15s} {'ratio':>6s} {'s/step':>7s} {'ratio':>6s} "
          f"{'loss':>8s}")
    for row in rows:
        ratio = row["peak_growth_mb"] / base["peak_growth_mb"]
        time_ratio = (row["seconds"] / base["seconds"]) if base["seconds"] else float("nan")
        print(f"{LABELS[row['setting']]:50s} {row['peak_growth_mb']:15.1f} {ratio:6.2f} "
              f"{row['seconds'] or float('nan'):7.2f} {time_ratio:6.2f} {row['loss']:8.4f}")


if __name__ == "__main__":
    main()
