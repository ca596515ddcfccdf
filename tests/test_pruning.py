"""Sheared-LLaMA pruning: gate math, Lagrangian sign, expected size, materialization, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.smollm2 import tiny_llama
from acadlm_plugins.pruning.architecture import Architecture, architecture_of, resolve_target
from acadlm_plugins.pruning.hard_concrete import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    HardConcreteGates,
    initial_log_alpha,
)
from acadlm_plugins.pruning.lagrangian import LagrangeMultipliers, ramped_target_fraction
from acadlm_plugins.pruning.masks import MaskHooks, PruningMasks
from acadlm_plugins.pruning.materialize import materialize

TARGET = {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "embed_dim": 40, "intermediate_dim": 80}


def _masked_setup(seed: int = 0, target: dict | None = None, *, biased: bool = False):
    torch.manual_seed(seed)
    if biased:  # Qwen2's q/k/v biases
        from torchtune.models.qwen2._component_builders import qwen2

        model = qwen2(vocab_size=512, num_layers=3, num_heads=4, num_kv_heads=2, embed_dim=64,
                      intermediate_dim=128, max_seq_len=512, tie_word_embeddings=True).eval()
    else:
        model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2).eval()
    source = architecture_of(model)
    masks = PruningMasks(source, resolve_target(source, target or TARGET), seed=seed)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.normal_(0.0, 2.0)
    return model, masks


# ------------------------------------------------------------------ hard-concrete gates
def test_gates_start_open_and_score_matches_monte_carlo():
    gates = HardConcreteGates(2000, generator=torch.Generator().manual_seed(0))
    assert gates.log_alpha.detach().mean().item() == pytest.approx(initial_log_alpha(0.01), abs=0.01)
    assert initial_log_alpha(0.01) == pytest.approx(math.log(99))
    with torch.no_grad():
        gates.log_alpha.copy_(torch.linspace(-3, 3, 2000))
    with torch.no_grad():
        draws = torch.stack([gates.sample(torch.Generator().manual_seed(i)) for i in range(400)])
    empirical = (draws > 0).float().mean(0)
    # average over bins of 100 neighbouring gates: 40,000 draws per bin
    binned = empirical.reshape(20, 100).mean(1)
    expected = gates.scores().detach().reshape(20, 100).mean(1)
    assert torch.allclose(binned, expected, atol=0.015)
    assert draws.min() == 0.0 and draws.max() == 1.0  # stretched and clamped: exact 0s and 1s
    assert ((draws == 0) | (draws == 1)).float().mean() > 0.2


def test_sampling_is_differentiable_and_clamp_holds_the_range():
    gates = HardConcreteGates(5)
    gates.sample().sum().backward()
    assert gates.log_alpha.grad is not None
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0]))
    gates.clamp_()
    assert gates.log_alpha.min().item() == pytest.approx(LOG_ALPHA_MIN)
    assert gates.log_alpha.max().item() == pytest.approx(LOG_ALPHA_MAX)


def test_deterministic_gates_keep_exactly_k_per_row_by_log_alpha():
    gates = HardConcreteGates((3, 10))
    with torch.no_grad():
        gates.log_alpha.copy_(torch.randn(3, 10))
    z = gates.deterministic(4)
    assert ((z > 0).sum(1) == 4).all()
    best = torch.topk(gates.log_alpha.detach(), 4, dim=1).indices
    assert (z.gather(1, best) > 0).all()


# ------------------------------------------------------------------------- Lagrangian
def test_lambda_grows_while_expected_size_is_above_target():
    _, masks = _masked_setup()
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.fill_(5.0)  # everything kept: far above target
    lambdas = LagrangeMultipliers(masks.mask_types)
    ascent = torch.optim.SGD(lambdas.parameters(), lr=0.1, maximize=True)
    for _ in range(3):
        loss, _ = lambdas.loss(masks.expected_shape(), step=10, warmup_steps=0)
        loss.backward()
        ascent.step()
        ascent.zero_grad()
    for values in lambdas.multipliers.values():
        assert values[0] > 0 and values[1] >= 0
    # ...and the pressure it then puts on the gates shrinks the expected size.
    loss, _ = lambdas.loss(masks.expected_shape(), step=10, warmup_steps=0)
    loss.backward()
    assert all((g.log_alpha.grad > 0).all() for g in masks.gates.values())


def test_target_ramps_linearly_from_the_full_model():
    assert ramped_target_fraction(0.4, 0, 10) == 1.0
    assert ramped_target_fraction(0.4, 5, 10) == pytest.approx(0.7)
    assert ramped_target_fraction(0.4, 50, 10) == pytest.approx(0.4)
    assert ramped_target_fraction(0.4, 0, 0) == pytest.approx(0.4)
    assert ramped_target_fraction(0.4, 5, 10, start_fraction=0.9) == pytest.approx(0.65)


def test_ramp_starts_at_the_first_expected_fraction_so_lambda_does_not_go_negative():
    _, masks = _masked_setup()
    lambdas = LagrangeMultipliers(masks.mask_types)
    _, report = lambdas.loss(masks.expected_shape(), step=0, warmup_steps=10)
    for mask_type in masks.mask_types:
        assert report[f"pruning/target/{mask_type}"] == pytest.approx(
            report[f"pruning/expected/{mask_type}"], abs=1e-6)
    assert "ramp_start" in lambdas.state_dict()


def test_lagrangian_is_the_reference_per_row_mean_for_each_mask_type():
    """LLM-Shearing: each mask type on its own scores, per row, averaged; no layer weighting."""
    _, masks = _masked_setup(target={"num_layers": 2, "num_heads": 1, "num_kv_heads": 1,
                                     "embed_dim": 40, "intermediate_dim": 80})
    lambdas = LagrangeMultipliers(masks.mask_types)
    with torch.no_grad():
        for i, values in enumerate(lambdas.multipliers.values()):
            values.copy_(torch.tensor([0.3 + i, 0.7 * i + 0.1]))
        lambdas.ramp_start.fill_(0.0)  # ramp from below the target: the target itself
    loss, report = lambdas.loss(masks.expected_shape(), step=0, warmup_steps=0)

    def score(log_alpha):  # P(z > 0), written out
        return 1 / (1 + torch.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1))))

    la = {k: g.log_alpha.detach() for k, g in masks.gates.items()}
    rows = {"layer": score(la["layer"]).reshape(1, 3).mean(1),
            "kv_head": score(la["kv_head"]).mean(1),                        # per layer
            "head": score(la["head"]).reshape(3 * 2, 2).mean(1),            # per KV group
            "hidden": score(la["hidden"]).reshape(1, 64).mean(1),
            "intermediate": score(la["intermediate"]).mean(1)}              # per layer
    targets = {"layer": 2 / 3, "kv_head": 1 / 2, "head": 1 / 2, "hidden": 40 / 64,
               "intermediate": 80 / 128}
    assert set(rows) == set(masks.mask_types)
    expected = 0.0
    for name, (l1, l2) in ((n, lambdas.multipliers[n].detach()) for n in masks.mask_types):
        gap = rows[name] - targets[name]
        expected += (l1 * gap + l2 * gap ** 2).mean()
        assert report[f"pruning/expected/{name}"] == pytest.approx(rows[name].mean().item(), abs=1e-6)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_rows_reach_the_target_shape_layer_by_layer():
    """Under the Lagrangian alone, every layer's expected KV heads and MLP channels (not only
    the totals) settle at the target's, whatever the layer gates do."""
    torch.manual_seed(0)
    model = tiny_llama(num_layers=4, num_heads=6, num_kv_heads=3, embed_dim=48)
    source = architecture_of(model)
    masks = PruningMasks(source, resolve_target(source, {
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_dim": 64}))
    with torch.no_grad():  # uneven start: some layers' units far more open than others
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape) * 1.5 + 2)
    lambdas = LagrangeMultipliers(masks.mask_types)
    descent = torch.optim.AdamW(masks.parameters(), lr=0.1, weight_decay=0.0)
    ascent = torch.optim.AdamW(lambdas.parameters(), lr=0.1, weight_decay=0.0, maximize=True)
    for step in range(400):
        loss, _ = lambdas.loss(masks.expected_shape(), step, warmup_steps=50)
        loss.backward()
        descent.step()
        ascent.step()
        descent.zero_grad()
        ascent.zero_grad()
        masks.clamp_()
    shape = masks.expected_shape()
    for name in masks.mask_types:
        assert (shape.rows[name] - shape.targets[name]).abs().max() < 0.05, (name, shape.rows[name])
    kv_per_layer = shape.rows["kv_head"] * source.num_kv_heads
    assert (kv_per_layer - 2).abs().max() < 0.15


def test_hooks_installed_inactive_leave_the_source_function_until_switched_on():
    model, masks = _masked_setup()
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        plain = model(tokens)
        hooks = MaskHooks(model, masks, active=False)
        assert torch.equal(model(tokens), plain)
        hooks.active = True
        assert (model(tokens) - plain).abs().max() > 1e-3
    hooks.remove()


# ------------------------------------------------------- expected size and materializing
@pytest.mark.parametrize("seed, biased", [(0, False), (1, False), (2, False), (0, True)])
def test_expected_size_formula_counts_the_materialized_model_exactly(seed, biased):
    model, masks = _masked_setup(seed, biased=biased)
    final = masks.deterministic_gates(masks.target_row_counts())
    indicators = {k: (v > 0).float() for k, v in final.items()}
    pruned, arch = materialize(model, masks)
    counted = sum(p.numel() for n, p in pruned.named_parameters()
                  if not n.startswith("tok_embeddings"))
    assert masks.expected_non_embedding_params(indicators).item() == counted
    assert arch.non_embedding_params() == counted
    shape = masks.expected_shape(indicators)
    for mask_type in masks.mask_types:  # every row of the final mask is exactly the target's
        assert torch.allclose(shape.rows[mask_type],
                              torch.full_like(shape.rows[mask_type], shape.targets[mask_type]))


def _masked_logits_then_materialize(model, masks, tokens):
    """The masked model's logits with its final gates, then the materialized model."""
    hooks = MaskHooks(model, masks)
    masks.use_final_gates()
    with torch.no_grad():
        masked = model(tokens)
    hooks.remove()
    pruned, arch = materialize(model, masks)
    return masked, pruned, arch


@pytest.mark.parametrize("seed", [0, 1])
def test_materialized_model_computes_what_the_masked_model_computes(seed):
    model, masks = _masked_setup(seed)
    tokens = torch.randint(0, 512, (2, 24))
    masked, pruned, arch = _masked_logits_then_materialize(model, masks, tokens)
    with torch.no_grad():
        small = pruned.eval()(tokens)
        plain = model(tokens)
    assert architecture_of(pruned) == arch
    assert (masked - small).abs().max() < 1e-4
    assert (plain - small).abs().max() > 1e-2  # the masks really changed the function


def _reference_rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float,
                        hidden_z: torch.Tensor) -> torch.Tensor:
    """LLM-Shearing's ``LlamaRMSNorm.forward(h, hidden_z)`` (composer_llama.py), written out:
    the mean square over the channels whose gate is not 0, then weight, then the gate."""
    kept = torch.nonzero(hidden_z != 0).flatten()
    variance = h.index_select(-1, kept).float().pow(2).mean(-1, keepdim=True)
    return (weight * (h * torch.rsqrt(variance + eps))) * hidden_z


