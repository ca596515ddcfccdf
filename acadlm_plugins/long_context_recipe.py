"""Long-context continued training (ProLong, Gao et al. 2024): one stage per run.

Run::

    tune run acadlm_plugins/long_context_recipe --config configs/smollm2/long_context_stage1.yaml
    tune run acadlm_plugins/long_context_recipe --config configs/smollm2/long_context_stage2.yaml
    tune run --nproc_per_node 2 acadlm_plugins/long_context_recipe --config ...   # FSDP2

A stage is the continued pre-training loop (``continued_pretrain_recipe``: checkpoints, resume,
plugins, per-source validation loss) with what a context extension needs on top:

* ``long_context.max_seq_len`` and ``long_context.rope_base`` (θ): the model is built with this
  θ and length, and every saved ``model/config.json`` carries them, so the next stage, lm-eval
  through our adapter and transformers all load the stretched model.
* A stage longer than the model was trained on (``trained_length``, by default the checkpoint's
  ``max_position_embeddings``) at an unchanged θ is refused before training.
* A checkpoint with a scaled RoPE (Llama 3.1/3.2's ``llama3`` scaling) keeps its scaling under
  the new θ: the scaling is applied to the new θ's frequencies, by our model and, since the
  saved config.json keeps ``rope_scaling`` and gets the new ``rope_theta``, by transformers and
  the lm-eval adapter alike. The stage logs this (``Stage.rope_note``); docs/models.md says why.
* ``long_context.token_budget`` sets the number of steps (budget / tokens per step).
* ``long_context.previous_stage``: the optimizer state (AdamW moments) of the checkpoint of
  that stage whose ``model/`` this stage starts from (``checkpointer.checkpoint_dir``) carries
  over, while the learning-rate schedule starts again, as in ProLong; weights from outside that
  stage are refused (``optimizer_source``). Moments change form with the optimizer: AdamW's
  are quantized for an AdamW8bit stage, AdamW8bit's dequantized for an AdamW stage.
* ``long_context.chunked_loss_tokens``: the next-token loss is computed this many positions at
  a time, so the ``length x vocabulary`` logits are never held whole (see training/chunked_loss).
* ``sequence_parallel.degree``: Ulysses sequence parallelism (training/sequence_parallel.py).
  Each run of ``degree`` consecutive ranks reads the same batch and splits every sequence into
  ``degree`` shards; attention exchanges heads for tokens (all-to-all), so document masks work
  unchanged. ``tune run --nproc_per_node N`` gives ``N / degree`` data-parallel replicas; the
  parameters are sharded with FSDP2 over all ``N`` ranks.

Cross-document attention is masked whenever the data are packed with document boundaries (our
packed datasets always are): FlexAttention block masks on GPUs where torchtune supports them,
per-document SDPA elsewhere (``long_context.attention``). A batch, training or validation,
carries a mask only when the model reads one: torchtune's dense ``[b, S, S]`` fallback (268 MB
per pack at 16K) is built for ``attention: mask`` on hardware without FlexAttention and nowhere
else.
``long_context.document_masking: false`` turns the masking off for ProLong's ablation: every
pack is then one causal sequence with positions 0..S-1 (training/document_attention.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.continued_pretrain_recipe import REQUIRED_KEYS, ContinuedPretrainRecipe
from acadlm_plugins.data.packing import collate_packs
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.families import hf_model_spec
from acadlm_plugins.models.rope import (
    config_theta,
    format_theta,
    rope_settings_from_config,
    write_rope_settings,
)
from acadlm_plugins.training import runtime
from acadlm_plugins.training.checkpointing import (
    MODEL_DIRNAME,
    RECIPE_STATE_FILENAME,
    UNREADABLE_STATE_ERRORS,
    latest_checkpoint,
)
from acadlm_plugins.training.chunked_loss import chunked_token_losses, shifted_targets
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.config_checks import config_value
from acadlm_plugins.training.document_attention import (
    DocumentAttention,
    without_document_masking,
)
from acadlm_plugins.training.optimizers import float_state_dict, match_loaded_states
from acadlm_plugins.training.run_checks import step_interval
from acadlm_plugins.training.sequence_parallel import (
    UlyssesAttention,
    check_sequence_length,
    check_sequence_parallel,
    enable_ulysses,
    new_sequence_parallel_group,
    shard_batch,
)
from acadlm_plugins.training.validation import shifted_token_losses, target_token_losses

log = utils.get_logger("INFO")

RECIPE_NAME = "long_context"
STAGE_KEYS = {"max_seq_len", "rope_base", "trained_length", "token_budget", "previous_stage",
              "chunked_loss_tokens", "attention", "document_masking"}
ATTENTION_MODES = ("auto", "mask", "documents")


@dataclass(frozen=True)
class Stage:
    """One ProLong stage, checked against the checkpoint it starts from."""

    max_seq_len: int
    rope_base: float
    trained_length: int
    source_rope_base: float
    source_max_positions: int
    token_budget: int | None
    previous_stage: str | None
    chunked_loss_tokens: int
    attention: str = "auto"
    document_masking: bool = True
    rope_note: str | None = None

    @property
    def extends_context(self) -> bool:
        return self.max_seq_len > self.trained_length


def source_model_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``config.json`` of the checkpoint this stage starts from."""
    folder = Path(str(cfg.checkpointer.checkpoint_dir)).expanduser()
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError("checkpointer.checkpoint_dir", f"{folder} has no config.json.",
                          "point it at a Hugging Face model folder (or the previous stage's "
                          "step_<N>/model).")
    # the family layer's checks first: a malformed θ, scaling factor or dimension is named
    # with its file and key here, before the stage reads its RoPE from the same file
    hf_model_spec(folder)
    return json.loads(path.read_text())


