"""What AdamW steps do to SmolLM2-135M's weights in each precision a recipe can train in:
``dtype: fp32``, torchtune's ``dtype: bf16`` (weights and moments in bf16), ``dtype: bf16``
with ``Float32MasterAdamW`` (float32 copies of the weights and float32 moments in the optimizer:
what a stock torchtune recipe can do, ProLong's SFT config) and ``mixed_precision: true`` (fp32
weights and moments, bf16 math: ProLong's ``--bf16``, Sheared-LLaMA's ``amp_bf16``).

From the embedded default's real weights, on the same batches of real text (the embedded
corpus), each setting takes the same ``--steps`` steps: AdamW with ProLong stage 1's settings
(lr 1e-5, betas 0.9 / 0.95, weight decay 0.1) by default, a new batch each step. It prints,
side by side, for the weights the model computes with after the last step:

* the share of weight values that changed at all (a bf16 weight keeps its value when the
  update is below half a bf16 step of it);
* how far the applied update is from fp32's: ``||Δ - Δ_fp32|| / ||Δ_fp32||`` over all weights;
* the step's time (median over the steps of ``--repeats`` more runs, after one warm-up run;
  with ``--repeats 0``, over the one run's steps after its first).

After one step ``Float32MasterAdamW``'s bf16 weights are nearly plain bf16's (both round
about the same update of the same weight); they part from the second step on, as updates
accumulate in its float32 copy. CPU only here (bf16 math on CPU is not what a GPU's is; the time column is this
machine's)::

    python benchmarks/mixed_precision.py                    # lr 1e-5, one step of 2 x 512 tokens
    python benchmarks/mixed_precision.py --lr 1e-4 --tokens 256
    python benchmarks/mixed_precision.py --lr 2e-5 --steps 50 --tokens 64 --repeats 0  # SFT lr
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = ("fp32", "bf16", "master", "mixed")
LABELS = {"fp32": "dtype: fp32", "bf16": "dtype: bf16 (torchtune)",
          "master": "dtype: bf16, Float32MasterAdamW",
          "mixed": "dtype: bf16, mixed_precision: true"}
BF16_WEIGHTS = ("bf16", "master")


def source_state() -> tuple[dict[str, torch.Tensor], Path]:
    """The embedded SmolLM2-135M's weights in torchtune's names (fp32)."""
    import tempfile

    from torchtune.training import FullModelHFCheckpointer

    from acadlm_plugins.defaults import require_default_model

    model_dir = require_default_model()
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2", output_dir=tempfile.mkdtemp(prefix="mixed_precision_"))
    state = checkpointer.load_checkpoint()["model"]
    return {k: v.float() for k, v in state.items()}, model_dir


def text_batches(model_dir: Path, steps: int, rows: int, tokens: int) -> torch.Tensor:
    """``steps`` batches of ``rows`` sequences of ``tokens`` tokens of the embedded corpus's
    books, one after another."""
    from acadlm_plugins.defaults import require_default_corpus
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    tokenizer = smollm2_tokenizer(str(model_dir))
    needed = steps * rows * tokens
    ids: list[int] = []
    with open(require_default_corpus() / "books" / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            ids += tokenizer.encode(json.loads(line)["text"], add_bos=True, add_eos=True)
            if len(ids) >= needed:
                break
    if len(ids) < needed:
        raise SystemExit(f"the corpus's books hold {len(ids)} tokens, fewer than --steps x "
                         f"--rows x --tokens = {needed}")
    return torch.tensor(ids[:needed]).view(steps, rows, tokens)


def train(setting: str, state: dict[str, torch.Tensor], batches: torch.Tensor,
          args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The weights after one AdamW step per batch from ``state`` in ``setting``, and each
    step's time."""
    from torchtune import training

    from acadlm_plugins.models.smollm2 import smollm2_135m
    from acadlm_plugins.training.master_weights import Float32MasterAdamW
    from acadlm_plugins.training.runtime import compute_in

    held = torch.bfloat16 if setting in BF16_WEIGHTS else torch.float32
    with training.set_default_dtype(held):
        model = smollm2_135m(max_seq_len=batches.shape[-1])
    model.load_state_dict(state)
    if setting == "mixed":
        compute_in(model, torch.bfloat16, torch.device("cpu"))
    optimizer_class = Float32MasterAdamW if setting == "master" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                weight_decay=args.weight_decay)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for flag, value, least in (("--rows", args.rows, 1), ("--tokens", args.tokens, 2),
                               ("--steps", args.steps, 1), ("--repeats", args.repeats, 0)):
        if value < least:
            parser.error(f"{flag} {value}: must be at least {least}")
    if args.repeats == 0 and args.steps < 2:
        parser.error("--repeats 0 times the steps after the first of the one run: give --steps 2 "
                     "or more, or --repeats 1 or more")
    if not args.lr > 0 or args.weight_decay < 0:
        parser.error("--lr must be above 0 and --weight-decay at least 0")
    torch.manual_seed(0)
    state, model_dir = source_state()
    batches = text_batches(model_dir, args.steps, args.rows, args.tokens)
    after, times = {}, {}
    for setting in SETTINGS:
        start = ({k: v.bfloat16() for k, v in state.items()} if setting in BF16_WEIGHTS
                 else state)
        runs = [train(setting, start, batches, args) for _ in range(args.repeats + 1)]
        after[setting] = runs[0][0]
        timed = [s for _, seconds in runs[1:] for s in seconds] or runs[0][1][1:]
        times[setting] = statistics.median(timed)
    print(f"{args.steps} AdamW step(s) (lr {args.lr:g}, weight decay {args.weight_decay:g}) of "
          f"{args.rows} x {args.tokens} tokens of text each, SmolLM2-135M's weights, CPU")
    print(f"{'setting':<36}{'values changed':>16}{'update vs fp32':>16}{'step s':>9}")
    reference = {k: after["fp32"][k] - state[k] for k in state}
    ref_norm = torch.sqrt(sum((d ** 2).sum() for d in reference.values()))
    for setting in SETTINGS:
        start = ({k: v.bfloat16().float() for k, v in state.items()} if setting in BF16_WEIGHTS
                 else state)
        changed = sum(int((after[setting][k] != start[k]).sum()) for k in state)
        total = sum(v.numel() for v in state.values())
        error = torch.sqrt(sum(((after[setting][k] - start[k]) - reference[k]).pow(2).sum()
                               for k in state)) / ref_norm
        print(f"{LABELS[setting]:<36}{changed / total:>15.1%} {float(error):>15.3f}"
              f"{times[setting]:>9.2f}")
    print(f"step time, mixed / bf16: {times['mixed'] / times['bf16']:.2f}x; "
          f"Float32MasterAdamW / bf16: {times['master'] / times['bf16']:.2f}x; "
          f"mixed / fp32: {times['mixed'] / times['fp32']:.2f}x")


if __name__ == "__main__":
    main()
