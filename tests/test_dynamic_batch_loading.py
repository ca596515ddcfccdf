"""Dynamic batch loading (Sheared-LLaMA Algorithm 1) and its plugin."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from acadlm_plugins.data.dynamic_batch_loading import update_domain_weights
from acadlm_plugins.data.mixture import DomainBatchSampler
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.plugins.dynamic_batch_loading import DynamicBatchLoadingPlugin


def test_update_matches_the_paper_formula_by_hand():
    w, losses, ref = [0.5, 0.3, 0.2], [2.5, 1.0, 3.0], [2.0, 1.5, 2.0]
    eta, c = 1.0, 1e-4
    alpha = np.array(w) * np.exp(eta * np.maximum(np.array(losses) - ref, 0))
    expected = (1 - c) * alpha / alpha.sum() + c / 3
    assert np.allclose(update_domain_weights(w, losses, ref, eta=eta, smoothing=c), expected)


def test_domains_at_or_below_reference_lose_share_and_lagging_ones_gain():
    new = update_domain_weights([1 / 3] * 3, [3.0, 1.0, 1.0], [2.0, 2.0, 1.0])
    assert new[0] > 1 / 3 > new[1]
    assert new[1] == pytest.approx(new[2])
    assert new.sum() == pytest.approx(1.0)


def test_no_excess_keeps_weights_and_smoothing_keeps_every_domain_alive():
    assert np.allclose(update_domain_weights([0.2, 0.8], [1.0, 1.0], [2.0, 2.0], smoothing=0),
                       [0.2, 0.8])
    squeezed = update_domain_weights([1.0, 0.0], [0.0, 0.0], [1.0, 1.0], smoothing=0.1)
    assert squeezed[1] == pytest.approx(0.05)


def test_huge_excess_does_not_overflow():
    new = update_domain_weights([0.5, 0.5], [1e4, 0.0], [0.0, 0.0])
    assert np.isfinite(new).all() and new[0] > 0.99


# The reviewer's case: four domains, one update from uniform weights with the released code's
# eta = 1 and c = 1e-4 (dynamic_loading_callback.py hard-codes both).
CASE_WEIGHTS, CASE_LOSSES = [0.25] * 4, [2.0, 3.1, 2.6, 2.9]
CASE_REFERENCE = [2.2, 3.0, 2.4, 3.2]


def _released_update(weights, losses, reference, eta=1.0, c=1e-4):
    """LLM-Shearing's ``update_proportion`` ("doremi"), written out: the signed difference,
    softmax(log w + eta * diff), then (1 - c) * a + c / k, renormalized."""
    logits = np.log(weights) + eta * (np.asarray(losses) - np.asarray(reference))
    alpha = np.exp(logits) / np.exp(logits).sum()
    mixed = (1 - c) * alpha + c / len(weights)
    return mixed / mixed.sum()


def test_signed_excess_is_the_released_codes_update():
    signed = update_domain_weights(CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE, eta=1.0,
                                   smoothing=1e-4, excess="signed")
    assert np.allclose(signed, [0.2107, 0.2844, 0.3143, 0.1906], atol=5e-5)
    assert np.allclose(signed, _released_update(CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE))
    # Below its reference, domain 3 (-0.3) now loses more than domain 0 (-0.2); clamped, the two
    # are alike.
    assert signed[3] < signed[0]


def test_clamped_excess_is_the_default_and_unchanged():
    default = update_domain_weights(CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE)
    clamped = update_domain_weights(CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE, excess="clamped")
    alpha = np.array(CASE_WEIGHTS) * np.exp(np.maximum(np.subtract(CASE_LOSSES, CASE_REFERENCE), 0))
    expected = (1 - 1e-4) * alpha / alpha.sum() + 1e-4 / 4
    assert np.array_equal(default, clamped) and np.allclose(clamped, expected)
    assert clamped[0] == pytest.approx(clamped[3])
    with pytest.raises(ValueError, match="excess"):
        update_domain_weights(CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE, excess="raw")


def test_non_finite_losses_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        update_domain_weights([0.5, 0.5], [float("nan"), 1.0], [1.0, 1.0])


def _plugin(eval_every_n_steps=None, **block):
    settings = {"output_dir": ".", "dynamic_batch_loading": {"enabled": True, **block}}
    if eval_every_n_steps is not None:
        settings["eval_every_n_steps"] = eval_every_n_steps
    cfg = OmegaConf.create(settings)
    plugin = DynamicBatchLoadingPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe="test")
    return plugin, cfg


def test_plugin_updates_sampler_only_at_the_interval_and_uses_initial_reference():
    plugin, cfg = _plugin(update_interval=2)
    assert cfg.eval_every_n_steps == 2
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 2.0, "b": 2.0}, metrics={})
    assert plugin.reference == {"a": 2.0, "b": 2.0}
    metrics = plugin.acadlm_evaluation_end(step=2, domain_losses={"a": 2.5, "b": 1.0}, metrics={})
    assert sampler.weights[0] > 0.5 and plugin.history[-1]["updated"] is True
    assert metrics["domain_weight/a"] == pytest.approx(float(sampler.weights[0]))
    assert metrics["domain_excess_loss/a"] == pytest.approx(0.5)
    state = plugin.acadlm_state_dict()
    fresh, _ = _plugin(update_interval=2)
    fresh.acadlm_load_state_dict(states=state)
    assert fresh.reference == plugin.reference and fresh.history == plugin.history


def test_evaluations_between_updates_leave_the_weights_alone():
    """Evaluating every step with an update interval of 2: the step-1 losses are logged, but
    the weights move only at step 2."""
    plugin, cfg = _plugin(eval_every_n_steps=1, update_interval=2)
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 2.0, "b": 2.0}, metrics={})
    plugin.acadlm_evaluation_end(step=1, domain_losses={"a": 2.5, "b": 1.0}, metrics={})
    assert sampler.weights.tolist() == [0.5, 0.5] and plugin.history[-1]["updated"] is False
    plugin.acadlm_evaluation_end(step=2, domain_losses={"a": 2.5, "b": 1.0}, metrics={})
    assert sampler.weights[0] > 0.5 and plugin.history[-1]["updated"] is True


@pytest.mark.parametrize("at_start", [False, True])
def test_update_at_start_updates_from_the_step0_evaluation_with_given_references(at_start):
    """Sheared-LLaMA's continued pre-training (eval_first=true): the mix moves before step 1."""
    block = {"update_interval": 4, "reference_losses": {"a": 1.0, "b": 1.0}}
    plugin, cfg = _plugin(**block, **({"update_at_start": True} if at_start else {}))
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 3.0, "b": 1.0}, metrics={})
    expected = update_domain_weights([0.5, 0.5], [3.0, 1.0], [1.0, 1.0], eta=1.0, smoothing=1e-4)
    assert sampler.weights.tolist() == pytest.approx(list(expected) if at_start else [0.5, 0.5])
    assert plugin.history[-1]["updated"] is at_start


