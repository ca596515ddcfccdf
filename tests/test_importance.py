"""Minitron importance scores: their definitions, planted units ranked first, one-shot pruning
(shape, function, Hugging Face export) and the log_alpha initialization they feed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from acadlm_plugins.models.smollm2 import tiny_llama
from acadlm_plugins.pruning.architecture import architecture_of, resolve_target
from acadlm_plugins.pruning.importance import (
    ImportanceScores,
    importance_scores,
    keep_indices,
    log_alpha_from_scores,
    one_shot_prune,
)
from acadlm_plugins.pruning.materialize import KeptUnits, materialize_units

VOCAB = 512
HEAD_DIM = 16  # tiny_llama: 64 hidden / 4 heads
SCORE_FIELDS = ("layer", "kv_head", "head", "hidden", "intermediate")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, **shape: int):
    torch.manual_seed(seed)
    return tiny_llama(**{"num_layers": 3, "num_heads": 4, "num_kv_heads": 2, **shape}).eval()


def _tokens(batch: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _scores(model, tokens: torch.Tensor, **kwargs) -> ImportanceScores:
    return importance_scores(model, [{"tokens": tokens}], **kwargs)


def _assert_scores_close(a: ImportanceScores, b: ImportanceScores, rtol: float = 1e-5) -> None:
    for name in SCORE_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-7)


def _reference_scores(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The definitions written out plainly, sequence by sequence, from captured activations."""
    captured: dict[str, list] = {"heads": [], "mlp": [], "norms": [], "layers": []}
    hooks = []  # the final norm is not scored (NVIDIA's reference scores the layers' norms)
    for layer in model.layers:
        hooks += [
            layer.attn.output_proj.register_forward_pre_hook(
                lambda m, i: captured["heads"].append(i[0])),
            layer.mlp.w2.register_forward_pre_hook(lambda m, i: captured["mlp"].append(i[0])),
            layer.sa_norm.register_forward_hook(lambda m, i, o: captured["norms"].append(o)),
            layer.mlp_norm.register_forward_hook(lambda m, i, o: captured["norms"].append(o)),
            layer.register_forward_hook(lambda m, i, o: captured["layers"].append((i[0], o))),
        ]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()

    def l2_of_sequence_means(per_token: torch.Tensor) -> torch.Tensor:  # (B, S, units)
        means = torch.stack([sequence.double().mean(0) for sequence in per_token])
        return means.pow(2).sum(0).sqrt()

    head = torch.stack([
        l2_of_sequence_means(torch.stack([x[..., h * HEAD_DIM:(h + 1) * HEAD_DIM].norm(dim=-1)
                                          for h in range(model.layers[0].attn.num_heads)], -1))
        for x in captured["heads"]])
    return {
        "head": head,
        "kv_head": head[:, 0::2] + head[:, 1::2],  # 2 query heads per KV head
        "intermediate": torch.stack([l2_of_sequence_means(x.abs()) for x in captured["mlp"]]),
        "hidden": sum(l2_of_sequence_means(y.abs()) for y in captured["norms"]),
        "layer": torch.stack([1 - F.cosine_similarity(x, y, dim=-1).double().mean()
                              for x, y in captured["layers"]]),
    }


# ------------------------------------------------------------------------ definitions
def test_scores_follow_the_definitions_across_batches():
    model, tokens = _model(), _tokens(batch=5)
    scores = importance_scores(model, [{"tokens": tokens[:2]}, {"tokens": tokens[2:]}])
    reference = _reference_scores(model, tokens)
    for name, expected in reference.items():
        torch.testing.assert_close(getattr(scores, name), expected.float(), rtol=1e-5, atol=1e-7)
    assert (scores.num_sequences, scores.num_tokens) == (5, 5 * 24)
    assert all(getattr(scores, name).dtype == torch.float32 for name in SCORE_FIELDS)


