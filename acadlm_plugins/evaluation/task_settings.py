"""The ``--metadata`` keys our tasks read: one registry, filled by the modules that read them.

lm-eval hands every task of a run one metadata mapping: ``--metadata`` merged over the model
arguments (``--model_args``, or ``model_args`` of ``simple_evaluate``), and keys of its own
(the task YAML's ``version``, ``config_source``). Each module of ours that reads a setting
declares it here, next to the code that reads it, with a check of its value
(:func:`declare_settings`): the readers themselves for numbers and choices (``int_setting``,
``parse_lengths``, ...), a type check for paths. When one of our tasks is built,
:func:`check_task_metadata`:

* checks the value of every declared key present, whichever of our tasks reads it: the
  metadata is the whole run's, so ``"num_shots": "abc"`` is an error naming the task being built
  and the key, even for ``acadlm_icl``, which fills its prompts with demonstrations instead of
  reading ``num_shots``. Only the value's form is checked there (a path is not looked up): the
  task that reads a key checks the rest;
* logs, once per key and process, a WARNING for a key that no task of ours reads, that lm-eval
  does not put there itself and that no lm-eval model takes as an argument, with the closest
  key we know: a typo such as ``num_sample`` would otherwise leave the default in force without
  a word. It is a warning, not an error, since the metadata is shared with every task of the
  run, other projects' included.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Check(Protocol):
    """Checks one setting's value in a task's metadata: ``check(metadata, task=task)`` raises
    the task's :class:`~acadlm_plugins.errors.ConfigError` naming the key when it is wrong."""

    def __call__(self, metadata: Mapping[str, Any], *, task: str) -> object: ...


#: The modules that declare settings (each at import): imported before the registry is read,
#: so that a RULER-only run knows the HELMET keys as well.
READER_MODULES = ("lengths", "task_base", "ruler", "ruler_qa", "helmet_frame", "helmet",
                  "helmet_longdoc", "judge_metrics")
#: What lm-eval 0.4.13 writes into a task's metadata itself (``tasks/_factory.py``,
#: ``_load_full_config``): the task YAML's own ``metadata`` block (ours hold ``version`` only),
#: ``config_source``, ``_metadata`` (a YAML metadata that is not a mapping) and ``config``
#: (the placeholder of a Python task without a YAML). The model arguments it merges in are
#: recognised by :func:`model_argument_names`.
LM_EVAL_KEYS = frozenset({"version", "config_source", "_metadata", "config"})
#: Model arguments that lm-eval's models take through ``**kwargs`` and pass on (``hf`` to
#: transformers' ``from_pretrained``, ``vllm`` to vLLM's ``LLM``), so that no ``__init__``
#: names them: the common ones, never warned about either.
PASSED_ON_MODEL_ARGS = frozenset({
    "attn_implementation", "torch_dtype", "device_map", "load_in_8bit", "load_in_4bit",
    "bnb_4bit_compute_dtype", "low_cpu_mem_usage", "cache_dir", "token", "use_cache",
    "gpu_memory_utilization", "enforce_eager", "max_num_seqs", "swap_space",
    "enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens",
    "limit_mm_per_prompt"})
#: Where the keys are documented (named by the warning).
SETTINGS_DOC = "docs/evaluation.md"


@dataclass(frozen=True)
class Setting:
    """A metadata key our tasks read: which tasks (in words) and the checks of its value."""

    key: str
    read_by: tuple[str, ...]
    checks: tuple[Check, ...]


_SETTINGS: dict[str, Setting] = {}
#: Keys no task reads any more, with what replaced them (the warning's suggestion).
_RETIRED: dict[str, str] = {}
#: Keys already warned about in this process.
_WARNED: set[str] = set()


def declare_settings(read_by: str, checks: Mapping[str, Check | None]) -> tuple[str, ...]:
    """Record that the tasks described by ``read_by`` read the metadata keys of ``checks``,
    each with the check of its value (None: any value does); the keys, in order. A key declared
    by several modules keeps every distinct check."""
    for key, check in checks.items():
        known = _SETTINGS.get(key, Setting(key, (), ()))
        _SETTINGS[key] = Setting(
            key, known.read_by + (read_by,) * (read_by not in known.read_by),
            known.checks + ((check,) if check is not None and check not in known.checks else ()))
    return tuple(checks)


def declare_retired(key: str, replacement: str) -> None:
    """Record a key no task reads any more and what replaced it (``replacement``, markdown),
    so that the warning about it points at the replacement."""
    _RETIRED[key] = replacement


def known_settings() -> Mapping[str, Setting]:
    """Every declared setting by key (the declaring modules imported first)."""
    for name in READER_MODULES:
        importlib.import_module(f"acadlm_plugins.evaluation.{name}")
    return dict(_SETTINGS)


