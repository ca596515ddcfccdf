"""Build the pluggy plugin manager of one training run.

A run's plugins come from three places, registered in this order:

1. our built-in plugins (:data:`BUILTIN_PLUGINS`), loaded exactly like third-party ones;
2. installed packages that declare an entry point in the ``acadlm_plugins`` group;
3. the recipe config's ``plugins:`` list of dotted paths (``pkg.mod`` or ``pkg.mod:attr``).

Each run gets a fresh manager, and a plugin given as a class is instantiated once per manager,
so two runs in one process never share plugin state.

Environment switches:

``ACADLM_PLUGINS_ALLOW=name1,name2``
    Load only these entry-point plugins (built-ins and the config's ``plugins:`` always load).
    A name no installed package provides is a warning (with the closest installed name), not
    an error: the allow-list is a way to leave plugins out, and a misspelled name leaves out
    the plugin it meant.
``ACADLM_PLUGINS_DISABLE_AUTOLOAD=1``
    Load no entry-point plugins at all.
``ACADLM_PLUGINS_TRACE=1``
    Log every hook call, its arguments and its results to the ``acadlm_plugins.plugin_manager``
    logger (level INFO).

Every hook function a plugin registers is wrapped (:func:`_guarded`): an exception it raises
keeps its type and gains a note naming the plugin and the hook, and what it returns is checked
where it is returned (a dict, loss terms that are scalar tensors, a list of parameter groups),
so a wrong return value stops the run with a :class:`PluginHookError` naming the plugin, the
hook and what to return, before any recipe code uses it. Dicts come back as
:class:`PluginResult` (a ``dict`` that remembers which plugin returned which key), so that
:func:`collect_metrics` and :func:`add_plugin_results` can name the plugins whose keys clash.
A plugin's hook wrappers (``wrapper=True`` or ``hookwrapper=True``) get the same note on an
exception they raise, before or after their ``yield`` (:func:`_guarded_wrapper`); the note is
added on Python 3.10 too (:func:`add_error_note`).

Two plugins whose ``acadlm_state_dict`` return the same key are refused when the run's setup is
done, before its first step (:func:`check_plugin_state_keys`, which the recipe calls right after
``acadlm_optimizer_param_groups``), rather than at the first checkpoint.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import os
import types
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, NoReturn

import pluggy

from acadlm_plugins import hookspecs
from acadlm_plugins.errors import AcadlmError, ConfigError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "acadlm_plugins"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "acadlm_plugins.plugins.nonfinite_loss_guard",
    "acadlm_plugins.plugins.dynamic_batch_loading:DynamicBatchLoadingPlugin",
    "acadlm_plugins.plugins.pruning:PruningPlugin",
    "acadlm_plugins.plugins.torchao:TorchaoPlugin",
    "acadlm_plugins.plugins.distillation:DistillationPlugin",
)

ALLOW_ENV = "ACADLM_PLUGINS_ALLOW"
DISABLE_AUTOLOAD_ENV = "ACADLM_PLUGINS_DISABLE_AUTOLOAD"
TRACE_ENV = "ACADLM_PLUGINS_TRACE"

_IMPORT_FIX = (
    "check the dotted path (`package.module` or `package.module:ClassName`); "
    "install the package that provides it (`pip install <package>`)."
)


# In a checkpoint's plugin states: which plugin saved which key (`{state_key: plugin_name}`),
# so a resumed run can say which plugin it lacks. Taken out before plugins see the states.
PLUGIN_NAMES_KEY = "_acadlm_plugin_names"

# What each hook whose return value the recipes use must return, as the error says it.
_EXPECTED_RETURNS = {
    "acadlm_optimizer_param_groups": "a list of parameter-group dicts "
                                     "(`[{'params': [...], 'lr': ...}]`) or None",
    "acadlm_extra_loss": "`{name: scalar tensor}` (one number per term, e.g. a `.mean()`) or None",
    "acadlm_after_optimizer_step": "a dict of metrics `{name: number}` or None",
    "acadlm_evaluation_end": "a dict of metrics `{name: number}` or None",
    "acadlm_state_dict": "`{key: state}` or None",
    "acadlm_model_exported": "a dict to merge into the run's summary, or None",
}
_NOTE_PREFIX = "raised in acadlm plugin"


class PluginLoadError(AcadlmError, ImportError):
    """An installed package's entry point could not be loaded. The message says how to skip it."""