def test_update_at_start_needs_given_references():
    with pytest.raises(ConfigError) as err:
        _plugin(update_at_start=True)
    assert err.value.key == "dynamic_batch_loading.update_at_start"


@pytest.mark.parametrize("block, key", [
    ({"update_intervall": 3}, "dynamic_batch_loading.update_intervall"),
    ({"update_interval": 0}, "dynamic_batch_loading.update_interval"),
    ({"smoothing": 1.5}, "dynamic_batch_loading.smoothing"),
    ({"reference_losses": "scaling_law"}, "dynamic_batch_loading.reference_losses"),
    ({"excess": "absolute"}, "dynamic_batch_loading.excess"),
    ({"excess": 1}, "dynamic_batch_loading.excess"),
])
def test_bad_config_names_the_key(block, key):
    with pytest.raises(ConfigError) as err:
        _plugin(**block)
    assert err.value.key == key


def test_a_bad_excess_names_the_key_and_both_choices():
    with pytest.raises(ConfigError) as err:
        _plugin(excess="Signed")
    assert err.value.key == "dynamic_batch_loading.excess"
    assert "clamped" in str(err.value) and "signed" in str(err.value)


@pytest.mark.parametrize("excess", [None, "clamped", "signed"])
def test_the_plugin_hands_its_excess_to_the_update(excess):
    block = {} if excess is None else {"excess": excess}
    plugin, cfg = _plugin(update_interval=1, update_at_start=True,
                          reference_losses=dict(zip("abcd", CASE_REFERENCE)), **block)
    sampler = DomainBatchSampler(list("abcd"), [4] * 4, np.array(CASE_WEIGHTS), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    metrics = plugin.acadlm_evaluation_end(step=0, domain_losses=dict(zip("abcd", CASE_LOSSES)),
                                           metrics={})
    mode = excess or "clamped"
    assert np.allclose(sampler.weights, update_domain_weights(
        CASE_WEIGHTS, CASE_LOSSES, CASE_REFERENCE, excess=mode))
    # the logged excess is the one the update used: negative only when signed
    assert metrics["domain_excess_loss/d"] == pytest.approx(-0.3 if mode == "signed" else 0.0)


def _resume_excess(tmp_path, saved: dict, resumed: dict, *, before_option: bool = False
                   ) -> DynamicBatchLoadingPlugin:
    """Resume a run saved with dynamic batch loading block ``saved`` under block ``resumed``, as
    the recipe does: its resume check on the recorded config values (``load_resume_state``),
    then the plugin's state handed back. ``before_option``: the checkpoint is of a version
    without ``excess`` (neither its config record nor the plugin's state has it)."""
    from acadlm_plugins.continued_pretrain_recipe import ContinuedPretrainRecipe
    from acadlm_plugins.training.checkpointing import config_mismatch, config_values

    def values(block: dict) -> dict:
        cfg = OmegaConf.create({"output_dir": str(tmp_path),
                                "dynamic_batch_loading": {"enabled": True, **block}})
        return config_values(cfg, ContinuedPretrainRecipe.resume_must_match)

    plugin, cfg = _plugin(update_interval=1, **saved)
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 4.0, "b": 2.0}, metrics={})
    recorded, state = values(saved), plugin.acadlm_state_dict()
    if before_option:
        recorded.pop("dynamic_batch_loading.excess", None)
        state["dynamic_batch_loading"].pop("excess", None)
    difference = config_mismatch(recorded, values(resumed), tmp_path)
    if difference is not None:  # as load_resume_state refuses it
        where, before, now = difference
        raise ConfigError(where, f"differs from the checkpoint being resumed: was {before}, is "
                          f"{now}.", f"restore `{where}` as it was, or start a new `output_dir`.")
    fresh, _ = _plugin(update_interval=1, **resumed)
    fresh.acadlm_load_state_dict(states=state)
    return fresh