def test_positions_labelled_as_padding_are_not_counted():
    model, padded = _model(), _tokens(batch=2, length=24)
    labels = padded.clone()
    labels[0, 16:] = -100
    labels[1, 10:] = -100
    with_labels = importance_scores(model, [{"tokens": padded, "labels": labels}])
    # causal attention: the padding cannot change the earlier positions' activations
    first, second = padded[:1, :16], padded[1:, :10]
    _assert_scores_close(with_labels, importance_scores(model, [{"tokens": first},
                                                                {"tokens": second}]))
    assert with_labels.num_tokens == 26
    # block influence is a mean over tokens, so the longer sequence weighs more
    by_sequence = [_reference_scores(model, x)["layer"] for x in (first, second)]
    torch.testing.assert_close(with_labels.layer,
                               ((16 * by_sequence[0] + 10 * by_sequence[1]) / 26).float())
    counted_anyway = _scores(model, padded)
    assert not torch.allclose(counted_anyway.intermediate, with_labels.intermediate, rtol=1e-3)


def test_every_token_also_counts_each_segments_first_token_but_not_padding():
    """Packing ignores the label of every segment's first token (no prediction across a
    document boundary): left out of the scores by default; Minitron's rule (every_token) counts
    it, and still leaves out the padding segment."""
    from acadlm_plugins.data.packing import packed_sample

    model = _model()
    tokens = _tokens(batch=1, length=24)[0].numpy()
    sample = packed_sample(tokens, [9, 11, 4], pad_start=20)  # two documents, then padding
    batch = {key: value.unsqueeze(0) for key, value in sample.items()}
    default = importance_scores(model, [batch])
    minitron = importance_scores(model, [batch], every_token=True)
    assert (default.num_tokens, minitron.num_tokens) == (18, 20)
    # every real token, with no padding: the model run on the 20 real tokens alone, at the
    # pack's positions (plain causal attention, as the batch carries no document mask)
    plain = importance_scores(model, [{"tokens": batch["tokens"][:, :20],
                                       "input_pos": batch["input_pos"][:, :20]}])
    _assert_scores_close(minitron, plain)
    assert not torch.allclose(default.hidden, minitron.hidden, rtol=1e-4)


def test_max_sequences_cuts_the_last_batch_and_reads_no_further():
    model, tokens = _model(), _tokens(batch=6)

    def batches():
        yield {"tokens": tokens[:3]}
        yield {"tokens": tokens[3:]}
        raise AssertionError("a batch beyond max_sequences was requested")

    scores = importance_scores(model, batches(), max_sequences=4)
    assert scores.num_sequences == 4
    _assert_scores_close(scores, _scores(model, tokens[:4]))
    with pytest.raises(ValueError, match="empty"):
        importance_scores(model, [])


def test_bfloat16_model_gives_nearly_the_fp32_scores():
    model, tokens = _model(), _tokens()
    full = _scores(model, tokens)
    half = _scores(copy.deepcopy(model).to(torch.bfloat16), tokens)
    for name in ("head", "kv_head", "hidden", "intermediate"):
        torch.testing.assert_close(getattr(half, name), getattr(full, name), rtol=0.05, atol=1e-3)
    torch.testing.assert_close(half.layer, full.layer, rtol=0.1, atol=0.02)


def test_hooks_are_removed_and_mode_restored_when_the_forward_fails():
    model, tokens = _model(), _tokens(batch=2)
    model.train()
    with torch.no_grad():
        before = model.eval()(tokens)
    model.train()

    def batches():
        yield {"tokens": tokens}
        yield {"tokens": tokens, "mask": torch.ones(2, 5, 5, dtype=torch.bool)}  # wrong shape

    with pytest.raises(RuntimeError):
        importance_scores(model, batches())
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), before)
    _assert_scores_close(_scores(model, tokens), _scores(_model(), tokens), rtol=0)


def test_scores_survive_a_save_and_load(tmp_path):
    scores = _scores(_model(), _tokens(batch=2))
    loaded = ImportanceScores.load(scores.save(tmp_path / "importance.pt"))
    _assert_scores_close(loaded, scores, rtol=0)
    assert (loaded.num_sequences, loaded.num_tokens) == (scores.num_sequences, scores.num_tokens)
    assert ImportanceScores.from_dict(scores.to_dict()).num_tokens == scores.num_tokens


