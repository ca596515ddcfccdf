"""The torchtune builders, and the embedded checkpoint loaded by torchtune and by transformers."""

from __future__ import annotations

import pytest
import torch

from acadlm_plugins.models import smollm2_135m, tiny_llama

SENTENCE = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."


def test_tiny_llama_forward_on_random_tokens():
    torch.manual_seed(0)
    model = tiny_llama()
    tokens = torch.randint(0, 512, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 512)
    assert torch.isfinite(logits).all()
    assert "output.weight" not in model.state_dict()  # tied to the embedding


def test_smollm2_135m_shape_and_overrides():
    with torch.device("meta"):
        model = smollm2_135m(max_seq_len=16384, rope_base=500_000)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    rope = model.layers[0].attn.pos_embeddings
    assert rope.max_seq_len == 16384 and rope.base == 500_000


@pytest.mark.integration
def test_checkpoint_logits_agree_between_torchtune_and_transformers(tmp_path):
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM

    from acadlm_plugins.defaults import require_default_model
    from acadlm_plugins.models import smollm2_tokenizer

    model_dir = require_default_model()
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(model_dir),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path / "out"),
    )
    model = smollm2_135m()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    hf_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)

    tokens = torch.tensor([smollm2_tokenizer().encode(SENTENCE, add_bos=False, add_eos=False)])
    with torch.no_grad():
        ours = model.eval()(tokens)
        theirs = hf_model.eval()(tokens).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
