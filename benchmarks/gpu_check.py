"""The GPU check of issue 16: one table of what our training and evaluation code does on a GPU.

Run ``make gpu-check`` (or this script) on a machine with one CUDA GPU; it takes at most about
8 minutes and prints the machine, the package versions and the date, then one markdown table:

1. **prune step, bf16**: SmolLM2-135M (random weights of the real shape) trained one step at a
   time on packed batches, plain and the way ``prune_recipe`` trains it (``PruningPlugin``:
   mask hooks, gates resampled every step, the Lagrangian added to the loss, the gates' and
   multipliers' own AdamW steps). Attention is what torchtune uses for packed batches: a
   FlexAttention ``BlockMask`` on GPUs that have it. Result: masked / plain step time.
2. **long-context step at 32K**: one packed 32,768-token sequence of many documents, trained
   as ``long_context_recipe`` trains it (activation checkpointing, chunked loss), with
   torchtune's FlexAttention document mask against our per-document SDPA
   (``training/document_attention.py``): tokens/s and peak GPU memory of each.
3. **float8 vs bf16**: step time of the same model with torchao ``Float8Linear`` layers
   (``training/float8.py``, recipe ``tensorwise``) against bf16, both compiled per layer as
   torchtune compiles; needs compute capability 8.9+.
4. **lm-eval adapter vs ``hf``**: the ``acadlm`` model and lm-eval's ``hf`` model, both bf16,
   answering the same greedy ``generate_until`` requests: requests/s of each and the ratio.
5. **MFU** of the steps of rows 1 and 2: (6 x parameters x tokens + causal in-document
   attention FLOPs) / step time / the GPU's dense bf16 peak from :data:`PEAK_BF16_FLOPS`.
6. **precision**: the row-1 model trained from the same weights on the same batch at lr 1e-5
   in fp32 (TF32 off), pure bf16 (torchtune's ``dtype: bf16``), bf16 with
   ``Float32MasterAdamW`` (the stock recipes' fix) and ``mixed_precision: true`` (autocast on
   fp32 weights, one process): how far each one's weights moved from fp32's
   (``||Δ - Δ_fp32|| / ||Δ_fp32||``) and its step time.

Every row runs under its own ``try``: a failing row reads ``failed: <Type: message>`` and the
others still run; a row whose package is missing reads ``not run: <package> not installed``. A
time guard skips the rows that would end past the budget (8 minutes), saying so. Without CUDA
the script prints one line and exits 0 having run nothing. ``--smoke`` runs every row on tiny
shapes, on the CPU if need be, to check the code paths where no GPU is at hand; its figures
mean nothing.

Run::

    make gpu-wheels                     # where PyPI is reachable (see benchmarks/README.md)
    make gpu-check                      # on the GPU machine
    python benchmarks/gpu_check.py --json result.json --rows 1,5a
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BUDGET_SECONDS = 8 * 60
BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
COLUMNS = (("id", "#"), ("check", "check"), ("result", "result"), ("details", "details"))
VERSIONED = ("torch", "torchtune", "torchao", "lm_eval", "transformers")
# What rows 1-4 import: our package needs torchtune (which needs torchao) and lm-eval.
STACK = ("torchtune", "torchao", "lm_eval", "omegaconf")

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from the vendors' datasheets. The first
# entry whose name occurs in torch.cuda.get_device_name() wins, so specific names come first
# ("H100 PCIe" before "H100", "L40S" before "L40" before "L4").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


# ------------------------------------------------------------------------------ FLOPs and MFU


def peak_bf16_flops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``gpu_name`` (None: not in our table)."""
    lowered = gpu_name.lower()
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in lowered:
            return flops
    return None


def step_flops(params: int, tokens: int, *, layers: int, heads: int, head_dim: int,
               document_lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward and backward) on ``tokens`` tokens.

    ``6 * params * tokens`` for the weight matmuls (Kaplan et al. 2020; a tied embedding counts
    once, as the output projection) plus the attention score and value matmuls, which only
    the in-document causal half computes: ``4 * l^2 / 2 * head_dim`` per head and layer for a
    document of ``l`` tokens in the forward pass, three times that with the backward pass.
    Recomputation by activation checkpointing is not counted (it is not model work).
    """
    attention = 6 * layers * heads * head_dim * sum(int(n) ** 2 for n in document_lengths)
    return 6.0 * params * tokens + attention


def mfu_text(flops: float, seconds: float, gpu_name: str) -> str:
    """Model FLOPs utilization of a step of ``flops`` taking ``seconds``, as a percentage,
    or ``n/a (unknown peak)`` for a GPU that :data:`PEAK_BF16_FLOPS` does not know."""
    peak = peak_bf16_flops(gpu_name)
    if peak is None:
        return "n/a (unknown peak)"
    return f"{flops / seconds / peak:.1%}"


# ------------------------------------------------------------------------------ rows and table


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one markdown table with the columns #, check, result, details."""
    def cell(value: Any) -> str:
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key, "")) for key, _ in COLUMNS) + " |"
              for row in rows]
    return "\n".join(lines)


