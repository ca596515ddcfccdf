"""Batched token generation for lm-eval's ``acadlm`` model, on torchtune's own pieces.

Prompts are left-padded into one batch; ``torchtune.generation`` gives the padding-aware
positions, torchtune's ``local_kv_cache`` the KV caches, and ``torchtune.generation.sample``
the sampler. What this module adds is the decoding loop and two inference-only changes to how
torchtune 0.6.1 runs it:

* **Grouped-query attention without repeated K/V heads.** Before every attention call,
  torchtune copies the cached keys and values of each KV head to all of its query heads (for
  SmolLM2-135M, 3 KV heads to 9 query heads: a copy of the whole KV cache, per layer and per
  decoding step). Inside :func:`grouped_query_attention` a decoding step hands the cache to
  PyTorch's SDPA as it is stored, with ``enable_gqa=True``, which lets each KV head serve its
  query heads in place. It is the same kernel on the same numbers, so the logits equal
  torchtune's bit for bit on the CPU (tested: max difference < 1e-5 in fp32). Prefill chunks
  are left to torchtune's own path. Training never enters it; the layers are restored on exit.

* **No prefill work on left padding.** A batch's prompts are prefilled in runs of similar
  length (within ``PREFILL_SLACK`` of the run's longest), each run over its own width and into
  its own slice of the batch's KV caches, rather than every row over the longest prompt's
  width. Eight prompts of 58-174 tokens cost 959 token positions instead of 1,392. The batch
  then decodes as one.

A prompt is prefilled in chunks (``prefill_chunk`` tokens per forward pass), so a long-context
prompt never needs a full ``length x length`` mask or ``length x vocab`` logits at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchtune.generation import get_position_ids_from_padding_mask, sample
from torchtune.modules import MultiHeadAttention, TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

#: Bytes a character can take in UTF-8: a stop string of ``n`` characters lies within the
#: last ``4 n + 1`` tokens of a byte-level tokenizer when it first appears.
_MAX_UTF8_BYTES = 4
#: Prompts prefilled together are at most this share shorter than the longest among them, so
#: at most this share of the prefill goes to left padding.
PREFILL_SLACK = 0.125


def final_hidden_states(model: TransformerDecoder, tokens: torch.Tensor, *,
                        mask: torch.Tensor | None = None,
                        input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states of ``tokens`` (``batch x length x dim``): the decoder's forward
    without its output projection, so a caller projects only the positions it needs onto the
    vocabulary (``length x vocab`` logits of a long or batched input are large)."""
    hidden = model.tok_embeddings(tokens)
    for layer in model.layers:
        hidden = layer(hidden, mask=mask, input_pos=input_pos)
    return model.norm(hidden)


def causal_mask_rows(real: torch.Tensor, start: int, stop: int, keys: int) -> torch.Tensor:
    """Rows ``start:stop`` of the padding-aware causal mask over the first ``keys`` slots
    (True = may attend): what ``torchtune.generation.get_causal_mask_from_padding_mask``
    gives for the whole sequence, built one prefill chunk (or decoding step) at a time so a
    long prompt never needs its full ``length x length`` mask. A padding slot sees only
    itself, so no softmax row is empty."""
    queries = torch.arange(start, stop, device=real.device)[:, None]
    slots = torch.arange(keys, device=real.device)[None, :]
    visible = (slots <= queries)[None] & real[:, None, :keys]
    return visible | (slots == queries)[None]


class _GroupedQueryCall:
    """Stands in for a torchtune attention layer's ``_attention_call`` (its SDPA call) while
    the layer believes it has as many KV heads as query heads, so keys and values arrive with
    their ``num_kv_heads`` heads as stored, un-repeated.

    A decoding step (one query position, a bool mask) calls SDPA with ``enable_gqa=True``:
    each KV head serves its ``group`` query heads in place, with nothing copied. Anything else
    (prefill chunks, once per prompt) repeats the heads exactly as torchtune does and goes
    through torchtune's own call, so its memory use and kernel choice stay as they were.
    """

    def __init__(self, group: int, original: Callable[..., torch.Tensor]) -> None:
        self.group = group
        self.original = original

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, dropout_p: float, is_causal: bool) -> torch.Tensor:
        if q.shape[2] == 1 and isinstance(mask, torch.Tensor):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                                  dropout_p=dropout_p, enable_gqa=True)
        if self.group > 1:
            k = k.repeat_interleave(self.group, dim=1)
            v = v.repeat_interleave(self.group, dim=1)
        return self.original(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)


