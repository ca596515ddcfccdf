"""Checks a training recipe makes before it does any work or writes anything, and the tidying it
does once they pass.

A run refused for a bad config must fail in seconds, name the key or file and the fix, and
leave an earlier run's ``output_dir`` exactly as it was; a run killed half-way must not leave
litter that a later run trips over.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from acadlm_plugins.defaults.paths import check_default_model_files, is_default_model_dir
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.config_checks import check_output_dir, config_value

log = logging.getLogger(__name__)

# What :func:`~acadlm_plugins.training.checkpointing.write_atomically` and
# :func:`~acadlm_plugins.training.checkpointing.write_checkpoint` leave behind when killed.
_PARTIAL_CHECKPOINT_GLOB = ".step_*.partial"
# Inside a checkpoint: the scratch folder of a quantized copy (quantization.write_quantized_copy)
_PARTIAL_COPY_GLOB = ".*.partial-*"
_TEMPORARY_FILE_GLOBS = ("tmp*.tmp", ".acadlm-*.tmp")


def output_dir_setting(cfg: DictConfig, key: str = "output_dir") -> Path:
    """``cfg[key]``, the run's folder, as a path, spelled as the config spells it (the
    ``${output_dir}`` interpolations of the checkpointer and metric logger read the same
    text); unset, null, empty or not a string is a :class:`ConfigError` naming ``key``,
    before anything is loaded or written."""
    value = cfg.get(key, None)
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"is {value!r}, not a folder path.",
                          f"set `{key}` to the folder this run writes (it is created if "
                          "missing).")
    return Path(value)


def positive_int(cfg: DictConfig, key: str, default: int | None = None) -> int:
    """``cfg[key]`` (``default`` when unset or null) as an integer of at least 1; anything else
    (0, a negative number, a fraction, a string) is a :class:`ConfigError` naming ``key``,
    raised before training rather than a division by zero in the middle of it."""
    value = cfg.get(key, None)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"is {value!r}, not a positive integer.",
                          f"set `{key}` to 1 or more.")
    return value


# The step intervals of the training loops and their defaults (None: the run's max_steps).
STEP_INTERVAL_DEFAULTS: dict[str, int | None] = {
    "log_every_n_steps": 1,
    "eval_every_n_steps": None,
    "save_every_n_steps": None,
    "keep_last_n_checkpoints": 2,
}


def step_interval(cfg: DictConfig, key: str, max_steps: int) -> int:
    """``cfg[key]``, one of :data:`STEP_INTERVAL_DEFAULTS`, as a positive integer: read the same
    way by the recipes and by ``acadlm-plan``, so the planner refuses what a run would."""
    default = STEP_INTERVAL_DEFAULTS[key]
    return positive_int(cfg, key, max_steps if default is None else default)


def clip_grad_norm(cfg: DictConfig) -> float | None:
    """``clip_grad_norm`` as a positive, finite number, or None (unset or null: no clipping).
    A negative maximum would flip every gradient (gradient ascent) and zero stop training."""
    value = config_value(cfg.get("clip_grad_norm", None), "clip_grad_norm", float, above=0,
                         allow_none=True)
    if value is not None and not math.isfinite(value):
        raise ConfigError("clip_grad_norm", f"is {value}, not a finite number.",
                          "set it to a positive number such as 1.0, or null for no clipping.")
    return value


def check_device(cfg: DictConfig) -> None:
    """Refuse a ``device`` the machine does not have: torchtune 0.6.1 falls back to the CPU
    without a word when ``device: cuda`` finds no GPU, and the run would take hours."""
    value = cfg.get("device", "cpu")
    if value is not None and not isinstance(value, str):
        raise ConfigError("device", f"is {value!r}, not a device name.",
                          "use `cpu`, `cuda` or `cuda:<index>`.")
    device = str(value or "cpu").lower()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"is {device!r}, but this machine has no CUDA device "
                          f"(torch {torch.__version__}, built with CUDA "
                          f"{torch.version.cuda or 'none'}).",
                          "set `device: cpu`, or run on a machine with a CUDA GPU.")
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ConfigError("device", f"is {device!r}, but only {torch.cuda.device_count()} "
                              "CUDA device(s) are visible.", "pick an index below that count.")


def check_log_dir(cfg: DictConfig, key: str = "metric_logger") -> None:
    """:func:`check_output_dir` for the metric logger's ``log_dir``, when it has one: torchtune's
    DiskLogger otherwise fails in its constructor and again, confusingly, when collected."""
    node = cfg.get(key, None)
    if isinstance(node, DictConfig) and node.get("log_dir", None) is not None:
        check_output_dir(Path(str(node.log_dir)).expanduser(), key=f"{key}.log_dir")


def check_checkpoint_source(cfg: DictConfig, key: str = "checkpointer") -> None:
    """The checkpointer's ``checkpoint_dir`` must exist and hold every ``checkpoint_files``
    entry, named in the error, instead of torchtune's bare FileNotFoundError after the model
    has been built."""
    node = cfg.get(key, None)
    if not isinstance(node, DictConfig) or node.get("checkpoint_dir", None) is None:
        return
    folder = Path(str(node.checkpoint_dir)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}.checkpoint_dir", f"{folder} is not a folder.",
                          "point it at the local folder of the model's weights (a Hugging Face "
                          "model folder), or build the embedded default with "
                          "`acadlm-defaults build`.")
    check_output_outside_checkpoint(cfg, key)
    if is_default_model_dir(folder):  # a truncated file: the rebuild command, not safetensors'
        check_default_model_files()
    files = node.get("checkpoint_files", None)
    if files is None or not hasattr(files, "__iter__") or isinstance(files, str):
        return  # torchtune's other forms (a filename format dict) are checked by torchtune
    missing = [str(name) for name in files if not (folder / str(name)).is_file()]
    if missing:
        if (folder / "model" / "config.json").is_file():  # a step_<N> folder of a training run
            raise ConfigError(f"{key}.checkpoint_dir", f"{folder} is a training checkpoint "
                              "(recipe state and a `model/` folder), not a model folder.",
                              f"point it at {folder / 'model'}, the model that step saved.")
        present = sorted(p.name for p in folder.iterdir() if p.suffix in
                         {".safetensors", ".bin", ".pt"} and p.name != "recipe_state.pt")
        raise ConfigError(f"{key}.checkpoint_files", f"{missing} not found in {folder} "
                          f"(weight files there: {present}).",
                          "list the weight files that folder holds.")


def check_output_outside_checkpoint(cfg: DictConfig, key: str = "checkpointer") -> None:
    """Refuse an ``output_dir`` that is the model folder or inside it, which torchtune's
    checkpointer refuses with a traceback once the model is loaded."""
    node = cfg.get(key, None)
    if not isinstance(node, DictConfig) or OmegaConf.is_missing(node, "checkpoint_dir") or \
            OmegaConf.is_missing(cfg, "output_dir") or node.get("checkpoint_dir", None) is None \
            or cfg.get("output_dir", None) is None:
        return
    check_output_outside(cfg.output_dir, node.checkpoint_dir, f"{key}.checkpoint_dir")


def check_output_outside(output_dir: str | Path, model_dir: str | Path, model_key: str) -> None:
    """Refuse an ``output_dir`` that is the folder of the model a run starts from (config key
    ``model_key``) or inside it: torchtune's checkpointer refuses it only once the model has
    loaded, and a run must not write into its own source."""
    folder = Path(str(model_dir)).expanduser().resolve()
    output = Path(str(output_dir)).expanduser().resolve()
    if output == folder or folder in output.parents:
        raise ConfigError("output_dir", f"{output} is {'' if output == folder else 'inside '}"
                          f"`{model_key}` ({folder}): a run must not write into the model it "
                          "starts from.", "choose an output_dir outside the model folder.")


def clean_interrupted_writes(output_dir: Path) -> list[Path]:
    """Remove what a killed run left half-written in ``output_dir`` (a hidden
    ``.step_N.partial`` checkpoint folder, the hidden scratch folder of a quantized copy inside
    a checkpoint, temporary files of atomic writes); complete checkpoints are never touched.
    Returns what was removed, which is also logged."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed: list[Path] = []
    for partial in sorted(output_dir.glob(_PARTIAL_CHECKPOINT_GLOB)):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    folders = [output_dir, *(p for p in output_dir.iterdir() if p.is_dir())]
    for folder in folders[1:]:  # a quantized copy of a checkpoint, killed half-way
        for partial in sorted(folder.glob(_PARTIAL_COPY_GLOB)):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
    for folder in folders:
        for pattern in _TEMPORARY_FILE_GLOBS:
            for leftover in sorted(folder.glob(pattern)):
                if leftover.is_file():
                    leftover.unlink()
                    removed.append(leftover)
    if removed:
        log.info("removed %d leftover(s) of an interrupted write in %s: %s", len(removed),
                 output_dir, ", ".join(p.name for p in removed))
    return removed