def test_every_rms_norm_matches_the_references_under_a_sampled_hidden_gate():
    """Per-layer norms too, not only the final one, multiply their output by the hidden gate:
    with fractional sampled gates this differs from gating the residual stream alone."""
    model, masks = _masked_setup(target={"embed_dim": 40})
    with torch.no_grad():
        masks.gates["hidden"].log_alpha.normal_(1.0, 2.0)
        for layer in model.layers:
            layer.sa_norm.scale.uniform_(0.5, 1.5)
            layer.mlp_norm.scale.uniform_(0.5, 1.5)
        model.norm.scale.uniform_(0.5, 1.5)
    MaskHooks(model, masks)
    model.train()
    masks.resample()
    z = masks.current(training=True)["hidden"].detach()
    assert ((z > 0) & (z < 1)).any() and (z == 0).any()  # fractional and closed gates both
    x = torch.randn(2, 8, 64) * z  # a residual stream: its closed channels are 0
    norms = [model.layers[0].sa_norm, model.layers[0].mlp_norm, model.norm]
    with torch.no_grad():
        for norm in norms:
            expected = _reference_rms_norm(x, norm.scale, norm.eps, z)
            assert (norm(x) - expected).abs().max() < 1e-5


def test_materialization_folds_the_hidden_gate_into_every_norm_scale():
    """Hidden channels alone, with non-trivial norm scales: the per-layer norms' gate values
    must be folded into sa_norm/mlp_norm for the small model to compute the masked one."""
    model, masks = _masked_setup(target={"embed_dim": 40})
    with torch.no_grad():
        for layer in model.layers:
            layer.sa_norm.scale.uniform_(0.5, 1.5)
            layer.mlp_norm.scale.uniform_(0.5, 1.5)
    values = masks.deterministic_gates()["hidden"]
    assert (values[values > 0] < 0.99).any()  # soft values, so folding them matters
    tokens = torch.randint(0, 512, (2, 24))
    masked, pruned, _arch = _masked_logits_then_materialize(model, masks, tokens)
    with torch.no_grad():
        small = pruned.eval()(tokens)
    assert (masked - small).abs().max() < 1e-4