def check_checkpoint_files(cfg: DictConfig) -> None:
    """Name the weight files a stage's checkpoint folder really holds when the config lists
    others (torchtune saves ``model-00001-of-00001.safetensors``, not ``model.safetensors``)."""
    folder = Path(str(cfg.checkpointer.checkpoint_dir)).expanduser()
    listed = [str(f) for f in cfg.checkpointer.get("checkpoint_files", None) or []]
    missing = [f for f in listed if not (folder / f).is_file()]
    if missing:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise ConfigError("checkpointer.checkpoint_files", f"{missing} not in {folder}, which "
                          f"holds {found or 'no .safetensors file'}.",
                          f"set checkpointer.checkpoint_files=[{','.join(found)}]." if found
                          else "point checkpointer.checkpoint_dir at a model folder.")


def config_rope_base(model_config: dict[str, Any]) -> float:
    """θ of a Hugging Face config, read as transformers and the family layer read it (inside
    ``rope_scaling``/``rope_parameters`` first, then the top-level ``rope_theta``)."""
    return config_theta(model_config)


def rope_change_note(model_config: dict[str, Any], rope_base: float) -> str | None:
    """What moving a checkpoint's RoPE to θ = ``rope_base`` does to its RoPE scaling, for the
    log and the run history; None when nothing is scaled or θ stays.

    The rule: a scaled RoPE keeps its scaling (factor, low/high frequency factors, original
    context) and applies it to the new θ's frequencies, as transformers does with the config
    the stage saves. Dropping the scaling instead would change every low-frequency rotation of
    the pretrained model at once, on top of the θ change."""
    try:
        source = rope_settings_from_config(model_config)
    except KeyError:
        return None  # a malformed scaling block; building the model refuses it by name
    if not source.scaled or float(rope_base) == source.theta:
        return None
    return (f"RoPE θ {format_theta(source.theta)} -> {format_theta(rope_base)} on a scaled "
            f"RoPE: the checkpoint's "
            f"{source.rope_type} scaling (factor {source.factor:g}, low_freq_factor "
            f"{source.low_freq_factor:g}, high_freq_factor {source.high_freq_factor:g}, "
            f"original_max_position_embeddings {source.original_max_position_embeddings}) is "
            "kept and applied to the new θ's frequencies; the saved config.json keeps it, so "
            "transformers and the acadlm adapter compute the same RoPE.")


