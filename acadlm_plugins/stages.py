"""Chaining recipes into an end-to-end pipeline (``recipes/*/pipeline.py``).

Every stage of a pipeline is an ordinary command a user could type -- ``tune run <recipe>
--config <yaml> key=value ...`` or one of our console scripts -- run as a child process, so each
stage can be rerun, resumed or changed on its own and the pipeline adds no behaviour of its own.
A failed stage stops the pipeline with the stage's exit code and a line saying how to continue.
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
            raise SystemExit(f"--set {item!r}: expected STAGE:key=value with STAGE one of "
                             f"{', '.join(stages)}, e.g. --set {example}")
        found[stage].append(override)
    return found


def run_stage(command: Sequence[str], *, stage: str) -> None:
    """Run ``command``, echoing it first; exit the pipeline if it fails."""
    printable = " ".join(str(part) for part in command)
    print(f"\n$ {printable}", flush=True)
    result = subprocess.run([str(part) for part in command], check=False)
    if result.returncode:
        sys.exit(f"stage {stage} failed with exit code {result.returncode}; fix the error above "
                 "and rerun: finished stages resume from their outputs.")


def tune_run(recipe: str, config: Path | str, overrides: Sequence[str] = (),
             nproc: int = 1) -> None:
    """``tune run [--nproc_per_node N] <recipe> --config <config> <overrides>`` as one stage."""
    command = [console_script("tune"), "run"]
    if nproc > 1:
        command += ["--nproc_per_node", str(nproc)]
    command += [recipe, "--config", str(config), *overrides]
    run_stage(command, stage=recipe)
