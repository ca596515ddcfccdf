"""A Llama decoder whose head size is not tied to ``embed_dim / num_heads``.

torchtune's ``llama3_2`` builder derives ``head_dim = embed_dim // num_heads``; a pruned model
keeps the source's head size while its hidden size and head count shrink independently (e.g.
SmolLM2's 64-dim heads with a 320-wide residual stream), so it needs the head size as its own
argument. Built from torchtune's own modules, so it is a torchtune model in every other way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torchtune import training
from torchtune.models.llama3_1._component_builders import llama3_mlp
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import (
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)


def llama_decoder(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                  embed_dim: int, intermediate_dim: int, head_dim: int, max_seq_len: int = 8192,
                  rope_base: float = 500_000, norm_eps: float = 1e-5,
                  tie_word_embeddings: bool = True, rope_scale_factor: int = 1,
                  ) -> TransformerDecoder:
    """A Llama-architecture ``TransformerDecoder`` with an explicit ``head_dim``."""
    rope = Llama3ScaledRoPE(dim=head_dim, max_seq_len=max_seq_len, base=rope_base,
                            scale_factor=rope_scale_factor)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len)
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=llama3_mlp(dim=embed_dim, hidden_dim=intermediate_dim),
            sa_norm=RMSNorm(embed_dim, eps=norm_eps), mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(
        embed_dim, vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers,
                              max_seq_len=max_seq_len, num_heads=num_heads, head_dim=head_dim,
                              norm=RMSNorm(embed_dim, eps=norm_eps), output=output)


def llama_from_hf_config(path: str, max_seq_len: int | None = None,
                         rope_base: float | None = None) -> TransformerDecoder:
    """Build the decoder described by a Hugging Face Llama ``config.json`` (file or directory).

    This is how configs refer to a pruned model: ``_component_:
    acadlm_plugins.models.llama.llama_from_hf_config`` with ``path:`` its export directory.
    """
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    config = json.loads(file.read_text())
    rope_theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta",
                                                                                   10_000.0)
    heads = config["num_attention_heads"]
    return llama_decoder(
        vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads", heads),
        embed_dim=config["hidden_size"], intermediate_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        max_seq_len=max_seq_len or config.get("max_position_embeddings", 8192),
        rope_base=rope_base or rope_theta, norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def empty_llama_from_hf_config(path: str, *, max_seq_len: int | None, device: torch.device,
                               dtype: torch.dtype) -> TransformerDecoder:
    """:func:`llama_from_hf_config` with uninitialized weights on ``device``, for a caller
    that loads every weight next: built on the meta device (no random init), then given
    storage; the RoPE tables are buffers, not weights, so they are computed here."""
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = llama_from_hf_config(path, max_seq_len=max_seq_len)
    model.to_empty(device=device)
    with training.set_default_dtype(dtype), device:
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    return model
