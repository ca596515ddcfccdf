"""torchtune builders for SmolLM2-135M and a tiny random model of the same architecture.

SmolLM2 is a Llama architecture with tied embeddings and grouped-query attention, i.e. exactly
torchtune's ``llama3_2`` decoder without Llama-3.1 RoPE scaling (``scale_factor=1``; at
``scale_factor=1`` with the default ``old_context_len`` the scaled RoPE reduces to plain RoPE).
Load the embedded default in a config with::

    model:
      _component_: acadlm_plugins.models.smollm2_135m
    checkpointer:
      _component_: torchtune.training.FullModelHFCheckpointer
      checkpoint_dir: ${acadlm_home:}/models/SmolLM2-135M-Instruct
      checkpoint_files: [model.safetensors]
      model_type: LLAMA3_2
"""

from __future__ import annotations

from torchtune.models.llama3_2 import llama3_2
from torchtune.modules import TransformerDecoder

SMOLLM2_135M_VOCAB_SIZE = 49152


def smollm2_135m(max_seq_len: int = 8192, rope_base: int = 100_000) -> TransformerDecoder:
    """SmolLM2-135M (30 layers, width 576, 9 query / 3 key-value heads, tied embeddings).

    ``max_seq_len`` and ``rope_base`` are arguments so long-context training can stretch the
    RoPE base and the KV-cache length without a new builder.
    """
    return llama3_2(
        vocab_size=SMOLLM2_135M_VOCAB_SIZE,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        embed_dim=576,
        intermediate_dim=1536,
        max_seq_len=max_seq_len,
        rope_base=rope_base,
        norm_eps=1e-5,
        scale_factor=1,
        tie_word_embeddings=True,
    )


def tiny_llama(
    vocab_size: int = 512,
    num_layers: int = 2,
    embed_dim: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_dim: int = 128,
    max_seq_len: int = 512,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """A random-weight model with SmolLM2's architecture, small enough for unit tests on CPU."""
    return llama3_2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len,
        rope_base=10_000,
        norm_eps=1e-5,
        scale_factor=1,
        tie_word_embeddings=tie_word_embeddings,
    )