def check_model_family(cfg: DictConfig, key: str = "checkpointer", *, prefix: str = "") -> None:
    """An HF checkpoint folder must be of a family we build correctly (the error names the
    config.json field), and the checkpointer's ``model_type`` must be the one that converts
    its weights right: ``QWEN2`` on a Llama folder skips the q/k permutation and trains a
    model that loads and is silently wrong. ``prefix`` is where ``cfg`` sits in the run's
    config (``distillation.teacher.`` for a teacher), for the key the error names."""
    folder = _hf_checkpoint_folder(cfg, key)
    if folder is None or cfg[key].get("model_type", None) is None:
        return
    from acadlm_plugins.models.families import check_checkpointer_model_type

    check_checkpointer_model_type(folder, str(cfg[key].model_type),
                                  field=f"{prefix}{key}.model_type")


def check_model_returns_logits(model: torch.nn.Module, *, prefix: str = "") -> None:
    """Our recipes compute their losses from the model's logits: a model built with
    ``project_in_loss`` (for torchtune's stock recipes) returns hidden states instead."""
    if "unembed" in vars(model):
        raise ConfigError(f"{prefix}model.project_in_loss", "is for torchtune's stock recipes "
                          "(with LinearCrossEntropyLoss); this recipe computes its losses from "
                          "the model's logits.", "remove it (for long sequences this recipe's "
                          "own `long_context.chunked_loss_tokens` projects in chunks).")