def read_stage(cfg: DictConfig, model_config: dict[str, Any]) -> Stage:
    """The ``long_context`` block, checked: lengths, θ, budget. Raises ConfigError naming the
    field on anything that would make the stage wrong or impossible."""
    block = cfg.get("long_context", None)
    if block is None:
        raise ConfigError("long_context", "is required by the long_context recipe.",
                          "see configs/smollm2/long_context_stage1.yaml.")
    unknown = sorted(set(block) - STAGE_KEYS)
    if unknown:
        raise ConfigError(f"long_context.{unknown[0]}", "is not a known key.",
                          f"use only {sorted(STAGE_KEYS)}.")
    length = config_value(block.get("max_seq_len", None), "long_context.max_seq_len", int,
                          minimum=2)
    data_length = config_value(cfg.dataset.get("max_seq_len", None), "dataset.max_seq_len", int,
                               allow_none=True)
    if data_length is not None and data_length != length:
        raise ConfigError("dataset.max_seq_len", f"is {data_length} but the stage trains at "
                          f"long_context.max_seq_len={length}.",
                          "make them equal, e.g. `max_seq_len: ${long_context.max_seq_len}`.")
    source_theta = config_rope_base(model_config)
    theta = config_value(block.get("rope_base", None), "long_context.rope_base", float,
                         allow_none=True)
    theta = source_theta if theta is None else theta
    if not math.isfinite(theta) or theta <= 0:
        raise ConfigError("long_context.rope_base", f"must be a positive number, got {theta}.",
                          "ProLong uses 8e6 for 64K and 1.28e8 for 512K (Llama-3: 5e5 at 8K).")
    trained = config_value(block.get("trained_length", None), "long_context.trained_length", int,
                           minimum=1, allow_none=True)
    if trained is None:
        trained = int(model_config.get("max_position_embeddings") or 0)
    if trained < 1:
        raise ConfigError("long_context.trained_length", "is unknown: the checkpoint's "
                          "config.json has no max_position_embeddings.",
                          "set the longest length the model was trained at.")
    if length > trained and theta == source_theta:
        raise ConfigError(
            "long_context.rope_base",
            f"the stage trains at {length} tokens, longer than the {trained} the model was "
            f"trained at, with the same RoPE base θ={format_theta(source_theta)}: positions "
            f"beyond {trained} "
            "would rotate further than anything the model has seen.",
            f"raise rope_base for this stage (ProLong raised θ about {8e6 / 5e5:.0f}x for an 8x "
            f"longer context), or set trained_length if the model already handles {length}.")
    budget = config_value(block.get("token_budget", None), "long_context.token_budget", int,
                          allow_none=True)
    if budget is not None and budget < length:
        raise ConfigError("long_context.token_budget", f"{budget} tokens is less than one "
                          f"sequence of {length}.", "give at least one step's worth of tokens.")
    chunk = config_value(block.get("chunked_loss_tokens", None),
                         "long_context.chunked_loss_tokens", int, allow_none=True) or 0
    if chunk < 0:
        raise ConfigError("long_context.chunked_loss_tokens", f"must be >= 0, got {chunk}.",
                          "0 turns the chunked loss off.")
    attention = str(block.get("attention", "auto"))
    if attention not in ATTENTION_MODES:
        raise ConfigError("long_context.attention", f"unknown mode {attention!r}.",
                          "use auto (FlexAttention block masks where torchtune supports them, "
                          "per-document attention elsewhere), mask (an explicit SDPA mask) or "
                          "documents.")
    masking = block.get("document_masking", True)
    if not isinstance(masking, bool):
        raise ConfigError("long_context.document_masking", f"must be true or false, got "
                          f"{masking!r}.", "true masks attention by document (ProLong); false "
                          "trains each pack as one causal sequence (its ablation).")
    if not masking and attention != "auto":
        raise ConfigError("long_context.attention", f"is {attention!r}, a way of masking "
                          "documents, but document_masking is false: attention is plainly "
                          "causal over the whole pack.",
                          "leave attention at auto, or set document_masking: true.")
    previous = block.get("previous_stage", None)
    return Stage(max_seq_len=length, rope_base=theta, trained_length=trained,
                 source_rope_base=source_theta,
                 source_max_positions=int(model_config.get("max_position_embeddings") or trained),
                 token_budget=budget,
                 previous_stage=None if previous is None else str(previous),
                 chunked_loss_tokens=chunk, attention=attention, document_masking=masking,
                 rope_note=rope_change_note(model_config, theta))


