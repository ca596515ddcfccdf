"""What the long-context memory knobs save: one SmolLM2-135M training step, knob by knob.

One training step (forward, backward, gradient clipping, AdamW; fp32, CPU) of the embedded
SmolLM2-135M on one packed sequence of real text (the documents of a corpus file in order,
tokenized with the SmolLM2 tokenizer and packed end to end, continuous positions, RoPE base 1e6
as in configs/smollm2/long_context_stage1.yaml), at each of ``--lengths``, four ways:

* (a) ``plain``: full ``length x vocabulary`` logits and torchtune's explicit block-causal SDPA
  mask (torchtune's CPU path);
* (b) ``+ act. ckpt``: (a) with activation checkpointing of every decoder layer;
* (c) ``+ chunked loss``: (b) with the loss computed ``--chunk`` positions at a time;
* (d) ``+ doc attention``: (c) with per-document attention instead of the mask, i.e. what
  ``long_context_recipe`` does on CPU with the stage configs.

Each runs in a fresh spawned process (the step, model loading and memory readings of
acadlm_plugins.training.step_probe), so its peak RSS (the high-water mark VmHWM, lowered to
the RSS once the model is loaded) and time are its own. torch's AdamW allocates its two moments
lazily, in the first ``step()``; left so, every configuration's step growth would hold the same
fixed ~1 GiB of moments (4 bytes x 2 x 134.5M parameters) and the ratios would mostly compare
that constant. So step_probe allocates the moments before lowering the high-water mark (a step
with zero gradients at learning rate 0, step counts reset to 0: the measured step is the same
first step) and reports them apart. The table gives the peak, the RSS with the model and the
AdamW moments allocated, the step's growth (peak minus that; it still holds the gradients,
which every configuration needs, 4 bytes per parameter: printed above the table) and its ratio
to (a) of the same run, and wall and CPU time. The losses and gradient norms of
all configurations must agree to 1e-4 (relative); the script exits with status 1 if they do
not. A configuration that runs out of memory under ``--memory-limit-gib`` (an ``RLIMIT_DATA``
of the child, so a failure stays in that process) is reported with the peak it reached
(``>``); if that is (a), the others' ratios are upper bounds (``<``).

Run::

    .venv/bin/python benchmarks/long_context_memory.py                       # 4096 and 8192
    .venv/bin/python benchmarks/long_context_memory.py --lengths 4096 --configs a,d --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from acadlm_plugins.training.step_probe import (
    Knobs,
    OutOfMemory,
    StepResult,
    available_memory,
    packed_text_batch,
    probe_step,
)

CONFIG_NAMES = {"a": "plain", "b": "+ act. ckpt", "c": "+ chunked loss", "d": "+ doc attention"}
AGREEMENT_TOL = 1e-4  # relative; the configurations compute the same step in another order
MIB = 2**20


def knobs_for(config: str, chunk: int) -> Knobs:
    """The knobs of configuration ``a``..``d`` (each adds one to the previous)."""
    return Knobs(activation_checkpointing=config >= "b",
                 chunked_loss_tokens=chunk if config >= "c" else 0,
                 document_attention=config >= "d")


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def format_row(seq_len: int, docs: int, config: str, result: StepResult | OutOfMemory,
               base: StepResult | OutOfMemory | None) -> str:
    """One line of the table; when (a) ran out of memory, what it reached is a lower bound on
    its peak and growth, hence upper bounds (``<``) on the ratios of the others."""
    label = f"{seq_len:>6} {docs:>4} ({config}) {CONFIG_NAMES[config]:<15}"
    if isinstance(result, OutOfMemory):
        return (f"{label} {'-':>9} {'-':>8} {'>' + format(result.peak_rss / MIB, '.0f'):>8} "
                f"{result.rss_after_load / MIB:>7.0f} "
                f"{'>' + format(result.step_growth / MIB, '.0f'):>7}   out of memory: "
                f"{result.message}")
    if base is None:
        growth_ratio = time_ratio = f"{'-':>6}"
    elif isinstance(base, OutOfMemory):
        growth_ratio = f"{'<' + format(result.step_growth / base.step_growth, '.2f'):>6}"
        time_ratio = f"{'-':>6}"
    else:
        growth_ratio = f"{result.step_growth / base.step_growth:>6.2f}"
        time_ratio = f"{result.cpu_seconds / base.cpu_seconds:>6.2f}"
    return (f"{label} {result.loss:>9.5f} {result.grad_norm:>8.4f} "
            f"{result.peak_rss / MIB:>8.0f} {result.rss_after_load / MIB:>7.0f} "
            f"{result.step_growth / MIB:>7.0f} {growth_ratio} {result.seconds:>7.1f} "
            f"{result.cpu_seconds:>7.1f} {time_ratio}")


def check_agreement(results: dict[str, StepResult | OutOfMemory]) -> list[str]:
    """Mismatches of loss or gradient norm between the first configuration that ran and the
    others (an empty list when all agree)."""
    ran = {c: r for c, r in results.items() if isinstance(r, StepResult)}
    if not ran:
        return []
    first, reference = next(iter(ran.items()))
    problems = []
    for config, result in ran.items():
        for name in ("loss", "grad_norm"):
            diff = relative_difference(getattr(reference, name), getattr(result, name))
            if not diff <= AGREEMENT_TOL:
                problems.append(f"{name} of ({config}) differs from ({first}) by {diff:.1e}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,8192",
                        help="comma-separated sequence lengths (default 4096,8192)")
    parser.add_argument("--configs", default="a,b,c,d", help="which of a,b,c,d to run")
    parser.add_argument("--chunk", type=int, default=1024,
                        help="positions per loss chunk in (c) and (d) (default 1024)")
    parser.add_argument("--corpus-file", type=Path, default=None,
                        help="JSON-lines file of documents (default: the embedded corpus's "
                             "books/train.jsonl, book passages of a few hundred to 2,500 tokens)")
    parser.add_argument("--rope-base", type=float, default=1e6, help="RoPE θ (stage 1: 1e6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per step")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N of the 30 decoder layers (default: all; "
                             "tests/test_long_context_memory.py uses fewer)")
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="data limit of each step's process (default: MemAvailable at "
                             "start minus 2 GiB)")
    args = parser.parse_args(argv)

    from acadlm_plugins.defaults import default_corpus_dir, require_default_model
    from acadlm_plugins.errors import DefaultsMissingError
    from acadlm_plugins.models import smollm2_tokenizer

    try:
        model_dir = require_default_model()
    except DefaultsMissingError as err:
        sys.exit(str(err))
    corpus_file = args.corpus_file or default_corpus_dir() / "books" / "train.jsonl"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or set(configs) - set(CONFIG_NAMES):
        sys.exit(f"--configs takes some of {','.join(CONFIG_NAMES)}, got {args.configs!r}")
    limit = (int(args.memory_limit_gib * 2**30) if args.memory_limit_gib
             else available_memory() - 2 * 2**30)
    tokenizer = smollm2_tokenizer()

    model_name = "SmolLM2-135M" + (f" (first {args.layers} layers)" if args.layers else "")
    print(f"{model_name}, one training step (forward + backward + clip + AdamW), fp32, CPU, "
          f"{args.threads} thread(s), RoPE base {args.rope_base:g}, text from {corpus_file}; "
          f"each configuration in a fresh process, data limited to {limit / 2**30:.1f} GiB")
    print("peak = VmHWM of the step (reset after loading); loaded = RSS with the model and "
          "AdamW's moments allocated; growth = peak - loaded (holds the gradients); "
          "x(a) = ratio to (a) in this run (time ratio from process CPU time)")
    header = (f"{'tokens':>6} {'docs':>4} {'configuration':<19} {'loss':>9} {'grad':>8} "
              f"{'peak MiB':>8} {'loaded':>7} {'growth':>7} {'x(a)':>6} {'wall s':>7} "
              f"{'cpu s':>7} {'x(a)':>6}")
    print(header)
    print("-" * len(header), flush=True)
    problems = []
    last: StepResult | OutOfMemory | None = None
    for seq_len in [int(x) for x in args.lengths.split(",")]:
        batch = packed_text_batch(corpus_file, seq_len, tokenizer)
        docs = int((batch["seq_lens"] > 0).sum())
        results: dict[str, StepResult | OutOfMemory] = {}
        for config in configs:
            results[config] = last = probe_step(
                model_dir, batch, knobs_for(config, args.chunk), rope_base=args.rope_base,
                threads=args.threads, memory_limit=limit, layers=args.layers)
            print(format_row(seq_len, docs, config, results[config], results.get("a")),
                  flush=True)
        mismatches = check_agreement(results)
        problems += [f"{seq_len}: {m}" for m in mismatches]
        print(f"{'':>6} losses and gradient norms agree to {AGREEMENT_TOL:g} relative: "
              f"{'no: ' + '; '.join(mismatches) if mismatches else 'yes'}", flush=True)
    if last is not None:
        print(f"fixed costs, the same in every configuration: AdamW moments "
              f"{last.moment_bytes / MIB:.0f} MiB (allocated before the step, in loaded), "
              f"gradients {last.gradient_bytes / MIB:.0f} MiB (allocated by the step, in growth)")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
