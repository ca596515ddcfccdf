"""Issue 17: tests, benchmarks and recipes find the embedded default through the project's path
functions (``acadlm_plugins.defaults.paths``, or ``${acadlm_home:}`` in a config), never through a
literal home path, which a user who sets ``ACADLM_HOME`` does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[1]
SCANNED_DIRS = ("tests", "benchmarks", "recipes")
SCANNED_SUFFIXES = {".py", ".yaml", ".yml"}

# The default home's tail, as a path string (``.cache/acadlm``, with or without ``~/``) or as
# joined parts (``".cache" / "acadlm"``, ``os.path.join(".cache", "acadlm")``).
LITERAL_HOME = re.compile(r"""\.cache["']?\s*[/,]\s*["']?acadlm""")


def literal_home_paths(root: Path) -> list[str]:
    """``path:line: text`` for every literal default-home path under ``root``'s scanned dirs."""
    hits = []
    for folder in SCANNED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in SCANNED_SUFFIXES or not path.is_file() or \
                    path.resolve() == THIS_FILE:
                continue
            if any(part in {".venv", "__pycache__", ".pytest_cache"} for part in path.parts):
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if LITERAL_HOME.search(line):
                    hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_no_literal_default_home_in_tests_benchmarks_or_recipes():
    hits = literal_home_paths(REPO)
    assert not hits, (
        "Literal default-home paths found; use acadlm_plugins.defaults.paths "
        "(default_model_dir(), default_corpus_dir(), require_default_model(), ...) or "
        "${acadlm_home:} in a config, so ACADLM_HOME is honoured:\n" + "\n".join(hits))


@pytest.mark.parametrize("line", [
    'SMOLLM2 = Path("~/.cache/acadlm/models/SmolLM2-135M-Instruct").expanduser()',
    'HOME = Path(os.environ.get("ACADLM_HOME", "~/.cache/acadlm")).expanduser()',
    'MODEL = Path.home() / ".cache" / "acadlm" / "models"',
    'MODEL = os.path.join(home, ".cache", "acadlm")',
    "checkpoint_dir: ${oc.env:HOME}/.cache/acadlm/models/SmolLM2-135M-Instruct",
])
def test_the_scan_catches_each_spelling(tmp_path: Path, line: str):
    """The scan is not vacuous: each spelling, planted in a scanned folder, is reported."""
    for folder in SCANNED_DIRS:
        (tmp_path / folder).mkdir()
    suffix = ".yaml" if line.startswith("checkpoint_dir") else ".py"
    planted = tmp_path / "benchmarks" / f"planted{suffix}"
    planted.write_text(f"ok = 1\n{line}\n")
    assert literal_home_paths(tmp_path) == [f"benchmarks/planted{suffix}:2: {line}"]


def test_the_project_path_function_is_not_reported(tmp_path: Path):
    for folder in SCANNED_DIRS:
        (tmp_path / folder).mkdir()
    (tmp_path / "tests" / "fine.py").write_text(
        "from acadlm_plugins.defaults.paths import default_model_dir\n"
        "MODEL = default_model_dir()\n")
    (tmp_path / "recipes" / "fine.yaml").write_text(
        "checkpoint_dir: ${acadlm_home:}/models/SmolLM2-135M-Instruct\n")
    assert literal_home_paths(tmp_path) == []
