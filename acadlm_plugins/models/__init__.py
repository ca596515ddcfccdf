"""Model and tokenizer builders for torchtune configs (``_component_: acadlm_plugins.models.X``)."""

from acadlm_plugins.models.smollm2 import smollm2_135m, tiny_llama
from acadlm_plugins.models.tokenizer import SmolLM2Tokenizer, smollm2_tokenizer

__all__ = ["SmolLM2Tokenizer", "smollm2_135m", "smollm2_tokenizer", "tiny_llama"]