def failure_text(err: BaseException) -> str:
    """``failed: <Type: first line of the message>`` (at most 300 characters of message)."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"failed: {type(err).__name__}: {message}"


def missing_module(err: BaseException) -> str | None:
    """The top-level module an import failure (or what caused it) could not find, if any.
    torchtune, for one, re-raises a missing torchao as a plain ImportError."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            return current.name.split(".")[0]
        current = current.__cause__ or current.__context__
    return None


@dataclass
class TimeGuard:
    """The script's time budget: a check starts only if it would end inside it."""

    budget_s: float = BUDGET_SECONDS
    clock: Callable[[], float] = time.monotonic
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def elapsed(self) -> float:
        """Seconds since the guard was made (the script's start)."""
        return self.clock() - self.started

    def refusal(self, estimate_s: float) -> str | None:
        """None if a check that takes up to ``estimate_s`` still fits, else why it is skipped."""
        used = self.elapsed()
        if used + estimate_s <= self.budget_s:
            return None
        return (f"skipped: time guard ({used:.0f} s of the {self.budget_s:.0f} s budget used, "
                f"this check takes up to {estimate_s:.0f} s)")


@dataclass(frozen=True)
class Check:
    """One row of the table: ``run(context)`` measures and returns the row's fields
    (``result``, ``details``, optional ``status`` and ``values``)."""

    id: str
    name: str
    run: Callable[[Any], dict[str, Any]]
    estimate_s: float
    needs: tuple[str, ...] = ()