# --------------------------------------------------------------------- planted units
def _top(values: torch.Tensor, k: int) -> set[int]:
    return set(values.topk(k).indices.tolist())


def test_a_kv_group_with_large_values_ranks_first_and_is_kept():
    model, tokens = _model(), _tokens()
    plain = _scores(model, tokens)
    with torch.no_grad():
        model.layers[0].attn.v_proj.weight[HEAD_DIM:2 * HEAD_DIM] *= 50  # KV head 1: heads 2, 3
    scores = _scores(model, tokens)
    # attention output is linear in the values: both heads of the group grow exactly 50x
    torch.testing.assert_close(scores.head[0, 2:], 50 * plain.head[0, 2:], rtol=1e-4, atol=0)
    assert _top(scores.head[0], 2) == {2, 3} and int(scores.kv_head[0].argmax()) == 1
    target = resolve_target(architecture_of(model), {"num_kv_heads": 1, "num_heads": 2})
    kept = keep_indices(scores, architecture_of(model), target)
    assert kept.kv_heads[0].tolist() == [1] and kept.heads[0].tolist() == [2, 3]


def test_a_query_head_with_large_values_ranks_first_in_its_layer():
    model, tokens = _model(num_kv_heads=4), _tokens()
    with torch.no_grad():
        model.layers[1].attn.v_proj.weight[2 * HEAD_DIM:3 * HEAD_DIM] *= 50
    scores = _scores(model, tokens)
    assert int(scores.head[1].argmax()) == 2
    source = architecture_of(model)
    target = resolve_target(source, {"num_kv_heads": 1, "num_heads": 1})
    assert keep_indices(scores, source, target).heads[1].tolist() == [2]


def test_mlp_channels_with_large_activations_rank_first_and_are_kept():
    model, tokens = _model(), _tokens()
    plain = _scores(model, tokens)
    with torch.no_grad():
        model.layers[2].mlp.w3.weight[[5, 77]] *= 50  # w2's input is silu(w1 x) * w3 x
    scores = _scores(model, tokens)
    torch.testing.assert_close(scores.intermediate[2, [5, 77]],
                               50 * plain.intermediate[2, [5, 77]], rtol=1e-4, atol=0)
    assert _top(scores.intermediate[2], 2) == {5, 77}
    target = resolve_target(architecture_of(model), {"intermediate_dim": 2})
    assert keep_indices(scores, architecture_of(model), target).intermediate[2].tolist() == [5, 77]


def test_a_layer_that_passes_its_input_through_has_no_influence_and_is_dropped():
    model, tokens = _model(), _tokens()
    with torch.no_grad():
        model.layers[1].attn.output_proj.weight.zero_()
        model.layers[1].mlp.w2.weight.zero_()
    scores = _scores(model, tokens)
    assert scores.layer[1] < 1e-6 and scores.layer[[0, 2]].min() > 1e-3
    target = resolve_target(architecture_of(model), {"num_layers": 2})
    assert keep_indices(scores, architecture_of(model), target).layers == [0, 2]


def test_hidden_channels_scaled_by_a_layer_norm_rank_first_and_the_final_norm_is_not_scored():
    model, tokens = _model(), _tokens()
    before = _scores(model, tokens).hidden
    with torch.no_grad():  # one channel through each of a layer's RMSNorms
        model.layers[0].sa_norm.scale[20] *= 50
        model.layers[1].mlp_norm.scale[10] *= 50
    scores = _scores(model, tokens)
    assert _top(scores.hidden, 2) == {10, 20}
    target = resolve_target(architecture_of(model), {"embed_dim": 4})
    assert {10, 20} <= set(keep_indices(scores, architecture_of(model), target).hidden.tolist())
    with torch.no_grad():  # the final norm feeds only the output head: it does not count
        model.norm.scale[3] *= 50
    torch.testing.assert_close(_scores(model, tokens).hidden, scores.hidden)
    assert not torch.allclose(before, scores.hidden)


