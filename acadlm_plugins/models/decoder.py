"""A torchtune decoder of the Llama/Mistral/Qwen2 kind with its head size as its own argument.

torchtune 0.6.1's builders (``llama2``, ``llama3_2``, ``mistral``, ``qwen2``) derive
``head_dim = embed_dim // num_heads``. A pruned model keeps the source's head size while its
hidden size and head count shrink independently (and Mistral-Nemo-shaped models have
``head_dim * num_heads != hidden_size`` to begin with), so the head size must be an argument.
This is those builders' layer stack, made of the same torchtune modules, with the family's
differences passed in: the RoPE module (built by :mod:`acadlm_plugins.models.rope`), whether
q/k/v have biases (Qwen2), and the family's own torchtune MLP builder.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchtune.models.llama3_1._component_builders import llama3_mlp
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)


def decoder(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
            embed_dim: int, intermediate_dim: int, head_dim: int, max_seq_len: int,
            rope: nn.Module, norm_eps: float = 1e-6, tie_word_embeddings: bool = False,
            attention_bias: bool = False,
            mlp: Callable[..., FeedForward] = llama3_mlp) -> TransformerDecoder:
    """A ``TransformerDecoder`` of pre-norm self-attention layers sharing one ``rope`` module
    (as torchtune's builders share theirs); ``attention_bias`` gives q/k/v (not the output
    projection) a bias, as Qwen2 has."""
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=attention_bias),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attention_bias),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=attention_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope, max_seq_len=max_seq_len)
        layers.append(TransformerSelfAttentionLayer(
            attn=attn, mlp=mlp(dim=embed_dim, hidden_dim=intermediate_dim),
            sa_norm=RMSNorm(embed_dim, eps=norm_eps), mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(
        embed_dim, vocab_size, bias=False)
    return TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers,
                              max_seq_len=max_seq_len, num_heads=num_heads, head_dim=head_dim,
                              norm=RMSNorm(embed_dim, eps=norm_eps), output=output)
