"""Model and tokenizer builders for torchtune configs (``_component_: acadlm_plugins.models.X``).

``decoder_from_hf_config`` builds any supported family from an HF folder; ``hf_model_spec`` is
the family layer's entry point (builder, checkpointer ``model_type``, export converter).
"""

from acadlm_plugins.models.families import (
    SUPPORTED_FAMILIES,
    HFModelSpec,
    decoder_from_hf_config,
    hf_model_spec,
)
from acadlm_plugins.models.smollm2 import smollm2_135m, tiny_llama
from acadlm_plugins.models.tokenizer import SmolLM2Tokenizer, smollm2_tokenizer

__all__ = ["SUPPORTED_FAMILIES", "HFModelSpec", "SmolLM2Tokenizer", "decoder_from_hf_config",
           "hf_model_spec", "smollm2_135m", "smollm2_tokenizer", "tiny_llama"]
