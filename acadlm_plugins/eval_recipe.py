"""Evaluation with lm-eval's Python API: our long-context tasks (or any lm-eval task) on a
checkpoint from our recipes, through the ``acadlm`` adapter or lm-eval's own ``hf`` model.

Run::

    tune run acadlm_plugins/eval_recipe --config configs/smollm2/eval_long_context.yaml
    tune run acadlm_plugins/eval_recipe --config ... model.args.pretrained=outputs/x/pruned_model

torchtune's own ``eleuther_eval`` recipe pins lm-eval <= 0.4.8, whose task system cannot build
prompts sized to a length at run time; this recipe calls lm-eval 0.4.13 directly. It writes
``results.json`` (lm-eval's dictionary), per-task samples, and the task x length table and
heatmap into ``output_dir``. With ``use_cache`` set, an interrupted run re-uses the answers it
already has; the cache is kept per model (``<use_cache>_<model fingerprint>_rank0.db``), since
lm-eval's own cache knows the requests but not the model that answered them.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.answer_cache import model_cache_path
from acadlm_plugins.evaluation.lengths import parse_lengths
from acadlm_plugins.training.config_checks import (
    SEED_MAX,
    check_output_dir,
    config_value,
    reject_unknown_keys,
)
from acadlm_plugins.training.run_checks import output_dir_setting

log = utils.get_logger("INFO")

KNOWN_KEYS = {
    "output_dir", "model", "tasks", "lengths", "num_samples", "seed", "task_metadata", "limit",
    "apply_chat_template", "system_instruction", "log_samples", "gen_kwargs", "use_cache",
    "num_fewshot",
}
MODEL_NAMES = ("acadlm", "hf")
#: The eval config's switches, with their defaults: each must be true or false (a YAML boolean),
#: never a string such as "false", which ``bool()`` would read as true.
FLAGS = {"apply_chat_template": False, "log_samples": True}


def check_config(cfg: DictConfig) -> None:
    """Refuse unknown keys, missing essentials and values of the wrong type (each named with
    its fix) before anything is loaded or written."""
    reject_unknown_keys(cfg, KNOWN_KEYS, recipe="eval")
    for key in ("output_dir", "model", "tasks"):
        if key not in cfg:
            raise ConfigError(key, "is required by the eval recipe.",
                              "see configs/smollm2/eval_long_context.yaml.")
    output_folder(cfg)
    model_settings(cfg)
    name = cfg.model.get("name", "acadlm")
    if name not in MODEL_NAMES:
        raise ConfigError("model.name", f"{name!r} is not supported here.",
                          f"use one of {list(MODEL_NAMES)} (other lm-eval models: lm_eval CLI).")
    pretrained = cfg.model.args.get("pretrained")
    if not pretrained or not Path(str(pretrained)).expanduser().is_dir():
        raise ConfigError("model.args.pretrained", f"{pretrained!r} is not a local model folder.",
                          "point it at an exported checkpoint (config.json, *.safetensors, "
                          "tokenizer.json), e.g. outputs/.../pruned_model.")
    tasks = task_names(cfg)
    if not tasks:
        raise ConfigError("tasks", "is empty.", "name at least one task, e.g. [acadlm_long].")
    check_task_names(tasks)
    run_settings(cfg)
    lm_eval_settings(cfg)
    extra_task_metadata(cfg)
    use_cache = cfg.get("use_cache")
    if use_cache is not None and not isinstance(use_cache, str):
        raise ConfigError("use_cache", f"is {use_cache!r}, not a path.",
                          "give a path prefix for the answer cache, e.g. "
                          "${output_dir}/lm_cache, or null for none.")
    if use_cache:
        try:  # lm-eval makes the cache's folder mid-run: a file in its way is a traceback there
            check_output_dir(Path(use_cache).parent, key="use_cache")
        except ConfigError as error:
            raise ConfigError("use_cache", error.problem,
                              "give a path prefix under a folder that exists or can be made, "
                              "e.g. ${output_dir}/lm_cache, or null for none.") from None


def output_folder(cfg: DictConfig) -> Path:
    """``output_dir`` as a folder that exists or can be made, or a :class:`ConfigError` naming
    it (:func:`output_dir_setting`, :func:`check_output_dir`), checked before anything runs, so
    a refused run leaves a file there intact. Spelled as the config spells it, as the
    ``${output_dir}`` interpolations (``use_cache``) read it."""
    path = output_dir_setting(cfg)
    check_output_dir(path)
    return path


def model_settings(cfg: DictConfig) -> dict[str, Any]:
    """``model`` and ``model.args`` as mappings, and the args the recipe itself reads, checked:
    ``batch_size`` (a positive integer, ``auto`` or ``auto:N``; default 1), ``max_batch_size``
    (a positive integer or unset) and ``device`` (a name such as ``cpu`` or ``cuda:0``; default
    ``cpu``), or a :class:`ConfigError` naming the key."""
    model = cfg.get("model")
    if not OmegaConf.is_dict(model):
        raise ConfigError("model", f"is {model!r}, not a mapping.",
                          "give the model as a block: model: {name: acadlm, args: {pretrained: "
                          "<model folder>}}.")
    args = model.get("args")
    if not OmegaConf.is_dict(args):
        raise ConfigError("model.args", f"is {args!r}, not a mapping.",
                          "give the model's args as a block, e.g. model.args={pretrained: "
                          "<model folder>, batch_size: 1, device: cpu}.")
    batch_size = args.get("batch_size", 1)
    batch_size = 1 if batch_size is None else batch_size
    text = "" if isinstance(batch_size, bool) else str(batch_size).strip()
    name, _, parts = text.partition(":")
    if text.isdigit() and int(text) >= 1:
        batch_size = int(text)
    elif not (name == "auto" and (not parts or (parts.isdigit() and int(parts) >= 1))):
        raise ConfigError("model.args.batch_size", f"is {batch_size!r}, not a batch size.",
                          "give a positive integer, auto or auto:N.")
    else:
        batch_size = text
    settings: dict[str, Any] = {"batch_size": batch_size}
    if "max_batch_size" in args:
        settings["max_batch_size"] = config_value(
            args.max_batch_size, "model.args.max_batch_size", int, minimum=1, allow_none=True)
    device = args.get("device", "cpu")
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise ConfigError("model.args.device", f"is {device!r}, not a device name.",
                          "give a device such as cpu, cuda or cuda:0.")
    settings["device"] = device
    return settings


def task_names(cfg: DictConfig) -> list[Any]:
    """``tasks`` as a list: the config's list, or a comma-separated string (``tasks=a,b`` or
    ``tasks=acadlm_long`` on the command line, as lm-eval's ``--tasks``) split into names."""
    tasks = cfg.tasks
    if isinstance(tasks, str):
        return [name.strip() for name in tasks.split(",") if name.strip()]
    if OmegaConf.is_list(tasks) or isinstance(tasks, (list, tuple)):
        return list(tasks)
    raise ConfigError("tasks", f"is {tasks!r}, not a list of task names.",
                      "give task names, e.g. tasks=[acadlm_niah_single_2,acadlm_rag].")


