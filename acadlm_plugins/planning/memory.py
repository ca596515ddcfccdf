"""How much GPU memory one rank of a run needs: an estimate from shapes alone.

Static part, per GPU (exact for the tensors it counts)::

    weights      = sum over parameters of shard(p) x bytes(dtype)
    gradients    = the same (torchtune trains in the param dtype; no fp32 master copy;
                   ``mixed_precision: true`` keeps weights, gradients and moments in fp32)
    optimizer    = AdamW: 2 moments per value in the param dtype (``zeros_like(p)``);
                   torchao AdamW8bit / AdamWFp8 / AdamW4bit: 1 / 1 / 0.5 byte per moment value
                   plus a float32 scale per block of 256 / 256 / 128, for shards of >= 4096
                   values that the block divides (other tensors: moments in the param dtype);
                   CPUOffloadOptimizer: none on the GPU; Float32MasterAdamW: 2 float32
                   moments, plus a float32 copy of each weight held in bf16
    pruning      = (gates + Lagrange multipliers) x 4 bytes x 4 (value, gradient, 2 AdamW
                   moments): the plugin's own float32 optimizers, on every rank
    teacher      = sum over the teacher's parameters of shard(p) x bytes(dtype)
    RoPE tables  = (max_seq_len x head_dim / 2 x 2 + head_dim / 2) x 4 bytes per RoPE module
                   (float32 cos/sin and θ; not sharded)

``shard(p)`` is ``p.numel()`` in one process and ``ceil(p.shape[0] / W) x (p.numel() /
p.shape[0])`` under FSDP2 over ``W`` ranks (our recipes shard every parameter on dim 0).

Activations (an estimate; what autograd saves for the backward pass of one micro-batch of ``t``
tokens on this rank, ``t = batch x seq_len / sequence_parallel_degree``)::

    norm       = h x (bytes + 8) + 4      (one torchtune RMSNorm: it computes in float32 and
                                           saves its input as float32 -- a copy under bf16,
                                           the input itself under fp32 --, the float32
                                           x·rsqrt(mean(x²)) the scale's gradient needs and the
                                           float32 rsqrt; its output, cast back to the param
                                           dtype, is what the projections after it save)
    per layer  = t x [2 x norm + (4·H·d + 4·I) x bytes + 4·H]
                 (4·H·d: q, k and v after RoPE and GQA expansion, and the attention output,
                 which is also output_proj's input; 4·H: SDPA's float32 log-sum-exp per head;
                 4·I: the SwiGLU MLP's w1, silu, w3 outputs and their product)
    head       = t x norm                 (the final RMSNorm, outside the layers)
    logits     = n x V x (bytes + 8)      (the projection output, the float32 logits torchtune's
                                           decoder returns, which the loop holds through the
                                           backward pass -- one tensor under fp32, so an upper
                                           bound there --, and the saved float32 log-softmax;
                                           n = t, a chunked loss's batch x chunk, or 0 for a
                                           rater; torchtune's CEWithChunkedOutputLoss keeps the
                                           chunks and the float32 log-softmax: bytes + 4)
    without activation checkpointing:  L x per_layer + head + logits
    with it (torchtune wraps every layer):  L x t x h x bytes + per_layer + head + logits
    (with torchtune's activation offloading the L x t x h x bytes live in CPU memory)

``mixed_precision: true`` on one process (``torch.autocast`` over fp32 weights; bytes = 2)
adds what autocast keeps, and under FSDP2, which casts the gathered weights, none of it::

    per layer  += t x 3 x h x bytes + P x bytes
                 (q, k and v each cast the fp32 norm output to bf16 and save their copy, as do
                 w1 and w3: three copies beyond the one counted; P = h·d·(2·H + 2·KV) + 3·h·I,
                 the layer's projection weights, whose bf16 copies the matrix products save)
    head       += V x h x bytes           (the output projection's bf16 weight copy; a rater
                                           has none)
    checkpointed:  L x t x h x 4 + max(L x P x bytes, per_layer) + head + logits
                 (the residual stream, so the saved layer inputs, stays fp32; autocast's
                 cache holds every layer's weight copy until the forward pass returns, and
                 the backward's recomputed layer makes its own: the larger of the two)

Held per micro-batch besides the layers' activations, where the run has them::

    KD loss      = p x (D_t x bytes + 4 + 4 + 8)
                   (distillation: what the chunked KD loss's autograd Function saves until the
                   backward pass: the teacher's final hidden state at the counted positions,
                   each position's two float32 log-sum-exps and its int64 row index;
                   p = batch x (seq_len - 1), every position that has a next-token label, an
                   upper bound when labels are ignored; D_t the teacher's hidden size; for a
                   teacher head that is no plain projection, its float32 logits t x V x 4
                   replace p x D_t x bytes. The student's logits it saves are the loop's own.)
    gathered     = V x D_t x bytes when W > 1, else 0
                   (distillation under FSDP2: the teacher's output projection --
                   tok_embeddings for tied embeddings -- gathered whole by full_tensor(), a new
                   tensor beside the rank's shard, kept until the backward pass; on one rank
                   the loss saves the parameter itself, no new bytes)
    dense mask   = A x batch x S x S + L x batch x S x S x bytes
                   (long_context.attention: mask on a device without FlexAttention: the
                   boolean [batch, S, S] masks of the step's A accumulation micro-batches, all on
                   the device before the first forward, and the additive copy of the mask that
                   SDPA saves in every layer; with checkpointing one copy, the recomputed
                   layer's. S is the full length: under sequence parallelism every rank
                   attends over it.)

Measured (``tests/test_plan_activation_memory.py``): on CPU, ``L x per_layer + head`` and
``L x t x h x bytes + head`` (checkpointed, after the forward pass) equal the bytes of the
storages autograd saves, in bf16 and in fp32. Under bf16 the RMSNorm's float32 input and bf16
scale differ in dtype, so ``F.rms_norm`` takes its composite path on every device; under fp32
a GPU may take the fused kernel, which does not save the normalized copy (the fp32 estimate is
then up to t x h x 4 per norm high; not measured on a GPU). Under one-process autocast the
same two equal what autograd saves (projection biases, as Qwen2's, are not counted). The same test measures the KD
loss's saved bytes (one process, and the gathered weight on two gloo ranks) and SDPA's saved
mask copies, on CPU.

Not counted: temporary buffers inside a kernel, the gradients of activations during the
backward pass (at the loss: two float32 n x V buffers), FSDP's all-gather buffers (about two
layers' full weights), communication buffers, the CUDA context (0.5-1 GiB), allocator
fragmentation, the mask hooks' extra copies while pruning, a distillation teacher's own
(no-grad, one layer at a time) activations and the KD loss's float32 vocabulary chunks (a few
counted tokens x vocab_chunk_size at a time), and a FlexAttention ``BlockMask``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import RotaryPositionalEmbeddings

from acadlm_plugins.pruning.architecture import Architecture

ROPE_MODULES = (RotaryPositionalEmbeddings, Llama3ScaledRoPE, Qwen2RotaryPositionalEmbeddings)

# torchao low-bit optimizers: (bytes per moment value, values per float32 scale).
LOW_BIT_STATE = {"AdamW8bit": (1.0, 256), "Adam8bit": (1.0, 256), "AdamWFp8": (1.0, 256),
                 "AdamFp8": (1.0, 256), "AdamW4bit": (0.5, 128), "Adam4bit": (0.5, 128)}
MIN_QUANTIZED_NUMEL = 4096          # torchao (like bitsandbytes) quantizes only tensors this big
PLUGIN_STATE_COPIES = 4             # value, gradient, exp_avg, exp_avg_sq
FLOAT32_BYTES = 4
INT64_BYTES = 8


@dataclass(frozen=True)
class OptimizerState:
    """What an optimizer keeps per GPU, and how it was counted."""

    bytes: int
    description: str


@dataclass(frozen=True)
class ActivationShape:
    """What the activation estimate needs about one micro-batch on one rank."""

    tokens: int                 # t: tokens of one micro-batch on this rank
    logit_positions: int        # n: positions whose full-vocabulary logits exist at once
    architecture: Architecture
    bytes_per_value: int
    logit_bytes_per_value: int | None = None    # default: bytes_per_value + 8
    offloaded: bool = False                     # checkpointed layer inputs in CPU memory
    autocast: bool = False                      # one-process mixed precision (fp32 weights)
    vocab_projection: bool = True               # False: a rater (scalar heads, no V x h)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them (see the module docstring for each formula)."""

    world_size: int
    fsdp: bool
    dtype: str
    optimizer: str
    weights: int
    gradients: int
    optimizer_state: int
    pruning_state: int
    teacher_weights: int
    buffers: int
    activations_checkpointed: int
    activations_full: int
    activation_checkpointing: bool
    distillation_loss: int = 0              # KD loss: what its autograd Function saves
    teacher_gathered_weight: int = 0        # the teacher's output projection gathered whole
    attention_mask_checkpointed: int = 0    # dense mask: boolean masks + one saved copy
    attention_mask_full: int = 0            # dense mask: boolean masks + a copy per layer
    root_gathered: int = 0                  # `model.project_in_loss` under FSDP2: the root's
                                            # embeddings and output projection, gathered whole
    weights_dtype: str = ""                 # weights, gradients, moments (`mixed_precision`:
                                            # float32); "" = `dtype`, torchtune's way

    @property
    def static(self) -> int:
        """What lives through the whole run: weights, gradients, states, buffers."""
        return (self.weights + self.gradients + self.optimizer_state + self.pruning_state
                + self.teacher_weights + self.buffers)

    @property
    def activations(self) -> int:
        """What one micro-batch saves for its backward pass, for the config's own
        activation-checkpointing setting: the layers' activations, the dense attention mask and
        the KD loss's saved tensors."""
        if self.activation_checkpointing:
            layers, mask = self.activations_checkpointed, self.attention_mask_checkpointed
        else:
            layers, mask = self.activations_full, self.attention_mask_full
        return layers + mask + self.distillation_loss

    @property
    def total(self) -> int:
        return self.static + self.teacher_gathered_weight + self.root_gathered + self.activations

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "static": self.static, "activations": self.activations,
                "total": self.total}


