"""``acadlm-plan``: the dry run of a recipe config, as a table or as JSON.

Run::

    acadlm-plan --config configs/llama2/7b_to_2.7b_prune.yaml \\
        model_dir=/models/Llama-2-7b-hf
    acadlm-plan --config configs/llama3_1/8b_to_minitron_4b_width_prune.yaml --reference llama-3.1-8b
    acadlm-plan --config ... --world-size 16 --json

Overrides are ``tune run``'s ``key=value`` (and ``~key``). ``--reference NAME`` points
``model_dir`` at a temporary folder holding a shipped config.json (no weights needed).
Exit status: 0 planned, 2 the recipe would refuse the config (the message names the key).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from acadlm_plugins.errors import AcadlmError
from acadlm_plugins.planning.loading import RECIPES
from acadlm_plugins.planning.plan import plan_config
from acadlm_plugins.planning.reference import reference_names, write_reference_model_dir
from acadlm_plugins.planning.report import format_plan, plan_json


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``acadlm-plan``."""
    parser = argparse.ArgumentParser(prog="acadlm-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe's YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for tune run")
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="the recipe (default: the config's `tune run` line)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes (default: the config's --nproc_per_node, else 1)")
    parser.add_argument("--reference", choices=reference_names(), default=None,
                        help="set model_dir to a temporary folder with this shipped config.json")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Plan the config and print it; 2 (with the reason on stderr) when it would be refused."""
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    with tempfile.TemporaryDirectory(prefix="acadlm_plan_") as scratch:
        if args.reference:
            overrides.append(f"model_dir={write_reference_model_dir(args.reference, scratch)}")
        try:
            plan = plan_config(args.config, overrides, recipe=args.recipe,
                               world_size=args.world_size)
        except MissingMandatoryValue as err:  # a `???` a planner read before the key checks
            print(f"error: config `{err.full_key}`: is not set (`???` in the config). Fix: pass "
                  f"`{err.full_key}=<value>` after --config.", file=sys.stderr)
            return 2
        except (AcadlmError, OmegaConfBaseException) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(plan_json(plan) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
