"""The cosine schedule with a floor (ProLong's "cosine to 10% of the peak")."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.training.lr_schedules import cosine_schedule_with_min_lr


def learning_rates(steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    schedule = cosine_schedule_with_min_lr(optimizer, steps, **kwargs)
    rates = []
    for _ in range(steps + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def test_warm_up_then_cosine_to_ten_percent_of_the_peak():
    rates = learning_rates(20, warmup_ratio=0.1, min_lr_ratio=0.1)  # 2 warm-up steps
    assert rates[0] == pytest.approx(1e-5 / 3) and rates[1] == pytest.approx(2e-5 / 3)
    assert rates[2] == pytest.approx(1e-5)
    halfway = 2 + 9  # half of the 18 decay steps
    assert rates[halfway] == pytest.approx(1e-6 + 9e-6 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert rates[20] == pytest.approx(1e-6)
    assert min(rates) == pytest.approx(1e-6)
    assert all(a >= b for a, b in itertools.pairwise(rates[2:]))


def test_the_warm_up_ratio_is_rounded_to_the_nearest_step():
    """0.05 x 30 = 1.5 rounds to 2 warm-up steps (truncation would give 1); 0.29 x 100 is
    28.999999999999996 in floating point, 29 steps rounded, 28 truncated."""
    assert learning_rates(30, warmup_ratio=0.05)[0] == pytest.approx(1e-5 / 3)
    rates = learning_rates(100, warmup_ratio=0.29)
    assert rates[28] == pytest.approx(29 / 30 * 1e-5) and rates[29] == pytest.approx(1e-5)


def test_the_default_floor_is_ten_percent_of_the_peak():
    rates = learning_rates(10)
    assert rates[0] == pytest.approx(1e-5)  # no warm-up unless asked for
    assert rates[10] == pytest.approx(1e-6)


def test_zero_floor_is_torchtunes_cosine_after_the_warm_up():
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

    ours = learning_rates(10, num_warmup_steps=0, min_lr_ratio=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    theirs_schedule = get_cosine_schedule_with_warmup(optimizer, 0, 10)
    theirs = []
    for _ in range(11):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs_schedule.step()
    assert ours == pytest.approx(theirs)


@pytest.mark.parametrize("kwargs, key", [
    ({"num_warmup_steps": 1, "warmup_ratio": 0.1}, "lr_scheduler.warmup_ratio"),
    ({"warmup_ratio": 1.5}, "lr_scheduler.warmup_ratio"),
    ({"min_lr_ratio": 2.0}, "lr_scheduler.min_lr_ratio"),
    ({"num_warmup_steps": 10}, "lr_scheduler.num_warmup_steps"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        learning_rates(10, **kwargs)
    assert err.value.key == key