def shard_numel(shape: torch.Size | tuple[int, ...], world_size: int) -> int:
    """Values of a parameter on the rank holding the most of it under FSDP2 dim-0 sharding over
    ``world_size`` ranks (the whole tensor when ``world_size`` is 1)."""
    numel = math.prod(shape)
    if world_size <= 1 or not shape:
        return numel
    return math.ceil(shape[0] / world_size) * (numel // shape[0])


def rope_table_bytes(model: nn.Module) -> int:
    """Bytes of the float32 θ and cos/sin tables of a model's RoPE modules (each shared module
    once; FSDP replicates them on every rank). Counted from the modules' sizes, since on the
    meta device ``Llama3ScaledRoPE`` defers building its tables."""
    modules = {id(m): m for m in model.modules() if isinstance(m, ROPE_MODULES)}
    return sum((m.max_seq_len * _rope_values_per_position(m) + m.dim // 2) * FLOAT32_BYTES
               for m in modules.values())


def _rope_values_per_position(module: nn.Module) -> int:
    """Cached values per position: cos and sin of each of the ``dim / 2`` frequencies, except
    Qwen2's module, which caches both halves of the rotated dimension (``[S, 2 · dim]``)."""
    if isinstance(module, Qwen2RotaryPositionalEmbeddings):
        return 2 * module.dim
    return module.dim


def parameter_bytes(params: Iterable[torch.Tensor], *, world_size: int, bytes_per_value: int
                    ) -> int:
    """Bytes of ``params`` (or of their gradients) on one GPU."""
    return sum(shard_numel(p.shape, world_size) for p in params) * bytes_per_value


def optimizer_state(params: Iterable[torch.Tensor], optimizer_cfg: Any, *, world_size: int,
                    bytes_per_value: int) -> OptimizerState:
    """The optimizer state of ``params`` on one GPU, read from ``optimizer._component_`` (an
    unknown optimizer is counted as AdamW and says so)."""
    optimizer_cfg = optimizer_cfg or {}
    component = str(optimizer_cfg.get("_component_", ""))
    name = component.rsplit(".", 1)[-1]
    shards = [shard_numel(p.shape, world_size) for p in params]
    if name == "CPUOffloadOptimizer":
        return OptimizerState(0, f"{component}: moments in CPU memory, none on the GPU")
    if name in LOW_BIT_STATE and component.startswith("torchao."):
        value_bytes, block = LOW_BIT_STATE[name]
        total = 0
        for numel in shards:
            if numel >= MIN_QUANTIZED_NUMEL and numel % block == 0:
                total += 2 * (math.ceil(numel * value_bytes) + numel // block * FLOAT32_BYTES)
            else:
                total += 2 * numel * bytes_per_value
        return OptimizerState(total, f"{name}: 2 moments at {value_bytes:g} byte/value + a "
                              f"float32 scale per {block} values")
    if name == "Float32MasterAdamW":
        moments = 3 if optimizer_cfg.get("amsgrad", False) else 2
        master = FLOAT32_BYTES if bytes_per_value < FLOAT32_BYTES else 0
        moment_bytes = max(bytes_per_value, FLOAT32_BYTES)
        return OptimizerState((moments * moment_bytes + master) * sum(shards),
                              f"{name}: {moments} float32 moments per value"
                              + (" and a float32 copy of the weights" if master else ""))
    moments = 2
    if name == "SGD":
        moments = 1 if float(optimizer_cfg.get("momentum", 0) or 0) else 0
    elif optimizer_cfg.get("amsgrad", False):
        moments = 3
    description = f"{name or 'AdamW'}: {moments} moment(s) per value in the param dtype"
    if name not in ("AdamW", "Adam", "SGD"):
        description += " (counted as AdamW)"
    return OptimizerState(moments * sum(shards) * bytes_per_value, description)


def rms_norm_bytes_per_token(embed_dim: int, bytes_per_value: int) -> int:
    """What one torchtune RMSNorm saves per token (``norm`` in the module docstring): its input
    as float32, the float32 normalized input, the float32 rsqrt, and its output in the param
    dtype (saved by the projections that read it)."""
    return embed_dim * (bytes_per_value + 2 * FLOAT32_BYTES) + FLOAT32_BYTES


def activation_bytes(shape: ActivationShape, *, checkpointed: bool) -> int:
    """The activation estimate of the module docstring, in bytes."""
    a, b = shape.architecture, shape.bytes_per_value
    norm = rms_norm_bytes_per_token(a.embed_dim, b)
    per_token_layer = (2 * norm + (4 * a.num_heads * a.head_dim + 4 * a.intermediate_dim) * b
                       + a.num_heads * FLOAT32_BYTES)
    head = shape.tokens * norm
    residual_bytes, weight_copies = b, 0
    if shape.autocast:
        per_token_layer += 3 * a.embed_dim * b
        weight_copies = b * (a.embed_dim * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads)
                             + 3 * a.embed_dim * a.intermediate_dim)
        if shape.vocab_projection:
            head += a.vocab_size * a.embed_dim * b
        residual_bytes = FLOAT32_BYTES
    per_layer = shape.tokens * per_token_layer + weight_copies
    logit_bytes = shape.logit_bytes_per_value or b + 2 * FLOAT32_BYTES
    logits = shape.logit_positions * a.vocab_size * logit_bytes
    if checkpointed:
        layer_inputs = 0 if shape.offloaded else (
            a.num_layers * shape.tokens * a.embed_dim * residual_bytes)
        # Autocast's cache holds every layer's weight copies until the forward pass returns;
        # the backward's recomputed layer makes its own: two peaks, not one.
        return (layer_inputs + max(a.num_layers * weight_copies, per_layer) + head + logits)
    return a.num_layers * per_layer + head + logits


def distillation_loss_bytes(*, counted_positions: int, teacher_saved: int) -> int:
    """What the chunked KD loss (``training/distillation_loss._ChunkedForwardKL``) saves for the
    backward pass beside the student's logits: ``teacher_saved`` (the teacher's final hidden
    state at the counted positions, or its float32 logits for a head that is no plain
    projection), and per counted position the two float32 log-sum-exps and the int64 row
    index."""
    return teacher_saved + counted_positions * (2 * FLOAT32_BYTES + INT64_BYTES)


def dense_mask_bytes(*, batch: int, seq_len: int, micro_batches: int, num_layers: int,
                     bytes_per_value: int, checkpointed: bool) -> int:
    """``dense mask`` of the module docstring: the boolean ``[b, S, S]`` mask of each of the
    step's micro-batches (the loop moves them all to the device before the first forward) and
    the additive copy SDPA saves in each layer (one, the recomputed layer's, with activation
    checkpointing)."""
    square = batch * seq_len * seq_len
    copies = 1 if checkpointed else num_layers
    return micro_batches * square + copies * square * bytes_per_value
