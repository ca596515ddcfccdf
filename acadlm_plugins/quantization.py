"""Weight-only quantized copies of exported models (torchao), for inference.

A model folder our recipes export (a Hugging Face Llama folder) gets a sibling copy whose
linear weights are int8 (per output channel) or int4 (per group of input channels), made with
``torchao.quantization.quantize_``. The copy follows torchtune's own quantize recipe: the
quantized torchtune state dict is saved with ``torch.save`` (torchao's tensor types are not
safetensors-serializable), next to the source's config.json and tokenizer files and a
``quantization.json`` that records the scheme. Our lm-eval adapter (``--model acadlm``) and
:func:`load_quantized_decoder` load it; transformers does not.

Three ways to ask for a copy, all with the same scheme names:

* our recipes (continued pre-training, long-context, pruning): ``torchao.quantized_export`` in
  the config (the built-in torchao plugin, ``acadlm_plugins/plugins/torchao.py``);
* stock torchtune recipes: ``checkpointer._component_:
  acadlm_plugins.quantization.QuantizedExportCheckpointer`` with ``quantized_export: <scheme>``;
* any model folder: ``acadlm-quantize <folder> --scheme int8_weight_only``.

int4 weights are packed for the device that runs them: a copy made on CPU (the default) runs on
CPU only, in bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchtune import training

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.training.config_checks import check_output_dir

SCHEMES = ("int8_weight_only", "int4_weight_only")
QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "model_quantized.pt"
DEFAULT_GROUP_SIZE = 32
GROUP_SIZES = (32, 64, 128, 256)
#: torchao's CPU int4 layout packs output rows in blocks of 16 (and refuses other widths).
INT4_CPU_OUT_MULTIPLE = 16
DEVICE_TYPES = ("cpu", "cuda")  # int4 packing: Int4CPULayout on CPU, tinygemm's on CUDA
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def check_scheme(scheme: Any, *, field: str) -> str | None:
    """``scheme`` as a known scheme name, or None for "no quantized copy"; a ConfigError
    naming ``field`` otherwise."""
    if scheme is None or str(scheme).lower() in ("", "none", "null", "false"):
        return None
    if str(scheme) not in SCHEMES:
        raise ConfigError(field, f"unknown quantization scheme {scheme!r}.",
                          f"use one of {list(SCHEMES)}, or null for no quantized copy.")
    return str(scheme)


def check_group_size(group_size: Any, *, field: str) -> int:
    """The int4 group size (input channels sharing one scale), one of :data:`GROUP_SIZES`."""
    if group_size not in GROUP_SIZES:
        raise ConfigError(field, f"is {group_size!r}.", f"use one of {list(GROUP_SIZES)}.")
    return int(group_size)


def check_device(device: Any, *, field: str) -> torch.device:
    """``device`` as a torch device this process can put the copy on; a ConfigError naming
    ``field`` otherwise (a typo such as ``cdua``, a type we cannot pack int4 weights for, or
    CUDA on a build or machine without it), instead of torch's raw RuntimeError or
    ``AssertionError: Torch not compiled with CUDA enabled`` halfway through."""
    try:
        parsed = torch.device(str(device))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(field, f"{device!r} is not a device ({err}).",
                          f"use one of {list(DEVICE_TYPES)}, e.g. cuda or cuda:1.") from None
    if parsed.type not in DEVICE_TYPES:
        raise ConfigError(field, f"is {device!r}; quantized copies are made for "
                          f"{list(DEVICE_TYPES)} only.", "use cpu or cuda.")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError(field, f"is {device!r}, but CUDA is not available in this "
                              f"process (torch {torch.__version__}, CUDA build: "
                              f"{torch.version.cuda or 'no'}).",
                              "make the copy on a machine with a CUDA GPU and torch's CUDA "
                              "build, or use --device cpu (a CPU copy runs on CPU only).")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(field, f"is {device!r}, but this machine has {count} CUDA "
                              "device(s).", f"use cuda:0 ... cuda:{count - 1}.")
    return parsed


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``(input width, output width)`` of every ``nn.Linear`` of ``model``, by name
    (activation-checkpoint wrappers left out of the names): what an int4 copy must fit."""
    return {name.replace("._checkpoint_wrapped_module", ""): (module.in_features,
                                                              module.out_features)
            for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def int4_skips(in_features: int, out_features: int, group_size: int, *,
               cpu_layout: bool) -> bool:
    """Whether an int4 copy leaves a linear layer of this shape unquantized: its input width is
    not a multiple of ``group_size`` (torchao skips it), or, for a copy run on the CPU, its
    output width is not a multiple of 16 (torchao's CPU int4 packing refuses it; we skip it)."""
    return bool(in_features % group_size or (cpu_layout and out_features % INT4_CPU_OUT_MULTIPLE))


def check_int4_fit(shapes: Mapping[str, tuple[int, int]], group_size: int, *, field: str,
                   model: str = "model", cpu_layout: bool = True) -> list[str]:
    """The linear layers (of ``shapes``, name to ``(in, out)`` widths) an int4 copy with
    ``group_size`` leaves unquantized (:func:`int4_skips`). A ConfigError naming ``field`` when
    that is every layer, so that a recipe can refuse before training rather than fail at the
    export after it."""
    skipped = sorted(name for name, (width, out) in shapes.items()
                     if int4_skips(width, out, group_size, cpu_layout=cpu_layout))
    if shapes and len(skipped) == len(shapes):
        widths = sorted({width for width, _ in shapes.values()})
        fits = [size for size in GROUP_SIZES if any(w % size == 0 for w in widths)]
        if group_size in fits:  # the group size fits; the CPU layout's output widths do not
            raise ConfigError(field, f"fits, but no linear layer of the {model} has an output "
                              f"width that is a multiple of {INT4_CPU_OUT_MULTIPLE}, which "
                              "torchao's CPU int4 layout needs: the int4_weight_only copy "
                              "would quantize nothing.", "use int8_weight_only, or quantize "
                              "for a GPU (acadlm-quantize --device cuda).")
        fix = (f"use a group size that divides some of them ({fits})" if fits else
               "no int4 group size divides them")
        raise ConfigError(field, f"is {group_size}, but no linear layer of the {model} has an "
                          f"input width that is a multiple of it (widths {widths}): the "
                          "int4_weight_only copy would quantize nothing.",
                          f"{fix}, or use int8_weight_only.")
    return skipped


def scheme_dtype(scheme: str) -> torch.dtype:
    """The activation dtype a quantized copy runs in (torchao's int4 kernels need bfloat16)."""
    return torch.bfloat16 if scheme == "int4_weight_only" else torch.float32


def torchao_config(scheme: str, *, device: torch.device, group_size: int = DEFAULT_GROUP_SIZE):
    """The ``torchao.quantization`` config of ``scheme`` for weights that will run on ``device``.

    int4 uses the config's version 1 (``AffineQuantizedTensor`` with a device layout), which
    our loader and copies expect; the ``version`` field exists from torchao 0.13 (the lower
    bound in pyproject.toml), and 0.14 makes version 2 the default (hence the ``<0.14`` cap)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if device.type == "cpu":
        from torchao.dtypes import Int4CPULayout

        return Int4WeightOnlyConfig(group_size=group_size, layout=Int4CPULayout(), version=1)
    return Int4WeightOnlyConfig(group_size=group_size, version=1)


def _is_quantized(weight: torch.Tensor) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def quantize_decoder(model: torch.nn.Module, scheme: str, *, device: torch.device,
                     group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, Any]:
    """Quantize every ``nn.Linear`` weight of ``model`` in place; which were and which were not.

    A weight whose shape does not fit the scheme is left as it is (int4 needs the input width
    to be a multiple of ``group_size``, and on the CPU the output width a multiple of 16, see
    :func:`int4_skips`); those are listed under ``skipped``.
    """
    from torchao.quantization import quantize_

    cpu_int4 = scheme == "int4_weight_only" and device.type == "cpu"

    def fits(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not (cpu_int4 and int4_skips(
            module.in_features, module.out_features, group_size, cpu_layout=True))

    quantize_(model, torchao_config(scheme, device=device, group_size=group_size),
              filter_fn=fits)
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear)}
    quantized = [name for name, module in linears.items() if _is_quantized(module.weight)]
    return {"quantized": len(quantized),
            "skipped": sorted(set(linears) - set(quantized))}


def is_quantized_copy(folder: Path) -> bool:
    """Whether ``folder`` is a copy written by :func:`write_quantized_copy`."""
    return (Path(folder) / QUANTIZATION_FILE).is_file()


def _weights_bytes(folder: Path) -> int:
    from acadlm_plugins._compat import hf_checkpoint_files

    return sum((folder / name).stat().st_size for name in hf_checkpoint_files(folder))


def default_destination(model_dir: Path, scheme: str) -> Path:
    """``<model_dir>-<scheme>``, next to the source folder."""
    return model_dir.parent / f"{model_dir.name}-{scheme}"


def check_destination(final: Path, source: Path, scheme: str, *, field: str) -> None:
    """Refuse a destination where writing the copy would destroy something: the source folder
    or a folder holding it, an existing file, or a non-empty folder that is not a copy this
    module wrote (only such a copy is replaced). ``field`` names the setting that chose
    ``final`` (``--output``, or the scheme field for the default destination)."""
    if final == source or final in source.parents:
        raise ConfigError(field, f"{final} is the model folder {source} or a folder holding it; "
                          "the copy replaces its destination, which would delete the source "
                          "weights.", f"write the copy to a new folder outside the model "
                          f"folder, e.g. {default_destination(source, scheme)} (the default).")
    if final.exists() and not final.is_dir():
        raise ConfigError(field, f"{final} is an existing file, not a folder.",
                          "move it away, or write the copy to a new folder.")
    check_output_dir(final, field)  # a parent that is a file, or not writable: before the load
    if final.is_dir() and any(final.iterdir()) and not is_quantized_copy(final):
        raise ConfigError(field, f"{final} already exists and is not a quantized copy (it has "
                          f"no {QUANTIZATION_FILE}); the copy replaces its destination, which "
                          "would delete what is in it.",
                          "move that folder away, or write the copy to a new folder.")


def write_quantized_copy(model_dir: Path | str, scheme: str, *, dest: Path | str | None = None,
                         group_size: int = DEFAULT_GROUP_SIZE, device: str = "cpu",
                         field: str = "quantized_export", dest_field: str | None = None,
                         source_field: str | None = None, device_field: str = "device") -> Path:
    """Write a ``scheme`` copy of the model folder ``model_dir``; returns its folder.

    The folder appears complete or not at all (written under a temporary name, then renamed).
    ``dest`` (default ``<model_dir>-<scheme>``) may be new, empty, or an older quantized copy,
    which is replaced; anything else there is refused before any work
    (:func:`check_destination`, naming ``dest_field``, by default ``field``). A ``model_dir``
    that is missing or already a quantized copy is refused naming ``source_field`` (by default
    ``field``), a ``device`` this process cannot use naming ``device_field``.
    """
    from acadlm_plugins.models import hf_model_spec

    scheme = check_scheme(scheme, field=field)
    if scheme is None:
        raise ConfigError(field, "is empty.", f"name a scheme: {list(SCHEMES)}.")
    group_size = check_group_size(group_size, field=f"{field} group_size")
    target = check_device(device, field=device_field)
    source = Path(model_dir).expanduser().resolve()
    if not (source / "config.json").is_file():
        raise ConfigError(source_field or field, f"{source} is not a model folder (no "
                          "config.json there).", "point it at a Hugging Face model folder.")
    if is_quantized_copy(source):
        raise ConfigError(source_field or field, f"{source} is already a quantized copy.",
                          "quantize the unquantized model folder it was made from.")
    final = Path(dest).expanduser().resolve() if dest else default_destination(source, scheme)
    check_destination(final, source, scheme, field=dest_field or field)
    try:  # before the load and quantization, which take minutes
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(dest_field or field, f"the folder for {final} cannot be created "
                          f"({err}).", "write the copy to a folder you can create.") from err
    dtype = scheme_dtype(scheme)
    try:
        model = hf_model_spec(source).load(max_seq_len=None, device=target, dtype=dtype)
    except ConfigError as error:  # named after the recipes' key; here it is the model folder
        raise ConfigError(source_field or field, f"{source}: {error.problem}", error.fix
                          ) from error
    model.requires_grad_(False)
    report = quantize_decoder(model, scheme, device=target, group_size=group_size)
    if not report["quantized"]:
        raise ConfigError(field, f"{scheme} could not quantize any linear layer of {source} "
                          f"(skipped: {report['skipped'][:4]}...).",
                          f"use int8_weight_only, or a group size that divides the layers' "
                          f"input widths (one of {list(GROUP_SIZES)}).")

    # a fresh scratch folder of our own beside the destination (same file system, so the last
    # step is a rename); nothing that was there before is touched until the copy is complete
    scratch = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:12]}")
    scratch.mkdir()
    try:
        for item in source.iterdir():
            if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and not item.name.endswith(
                    ".index.json"):
                shutil.copy2(item, scratch / item.name)
        torch.save(model.state_dict(), scratch / WEIGHTS_FILE)
        import torchao

        meta = {"scheme": scheme,
                "group_size": group_size if scheme.startswith("int4") else None,
                "dtype": str(dtype).removeprefix("torch."), "device": target.type,
                "torchao": torchao.__version__, "source": str(source),
                "source_weight_bytes": _weights_bytes(source),
                "weight_bytes": (scratch / WEIGHTS_FILE).stat().st_size,
                "quantized_linears": report["quantized"], "skipped_linears": report["skipped"]}
        (scratch / QUANTIZATION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        # what appeared at the destination meanwhile must still be ours to replace
        check_destination(final, source, scheme, field=dest_field or field)
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def read_quantization(folder: Path) -> dict[str, Any]:
    """The ``quantization.json`` of a quantized copy."""
    return json.loads((Path(folder) / QUANTIZATION_FILE).read_text())


def load_quantized_decoder(model_dir: Path, *, max_seq_len: int | None,
                           device: torch.device) -> torch.nn.Module:
    """The torchtune decoder of a quantized copy, in eval mode, in the dtype it was made for.

    The weights file holds pickled torchao tensors, so it is loaded with ``weights_only=False``:
    load only copies you made yourself.
    """
    from acadlm_plugins.models.llama import empty_llama_from_hf_config

    meta = read_quantization(model_dir)
    if meta.get("device", "cpu") != device.type and meta["scheme"].startswith("int4"):
        raise ConfigError("--model_args device", f"{model_dir} holds int4 weights packed for "
                          f"{meta['device']}, not {device.type}.",
                          f"evaluate it on {meta['device']}, or make a copy for {device.type} "
                          f"(`acadlm-quantize <source> --scheme {meta['scheme']} --device "
                          f"{device.type}`).")
    model = empty_llama_from_hf_config(str(model_dir), max_seq_len=max_seq_len, device=device,
                                       dtype=getattr(torch, meta["dtype"]))
    state = torch.load(model_dir / WEIGHTS_FILE, map_location=device, weights_only=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError("--model_args pretrained", f"{model_dir}: the quantized weights do "
                          f"not fit its config.json (missing {missing}, unexpected {unexpected}).",
                          "make the copy again from its source folder.")
    model.eval().requires_grad_(False)
    return model


class QuantizedExportCheckpointer(training.FullModelHFCheckpointer):
    """torchtune's ``FullModelHFCheckpointer`` that also writes a quantized copy of every final
    (non-intermediate) checkpoint: ``<output_dir>/epoch_<N>-<scheme>``. For stock recipes::

        checkpointer:
          _component_: acadlm_plugins.quantization.QuantizedExportCheckpointer
          quantized_export: int8_weight_only     # or int4_weight_only; null: none
          ...                                    # FullModelHFCheckpointer's own arguments
    """

    def __init__(self, *args: Any, quantized_export: str | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE, **kwargs: Any) -> None:
        self.quantized_export = check_scheme(quantized_export,
                                             field="checkpointer.quantized_export")
        self.group_size = check_group_size(group_size, field="checkpointer.group_size")
        super().__init__(*args, **kwargs)
        self.quantized_copies: list[Path] = []

    def save_checkpoint(self, state_dict: dict[str, Any], epoch: int,
                        intermediate_checkpoint: bool = False, adapter_only: bool = False,
                        ) -> None:
        super().save_checkpoint(state_dict, epoch, intermediate_checkpoint=intermediate_checkpoint,
                                adapter_only=adapter_only)
        if self.quantized_export and not intermediate_checkpoint and not adapter_only:
            source = Path(self._output_dir) / f"epoch_{epoch}"
            self.quantized_copies.append(write_quantized_copy(
                source, self.quantized_export, group_size=self.group_size,
                field="checkpointer.quantized_export"))


def main(argv: Sequence[str] | None = None) -> int:
    """``acadlm-quantize MODEL_DIR --scheme SCHEME``: write a quantized copy of a model folder;
    exits 2 with the field and the fix on a user error."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--output", type=Path, default=None,
                        help="destination folder (default: <model_dir>-<scheme>)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                        help="int4: input channels per scale")
    parser.add_argument("--device", default="cpu", help="where the copy will run (int4 packing)")
    args = parser.parse_args(argv)
    try:
        dest = write_quantized_copy(args.model_dir, args.scheme, dest=args.output,
                                    group_size=args.group_size, device=args.device,
                                    field="--scheme",
                                    dest_field="--output" if args.output else "--scheme",
                                    source_field="model_dir", device_field="--device")
    except AcadlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = read_quantization(dest)
    skipped = list(meta.get("skipped_linears") or [])
    print(f"{dest}: {meta['scheme']}, {meta['quantized_linears']} linear layers quantized, "
          f"weights {meta['source_weight_bytes'] / 2**20:.1f} MiB -> "
          f"{meta['weight_bytes'] / 2**20:.1f} MiB (the rest of the copy in "
          f"{meta.get('dtype', 'its dtype')})")
    if skipped:
        total = len(skipped) + int(meta["quantized_linears"])
        print(f"warning: {len(skipped)} of {total} linear layers kept unquantized, as their "
              f"shapes do not fit {meta['scheme']} (e.g. {', '.join(skipped[:3])}); all are "
              f"listed in {dest / QUANTIZATION_FILE}", file=sys.stderr)
    return 0


__all__ = ["QUANTIZATION_FILE", "SCHEMES", "QuantizedExportCheckpointer", "check_device",
           "check_int4_fit", "check_scheme", "int4_skips", "is_quantized_copy", "linear_shapes",
           "load_quantized_decoder", "quantize_decoder", "write_quantized_copy"]