def test_query_heads_are_chosen_within_the_best_kv_groups():
    source = architecture_of(_model(num_layers=1))
    scores = ImportanceScores(
        layer=torch.ones(1), head=torch.tensor([[9.0, 1.0, 5.0, 6.0]]),
        kv_head=torch.tensor([[10.0, 11.0]]), hidden=torch.arange(64.0),
        intermediate=torch.arange(128.0).flip(0)[None])
    one_group = keep_indices(scores, source, resolve_target(source, {"num_kv_heads": 1,
                                                                     "num_heads": 1}))
    # head 0 has the best score, but its group does not: heads never change group
    assert one_group.kv_heads[0].tolist() == [1] and one_group.heads[0].tolist() == [3]
    one_each = keep_indices(scores, source, resolve_target(source, {"num_heads": 2,
                                                                    "embed_dim": 62,
                                                                    "intermediate_dim": 3}))
    assert one_each.heads[0].tolist() == [0, 3]
    assert one_each.hidden.tolist() == list(range(2, 64))
    assert one_each.intermediate[0].tolist() == [0, 1, 2]


# ------------------------------------------------------------------- one-shot pruning
def test_one_shot_prune_builds_exactly_the_target_architecture():
    model, tokens = _model(), _tokens()
    source = architecture_of(model)
    target = resolve_target(source, {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                                     "embed_dim": 40, "intermediate_dim": 80})
    pruned, arch = one_shot_prune(model, _scores(model, tokens), target)
    assert arch == target and architecture_of(pruned) == target
    with torch.no_grad():
        assert pruned.eval()(tokens).shape == (4, 24, VOCAB)


@pytest.mark.parametrize("target", [
    {"intermediate_dim": 80},
    {"num_layers": 2, "num_heads": 2, "intermediate_dim": 100},  # one head of each group
    {"num_kv_heads": 1, "num_heads": 2},                          # one whole group
])
def test_one_shot_model_equals_the_source_with_the_dropped_units_zeroed(target):
    model, tokens = _model(), _tokens()
    source = architecture_of(model)
    target = resolve_target(source, target)
    scores = _scores(model, _tokens(seed=7))
    kept = keep_indices(scores, source, target)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index, layer in enumerate(reference.layers):
            if index not in kept.layers:  # an identity layer: nothing added to the residual
                layer.attn.output_proj.weight.zero_()
                layer.mlp.w2.weight.zero_()
                continue
            dropped_heads = sorted(set(range(source.num_heads)) - set(kept.heads[index].tolist()))
            for head in dropped_heads:
                layer.attn.output_proj.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
            dropped_channels = sorted(set(range(source.intermediate_dim))
                                      - set(kept.intermediate[index].tolist()))
            layer.mlp.w2.weight[:, dropped_channels] = 0
    pruned, _ = one_shot_prune(model, scores, target)
    with torch.no_grad():
        small, expected, original = pruned.eval()(tokens), reference(tokens), model(tokens)
    assert (small - expected).abs().max() < 1e-5
    assert (small - original).abs().max() > 1e-3  # the pruning did change the function


