"""Weight-only quantized copies (torchao int8 / int4) against the unquantized model: weight
bytes, CPU tokens/s and scores on RULER-style tasks, all through our lm-eval adapter.

The source (default: the embedded SmolLM2-135M-Instruct) gets an ``int8_weight_only`` and an
``int4_weight_only`` copy (``acadlm_plugins.quantization``). Then, for each of the three:

* bytes of the weight files on disk;
* prefill tokens/s: one forward pass over ``--prefill-tokens`` tokens;
* decode tokens/s: the KV-cached decoding steps alone. Greedy generation (the adapter's
  ``generate_until`` path, no stop token) of ``--decode-tokens`` new tokens after a 64-token
  prompt, minus the same generation of 1 new token: the difference is ``--decode-tokens - 1``
  decoding steps, without the prompt's prefill and the KV-cache setup. The whole
  ``--decode-tokens`` generation's tokens/s (prefill and setup included) is printed too;
* both timed in alternation over ``--repeats`` rounds (the order flips every round), the
  median reported;
* scores of the same prompts of ``--tasks`` at ``--length`` tokens (``--samples`` per task),
  through lm-eval and the ``acadlm`` adapter, and their difference to the unquantized model
  (``--tasks ''`` skips them and measures sizes and speeds only).

Run::

    .venv/bin/python benchmarks/quantized_export.py
    .venv/bin/python benchmarks/quantized_export.py --model-dir outputs/prolong_demo/sft/epoch_0 --samples 20
    .venv/bin/python benchmarks/quantized_export.py --tasks ''     # sizes and speeds only
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from acadlm_plugins.evaluation.generation import StopRule

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ("int8_weight_only", "int4_weight_only")
TASKS = ("acadlm_niah_single_2", "acadlm_niah_multikey_1", "acadlm_vt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the copies and evaluations go (default: a temporary folder)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.suffix in (".safetensors", ".pt", ".bin"))


def generation_seconds(lm, context: list[int], new_tokens: int) -> float:
    """Wall time of greedy KV-cached generation of exactly ``new_tokens`` tokens after
    ``context``, through the adapter's generation (``generate_until`` without its stop token,
    so no row ends early): the context's prefill, the cache setup and the decoding steps."""
    started = time.perf_counter()
    with torch.no_grad():
        generated = lm._generate_rows([context], [StopRule(new_tokens)])
    seconds = time.perf_counter() - started
    if len(generated[0]) != new_tokens:
        raise RuntimeError(f"generated {len(generated[0])} tokens, not {new_tokens}")
    return seconds


def time_model(lm, prompt: list[int], decode_tokens: int) -> tuple[float, float, float]:
    """(prefill tokens/s, decode tokens/s, whole generation tokens/s) of one round.

    Decode tokens/s counts the decoding steps alone: generating ``decode_tokens`` tokens after a
    64-token prompt takes the prompt's prefill, the KV-cache setup, the first token (from the
    prefill's logits) and ``decode_tokens - 1`` cached decoding steps; generating 1 token takes
    all but those steps, so the difference of the two times is the steps'."""
    tokens = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        lm._hidden(tokens)
    prefill = len(prompt) / (time.perf_counter() - started)
    context = prompt[:64]
    one = generation_seconds(lm, context, 1)
    whole = generation_seconds(lm, context, decode_tokens)
    decode = (decode_tokens - 1) / max(whole - one, 1e-9)
    return prefill, decode, decode_tokens / whole


def scores(model_dir: Path, out: Path, tasks: list[str], length: int, samples: int) -> dict:
    from acadlm_plugins.eval_recipe import run_evaluation
    from acadlm_plugins.evaluation.report import length_table

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "smollm2" / "eval_long_context.yaml"),
                          OmegaConf.create({"output_dir": str(out), "tasks": tasks,
                                            "lengths": [length], "num_samples": samples,
                                            "log_samples": False}))
    cfg.model.args.pretrained = str(model_dir)
    cfg.model.args.max_length = length + 64
    table = length_table(run_evaluation(cfg))
    return {task: table.scores[task][length] for task in table.tasks}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from acadlm_plugins.defaults.paths import require_default_model
    from acadlm_plugins.evaluation.lm_adapter import AcadLM
    from acadlm_plugins.quantization import write_quantized_copy

    source = (args.model_dir or require_default_model()).resolve()
    scratch = tempfile.TemporaryDirectory(prefix="acadlm_quant_bench_")
    root = args.output_dir or Path(scratch.name)
    root.mkdir(parents=True, exist_ok=True)
    variants = {"unquantized": source}
    for scheme in SCHEMES:
        started = time.perf_counter()
        variants[scheme] = write_quantized_copy(source, scheme, dest=root / scheme)
        print(f"{scheme}: copy written in {time.perf_counter() - started:.1f} s", flush=True)

    models = {name: AcadLM(pretrained=str(folder)) for name, folder in variants.items()}
    prompt = models["unquantized"].tok_encode(
        " ".join(["The history of the city is long and its streets are old."] * 200))
    prompt = prompt[:args.prefill_tokens]
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    for round_ in range(args.repeats):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            timings[name].append(time_model(models[name], prompt, args.decode_tokens))
    del models

    tasks = [t for t in args.tasks.split(",") if t]
    results = {name: scores(folder, root / f"eval_{name}", tasks, args.length, args.samples)
               for name, folder in variants.items()} if tasks else {}

    def median(name: str, column: int) -> float:
        return statistics.median(row[column] for row in timings[name])

    def mean_score(name: str) -> float:
        return sum(results[name].values()) / len(tasks)

    base = variants["unquantized"]
    print(f"\n{source.name}: prefill {len(prompt)} tokens; decode: steps 2-{args.decode_tokens} "
          f"of a greedy generation after a 64-token prompt (prefill and KV-cache setup "
          f"subtracted); generate: the whole {args.decode_tokens}-token generation, prefill "
          f"included; median of {args.repeats}; scores: "
          + (f"{len(tasks)} tasks x {args.samples} prompts at {args.length} tokens"
             if tasks else "not run")
          + f"; {torch.get_num_threads()} threads\n")
    print(f"{'model':<18}{'weights MiB':>12}{'ratio':>7}{'prefill tok/s':>14}{'ratio':>7}"
          f"{'decode tok/s':>13}{'ratio':>7}{'generate tok/s':>15}{'ratio':>7}"
          f"{'mean score':>11}{'diff':>7}")
    for name, folder in variants.items():
        cells = [(f"{name:<18}{weight_bytes(folder) / 2**20:>12.1f}"
                  f"{weight_bytes(folder) / weight_bytes(base):>7.3f}")]
        for column, width, digits in ((0, 14, 0), (1, 13, 1), (2, 15, 1)):
            value = median(name, column)
            cells.append(f"{value:>{width}.{digits}f}{value / median('unquantized', column):>7.2f}")
        if tasks:
            cells.append(f"{mean_score(name):>11.1f}"
                         f"{mean_score(name) - mean_score('unquantized'):>+7.1f}")
        else:
            cells.append(f"{'-':>11}{'-':>7}")
        print("".join(cells))
    if tasks:
        print("\nper task:", {name: {t: round(v, 1) for t, v in r.items()}
                              for name, r in results.items()})

if __name__ == "__main__":
    main()
