"""Weight-only quantized copies (torchao int8 / int4) against the unquantized model: weight
bytes, CPU tokens/s and scores on RULER-style tasks, all through our lm-eval adapter.

The source (default: the embedded SmolLM2-135M-Instruct) gets an ``int8_weight_only`` and an
``int4_weight_only`` copy (``acadlm_plugins.quantization``). Then, for each of the three:

* bytes of the weight files on disk;
* prefill tokens/s: one forward pass over ``--prefill-tokens`` tokens, and decode tokens/s:
  greedy generation of ``--decode-tokens`` tokens with the KV cache; timed in alternation over
  ``--repeats`` rounds (the order flips every round), the median reported;
* scores of the same prompts of ``--tasks`` at ``--length`` tokens (``--samples`` per task),
  through lm-eval and the ``acadlm`` adapter, and their difference to the unquantized model.

Run::

    .venv/bin/python benchmarks/quantized_export.py
    .venv/bin/python benchmarks/quantized_export.py --model-dir outputs/prolong_demo/sft/epoch_0 --samples 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

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


def time_model(lm, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one round."""
    tokens = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        lm._hidden(tokens)
    prefill = len(prompt) / (time.perf_counter() - started)
    request = Instance(request_type="generate_until", doc={}, idx=0, arguments=(
        lm.tok_decode(prompt[:64]), {"until": [], "max_gen_toks": decode_tokens,
                                     "do_sample": False}))
    started = time.perf_counter()
    lm.generate_until([request], disable_tqdm=True)
    decode = decode_tokens / (time.perf_counter() - started)
    return prefill, decode


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
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for round_ in range(args.repeats):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for name in order:
            timings[name].append(time_model(models[name], prompt, args.decode_tokens))
    del models

    tasks = [t for t in args.tasks.split(",") if t]
    results = {name: scores(folder, root / f"eval_{name}", tasks, args.length, args.samples)
               for name, folder in variants.items()}

    base = variants["unquantized"]
    base_prefill = statistics.median(p for p, _ in timings["unquantized"])
    base_decode = statistics.median(d for _, d in timings["unquantized"])
    base_score = sum(results["unquantized"].values()) / len(tasks)
    print(f"\n{source.name}: prefill {len(prompt)} tokens, decode {args.decode_tokens} tokens, "
          f"median of {args.repeats}; scores: {len(tasks)} tasks x {args.samples} prompts at "
          f"{args.length} tokens; {torch.get_num_threads()} threads\n")
    print(f"{'model':<18}{'weights MiB':>12}{'ratio':>7}{'prefill tok/s':>14}{'ratio':>7}"
          f"{'decode tok/s':>13}{'ratio':>7}{'mean score':>11}{'diff':>7}")
    for name, folder in variants.items():
        prefill = statistics.median(p for p, _ in timings[name])
        decode = statistics.median(d for _, d in timings[name])
        score = sum(results[name].values()) / len(tasks)
        print(f"{name:<18}{weight_bytes(folder) / 2**20:>12.1f}"
              f"{weight_bytes(folder) / weight_bytes(base):>7.3f}{prefill:>14.0f}"
              f"{prefill / base_prefill:>7.2f}{decode:>13.1f}{decode / base_decode:>7.2f}"
              f"{score:>11.1f}{score - base_score:>+7.1f}")
    print("\nper task:", {name: {t: round(v, 1) for t, v in r.items()}
                          for name, r in results.items()})


if __name__ == "__main__":
    main()
