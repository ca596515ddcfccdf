"""The ``tune run`` command line, checked before a recipe starts.

torchtune's ``@config.parse`` reads ``--config`` and merges the ``key=value`` overrides with
OmegaConf; what it cannot read (a missing or malformed YAML file, an override that is not
``key=value``, ``~key`` for a key the config lacks, a list given where the config holds a
mapping) surfaces as a traceback from inside torchtune or OmegaConf that names neither the
argument nor the fix, and a ``${...}`` reference that resolves to nothing is only noticed when
the recipe first reads that value, after the model is loaded. :func:`check_command_line` reads
the command line as ``tune run`` will (:func:`~acadlm_plugins.planning.loading.load_config`,
torchtune's own merge) before the recipe does, and turns each of these into one error naming
the argument or key and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.planning.loading import check_references_resolve, load_config


def check_command_line(argv: Sequence[str]) -> None:
    """Read ``argv`` (``tune run``'s arguments after the recipe) as the recipe's
    ``@config.parse`` will, and raise :class:`ConfigError` naming the argument or key that
    cannot work: a ``--config`` file missing or not a YAML mapping, a flag ``tune run`` does not
    pass on, an override torchtune cannot merge, a ``${...}`` reference that resolves to
    nothing. Without a ``--config`` argument nothing is checked: torchtune's parser says it is
    required."""
    config, overrides = _split(argv)
    if config is None:
        return
    check_references_resolve(load_config(config, overrides))


def _split(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The ``--config`` path (None if absent) and the overrides; other flags are refused, as
    torchtune's parser refuses them."""
    config, overrides, args = None, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                return None, []  # torchtune's parser says --config needs a path
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("--") or arg in ("-h", "--help"):
            if arg in ("-h", "--help"):
                return None, []  # torchtune's parser prints the help
            raise ConfigError(arg, "is not an option a recipe takes: after the recipe, "
                              "`tune run` passes only `--config <file>` and `key=value` "
                              "overrides.", "put torchrun's options (--nproc_per_node ...) "
                              "before the recipe, and write recipe settings as `key=value`.")
        else:
            overrides.append(arg)
    return config, overrides