@contextlib.contextmanager
def grouped_query_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the decoding steps of every torchtune ``MultiHeadAttention`` of
    ``model`` read their KV heads without repeating them (see :class:`_GroupedQueryCall`); the
    layers are restored on exit.

    Enter it *after* the KV caches are set up (``local_kv_cache``): a cache built inside the
    block would be sized for one KV head per query head (and would fail loudly on the first
    update, not give wrong numbers).
    """
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    saved = [(layer.num_kv_heads, layer._attention_call) for layer in layers]
    try:
        for layer in layers:
            group = layer.num_heads // layer.num_kv_heads
            layer._attention_call = _GroupedQueryCall(group, layer._attention_call)
            # torchtune repeats K/V heads only when the two counts differ.
            layer.num_kv_heads = layer.num_heads
        yield
    finally:
        for layer, (kv_heads, call) in zip(layers, saved, strict=True):
            layer.num_kv_heads = kv_heads
            layer._attention_call = call


class _CacheSlice(torch.nn.Module):
    """Rows ``rows`` and slots ``first:end`` of a torchtune ``KVCache``, filled from ``first``
    on, behind the cache's ``update``: what an attention layer writes lands in the batch's
    cache, and the layer attends over the slice."""

    def __init__(self, cache: torch.nn.Module, rows: slice, first: int, end: int) -> None:
        super().__init__()
        self.keys = cache.k_cache[rows, :, first:end]
        self.values = cache.v_cache[rows, :, first:end]
        self.filled = 0

    def update(self, k_val: torch.Tensor,
               v_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the next ``k_val.shape[2]`` slots; the whole slice's keys and values."""
        stop = self.filled + k_val.shape[2]
        self.keys[:, :, self.filled:stop] = k_val
        self.values[:, :, self.filled:stop] = v_val
        self.filled = stop
        return self.keys, self.values


def length_groups(lengths: Sequence[int]) -> list[slice]:
    """Runs of consecutive rows (lengths sorted longest first) each at most ``PREFILL_SLACK``
    shorter than its run's first row."""
    groups, start = [], 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or lengths[row] < (1 - PREFILL_SLACK) * lengths[start]:
            groups.append(slice(start, row))
            start = row
    return groups


def _prefill(model: TransformerDecoder, tokens: torch.Tensor, real: torch.Tensor,
             positions: torch.Tensor, lengths: list[int], chunk: int) -> torch.Tensor:
    """Fill the model's KV caches with the left-padded, longest-first prompts ending at slot
    ``width``; the final hidden state of each row's last prompt token (``rows x dim``).

    Prefilling the whole batch would run every row over the longest prompt's width, padding
    included. Instead each run of rows of similar length (:func:`length_groups`) is prefilled
    on its own, from where its longest prompt starts, into its slice of the caches (a view,
    so the batch's caches are what gets filled); the batch then decodes as one.
    """
    attentions = [m for m in model.modules()
                  if isinstance(m, MultiHeadAttention) and m.kv_cache is not None]
    caches = [attention.kv_cache for attention in attentions]
    width = max(lengths)
    last = []
    try:
        for rows in length_groups(lengths):
            first = width - max(1, lengths[rows.start])
            for attention, cache in zip(attentions, caches, strict=True):
                attention.kv_cache = _CacheSlice(cache, rows, first, width)
            for start in range(first, width, max(1, chunk)):
                stop = min(width, start + max(1, chunk))
                hidden = final_hidden_states(
                    model, tokens[rows, start:stop], input_pos=positions[rows, start:stop],
                    mask=causal_mask_rows(real[rows, first:], start - first, stop - first,
                                          width - first))
            last.append(hidden[:, -1])
    finally:
        for attention, cache in zip(attentions, caches, strict=True):
            attention.kv_cache = cache
    for cache in caches:
        cache.cache_pos.add_(width)  # the next update writes slot `width` of every row
    return torch.cat(last)


