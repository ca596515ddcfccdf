"""Throughput of lm-eval's ``acadlm`` model against lm-eval's own ``hf`` model.

Both load the same checkpoint folder (default: the embedded SmolLM2-135M-Instruct) in fp32 on
the CPU and answer the *same* lm-eval requests, built from the embedded corpus's validation
passages:

* ``loglikelihood``: multiple-choice style, each context (30-150 words) scored with 4 candidate
  continuations (its true next words and three taken from other passages);
* ``generate_until``: greedy continuation of passage openings until a blank line or
  ``--max-gen-toks`` tokens.

``generate_until`` is also timed a third way, ``acadlm-tt``: the same adapter with
torchtune's own attention at decoding steps (K/V heads repeated every step, what the adapter
did before :func:`acadlm_plugins.evaluation.generation.grouped_query_attention`), so one run
shows the change and the baseline side by side.

The models are timed in rotation (the order shifts every repeat) so that drift on a shared
machine hits all alike; it prints requests/s for each (median and best of the repeats, by wall
clock and by this process's CPU time, which a shared machine disturbs less), the ratios to
hf, and how far the answers differ. They must agree: every log-likelihood within
``LOGLIKELIHOOD_TOL`` of hf's, the same choice picked for every context, and the same
generated strings from acadlm, acadlm-tt and hf; otherwise the script exits with status 1
after printing the table.

Run::

    .venv/bin/python benchmarks/eval_adapter_vs_hf.py                  # 32 x 4 scored, 8 generated
    .venv/bin/python benchmarks/eval_adapter_vs_hf.py --contexts 64 --generations 16 --batch-size 4
    .venv/bin/python benchmarks/eval_adapter_vs_hf.py --threads 1      # on a busy shared machine
    .venv/bin/python benchmarks/eval_adapter_vs_hf.py --kinds generate_until --repeats 6
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from acadlm_plugins.defaults.corpus import read_jsonl
from acadlm_plugins.defaults.paths import require_default_corpus, require_default_model

DOMAINS = ("books", "docs", "scripture")
KINDS = ("loglikelihood", "generate_until")
# Absolute, in nats per request: two fp32 implementations of the same model sum in different
# orders (2.7e-5 and 5e-5 measured); a real difference in the model moves it by far more.
LOGLIKELIHOOD_TOL = 1e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--contexts", type=int, default=32,
                        help="loglikelihood contexts (4 requests each)")
    parser.add_argument("--generations", type=int, default=8, help="generate_until requests")
    parser.add_argument("--max-gen-toks", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="the same for both models")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="loglikelihood,generate_until",
                        help="request types to time, comma-separated")
    args = parser.parse_args()
    args.kinds = [kind for kind in KINDS if kind in args.kinds.split(",")]
    if not args.kinds:
        parser.error(f"--kinds: give some of {','.join(KINDS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def passages(limit: int, seed: int) -> list[str]:
    """Validation passages of the embedded corpus with at least 60 words."""
    corpus = require_default_corpus()
    texts = [doc["text"] for domain in DOMAINS if (corpus / domain / "validation.jsonl").is_file()
             for doc in read_jsonl(corpus / domain / "validation.jsonl")]
    texts = [t for t in texts if len(t.split()) >= 60]
    random.Random(seed).shuffle(texts)
    if len(texts) < 4:
        raise SystemExit(f"too few passages in {corpus}; rebuild it with `acadlm-defaults build`")
    return [texts[i % len(texts)] for i in range(limit)]


def loglikelihood_requests(texts: list[str], seed: int) -> list[Instance]:
    """4 (context, continuation) requests per text: its true next words and 3 distractors."""
    rng = random.Random(seed)
    pieces = []
    for text in texts:
        words = text.split()
        cut = rng.randint(30, min(150, len(words) - 8))
        pieces.append((" ".join(words[:cut]), " " + " ".join(words[cut:cut + rng.randint(1, 6)])))
    requests = []
    for index, (context, answer) in enumerate(pieces):
        others = [pieces[(index + k) % len(pieces)][1] for k in (1, 2, 3)]
        for choice in [answer, *others]:
            requests.append(Instance("loglikelihood", {}, (context, choice), len(requests),
                                     ("benchmark_mc", index, 1)))
    return requests


def generation_requests(texts: list[str], max_gen_toks: int, seed: int) -> list[Instance]:
    rng = random.Random(seed + 1)
    requests = []
    for index, text in enumerate(texts):
        words = text.split()
        prompt = " ".join(words[:rng.randint(30, min(150, len(words)))])
        requests.append(Instance("generate_until", {}, (prompt, {
            "until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}), index,
            ("benchmark_gen", index, 1)))
    return requests


def timed(function, requests) -> tuple[float, float, list]:
    """Wall seconds, CPU seconds of this process, and the answers of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    answers = function(requests, disable_tqdm=True)
    return time.perf_counter() - started, time.process_time() - cpu, answers


