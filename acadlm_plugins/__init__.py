"""acadlm-plugins: academic-budget LM training methods as torchtune recipes and pluggy plugins.

Plugin authors write ``from acadlm_plugins import hookimpl`` and decorate functions named
after the hooks in :mod:`acadlm_plugins.hookspecs`.

Importing the package also registers the ``acadlm`` model with lm-eval (a lazy placeholder: the
adapter and torch load only when an evaluation builds the model).
"""

from acadlm_plugins.evaluation.registry import register_lm_eval_model
from acadlm_plugins.hookspecs import hookimpl, hookspec

__all__ = ["__version__", "hookimpl", "hookspec"]
__version__ = "0.1.0"

register_lm_eval_model()
