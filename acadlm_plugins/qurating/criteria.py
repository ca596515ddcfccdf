"""The criteria a judge LM compares two texts on, each a prompt template in a text file.

Four criteria ship with the package (``prompts/<name>.txt``): ``writing_style``,
``required_expertise``, ``facts_and_trivia`` and ``educational_value``, after the four of
QuRating (Wettig et al., 2024), written in our own words. A user adds a criterion by listing the
path of their own prompt file in the config; its name is the file's stem (``my_prompts/
clarity.txt`` -> ``clarity``), and it becomes a key of every judgment row and, later, a rater
head and a ``score_<name>`` column, hence the restriction to lower-case identifiers.

A template is Python ``str.format`` text with exactly two fields, ``{text_a}`` and
``{text_b}``, each used once (literal braces are written ``{{`` and ``}}``). The texts are
substituted, never parsed again, so braces inside a corpus text (code!) are safe. A template
should end by asking for a single letter, A or B: the judges read the probabilities of those
two answers.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.qurating import CRITERIA

PROMPTS_DIR = Path(__file__).parent / "prompts"
PLACEHOLDERS = ("text_a", "text_b")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Criterion:
    """A criterion's name and its checked prompt template."""

    name: str
    template: str
    path: Path

    def render(self, text_a: str, text_b: str) -> str:
        """The prompt asking which of ``text_a`` (shown as A) and ``text_b`` (B) is better."""
        return self.template.format(text_a=text_a, text_b=text_b)


def check_template(template: str, *, where: str, key: str) -> None:
    """Refuse a template that does not hold ``{text_a}`` and ``{text_b}`` exactly once each,
    has other fields, or has an unpaired brace. ``where`` names the file, ``key`` the config
    key, both for the error message."""
    fix = ("write `{text_a}` and `{text_b}` once each where the two texts go, and double any "
           "literal brace (`{{`, `}}`).")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ConfigError(key, f"{where}: the template cannot be read ({err}).", fix) from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parsed
              if name is not None]
    names = [name for name, _, _ in fields]
    unknown = sorted({name for name in names if name not in PLACEHOLDERS})
    if unknown:
        shown = ", ".join("{" + (name or "") + "}" for name in unknown)
        raise ConfigError(key, f"{where}: unknown placeholder(s) {shown}; only {{text_a}} and "
                          "{text_b} are filled in.", fix)
    for placeholder in PLACEHOLDERS:
        count = names.count(placeholder)
        if count != 1:
            raise ConfigError(key, f"{where}: the placeholder {{{placeholder}}} appears {count} "
                              "times; it must appear exactly once.", fix)
    for name, spec, conversion in fields:
        if spec or conversion:
            raise ConfigError(key, f"{where}: the placeholder {{{name}}} has a format spec or "
                              "conversion; the texts are inserted as they are.", fix)


def load_criterion(spec: str | Path, *, key: str = "criteria") -> Criterion:
    """A built-in criterion by name, or a user's criterion from a prompt file path."""
    text = str(spec)
    if text in CRITERIA:
        path = PROMPTS_DIR / f"{text}.txt"
    else:
        path = Path(text).expanduser()
        looks_like_path = "/" in text or path.suffix != "" or path.exists()
        if not looks_like_path:
            close = difflib.get_close_matches(text, CRITERIA, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(key, f"{text!r} is neither a built-in criterion {list(CRITERIA)} "
                              "nor a prompt file path.",
                              hint + "name a built-in criterion or give the path of a .txt "
                              "prompt file with {text_a} and {text_b}.")
        if not path.is_file():
            raise ConfigError(key, f"the prompt file {path} does not exist.",
                              "give the path of a .txt prompt file with {text_a} and {text_b}.")
    name = path.stem
    if not NAME_PATTERN.match(name):
        raise ConfigError(key, f"{path}: the criterion name {name!r} (the file's stem) is not a "
                          "lower-case identifier; it becomes a judgment key and a column name.",
                          "rename the file, e.g. `clarity_of_argument.txt`.")
    try:
        template = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"cannot read the prompt file {path} ({err}).",
                          "give a readable UTF-8 text file.") from None
    check_template(template, where=str(path), key=key)
    return Criterion(name=name, template=template, path=path)


def load_criteria(specs: Sequence[str | Path] | str | None, *,
                  key: str = "criteria") -> list[Criterion]:
    """The criteria of a config list (built-in names and/or prompt file paths), checked and
    with distinct names; ``None`` means the four built-in criteria."""
    if specs is None:
        specs = list(CRITERIA)
    elif isinstance(specs, (str, Path)):
        specs = [specs]
    if not specs:
        raise ConfigError(key, "is empty.", f"list at least one criterion, e.g. {list(CRITERIA)}.")
    criteria: list[Criterion] = []
    for spec in specs:
        criterion = load_criterion(spec, key=key)
        clash = next((c for c in criteria if c.name == criterion.name), None)
        if clash is not None:
            raise ConfigError(key, f"two criteria are named {criterion.name!r} ({clash.path} "
                              f"and {criterion.path}).", "rename one of the prompt files.")
        criteria.append(criterion)
    return criteria