def steps_for_budget(stage: Stage, *, batch_size: int, grad_accum: int, data_parallel: int,
                     ) -> int:
    """Optimizer steps that consume ``token_budget`` tokens (rounded up)."""
    per_step = stage.max_seq_len * batch_size * grad_accum * data_parallel
    return -(-int(stage.token_budget) // per_step)


def carry_optimizer_state(optimizer: torch.optim.Optimizer, previous: dict[str, Any],
                          ) -> dict[str, Any]:
    """The previous stage's optimizer state with this stage's hyperparameters (lr, betas, weight
    decay ...): the moments carry over, the schedule does not."""
    groups = previous.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups) or any(
            len(old["params"]) != len(new["params"])
            for old, new in zip(groups, optimizer.param_groups)):
        raise ConfigError("long_context.previous_stage", "its optimizer holds different "
                          "parameters than this stage's model.",
                          "continue from a stage of the same model (or set previous_stage: null "
                          "to start the optimizer afresh).")
    merged_groups = []
    for old, new in zip(groups, optimizer.param_groups):
        merged = {k: v for k, v in new.items() if k != "params"}
        merged["params"] = old["params"]
        merged_groups.append(merged)
    return {"state": previous["state"], "param_groups": merged_groups}


def optimizer_source(previous_stage: Path, weights_dir: Path) -> Path:
    """The checkpoint of ``previous_stage`` whose optimizer state this stage carries over: the
    one whose ``model/`` the stage's weights come from (``checkpointer.checkpoint_dir``), since
    Adam's moments belong to the weights they were accumulated on.

    Weights inside ``previous_stage`` must be the ``step_<N>/model`` of one of its finished
    checkpoints, and that checkpoint's state is taken (not the newest one's). Weights from
    elsewhere are refused, unless they are the newest checkpoint's ``model/`` under another
    path (a symlink). Raises ConfigError naming the key to change."""
    newest = latest_checkpoint(previous_stage)
    if newest is None:
        raise ConfigError("long_context.previous_stage", f"{previous_stage} holds no finished "
                          "checkpoint (step_<N>/ with recipe_state.pt).",
                          "run the previous stage first, or set previous_stage: null.")
    weights = weights_dir.resolve()
    root = previous_stage.resolve()
    newest_model = newest / MODEL_DIRNAME
    if weights.is_relative_to(root):
        parts = weights.relative_to(root).parts
        checkpoint = previous_stage / parts[0] if parts else previous_stage
        if (weights != (checkpoint / MODEL_DIRNAME).resolve()
                or not (checkpoint / RECIPE_STATE_FILENAME).is_file()):
            raise ConfigError("checkpointer.checkpoint_dir", f"{weights_dir} lies inside "
                              f"long_context.previous_stage ({previous_stage}) but is not the "
                              "model/ folder of one of its finished checkpoints (step_<N>/model "
                              "beside step_<N>/recipe_state.pt), so no optimizer state belongs "
                              "to these weights.",
                              f"point it at {newest_model} (the newest checkpoint's model).")
        return checkpoint
    if weights == newest_model.resolve():
        return newest
    raise ConfigError("long_context.previous_stage", f"the stage's weights "
                      f"(checkpointer.checkpoint_dir={weights_dir}) are not a checkpoint of "
                      f"{previous_stage}, whose optimizer moments belong to other weights.",
                      f"set checkpointer.checkpoint_dir={newest_model} (its newest checkpoint's "
                      "model), point previous_stage at the run that wrote the weights, or set "
                      "previous_stage: null to start the optimizer afresh.")