def test_query_heads_stay_in_their_kv_group():
    _model, masks = _masked_setup(target={"num_heads": 2, "num_kv_heads": 1})
    final = masks.deterministic_gates(masks.target_row_counts())
    for layer in range(3):
        heads = torch.nonzero(masks.head_factor(final, layer) > 0).flatten()
        groups = torch.nonzero(final["kv_head"][layer] > 0).flatten()
        assert len(heads) == 2 and len(groups) == 1
        assert set((heads // 2).tolist()) == set(groups.tolist())


def test_hooks_leave_state_dict_keys_alone_and_remove_cleanly():
    model, masks = _masked_setup()
    keys = list(model.state_dict())
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        before = model(tokens)
    hooks = MaskHooks(model, masks)
    assert list(model.state_dict()) == keys
    hooks.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


def test_training_mode_samples_and_eval_mode_is_deterministic():
    model, masks = _masked_setup()
    MaskHooks(model, masks)
    tokens = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        model.eval()
        a, b = model(tokens), model(tokens)
        model.train()
        masks.resample()
        c = model(tokens)
        masks.resample()
        d = model(tokens)
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


# -------------------------------------------------------------------------- bad targets
SOURCE = Architecture(num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
                      intermediate_dim=1536, head_dim=64, vocab_size=49152)


@pytest.mark.parametrize("target, key, words", [
    ({"num_layers": 31}, "pruning.target.num_layers", "larger than the source"),
    ({"embed_dim": 0}, "pruning.target.embed_dim", "at least 1"),
    ({"num_heads": 5, "num_kv_heads": 2}, "pruning.target.num_heads", "evenly"),
    ({"num_heads": 8, "num_kv_heads": 2}, "pruning.target.num_heads", "another KV group"),
    ({"hidden_size": 256}, "pruning.target.hidden_size", "not a prunable"),
    ({"embed_dim": 480}, "pruning.target.embed_dim", "multiple of the 9 query heads"),
])
def test_impossible_targets_are_refused_naming_the_field(target, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        resolve_target(SOURCE, target)
    assert err.value.key == key


def test_smollm2_third_size_target_is_valid():
    target = resolve_target(SOURCE, {"num_layers": 20, "num_heads": 6, "num_kv_heads": 2,
                                         "embed_dim": 384, "intermediate_dim": 1024})
    ratio = target.non_embedding_params() / SOURCE.non_embedding_params()
    assert 0.25 < ratio < 0.4


# ------------------------------------------------- sources without grouped-query attention
LLAMA2_7B = Architecture(num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096,
                         intermediate_dim=11008, head_dim=128, vocab_size=32000,
                         tie_word_embeddings=False)


def test_kv_heads_follow_query_heads_on_a_source_without_gqa():
    """Sheared-LLaMA's targets on Llama-2-7B (no GQA) name only num_heads."""
    sheared_2_7b = resolve_target(LLAMA2_7B, {"num_heads": 20, "embed_dim": 2560,
                                              "intermediate_dim": 6912})
    assert (sheared_2_7b.num_heads, sheared_2_7b.num_kv_heads) == (20, 20)
    assert sheared_2_7b.total_params() == pytest.approx(2.7e9, rel=0.01)
    sheared_1_3b = resolve_target(LLAMA2_7B, {"num_layers": 24, "num_heads": 16,
                                              "embed_dim": 2048, "intermediate_dim": 5504})
    assert sheared_1_3b.num_kv_heads == 16
    assert sheared_1_3b.total_params() == pytest.approx(1.3e9, rel=0.05)
    assert resolve_target(LLAMA2_7B, {"num_kv_heads": 16}).num_heads == 16
    assert resolve_target(LLAMA2_7B, {"num_heads": 16, "num_kv_heads": 16}).num_kv_heads == 16


@pytest.mark.parametrize("target, key, words", [
    ({"num_heads": 16, "num_kv_heads": 8}, "pruning.target.num_kv_heads",
     "no grouped-query attention"),
    ({"num_heads": 16, "num_kv_heads": 32}, "pruning.target.num_kv_heads", "num_kv_heads: 16"),
])
def test_gqa_shapes_a_multi_head_source_cannot_reach_are_refused(target, key, words):
    with pytest.raises(ConfigError, match=words) as err:
        resolve_target(LLAMA2_7B, target)
    assert err.value.key == key


def test_a_multi_head_model_prunes_heads_with_their_kv_heads_and_materializes():
    torch.manual_seed(0)
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=4).eval()
    source = architecture_of(model)
    target = resolve_target(source, {"num_heads": 2})
    assert (target.num_heads, target.num_kv_heads) == (2, 2)
    masks = PruningMasks(source, target, seed=0)
    assert masks.mask_types == ["kv_head"]  # a query head and its KV head: one gate
    with torch.no_grad():
        masks.gates["kv_head"].log_alpha.normal_(0.0, 2.0)
    tokens = torch.randint(0, 512, (2, 16))
    masked, pruned, arch = _masked_logits_then_materialize(model, masks, tokens)
    assert architecture_of(pruned) == arch == target
    head_dim = source.head_dim
    for layer in pruned.layers:
        assert layer.attn.q_proj.weight.shape == (2 * head_dim, 64)
        assert layer.attn.k_proj.weight.shape == layer.attn.v_proj.weight.shape == (2 * head_dim, 64)
        assert layer.attn.output_proj.weight.shape == (64, 2 * head_dim)
    with torch.no_grad():
        assert (pruned.eval()(tokens) - masked).abs().max() < 1e-4


def test_importance_initialized_masks_start_at_the_one_shot_choice():
    from acadlm_plugins.plugins.pruning import initial_log_alphas
    from acadlm_plugins.pruning.importance import importance_scores, keep_indices
    from acadlm_plugins.pruning.materialize import kept_units

    model, masks = _masked_setup(target={"num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                         "embed_dim": 40, "intermediate_dim": 80})
    torch.manual_seed(1)
    scores = importance_scores(model, [{"tokens": torch.randint(0, 512, (4, 16))}])
    with torch.no_grad():
        for name, values in initial_log_alphas(scores, masks, spread=3.0).items():
            masks.gates[name].log_alpha.copy_(values)
    learned, one_shot = kept_units(masks), keep_indices(scores, masks.source, masks.target)
    assert learned.layers == one_shot.layers
    assert torch.equal(learned.hidden, one_shot.hidden)
    for layer in learned.layers:
        assert torch.equal(learned.kv_heads[layer], one_shot.kv_heads[layer])
        assert torch.equal(learned.heads[layer], one_shot.heads[layer])
        assert torch.equal(learned.intermediate[layer], one_shot.intermediate[layer])
    # kept units start where uniform gates start; the rest lower, down to `spread` below
    alphas = masks.gates["intermediate"].log_alpha.detach()
    assert alphas.max().item() == pytest.approx(initial_log_alpha(0.01))
    assert alphas.min().item() == pytest.approx(initial_log_alpha(0.01) - 3.0, abs=1e-5)


# ------------------------------------------------------------------ the plugin's config


def _configured(recipe: str, **block):
    from omegaconf import OmegaConf

    from acadlm_plugins.plugins.pruning import PruningPlugin

    cfg = OmegaConf.create({"seed": 0, "output_dir": ".",
                            "pruning": {"target": {"num_layers": 1}, **block}})
    plugin = PruningPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe=recipe)
    return plugin


@pytest.mark.parametrize("recipe", ["continued_pretrain", "long_context"])
def test_a_pruning_block_is_refused_by_recipes_that_never_export_the_pruned_model(recipe):
    with pytest.raises(ConfigError, match="only the prune recipe reads this block") as err:
        _configured(recipe)
    assert err.value.key == "pruning"
    assert "prune_recipe" in str(err.value)
    assert _configured("prune").enabled


def test_one_shot_importance_names_the_mask_training_keys_it_ignores(caplog):
    import logging

    logger = logging.getLogger("acadlm_plugins.plugins.pruning")
    logger.addHandler(caplog.handler)  # the package logger may not propagate (route_package_logs)
    try:
        caplog.set_level(logging.WARNING, logger=logger.name)
        _configured("prune", method="importance", mask_lr=0.5, lambda_lr=0.1,
                    lagrangian_warmup_steps=4)
        warned = sorted({r.getMessage() for r in caplog.records  # once, however routed
                         if r.levelno == logging.WARNING})
        caplog.clear()
        _configured("prune", method="learned", mask_lr=0.5)
        _configured("prune", method="importance", calibration={"num_sequences": 8})
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    finally:
        logger.removeHandler(caplog.handler)
    assert len(warned) == 1
    for key in ("pruning.lagrangian_warmup_steps", "pruning.mask_lr", "pruning.lambda_lr"):
        assert key in warned[0]
    assert "importance trains no masks" in warned[0]


def _configured_with(top: dict, **block):
    """The plugin configured from a config with top-level keys ``top`` (e.g. max_steps)."""
    from omegaconf import OmegaConf

    from acadlm_plugins.plugins.pruning import PruningPlugin

    cfg = OmegaConf.create({"seed": 0, "output_dir": ".", **top,
                            "pruning": {"target": {"num_layers": 1}, **block}})
    plugin = PruningPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe="prune")
    return plugin


@pytest.mark.parametrize("block, key", [
    ({"target": {"num_layers": "abc"}}, "pruning.target.num_layers"),
    ({"target": {"intermediate_dim": 64.7}}, "pruning.target.intermediate_dim"),
    ({"target": {"embed_dim": True}}, "pruning.target.embed_dim"),
    ({"lagrangian_warmup_steps": "abc"}, "pruning.lagrangian_warmup_steps"),
    ({"lagrangian_warmup_steps": 2.7}, "pruning.lagrangian_warmup_steps"),
    ({"mask_lr": "abc"}, "pruning.mask_lr"),
    ({"lambda_lr": "5e-2x"}, "pruning.lambda_lr"),
    ({"droprate_init": "abc"}, "pruning.droprate_init"),
    ({"droprate_init": 1.5}, "pruning.droprate_init"),
    ({"mask_init": "importance", "mask_init_spread": "abc"}, "pruning.mask_init_spread"),
    ({"mask_init": "importance", "mask_init_gap": "abc"}, "pruning.mask_init_gap"),
    ({"calibration": {"num_sequences": "abc"}}, "pruning.calibration.num_sequences"),
    ({"calibration": {"batch_size": 2.5}}, "pruning.calibration.batch_size"),
])
def test_number_keys_that_are_not_numbers_are_refused_naming_them(block, key):
    """A typo in a number is a ConfigError naming the key, not a bare ValueError mid-setup, and
    an integer key never silently drops a fraction (64.7 -> 64, 2.7 -> 2)."""
    with pytest.raises(ConfigError) as err:
        _configured_with({}, **block)
    assert err.value.key == key


def test_whole_numbers_are_read_as_integers():
    plugin = _configured_with({}, target={"num_layers": 1.0}, lagrangian_warmup_steps="4",
                              calibration={"num_sequences": 8.0})
    assert plugin.target_spec == {"num_layers": 1} and type(plugin.target_spec["num_layers"]) is int
    assert plugin.warmup == 4 and plugin.calibration_sequences == 8


def test_a_fractional_target_dim_is_refused_by_resolve_target():
    with pytest.raises(ConfigError, match="whole number") as err:
        resolve_target(SOURCE, {"intermediate_dim": 64.7})
    assert err.value.key == "pruning.target.intermediate_dim"


def test_a_warmup_longer_than_the_run_is_warned_about(caplog):
    import logging

    logger = logging.getLogger("acadlm_plugins.plugins.pruning")
    logger.addHandler(caplog.handler)  # the package logger may not propagate (route_package_logs)
    try:
        caplog.set_level(logging.WARNING, logger=logger.name)
        _configured_with({"max_steps": 10}, lagrangian_warmup_steps=20)
        warned = sorted({r.getMessage() for r in caplog.records if r.levelno == logging.WARNING})
        caplog.clear()
        _configured_with({"max_steps": 20}, lagrangian_warmup_steps=20)    # ends with the ramp
        _configured_with({"max_steps": 10}, method="importance", lagrangian_warmup_steps=20)
        quiet = [r.getMessage() for r in caplog.records
                 if r.levelno == logging.WARNING and "more than max_steps" in r.getMessage()]
    finally:
        logger.removeHandler(caplog.handler)
    assert len(warned) == 1, warned
    assert "pruning.lagrangian_warmup_steps is 20, more than max_steps 10" in warned[0]
    assert "at most max_steps" in warned[0]
    assert not quiet, quiet


@pytest.mark.parametrize("override, key", [
    ("pruning.mask_lr=abc", "pruning.mask_lr"),
    ("pruning.target.intermediate_dim=5000.5", "pruning.target.intermediate_dim"),
    ("pruning.calibration.num_sequences=abc", "pruning.calibration.num_sequences"),
])
def test_the_planner_refuses_a_bad_number_naming_its_key(override, key, capsys):
    """acadlm-plan runs the plugin's own configure checks: exit 2, the key named."""
    from acadlm_plugins.planning.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs/llama2/7b_to_2.7b_prune.yaml")
    assert main(["--config", config, "--reference", "llama-2-7b", override]) == 2
    assert key in capsys.readouterr().err


# ------------------------------------------- LLM-Shearing's evaluation shape and mask schedule
def test_current_eval_shape_keeps_in_each_row_the_units_the_gates_expect_to_keep():
    """``eval_shape: current`` (the reference's ``eval_target_model: false``): each row keeps
    its width less round(expected closed gates), the best by log_alpha; the final gates (the
    materialized cut) still keep exactly the target's units."""
    model, _ = _masked_setup()
    source = architecture_of(model)
    masks = PruningMasks(source, resolve_target(source, TARGET), eval_shape="current")
    torch.manual_seed(1)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.normal_(1.0, 3.0)
    widths = {"layer": 3, "kv_head": 2, "head": 2, "hidden": 64, "intermediate": 128}
    gates = masks.current(training=False)
    differs = False
    for name, gate in masks.gates.items():
        width = widths[name]
        scores = gate.scores().detach().reshape(-1, width)
        expected = [width - round(width - float(row.sum())) for row in scores]
        kept = (gates[name].reshape(-1, width) > 0)
        assert kept.sum(-1).tolist() == expected, name
        for row, count in enumerate(expected):  # the best `count` of the row by log_alpha
            best = torch.topk(gate.log_alpha.detach().reshape(-1, width)[row], count).indices
            assert kept[row, best].all() and kept[row].sum() == count
        differs |= any(count != masks.target_row_counts()[name] for count in expected)
    assert differs  # the current shape is not the target's here
    masks.use_final_gates()
    final = masks.current(training=False)
    for name in masks.gates:
        kept = (final[name].reshape(-1, widths[name]) > 0).sum(-1)
        assert (kept == masks.target_row_counts()[name]).all(), name
    target_masks = PruningMasks(source, resolve_target(source, TARGET))
    target_masks.load_state_dict(masks.state_dict())
    for name, value in target_masks.current(training=False).items():
        assert torch.equal(value, final[name])
    with pytest.raises(ValueError, match="eval_shape"):
        PruningMasks(source, resolve_target(source, TARGET), eval_shape="expected")


def _trained_plugin(**block):
    """The pruning plugin set up on the tiny model, every gate and multiplier given a
    gradient of 1."""
    from omegaconf import OmegaConf

    from acadlm_plugins.plugins.pruning import PruningPlugin

    cfg = OmegaConf.create({"seed": 0, "output_dir": ".", "optimizer": {"lr": 1e-3},
                            "pruning": {"target": TARGET, "mask_lr": 0.2, "lambda_lr": 0.1,
                                        **block}})
    plugin = PruningPlugin()
    plugin.acadlm_configure(cfg=cfg, recipe="prune")
    plugin.acadlm_model_built(model=tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2),
                              cfg=cfg, device=torch.device("cpu"))
    for param in [*plugin.masks.parameters(), *plugin.multipliers.parameters()]:
        param.grad = torch.ones_like(param)
    return plugin


@pytest.mark.parametrize("schedule, factor", [("constant", 1.0), ("model", 0.25)])
def test_mask_and_multiplier_rates_follow_the_models_schedule_when_asked(schedule, factor):
    """Adam's first step moves every parameter by its rate: under ``model`` the gates and the
    multipliers move by their rate times the model's (2.5e-4 of a 1e-3 peak), as in
    LLM-Shearing, where one optimizer and one schedule hold all three."""
    plugin = _trained_plugin(mask_lr_schedule=schedule, mask_betas=[0.9, 0.95])
    before = {name: gate.log_alpha.detach().clone() for name, gate in plugin.masks.gates.items()}
    lambdas = [p.detach().clone() for p in plugin.multipliers.parameters()]
    plugin.acadlm_after_optimizer_step(step=1, metrics={"lr": 2.5e-4})
    for name, gate in plugin.masks.gates.items():
        moved = (before[name] - gate.log_alpha.detach()).clamp(max=10)
        assert torch.allclose(moved, torch.full_like(moved, 0.2 * factor), atol=1e-6), name
    for old, new in zip(lambdas, plugin.multipliers.parameters(), strict=True):
        assert torch.allclose(new.detach() - old, torch.full_like(old, 0.1 * factor), atol=1e-6)
    for optimizer in (plugin.mask_optimizer, plugin.lambda_optimizer):
        assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_the_plugin_hands_eval_shape_to_the_masks():
    assert _trained_plugin().masks.eval_shape == "target"
    assert _trained_plugin(eval_shape="current").masks.eval_shape == "current"


@pytest.mark.parametrize("block, top, key", [
    ({"mask_lr_schedule": "cosine"}, {}, "pruning.mask_lr_schedule"),
    ({"mask_lr_schedule": "model"}, {}, "pruning.mask_lr_schedule"),  # no optimizer.lr
    ({"eval_shape": "expected"}, {}, "pruning.eval_shape"),
    ({"mask_betas": 0.9}, {}, "pruning.mask_betas"),
    ({"mask_betas": [0.9, 1.0]}, {}, "pruning.mask_betas"),
    ({"mask_betas": [0.9, "x"]}, {}, "pruning.mask_betas[1]"),
])
def test_shearing_options_refuse_bad_values_naming_the_key(block, top, key):
    with pytest.raises(ConfigError) as err:
        _configured_with(top, **block)
    assert err.value.key == key


def _stepped_plugin(**block):
    """:func:`_trained_plugin` after one mask step, so that its state has a history."""
    plugin = _trained_plugin(**block)
    plugin.acadlm_after_optimizer_step(step=1, metrics={"lr": 1e-3})
    return plugin


def test_a_saved_pruning_state_records_the_hidden_gate_placement_and_resumes():
    """The hidden gate multiplies every RMSNorm's output since 2026-12-06; the state says so,
    and a state of this version loads into a fresh run."""
    saved = _stepped_plugin().acadlm_state_dict()
    assert saved["pruning"]["hidden_gate"] == "every_norm"
    resumed = _trained_plugin()
    resumed.acadlm_load_state_dict(states=saved)
    for name, gate in resumed.masks.gates.items():
        assert torch.equal(gate.log_alpha, saved["pruning"]["masks"][f"gates.{name}.log_alpha"])
    assert resumed.hooks.active and len(resumed.history) == 1


def test_an_older_pruning_state_with_hidden_masks_is_refused_naming_the_placement():
    """A checkpoint made before the hidden gate multiplied the per-layer norms records no
    placement; with hidden masks its gates would compute another function now (resuming, or
    rerunning its finished run, which materializes again), so it is refused, naming why."""
    saved = _stepped_plugin().acadlm_state_dict()
    saved["pruning"].pop("hidden_gate", None)  # as a version before 2026-12-06 wrote it
    assert "gates.hidden.log_alpha" in saved["pruning"]["masks"]
    resumed = _trained_plugin()
    before = resumed.masks.gates["hidden"].log_alpha.detach().clone()
    with pytest.raises(ConfigError) as err:
        resumed.acadlm_load_state_dict(states=saved)
    message = str(err.value)
    assert err.value.key == "output_dir"
    assert "records no `hidden_gate`" in message and "before 2026-12-06" in message
    assert "sa_norm and mlp_norm" in message and "embed_dim" in message
    assert "prune again into a new `output_dir`" in message
    assert "with the version that started it" in message
    assert torch.equal(resumed.masks.gates["hidden"].log_alpha, before)  # nothing loaded
    saved["pruning"]["hidden_gate"] = "final_norm"  # a placement of another version
    with pytest.raises(ConfigError, match="records hidden-gate placement 'final_norm'"):
        _trained_plugin().acadlm_load_state_dict(states=saved)


def test_an_older_pruning_state_without_hidden_masks_still_resumes():
    """Without hidden masks (embed_dim not pruned) the placement changes nothing: such a state
    of an older version, which records none, loads as before."""
    no_hidden = {key: value for key, value in TARGET.items() if key != "embed_dim"}
    saved = _stepped_plugin(target=no_hidden).acadlm_state_dict()
    saved["pruning"].pop("hidden_gate", None)
    assert not any(key.startswith("gates.hidden.") for key in saved["pruning"]["masks"])
    resumed = _trained_plugin(target=no_hidden)
    resumed.acadlm_load_state_dict(states=saved)
    assert "hidden" not in resumed.masks.gates and len(resumed.history) == 1
    for name, gate in resumed.masks.gates.items():
        assert torch.equal(gate.log_alpha, saved["pruning"]["masks"][f"gates.{name}.log_alpha"])
