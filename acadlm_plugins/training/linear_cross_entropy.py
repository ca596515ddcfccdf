"""The vocabulary projection and cross-entropy of torchtune's stock recipes, a chunk of positions
at a time, so that a step never holds its ``tokens x vocabulary`` logits.

torchtune 0.6.1's ``full_finetune_*`` recipes call the model, keep the logits it returns and hand
them to ``cfg.loss``. With ``CEWithChunkedOutputLoss`` every chunk of bf16 logits and its float32
log-softmax stay alive until the backward pass: 6 bytes per logit, 47 GiB for one 64K-token
Llama-3 sequence (128,256 entries per position), which is why ProLong's SFT would not fit an
80 GB GPU through the stock recipe (ProLong's own trainer projects ``LOGIT_BLOCK_SIZE``
positions at a time). Two components change that, and nothing else in the recipe:

* the model, built with ``project_in_loss: true`` (``acadlm_plugins.models.llama_from_hf_config``
  and ``decoder_from_hf_config``), returns its final normalized hidden states, wrapped in
  :class:`HiddenStates`, instead of the logits;
* :class:`LinearCrossEntropyLoss` (``loss._component_``) projects ``chunk_tokens`` positions at
  a time under activation checkpointing, so the backward pass recomputes one chunk's logits at a
  time.

The loss is the same token mean as ``CEWithChunkedOutputLoss`` (float32 logits, the same
ignored label), so the recipe's scaling, gradient accumulation and logging are unchanged. Either
half without the other stops the first step with an error naming both keys.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from acadlm_plugins.data.packing import CROSS_ENTROPY_IGNORE_INDEX
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.chunked_loss import projected_token_losses

COMPONENT = "acadlm_plugins.training.linear_cross_entropy.LinearCrossEntropyLoss"
_PAIRING_FIX = (f"use both halves together: `model.project_in_loss: true` and "
                f"`loss._component_: {COMPONENT}`, or neither.")


class HiddenStates(list):
    """A decoder's final normalized hidden states (``[batch, positions, dim]``) and the output
    projection that turns them into logits, as a model built with ``project_in_loss`` returns
    them. It is a list (of the one hidden-state tensor) so that torchtune's recipes pass it to
    the loss untouched (they reshape only a tensor) and FSDP2 finds the tensor to hook its
    backward pass on. Anything outside torch that iterates it, as torchtune's own losses
    iterate logit chunks, is refused: it would take hidden states for logits."""

    def __init__(self, hidden: torch.Tensor, projection: Any) -> None:
        super().__init__([hidden])
        self.hidden, self.projection = hidden, projection

    def __iter__(self) -> Iterator[Any]:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not caller.startswith("torch."):
            raise ConfigError("loss._component_", "the model returns hidden states "
                              "(`model.project_in_loss: true`), which only "
                              f"{COMPONENT} turns into logits.", _PAIRING_FIX)
        return super().__iter__()


def projection_key(model: torch.nn.Module) -> str:
    """The name of the module whose weight projects onto the vocabulary: ``output``, or
    ``tok_embeddings`` when ``output`` is torchtune's ``TiedLinear`` over it."""
    return "tok_embeddings" if hasattr(model.output, "tied_module") else "output"


def sharded_alone_error(key: str) -> ConfigError:
    """The refusal of an output projection that FSDP2 shards as a module of its own
    (torchtune's ``custom_sharded_layers``): the loss calls it once per chunk, each call a
    collective, and ranks whose batches have different chunk counts would wait for ever."""
    return ConfigError("custom_sharded_layers", f"holds `{key}`, the output projection, which "
                       "the loss calls once per chunk, each a collective: ranks with different "
                       "numbers of chunks would hang.", f"leave `{key}` out of "
                       "custom_sharded_layers with `model.project_in_loss: true` (it stays in "
                       "the root's group, gathered once a step).")


def project_in_loss(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a torchtune ``TransformerDecoder``) returning :class:`HiddenStates` instead of
    logits from every call; its weights, state dict and other steps are unchanged."""

    sharding_checked = False

    def unembed(hidden: torch.Tensor) -> HiddenStates:
        nonlocal sharding_checked
        if not sharding_checked and isinstance(model, FSDPModule):  # once, at the first step
            key = projection_key(model)
            if isinstance(getattr(model, key), FSDPModule):
                raise sharded_alone_error(key)
            # The loss applies the output projection after the forward pass: the root's
            # parameters (embeddings, final norm, output projection) must stay gathered until
            # the backward pass, which reduce-scatters their gradients and reshards them.
            # torch's own default for a root; torchtune's shard_model asks otherwise.
            model.set_reshard_after_forward(False, recurse=False)
            sharding_checked = True
        return HiddenStates(model.norm(hidden), model.output)

    model.unembed = unembed  # an instance attribute shadows TransformerDecoder.unembed
    return model


def check_pairing(project_in_loss: bool, loss_component: str) -> None:
    """Refuse a config with only one of the two halves, as its first step would."""
    ours = loss_component.rsplit(".", 1)[-1] == COMPONENT.rsplit(".", 1)[-1]
    if project_in_loss and not ours:
        raise ConfigError("loss._component_", f"is {loss_component or 'unset'}, and the model "
                          "returns hidden states (`model.project_in_loss: true`).", _PAIRING_FIX)
    if ours and not project_in_loss:
        raise ConfigError("model.project_in_loss", f"is not true, and {COMPONENT} needs the "
                          "model's hidden states.", _PAIRING_FIX)


def root_parameter_count(model: torch.nn.Module) -> int:
    """Parameters outside the decoder layers (embeddings, final norm, output projection): the
    root's, which FSDP2 keeps gathered from the forward to the backward pass here."""
    return sum(parameter.numel() for name, parameter in model.named_parameters()
               if not name.startswith("layers."))


class LinearCrossEntropyLoss(torch.nn.Module):
    """Token-mean cross-entropy of :class:`HiddenStates` against labels already shifted by the
    recipe, projecting ``chunk_tokens`` positions of the batch at a time (ProLong's
    ``LOGIT_BLOCK_SIZE``; the step's peak logits are ``batch x chunk_tokens x vocabulary``).

    ``ignore_index`` is torchtune's -100, the value the recipes pad labels with (they read it
    from the loss)."""

    ignore_index = CROSS_ENTROPY_IGNORE_INDEX

    def __init__(self, chunk_tokens: int = 2048) -> None:
        super().__init__()
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) \
                or chunk_tokens < 1:
            raise ConfigError("loss.chunk_tokens", f"{chunk_tokens!r} is not a positive "
                              "integer.", "give the positions projected at a time, e.g. 2048.")
        self.chunk_tokens = chunk_tokens

    def forward(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, HiddenStates):
            raise ConfigError("model.project_in_loss", f"{COMPONENT} needs the model's hidden "
                              f"states, and the model returned {type(outputs).__name__} "
                              "logits.", _PAIRING_FIX)
        targets = labels.reshape(outputs.hidden.shape[:2])
        total = projected_token_losses(outputs.hidden, targets, outputs.projection,
                                       chunk_tokens=self.chunk_tokens).sum()
        return total / (targets != self.ignore_index).sum().clamp(min=1)