def run_checks(checks: Sequence[Check], context: Any, guard: TimeGuard,
               *, after_each: Callable[[], None] | None = None,
               progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run ``checks`` in order, each isolated from the others' failures, and return one row
    dict per check (``id``, ``check``, ``status``, ``result``, ``details``, ``values``,
    ``seconds``). A check whose package is missing is not run; one that no longer fits the
    time guard is skipped; ``after_each`` runs after every check (to free GPU memory)."""
    rows = []
    for check in checks:
        row: dict[str, Any] = {"id": check.id, "check": check.name, "details": "", "values": {}}
        missing = next((n for n in check.needs if importlib.util.find_spec(n) is None), None)
        refusal = None if missing else guard.refusal(check.estimate_s)
        if missing:
            row.update(status="not run", result=f"not run: {missing} not installed")
        elif refusal:
            row.update(status="skipped", result=refusal)
        else:
            started = guard.clock()
            try:
                row.update({"status": "ok", **check.run(context)})
            except ImportError as err:
                name = missing_module(err)
                row.update(status="not run" if name else "failed",
                           result=f"not run: {name} not installed" if name
                           else failure_text(err))
            except Exception as err:  # noqa: BLE001  (a row's failure must not stop the others)
                row.update(status="failed", result=failure_text(err))
            finally:
                if after_each is not None:
                    after_each()
            row["seconds"] = round(guard.clock() - started, 1)
        rows.append(row)
        if progress is not None:
            progress(f"[{check.id}] {check.name}: {row['result']}")
    return rows


# ------------------------------------------------------------------------------ run settings


@dataclass(frozen=True)
class Scale:
    """The sizes of one run: the GPU check's, or the smoke run's tiny ones."""

    model: str                      # "smollm2_135m" or "tiny" (acadlm_plugins.models)
    prune_target: dict[str, int] | None  # None: benchmarks/pruning_overhead.py's target
    prune_batch: int
    prune_seq: int
    long_seq: int
    doc_min: int                    # documents of doc_min..doc_max tokens fill the packs
    doc_max: int
    chunk_tokens: int               # the long-context stages' chunked loss
    float8_batch: int
    float8_seq: int
    eval_requests: int
    eval_batch: int
    eval_new_tokens: int
    hf_config: dict[str, Any]       # shape of the models (vocab_size: all rows), and of the
                                    # random checkpoint the lm-eval models load
    warmup: int
    repeats: int


SMOLLM2_HF_CONFIG = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "head_dim": 64,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0}
GPU_SCALE = Scale(model="smollm2_135m", prune_target=None, prune_batch=4, prune_seq=4096,
                  long_seq=32768, doc_min=100, doc_max=2000, chunk_tokens=1024,
                  float8_batch=4, float8_seq=2048, eval_requests=64, eval_batch=16,
                  eval_new_tokens=64, hf_config=SMOLLM2_HF_CONFIG, warmup=3, repeats=10)
SMOKE_SCALE = Scale(model="tiny", prune_target={"num_layers": 1, "num_heads": 2,
                                                "num_kv_heads": 1, "embed_dim": 32,
                                                "intermediate_dim": 64},
                    prune_batch=2, prune_seq=128, long_seq=256, doc_min=16, doc_max=64,
                    chunk_tokens=64, float8_batch=2, float8_seq=64, eval_requests=4,
                    eval_batch=2, eval_new_tokens=4,
                    hf_config={"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 16,
                               "max_position_embeddings": 512, "rope_theta": 10000.0},
                    warmup=1, repeats=2)


@dataclass
class Context:
    """What the checks share: the device, the sizes, and the step measurements that the MFU
    rows read from the rows that measured them."""

    device: Any
    scale: Scale
    gpu_name: str
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        """Wait for the GPU, so a timer around a step measures the step."""
        if self.on_cuda:
            import torch

            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------ shared pieces


def bf16_model(context: Context, *, max_seq_len: int, rope_base: int = 100_000,
               checkpointing: bool, dtype: Any = None) -> Any:
    """The run's model (random weights, seed 0) in bf16 (or ``dtype``) on the device, wrapped
    for activation checkpointing as our recipes wrap it when ``checkpointing``."""
    import torch
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer

    from acadlm_plugins.models.smollm2 import smollm2_135m, tiny_llama

    torch.manual_seed(0)
    with training.set_default_dtype(dtype or torch.bfloat16), context.device:
        if context.scale.model == "tiny":
            model = tiny_llama(max_seq_len=max_seq_len)
        else:
            model = smollm2_135m(max_seq_len=max_seq_len, rope_base=rope_base)
    if checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={TransformerSelfAttentionLayer})
    return model.train()


def random_packed_batch(context: Context, batch_size: int, seq_len: int, vocab: int, *,
                        seed: int, positions: str = "reset") -> dict[str, Any]:
    """``batch_size`` packs of random-token documents (lengths as in
    benchmarks/document_masking.py), packed and collated by our data pipeline, so the mask is
    what our recipes build for the device: a FlexAttention ``BlockMask`` where torchtune uses
    flex attention (from the document boundaries, data/document_masks.py), else SDPA's."""
    import torch
    from document_masking import document_lengths

    from acadlm_plugins.data.mixture import collate_domain_packs
    from acadlm_plugins.data.packing import TokenizedDocuments, pack_documents

    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (length,), generator=generator).tolist()
            for row in range(batch_size)
            for length in document_lengths(seq_len, context.scale.doc_min,
                                           context.scale.doc_max, seed + row)]
    packs = pack_documents(TokenizedDocuments.from_lists(docs), seq_len, 0, mode="split")
    samples = [dict(packs.sample(i, positions=positions), domain=0) for i in range(len(packs))]
    batch = collate_domain_packs(samples)
    return {key: value.to(context.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def document_lengths_of(batch: dict[str, Any]) -> list[int]:
    """The lengths of all documents of a collated packed batch."""
    return [int(n) for n in batch["seq_lens"].flatten().tolist() if n > 0]


def attention_kind(batch: dict[str, Any]) -> str:
    """How torchtune attends in this batch: FlexAttention for a ``BlockMask``, else SDPA."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(batch.get("mask"), BlockMask):
        return "FlexAttention BlockMask"
    return "SDPA with a bool mask (torchtune has no FlexAttention here)"


def model_shape_flops(model: Any, batch: dict[str, Any], documents: list[int]) -> float:
    """:func:`step_flops` of one step of ``model`` on ``batch``."""
    from acadlm_plugins.pruning.architecture import architecture_of

    shape = architecture_of(model)
    return step_flops(sum(p.numel() for p in model.parameters()), batch["tokens"].numel(),
                      layers=shape.num_layers, heads=shape.num_heads, head_dim=shape.head_dim,
                      document_lengths=documents)


def training_step(model: Any, optimizer: Any, batch: dict[str, Any], plugin: Any = None,
                  step: int = 0) -> None:
    """One step of our recipes' loop: forward with the batch's mask and positions, mean
    next-token loss, the pruning plugin's hooks and Lagrangian when given, backward, gradient
    clipping at 1.0, AdamW. (``step_probe.training_step`` is the same step without hooks.)"""
    import torch

    from acadlm_plugins.training.validation import shifted_token_losses

    optimizer.zero_grad(set_to_none=True)
    if plugin is not None:
        plugin.acadlm_batch_ready(batch=batch, step=step)
    logits = model(batch["tokens"], mask=batch.get("mask"), input_pos=batch.get("input_pos"))
    losses, counted = shifted_token_losses(logits, batch["labels"])
    loss = losses.sum() / counted.sum().clamp(min=1)
    del logits
    if plugin is not None:
        loss = loss + plugin.acadlm_extra_loss(step=step)["lagrangian"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    if plugin is not None:
        plugin.acadlm_after_optimizer_step(step=step + 1, metrics={})


def time_steps(context: Context, steps: dict[str, Callable[[int], None]], *, warmup: int,
               repeats: int) -> dict[str, list[float]]:
    """Wall times of ``repeats`` calls of each step after ``warmup`` untimed ones, the steps
    taken in alternation (the order flips every round) so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        order = list(steps) if index % 2 == 0 else list(reversed(steps))
        for name in order:
            context.sync()
            started = time.perf_counter()
            steps[name](index)
            context.sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def pruning_plugin(model: Any, target: dict[str, int], device: Any) -> Any:
    """The prune recipe's plugin attached to ``model`` on ``device``, configured as
    benchmarks/pruning_overhead.py configures it."""
    from omegaconf import OmegaConf

    from acadlm_plugins.plugins.pruning import PruningPlugin

    cfg = OmegaConf.create({"seed": 0, "output_dir": tempfile.gettempdir(),
                            "pruning": {"target": dict(target), "lagrangian_warmup_steps": 20,
                                        "mask_lr": 0.3, "lambda_lr": 0.05}})
    plugin = PruningPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe="prune")
    plugin.acadlm_model_built(model=model, cfg=cfg, device=device)
    return plugin


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


# ------------------------------------------------------------------------------ the checks


def prune_step_row(context: Context) -> dict[str, Any]:
    """Row 1: masked / plain bf16 training-step time of SmolLM2-135M on packed batches."""
    import torch
    from pruning_overhead import DEFAULT_TARGET

    scale = context.scale
    target = scale.prune_target or DEFAULT_TARGET
    plain = bf16_model(context, max_seq_len=scale.prune_seq, checkpointing=True)
    masked = copy.deepcopy(plain)
    plugin = pruning_plugin(masked, target, context.device)
    batch = random_packed_batch(context, scale.prune_batch, scale.prune_seq,
                                plain.tok_embeddings.num_embeddings, seed=0)
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5)
                  for name, model in (("plain", plain), ("masked", masked))}
    steps = {"plain": lambda i: training_step(plain, optimizers["plain"], batch),
             "masked": lambda i: training_step(masked, optimizers["masked"], batch, plugin, i)}
    times = time_steps(context, steps, warmup=scale.warmup, repeats=scale.repeats)
    plain_s, masked_s = (statistics.median(times[name]) for name in ("plain", "masked"))
    documents = document_lengths_of(batch)
    flops = model_shape_flops(plain, batch, documents)
    tokens = batch["tokens"].numel()
    context.measured["prune"] = {"flops": flops, "plain_s": plain_s, "masked_s": masked_s,
                                 "tokens": tokens}
    gates = sum(p.numel() for p in plugin.masks.parameters())
    return {
        "result": f"{masked_s / plain_s:.3f}x (masked {milliseconds(masked_s)}, "
                  f"plain {milliseconds(plain_s)})",
        "details": f"median of {scale.repeats} steps after {scale.warmup} warm-up, alternating; "
                   f"{scale.prune_batch} x {scale.prune_seq} tokens, {len(documents)} documents "
                   f"of {scale.doc_min}..{scale.doc_max}, {attention_kind(batch)}, bf16, "
                   f"activation checkpointing, AdamW, clip 1.0; target {target} "
                   f"({gates:,} gates, {plugin.masks.hooked_modules} hooks); tokens/s "
                   f"{tokens / masked_s:,.0f} masked, {tokens / plain_s:,.0f} plain",
        "values": {"ratio": masked_s / plain_s, "masked_s": masked_s, "plain_s": plain_s,
                   "masked_s_all": times["masked"], "plain_s_all": times["plain"],
                   "tokens": tokens, "documents": len(documents),
                   "attention": attention_kind(batch)},
    }


