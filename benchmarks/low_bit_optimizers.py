"""torchao's low-bit AdamW against torch's AdamW on SmolLM2-135M: state bytes, step memory,
time and loss after the same steps on the same batches.

Each optimizer runs in its own freshly spawned process (so the peak memory is its own): load
SmolLM2-135M in fp32, then ``--steps`` training steps on the same windows of the embedded
corpus, each ``--seq-len`` tokens. Reported per optimizer, and as a ratio to torch AdamW:

* optimizer-state bytes after the first step, counted from what the states hold (8-bit codes
  and their scales for torchao; float32 moments otherwise);
* the steps' peak RSS over the RSS with the model loaded (the RSS high-water mark is reset after
  loading), which holds gradients, activations and the states;
* wall-clock seconds per step after the first (the first compiles torchao's update: shown
  apart); ``--steps`` must be at least 2 for that, ``--held-out`` at least 1;
* training loss at the last step and the loss on held-out windows after the last step.

Run::

    .venv/bin/python benchmarks/low_bit_optimizers.py                 # 8 steps of 512 tokens
    .venv/bin/python benchmarks/low_bit_optimizers.py --steps 20 --optimizers torch.optim.AdamW,torchao.optim.AdamW8bit
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import time
from pathlib import Path
from typing import Any

import torch

from acadlm_plugins.cli_types import int_at_least

OPTIMIZERS = ("torch.optim.AdamW", "torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit")
POLL_SECONDS = 1.0  # how often the parent checks that a child is still alive


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    # s/step is timed over the steps after the first (which compiles torchao's update).
    parser.add_argument("--steps", type=int_at_least(2), default=8,
                        help="training steps, at least 2 (s/step excludes the first)")
    parser.add_argument("--seq-len", type=int_at_least(1), default=512)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int_at_least(1), default=2)
    parser.add_argument("--held-out", type=int_at_least(1), default=2,
                        help="held-out windows for the loss, at least 1")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return parser.parse_args(argv)


def token_windows(seq_len: int, count: int) -> torch.Tensor:
    """``count`` consecutive windows of ``seq_len + 1`` tokens of the embedded corpus's books
    and docs validation text (inputs and their next-token targets)."""
    from acadlm_plugins.defaults.corpus import read_jsonl
    from acadlm_plugins.defaults.paths import require_default_corpus
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    tokenizer = smollm2_tokenizer(max_seq_len=None)
    corpus = require_default_corpus()
    ids: list[int] = []
    need = count * (seq_len + 1)
    for domain in ("books", "docs", "scripture", "code"):
        for row in read_jsonl(corpus / domain / "validation.jsonl"):
            ids += tokenizer.encode(row["text"], add_bos=True, add_eos=True)
            if len(ids) >= need:
                return torch.tensor(ids[:need]).view(count, seq_len + 1)
    raise SystemExit(f"the embedded corpus holds fewer than {need} validation tokens")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(field)


def _loss(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[None, :-1])
    return torch.nn.functional.cross_entropy(logits[0].float(), window[1:])


def run_optimizer(component: str, windows: torch.Tensor, steps: int, lr: float,
                  threads: int, queue) -> None:
    """Child process: load, train ``steps`` steps, report (see the module docstring)."""
    from acadlm_plugins._compat import component_from_path
    from acadlm_plugins.defaults.paths import require_default_model
    from acadlm_plugins.training.optimizers import optimizer_state_bytes
    from acadlm_plugins.training.step_probe import load_smollm2

    builder = component_from_path(component)  # a mistyped path fails before the model loads
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    windows = windows.clone()
    model = load_smollm2(require_default_model(), max_seq_len=windows.shape[1],
                         rope_base=100_000.0, activation_checkpointing=False)
    optimizer = builder(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rss_loaded = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak from here on is the steps' own
    losses, seconds, state = [], [], None
    for step in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, windows[step])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
        if state is None:
            state = optimizer_state_bytes(optimizer)
    peak = _rss("VmHWM")
    with torch.no_grad():
        held_out = [float(_loss(model, w)) for w in windows[steps:]]
    queue.put({"optimizer": component, "state_bytes": state["total"],
               "low_bit_bytes": state["low_bit"], "step_growth": peak - rss_loaded,
               "first_step_s": seconds[0],
               "step_s": sum(seconds[1:]) / (len(seconds) - 1),  # --steps >= 2
               "losses": losses, "held_out_loss": sum(held_out) / len(held_out)})


def child_result(child: Any, results: Any, component: str, *,
                 poll_seconds: float = POLL_SECONDS) -> dict[str, Any]:
    """The row ``child`` puts on ``results``, waiting as long as the child lives.

    A bare ``results.get()`` waited forever when the child died before reporting (a mistyped
    ``--optimizers`` path, an out-of-memory kill): now the child's exit is noticed and
    reported (its traceback is already on stderr) with SystemExit naming the optimizer."""
    while True:
        try:
            return results.get(timeout=poll_seconds)
        except queue_module.Empty:
            if child.exitcode is None:
                continue  # still training
            try:  # it may have reported just before it exited
                return results.get(timeout=poll_seconds)
            except queue_module.Empty:
                raise SystemExit(f"error: the {component} run exited with code "
                                 f"{child.exitcode} without a result; its error is above "
                                 "(a mistyped --optimizers path, for one), or a negative "
                                 "code names the signal that killed it (9: out of "
                                 "memory).") from None


def main() -> None:
    args = parse_args()
    components = [c for c in args.optimizers.split(",") if c]
    windows = token_windows(args.seq_len, args.steps + args.held_out)
    context = mp.get_context("spawn")
    rows = []
    for component in components:
        queue = context.Queue()
        child = context.Process(target=run_optimizer, args=(component, windows, args.steps,
                                                            args.lr, args.threads, queue))
        child.start()
        try:
            rows.append(child_result(child, queue, component))
        except BaseException:
            if child.is_alive():
                child.terminate()  # interrupted: do not leave it training
            raise
        finally:
            child.join()
        print(f"done: {component}", flush=True)
    base = rows[0]
    print(f"\nSmolLM2-135M, fp32, {args.steps} steps x {args.seq_len} tokens, lr {args.lr}, "
          f"{args.threads} threads; ratios to {base['optimizer']}\n")
    header = (f"{'optimizer':<26}{'state MiB':>10}{'ratio':>7}{'step growth MiB':>17}{'ratio':>7}"
              f"{'wall s/step':>12}{'ratio':>7}{'1st step s':>11}{'last loss':>10}{'held-out':>9}"
              f"{'diff':>8}")
    print(header)
    for row in rows:
        print(f"{row['optimizer']:<26}{row['state_bytes'] / 2**20:>10.1f}"
              f"{row['state_bytes'] / base['state_bytes']:>7.3f}"
              f"{row['step_growth'] / 2**20:>17.0f}{row['step_growth'] / base['step_growth']:>7.2f}"
              f"{row['step_s']:>12.2f}{row['step_s'] / base['step_s']:>7.2f}"
              f"{row['first_step_s']:>11.1f}{row['losses'][-1]:>10.4f}"
              f"{row['held_out_loss']:>9.4f}{row['held_out_loss'] - base['held_out_loss']:>+8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