@dataclass
class StopRule:
    """When one row of a batch is done: at ``cap`` new tokens, at a token of ``stop_ids``
    (kept in the output), or once the decoded new text holds one of ``stop_strings``."""

    cap: int
    stop_strings: Sequence[str] = ()
    stop_ids: frozenset[int] = frozenset()
    window: int = field(init=False)

    def __post_init__(self) -> None:
        longest = max((len(s) for s in self.stop_strings if s), default=0)
        # Each step decodes only the tail that can hold a stop string that has just appeared
        # (plus a token on either side), not the whole generation. Were one ever missed, the
        # row would only stop later: its text is cut at the first stop string afterwards.
        self.window = _MAX_UTF8_BYTES * longest + 2 if longest else 0

    def done(self, generated: list[int], decode: Callable[[list[int]], str]) -> bool:
        """Whether ``generated`` (this row's new tokens so far) ends the row."""
        if len(generated) >= self.cap or (generated and generated[-1] in self.stop_ids):
            return True
        if not self.window:
            return False
        tail = decode(generated[-self.window:])
        return any(stop and stop in tail for stop in self.stop_strings)


@torch.inference_mode()
def generate_tokens(model: TransformerDecoder, prompts: list[list[int]], rules: list[StopRule],
                    *, pad_id: int, decode: Callable[[list[int]], str],
                    temperature: float = 0.0, top_k: int | None = None,
                    kv_cache: bool = True, prefill_chunk: int = 2048,
                    cache_dtype: torch.dtype | None = None,
                    max_steps: int | None = None) -> list[list[int]]:
    """New tokens for each prompt of a batch, each row ending as its :class:`StopRule` says;
    greedy unless ``temperature > 0`` (then torchtune's sampler, with ``top_k``).

    Prompts are left-padded, longest first. With ``kv_cache`` they are prefilled into torchtune
    KV caches, similar lengths together and in ``prefill_chunk`` pieces (:func:`_prefill`),
    and each step feeds one token per row through :func:`grouped_query_attention`; without it
    every step reruns the whole sequence through the unchanged model (the reference the cached
    path is tested against). The loop ends as soon as every row is done, or after
    ``max_steps`` new tokens (a memory trial: the caches are still sized for every row's full
    ``cap``).
    """
    order = sorted(range(len(prompts)), key=lambda row: -len(prompts[row]))
    prompts, rules = [prompts[row] for row in order], [rules[row] for row in order]
    device = model.tok_embeddings.weight.device
    rows, width = len(prompts), max(len(p) for p in prompts)
    total = width + max(rule.cap for rule in rules)
    last_end = total if max_steps is None else min(total, width + max_steps)
    tokens = torch.full((rows, total), pad_id, dtype=torch.long, device=device)
    real = torch.ones((rows, total), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
        real[row, :width - len(prompt)] = False
    positions = get_position_ids_from_padding_mask(real)
    # A row that fits alone (prompt + its cap <= the model's length) never gets past the last
    # position; a finished row beside a longer-running one does, and is fed on regardless:
    # without the clamp its position would index past the RoPE table.
    limit = getattr(model, "max_seq_len", None)
    if limit is not None:
        positions.clamp_(max=int(limit) - 1)
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [rule.cap <= 0 for rule in rules]
    with contextlib.ExitStack() as caching:
        if kv_cache:
            caching.enter_context(local_kv_cache(
                model, batch_size=rows, device=device, decoder_max_seq_len=total,
                dtype=cache_dtype or model.tok_embeddings.weight.dtype))
            caching.enter_context(grouped_query_attention(model))
        for end in range(width, last_end):
            if all(finished):
                break
            if not kv_cache:
                hidden = final_hidden_states(model, tokens[:, :end],
                                             input_pos=positions[:, :end],
                                             mask=causal_mask_rows(real, 0, end, end))[:, -1]
            elif end == width:
                hidden = _prefill(model, tokens, real, positions, list(map(len, prompts)),
                                  prefill_chunk)
            else:
                hidden = final_hidden_states(model, tokens[:, end - 1:end],
                                             input_pos=positions[:, end - 1:end],
                                             mask=causal_mask_rows(real, end - 1, end, total))[:, -1]
            last = model.output(hidden).float()
            if temperature > 0.0:
                chosen = sample(last, temperature=temperature, top_k=top_k).squeeze(-1)
            else:
                chosen = last.argmax(dim=-1)
            tokens[:, end] = chosen
            for row, token in enumerate(chosen.tolist()):
                if not finished[row]:
                    generated[row].append(token)
                    finished[row] = rules[row].done(generated[row], decode)
    in_order: list[list[int]] = [[] for _ in prompts]
    for row, new in zip(order, generated, strict=True):
        in_order[row] = new
    return in_order