def path_check(key: str) -> Check:
    """The check of a path setting: unset, empty, a string or a path (whether it exists is
    checked by the task that reads it)."""

    def check(metadata: Mapping[str, Any], *, task: str) -> None:
        value = metadata.get(key)
        if value in (None, "") or isinstance(value, (str, os.PathLike)):
            return
        from acadlm_plugins.evaluation.lengths import task_error

        raise task_error(task, key, f"{value!r} is not a path.",
                         "Give the path of a local file or folder as a string, or leave it "
                         f"unset (every key: {SETTINGS_DOC}).")

    check.__qualname__ = f"path_check({key!r})"
    return check


def text_check(key: str) -> Check:
    """The check of a text setting: unset or a string."""

    def check(metadata: Mapping[str, Any], *, task: str) -> None:
        value = metadata.get(key)
        if value is None or isinstance(value, str):
            return
        from acadlm_plugins.evaluation.lengths import task_error

        raise task_error(task, key, f"{value!r} is not a string.")

    check.__qualname__ = f"text_check({key!r})"
    return check


def check_task_metadata(metadata: Mapping[str, Any], *, task: str) -> None:
    """Check, as task ``task`` is built, the values of the settings in ``metadata`` and warn
    about its keys that no task of ours reads (see the module's docstring)."""
    settings = known_settings()
    for key in metadata:
        setting = settings.get(key) if isinstance(key, str) else None
        for check in setting.checks if setting else ():
            check(metadata, task=task)
    warn_unknown_keys(metadata, settings)


def warn_unknown_keys(metadata: Mapping[str, Any],
                      settings: Mapping[str, Setting] | None = None) -> list[str]:
    """Log one WARNING per key of ``metadata`` (and per process) that no task of ours reads,
    that lm-eval does not put there itself and that no lm-eval model takes as an argument,
    with the closest key we know; the keys warned about by this call."""
    settings = known_settings() if settings is None else settings
    candidates = [key for key in metadata if isinstance(key, str) and key not in settings
                  and key not in LM_EVAL_KEYS and key not in _WARNED]
    if not candidates:
        return []
    model_args = model_argument_names()
    warned = []
    for key in candidates:
        if key in model_args:
            continue
        _WARNED.add(key)
        warned.append(key)
        log.warning("metadata key `%s` is not read by any acadlm task%s (see %s; ignore this "
                    "for a key meant for another project's task)", key,
                    _suggestion(key, settings), SETTINGS_DOC)
    return warned


def _suggestion(key: str, settings: Mapping[str, Setting]) -> str:
    if key in _RETIRED:
        return f" any more; use {_RETIRED[key]} instead"
    by_lower = {name.lower(): name for name in settings}
    close = difflib.get_close_matches(key.lower(), sorted(by_lower), n=1, cutoff=0.6)
    return f"; did you mean `{by_lower[close[0]]}`?" if close else ""


def model_argument_names() -> frozenset[str]:
    """The argument names of the models lm-eval knows, which it merges into every task's
    metadata as they are given (``--model_args``): the ``__init__`` parameters of every class
    in lm-eval's ``lm_eval/models`` package and in the module of every registered model
    (``acadlm``'s included), read from their source without importing them (most need torch,
    vLLM, an API client...), those of the registered classes already imported, and the common
    arguments passed on through ``**kwargs`` (:data:`PASSED_ON_MODEL_ARGS`; a rarer one may be
    warned about)."""
    import lm_eval.models  # noqa: F401  (fills the registry with its placeholders)
    from lm_eval.api.registry import model_registry

    return _model_argument_names(tuple((alias, str(target)) for alias, target
                                       in sorted(model_registry.items(), key=lambda i: i[0])))


@lru_cache(maxsize=4)
def _model_argument_names(registered: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """:func:`model_argument_names` for the registry whose entries are ``registered``."""
    import lm_eval.models
    from lm_eval.api.registry import model_registry

    from acadlm_plugins.evaluation.registry import MODEL_TARGET

    files = {str(path) for path in Path(lm_eval.models.__file__).parent.glob("*.py")}
    names = set(PASSED_ON_MODEL_ARGS)
    for target in [MODEL_TARGET, *list(model_registry.values())]:
        if isinstance(target, type):
            for cls in target.__mro__:
                names |= _parameters(cls.__dict__.get("__init__"))
            continue
        module = str(getattr(target, "value", target)).partition(":")[0]
        file = _module_file(module)
        if file:
            files.add(file)
    for file in files:
        names |= _init_arguments(file)
    return frozenset(names)


def _parameters(function: Any) -> set[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {
        "self"}


def _module_file(module: str) -> str | None:
    """The source file of ``module`` without importing it (its parent packages are)."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return getattr(loaded, "__file__", None)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


@lru_cache(maxsize=256)
def _init_arguments(file: str) -> frozenset[str]:
    """The parameter names of the ``__init__`` of every class with a base class (a model
    subclasses lm-eval's ``LM``; helpers such as its ``Collator`` have none) defined in the
    Python file ``file``."""
    try:
        tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return frozenset()
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or not node.bases:
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                arguments = item.args
                names |= {a.arg for a in (*arguments.posonlyargs, *arguments.args,
                                          *arguments.kwonlyargs)}
    return frozenset(names - {"self"})
