"""``acadlm-qurating-select``: QuRating selection from a YAML config, with ``key=value`` overrides.

Run::

    acadlm-qurating-select --config configs/smollm2/qurating_select.yaml
    python -m acadlm_plugins.qurating.select --config configs/smollm2/qurating_select.yaml \\
        tau=inf budget_fraction=null budget_tokens=100000 uniform_output_dir=null \\
        output_dir=outputs/uniform_100k
    acadlm-qurating-select --config configs/smollm2/qurating_select.yaml domain_field=domain

The second command is a uniform sample of 100,000 tokens on its own: the shipped config sets
``budget_fraction``, and only one of the two budgets may be given. ``domain_field=<column>``
splits the budget over the values of that column in proportion to their tokens (QuRating's
``--domain_field``); ``domain_field=null`` (the shipped setting) selects over the whole corpus.

The config's keys are those of :class:`acadlm_plugins.qurating.selection.SelectionConfig`; an
unknown key is refused with the closest known one. Every override is ``key=value``: a bare
``tau`` would set it to null, so it is refused. ``${acadlm_home:}`` resolves as in recipes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.qurating.selection import SelectionConfig, select

EXAMPLE_CONFIG = "configs/smollm2/qurating_select.yaml"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_config(path: str, overrides: Sequence[str] = ()) -> SelectionConfig:
    """The YAML file at ``path`` with dotted ``key=value`` overrides, checked: a missing or
    malformed file, an override without ``=`` and an override that cannot replace the
    config's value (``criteria=[x]`` for the ``criteria`` mapping) raise
    :class:`ConfigError` naming the file or key."""
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError("--config", f"{path} does not exist.",
                          f"give the path of a selection YAML, e.g. {EXAMPLE_CONFIG}.") from None
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError("--config", f"{path} cannot be read as YAML ({_first_line(err)}).",
                          f"repair the file; see {EXAMPLE_CONFIG} for the layout.") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("--config", f"{path} is not a mapping of keys to values.",
                          f"see {EXAMPLE_CONFIG} for the layout.")
    for item in overrides:
        key, equals, _ = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(key or item, f"the override {item!r} has no `=`: a bare key "
                              "would set it to null (for `tau`: a uniform sample).",
                              f"write `{key or 'key'}=<value>`, e.g. `tau=2.0` (`tau=inf` for "
                              "a uniform sample, `top_k=true` for deterministic top-k).")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (TypeError, ValueError, OmegaConfBaseException) as err:
            current = OmegaConf.select(cfg, key, default=None)
            hint = (f"set its entries one by one, e.g. `{key}.<name>=<value>`, or give a "
                    f"mapping: `{key}={{<name>: <value>}}`." if isinstance(current, DictConfig)
                    else f"give `{key}` a value of the kind {EXAMPLE_CONFIG} shows.")
            raise ConfigError(key, f"the override {item!r} cannot be applied to {path} "
                              f"({_first_line(err)}).", hint) from None
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", None) or "--config"),
                          f"cannot be resolved ({_first_line(err)}).",
                          "check the ${...} interpolation.") from None
    assert isinstance(values, dict)
    return SelectionConfig.from_mapping(values)


def summary_lines(reports: dict) -> list[str]:
    """A few lines per written selection: size, domain shares before -> after, score shift."""
    lines = []
    for name, report in reports.items():
        sel, corpus = report["selected"], report["corpus"]
        lines.append(f"[{name}] {report['settings']['mode']}: {sel['documents']:,} of "
                     f"{corpus['documents']:,} documents, {sel['tokens']:,} of "
                     f"{corpus['tokens']:,} tokens ({sel['token_share']:.1%})")
        shares = report["token_share_per_domain"]
        lines.append("  domain token share: " + ", ".join(
            f"{d} {shares['before'][d]:.1%} -> {shares['after'].get(d, 0.0):.1%}"
            for d in shares["before"]))
        per_domain = report.get("budget_per_domain")
        if per_domain:
            lines.append(f"  budget per {per_domain['domain_field']} (tokens, budget -> "
                         "selected): " + ", ".join(
                             f"{d} {v['budget_tokens']:,} -> {v['tokens']:,}"
                             for d, v in per_domain["domains"].items()))
        lines.append("  mean z after: " + ", ".join(
            f"{c} {v['mean_z_after']:+.2f}" for c, v in report["mean_score"].items()
            if v["mean_z_after"] is not None))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and overrides, run the selection, print a summary; 2 on a user error."""
    parser = argparse.ArgumentParser(prog="acadlm-qurating-select", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (SelectionConfig keys)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tau=inf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        reports = select(config)
    except AcadlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
