"""Chaining recipes into an end-to-end pipeline (``recipes/*/pipeline.py``).

Every stage of a pipeline is an ordinary command a user could type -- ``tune run <recipe>
--config <yaml> key=value ...`` or one of our console scripts -- run as a child process, so each
stage can be rerun, resumed or changed on its own and the pipeline adds no behaviour of its own.
A failed stage stops the pipeline with the stage's exit code (2 for a user error) and a line
naming the stage and saying how to continue; a malformed ``--set`` exits 2 before any stage.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def console_script(name: str) -> str:
    """The path of an installed console script: on ``PATH``, else next to this Python."""
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def stage_overrides(extra: Sequence[str], stages: Sequence[str], *,
                    example: str) -> dict[str, list[str]]:
    """``--set`` values ``["judge:a.b=1", ...]`` -> ``{"judge": ["a.b=1"], ...}`` over
    ``stages``; ``STAGE:~a.b`` removes a key, as on torchtune's command line. A malformed entry
    stops the pipeline before any stage runs."""
    found: dict[str, list[str]] = {stage: [] for stage in stages}
    for item in extra:
        stage, sep, override = item.partition(":")
        if not sep or stage not in found or ("=" not in override and not override.startswith("~")):
            print(f"error: --set {item!r}: expected STAGE:key=value with STAGE one of "
                  f"{', '.join(stages)}, e.g. --set {example}", file=sys.stderr, flush=True)
            sys.exit(2)
        found[stage].append(override)
    return found


def run_stage(command: Sequence[str], *, stage: str) -> None:
    """Run ``command``, echoing it first; if it fails, exit the pipeline with its exit code,
    naming ``stage`` (the name its ``--set`` uses)."""
    printable = " ".join(str(part) for part in command)
    print(f"\n$ {printable}", flush=True)
    result = subprocess.run([str(part) for part in command], check=False)
    if result.returncode:
        print(f"stage {stage} failed with exit code {result.returncode}; fix the error above "
              "and rerun: finished stages resume from their outputs.", file=sys.stderr,
              flush=True)
        sys.exit(result.returncode)


def tune_run(recipe: str, config: Path | str, overrides: Sequence[str] = (),
             nproc: int = 1, *, stage: str | None = None) -> None:
    """``tune run [--nproc_per_node N] <recipe> --config <config> <overrides>`` as the stage
    ``stage`` (the recipe's name when not given)."""
    command = [console_script("tune"), "run"]
    if nproc > 1:
        command += ["--nproc_per_node", str(nproc)]
    command += [recipe, "--config", str(config), *overrides]
    run_stage(command, stage=stage or recipe)
