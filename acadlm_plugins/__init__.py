"""acadlm-plugins: academic-budget LM training methods as torchtune recipes and pluggy plugins.

Plugin authors write ``from acadlm_plugins import hookimpl`` and decorate functions named
after the hooks in :mod:`acadlm_plugins.hookspecs`.
"""

from acadlm_plugins.hookspecs import hookimpl, hookspec

__all__ = ["__version__", "hookimpl", "hookspec"]
__version__ = "0.1.0"
