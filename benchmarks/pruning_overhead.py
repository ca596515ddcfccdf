"""What learning pruning masks costs per training step, on SmolLM2-135M.

Times one training step (forward, cross-entropy, backward, AdamW step) of the plain model and
of an identical copy trained the way ``prune_recipe`` trains it: the built-in
``PruningPlugin`` driven through its hooks, i.e. ``MaskHooks`` + ``PruningMasks`` on the model,
gates resampled every step, the Lagrangian (Sheared-LLaMA eq. 2) computed and added to the
loss, and the gates' and multipliers' own AdamW steps. The two are timed in alternation (the
order flips every step) so that drift on a shared machine hits both alike; it prints the
median step times and their ratio (goal: masked / plain <= 1.10).

Run::

    .venv/bin/python benchmarks/pruning_overhead.py                     # 2 x 256 tokens
    .venv/bin/python benchmarks/pruning_overhead.py --batch-size 4 --seq-len 512 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from acadlm_plugins.defaults.paths import default_model_dir
from acadlm_plugins.models.smollm2 import smollm2_135m
from acadlm_plugins.plugins.pruning import PruningPlugin

DEFAULT_MODEL_DIR = default_model_dir()  # under $ACADLM_HOME
DEFAULT_TARGET = {"num_layers": 20, "num_heads": 6, "num_kv_heads": 2, "embed_dim": 384,
                  "intermediate_dim": 1024}


def source_model(weights: str) -> tuple[torch.nn.Module, str]:
    """SmolLM2-135M in fp32: the built default's weights if asked for and present, else random."""
    torch.manual_seed(0)
    model = smollm2_135m(max_seq_len=4096)
    if weights == "random" or not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return model, "random init"
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    with tempfile.TemporaryDirectory() as scratch:
        checkpointer = FullModelHFCheckpointer(
            checkpoint_dir=str(DEFAULT_MODEL_DIR), checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2", output_dir=scratch)
        model.load_state_dict(checkpointer.load_checkpoint()[MODEL_KEY], strict=False)
    return model, str(DEFAULT_MODEL_DIR)


def parse_common_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add the flags every pruning benchmark shares, parse, and apply ``--threads``."""
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--weights", choices=("default", "random"), default="default",
                        help="`default`: the built SmolLM2-135M-Instruct if present")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("tok_embeddings", "output")))


def pruning_plugin(model: torch.nn.Module, target: dict) -> PruningPlugin:
    """The recipe's pruning plugin, configured and attached to ``model`` as the recipe does."""
    cfg = OmegaConf.create({"seed": 0, "output_dir": tempfile.gettempdir(),
                            "pruning": {"target": target, "lagrangian_warmup_steps": 20,
                                        "mask_lr": 0.3, "lambda_lr": 0.05}})
    plugin = PruningPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe="prune")
    plugin.acadlm_model_built(model=model, cfg=cfg, device=torch.device("cpu"))
    return plugin


def train_step(model, optimizer, tokens, plugin: PruningPlugin | None,
               step: int) -> tuple[float, float]:
    """One optimizer step; with ``plugin`` exactly the pruning work of the recipe's loop.
    Returns the step's seconds and the seconds spent inside the plugin's three hook calls
    (gate resampling, the Lagrangian's forward, the gates' and multipliers' optimizer steps;
    the Lagrangian's backward runs inside ``loss.backward()`` and is not in them)."""
    optimizer.zero_grad(set_to_none=True)
    started = time.perf_counter()
    in_hooks = 0.0
    batch = {"tokens": tokens}
    if plugin is not None:
        hook = time.perf_counter()
        plugin.acadlm_batch_ready(batch=batch, step=step)
        in_hooks += time.perf_counter() - hook
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           tokens[:, 1:].reshape(-1))
    if plugin is not None:
        hook = time.perf_counter()
        loss = loss + plugin.acadlm_extra_loss(step=step)["lagrangian"]
        in_hooks += time.perf_counter() - hook
    loss.backward()
    optimizer.step()
    if plugin is not None:
        hook = time.perf_counter()
        plugin.acadlm_after_optimizer_step(step=step + 1, metrics={})
        in_hooks += time.perf_counter() - hook
    return time.perf_counter() - started, in_hooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    args = parse_common_args(parser)

    plain, origin = source_model(args.weights)
    masked = copy.deepcopy(plain)
    plugin = pruning_plugin(masked, DEFAULT_TARGET)
    plain.train(), masked.train()
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5)
                  for name, model in (("plain", plain), ("masked", masked))}
    models = {"plain": (plain, None), "masked": (masked, plugin)}
    generator = torch.Generator().manual_seed(0)
    vocab = plain.tok_embeddings.num_embeddings

    print(f"SmolLM2-135M ({origin}), fp32, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, interleaved")
    print(f"source {plugin.source.describe()}")
    print(f"target {plugin.target.describe()}")
    print(f"mask types {plugin.masks.mask_types}, {sum(p.numel() for p in plugin.masks.parameters())}"
          f" gates, {plugin.masks.hooked_modules} hooks")
    times: dict[str, list[float]] = {"plain": [], "masked": []}
    hook_times: list[float] = []
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator)
        order = ("plain", "masked") if step % 2 == 0 else ("masked", "plain")
        for name in order:
            model, hooks = models[name]
            seconds, in_hooks = train_step(model, optimizers[name], tokens, hooks, step)
            if step >= args.warmup:
                times[name].append(seconds)
                if hooks is not None:
                    hook_times.append(in_hooks)
        if step >= args.warmup:
            print(f"  step {step - args.warmup + 1:>3}: plain {times['plain'][-1]:.3f} s, "
                  f"masked {times['masked'][-1]:.3f} s", flush=True)

    plain_s, masked_s = (statistics.median(times[k]) for k in ("plain", "masked"))
    tokens_per_step = args.batch_size * args.seq_len
    print()
    print(f"{'':<28}{'plain':>10}{'masked':>10}")
    print(f"{'median step time (s)':<28}{plain_s:>10.3f}{masked_s:>10.3f}")
    print(f"{'min step time (s)':<28}{min(times['plain']):>10.3f}{min(times['masked']):>10.3f}")
    print(f"{'tokens / s':<28}{tokens_per_step / plain_s:>10.0f}{tokens_per_step / masked_s:>10.0f}")
    ratio = masked_s / plain_s
    print(f"\nmasked / plain step time (median): {ratio:.3f}x "
          f"({'within' if ratio <= 1.10 else 'ABOVE'} the 1.10x goal)")
    print(f"inside the plugin's hook calls (gate resampling, Lagrangian forward, the gates' and "
          f"multipliers' optimizer steps; not the Lagrangian's backward): "
          f"{statistics.median(hook_times) * 1e3:.1f} ms per step (median), "
          f"{statistics.median(hook_times) / masked_s:.1%} of the masked step")
    lambdas = {k: round(v, 4) for k, v in plugin.history[-1].items() if "lambda_1" in k}
    print(f"(sanity: after {len(plugin.history)} pruning steps, lambda_1 = {lambdas})")


if __name__ == "__main__":
    os.environ.setdefault("ACADLM_NO_PROGRESS", "1")
    main()
