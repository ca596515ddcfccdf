"""One training step of SmolLM2-135M in a fresh process: its loss, time and peak memory.

The long-context stages rely on three memory knobs (activation checkpointing, the chunked loss
of training/chunked_loss, per-document attention of training/document_attention). Whether they
save memory is a property of a whole step (forward, backward, AdamW), so a probe runs exactly
the step ``long_context_recipe`` runs -- same loss normalization, gradient clipping and
optimizer -- on one packed batch, in a spawned process, so that the peak RSS it reports is that
configuration's own. benchmarks/long_context_memory.py and tests/test_long_context_memory.py
both use it.

Memory is the RSS high-water mark (VmHWM), lowered to the current RSS once the model and
optimizer are loaded, so the peak after the step is the step's own; the step's *growth* is that
peak minus the RSS after loading (the peak of loading itself is reported too).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from acadlm_plugins.data.mixture import collate_domain_packs
from acadlm_plugins.data.packing import (
    CROSS_ENTROPY_IGNORE_INDEX,
    TokenizedDocuments,
    pack_documents,
)
from acadlm_plugins.training.chunked_loss import chunked_token_losses, shifted_targets
from acadlm_plugins.training.document_attention import DocumentAttention
from acadlm_plugins.training.validation import shifted_token_losses

# glibc keeps freed blocks below its (growing) mmap threshold in the heap; with every block of
# 1 MiB or more mapped on its own, peak RSS follows the live tensors, not allocation history.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@dataclass(frozen=True)
class Knobs:
    """The memory settings of one step, as ``long_context_recipe`` would set them."""

    activation_checkpointing: bool = False
    chunked_loss_tokens: int = 0      # 0: full logits and one cross-entropy
    document_attention: bool = False  # False: torchtune's explicit block-causal SDPA mask


@dataclass(frozen=True)
class StepResult:
    """What one probed step measured (bytes and seconds)."""

    loss: float
    grad_norm: float
    seconds: float
    cpu_seconds: float
    rss_after_load: int  # with the model loaded and AdamW's moments allocated
    peak_rss_load: int   # VmHWM before the step: the peak of imports and weight loading
    peak_rss: int        # VmHWM after the step (reset after loading): the step's own peak
    moment_bytes: int    # RSS AdamW's moments added (in rss_after_load, not in the growth)
    gradient_bytes: int  # the gradients' bytes (allocated by the step: in the growth)

    @property
    def step_growth(self) -> int:
        """Peak RSS over the RSS with the model loaded: the step's own memory."""
        return self.peak_rss - self.rss_after_load


@dataclass(frozen=True)
class OutOfMemory:
    """A step that failed to allocate under the probe's memory limit, and how far it got: its
    real growth is more than ``step_growth``."""

    message: str
    rss_after_load: int
    peak_rss: int  # VmHWM when the allocation failed
    moment_bytes: int
    gradient_bytes: int

    @property
    def step_growth(self) -> int:
        return self.peak_rss - self.rss_after_load


def packed_text_batch(text_file: Path, seq_len: int, tokenizer) -> dict[str, torch.Tensor]:
    """One pack of ``seq_len`` tokens of the documents of a JSON-lines file, taken in file order
    and packed end to end (split mode, continuous positions, as the stage configs pack), as the
    recipe's collate function batches it (tokens, labels, input_pos, mask, seq_lens)."""
    docs: list[list[int]] = []
    with open(text_file) as handle:
        for line in handle:
            docs.append(tokenizer.encode(json.loads(line)["text"], add_bos=True, add_eos=True))
            if sum(map(len, docs)) >= seq_len:
                break
    if sum(map(len, docs)) < seq_len:
        raise ValueError(f"{text_file} holds fewer than {seq_len} tokens")
    packs = pack_documents(TokenizedDocuments.from_lists(docs), seq_len, tokenizer.pad_id,
                           mode="split")
    sample = dict(packs.sample(0, positions="continuous"), domain=0)
    return collate_domain_packs([sample])


