"""Llama-named entry points, kept for the configs and callers that use them.

``llama_decoder`` is the Llama decoder with an explicit ``head_dim`` (a pruned model keeps the
source's head size while its hidden size and head count shrink independently).
``llama_from_hf_config`` and ``empty_llama_from_hf_config`` build whatever supported family an
HF folder holds (Llama, Mistral, Qwen2: see :mod:`acadlm_plugins.models.families`), despite
their names, so every config and caller that names them handles every family.
"""

from __future__ import annotations

import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import TransformerDecoder

from acadlm_plugins.models.decoder import decoder
from acadlm_plugins.models.families import decoder_from_hf_config, hf_model_spec


def llama_decoder(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                  embed_dim: int, intermediate_dim: int, head_dim: int, max_seq_len: int = 8192,
                  rope_base: float = 500_000, norm_eps: float = 1e-5,
                  tie_word_embeddings: bool = True, rope_scale_factor: float = 1,
                  ) -> TransformerDecoder:
    """A Llama-architecture ``TransformerDecoder`` with an explicit ``head_dim`` (RoPE:
    torchtune's ``Llama3ScaledRoPE`` at ``rope_scale_factor`` with Llama 3.1's other scaling
    values; 1 is plain RoPE)."""
    rope = Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=rope_base,
                            scale_factor=rope_scale_factor)
    return decoder(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads,
                   num_kv_heads=num_kv_heads, embed_dim=embed_dim,
                   intermediate_dim=intermediate_dim, head_dim=head_dim,
                   max_seq_len=max_seq_len, rope=rope, norm_eps=norm_eps,
                   tie_word_embeddings=tie_word_embeddings)


def llama_from_hf_config(path: str, max_seq_len: int | None = None,
                         rope_base: float | None = None,
                         project_in_loss: bool = False) -> TransformerDecoder:
    """Build the decoder described by a Hugging Face ``config.json`` (file or directory) of any
    supported family, refusing the others (see ``models.families.hf_model_spec``).

    This is how configs refer to a pruned model: ``_component_:
    acadlm_plugins.models.llama.llama_from_hf_config`` with ``path:`` its export directory.
    ``rope_base`` replaces θ and keeps the config's RoPE scaling; ``project_in_loss`` as in
    :func:`acadlm_plugins.models.families.decoder_from_hf_config`.
    """
    return decoder_from_hf_config(path, max_seq_len, rope_base, project_in_loss)


def empty_llama_from_hf_config(path: str, *, max_seq_len: int | None, device: torch.device,
                               dtype: torch.dtype) -> TransformerDecoder:
    """:func:`llama_from_hf_config` with uninitialized weights on ``device``, for a caller
    that loads every weight next (no random init; the RoPE tables are computed)."""
    return hf_model_spec(path).build_empty(max_seq_len=max_seq_len, device=device, dtype=dtype)
