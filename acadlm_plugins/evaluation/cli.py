"""``acadlm-lm-eval``: lm-eval's own command line, with our model and tasks known by name.

lm-eval 0.4.13 has no entry-point group for models and looks ``--model`` up before it imports any
task code, so a plain ``lm_eval --model acadlm`` cannot find a model from another package. This
command is ``lm_eval`` itself (same arguments, same output files) run after three things: the
``acadlm`` model is registered, our task folder is added to every TaskManager's include path
(next to any ``--include_path`` you give), and ``--apply_chat_template`` and
``--system_instruction`` are passed on to the tasks' metadata, which lm-eval does not do: our
RULER and HELMET tasks lay out and size their prompts for them. ``--use_cache <path>`` is kept per
model (``<path>_<model fingerprint>_rank0.db``; plain ``lm_eval`` keys cached answers by the
request alone, so another model given the same path would get the first model's answers). When
the results carry per-length metrics it prints the task x length table and, with
``--output_path``, writes the table and a heatmap PNG next to lm-eval's ``results_*.json``.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.evaluation import TASKS_DIR
from acadlm_plugins.evaluation.answer_cache import model_cache_path
from acadlm_plugins.evaluation.registry import DEVICE_OPTION_GIVEN
from acadlm_plugins.evaluation.report import latest_results_file, length_table, write_report

PROG = "acadlm-lm-eval"
#: How lm-eval 0.4.13 words a ``--tasks`` name that no task, group or tag has.
TASKS_NOT_FOUND = "Tasks not found: "


def include_our_tasks() -> None:
    """Make every lm-eval TaskManager created from now on in this process index our tasks."""
    import lm_eval.tasks

    original = lm_eval.tasks.TaskManager
    if getattr(original, "_acadlm_tasks_included", False):
        return

    class TaskManagerWithAcadlmTasks(original):  # type: ignore[misc, valid-type]
        _acadlm_tasks_included = True

        def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
            if str(TASKS_DIR) not in [str(p) for p in paths]:
                paths.append(str(TASKS_DIR))
            super().__init__(*args, include_path=paths, **kwargs)

    lm_eval.tasks.TaskManager = TaskManagerWithAcadlmTasks


def _option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _flag(argv: list[str], name: str) -> str | None:
    """The value of an option that may stand alone (``--apply_chat_template [template]``): None
    when absent, "" when given without a value, else the value."""
    for index, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            following = argv[index + 1] if index + 1 < len(argv) else ""
            return "" if following.startswith("-") else following
    return None


def pass_run_settings_to_tasks(argv: list[str]) -> list[str]:
    """``argv`` with ``apply_chat_template`` (when the run applies a chat template) and
    ``system_instruction`` (when it gives one, with or without a template) added to the
    tasks' ``--metadata``.

    lm-eval applies the template and writes the instruction when it renders a prompt but never
    tells the task, whose prompts (HELMET's answer prefix, the budget that counts the template's
    and the instruction's tokens) depend on them; a further ``--metadata`` is merged into the
    user's by lm-eval's own parser.
    """
    extra: dict[str, Any] = {}
    value = _flag(argv, "--apply_chat_template")
    if value is not None and value.strip().lower() not in ("false", "0", "no"):
        extra["apply_chat_template"] = True
    instruction = _option(argv, "--system_instruction")
    if instruction:
        extra["system_instruction"] = instruction
    return [*argv, "--metadata", json.dumps(extra)] if extra else argv


def gives_option(argv: list[str], name: str) -> bool:
    """Whether ``argv`` gives the option ``name`` (``--device cpu``, ``--device=cpu``, or an
    abbreviation argparse would take for it, such as ``--dev cpu``)."""
    return any(len(arg.split("=", 1)[0]) > 4 and name.startswith(arg.split("=", 1)[0])
               for arg in argv if arg.startswith("--"))


def unknown_tasks_error(error: ValueError, argv: list[str]) -> ConfigError | None:
    """lm-eval's ``ValueError("Tasks not found: a, b")`` as a :class:`ConfigError` naming
    ``--tasks``, with the closest known names and how to list them; None for another error."""
    message = str(error)
    if not message.startswith(TASKS_NOT_FOUND):
        return None
    missing = [name.strip() for name in message[len(TASKS_NOT_FOUND):].split(",")
               if name.strip()]
    from lm_eval.tasks import TaskManager  # with our tasks: include_our_tasks() patched it

    known = TaskManager(include_path=_option(argv, "--include_path")).all_tasks
    close = {name: difflib.get_close_matches(name, known, n=3) for name in missing}
    hint = "".join(f" Did you mean {', '.join(found)} for {name!r}?"
                   for name, found in close.items() if found)
    listing = f"{PROG} ls tasks"
    names = ", ".join(repr(name) for name in missing)
    return ConfigError("--tasks", f"unknown task{'s' if len(missing) > 1 else ''} {names}: no "
                       f"task, group or tag has {'these names' if len(missing) > 1 else 'it'}."
                       f"{hint}", f"`{listing}` lists every task (ours start with acadlm_); "
                       "a task in another folder needs --include_path.")


def report_user_error(error: AcadlmError) -> int:
    """Print ``error`` (one of ours, naming the option and the fix) as one line and return exit
    status 2, as ``tune run`` does with our recipes (``run_main``); re-raise it, traceback and
    all, when ``ACADLM_TRACEBACK=1`` or when it reports a bug of ours (``user_error`` False)."""
    from acadlm_plugins.training.runtime import TRACEBACK_ENV

    if os.environ.get(TRACEBACK_ENV) == "1" or not error.user_error:
        raise error
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"{PROG}: error{where}: {error}\n(set {TRACEBACK_ENV}=1 to see the traceback)",
          file=sys.stderr, flush=True)
    return 2


def key_cache_by_model(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``simple_evaluate``'s keyword arguments with ``use_cache`` made specific to the model
    (:func:`~acadlm_plugins.evaluation.answer_cache.model_cache_path`); unchanged without a
    cache or for a model given as an object rather than by name."""
    from lm_eval.utils import simple_parse_args_string

    model, use_cache = kwargs.get("model"), kwargs.get("use_cache")
    if not use_cache or not isinstance(model, str):
        return kwargs
    model_args = kwargs.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    return {**kwargs, "use_cache": model_cache_path(str(use_cache), model, model_args,
                                                    kwargs.get("device"))}


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI with ``argv`` (default: this process's arguments); the exit status.

    A user error (a missing ``pretrained`` folder or data file, an unknown task, a device this
    machine lacks) is printed as ``acadlm-lm-eval: error: ...`` with the option and the fix,
    exit status 2; ``ACADLM_TRACEBACK=1`` shows its traceback instead."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    from acadlm_plugins.evaluation.registry import register_lm_eval_model

    register_lm_eval_model()
    include_our_tasks()
    argv = pass_run_settings_to_tasks(list(sys.argv[1:] if argv is None else argv))
    captured: list[dict[str, Any]] = []
    original_evaluate = lm_eval.simple_evaluate

    def evaluate_and_keep(*args: Any, **kwargs: Any) -> Any:
        results = original_evaluate(*args, **key_cache_by_model(kwargs))
        if results is not None:
            captured.append(results)
        return results

    started = time.time()
    lm_eval.simple_evaluate = evaluate_and_keep
    saved_argv = sys.argv
    sys.argv = ["lm_eval", *argv]
    device_given = DEVICE_OPTION_GIVEN.set(gives_option(argv, "--device"))
    try:
        try:
            cli_evaluate()
        except ValueError as error:
            if isinstance(error, AcadlmError):
                raise
            unknown = unknown_tasks_error(error, argv)
            if unknown is None:
                raise
            raise unknown from error
    except AcadlmError as error:
        return report_user_error(error)
    finally:
        DEVICE_OPTION_GIVEN.reset(device_given)
        sys.argv = saved_argv
        lm_eval.simple_evaluate = original_evaluate
    if not captured:
        return 0
    table = length_table(captured[-1])
    if table is None:
        return 0
    print("\nScores by context length (0-100):\n" + table.to_markdown())
    output_path = _option(argv, "--output_path") or _option(argv, "-o")
    if output_path:
        newest = latest_results_file(Path(output_path))
        if newest is not None and newest.stat().st_mtime >= started - 1:
            paths = write_report(captured[-1], newest.parent, stem=newest.stem.replace(
                "results_", "acadlm_long_"))
            for kind, path in paths.items():
                print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