def check_task_names(tasks: list[Any]) -> None:
    """Refuse a task name that lm-eval would not find (a ``KeyError`` once the model is loaded),
    with the closest known names. Our tasks are looked up first (quick); only a name that is not
    one of ours indexes lm-eval's own thousands of tasks. A path to an existing file (a task's
    YAML) and an inline task config (a mapping) are left to lm-eval."""
    from acadlm_plugins.evaluation import task_manager

    names = [str(name) for name in tasks if not OmegaConf.is_config(name)
             and not isinstance(name, dict)]
    names = [name for name in names if not Path(name).expanduser().is_file()]
    ours = set(task_manager(include_defaults=False).all_tasks)
    if all(name in ours for name in names):
        return
    known = task_manager().all_tasks
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError("tasks", f"unknown task {name!r}: neither our tasks nor lm-eval's "
                              f"have that name.{hint}",
                              "use a task, group or tag name from `acadlm-lm-eval ls tasks` "
                              "(ours start with acadlm_; see docs/evaluation.md), or the path "
                              "of a task YAML file.")


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """``lengths``, ``num_samples`` and ``seed`` of the config, checked: ``max_seq_lengths``
    (sorted token counts; a list, one length or a "1k,2k" string), ``num_samples`` (None: each
    task's default) and ``seed`` (default 1234), or a :class:`ConfigError` naming the key."""
    settings: dict[str, Any] = {}
    if cfg.get("lengths") is not None:
        lengths = cfg.lengths
        if OmegaConf.is_config(lengths):
            lengths = OmegaConf.to_container(lengths, resolve=True)
        if isinstance(lengths, (dict, bool)):
            raise ConfigError("lengths", f"is {lengths!r}, not a list of token counts.",
                              "give lengths in tokens, e.g. lengths=[1024,4096] or \"1k,4k\".")
        try:
            settings["max_seq_lengths"] = parse_lengths(lengths, task="eval")
        except ConfigError as error:
            # parse_lengths names the tasks' metadata field; here the key is `lengths`.
            problem = str(error).split("`: ", 1)[-1].split(" Fix: ")[0]
            raise ConfigError("lengths", problem, "give lengths of 256 tokens or more, e.g. "
                              "lengths=[1024,4096] or \"1k,4k\".") from None
    settings["num_samples"] = config_value(cfg.get("num_samples"), "num_samples", int, minimum=1,
                                           allow_none=True)
    settings["seed"] = config_value(cfg.get("seed", 1234), "seed", int, minimum=0)
    if settings["seed"] > SEED_MAX:  # numpy's seed, which lm-eval sets, must fit 32 bits
        raise ConfigError("seed", f"is {cfg.seed!r}, above its maximum {SEED_MAX}.",
                          f"set `seed` to an integer in [0, {SEED_MAX}].")
    return settings