def long_context_row(context: Context) -> dict[str, Any]:
    """Row 2: a 32K-token document-masked training step, FlexAttention vs per-document SDPA."""
    import torch

    from acadlm_plugins.training.document_attention import DocumentAttention
    from acadlm_plugins.training.step_probe import Knobs
    from acadlm_plugins.training.step_probe import training_step as long_context_step

    scale = context.scale
    context.sync()
    started = time.perf_counter()
    batch = random_packed_batch(context, 1, scale.long_seq, scale.hf_config["vocab_size"],
                                seed=1, positions="continuous")
    context.sync()
    collate_s = time.perf_counter() - started
    kind = attention_kind(batch)
    masked_name = "FlexAttention" if kind.startswith("FlexAttention") else "torchtune bool mask"
    documents = document_lengths_of(batch)
    measured: dict[str, dict[str, float]] = {}
    for name, per_document in ((masked_name, False), ("per-document SDPA", True)):
        model = bf16_model(context, max_seq_len=scale.long_seq, rope_base=1_000_000,
                           checkpointing=True)
        wrapper = DocumentAttention(model) if per_document else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1,
                                      betas=(0.9, 0.95))
        knobs = Knobs(activation_checkpointing=True, chunked_loss_tokens=scale.chunk_tokens,
                      document_attention=per_document)

        def step(_: int, model=model, optimizer=optimizer, knobs=knobs, wrapper=wrapper) -> None:
            long_context_step(model, optimizer, batch, knobs, wrapper)

        for index in range(max(1, scale.warmup - 1)):
            step(index)
        if context.on_cuda:
            context.sync()
            torch.cuda.reset_peak_memory_stats(context.device)
        times = time_steps(context, {name: step}, warmup=0, repeats=max(2, scale.repeats // 3))
        seconds = statistics.median(times[name])
        peak = torch.cuda.max_memory_allocated(context.device) if context.on_cuda else None
        measured[name] = {"seconds": seconds, "tokens_per_s": scale.long_seq / seconds,
                          "peak_bytes": peak, "flops": model_shape_flops(model, batch,
                                                                           documents)}
        del model, optimizer, wrapper, step
        gc.collect()
        if context.on_cuda:
            torch.cuda.empty_cache()
    context.measured["long_context"] = measured

    def describe(name: str) -> str:
        entry = measured[name]
        memory = (f"{entry['peak_bytes'] / 2**30:.2f} GiB peak" if entry["peak_bytes"]
                  is not None else "peak n/a (CPU)")
        return f"{name} {entry['tokens_per_s']:,.0f} tokens/s, {memory}"

    return {
        "result": "; ".join(describe(name) for name in measured),
        "details": f"1 x {scale.long_seq:,} tokens, {len(documents)} documents of "
                   f"{scale.doc_min}..{scale.doc_max}, {kind} vs training/document_attention, "
                   f"bf16, RoPE base 1e6, activation checkpointing, chunked loss "
                   f"{scale.chunk_tokens}, AdamW; median of {max(2, scale.repeats // 3)} steps; "
                   f"peak = max allocated during the timed steps (weights, gradients and AdamW "
                   f"state included); collating the batch (mask included) took "
                   f"{milliseconds(collate_s)}, outside the step",
        "values": {"collate_s": collate_s, "documents": len(documents), **{
            f"{name} {key}": value for name, entry in measured.items()
            for key, value in entry.items()}},
    }


def float8_row(context: Context) -> dict[str, Any]:
    """Row 3: float8 (torchao, ``tensorwise``) vs bf16 step time on sm89+ GPUs."""
    import torch

    from acadlm_plugins.training.float8 import MIN_CAPABILITY, convert_to_float8

    needed = f"sm{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}+"
    if not context.on_cuda:
        return {"status": "skipped", "result": f"skipped: needs {needed}, found no GPU"}
    capability = torch.cuda.get_device_capability(context.device)
    if capability < MIN_CAPABILITY:
        return {"status": "skipped",
                "result": f"skipped: needs {needed}, found sm{capability[0]}{capability[1]}"}
    from torchtune import training

    scale = context.scale
    bf16 = bf16_model(context, max_seq_len=scale.float8_seq, checkpointing=False)
    fp8 = copy.deepcopy(bf16)
    swapped = convert_to_float8(fp8, "tensorwise")
    for model in (bf16, fp8):
        training.compile_model(model, verbose=False)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, bf16.tok_embeddings.num_embeddings,
                           (scale.float8_batch, scale.float8_seq), generator=generator)
    batch = {"tokens": tokens.to(context.device), "labels": tokens.to(context.device)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5)
                  for name, model in (("bf16", bf16), ("float8", fp8))}
    steps = {"bf16": lambda i: training_step(bf16, optimizers["bf16"], batch),
             "float8": lambda i: training_step(fp8, optimizers["float8"], batch)}
    times = time_steps(context, steps, warmup=max(3, scale.warmup), repeats=scale.repeats)
    bf16_s, fp8_s = (statistics.median(times[name]) for name in ("bf16", "float8"))
    return {
        "result": f"{fp8_s / bf16_s:.3f}x step time, float8 / bf16 "
                  f"({milliseconds(fp8_s)} vs {milliseconds(bf16_s)})",
        "details": f"{swapped} linear layers as Float8Linear (tensorwise), output projection "
                   f"in bf16; {scale.float8_batch} x {scale.float8_seq} tokens, causal, no "
                   f"activation checkpointing, both compiled per layer "
                   f"(torchtune compile_model), AdamW; median of {scale.repeats} steps after "
                   f"{max(3, scale.warmup)} warm-up (compilation), alternating",
        "values": {"ratio": fp8_s / bf16_s, "float8_s": fp8_s, "bf16_s": bf16_s,
                   "swapped": swapped},
    }