def test_one_shot_export_loads_in_transformers_with_the_same_logits(tmp_path):
    from safetensors.torch import load_file
    from tiny_setup import write_tiny_checkpoint
    from torchtune.models.convert_weights import hf_to_tune
    from transformers import AutoModelForCausalLM

    from acadlm_plugins.models.llama import llama_from_hf_config
    from acadlm_plugins.pruning.export import export_pruned_model

    source_dir = write_tiny_checkpoint(tmp_path / "source")
    model = llama_from_hf_config(str(source_dir)).eval()
    model.load_state_dict(hf_to_tune(load_file(source_dir / "model.safetensors"), num_heads=4,
                                     num_kv_heads=2, dim=64, head_dim=16))
    tokens = _tokens(batch=2, length=20)
    with torch.no_grad():
        hf_source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
        assert (hf_source(tokens).logits - model(tokens)).abs().max() < 1e-4  # loaded right
    target = resolve_target(architecture_of(model), {"num_layers": 1, "num_heads": 2,
                                                     "embed_dim": 48, "intermediate_dim": 64})
    pruned, arch = one_shot_prune(model, _scores(model, _tokens(seed=3)), target)
    dest = export_pruned_model(pruned, arch, source_dir, tmp_path / "pruned")
    hf = AutoModelForCausalLM.from_pretrained(dest).eval()
    assert (hf.config.num_hidden_layers, hf.config.hidden_size) == (1, 48)
    with torch.no_grad():
        assert (hf(tokens).logits - pruned.eval()(tokens)).abs().max() < 1e-4


def test_slicing_refuses_query_heads_outside_the_kept_kv_groups():
    model = _model()
    source = architecture_of(model)
    target = resolve_target(source, {"num_kv_heads": 1, "num_heads": 2})
    layers = [0, 1, 2]
    units = KeptUnits.unscaled(layers, torch.arange(64), {i: torch.tensor([1]) for i in layers},
                               {i: torch.tensor([0, 1]) for i in layers},  # heads of group 0
                               {i: torch.arange(128) for i in layers})
    with pytest.raises(ValueError, match="KV group"):
        materialize_units(model, units, source, target)


# ------------------------------------------------------------------ log_alpha init
def test_log_alpha_keeps_the_importance_top_k_and_order_in_every_row():
    scores = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    alpha = log_alpha_from_scores(scores, 4, high=4.6, low=0.6)
    assert alpha.shape == scores.shape
    for row_scores, row in zip(scores, alpha):
        order = row_scores.argsort(descending=True)
        assert torch.equal(row[order[:4]], torch.full((4,), 4.6))
        rest = row[order[4:]]
        assert (rest < 4.6).all() and (rest[:-1] > rest[1:]).all()  # strictly, by importance
        assert rest[-1] == pytest.approx(0.6)
        assert _top(row, 4) == _top(row_scores, 4)
    assert torch.equal(log_alpha_from_scores(scores[2], 4, high=4.6, low=0.6), alpha[2])


def test_log_alpha_gap_starts_the_dropped_units_closed_in_the_same_order():
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    open_start = log_alpha_from_scores(scores, 4, high=4.6, low=0.6)
    closed_start = log_alpha_from_scores(scores, 4, high=4.6, low=0.6, gap=7.0)
    kept = open_start == 4.6
    assert torch.equal(closed_start[kept], open_start[kept])
    torch.testing.assert_close(closed_start[~kept], open_start[~kept] - 7.0)
    # the most important dropped unit now starts mostly closed: P(gate > 0) below 1/3
    log_ratio = torch.log(torch.tensor(0.1 / 1.1))
    assert torch.sigmoid(closed_start[~kept].max() - 2 / 3 * log_ratio) < 1 / 3
    with pytest.raises(ValueError, match="gap"):
        log_alpha_from_scores(scores, 4, high=4.6, low=0.6, gap=-1.0)


def test_log_alpha_edge_cases():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert torch.equal(log_alpha_from_scores(scores, 3, high=2.0, low=0.0), torch.full((1, 3), 2.0))
    torch.testing.assert_close(log_alpha_from_scores(scores, 0, high=2.0, low=0.0),
                               torch.tensor([[4 / 3, 0.0, 2 / 3]]))
    # the GQA head mask: (L * n_kv, heads_per_kv) rows
    heads = torch.rand(3 * 2, 2)
    assert log_alpha_from_scores(heads, 1, high=1.0, low=-1.0).shape == (6, 2)
    with pytest.raises(ValueError):
        log_alpha_from_scores(scores, 4, high=2.0, low=0.0)
    with pytest.raises(ValueError):
        log_alpha_from_scores(scores, 1, high=0.0, low=2.0)
