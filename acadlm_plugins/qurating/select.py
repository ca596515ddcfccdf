"""``acadlm-qurating-select``: QuRating selection from a YAML config, with ``key=value`` overrides.

Run::

    acadlm-qurating-select --config configs/smollm2/qurating_select.yaml
    python -m acadlm_plugins.qurating.select --config configs/smollm2/qurating_select.yaml \\
        tau=inf budget_tokens=2000000 output_dir=outputs/uniform
    acadlm-qurating-select --config configs/smollm2/qurating_select.yaml domain_field=null

``domain_field=<column>`` splits the budget over the values of that column in proportion to
their tokens (QuRating's ``--domain_field``); ``domain_field=null`` selects over the whole
corpus.

The config's keys are those of :class:`acadlm_plugins.qurating.selection.SelectionConfig`; an
unknown key is refused with the closest known one. ``${acadlm_home:}`` resolves as in recipes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

import acadlm_plugins.defaults  # noqa: F401  (registers the ${acadlm_home:} resolver)
from acadlm_plugins.errors import AcadlmError
from acadlm_plugins.qurating.selection import SelectionConfig, select


def load_config(path: str, overrides: Sequence[str] = ()) -> SelectionConfig:
    """The YAML file at ``path`` with dotted ``key=value`` overrides, checked."""
    cfg = OmegaConf.load(path)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    values = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(values, dict):
        raise AcadlmError(f"{path}: the config must be a mapping of keys to values.")
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