def load_smollm2(model_dir: Path, *, max_seq_len: int, rope_base: float,
                 activation_checkpointing: bool, layers: int | None = None) -> torch.nn.Module:
    """SmolLM2-135M (fp32) with the Hugging Face weights of ``model_dir``, wrapped for
    activation checkpointing as the recipe wraps it. ``layers``: keep only the first that many
    decoder layers (a cheaper step of the same kind, for tests)."""
    from safetensors.torch import load_file
    from torchtune import training
    from torchtune.models import convert_weights
    from torchtune.modules import TransformerSelfAttentionLayer

    from acadlm_plugins.models.smollm2 import smollm2_135m

    model = smollm2_135m(max_seq_len=max_seq_len, rope_base=rope_base)
    if layers is not None:
        model.layers = model.layers[:layers]
    if activation_checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={TransformerSelfAttentionLayer})
    state = convert_weights.hf_to_tune(load_file(model_dir / "model.safetensors"), num_heads=9,
                                       num_kv_heads=3, dim=576, head_dim=64)
    kept = len(model.layers)
    model.load_state_dict({k: v for k, v in state.items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < kept})
    return model


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  batch: dict[str, torch.Tensor], knobs: Knobs,
                  documents: DocumentAttention | None) -> tuple[float, float]:
    """The recipe's step on one batch: summed token losses over the counted tokens, backward,
    gradient clipping at 1.0, AdamW. Returns (loss, gradient norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    mask = batch["mask"]
    if documents is not None:
        documents.set_seq_lens(batch["seq_lens"])
        mask = None
    if knobs.chunked_loss_tokens:
        losses, _ = chunked_token_losses(model, batch["tokens"], shifted_targets(batch["labels"]),
                                         chunk_tokens=knobs.chunked_loss_tokens, mask=mask,
                                         input_pos=batch["input_pos"])
    else:
        logits = model(batch["tokens"], mask=mask, input_pos=batch["input_pos"])
        losses, _ = shifted_token_losses(logits, batch["labels"])
        del logits
    counted = int((batch["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_INDEX).sum())
    loss = losses.sum() / counted
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    return float(loss.detach()), float(grad_norm)


def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo, in bytes: what a probe may take without pushing
    other processes out."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status (Linux only)")


def _peak_rss() -> int:
    """The high-water mark of this process's RSS (VmHWM; reset by :func:`_reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS, so that the next peak is the step's own and
    not that of loading the weights; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def allocate_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Make torch's AdamW allocate its moments now rather than in the first ``step()``, and leave
    the next step unchanged: a step with zero gradients at learning rate 0 changes no parameter
    (the decay factor is 1 - 0 x weight_decay, the update is scaled by 0) and leaves the moments
    at zero; the step counts are then set back to 0 and the gradients freed.

    Without it every configuration's step growth would hold the same ~1 GiB of moments (for
    SmolLM2-135M) and the ratios between configurations would mostly compare that constant."""
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    for state in optimizer.state.values():
        state["step"].zero_()
    optimizer.zero_grad(set_to_none=True)


def measure_step(model_dir: Path, batch: dict[str, torch.Tensor], knobs: Knobs, *,
                 rope_base: float, layers: int | None = None) -> StepResult | OutOfMemory:
    """Load the model, allocate AdamW's moments, then time and measure one training step (in
    the calling process): the growth is the step's own memory, gradients and activations."""
    seq_len = batch["tokens"].shape[1]
    model = load_smollm2(model_dir, max_seq_len=seq_len, rope_base=rope_base,
                         activation_checkpointing=knobs.activation_checkpointing,
                         layers=layers)
    documents = DocumentAttention(model) if knobs.document_attention else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1,
                                  betas=(0.9, 0.95))
    before_moments = _rss_now()
    allocate_adamw_state(optimizer)
    fixed = {"moment_bytes": _rss_now() - before_moments,
             "gradient_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    rss_after_load, peak_rss_load = _rss_now(), _peak_rss()
    _reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        loss, grad_norm = training_step(model, optimizer, batch, knobs, documents)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "memory" not in str(err):
            raise  # a failure, not a step too big for the limit
        return OutOfMemory(str(err).splitlines()[0], rss_after_load, _peak_rss(), **fixed)
    return StepResult(loss=loss, grad_norm=grad_norm, seconds=time.perf_counter() - started,
                      cpu_seconds=time.process_time() - cpu_started,
                      rss_after_load=rss_after_load, peak_rss_load=peak_rss_load,
                      peak_rss=_peak_rss(), **fixed)


def _child(model_dir: str, batch: dict[str, torch.Tensor], knobs: Knobs, rope_base: float,
           threads: int, memory_limit: int | None, queue, layers: int | None = None) -> None:
    torch.set_num_threads(threads)
    batch = {k: v.clone() for k, v in batch.items()}  # own memory, not the parent's shared pages
    if memory_limit:
        # Past the limit an allocation fails in this process alone (an OutOfMemory result),
        # rather than the kernel's OOM killer picking some process on a shared machine.
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    with contextlib.suppress(OSError):  # and should the machine run short anyway, this goes first
        Path("/proc/self/oom_score_adj").write_text("1000")
    result = measure_step(Path(model_dir), batch, knobs, rope_base=rope_base, layers=layers)
    queue.put((type(result).__name__, asdict(result)))


@contextlib.contextmanager
def _child_environment() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in CHILD_ENV}
    os.environ.update(CHILD_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def probe_step(model_dir: Path, batch: dict[str, torch.Tensor], knobs: Knobs, *,
               rope_base: float = 1e6, threads: int = 1, memory_limit: int | None = None,
               layers: int | None = None) -> StepResult | OutOfMemory:
    """One step in a freshly spawned process: its :class:`StepResult`, or :class:`OutOfMemory`
    when the step needed more than ``memory_limit`` bytes of data (if given). ``layers`` keeps
    only the first that many decoder layers (see :func:`load_smollm2`)."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with _child_environment():
        child = context.Process(target=_child, args=(str(model_dir), batch, knobs, rope_base,
                                                     threads, memory_limit, queue, layers))
        child.start()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"the probe process for {knobs} died (exit code {child.exitcode})")
    kind, fields = queue.get(timeout=60)
    return OutOfMemory(**fields) if kind == "OutOfMemory" else StepResult(**fields)
