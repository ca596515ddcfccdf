"""Forward KL between a teacher's and a student's next-token distributions, vocabulary chunk by
vocabulary chunk.

Knowledge distillation (Hinton, Vinyals and Dean 2015, *Distilling the Knowledge in a Neural
Network*, section 2) trains the student toward the teacher's softened distribution::

    KD = T^2 * KL(p_t || p_s),   p = softmax(z / T)
       = T^2 * sum_v p_t(v) * (log p_t(v) - log p_s(v))

per counted position, where ``z`` are logits and ``T`` the temperature; the ``T^2`` keeps the
gradient's size independent of ``T`` (the gradient with respect to the student's logits is
``T * (p_s - p_t)``).

Memory: with SmolLM2's 49,152-word vocabulary a float32 copy of one distribution over an
8 x 2,048-token micro-batch is 3.2 GB. :func:`forward_kl_chunked` never holds more than one
``tokens x vocab_chunk_size`` block in float32: a first pass accumulates both log-normalizers
(logsumexp) chunk by chunk, a second pass sums the KL chunk by chunk, and the backward pass
recomputes each chunk's probabilities from the two saved normalizers instead of keeping them.
The teacher may be given as its final hidden state (after the final norm) plus its output
projection weight, in which case even the teacher's logits exist one chunk at a time
(:func:`teacher_final_hidden` and :func:`output_projection_weight` get both from a torchtune
decoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acadlm_plugins.data.packing import CROSS_ENTROPY_IGNORE_INDEX

DEFAULT_VOCAB_CHUNK_SIZE = 8192


def forward_kl_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` at every position (the last
    dimension is the vocabulary), in float32 over the full vocabulary: the plain formula, for
    tests and small inputs."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)
    return temperature ** 2 * terms.sum(dim=-1)


def forward_kl_chunked(student_logits: torch.Tensor, teacher: torch.Tensor,
                       targets: torch.Tensor, *, teacher_weight: torch.Tensor | None = None,
                       temperature: float = 1.0,
                       vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed ``T^2 * KL(teacher || student)`` over the counted positions, and their number.

    ``student_logits`` is ``[batch, seq, vocab]``; ``targets`` is ``[batch, seq]``, aligned with
    the positions (position t's next-token label; ``-100``: not counted). ``teacher`` is either
    the teacher's logits (``[batch, seq, vocab]``, ``teacher_weight=None``) or its final hidden
    state (``[batch, seq, dim]``) with ``teacher_weight`` its ``[vocab, dim]`` output
    projection, which is then applied one vocabulary chunk at a time. Gradients flow to
    ``student_logits`` only: the teacher is a constant. Every chunk is computed in float32.
    """
    if student_logits.dim() != 3 or targets.shape != student_logits.shape[:2]:
        raise ValueError(f"student_logits must be [batch, seq, vocab] and targets [batch, seq]; "
                         f"got {tuple(student_logits.shape)} and {tuple(targets.shape)}")
    vocab = student_logits.shape[-1]
    if teacher.shape[:2] != targets.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} does not cover the positions of "
                         f"targets {tuple(targets.shape)}")
    if teacher_weight is None and teacher.shape[-1] != vocab:
        raise ValueError(f"teacher logits have {teacher.shape[-1]} entries per position, the "
                         f"student's {vocab}: the vocabularies differ")
    if teacher_weight is not None and tuple(teacher_weight.shape) != (vocab, teacher.shape[-1]):
        raise ValueError(f"teacher_weight must be [vocab={vocab}, dim={teacher.shape[-1]}], got "
                         f"{tuple(teacher_weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size must be >= 1, got {vocab_chunk_size}")
    rows = (targets != CROSS_ENTROPY_IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    if teacher_weight is None:
        teacher_rows = teacher.reshape(-1, vocab)  # rows are picked chunk by chunk
    else:
        teacher_rows = teacher.reshape(-1, teacher.shape[-1]).index_select(0, rows)
    kl_sum = _ChunkedForwardKL.apply(student_logits.reshape(-1, vocab), teacher_rows,
                                     teacher_weight, rows, float(temperature),
                                     int(vocab_chunk_size))
    return kl_sum, rows.new_tensor(rows.numel())


class _ChunkedForwardKL(torch.autograd.Function):
    """The two-pass chunked KL of :func:`forward_kl_chunked`, with a backward that recomputes
    each chunk (only the per-row log-normalizers are kept between the passes)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor,
                weight: torch.Tensor | None, rows: torch.Tensor, temperature: float,
                chunk_size: int) -> torch.Tensor:
        source = _ChunkSource(student, teacher, weight, rows, temperature)
        chunks = _vocab_chunks(student.shape[-1], chunk_size)
        lse_s, lse_t = source.log_normalizers(chunks)
        kl = student.new_zeros(rows.numel(), dtype=torch.float32)
        for cols in chunks:
            z_s, z_t = source.chunk(cols)
            log_p_s, log_p_t = z_s - lse_s[:, None], z_t - lse_t[:, None]
            p_t = log_p_t.exp()
            # where the teacher gives a word no mass its term is 0, even at log p_t = -inf
            kl += torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(dim=-1)
        ctx.save_for_backward(student, teacher, weight, rows, lse_s, lse_t)
        ctx.temperature, ctx.chunks = temperature, chunks
        return temperature ** 2 * kl.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        student, teacher, weight, rows, lse_s, lse_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        source = _ChunkSource(student, teacher, weight, rows, ctx.temperature)
        grad = torch.zeros_like(student)
        scale = grad_output.float() * ctx.temperature  # d(T^2 KL)/dz_s = T (p_s - p_t)
        for cols in ctx.chunks:
            z_s, z_t = source.chunk(cols)
            delta = (z_s - lse_s[:, None]).exp() - (z_t - lse_t[:, None]).exp()
            grad[rows, cols] = (scale * delta).to(grad.dtype)
        return grad, None, None, None, None, None


class _ChunkSource:
    """Both sides' temperature-scaled float32 logits of the counted rows, one vocabulary slice
    at a time (the teacher's projected from its hidden state when a weight is given)."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor,
                 weight: torch.Tensor | None, rows: torch.Tensor, temperature: float) -> None:
        self.student, self.teacher, self.weight = student, teacher, weight
        self.rows, self.temperature = rows, temperature

    def chunk(self, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        z_s = self.student[self.rows, cols].float()
        if self.weight is None:
            z_t = self.teacher[self.rows, cols].float()
        else:
            z_t = (self.teacher @ self.weight[cols].T).float()
        return z_s / self.temperature, z_t / self.temperature

    def log_normalizers(self, chunks: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
        """logsumexp over the whole vocabulary of both sides, combined chunk by chunk."""
        lse_s = self.student.new_full((self.rows.numel(),), -torch.inf, dtype=torch.float32)
        lse_t = lse_s.clone()
        for cols in chunks:
            z_s, z_t = self.chunk(cols)
            lse_s = torch.logaddexp(lse_s, z_s.logsumexp(dim=-1))
            lse_t = torch.logaddexp(lse_t, z_t.logsumexp(dim=-1))
        return lse_s, lse_t


def _vocab_chunks(vocab: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, vocab)) for start in range(0, vocab, chunk_size)]


def output_projection_weight(model: nn.Module) -> torch.Tensor | None:
    """The ``[vocab, dim]`` matrix a torchtune decoder's ``output`` multiplies the final hidden
    state with: ``tok_embeddings.weight`` for tied embeddings (``TiedLinear``), ``output.weight``
    for a bias-free ``nn.Linear``; None for any other head (then use the full logits)."""
    from torchtune.modules import TiedLinear

    output = getattr(model, "output", None)
    if isinstance(output, TiedLinear):
        return output.tied_module.weight
    if isinstance(output, nn.Linear) and output.bias is None:
        return output.weight
    return None


def teacher_final_hidden(model: nn.Module, tokens: torch.Tensor, *,
                         mask: torch.Tensor | None = None,
                         input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """A torchtune decoder's final hidden state (the final norm's output, what ``output``
    projects), ``[batch, seq, dim]``, without computing the logits.

    The decoder's ``unembed`` step is swapped for the final norm for this one call, so wrappers
    around ``forward`` (FSDP2 gathering the root parameters) see an ordinary call.
    """
    def final_norm(hidden: torch.Tensor) -> torch.Tensor:
        return model.norm(hidden)

    model.unembed = final_norm  # an instance attribute shadows the method for this call only
    try:
        hidden = model(tokens, mask=mask, input_pos=input_pos)
    finally:
        del model.unembed
    return hidden[-1] if isinstance(hidden, list) else hidden