class PluginHookError(AcadlmError, ValueError):
    """A plugin's hook returned something the recipe cannot use, or a key that another plugin
    or the recipe itself already has. The message names the plugin, the hook and the fix."""


class PluginResult(dict):
    """A dict of plugin results that remembers, per key, the plugin and hook it came from
    (``origins``: ``{key: (plugin_name, hook_name)}``), so that a clash names them."""

    def __init__(self, *args: Any, origins: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.origins: dict = dict(origins or {})


def build_plugin_manager(
    plugins: Sequence[str | object] = (),
    *,
    builtins: Sequence[str] = BUILTIN_PLUGINS,
    load_entry_points: bool = True,
) -> pluggy.PluginManager:
    """Return a new plugin manager holding the built-in, installed and configured plugins.

    ``plugins`` is the recipe config's ``plugins:`` list: dotted paths, or plugin objects when
    called from Python. A class is instantiated with no arguments; a module or an instance is
    registered as it is. The same plugin found twice (say, installed and also listed in the
    config) is registered once. Raises :class:`ConfigError` (key ``plugins``) for a path that
    cannot be imported or a plugin with a misspelled or missing hook, and
    :class:`PluginLoadError` for an installed entry point that fails to import.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if _env_flag(TRACE_ENV):
        _enable_trace(pm)

    seen: set[int] = set()  # ids of loaded objects, before any class is instantiated
    for path in builtins:
        _register(pm, _import_plugin(path, origin="built-in plugin"), path, seen)

    if load_entry_points and not _env_flag(DISABLE_AUTOLOAD_ENV):
        for name, obj in _load_entry_points(_allow_list()):
            _register(pm, obj, name, seen)

    if isinstance(plugins, str):  # `plugins: pkg.mod:Plugin` written without the list brackets
        plugins = [plugins]
    for item in plugins:
        if isinstance(item, str):
            _register(pm, _import_plugin(item, origin="plugin"), item, seen)
        else:
            _register(pm, item, _name_of(item), seen)

    _check_hook_names(pm)
    logger.debug("acadlm plugins: %s", ", ".join(list_plugins(pm)))
    return pm


def list_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered plugins in registration order, for the run's log."""
    return [name for name, plugin in pm.list_name_plugin() if plugin is not None]


def collect_metrics(results: Iterable[dict | None]) -> PluginResult:
    """Merge the dicts that plugins returned from one hook call into one dict.

    ``None`` results are skipped. Two plugins returning the same key is an error naming both
    plugins and the hook rather than a silent overwrite, because one of the two values would
    vanish from the logs (or the loss). The merged dict remembers where each key came from.
    """
    merged = PluginResult()
    for result in results:
        if result is None:
            continue
        if not isinstance(result, dict):
            raise PluginHookError(
                f"a plugin hook returned {_show(result)} where a dict (or None) is expected. "
                "Fix: return `{name: value}` from the hook."
            )
        origins = getattr(result, "origins", {})
        for key, value in result.items():
            origin = origins.get(key)
            if key in merged:
                raise PluginHookError(_clash(key, merged.origins.get(key), origin))
            merged[key] = value
            if origin is not None:
                merged.origins[key] = origin
    return merged


def add_plugin_results(target: dict, results: dict | Iterable[dict | None], *,
                       owner: str = "the recipe") -> dict:
    """Add what plugins returned (one hook call's results, or a dict :func:`collect_metrics`
    merged) to ``target``, the recipe's own metrics or summary, and return ``target``.

    A plugin key that ``target`` already has is an error naming the plugin, the hook and the
    key: it would silently replace the recipe's own value (its logged loss, say)."""
    merged = collect_metrics([results] if isinstance(results, dict) else results)
    for key in merged:
        if key in target:
            origin = merged.origins.get(key)
            who = (f"plugin '{origin[0]}' returns key {key!r} from `{origin[1]}`" if origin
                   else f"a plugin returns key {key!r}")
            raise PluginHookError(
                f"{who}, which is already in {owner}: the plugin's value would silently "
                "replace the recipe's own. Fix: rename the key in the plugin (prefix it with "
                "the plugin's name)."
            )
    target.update(merged)
    return target


def plugin_states(pm: pluggy.PluginManager) -> dict:
    """Collect every plugin's ``acadlm_state_dict`` into one dict for the checkpoint, with
    which plugin saved which key (under :data:`PLUGIN_NAMES_KEY`)."""
    merged = collect_metrics(pm.hook.acadlm_state_dict())
    # by what the plugin is (module:qualname), not by how this run listed it: `pkg.mod:Cls`,
    # `pkg.mod.Cls` and an entry point's name all register the same plugin
    names = {key: _name_of(pm.get_plugin(plugin)) for key, (plugin, _) in merged.origins.items()}
    return add_plugin_results({PLUGIN_NAMES_KEY: names}, merged,
                              owner="the checkpoint's record of plugin names")


def check_plugin_state_keys(pm: pluggy.PluginManager) -> None:
    """Call each plugin's ``acadlm_state_dict`` once and raise :class:`PluginHookError` (naming
    both plugins, the key and the fix, as :func:`plugin_states` would at a checkpoint) when two
    plugins return the same key.

    The recipe calls this once, right after ``acadlm_optimizer_param_groups`` (the last setup
    hook), so a clash stops the run before its first step instead of at its first checkpoint,
    after training work. The plugins are called
    one by one, outside the hook machinery: the hook's wrappers do not run, and the call does
    not appear in ``ACADLM_PLUGINS_TRACE``'s list of the recipe's hook calls. A plugin that
    returns nothing yet (``None`` or ``{}``) has no key to clash; one whose state dict raises
    this early (its state is built during training) is skipped here, logged at DEBUG, and its
    keys are checked at the first checkpoint as before. A return value of the wrong kind is
    refused here already (:class:`PluginHookError`), as it would be at the checkpoint."""
    hook = "acadlm_state_dict"
    results: list[dict | None] = []
    # pluggy calls the implementations last-registered first: the same order, and so the same
    # "plugins 'A' and 'B'" in the error, as at a checkpoint
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        if impl.wrapper or impl.hookwrapper:
            continue
        try:
            result = impl.function()
        except PluginHookError:
            raise
        except Exception as err:  # noqa: BLE001 -- its keys are checked at the first save
            logger.debug("plugin %r: `%s` raised %s at setup (%s); its keys are checked at the "
                         "first checkpoint", impl.plugin_name, hook, type(err).__name__, err)
            continue
        if isinstance(result, dict) and not isinstance(result, PluginResult):
            # registered past build_plugin_manager's guard: name its plugin all the same
            result = PluginResult(result, origins=dict.fromkeys(result, (impl.plugin_name, hook)))
        results.append(result)
    # the same checks as plugin_states: two plugins' keys, and the key that records their names
    add_plugin_results({PLUGIN_NAMES_KEY: {}}, collect_metrics(results),
                       owner="the checkpoint's record of plugin names")


def restore_plugin_states(pm: pluggy.PluginManager, states: dict) -> None:
    """Hand the checkpoint's plugin states back to the plugins on resume.

    A state saved by a plugin this run does not load is logged as a warning: that plugin's
    state is left behind, so the run does not continue exactly as it would have."""
    states = dict(states or {})
    names = states.pop(PLUGIN_NAMES_KEY, None) or {}
    loaded = {_name_of(plugin) for plugin in pm.get_plugins() if plugin is not None}
    missing = {key: name for key, name in names.items() if name not in loaded and key in states}
    if missing:
        logger.warning(
            "the checkpoint holds plugin state saved by %s, which this run does not load: "
            "that state is not restored. To continue exactly, add that name to `plugins:` (or, "
            "for an installed entry point, allow it in ACADLM_PLUGINS_ALLOW and unset "
            "ACADLM_PLUGINS_DISABLE_AUTOLOAD); the plugins of this run: %s.",
            ", ".join(f"plugin '{name}' (key {key!r})" for key, name in sorted(missing.items())),
            ", ".join(sorted(loaded)) or "none",
        )
    pm.hook.acadlm_load_state_dict(states=states)


# --- loading ---------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _allow_list() -> set[str] | None:
    """The entry-point names allowed by ``ACADLM_PLUGINS_ALLOW``, or None when unset/empty."""
    raw = os.environ.get(ALLOW_ENV, "")
    names = {name.strip() for name in raw.split(",") if name.strip()}
    return names or None


def _enable_trace(pm: pluggy.PluginManager) -> None:
    def write(message: str) -> None:
        logger.info("%s", message.rstrip("\n"))

    pm.trace.root.setwriter(write)
    pm.enable_tracing()


def _import_plugin(path: str, *, origin: str) -> object:
    """Import ``pkg.mod`` or ``pkg.mod:attr`` (also ``pkg.mod.attr``, as torchtune's
    ``_component_`` paths are written) and return the object, or raise ConfigError."""
    module_name, _, attr = path.partition(":")
    try:
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # `pkg.mod.Class` without a colon: retry as module `pkg.mod`, attribute `Class`.
            if attr or exc.name != module_name or "." not in module_name:
                raise
            module_name, attr = module_name.rsplit(".", 1)
            obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            "plugins",
            f"cannot load {origin} '{path}': {type(exc).__name__}: {exc}.",
            _IMPORT_FIX,
        ) from exc
    return obj