@pytest.mark.parametrize(("saved", "resumed", "before_option"), [
    ({"excess": "clamped"}, {"excess": "signed"}, False),
    ({}, {"excess": "signed"}, False),
    ({"excess": "signed"}, {}, False),
    ({}, {"excess": "signed"}, True),  # a checkpoint from before the option: always clamped
])
def test_resuming_with_another_excess_is_refused_naming_it(tmp_path, saved, resumed,
                                                           before_option):
    """The excess form steers every update, so a resumed run must keep it. The form in force
    is compared, so a checkpoint of a version without the option, which clamped, is refused
    under ``signed`` (its config record has no ``excess`` to compare)."""
    with pytest.raises(ConfigError) as err:
        _resume_excess(tmp_path, saved, resumed, before_option=before_option)
    message = str(err.value)
    assert err.value.key == "dynamic_batch_loading.excess"
    was, now = saved.get("excess", "clamped"), resumed.get("excess", "clamped")
    assert message.index(was) < message.index(now, message.index(was) + len(was))
    assert "start a new `output_dir`" in message
    if before_option:
        assert "records no excess form" in message


@pytest.mark.parametrize(("saved", "resumed", "before_option"), [
    ({}, {"excess": "clamped"}, False),  # unset is clamped: the same run
    ({"excess": "clamped"}, {}, False),
    ({"excess": "signed"}, {"excess": "signed"}, False),
    ({}, {"excess": "clamped"}, True),
    ({}, {}, True),
])
def test_resuming_with_the_same_excess_in_force_is_accepted(tmp_path, saved, resumed,
                                                            before_option):
    """Unset and ``clamped`` are one form: a run resumed with it written out (or left out)
    continues, as does a checkpoint from before the option under ``clamped``."""
    fresh = _resume_excess(tmp_path, saved, resumed, before_option=before_option)
    assert fresh.excess == resumed.get("excess", "clamped") and len(fresh.history) == 1


def test_reference_scale_turns_the_initial_losses_into_goals():
    plugin, cfg = _plugin(update_interval=1, reference_scale=0.5)
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 4.0, "b": 2.0}, metrics={})
    assert plugin.reference == {"a": 2.0, "b": 1.0}
    plugin.acadlm_evaluation_end(step=1, domain_losses={"a": 3.0, "b": 1.5}, metrics={})
    assert sampler.weights[0] > sampler.weights[1]  # a is 1.0 above its goal, b only 0.5
    with pytest.raises(ConfigError, match="reference_scale"):
        _plugin(reference_losses={"a": 1.0}, reference_scale=0.9)