def check_model_rope(cfg: DictConfig, model: torch.nn.Module, *, rope_base: float | None = None,
                     key: str = "checkpointer", prefix: str = "") -> None:
    """The built ``model`` must rotate positions as the checkpoint's config.json says (with
    ``rope_base`` as θ for a long-context stage): a builder of another family, θ or RoPE
    scaling loads the weights without complaint and trains another model (see
    ``HFModelSpec.check_built_rope``). Checked only for an HF checkpoint folder; the error
    names ``<prefix>model``. A tied config whose weights hold a different, trained
    ``lm_head.weight`` is refused here too (``families.check_tied_head``): the built model
    would drop that head, another silently different function of the same files."""
    folder = _hf_checkpoint_folder(cfg, key)
    if folder is None:
        return
    from acadlm_plugins._compat import hf_checkpoint_files
    from acadlm_plugins.models.families import check_tied_head, hf_model_spec

    spec = hf_model_spec(folder)
    spec.check_built_rope(model, rope_base=rope_base, field=f"{prefix}model")
    if spec.tie_word_embeddings:  # a trained untied head under a tied config is dropped
        check_tied_head(folder, hf_checkpoint_files(folder))


def _hf_checkpoint_folder(cfg: DictConfig, key: str) -> Path | None:
    """The checkpointer block ``cfg[key]``'s folder when it is a Hugging Face model folder
    (has a config.json); None otherwise (nothing of the family to check)."""
    node = cfg.get(key, None)
    if not isinstance(node, DictConfig) or node.get("checkpoint_dir", None) is None:
        return None
    folder = Path(str(node.checkpoint_dir)).expanduser()
    return folder if (folder / "config.json").is_file() else None