def _load_entry_points(allow: set[str] | None) -> list[tuple[str, object]]:
    """Load the ``acadlm_plugins`` entry points (only the allowed ones when ``allow`` is set)."""
    entry_points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
    )
    if allow is not None:
        _warn_unknown_allowed(allow, [ep.name for ep in entry_points])
    loaded = []
    for ep in entry_points:
        if allow is not None and ep.name not in allow:
            logger.debug("skipping entry-point plugin %r: not in %s", ep.name, ALLOW_ENV)
            continue
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP!r}) of "
                f"{_distribution_label(ep)} failed to load: {type(exc).__name__}: {exc}. "
                f"Fix: upgrade or uninstall that package, or load only the plugins you want "
                f"with {ALLOW_ENV}=<names> (or none with {DISABLE_AUTOLOAD_ENV}=1)."
            ) from exc
        loaded.append((ep.name, obj))
    return loaded


def _warn_unknown_allowed(allow: set[str], installed: list[str]) -> None:
    """Warn about ``ACADLM_PLUGINS_ALLOW`` names that no installed entry point has, with the
    closest installed name: a typo (``z_los``) would otherwise leave out the plugin it meant,
    and every other installed one, behind a warning that does not say why."""
    missing = sorted(allow - set(installed))
    if not missing:
        return
    hints = [_with_suggestion(name, installed) for name in missing]
    loaded = sorted(allow & set(installed))
    logger.warning(
        "%s names %s, but no installed package provides such an entry point (installed: %s; "
        "of those, this run loads: %s).",
        ALLOW_ENV,
        ", ".join(hints),
        ", ".join(installed) or "none",
        ", ".join(loaded) if loaded else "none",
    )