def flag(cfg: DictConfig, key: str) -> bool:
    """The switch ``key`` of :data:`FLAGS` (its default when absent): a real boolean, or a
    :class:`ConfigError` naming ``key``. A string is refused, "false" included: ``bool("false")``
    is True, and a quoted value is a typo to fix, not a guess to make."""
    value = cfg.get(key, FLAGS[key])
    if not isinstance(value, bool):
        raise ConfigError(key, f"is {value!r}, not true or false.",
                          f"set `{key}` to true or false, unquoted (`{key}=false` on the "
                          "command line).")
    return value


def lm_eval_settings(cfg: DictConfig) -> dict[str, Any]:
    """What the recipe passes to lm-eval, checked: ``limit`` is a count of documents per task (a
    whole number above 1) or a fraction in (0, 1]; ``num_fewshot`` a count of 0 or more; either
    may be unset (None); ``log_samples`` and ``apply_chat_template`` true or false;
    ``system_instruction`` text or unset; ``gen_kwargs`` a mapping, a ``key=value,...`` string
    or unset. Anything else is a :class:`ConfigError` naming the key."""
    limit = config_value(cfg.get("limit"), "limit", float, above=0, allow_none=True)
    if limit is not None and limit > 1:
        limit = config_value(cfg.get("limit"), "limit", int)  # a count: a whole number
    return {"limit": limit,
            "num_fewshot": config_value(cfg.get("num_fewshot"), "num_fewshot", int, minimum=0,
                                        allow_none=True),
            "log_samples": flag(cfg, "log_samples"),
            "apply_chat_template": flag(cfg, "apply_chat_template"),
            "system_instruction": system_instruction(cfg),
            "gen_kwargs": gen_kwargs(cfg)}


def system_instruction(cfg: DictConfig) -> str | None:
    """``system_instruction`` as text (None when unset or empty), or a :class:`ConfigError`."""
    value = cfg.get("system_instruction")
    if value is not None and not isinstance(value, str):
        raise ConfigError("system_instruction", f"is {value!r}, not text.",
                          'give the instruction as a string, e.g. "Answer briefly.", or null '
                          "for none.")
    return value or None


def gen_kwargs(cfg: DictConfig) -> dict[str, Any] | str | None:
    """``gen_kwargs`` as lm-eval takes it: a plain dict, a ``key=value,...`` string (lm-eval's
    ``--gen_kwargs``; each item must have its ``=``) or None, or a :class:`ConfigError`."""
    value = cfg.get("gen_kwargs")
    fix = ("give generation settings as key=value pairs, e.g. gen_kwargs=\"max_gen_toks=64,"
           "temperature=0\" or gen_kwargs={max_gen_toks: 64}, or null for the tasks' own.")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if OmegaConf.is_dict(value):
        return OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, str):
        raise ConfigError("gen_kwargs", f"is {value!r}, not key=value settings.", fix)
    for item in filter(str.strip, value.split(",")):
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError("gen_kwargs", f"has {item.strip()!r}, not a key=value pair.",
                              fix)
    return value