@pytest.mark.parametrize("reference, key, words", [
    ({"a": 1.0, "b": -1.0}, "dynamic_batch_loading.reference_losses.b", "below its minimum"),
    ({"a": 1.0, "b": float("inf")}, "dynamic_batch_loading.reference_losses.b", "inf"),
])
def test_a_negative_or_infinite_reference_loss_is_refused(reference, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        _plugin(reference_losses=reference)
    assert err.value.key == key


def test_a_reference_loss_for_a_domain_the_data_lacks_is_named_and_left_out(monkeypatch):
    """A held-out validation domain's loss handed over with the others (the Sheared-LLaMA
    pipeline passes every validation domain's) is not used; a misspelt one is refused, as its
    domain then has no reference."""
    import acadlm_plugins.plugins.dynamic_batch_loading as module

    warned: list[str] = []
    monkeypatch.setattr(module.log, "warning", lambda msg, *a: warned.append(msg % a))
    plugin, cfg = _plugin(reference_losses={"a": 1.0, "b": 1.0, "heldout": 2.0})
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    assert plugin.reference == {"a": 1.0, "b": 1.0}
    assert any("names ['heldout']" in message for message in warned)
    plugin, cfg = _plugin(reference_losses={"a": 1.0, "bb": 1.0})
    with pytest.raises(ConfigError, match=r"no reference loss for domains \['b'\]"):
        plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)


def test_reference_must_cover_every_domain():
    plugin, cfg = _plugin(reference_losses={"a": 1.0})
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    with pytest.raises(ConfigError, match=r"no reference loss for domains \['b'\]"):
        plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)


def test_disabled_plugin_does_nothing():
    plugin = DynamicBatchLoadingPlugin()
    plugin.acadlm_configure(cfg=OmegaConf.create({}), recipe="test")
    assert plugin.acadlm_evaluation_end(step=0, domain_losses={}, metrics={}) is None
    assert plugin.acadlm_state_dict() is None


@pytest.mark.parametrize("block, key", [
    ({"enable": True, "update_interval": 2}, "dynamic_batch_loading.enable"),
    ({"enabled": False, "update_intervall": 2}, "dynamic_batch_loading.update_intervall"),
    ({"enabled": "maybe"}, "dynamic_batch_loading.enabled"),
    ({"enabled": True, "update_interval": "often"}, "dynamic_batch_loading.update_interval"),
    ({"enabled": True, "reference_losses": {"a": "low"}},
     "dynamic_batch_loading.reference_losses.a"),
])
def test_a_typo_in_the_block_is_refused_even_when_it_leaves_the_plugin_off(block, key):
    """`enable: True` must not switch dynamic batch loading off without a word."""
    cfg = OmegaConf.create({"output_dir": ".", "dynamic_batch_loading": block})
    with pytest.raises(ConfigError) as err:
        DynamicBatchLoadingPlugin().acadlm_configure(cfg=cfg, recipe="test")
    assert err.value.key == key
    if key.endswith(".enable"):
        assert "did you mean `dynamic_batch_loading.enabled`" in str(err.value)


def _resumed(saved_block: dict, resumed_block: dict) -> DynamicBatchLoadingPlugin:
    """A plugin configured with ``resumed_block`` loading the state of one run with
    ``saved_block`` (after its step-0 evaluation)."""
    plugin, cfg = _plugin(update_interval=1, **saved_block)
    sampler = DomainBatchSampler(["a", "b"], [4, 4], np.array([0.5, 0.5]), batch_size=2)
    plugin.acadlm_data_ready(dataset=None, sampler=sampler, cfg=cfg)
    plugin.acadlm_evaluation_end(step=0, domain_losses={"a": 4.0, "b": 2.0}, metrics={})
    fresh, _ = _plugin(update_interval=1, **resumed_block)
    fresh.acadlm_load_state_dict(states=plugin.acadlm_state_dict())
    return fresh


def test_resuming_keeps_the_checkpoints_reference_losses():
    """A changed reference is refused earlier, by the recipe's resume check
    (tests/test_continued_pretrain_recipe.py); the plugin restores the saved one."""
    given = {"reference_losses": {"a": 1.0, "b": 2.0}}
    assert _resumed(given, given).reference == {"a": 1.0, "b": 2.0}
    assert _resumed({}, {}).reference == {"a": 4.0, "b": 2.0}  # `initial`: the saved losses