def _with_suggestion(name: str, known: list[str]) -> str:
    """``'name'``, followed by the closest of ``known`` as a did-you-mean when one is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return f"'{name}' (did you mean '{close[0]}'?)" if close else f"'{name}'"


def _distribution_label(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "an unknown distribution"
    return f"distribution '{dist.metadata['Name']} {dist.version}'"


def _name_of(obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    target = obj if inspect.isclass(obj) else type(obj)
    return f"{target.__module__}:{target.__qualname__}"


def _register(pm: pluggy.PluginManager, obj: object, name: str, seen: set[int]) -> None:
    """Register one loaded object (instantiating classes) unless it is already registered."""
    if id(obj) in seen or pm.is_registered(obj):
        logger.debug("plugin %r is already registered; skipping the second copy", name)
        return
    if pm.has_plugin(name):
        raise ConfigError(
            "plugins",
            f"two different plugins are both named '{name}'.",
            f"uninstall one of them, or exclude the entry point with {ALLOW_ENV}.",
        )
    seen.add(id(obj))
    plugin = _instantiate(obj, name) if inspect.isclass(obj) else obj
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise ConfigError(
            "plugins",
            str(exc).replace("\n", "; ") + ".",
            f"give plugin '{name}' hook functions only arguments listed in "
            "acadlm_plugins.hookspecs.",
        ) from exc
    if not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        undecorated = sorted(a for a in dir(plugin) if a.startswith("acadlm_"))
        hint = (
            f" It has {', '.join(undecorated)} but without the @hookimpl decorator."
            if undecorated
            else ""
        )
        raise ConfigError(
            "plugins",
            f"plugin '{name}' implements no acadlm hook.{hint}",
            "decorate its hook functions with `@acadlm_plugins.hookimpl` and name them after "
            "the hooks in acadlm_plugins.hookspecs.",
        )
    _refuse_undecorated_hooks(pm, plugin, name)
    _guard_hook_functions(pm, plugin, name)


def _instantiate(cls: type, name: str) -> object:
    """``cls()``, with an error naming the plugin if its ``__init__`` fails."""
    try:
        return cls()
    except AcadlmError:
        raise  # the plugin's own error, naming its fix
    except Exception as exc:
        raise ConfigError(
            "plugins",
            f"plugin '{name}' could not be created with no arguments: "
            f"{type(exc).__name__}: {exc}.",
            "a plugin class is instantiated once per run as `ClassName()`: give every "
            "`__init__` argument a default and read settings from the config in "
            "`acadlm_configure`, or fix the error in its `__init__`.",
        ) from exc


def _refuse_undecorated_hooks(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """A plugin with some decorated hooks and a hook-named function without ``@hookimpl``:
    pluggy would never call that one (a state that is never saved, say), so refuse it."""
    registered = {caller.name for caller in pm.get_hookcallers(plugin) or ()}
    undecorated = [
        hook for hook in _hook_names()
        if hook not in registered and callable(getattr(plugin, hook, None))
    ]
    if undecorated:
        pm.unregister(plugin)
        raise ConfigError(
            "plugins",
            f"plugin '{name}' has {', '.join(undecorated)} without the @hookimpl decorator, so "
            "it would never be called (only its decorated hooks are).",
            f"add `@acadlm_plugins.hookimpl` above {', '.join(undecorated)} in plugin "
            f"'{name}'.",
        )


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("acadlm_")]


def add_error_note(err: BaseException, note: str) -> None:
    """Add ``note`` to ``err``'s ``__notes__`` on every Python this package supports.

    Python 3.11 and later have ``BaseException.add_note``; 3.10 (``requires-python >= 3.10``)
    does not, and the note naming the plugin and hook was lost there. Without ``add_note``
    this appends to the ``__notes__`` list itself, as ``add_note`` does, which
    :func:`acadlm_plugins.training.runtime.run_main` prints under the error line. It never
    raises: it runs while another exception is being raised."""
    native = getattr(err, "add_note", None)
    try:
        if callable(native):
            native(note)
            return
        notes = getattr(err, "__notes__", None)
        if isinstance(notes, list):
            notes.append(note)
        elif notes is None:
            err.__notes__ = [note]  # type: ignore[attr-defined]
        # else: `__notes__` is not a list, which `add_note` refuses too: no note
    except (AttributeError, TypeError):  # `__notes__` not a list, or no attribute allowed
        pass


def _note_plugin(err: BaseException, plugin: str, hook: str) -> None:
    """Note on ``err`` the plugin and hook it was raised in, unless it already has such a note
    (the innermost plugin, when one plugin's hook calls another hook, is the one to name)."""
    notes = getattr(err, "__notes__", None) or ()
    if not any(str(note).startswith(_NOTE_PREFIX) for note in notes):
        add_error_note(err, f"{_NOTE_PREFIX} '{plugin}', hook `{hook}`")


def _guard_hook_functions(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Wrap each of the plugin's hook functions with :func:`_guarded` and each of its hook
    wrappers with :func:`_guarded_wrapper`, so an exception from either names the plugin."""
    for caller in pm.get_hookcallers(plugin) or ():
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            guard = _guarded_wrapper if impl.wrapper or impl.hookwrapper else _guarded
            impl.function = guard(impl.function, name, caller.name)  # type: ignore[misc]


def _guarded(function: Callable, plugin: str, hook: str) -> Callable:
    """``function`` (a plugin's implementation of ``hook``) that notes the plugin and hook on
    an exception it raises, keeping the exception's type, and checks what it returns."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except Exception as err:
            _note_plugin(err, plugin, hook)
            raise
        return _checked_result(result, plugin, hook)

    return call


def _guarded_wrapper(function: Callable, plugin: str, hook: str) -> Callable:
    """``function`` (a plugin's hook wrapper: a generator function that yields once, around the
    other implementations of ``hook``) as a generator function that delegates to it (``yield
    from`` passes on what pluggy sends or throws in, and returns what the wrapper returns) and
    notes the plugin and hook on an exception the wrapper raises, before or after its yield.
    Another plugin's exception passing through already carries its own plugin's note, which is
    kept (:func:`_note_plugin`); what the wrapper returns is not checked."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
        try:
            return (yield from function(*args, **kwargs))
        except PluginHookError:
            raise  # another plugin's refused return value: its message names that plugin
        except Exception as err:
            _note_plugin(err, plugin, hook)
            raise

    return call


def _checked_result(result: Any, plugin: str, hook: str) -> Any:
    """``result`` if it is what ``hook`` must return (dicts as :class:`PluginResult`), else
    :class:`PluginHookError` naming the plugin, the hook and what to return."""
    if result is None or hook not in _EXPECTED_RETURNS:
        return result
    if hook == "acadlm_optimizer_param_groups":
        if not isinstance(result, (list, tuple)):
            _refuse_result(plugin, hook, _show(result))
        for group in result:
            if not isinstance(group, dict) or "params" not in group:
                _refuse_result(plugin, hook, f"a list holding {_show(group)}",
                               ", which is not a parameter-group dict with 'params'")
        return result
    if not isinstance(result, dict):
        _refuse_result(plugin, hook, _show(result))
    if hook == "acadlm_extra_loss":
        import torch

        for key, term in result.items():
            if not isinstance(term, torch.Tensor) or term.numel() != 1:
                _refuse_result(plugin, hook, f"loss term {key!r} = {_show(term)}",
                               ", which is not a scalar tensor")
    return PluginResult(result, origins=dict.fromkeys(result, (plugin, hook)))


def _refuse_result(plugin: str, hook: str, returned: str, why: str = "") -> NoReturn:
    raise PluginHookError(
        f"plugin '{plugin}' returned {returned} from `{hook}`{why}. Fix: return "
        f"{_EXPECTED_RETURNS[hook]} from its `{hook}`, or remove it from `plugins:`."
    )


def _show(value: Any) -> str:
    """A short description of a returned value: its type, shape or a clipped repr."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "numel"):
        return f"a {type(value).__name__} of shape {tuple(shape)}"
    text = " ".join(repr(value).split())  # on one line
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _clash(key: Any, first: tuple[str, str] | None, second: tuple[str, str] | None) -> str:
    """The error for two plugins returning ``key`` from one hook call."""
    if first and second:
        who = f"plugins '{first[0]}' and '{second[0]}' both return key {key!r} from `{first[1]}`"
    else:
        who = f"two plugins return the same key {key!r} from one hook"
    return (f"{who}: one value would silently replace the other. Fix: rename the key in one "
            "of the plugins (prefix it with the plugin's name).")


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """Turn pluggy's unknown-hook error into a ConfigError naming plugin and hook."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        unknown = sorted(
            caller.name for caller in pm.get_hookcallers(exc.plugin) or () if not caller.has_spec()
        )
        known = _hook_names()
        suggestions = {hook: difflib.get_close_matches(hook, known, n=1) for hook in unknown}
        fixes = [f"rename '{hook}' to '{match[0]}'" for hook, match in suggestions.items() if match]
        raise ConfigError(
            "plugins",
            f"plugin '{name}' implements unknown hook(s) {', '.join(map(repr, unknown))}.",
            "; ".join(fixes + [f"the hooks are: {', '.join(known)}."]),
        ) from exc