PASSAGE_WORDS = ("the", "a", "of", "and", "river", "hill", "market", "lantern", "morning",
                 "walked", "carried", "quiet", "golden", "keeper", "letter", "number", "story",
                 "bridge", "winter", "opened", "careful", "window", "answer", "journey")


def synthetic_passages(count: int, seed: int) -> list[str]:
    """``count`` seeded passages of 160 plain words (paragraphs of 40), for prompts."""
    rng = random.Random(seed)
    passages = []
    for _ in range(count):
        words = [rng.choice(PASSAGE_WORDS) for _ in range(160)]
        passages.append("\n\n".join(" ".join(words[i:i + 40]).capitalize() + "."
                                    for i in range(0, 160, 40)))
    return passages


def write_random_checkpoint(folder: Path, hf_config: dict[str, Any], texts: list[str]) -> Path:
    """A Hugging Face Llama folder with random bf16 weights of ``hf_config``'s shape (tied
    embeddings, as SmolLM2) and a byte-level BPE tokenizer trained on ``texts``: no download,
    so it works on a machine without network or the embedded default."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(1024, hf_config["vocab_size"]), show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(**hf_config, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def eval_adapter_row(context: Context) -> dict[str, Any]:
    """Row 4: requests/s of lm-eval's ``acadlm`` and ``hf`` models on the same greedy
    ``generate_until`` requests, both in bf16 on the device."""
    from eval_adapter_vs_hf import generation_requests
    from lm_eval.models.huggingface import HFLM

    from acadlm_plugins.evaluation.lm_adapter import AcadLM

    scale = context.scale
    texts = synthetic_passages(scale.eval_requests, seed=3)
    requests = generation_requests(texts, scale.eval_new_tokens, seed=3)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        folder = write_random_checkpoint(Path(scratch) / "model", scale.hf_config, texts)
        device = str(context.device)
        models = {
            "acadlm": AcadLM(pretrained=str(folder), batch_size=scale.eval_batch,
                             device=device, dtype="bfloat16"),
            "hf": HFLM(pretrained=str(folder), batch_size=scale.eval_batch, device=device,
                       dtype="bfloat16"),
        }
    # Both models hold their weights and tokenizers in memory from here on.
    for model in models.values():  # warm-up: kernels, caches, allocator
        model.generate_until(requests[:scale.eval_batch], disable_tqdm=True)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    answers: dict[str, list[str]] = {}
    repeats = max(2, scale.repeats // 5)
    for repeat in range(repeats):
        order = list(models) if repeat % 2 == 0 else list(reversed(models))
        for name in order:
            context.sync()
            started = time.perf_counter()
            answers[name] = models[name].generate_until(requests, disable_tqdm=True)
            context.sync()
            seconds[name].append(time.perf_counter() - started)
    rates = {name: len(requests) / statistics.median(seconds[name]) for name in models}
    same = sum(a == b for a, b in zip(answers["acadlm"], answers["hf"], strict=True))
    shape = scale.hf_config
    return {
        "result": f"acadlm {rates['acadlm']:.2f} req/s, hf {rates['hf']:.2f} req/s: "
                  f"{rates['acadlm'] / rates['hf']:.2f}x",
        "details": f"{len(requests)} greedy generate_until requests (until a blank line or "
                   f"{scale.eval_new_tokens} new tokens), batch {scale.eval_batch}, bf16, median "
                   f"of {repeats} passes after one warm-up batch, alternating; random weights "
                   f"of the {shape['num_hidden_layers']}-layer, {shape['hidden_size']}-wide "
                   f"shape, max length {shape['max_position_embeddings']}; identical "
                   f"generations {same}/{len(requests)}",
        "values": {"acadlm_rps": rates["acadlm"], "hf_rps": rates["hf"],
                   "ratio": rates["acadlm"] / rates["hf"], "identical": same,
                   "acadlm_s_all": seconds["acadlm"], "hf_s_all": seconds["hf"]},
    }


def peak_text(gpu_name: str) -> str:
    peak = peak_bf16_flops(gpu_name)
    return (f"peak {peak / 1e12:.0f} TFLOP/s dense bf16 ({gpu_name})" if peak
            else f"no known peak for {gpu_name!r}")


def prune_mfu_row(context: Context) -> dict[str, Any]:
    """Row 5a: MFU of the prune step (row 1), masked and plain."""
    measured = context.measured.get("prune")
    if measured is None:
        return {"status": "not run", "result": "not run: row 1 measured no step"}
    flops = measured["flops"]
    return {
        "result": f"masked {mfu_text(flops, measured['masked_s'], context.gpu_name)}, "
                  f"plain {mfu_text(flops, measured['plain_s'], context.gpu_name)}",
        "details": f"{flops / 1e12:.2f} TFLOP per step of {measured['tokens']:,} tokens "
                   f"(6 x parameters x tokens + in-document causal attention; masks and "
                   f"recomputation not counted); {peak_text(context.gpu_name)}",
        "values": {"flops_per_step": flops, "peak_flops": peak_bf16_flops(context.gpu_name)},
    }


def long_context_mfu_row(context: Context) -> dict[str, Any]:
    """Row 5b: MFU of the long-context step (row 2), per attention."""
    measured = context.measured.get("long_context")
    if not measured:
        return {"status": "not run", "result": "not run: row 2 measured no step"}
    flops = next(iter(measured.values()))["flops"]
    return {
        "result": ", ".join(f"{name} {mfu_text(entry['flops'], entry['seconds'], context.gpu_name)}"
                            for name, entry in measured.items()),
        "details": f"{flops / 1e12:.2f} TFLOP per step of {context.scale.long_seq:,} tokens "
                   f"(6 x parameters x tokens + in-document causal attention; recomputation "
                   f"not counted); {peak_text(context.gpu_name)}",
        "values": {"flops_per_step": flops, "peak_flops": peak_bf16_flops(context.gpu_name)},
    }


PRECISIONS = ("fp32", "bf16", "bf16_master", "mixed")


def precision_row(context: Context) -> dict[str, Any]:
    """Row 6: update fidelity and step time of each precision a recipe can train in."""
    import torch

    from acadlm_plugins.training.master_weights import Float32MasterAdamW
    from acadlm_plugins.training.runtime import compute_in

    scale = context.scale
    reference = bf16_model(context, max_seq_len=scale.prune_seq, checkpointing=True)
    # state_dict names, which load_state_dict reads (named_parameters() would carry the
    # activation-checkpointing wrapper's prefix, which the loader adds once more)
    start = {name: value.detach().float().clone()
             for name, value in reference.state_dict().items()}
    batch = random_packed_batch(context, scale.prune_batch, scale.prune_seq,
                                reference.tok_embeddings.num_embeddings, seed=0)
    del reference
    models, optimizers = {}, {}
    for name in PRECISIONS:
        dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
        model = bf16_model(context, max_seq_len=scale.prune_seq, checkpointing=True, dtype=dtype)
        model.load_state_dict(start)  # the same (bf16-exact) values everywhere
        if any(not torch.equal(value.float(), start[key])
               for key, value in model.state_dict().items()):
            raise RuntimeError(f"the {name} model did not start from the shared weights")
        if name == "mixed":
            compute_in(model, torch.bfloat16, context.device)
        optimizer_class = Float32MasterAdamW if name == "bf16_master" else torch.optim.AdamW
        models[name] = model
        optimizers[name] = optimizer_class(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                                           weight_decay=0.1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times = time_steps(context, {name: (lambda i, n=name: training_step(
            models[n], optimizers[n], batch)) for name in PRECISIONS},
            warmup=scale.warmup, repeats=scale.repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    moved = {name: torch.cat([(value.detach().float() - start[key]).flatten()
                              for key, value in models[name].state_dict().items()])
             for name in PRECISIONS}
    norm = moved["fp32"].norm()
    off = {name: float((moved[name] - moved["fp32"]).norm() / norm) for name in PRECISIONS}
    length = {name: float(moved[name].norm() / norm) for name in PRECISIONS}
    seconds = {name: statistics.median(times[name]) for name in PRECISIONS}
    steps = scale.warmup + scale.repeats
    return {
        "result": ", ".join(f"{name} {off[name]:.2f} off fp32 ({milliseconds(seconds[name])})"
                            for name in PRECISIONS[1:]),
        "details": f"{steps} AdamW steps (lr 1e-5, betas 0.9/0.95, wd 0.1, clip 1.0) on one "
                   f"batch of {scale.prune_batch} x {scale.prune_seq} tokens from the same "
                   f"bf16-exact weights; off = ||Δ - Δ_fp32|| / ||Δ_fp32|| of the weights the "
                   f"model computes with; length vs fp32: "
                   + ", ".join(f"{name} {length[name]:.2f}" for name in PRECISIONS[1:])
                   + f"; fp32 step {milliseconds(seconds['fp32'])}, TF32 off; median of "
                   f"{scale.repeats} steps after {scale.warmup}",
        "values": {"off_fp32": off, "length_vs_fp32": length, "step_s": seconds,
                   "steps": steps},
    }


CHECKS = (
    Check("1", "prune step, bf16, SmolLM2-135M: masked / plain", prune_step_row, 150, STACK),
    Check("2", "long-context step at 32K: FlexAttention vs per-document SDPA", long_context_row,
          120, STACK),
    Check("3", "float8 vs bf16 step (sm89+)", float8_row, 150, STACK),
    Check("4", "lm-eval generate_until: acadlm vs hf, bf16", eval_adapter_row, 120, STACK),
    Check("5a", "MFU, prune step", prune_mfu_row, 0),
    Check("5b", "MFU, long-context step", long_context_mfu_row, 0),
    Check("6", "precision: bf16 / Float32MasterAdamW / mixed vs fp32, lr 1e-5", precision_row,
          90, STACK),
)


# ------------------------------------------------------------------------------ main


def versions() -> dict[str, str]:
    """Installed versions of the packages the figures depend on."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def release_memory() -> None:
    """Give the GPU memory of a finished check back, so the next one starts clean."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    parser.add_argument("--budget-s", type=float, default=BUDGET_SECONDS,
                        help=f"time guard in seconds (default {BUDGET_SECONDS})")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row ids to run (default: all, e.g. 1,2,5a)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, CPU allowed: checks the code paths, measures nothing")
    args = parser.parse_args(argv)
    if args.rows is not None:
        check_row_ids(parser, args.rows)
    return args


def check_row_ids(parser: argparse.ArgumentParser, rows: str) -> None:
    """Refuse a ``--rows`` id that names no check (an argparse error listing the valid ids):
    an unknown id used to select nothing, so the run printed an empty table and exited 0."""
    valid = [check.id for check in CHECKS]
    wanted = [r.strip() for r in rows.split(",")]
    unknown = [r for r in wanted if r not in valid]
    if unknown:
        parser.error(f"--rows: unknown row id(s) {', '.join(repr(r) for r in unknown)}; "
                     f"valid ids: {', '.join(valid)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    guard = TimeGuard(args.budget_s)
    try:
        import torch
    except ImportError:
        print("CUDA is not available (torch is not installed); nothing was run.")
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print(f"CUDA is not available on this machine (torch {torch.__version__}); "
              "nothing was run.")
        return 0
    for path in (str(REPO_ROOT), str(BENCHMARKS_DIR)):  # our package even where not installed
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ACADLM_NO_PROGRESS", "1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu_name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        machine = f"{gpu_name}, sm{major}{minor}, {memory:.0f} GiB"
    else:
        gpu_name, machine = "CPU", "no GPU (CPU)"
    context = Context(device=device, scale=SMOKE_SCALE if args.smoke else GPU_SCALE,
                      gpu_name=gpu_name)
    wanted = None if args.rows is None else {r.strip() for r in args.rows.split(",")}
    checks = [c for c in CHECKS if wanted is None or c.id in wanted]
    rows = run_checks(checks, context, guard, after_each=release_memory,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    found = versions()
    print(f"GPU check (issue 16){' -- SMOKE RUN: tiny shapes, not measurements' if args.smoke else ''}")
    print(f"date: {date}")
    print(f"GPU: {machine}; {peak_text(gpu_name)}")
    print("versions: " + ", ".join(f"{name} {version}" for name, version in found.items()))
    print(f"took {guard.elapsed():.0f} s of the {args.budget_s:.0f} s budget")
    print()
    print(format_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"date": date, "gpu": machine, "gpu_name": gpu_name,
                  "peak_bf16_flops": peak_bf16_flops(gpu_name), "versions": found,
                  "smoke": args.smoke, "budget_s": args.budget_s,
                  "elapsed_s": round(guard.elapsed(), 1), "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
