"""Resuming with another optimizer than a checkpoint was saved with: the param groups'
values take the form the new optimizer keeps them in (``match_loaded_groups``), and the
optimizer's own ConfigErrors reach the user unwrapped (``build_optimizer``)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.optimizers import build_optimizer, match_loaded_states

pytest.importorskip("torchao.optim")


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))]


def _adamw_state() -> dict:
    params = _params()
    adamw = torch.optim.AdamW(params, lr=3e-4)
    for param in params:
        param.grad = torch.ones_like(param)
    adamw.step()
    return adamw.state_dict()


def test_torch_adamw_groups_loaded_into_adamw8bit_get_a_tensor_lr_back() -> None:
    """torchao's step refused AdamW's float lr: `lr was changed to a non-Tensor object`."""
    from torchao.optim import AdamW8bit

    low_bit = AdamW8bit(_params(), lr=1e-3)
    low_bit.load_state_dict(_adamw_state())
    assert not isinstance(low_bit.param_groups[0]["lr"], torch.Tensor)  # what torch leaves
    assert match_loaded_states(low_bit) == 2  # the 64x64 tensor's two moments, quantized
    lr = low_bit.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32
    assert float(lr) == pytest.approx(3e-4)  # the saved value, as the resumed schedule has it
    torch.optim.lr_scheduler.LambdaLR(low_bit, lambda step: 0.5)  # sets lr at once
    assert isinstance(low_bit.param_groups[0]["lr"], torch.Tensor)  # filled in place
    assert float(low_bit.param_groups[0]["lr"]) == pytest.approx(1.5e-4)


def test_adamw8bit_groups_loaded_into_torch_adamw_get_a_float_lr_back() -> None:
    from torchao.optim import AdamW8bit

    params = _params()
    saved = AdamW8bit(params, lr=3e-4).state_dict()
    assert isinstance(saved["param_groups"][0]["lr"], torch.Tensor)
    adamw = torch.optim.AdamW(_params(), lr=1e-3)
    adamw.load_state_dict(saved)
    match_loaded_states(adamw)
    lr = adamw.param_groups[0]["lr"]
    assert type(lr) is float and lr == pytest.approx(3e-4)


@pytest.mark.parametrize(("optimizer", "key", "words"), [
    ({"_component_": "torchao.optim.AdamW8bitt"}, "optimizer._component_", "cannot import"),
    ({"_component_": "torch.optim.AdamW", "nonsense": 1}, "optimizer.nonsense", "weight_decay"),
    ({"_component_": "torch.optim.AdamW", "lr": -1.0}, "optimizer", "Invalid learning rate"),
])
def test_optimizer_errors_name_their_key_once(optimizer, key, words) -> None:
    """A mistyped path read `optimizer: torchao.optim.AdamW8bitt rejected its arguments
    (config `optimizer._component_`: cannot import ...)`, one error wrapped in another."""
    cfg = OmegaConf.create({"optimizer": optimizer})
    with pytest.raises(ConfigError) as raised:
        build_optimizer(cfg, _params(), device=torch.device("cpu"), distributed=False)
    message = str(raised.value)
    assert raised.value.key == key and words in message, message
    assert message.count("config `") == 1, message


def test_cpu_offload_inner_torchao_optimizers_keep_a_tensor_lr() -> None:
    """``CPUOffloadOptimizer`` (CUDA only, so stood in for here by its ``optim_dict``) exposes
    its per-parameter optimizers' groups: an inner AdamW8bit must get a tensor lr, not the float
    the outer optimizer (no torchao Adam itself) would otherwise be given."""
    from types import SimpleNamespace

    from torchao.optim import AdamW8bit

    from acadlm_plugins.training.optimizers import match_loaded_groups

    params = _params()
    inner = {p: AdamW8bit([p], lr=1e-3) for p in params}
    for part in inner.values():
        part.param_groups[0]["lr"] = 3e-4  # as load_state_dict of an AdamW checkpoint leaves it
    offload = SimpleNamespace(optim_dict=inner, d_opt=None,
                              param_groups=[g for o in inner.values() for g in o.param_groups])
    assert match_loaded_groups(offload) == 2
    assert all(isinstance(g["lr"], torch.Tensor) for g in offload.param_groups)


def test_cpu_offload_resume_converts_its_inner_optimizers_moments() -> None:
    """``CPUOffloadOptimizer`` has no ``state`` of its own (it never calls
    ``Optimizer.__init__``): resuming it crashed on ``optimizer.state``. Float32 moments loaded
    into its inner AdamW8bit optimizers get their low-bit form back."""
    from types import SimpleNamespace

    from torchao.optim import AdamW8bit

    from acadlm_plugins.training.optimizers import match_loaded_states

    params = _params()
    inner = {p: AdamW8bit([p], lr=1e-3) for p in params}
    for param, part in inner.items():  # float moments, as a torch AdamW checkpoint leaves them
        part.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                             "exp_avg_sq": torch.zeros_like(param)}
    offload = SimpleNamespace(optim_dict=inner, d_opt=None,
                              param_groups=[g for o in inner.values() for g in o.param_groups])
    converted = match_loaded_states(offload)
    low_bit = [part.state[p]["exp_avg"] for p, part in inner.items()
               if type(part.state[p]["exp_avg"]) is not torch.Tensor]
    assert converted == 2 * len(low_bit) > 0
