"""docs/plugins.md and the hookspecs docstring against the code: every hook in the documented
order, every built-in plugin listed, and only the recipes that build a plugin manager named as
calling the hooks (the real order is checked by a traced run in test_plugin_recipe_setup.py)."""

from __future__ import annotations

import re
from pathlib import Path

from acadlm_plugins import hookspecs
from acadlm_plugins.plugin_manager import BUILTIN_PLUGINS

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGINS_DOC = (REPO_ROOT / "docs" / "plugins.md").read_text()
HOOKS = [name for name in vars(hookspecs) if name.startswith("acadlm_")]


def _order_block(text: str) -> str:
    """The hook-order diagram: from the first `acadlm_configure ->` to `acadlm_run_end`."""
    start = text.index("acadlm_configure ->")
    return text[start:text.index("acadlm_run_end", start)]


def test_the_documented_hook_order_names_every_hook_and_the_step_zero_evaluation():
    for text in (PLUGINS_DOC, hookspecs.__doc__):
        block = _order_block(text) + "acadlm_run_end"
        assert [h for h in HOOKS if h not in block] == []
        assert "step=0" in block
        assert block.index("acadlm_prepare_model") < block.index("acadlm_model_built")
        assert block.index("acadlm_model_exported") < block.index("acadlm_run_end")


def test_plugins_doc_lists_every_builtin_plugin():
    assert [path for path in BUILTIN_PLUGINS if f"`{path}`" not in PLUGINS_DOC] == []


def test_only_recipes_that_build_a_plugin_manager_are_said_to_call_hooks():
    sources = {path.stem: path.read_text() for path in (REPO_ROOT / "acadlm_plugins").glob(
        "*_recipe.py")}
    with_hooks = {name for name, source in sources.items()
                  if "build_plugin_manager" in source or "ContinuedPretrainRecipe" in source}
    assert with_hooks == {"continued_pretrain_recipe", "prune_recipe", "long_context_recipe"}
    intro = PLUGINS_DOC.split("## ", 1)[0]
    for text in (intro, hookspecs.__doc__.split("A recipe calls", 1)[0]):
        named = set(re.findall(r"`?(\w+_recipe)`?", text))
        assert named == with_hooks
        # the rater is named only among the recipes that call no hook
        assert "rater" not in text.split("The other recipes")[0]
        assert "rater" in text.split("The other recipes")[1]