def write_stage_config(model_dir: Path, stage: Stage) -> None:
    """Record the stage's θ and length in a saved model's ``config.json``.

    The RoPE is written by the family layer in the config's own style (a ``rope_parameters``
    block stays one; Hub-style ``rope_theta`` + ``rope_scaling`` stay so), with any scaling
    kept around the new θ, as the stage's model computes it; the top-level ``rope_theta`` is
    always set too, for readers that look only there."""
    path = model_dir / "config.json"
    model_config = json.loads(path.read_text())
    try:
        rope = rope_settings_from_config(model_config)
    except KeyError as missing:  # the family layer refused this before training
        raise ConfigError("checkpointer.checkpoint_dir", f"{path}: {missing.args[0]} is "
                          "missing from the RoPE scaling block.") from None
    write_rope_settings(model_config, rope.with_theta(stage.rope_base))
    model_config["rope_theta"] = stage.rope_base
    model_config["max_position_embeddings"] = max(stage.max_seq_len, stage.source_max_positions)
    path.write_text(json.dumps(model_config, indent=2) + "\n")


def packing_report(dataset: Any) -> dict[str, Any]:
    """Packing efficiency (non-pad share of the positions) of every training source and of a
    drawn pack on average, as the data component measured it."""
    sources = {name: dataset.corpus.packs(name).stats for name in dataset.domain_names}
    weights = dict(zip(dataset.domain_names, (float(w) for w in dataset.weights)))
    return {"efficiency": sum(weights[n] * st.efficiency for n, st in sources.items()),
            "tokens_out": sum(st.tokens_out for st in sources.values()),
            "sources": {n: {"efficiency": st.efficiency, "tokens": st.tokens_out,
                            "drawn": weights[n]} for n, st in sources.items()}}


def uses_document_attention(mode: str, device: torch.device) -> bool:
    """Whether a stage masks documents by running attention per document (see
    training/document_attention): always for ``documents``, never for ``mask``, and for ``auto``
    wherever torchtune would fall back to an explicit SDPA mask (no FlexAttention)."""
    if mode == "auto":
        from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

        return not (_SUPPORTS_FLEX_ATTENTION and device.type == "cuda")
    return mode == "documents"


def batch_needs_mask(stage: Stage, device: torch.device) -> bool:
    """Whether the model reads a ``mask`` from the batch: with document masking, unless
    attention runs per document. The mask is then torchtune's: a FlexAttention ``BlockMask``
    where torchtune uses flex attention, else the dense ``[b, S, S]`` boolean (``attention:
    mask`` on hardware without it)."""
    return stage.document_masking and not uses_document_attention(stage.attention, device)


def sequence_parallel_degree(cfg: DictConfig, *, distributed: bool, world_size: int) -> int:
    """``sequence_parallel.degree`` (default 1), checked against the processes launched."""
    block = cfg.get("sequence_parallel", None) or {}
    unknown = sorted(set(block) - {"degree"})
    if unknown:
        raise ConfigError(f"sequence_parallel.{unknown[0]}", "is not a known key.",
                          "use only `degree`.")
    degree = block.get("degree", 1)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ConfigError("sequence_parallel.degree", f"is {degree!r}; it must be a positive "
                          "integer.", "set 1 to train without sequence parallelism.")
    if degree > 1 and not distributed:
        raise ConfigError("sequence_parallel.degree", f"is {degree}, but this is one process: "
                          "each shard of a sequence runs on its own rank.",
                          f"launch `tune run --nproc_per_node {degree} "
                          "acadlm_plugins/long_context_recipe ...` (or set degree: 1).")
    if world_size % degree:
        raise ConfigError("sequence_parallel.degree", f"{degree} does not divide the "
                          f"{world_size} processes.",
                          "launch a multiple of the degree (`--nproc_per_node`).")
    return degree


