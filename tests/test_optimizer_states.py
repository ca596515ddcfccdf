"""Optimizer moments saved by one optimizer, loaded into another (a long-context stage that
switches between torch AdamW and torchao's low-bit AdamW, or a run resumed with another
optimizer): ``dequantize_states`` / ``match_loaded_states`` in training/optimizers.py."""

from __future__ import annotations

import pytest
import torch

from acadlm_plugins.training.optimizers import (
    dequantize_states,
    float_state_dict,
    gets_low_bit_state,
    match_loaded_states,
    requantize_states,
)

pytest.importorskip("torchao.optim")


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    # 64 x 64 = 4096 values get low-bit moments; the bias (64 values) keeps plain ones.
    return torch.nn.Linear(64, 64).to(dtype)


def _stepped_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer``'s state dict after one step's worth of moments, set directly (so torchao's
    compiled update is not needed): exp_avg in [-1, 1], exp_avg_sq in [0, 1]."""
    generator = torch.Generator().manual_seed(1)
    for group in optimizer.param_groups:
        for param in group["params"]:
            signed = torch.rand(param.shape, generator=generator) * 2 - 1
            square = torch.rand(param.shape, generator=generator)
            if hasattr(optimizer, "_new_buffer"):
                exp_avg, exp_avg_sq = (optimizer._new_buffer(param, True),
                                       optimizer._new_buffer(param, False))
                exp_avg.copy_(signed)
                exp_avg_sq.copy_(square)
            else:
                exp_avg, exp_avg_sq = signed.to(param.dtype), square.to(param.dtype)
            optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": exp_avg,
                                      "exp_avg_sq": exp_avg_sq}
    return optimizer.state_dict()


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.dequantize() if hasattr(value, "codes") else value


def _kinds(optimizer: torch.optim.Optimizer) -> list[str]:
    return [type(optimizer.state[p]["exp_avg"]).__name__ for p in optimizer.param_groups[0]["params"]]


def test_8bit_moments_loaded_into_adamw_become_plain_and_train() -> None:
    from torchao.optim import AdamW8bit

    model = _model()
    saved = _stepped_state(AdamW8bit(model.parameters()))
    assert {type(s["exp_avg"]).__name__ for s in saved["state"].values()} == {
        "OptimState8bit", "Tensor"}
    adamw = torch.optim.AdamW(model.parameters())
    adamw.load_state_dict(saved)
    assert dequantize_states(adamw) == 2  # the weight's exp_avg and exp_avg_sq
    assert _kinds(adamw) == ["Tensor", "Tensor"]
    for index, param in enumerate(model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            loaded = adamw.state[param][key]
            assert loaded.dtype == param.dtype and loaded.shape == param.shape
            assert torch.equal(loaded, _plain(saved["state"][index][key]))
    model(torch.randn(2, 64)).sum().backward()
    adamw.step()  # a low-bit state here fails: OptimState8bit implements no lerp_
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_moments_keep_the_parameters_dtype_in_adamw() -> None:
    from torchao.optim import AdamW8bit

    model = _model(torch.bfloat16)
    saved = _stepped_state(AdamW8bit(model.parameters()))
    adamw = torch.optim.AdamW(model.parameters())
    adamw.load_state_dict(saved)
    dequantize_states(adamw)
    assert {adamw.state[p]["exp_avg"].dtype for p in model.parameters()} == {torch.bfloat16}


def test_moments_already_in_the_optimizers_form_stay_exactly_as_loaded() -> None:
    from torchao.optim import AdamW8bit

    model = _model()
    saved = _stepped_state(AdamW8bit(model.parameters()))
    again = AdamW8bit(model.parameters())
    again.load_state_dict(saved)
    assert match_loaded_states(again) == 0
    weight = next(model.parameters())
    assert torch.equal(again.state[weight]["exp_avg"].codes, saved["state"][0]["exp_avg"].codes)


def test_another_bit_width_is_requantized_through_float32() -> None:
    from torchao.optim import AdamW4bit, AdamW8bit

    model = _model()
    saved = _stepped_state(AdamW8bit(model.parameters()))
    four = AdamW4bit(model.parameters())
    four.load_state_dict(saved)
    assert _kinds(four) == ["OptimState8bit", "Tensor"]
    assert match_loaded_states(four) == 4  # dequantized, then quantized again
    assert _kinds(four) == ["OptimState4bit", "Tensor"]
    weight = next(model.parameters())
    torch.testing.assert_close(four.state[weight]["exp_avg_sq"].dequantize(),
                               saved["state"][0]["exp_avg_sq"].dequantize(), rtol=0, atol=0.1)


def test_adamw_moments_into_8bit_are_quantized_and_nothing_else_changes() -> None:
    from torchao.optim import AdamW8bit

    model = _model()
    saved = _stepped_state(torch.optim.AdamW(model.parameters()))
    eight = AdamW8bit(model.parameters())
    eight.load_state_dict(saved)
    assert dequantize_states(eight) == 0
    assert requantize_states(eight) == 2
    assert _kinds(eight) == ["OptimState8bit", "Tensor"]
    weight = next(model.parameters())
    exp_avg = eight.state[weight]["exp_avg"]
    assert exp_avg.signed  # the first moment is negative as often as positive
    torch.testing.assert_close(exp_avg.dequantize(), saved["state"][0]["exp_avg"],
                               rtol=0, atol=0.02)


def test_a_state_dict_for_fsdp_gets_float32_moments() -> None:
    from torchao.optim import AdamW8bit

    model = _model()
    saved = _stepped_state(AdamW8bit(model.parameters()))
    converted = float_state_dict(saved)
    assert converted["param_groups"] == saved["param_groups"]
    for index, moments in converted["state"].items():
        assert {type(v) for v in moments.values()} == {torch.Tensor}
        assert torch.equal(moments["exp_avg"], _plain(saved["state"][index]["exp_avg"]))
    assert type(saved["state"][0]["exp_avg"]).__name__ == "OptimState8bit"  # not modified


@pytest.mark.parametrize("numel, low_bit", [(4096, True), (4352, True), (4100, False),
                                             (256, False)])
def test_low_bit_moments_need_4096_values_in_whole_blocks(numel: int, low_bit: bool) -> None:
    from torchao.optim import AdamW8bit

    param = torch.nn.Parameter(torch.empty(numel))
    assert gets_low_bit_state(param, 256) is low_bit
    buffer = AdamW8bit([param])._new_buffer(param, True)  # what torchao itself gives it
    assert (type(buffer).__name__ == "OptimState8bit") is low_bit
