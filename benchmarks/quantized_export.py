"""Weight-only quantized copies (torchao int8 / int4) against the unquantized model: weight
bytes, CPU tokens/s and scores on RULER-style tasks, all through our lm-eval adapter.

The source (default: the embedded SmolLM2-135M-Instruct) gets an ``int8_weight_only`` and an
``int4_weight_only`` copy (``acadlm_plugins.quantization``). The int8 copy runs in float32,
the int4 copy in bfloat16 (torchao's CPU int4 kernel; the copy also stores the tied
embedding and the norms in bfloat16), so the source is measured twice, in float32 and in
bfloat16, and each quantized copy's ratios are to the unquantized model of its own compute
dtype (int8 / fp32, int4 / bf16; the bf16 row's are to fp32); the table names the baseline
of every row, and int4 / fp32 (dtype change and quantization together) is printed below it.
Then, for each of the four:

* weight bytes: of the weight files on disk (the bf16 row has no file of its own: its
  parameters' bytes in memory);
* prefill tokens/s: one forward pass over ``--prefill-tokens`` tokens;
* decode tokens/s: the KV-cached decoding steps alone. Greedy generation (the adapter's
  ``generate_until`` path, no stop token) of ``--decode-tokens`` new tokens after a 64-token
  prompt, minus the same generation of 1 new token: the difference is ``--decode-tokens - 1``
  decoding steps, without the prompt's prefill and the KV-cache setup. The whole
  ``--decode-tokens`` generation's tokens/s (prefill and setup included) is printed too;
* one untimed warm-up round per model first (first kernel calls, KV-cache allocation), then
  all four timed over ``--repeats`` rounds, the order of the models rotating every round, the
  median reported. A round in which the whole generation took no longer than the 1-token
  one (noise larger than the decoding steps) has no decode figure: it is flagged and left out
  of the decode median instead of printing an absurd tokens/s;
* scores of the same prompts of ``--tasks`` at ``--length`` tokens (``--samples`` per task),
  through lm-eval and the ``acadlm`` adapter (each model in its compute dtype), and their
  difference to the row's baseline (``--tasks ''`` skips them and measures sizes and speeds
  only).

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

from acadlm_plugins.cli_types import int_at_least
from acadlm_plugins.evaluation.generation import StopRule

REPO = Path(__file__).resolve().parents[1]
TASKS = ("acadlm_niah_single_2", "acadlm_niah_multikey_1", "acadlm_vt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the copies and evaluations go (default: a temporary folder)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int_at_least(2), default=32,
                        help="new tokens of the timed generation (>= 2: at least 1 decoding "
                             "step)")
    parser.add_argument("--repeats", type=int_at_least(1), default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


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


def time_model(lm, prompt: list[int], decode_tokens: int) -> tuple[float, float | None, float]:
    """(prefill tokens/s, decode tokens/s, whole generation tokens/s) of one round.

    Decode tokens/s counts the decoding steps alone: generating ``decode_tokens`` tokens after a
    64-token prompt takes the prompt's prefill, the KV-cache setup, the first token (from the
    prefill's logits) and ``decode_tokens - 1`` cached decoding steps; generating 1 token takes
    all but those steps, so the difference of the two times is the steps'. When the whole
    generation took no longer than the 1-token one (noise on a shared machine), that
    difference measures nothing: decode is None, and the caller flags the round."""
    tokens = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        lm._hidden(tokens)
    prefill = len(prompt) / (time.perf_counter() - started)
    context = prompt[:64]
    one = generation_seconds(lm, context, 1)
    whole = generation_seconds(lm, context, decode_tokens)
    decode = (decode_tokens - 1) / (whole - one) if whole > one else None
    return prefill, decode, decode_tokens / whole


def scores(model_dir: Path, out: Path, tasks: list[str], length: int, samples: int,
           dtype: str) -> dict:
    from acadlm_plugins.eval_recipe import run_evaluation
    from acadlm_plugins.evaluation.report import length_table

    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "smollm2" / "eval_long_context.yaml"),
                          OmegaConf.create({"output_dir": str(out), "tasks": tasks,
                                            "lengths": [length], "num_samples": samples,
                                            "log_samples": False}))
    cfg.model.args.pretrained = str(model_dir)
    cfg.model.args.max_length = length + 64
    cfg.model.args.dtype = dtype  # a quantized copy runs in its own dtype whatever this says
    table = length_table(run_evaluation(cfg))
    return {task: table.scores[task][length] for task in table.tasks}


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters of an unquantized model in memory (a tied weight once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def median_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio_cell(value: float | None, base: float | None, width: int) -> str:
    return f"{value / base:>{width}.2f}" if value is not None and base else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from acadlm_plugins.defaults.paths import require_default_model
    from acadlm_plugins.evaluation.lm_adapter import AcadLM
    from acadlm_plugins.quantization import write_quantized_copy

    source = (args.model_dir or require_default_model()).resolve()
    scratch = tempfile.TemporaryDirectory(prefix="acadlm_quant_bench_")
    root = args.output_dir or Path(scratch.name)
    root.mkdir(parents=True, exist_ok=True)
    # name -> (folder, compute dtype, the row its ratios are to)
    variants = {"unquantized fp32": (source, "float32", None),
                "unquantized bf16": (source, "bfloat16", "unquantized fp32")}
    for scheme, dtype, baseline in (("int8_weight_only", "float32", "unquantized fp32"),
                                    ("int4_weight_only", "bfloat16", "unquantized bf16")):
        started = time.perf_counter()
        folder = write_quantized_copy(source, scheme, dest=root / scheme)
        print(f"{scheme}: copy written in {time.perf_counter() - started:.1f} s", flush=True)
        variants[scheme] = (folder, dtype, baseline)

    models = {name: AcadLM(pretrained=str(folder), dtype=dtype)
              for name, (folder, dtype, _) in variants.items()}
    for name, (_, dtype, _) in variants.items():  # the table's dtype column is what ran
        if str(models[name].dtype) != f"torch.{dtype}":
            raise SystemExit(f"{name} runs in {models[name].dtype}, not {dtype}")
    sizes = {name: weight_bytes(folder) for name, (folder, _, _) in variants.items()}
    sizes["unquantized bf16"] = parameter_bytes(models["unquantized bf16"].model)
    prompt = models["unquantized fp32"].tok_encode(
        " ".join(["The history of the city is long and its streets are old."] * 200))
    prompt = prompt[:args.prefill_tokens]
    for model in models.values():  # untimed warm-up round: first kernel calls, cache setup
        time_model(model, prompt, args.decode_tokens)
    names = list(models)
    timings: dict[str, list[tuple[float, float | None, float]]] = {name: [] for name in names}
    flagged: list[str] = []
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            row = time_model(models[name], prompt, args.decode_tokens)
            timings[name].append(row)
            if row[1] is None:
                flagged.append(f"{name}, round {round_ + 1}")
    del models

    tasks = [t for t in args.tasks.split(",") if t]
    results = {name: scores(folder, root / f"eval_{name.replace(' ', '_')}", tasks,
                            args.length, args.samples, dtype)
               for name, (folder, dtype, _) in variants.items()} if tasks else {}

    def median(name: str, column: int) -> float | None:
        return median_or_none([row[column] for row in timings[name]])

    def mean_score(name: str) -> float:
        return sum(results[name].values()) / len(tasks)

    print(f"\n{source.name}: prefill {len(prompt)} tokens; decode: steps 2-{args.decode_tokens} "
          f"of a greedy generation after a 64-token prompt (prefill and KV-cache setup "
          f"subtracted); generate: the whole {args.decode_tokens}-token generation, prefill "
          f"included; 1 untimed warm-up round, then median of {args.repeats} rotated rounds; "
          f"scores: "
          + (f"{len(tasks)} tasks x {args.samples} prompts at {args.length} tokens"
             if tasks else "not run")
          + f"; {torch.get_num_threads()} threads")
    print("ratios: to the row named in 'vs' (the unquantized model of the same compute dtype; "
          "bf16's to fp32); weights of the bf16 row: its parameters in memory (no file)\n")
    print(f"{'model':<18}{'dtype':>6}{'vs':>6}{'weights MiB':>12}{'ratio':>7}"
          f"{'prefill tok/s':>14}{'ratio':>7}{'decode tok/s':>13}{'ratio':>7}"
          f"{'generate tok/s':>15}{'ratio':>7}{'mean score':>11}{'diff':>7}")
    short = {"float32": "fp32", "bfloat16": "bf16"}
    for name, (_, dtype, baseline) in variants.items():
        base = baseline or name
        versus = short[variants[base][1]] if baseline else "-"
        cells = [(f"{name:<18}{short[dtype]:>6}{versus:>6}"
                  f"{sizes[name] / 2**20:>12.1f}{sizes[name] / sizes[base]:>7.3f}")]
        for column, width, digits in ((0, 14, 0), (1, 13, 1), (2, 15, 1)):
            value = median(name, column)
            shown = f"{value:>{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"
            cells.append(shown + ratio_cell(value, median(base, column), 7))
        if tasks:
            cells.append(f"{mean_score(name):>11.1f}"
                         + (f"{mean_score(name) - mean_score(base):>+7.1f}" if baseline
                            else f"{'':>7}"))
        else:
            cells.append(f"{'-':>11}{'-':>7}")
        print("".join(cells))
    fp32, int4 = "unquantized fp32", "int4_weight_only"
    against_fp32 = [f"{label} {ratio_cell(median(int4, column), median(fp32, column), 0)}"
                    for label, column in (("prefill", 0), ("decode", 1), ("generate", 2))]
    print(f"\n{int4} / {fp32} (bf16 compute and int4 weights together, not the effect of "
          f"quantization alone): {', '.join(against_fp32)}, weights "
          f"{sizes[int4] / sizes[fp32]:.3f}")
    if flagged:
        print(f"flagged: {len(flagged)} round(s) where the {args.decode_tokens}-token generation "
              f"took no longer than the 1-token one (noise larger than the decoding steps), "
              f"left out of the decode median: {'; '.join(flagged)}")
    if tasks:
        print("\nper task:", {name: {t: round(v, 1) for t, v in r.items()}
                              for name, r in results.items()})


if __name__ == "__main__":
    main()