def check_sequence_parallel_lengths(cfg: DictConfig, stage: Stage, degree: int) -> None:
    """``degree`` must divide the stage length and, as validation splits its sequences the same
    way, the configured ``validation_dataset.max_seq_len``: checked before anything loads."""
    check_sequence_length(stage.max_seq_len, degree, field="long_context.max_seq_len")
    validation = cfg.get("validation_dataset", None) or {}
    length = config_value(validation.get("max_seq_len", None), "validation_dataset.max_seq_len",
                          int, minimum=1, allow_none=True)
    if length is not None:
        check_sequence_length(length, degree, field="validation_dataset.max_seq_len")


def check_sequence_parallel_config(model: torch.nn.Module, stage: Stage, degree: int, *,
                                   validation_length: int) -> None:
    """``degree`` must divide every layer's query and key-value heads, the stage length and the
    length of the validation packs (their builder's default when the config sets none)."""
    check_sequence_parallel(model, degree)
    check_sequence_length(stage.max_seq_len, degree, field="long_context.max_seq_len")
    check_sequence_length(validation_length, degree, field="validation_dataset.max_seq_len")


class LongContextRecipe(ContinuedPretrainRecipe):
    """A ProLong stage on the continued pre-training loop (see the module docstring)."""

    known_keys = ContinuedPretrainRecipe.known_keys | {"long_context", "sequence_parallel"}
    required_keys = (*[k for k in REQUIRED_KEYS if k != "max_steps"], "long_context")
    example_config = "configs/smollm2/long_context_stage1.yaml"
    resume_must_match = (*ContinuedPretrainRecipe.resume_must_match, "long_context")

    def __init__(self, cfg: DictConfig) -> None:
        self._stage = read_stage(cfg, source_model_config(cfg))
        check_checkpoint_files(cfg)
        if cfg.get("max_steps", None) is None:
            if self._stage.token_budget is None:
                raise ConfigError("long_context.token_budget", "is needed when max_steps is not "
                                  "set.", "give a token budget (or max_steps).")
            OmegaConf.update(cfg, "max_steps", 1, force_add=True)  # replaced once ranks are known
            derive_steps = True
        else:
            derive_steps = False
        super().__init__(cfg, recipe_name=RECIPE_NAME)
        self._sp_degree = sequence_parallel_degree(cfg, distributed=self._distributed,
                                                   world_size=self._world_size)
        # The ranks of one sequence-parallel group read the same batches.
        self._data_rank = self._rank // self._sp_degree
        self._data_world = self._world_size // self._sp_degree
        if derive_steps:
            self._max_steps = steps_for_budget(
                self._stage, batch_size=self._batch_size, grad_accum=self._grad_accum,
                data_parallel=self._data_world)
            OmegaConf.update(cfg, "max_steps", self._max_steps)
            self._save_every = step_interval(cfg, "save_every_n_steps", self._max_steps)
        self._validation_losses = self._sequence_losses
        self._document_attention: DocumentAttention | None = None
        self._needs_mask = True  # decided in setup, once the device is known
        self._sequence_parallel: UlyssesAttention | None = None

    def setup(self, cfg: DictConfig) -> None:
        resuming = latest_checkpoint(Path(cfg.output_dir)) is not None and str(
            cfg.get("resume", "auto")).lower() != "false"
        check_sequence_parallel_lengths(cfg, self._stage, self._sp_degree)
        carry_from = None
        if self._stage.previous_stage and not resuming:
            carry_from = optimizer_source(
                Path(self._stage.previous_stage).expanduser(),
                Path(str(cfg.checkpointer.checkpoint_dir)).expanduser())
        super().setup(cfg)
        if self._is_rank_zero:
            log.info("stage: %d tokens per sequence, RoPE base %g (checkpoint: %g, trained at "
                     "%d), %d steps of %d tokens, sequence-parallel degree %d",
                     self._stage.max_seq_len, self._stage.rope_base,
                     self._stage.source_rope_base, self._stage.trained_length, self._max_steps,
                     self._stage.max_seq_len * self._batch_size * self._grad_accum
                     * self._data_world, self._sp_degree)
            if self._stage.rope_note:
                log.info(self._stage.rope_note)
        self._history.setdefault("stage", asdict(self._stage))
        check_sequence_parallel_config(self._model, self._stage, self._sp_degree,
                                       validation_length=self._val_data.corpus.max_seq_len)
        self._needs_mask = batch_needs_mask(self._stage, self._device)
        if not self._stage.document_masking:
            if self._is_rank_zero:
                log.info("document_masking: false (ablation): each pack is one causal "
                         "sequence, positions 0..%d; dataset positions are not used",
                         self._stage.max_seq_len - 1)
        elif uses_document_attention(self._stage.attention, self._device):
            self._document_attention = DocumentAttention(self._model)
        if self._sp_degree > 1:
            # Wraps the attention call the document attention (if any) installed: the exchange
            # happens first, then each rank attends over whole documents with its heads.
            self._sequence_parallel = enable_ulysses(
                self._model, new_sequence_parallel_group(self._sp_degree))
        if carry_from is not None:
            self._carry_over_optimizer(carry_from)

    # ------------------------------------------------------------------- stage mechanics
    def _build_model(self, cfg: DictConfig) -> torch.nn.Module:
        length = max(self._stage.max_seq_len, self._stage.source_max_positions)
        try:
            return instantiate_component(cfg, "model", rope_base=self._stage.rope_base,
                                         max_seq_len=length)
        except TypeError as err:
            raise ConfigError(
                "model", f"its builder does not take rope_base and max_seq_len ({err}).",
                "build it from the checkpoint's config.json: `_component_: "
                "acadlm_plugins.models.decoder_from_hf_config` with `path: "
                "${checkpointer.checkpoint_dir}` (any supported family).") from err

    def _built_rope_base(self) -> float | None:
        return self._stage.rope_base

    def _check_data(self) -> None:
        # Validation may use other sources than training (held-out long documents, say); only
        # dynamic batch loading needs one validation split per training domain.
        block = self._cfg.get("dynamic_batch_loading", None)
        if block and block.get("enabled", False):
            super()._check_data()
        if self._train_data.corpus.max_seq_len != self._stage.max_seq_len:
            raise ConfigError("dataset.max_seq_len", f"the packs hold "
                              f"{self._train_data.corpus.max_seq_len} tokens, the stage "
                              f"{self._stage.max_seq_len}.", "make them equal.")

    def _carry_over_optimizer(self, checkpoint: Path) -> None:
        """Load the optimizer state of ``checkpoint`` (see :func:`optimizer_source`) with this
        stage's hyperparameters, its moments in the form this stage's optimizer updates."""
        path = checkpoint / RECIPE_STATE_FILENAME
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except UNREADABLE_STATE_ERRORS as err:
            raise ConfigError(
                "long_context.previous_stage", f"the optimizer state of the previous stage, "
                f"{path}, cannot be read ({type(err).__name__}: {err}).",
                "point `checkpointer.checkpoint_dir` at another step_*/model of the previous "
                "stage (its moments come from the same checkpoint), set "
                "`long_context.previous_stage: null` to start with fresh moments, or rerun the "
                "previous stage.") from err
        merged = carry_optimizer_state(self._optimizer, state["optimizer"])
        if self._distributed:
            training.load_from_full_optimizer_state_dict(
                self._model, self._optimizer, float_state_dict(merged), self._device)
        else:
            self._optimizer.load_state_dict(merged)
        # AdamW's moments into an AdamW8bit stage are quantized, AdamW8bit's into AdamW dequantized
        converted = match_loaded_states(self._optimizer)
        self._history["optimizer_state_from"] = str(checkpoint)
        if self._is_rank_zero:
            log.info("optimizer state carried over from %s (learning-rate schedule restarts; "
                     "%d moments converted to this optimizer's form)", checkpoint, converted)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        """The next training batch as the model reads it (plugins see the same), with a mask
        only if the model uses one (see :func:`batch_needs_mask`): per-document and unmasked
        attention get O(S) batches."""
        keys = self._sampler.next_batch()
        batch = collate_packs([self._train_data[key] for key in keys],
                              block_mask=self._needs_mask)
        return self._stage_batch({k: v.to(self._device) for k, v in batch.items()})

    def _token_losses(self, batch: dict[str, torch.Tensor],
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self._stage.chunked_loss_tokens or self._sequence_parallel is not None:
            losses, counted = self._sequence_losses(self._model, batch)
            return losses, counted, None
        batch = self._stage_batch(batch)
        logits = self._model(batch["tokens"], mask=self._attention_mask(batch),
                             input_pos=batch.get("input_pos"))
        losses, counted = shifted_token_losses(logits, batch["labels"])
        return losses, counted, logits

    def _sequence_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence loss sums and token counts, for training and validation alike (under
        sequence parallelism: of this rank's shard of every sequence)."""
        batch = self._stage_batch(batch)
        mask = self._attention_mask(batch)
        tokens, input_pos = batch["tokens"], batch.get("input_pos")
        if self._sequence_parallel is None:
            targets = shifted_targets(batch["labels"])
        else:
            shard = shard_batch(batch, self._sequence_parallel.rank, self._sp_degree)
            tokens, input_pos, targets = shard["tokens"], shard["input_pos"], shard["targets"]
        if self._stage.chunked_loss_tokens:
            return chunked_token_losses(model, tokens, targets, mask=mask, input_pos=input_pos,
                                        chunk_tokens=self._stage.chunked_loss_tokens)
        return target_token_losses(model(tokens, mask=mask, input_pos=input_pos), targets)

    def _eval_needs_mask(self) -> bool:
        """Validation batches follow the training batches: a mask only where the model reads
        one (see :func:`batch_needs_mask`)."""
        return self._needs_mask

    def _counted_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if self._sequence_parallel is None:
            return super()._counted_tokens(batch)
        shard = shard_batch(batch, self._sequence_parallel.rank, self._sp_degree)
        return int((shard["targets"] != -100).sum())

    def _stage_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` as this stage's attention reads it: one causal sequence per pack when
        document masking is off (validation batches included), else unchanged."""
        return batch if self._stage.document_masking else without_document_masking(batch)

    def _attention_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The mask to hand the model: none when per-document attention masks by itself, and
        none under sequence parallelism, whose handle holds the full sequence's mask."""
        mask = batch.get("mask")
        if self._document_attention is not None:
            self._document_attention.set_seq_lens(batch["seq_lens"])
            mask = None
        if self._sequence_parallel is not None:
            self._sequence_parallel.set_mask(mask)
            return None
        return mask

    def _write_model_dir(self, model_state: dict[str, torch.Tensor], folder: Path) -> None:
        super()._write_model_dir(model_state, folder)
        write_stage_config(folder, self._stage)

    def _summary(self, wall_seconds: float) -> dict[str, Any]:
        summary = super()._summary(wall_seconds)
        summary["stage"] = asdict(self._stage)
        summary["max_steps"] = self._max_steps
        summary["packing"] = packing_report(self._train_data)
        if self._is_rank_zero:
            (self._output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/long_context_recipe --config ...``."""
    runtime.run_recipe(cfg, LongContextRecipe, LongContextRecipe.train)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