def extra_task_metadata(cfg: DictConfig) -> dict[str, Any]:
    """``task_metadata`` as a plain dict ({} when unset), or a :class:`ConfigError` naming it."""
    extra = cfg.get("task_metadata")
    if extra is None:
        return {}
    if not OmegaConf.is_dict(extra):
        raise ConfigError("task_metadata", f"is {extra!r}, not a mapping.",
                          "give extra task settings as a mapping, e.g. "
                          "task_metadata={haystack_path: my_texts/}, or {} for none.")
    return OmegaConf.to_container(extra, resolve=True)


def task_metadata(cfg: DictConfig, model_args: dict[str, Any]) -> dict[str, Any]:
    """What every task sees: the model args (for its tokenizer), lengths, samples, seed, whether
    the run applies a chat template and its system instruction (our tasks lay out and size their
    prompts for them), extras."""
    metadata = dict(model_args)
    if flag(cfg, "apply_chat_template"):
        metadata["apply_chat_template"] = True
    instruction = system_instruction(cfg)
    if instruction:
        metadata["system_instruction"] = instruction
    metadata.update({key: value for key, value in run_settings(cfg).items() if value is not None})
    metadata.update(extra_task_metadata(cfg))
    return metadata


def _atomic_json(path: Path, payload: Any) -> None:
    from lm_eval.utils import handle_non_serializable

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=handle_non_serializable) + "\n")
    os.replace(tmp, path)


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, print lm-eval's tables and ours, write results into ``output_dir``."""
    check_config(cfg)
    import lm_eval
    from lm_eval.utils import make_table

    from acadlm_plugins.evaluation import task_manager
    from acadlm_plugins.evaluation.registry import register_lm_eval_model
    from acadlm_plugins.evaluation.report import length_table, write_report

    register_lm_eval_model()
    output_dir = output_folder(cfg)
    model_args = OmegaConf.to_container(cfg.model.args, resolve=True)
    model_args["pretrained"] = str(Path(model_args["pretrained"]).expanduser())
    # simple_evaluate passes batch size and device to the model itself; keep them out of the args.
    checked = model_settings(cfg)
    for key in ("batch_size", "device", "max_batch_size"):
        model_args.pop(key, None)
    batch_size, device = checked["batch_size"], checked["device"]
    if checked.get("max_batch_size") is not None:  # unset: the model's own default
        model_args["max_batch_size"] = checked["max_batch_size"]
    metadata = task_metadata(cfg, model_args)
    seed = metadata["seed"]
    model_name = cfg.model.get("name", "acadlm")
    # lm-eval keys cached answers by the request only: without the model in the path, another
    # checkpoint evaluated with the same `use_cache` would get this one's answers.
    use_cache = model_cache_path(cfg.get("use_cache"), model_name, model_args, device)
    if use_cache:
        log.info("Answer cache of this model: %s_rank*.db (use_cache %s, keyed by the model's "
                 "files and args)", use_cache, cfg.use_cache)
    settings = lm_eval_settings(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=model_name,
        model_args=model_args,
        tasks=task_names(cfg),
        num_fewshot=settings["num_fewshot"],
        batch_size=batch_size,
        device=device,
        use_cache=use_cache,
        limit=settings["limit"],
        log_samples=settings["log_samples"],
        apply_chat_template=settings["apply_chat_template"],
        system_instruction=settings["system_instruction"],
        gen_kwargs=settings["gen_kwargs"],
        task_manager=task_manager(metadata),
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    elapsed = time.perf_counter() - started
    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        path = output_dir / f"samples_{task}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        from lm_eval.utils import handle_non_serializable

        with tmp.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable) + "\n")
        os.replace(tmp, path)
    results["acadlm"] = {"elapsed_s": round(elapsed, 1), "use_cache": use_cache, "metadata": {
        k: v for k, v in metadata.items() if k not in model_args}}
    _atomic_json(output_dir / "results.json", results)
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    table = length_table(results)
    if table is not None:
        print("Scores by context length (0-100):\n" + table.to_markdown())
        for kind, path in write_report(results, output_dir, title=Path(
                model_args["pretrained"]).name).items():
            log.info("%s written to %s", kind, path)
    log.info("Evaluation finished in %.1f s; results in %s", elapsed, output_dir)
    return results


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point of ``tune run acadlm_plugins/eval_recipe --config ...``."""
    run_evaluation(cfg)


if __name__ == "__main__":
    from acadlm_plugins.training.runtime import run_main

    sys.exit(run_main(recipe_main))