@contextlib.contextmanager
def torchtune_attention() -> Iterator[None]:
    """The adapter's decoding steps through torchtune's unchanged attention (K/V heads
    repeated at every step): the baseline of the grouped-query change."""
    from acadlm_plugins.evaluation import generation

    patched = generation.grouped_query_attention
    generation.grouped_query_attention = lambda model: contextlib.nullcontext()
    try:
        yield
    finally:
        generation.grouped_query_attention = patched


def runner(model, kind: str, baseline: bool = False) -> Callable:
    method = getattr(model, kind)
    if not baseline:
        return method

    def run(requests, disable_tqdm=True):
        with torchtune_attention():
            return method(requests, disable_tqdm=disable_tqdm)
    return run


def main() -> None:
    args = parse_args()
    from lm_eval.models.huggingface import HFLM

    from acadlm_plugins.evaluation.lm_adapter import AcadLM

    model_dir = args.model_dir or require_default_model()
    texts = passages(max(args.contexts, args.generations), args.seed)
    scored = loglikelihood_requests(texts[:args.contexts], args.seed)
    generated = generation_requests(texts[:args.generations], args.max_gen_toks, args.seed)

    started = time.perf_counter()
    ours = AcadLM(pretrained=str(model_dir), batch_size=args.batch_size, device="cpu",
                  dtype="float32")
    ours_load = time.perf_counter() - started
    started = time.perf_counter()
    hf = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device="cpu",
              dtype="float32")
    hf_load = time.perf_counter() - started
    models = {"acadlm": ours, "hf": hf}
    context_tokens = [len(ours.tok_encode(r.args[0])) for r in scored[::4]]
    prompt_tokens = [len(ours.tok_encode(r.args[0])) for r in generated]
    print(f"{model_dir.name} ({model_dir}), fp32, {torch.get_num_threads()} threads, "
          f"batch size {args.batch_size}, {args.repeats} timed runs each, interleaved")
    print(f"loglikelihood: {len(scored)} requests ({args.contexts} contexts x 4 continuations, "
          f"contexts {min(context_tokens)}-{max(context_tokens)} tokens)")
    print(f"generate_until: {len(generated)} requests (prompts {min(prompt_tokens)}-"
          f"{max(prompt_tokens)} tokens, until blank line or {args.max_gen_toks} new tokens)")
    print(f"model load (s): acadlm {ours_load:.2f}, hf {hf_load:.2f}")

    for model in models.values():  # warm-up: first-call allocations, thread pools
        model.loglikelihood(scored[:4], disable_tqdm=True)
        model.generate_until(generated[:1], disable_tqdm=True)

    # (name, kind) -> what to call; acadlm-tt: generation with torchtune's attention.
    runs = {(name, kind): runner(models[name], kind) for name in models
            for kind in ("loglikelihood", "generate_until")}
    runs[("acadlm-tt", "generate_until")] = runner(ours, "generate_until", baseline=True)
    requests_of = {kind: requests for kind, requests in (("loglikelihood", scored),
                                                         ("generate_until", generated))
                   if kind in args.kinds}
    names = ("acadlm", "acadlm-tt", "hf")
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    answers: dict[tuple[str, str], list] = {}
    for repeat in range(args.repeats):
        order = names[repeat % 3:] + names[:repeat % 3]
        for name in order:
            for kind, requests in requests_of.items():
                if (name, kind) not in runs:
                    continue
                took, used, answer = timed(runs[(name, kind)], requests)
                wall.setdefault((name, kind), []).append(took)
                cpu.setdefault((name, kind), []).append(used)
                answers[(name, kind)] = answer
                print(f"  run {repeat + 1} {name:>9} {kind:<15} {took:7.2f} s "
                      f"({len(requests) / took:6.2f} requests/s, {used:7.2f} CPU s)",
                      flush=True)

    print(f"\n{'requests/s':<40}{'acadlm':>9}{'acadlm-tt':>11}{'hf':>8}{'acadlm / hf':>13}"
          f"{'acadlm-tt / hf':>16}")
    for kind, requests in requests_of.items():
        for clock, seconds in (("wall", wall), ("CPU", cpu)):
            for label, pick in (("median", statistics.median), ("best", min)):
                rates = {name: len(requests) / pick(seconds[(name, kind)]) for name in names
                         if (name, kind) in seconds}
                baseline = rates.get("acadlm-tt")
                print(f"{kind + ' (' + clock + ', ' + label + ' run)':<40}"
                      f"{rates['acadlm']:>9.2f}"
                      + (f"{baseline:>11.2f}" if baseline else f"{'-':>11}")
                      + f"{rates['hf']:>8.2f}{rates['acadlm'] / rates['hf']:>12.2f}x"
                      + (f"{baseline / rates['hf']:>15.2f}x" if baseline else f"{'-':>16}"))
    if not agreement(args.kinds, answers):
        sys.exit(1)


