"""How much faster the materialized pruned model runs than its source, on SmolLM2-135M.

Builds masks toward the target with random gate scores (``log_alpha``), slices the source into
the target-size model with :func:`acadlm_plugins.pruning.materialize.materialize`, checks once
that it computes what the masked source computes (max |logit diff| at most ``LOGIT_TOL``, and
the target's shape; otherwise it exits with status 1 before timing), then times no-grad,
eval-mode forward passes of both on the same random batch, in alternation (the order flips
every repeat) so drift on a shared machine hits both alike. Prints tokens/s of each, the speedup, and the parameter ratios
(total and non-embedding).

Run::

    .venv/bin/python benchmarks/pruned_speedup.py
    .venv/bin/python benchmarks/pruned_speedup.py --batch-size 4 --seq-len 1024 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from pruning_overhead import DEFAULT_TARGET, non_embedding_params, parse_common_args, source_model

from acadlm_plugins.pruning.architecture import architecture_of, resolve_target
from acadlm_plugins.pruning.masks import MaskHooks, PruningMasks
from acadlm_plugins.pruning.materialize import materialize

# fp32 logits of the same computation, summed in another order: 5e-5 to 1e-4 measured on the
# default model (2 runs), so 10x room; a wrongly sliced weight changes the logits outright.
LOGIT_TOL = 1e-3


def random_masks(model: torch.nn.Module, target: dict, seed: int = 0) -> PruningMasks:
    """Masks toward ``target`` whose gate scores are random, as if after some pruning."""
    source = architecture_of(model)
    masks = PruningMasks(source, resolve_target(source, target), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=generator) * 2 + 1)
    return masks


@torch.no_grad()
def max_logit_difference(source, pruned, masks: PruningMasks, tokens: torch.Tensor) -> float:
    """|masked source - materialized| on ``tokens``: zero up to float rounding if slicing is right."""
    hooks = MaskHooks(source, masks)
    masks.use_final_gates()
    try:
        masked_logits = source(tokens)
    finally:
        hooks.remove()
    return float((masked_logits - pruned(tokens)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    args = parse_common_args(parser)

    source, origin = source_model(args.weights)
    masks = random_masks(source, DEFAULT_TARGET)
    pruned, target = materialize(source, masks)
    source.eval(), pruned.eval()
    generator = torch.Generator().manual_seed(0)
    vocab = source.tok_embeddings.num_embeddings
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.warmup + args.repeats)]
    print(f"SmolLM2-135M ({origin}), fp32, {torch.get_num_threads()} threads, eval, no grad, "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + "
          f"{args.repeats} timed forwards each, interleaved")
    print(f"source {masks.source.describe()}")
    print(f"pruned {architecture_of(pruned).describe()}")
    diff = max_logit_difference(source, pruned, masks, batches[0][:1, :64])
    same_shape = architecture_of(pruned) == target
    print(f"max |logit diff| masked source vs materialized: {diff:.2e} (tolerance "
          f"{LOGIT_TOL:.0e}: {'ok' if diff <= LOGIT_TOL else 'MISMATCH'}); materialized shape "
          f"{'is' if same_shape else 'DIFFERS FROM'} the target")
    if not (diff <= LOGIT_TOL and same_shape):
        sys.exit("the materialized model does not compute what the masked source computes; "
                 "no speed-up measured")

    models = {"source": source, "pruned": pruned}
    times: dict[str, list[float]] = {"source": [], "pruned": []}
    with torch.inference_mode():
        for index, tokens in enumerate(batches):
            order = ("source", "pruned") if index % 2 == 0 else ("pruned", "source")
            for name in order:
                started = time.perf_counter()
                models[name](tokens)
                if index >= args.warmup:
                    times[name].append(time.perf_counter() - started)

    tokens_per_batch = args.batch_size * args.seq_len
    speed = {k: tokens_per_batch / statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    non_emb = {k: non_embedding_params(m) for k, m in models.items()}
    print()
    print(f"{'':<30}{'source':>12}{'pruned':>12}{'pruned/source':>15}")
    print(f"{'forward tokens/s (median)':<30}{speed['source']:>12,.0f}{speed['pruned']:>12,.0f}"
          f"{speed['pruned'] / speed['source']:>14.2f}x")
    print(f"{'median forward time (s)':<30}{statistics.median(times['source']):>12.3f}"
          f"{statistics.median(times['pruned']):>12.3f}")
    print(f"{'total params':<30}{params['source']:>12,}{params['pruned']:>12,}"
          f"{params['pruned'] / params['source']:>15.3f}")
    print(f"{'non-embedding params':<30}{non_emb['source']:>12,}{non_emb['pruned']:>12,}"
          f"{non_emb['pruned'] / non_emb['source']:>15.3f}")
    print(f"\nspeedup (forward tokens/s, pruned / source): {speed['pruned'] / speed['source']:.2f}x")


if __name__ == "__main__":
    main()