def agreement(kinds: list[str], answers: dict[tuple[str, str], list]) -> bool:
    """Print how far the models' answers differ, and any generation that differs; whether
    they agree (log-likelihoods within LOGLIKELIHOOD_TOL, the same picks, the same
    generations)."""
    lines, agree = [], True
    if "loglikelihood" in kinds:
        line, ok = loglikelihood_agreement(answers)
        lines.append(line)
        agree &= ok
    if "generate_until" in kinds:
        ours = answers[("acadlm", "generate_until")]
        same_text = sum(a == b for a, b in zip(ours, answers[("hf", "generate_until")],
                                               strict=True))
        same_tt = sum(a == b for a, b in zip(ours, answers[("acadlm-tt", "generate_until")],
                                             strict=True))
        lines.append(f"identical generations {same_text}/{len(ours)} (acadlm-tt: "
                     f"{same_tt}/{len(ours)})")
        agree &= same_text == same_tt == len(ours)
    print("\nagreement: " + ", ".join(lines) + (" (ok)" if agree else " (MISMATCH)"))
    if "generate_until" in kinds:
        for other in ("hf", "acadlm-tt"):
            for index, (a, b) in enumerate(zip(answers[("acadlm", "generate_until")],
                                               answers[(other, "generate_until")],
                                               strict=True)):
                if a != b:
                    print(f"  generation {index} differs:\n    acadlm: {a!r}\n"
                          f"    {other + ':':<8}{b!r}")
    return agree


def loglikelihood_agreement(answers: dict[tuple[str, str], list]) -> tuple[str, bool]:
    """Largest log-likelihood difference and how often both pick the same choice (4
    continuations per context), and whether that is within LOGLIKELIHOOD_TOL with every
    pick the same."""
    ours, theirs = answers[("acadlm", "loglikelihood")], answers[("hf", "loglikelihood")]
    diffs = [abs(a[0] - b[0]) for a, b in zip(ours, theirs, strict=True)]
    picks = {name: [max(range(4), key=lambda k, i=i, r=rows: r[i + k][0])
                    for i in range(0, len(rows), 4)]
             for name, rows in (("acadlm", ours), ("hf", theirs))}
    contexts = len(picks["acadlm"])
    same_pick = sum(a == b for a, b in zip(picks["acadlm"], picks["hf"], strict=True))
    worst = max(diffs)
    line = (f"max |loglikelihood diff| {worst:.2e} (tolerance {LOGLIKELIHOOD_TOL:.0e}), same "
            f"choice picked {same_pick}/{contexts}")
    return line, worst <= LOGLIKELIHOOD_TOL and same_pick == contexts


if __name__ == "__main__":
    main()
