"""acadlm-plan (acadlm_plugins/planning): every paper-scale config passes the dry run on the meta
device with a shipped config.json as its model folder, the counts and token budgets equal hand
computations, the memory formula equals one worked by hand, and the refusals name their key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_setup import REPO_ROOT

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models import hf_model_spec
from acadlm_plugins.planning import plan_config
from acadlm_plugins.planning.cli import main
from acadlm_plugins.planning.loading import detect_recipe, launch_line, load_config
from acadlm_plugins.planning.memory import optimizer_state, shard_numel
from acadlm_plugins.planning.reference import reference_config, write_reference_model_dir
from acadlm_plugins.planning.report import format_plan
from acadlm_plugins.pruning.architecture import architecture_from_hf_config, resolve_target

CONFIGS = REPO_ROOT / "configs"
GPUS = 8  # every paper-scale config opens with `tune run --nproc_per_node 8`

# Parameter counts worked out by hand from the published shapes (per layer: q, k, v, o; three
# MLP matrices; two norms; plus the final norm, the embedding and the untied output head).
LLAMA2_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 2 * 32000 * 4096
SHEARED_2_7B = 32 * (4 * 2560 * 2560 + 3 * 2560 * 6912 + 2 * 2560) + 2560 + 2 * 32000 * 2560
SHEARED_1_3B = 24 * (4 * 2048 * 2048 + 3 * 2048 * 5504 + 2 * 2048) + 2048 + 2 * 32000 * 2048
LLAMA3_8B = (32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
             + 2 * 128256 * 4096)
MINITRON_4B = (32 * (2 * 3072 * 4096 + 2 * 3072 * 1024 + 3 * 3072 * 9216 + 2 * 3072) + 3072
               + 2 * 128256 * 3072)


def model_dir(tmp_path: Path, name: str, **changes) -> str:
    """A weightless model folder: a shipped reference config.json, optionally edited (as a
    long-context stage's export edits θ and max_position_embeddings)."""
    edit = "-".join(f"{k}_{v}" for k, v in sorted(changes.items()))  # no "=": tune run splits on it
    folder = write_reference_model_dir(name, tmp_path / f"{name}{edit and '-' + edit}")
    if changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def minitron_student(tmp_path: Path) -> str:
    """The config.json the prune recipe exports for the Minitron-4B-Width target."""
    source = model_dir(tmp_path, "llama-3.1-8b")
    spec = hf_model_spec(source)
    target = resolve_target(architecture_from_hf_config(source),
                            {"embed_dim": 3072, "intermediate_dim": 9216})
    folder = tmp_path / "minitron_student"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(spec.pruned_config(target, rope=spec.rope)))
    return str(folder)


def stage_export(tmp_path: Path, *, theta: float, positions: int) -> str:
    """A ProLong stage's export of Llama-3-8B: the stage writes its θ and length into the
    saved config.json (stage 1: 8e6 and 65536; stage 2: 1.28e8 and 524288)."""
    return model_dir(tmp_path, "meta-llama-3-8b", rope_theta=theta,
                     max_position_embeddings=positions)


# config, overrides(tmp_path), recipe, tokens per step, steps, source params, target params
PAPER_CONFIGS = {
    "llama2/7b_to_2.7b_prune.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'llama-2-7b')}"], "prune",
        4 * 4096 * 1 * GPUS, 3200, LLAMA2_7B, SHEARED_2_7B),
    "llama2/7b_to_1.3b_prune.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'llama-2-7b')}"], "prune",
        4 * 4096 * 1 * GPUS, 3200, LLAMA2_7B, SHEARED_1_3B),
    "sheared_llama/2.7b_continued_pretrain.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'sheared-llama-2.7b')}", "tokenizer.path=x"],
        "continued_pretrain", 16 * 4096 * 2 * GPUS, 48000, SHEARED_2_7B, None),
    "sheared_llama/1.3b_continued_pretrain.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'sheared-llama-1.3b')}", "tokenizer.path=x"],
        "continued_pretrain", 16 * 4096 * 2 * GPUS, 48000, SHEARED_1_3B, None),
    "llama3_1/8b_to_minitron_4b_width_prune.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'llama-3.1-8b')}"], "prune",
        1 * 8192 * 1 * GPUS, 0, LLAMA3_8B, MINITRON_4B),
    "llama3_1/minitron_4b_width_distill.yaml": (
        lambda t: [f"model_dir={minitron_student(t)}",
                   f"distillation.teacher.model.path={model_dir(t, 'llama-3.1-8b')}"],
        "continued_pretrain", 1 * 8192 * 144 * GPUS, 9961, MINITRON_4B, None),
    "llama3/prolong_64k_stage1.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'meta-llama-3-8b')}"], "long_context",
        1 * 65536 * 8 * GPUS, 5000, LLAMA3_8B, None),
    "llama3/prolong_512k_stage2.yaml": (
        lambda t: [f"model_dir={stage_export(t, theta=8e6, positions=65536)}"],
        "long_context", 1 * 524288 * 16 * (GPUS // 8), 2500, LLAMA3_8B, None),
    "llama3/prolong_sft.yaml": (
        lambda t: [f"model_dir={stage_export(t, theta=1.28e8, positions=524288)}"],
        "sft", 1 * 65536 * 8 * GPUS, 250, LLAMA3_8B, None),
    "sheared_llama/qurater_1.3b.yaml": (
        lambda t: [f"model_dir={model_dir(t, 'sheared-llama-1.3b')}", "judgments=x.jsonl"],
        "rater", 2 * 513 * 16 * 4 * GPUS, 879, SHEARED_1_3B + 4 * 2048, None),
}


def test_recipes_read_model_dir():
    """Every paper-scale config names its model folder once, as the top-level `model_dir`; the
    plan refuses exactly the keys the recipe refuses, so the recipe must know that key."""
    from acadlm_plugins.planning.checks import recipe_keys

    for recipe in ("prune", "continued_pretrain", "long_context", "rater"):
        known = recipe_keys(recipe)[0]
        assert "model_dir" in known, f"the {recipe} recipe refuses the top-level `model_dir`"


def test_hand_counts_are_the_published_sizes():
    assert round(LLAMA2_7B / 1e9, 2) == 6.74
    assert round(LLAMA3_8B / 1e9, 2) == 8.03
    assert round(SHEARED_2_7B / 1e9, 1) == 2.7
    assert round(SHEARED_1_3B / 1e9, 1) == 1.3
    assert round(MINITRON_4B / 1e9, 2) == 4.51  # the Llama-3.1-Minitron-4B-Width model card


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_plans(name: str, tmp_path: Path):
    overrides, recipe, per_step, steps, source, target = PAPER_CONFIGS[name]
    plan = plan_config(CONFIGS / name, overrides(tmp_path))
    assert plan.recipe == recipe
    assert plan.world_size == GPUS
    assert plan.budget.tokens_per_step == per_step
    assert plan.budget.steps == steps
    assert plan.budget.total_tokens == per_step * steps
    assert plan.source.total_params == source
    if target is None:
        assert plan.target is None
    else:
        assert plan.target.total_params() == target
    assert plan.memory.total >= plan.memory.static > 0


def test_one_rater_criterion_given_as_a_string_plans_one_head(tmp_path: Path):
    """`criteria=educational_value` is one criterion (one scalar head), as the rater reads it,
    not a list of its characters."""
    plan = plan_config(CONFIGS / "sheared_llama/qurater_1.3b.yaml",
                       [f"model_dir={model_dir(tmp_path, 'sheared-llama-1.3b')}",
                        "judgments=x.jsonl", "criteria=educational_value"])
    assert plan.source.total_params == SHEARED_1_3B + 2048


def test_paper_token_budgets(tmp_path: Path):
    """The totals each paper states: 0.4B pruning, 50B continued pre-training, 94B Minitron
    distillation, 20B per ProLong stage, 1B SFT."""
    def total(name: str) -> int:
        overrides = PAPER_CONFIGS[name][0](tmp_path)
        return plan_config(CONFIGS / name, overrides).budget.total_tokens

    assert total("llama2/7b_to_2.7b_prune.yaml") == 419_430_400
    assert total("sheared_llama/1.3b_continued_pretrain.yaml") == 50_331_648_000
    assert total("llama3_1/minitron_4b_width_distill.yaml") == 94_003_789_824
    assert total("llama3/prolong_64k_stage1.yaml") == 20_971_520_000
    assert total("llama3/prolong_512k_stage2.yaml") == 20_971_520_000
    assert total("llama3/prolong_sft.yaml") == 1_048_576_000
    # torchtune's distributed SFT shards the data over world_size // tensor_parallel_dim
    overrides = PAPER_CONFIGS["llama3/prolong_sft.yaml"][0](tmp_path)
    tp = plan_config(CONFIGS / "llama3/prolong_sft.yaml", [*overrides, "tensor_parallel_dim=2"])
    assert (tp.budget.data_parallel, tp.budget.total_tokens) == (4, 524_288_000)
    assert any("tensor_parallel_dim 2" in note for note in tp.notes)


def test_llama31_rope_scaling_is_kept(tmp_path: Path):
    plan = plan_config(CONFIGS / "llama3_1/8b_to_minitron_4b_width_prune.yaml",
                       [f"model_dir={model_dir(tmp_path, 'llama-3.1-8b')}"])
    rope = plan.source.rope
    assert (rope.theta, rope.rope_type, rope.factor, rope.original_max_position_embeddings) == (
        500_000.0, "llama3", 8.0, 8192)
    assert (plan.target.num_heads, plan.target.num_kv_heads, plan.target.num_layers) == (32, 8, 32)


def test_prolong_sft_header_command_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture):
    """The `acadlm-plan` line in the header of configs/llama3/prolong_sft.yaml, run exactly as
    written from the repository root, plans the SFT on the stage-2 export (θ 1.28e8, 512K
    positions): the same plan as on `stage_export`, the folder stage 2 writes."""
    import shlex

    config = CONFIGS / "llama3/prolong_sft.yaml"
    lines = [line.lstrip("#").strip() for line in config.read_text().splitlines()
             if line.lstrip("#").strip().startswith("acadlm-plan ")]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0])
    assert argv[:3] == ["acadlm-plan", "--config", "configs/llama3/prolong_sft.yaml"]
    monkeypatch.chdir(REPO_ROOT)
    assert main(argv[1:] + ["--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    export = plan_config(config, PAPER_CONFIGS["llama3/prolong_sft.yaml"][0](tmp_path))
    assert data["recipe"] == export.recipe == "sft"
    assert data["source"]["total_params"] == export.source.total_params == LLAMA3_8B
    assert (data["source"]["rope"]["theta"], data["source"]["max_seq_len"]) == (1.28e8, 524288)
    assert data["tokens"]["total_tokens"] == export.budget.total_tokens == 1_048_576_000
    assert data["memory_per_rank_bytes"]["total"] == export.memory.total
    assert main(argv[1:]) == 0
    assert "θ 1.28e+08" in capsys.readouterr().out

def test_selection_config_plans():
    plan = plan_config(CONFIGS / "sheared_llama/qurating_select_30b_of_260b.yaml",
                       ["scores_dir=somewhere"])
    assert plan.recipe == "select"
    assert plan.selection["budget_tokens"] == 30_000_000_000
    assert plan.selection["tau"] == 2.0 and plan.selection["mode"] == "sample"


def test_memory_equals_a_hand_computation(tmp_path: Path):
    """ProLong stage 1 on 8 GPUs: Llama-3-8B computing in bf16 on fp32 weights, gradients and
    moments (`mixed_precision: true`), FSDP (every dim-0 divides by 8), AdamW, activation
    checkpointing, one 64K sequence per micro-batch, logits 2048 positions at a time."""
    plan = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml",
                       [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}"])
    m = plan.memory
    bf16, fp32 = 2, 4
    assert m.weights == LLAMA3_8B // 8 * fp32 == 4_015_130_624
    assert m.weights_dtype == "float32" and m.dtype == "bfloat16"
    assert m.gradients == m.weights
    assert m.optimizer_state == 2 * m.weights
    assert m.buffers == 65536 * 64 * 2 * 4 + 64 * 4  # float32 RoPE cos/sin table and θ
    t, h, layers = 65536, 4096, 32
    norm = h * (bf16 + 4 + 4) + 4  # float32 input, float32 normalized, float32 rsqrt, output
    one_layer = t * (2 * norm + (4 * 32 * 128 + 4 * 14336) * bf16 + 32 * 4)
    head = t * norm  # the final RMSNorm
    logits = 2048 * 128256 * (bf16 + 8)
    assert m.activations_checkpointed == layers * t * h * bf16 + one_layer + head + logits
    assert m.activations_full == layers * one_layer + head + logits
    assert m.activation_checkpointing
    assert m.total == (m.weights + m.gradients + m.optimizer_state + m.buffers
                       + m.activations_checkpointed)
    assert round(m.total / 2**30, 1) == 49.9
    pure = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml",
                       [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}",
                        "mixed_precision=false"]).memory
    assert pure.weights == LLAMA3_8B // 8 * bf16 and pure.weights_dtype == ""
    assert round(pure.total / 2**30, 1) == 42.5


def _checkpointed_layer_and_head(tokens: int) -> int:
    """Llama-3-8B in bf16, as in the hand computation above: the recomputed layer's saved
    tensors and the final RMSNorm's, for ``tokens`` tokens."""
    h, bf16 = 4096, 2
    norm = h * (bf16 + 4 + 4) + 4
    return tokens * (2 * norm + (4 * 32 * 128 + 4 * 14336) * bf16 + 32 * 4) + tokens * norm


def test_sequence_parallel_ranks_hold_a_share_of_the_activations(tmp_path: Path):
    """ProLong stage 2 on 8 GPUs: one 512K sequence per micro-batch split over 8
    sequence-parallel ranks, so each rank holds the activations of 65,536 tokens (logits 2048
    positions at a time), not of the whole sequence."""
    name = "llama3/prolong_512k_stage2.yaml"
    m = plan_config(CONFIGS / name, PAPER_CONFIGS[name][0](tmp_path)).memory
    t = 524288 // 8
    logits = 2048 * 128256 * (2 + 8)
    assert m.activation_checkpointing
    assert m.activations_checkpointed == (32 * t * 4096 * 2 + _checkpointed_layer_and_head(t)
                                          + logits) == 37_532_467_200


def test_activation_offloading_leaves_the_layer_inputs_off_the_gpu(tmp_path: Path):
    """ProLong SFT: one 64K pack, checkpointed, LinearCrossEntropyLoss (2,048 positions of
    logits at a time); enable_activation_offloading keeps the 32 checkpointed layer inputs in
    CPU memory, and without it (the config's setting, as ProLong) they count."""
    name = "llama3/prolong_sft.yaml"
    overrides = PAPER_CONFIGS[name][0](tmp_path)
    t = 65536
    on_gpu = _checkpointed_layer_and_head(t) + 2048 * 128256 * (2 + 8)
    offloaded = plan_config(CONFIGS / name, [*overrides, "enable_activation_offloading=True"])
    assert offloaded.memory.activations_checkpointed == on_gpu == 20_352_598_016
    assert any(n.startswith("enable_activation_offloading") for n in offloaded.notes)
    kept = plan_config(CONFIGS / name, overrides)
    assert kept.memory.activations_checkpointed == on_gpu + 32 * t * 4096 * 2
    assert 51 * 2**30 < kept.memory.total < 52 * 2**30   # 51.9 GiB a GPU on 8 GPUs


STOCK_LOSS = ["model.project_in_loss=False",
              "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss",
              "~loss.chunk_tokens"]


def test_projecting_in_the_loss_fits_prolong_sft_on_8_gpus_of_80_gb(tmp_path: Path):
    """With torchtune's chunked loss a 64K step keeps its bf16 logits and their float32
    log-softmax (6 bytes each) and the plan is 94.7 GiB a GPU; projecting 2,048 positions at a
    time in the loss leaves 2,048 x V x 10 bytes, plus the root's embeddings and output
    projection gathered whole (7/8 of them beyond the shard)."""
    name = "llama3/prolong_sft.yaml"
    overrides = PAPER_CONFIGS[name][0](tmp_path)
    ours, stock = (plan_config(CONFIGS / name, [*overrides, *extra]).memory
                   for extra in ([], STOCK_LOSS))
    t, vocab = 65536, 128256
    assert stock.activations_checkpointed - ours.activations_checkpointed == \
        t * vocab * (2 + 4) - 2048 * vocab * (2 + 8)
    root = (2 * vocab * 4096 + 4096) * 2
    assert ours.root_gathered == root - root // 8 and stock.root_gathered == 0
    assert stock.total > 94 * 2**30 and ours.total < 52 * 2**30   # 94.7 and 51.9 GiB


@pytest.mark.parametrize("extra, key", [
    (["model.project_in_loss=False"], "model.project_in_loss"),
    (STOCK_LOSS[1:], "loss._component_"),
    (["loss.chunk_tokens=0"], "loss.chunk_tokens"),
    (["custom_sharded_layers=[output]"], "custom_sharded_layers")])
def test_the_plan_refuses_one_half_of_the_projection_in_the_loss(tmp_path: Path, extra, key):
    name = "llama3/prolong_sft.yaml"
    with pytest.raises(ConfigError) as refused:
        plan_config(CONFIGS / name, [*PAPER_CONFIGS[name][0](tmp_path), *extra])
    assert refused.value.key == key


def test_the_table_names_a_bound_and_the_activations_it_totals(tmp_path: Path):
    """Unpacked SFT conversations fill a step with at most the packed count of tokens, so the
    budget rows say "(at most)"; without activation checkpointing the total is the static
    memory plus the whole forward pass's activations, and its row says so."""
    sft = "llama3/prolong_sft.yaml"
    overrides = PAPER_CONFIGS[sft][0](tmp_path)
    packed = " ".join(format_plan(plan_config(CONFIGS / sft, overrides)).split())
    assert "per step 4.19M" in packed and "(at most)" not in packed
    unpacked = " ".join(format_plan(plan_config(CONFIGS / sft, [*overrides,
                                                                "dataset.packed=False"])).split())
    assert "per step (at most) 4.19M (4,194,304)" in unpacked
    assert "total (at most) 1.05B (1,048,576,000)" in unpacked

    plan = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml",
                       [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}",
                        "enable_activation_checkpointing=False", "mixed_precision=false"])
    m = plan.memory
    assert not m.activation_checkpointing
    assert m.total == m.static + m.activations_full == 494_696_665_344
    rows = " ".join(format_plan(plan).split())
    assert "total (activations not checkpointed) 460.72 GiB" in rows


def test_distillation_adds_the_kd_loss_and_the_gathered_teacher_weight(tmp_path: Path):
    """Minitron distillation, Llama-3.1-8B teaching the 4B width-pruned student in bf16, one
    8,192-token pack per micro-batch: the KD loss saves the teacher's final hidden state (4,096
    wide) and 16 bytes at each of the 8,191 counted positions; on 8 ranks the teacher's
    128,256 x 4,096 output projection is gathered whole, on one rank it is the parameter."""
    config = CONFIGS / "llama3_1/minitron_4b_width_distill.yaml"
    overrides = [f"model_dir={minitron_student(tmp_path)}",
                 f"distillation.teacher.model.path={model_dir(tmp_path, 'llama-3.1-8b')}"]
    kd_loss = 8191 * (4096 * 2 + 4 + 4 + 8)
    for world, gathered in ((GPUS, 128256 * 4096 * 2), (1, 0)):
        m = plan_config(config, overrides, world_size=world).memory
        assert (m.distillation_loss, m.teacher_gathered_weight) == (kd_loss, gathered)
        assert m.activations == m.activations_checkpointed + kd_loss
        assert m.total == m.static + gathered + m.activations
        assert m.to_dict()["teacher_gathered_weight"] == gathered
        assert m.teacher_weights == LLAMA3_8B // world * 2  # bf16, sharded like the student
    table = format_plan(plan_config(config, overrides))
    assert "teacher output weight, gathered" in table and "KD loss (saved for backward)" in table


def test_a_dense_attention_mask_is_counted_where_there_is_no_flex_attention(tmp_path: Path):
    """ProLong stage 1 with ``long_context.attention: mask`` (one 64K pack per micro-batch, 8
    micro-batches a step, 32 layers, bf16, checkpointed): on the CPU the activations count the
    8 boolean [1, S, S] masks and SDPA's additive bf16 copy (one per layer, or the recomputed
    layer's); on CUDA (FlexAttention from sm75) nothing is counted and the note gives the
    figure."""
    overrides = [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}",
                 "long_context.attention=mask"]
    square = 65536 * 65536
    cpu = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml", [*overrides, "device=cpu"])
    m = cpu.memory
    assert m.attention_mask_checkpointed == 8 * square + square * 2
    assert m.attention_mask_full == 8 * square + 32 * square * 2
    assert m.activations == m.activations_checkpointed + m.attention_mask_checkpointed
    assert round(m.total / 2**30, 1) == 49.9 + 40.0
    rows = " ".join(format_plan(cpu).split())
    assert "attention masks, checkpointed 40.00 GiB" in rows
    assert "attention masks, not checkpointed 288.00 GiB" in rows
    cuda = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml", [*overrides, "device=cuda"])
    assert (cuda.memory.attention_mask_checkpointed, cuda.memory.attention_mask_full) == (0, 0)
    assert round(cuda.memory.total / 2**30, 1) == 49.9
    assert "attention masks, checkpointed" not in format_plan(cuda)
    note = next(n for n in cuda.notes if n.startswith("long_context.attention: mask"))
    assert "40.00 GiB checkpointed, 288.00 GiB not" in note


def test_fsdp_shards_and_low_bit_optimizer_state():
    assert shard_numel((10, 3), 4) == 9                # ceil(10 / 4) rows of 3
    assert shard_numel((10, 3), 1) == 30
    params = [torch.empty(4096, 4096, device="meta"), torch.empty(64, device="meta")]
    adamw = optimizer_state(params, {"_component_": "torch.optim.AdamW"}, world_size=1,
                            bytes_per_value=2)
    assert adamw.bytes == 2 * (4096 * 4096 + 64) * 2
    eight_bit = optimizer_state(params, {"_component_": "torchao.optim.AdamW8bit"},
                                world_size=1, bytes_per_value=2)
    # codes (1 byte) + a float32 scale per 256 values for the big tensor; the 64-value tensor
    # is below torchao's 4096 and keeps moments in the param dtype
    assert eight_bit.bytes == 2 * (4096 * 4096 + 4096 * 4096 // 256 * 4) + 2 * 64 * 2
    offload = optimizer_state(params, {"_component_": "torchao.optim.CPUOffloadOptimizer"},
                              world_size=1, bytes_per_value=2)
    assert offload.bytes == 0


def test_optimizer_state_counts_the_moments_each_optimizer_keeps():
    def state(numel: int, **cfg) -> int:
        return optimizer_state([torch.empty(numel, device="meta")], cfg, world_size=1,
                               bytes_per_value=2).bytes

    # 4,100 values are not whole 256-value blocks: torchao keeps moments in the param dtype
    assert state(4100, _component_="torchao.optim.AdamW8bit") == 2 * 4100 * 2 == 16400
    assert state(4352, _component_="torchao.optim.AdamW8bit") == 2 * (4352 + 17 * 4)
    assert state(1000, _component_="torch.optim.SGD") == 0               # no momentum buffer
    assert state(1000, _component_="torch.optim.SGD", momentum=0.9) == 1000 * 2
    assert state(1000, _component_="torch.optim.AdamW", amsgrad=True) == 3 * 1000 * 2


def tiny_overrides(tmp_path: Path) -> list[str]:
    return [f"checkpointer.checkpoint_dir={tmp_path}", f"dataset.data_dir={tmp_path}"]


def test_tiny_plan_matches_the_real_tiny_models(tmp_path: Path):
    from acadlm_plugins.models.llama import llama_decoder
    from acadlm_plugins.models.smollm2 import tiny_llama

    plan = plan_config(CONFIGS / "tiny/prune.yaml", tiny_overrides(tmp_path))
    assert (plan.recipe, plan.world_size) == ("prune", 1)
    real = tiny_llama(vocab_size=512)
    embedding = real.tok_embeddings.weight.numel()
    assert plan.source.total_params == sum(p.numel() for p in real.parameters())
    assert plan.source.non_embedding_params == plan.source.total_params - embedding
    t = plan.target
    pruned = llama_decoder(vocab_size=512, num_layers=t.num_layers, num_heads=t.num_heads,
                           num_kv_heads=t.num_kv_heads, embed_dim=t.embed_dim,
                           intermediate_dim=t.intermediate_dim, head_dim=t.head_dim)
    assert t.total_params() == sum(p.numel() for p in pruned.parameters())
    assert plan.budget.tokens_per_step == 64 * int(load_config(
        CONFIGS / "tiny/prune.yaml", tiny_overrides(tmp_path)).batch_size)


def test_an_output_dir_inside_the_model_folder_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "tiny/prune.yaml", [*tiny_overrides(tmp_path),
                                                  f"output_dir={tmp_path / 'run'}"])
    assert err.value.key == "output_dir"


def test_a_recipe_other_than_the_configs_own_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="written for the prune recipe") as err:
        plan_config(CONFIGS / "tiny/prune.yaml", tiny_overrides(tmp_path), recipe="long_context")
    assert err.value.key == "--recipe"
    assert plan_config(CONFIGS / "tiny/prune.yaml", tiny_overrides(tmp_path),
                       recipe="prune").recipe == "prune"


def test_the_selection_table_keeps_long_keys_apart(capsys: pytest.CaptureFixture):
    assert main(["--config", str(CONFIGS / "smollm2/qurating_select.yaml")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("uniform_output_dir")]
    assert rows and rows[0].split()[0] == "uniform_output_dir"


def test_unknown_key_is_refused_naming_it(tmp_path: Path):
    with pytest.raises(ConfigError, match="did you mean `batch_size`") as err:
        plan_config(CONFIGS / "tiny/prune.yaml", [*tiny_overrides(tmp_path), "bacth_size=2"])
    assert err.value.key == "bacth_size"
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "tiny/prune.yaml", [*tiny_overrides(tmp_path), "pruning.mask_lrr=1"])
    assert err.value.key == "pruning.mask_lrr"


@pytest.mark.parametrize("override, key", [
    ("dataset.sources.books_64k.max_token=65536", "dataset.sources.books_64k"),  # misspelt
    ("dataset.sources.books_64k.share=-0.3", "dataset.sources.books_64k.share"),
    ("dataset.sources.books_512k.max_tokens=1000", "dataset.sources.books_512k.max_tokens"),
    # Longer than the 512K sequences, with pieces: no piece_tokens fits, so min_tokens is named.
    ("dataset.sources.books_64k.min_tokens=9000000", "dataset.sources.books_64k.min_tokens"),
    ("dataset.sources.books_64k.min_tokens=100000",  # pieces of 64K would all be dropped
     "dataset.sources.books_64k.piece_tokens"),
    ("dataset.sources.books_64k.piece_tokens=1048576",  # longer than the 512K sequences
     "dataset.sources.books_64k.piece_tokens"),
    ("dataset.sources.books_64k.piece_tokens=0", "dataset.sources.books_64k.piece_tokens"),
])
def test_long_context_source_settings_are_checked_without_their_files(tmp_path: Path,
                                                                       override: str, key: str):
    """The ProLong sources' own settings are refused as the run would refuse them, though
    no data file exists here (the plan reads none)."""
    overrides = [f"model_dir={stage_export(tmp_path, theta=8e6, positions=65536)}"]
    plan_config(CONFIGS / "llama3/prolong_512k_stage2.yaml", overrides)
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "llama3/prolong_512k_stage2.yaml", [*overrides, override])
    assert err.value.key == key


@pytest.mark.parametrize("config, source, override, key", [
    ("llama2/7b_to_2.7b_prune.yaml", "llama-2-7b", "pruning.target.embed_dim=5000",
     "pruning.target.embed_dim"),                                   # larger than the source
    ("llama2/7b_to_2.7b_prune.yaml", "llama-2-7b", "pruning.target.num_layers=0",
     "pruning.target.num_layers"),
    ("llama3_1/8b_to_minitron_4b_width_prune.yaml", "llama-3.1-8b",
     "pruning.target.num_heads=12", "pruning.target.num_heads"),   # 12 over 8 KV heads
    ("llama3_1/8b_to_minitron_4b_width_prune.yaml", "llama-3.1-8b",
     "pruning.target.embed_dim=3000", "pruning.target.embed_dim"),  # not a multiple of 32 heads
])
def test_impossible_targets_are_refused(tmp_path: Path, config: str, source: str,
                                        override: str, key: str):
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / config, [f"model_dir={model_dir(tmp_path, source)}", override])
    assert err.value.key == key


def test_family_refusal_names_the_config_field(tmp_path: Path):
    qwen3 = model_dir(tmp_path, "llama-2-7b", model_type="qwen3")
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "llama2/7b_to_2.7b_prune.yaml", [f"model_dir={qwen3}"])
    assert err.value.key == "model_type"


def test_unset_model_dir_is_named(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "llama2/7b_to_2.7b_prune.yaml")
    assert err.value.key == "model_dir"


def test_world_size_and_recipe_flags(tmp_path: Path):
    overrides = [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}"]
    plan = plan_config(CONFIGS / "llama3/prolong_64k_stage1.yaml", overrides, world_size=16)
    assert plan.budget.tokens_per_step == 65536 * 8 * 16
    assert plan.budget.steps == math.ceil(20_971_520_000 / (65536 * 8 * 16))
    assert plan.memory.weights == LLAMA3_8B // 16 * 4  # fp32 (mixed_precision)


def test_launch_line_and_recipe_detection(tmp_path: Path):
    line = launch_line("# x\n#   tune run --nnodes 2 --nproc_per_node=4 acadlm_plugins/"
                       "long_context_recipe --config c.yaml\n")
    assert (line.recipe, line.processes) == ("long_context", 8)
    assert launch_line("#  tune run full_finetune_single_device --config c.yaml").recipe == "sft"
    assert launch_line("seed: 0\n") is None
    optional = launch_line("#  tune run [--nproc_per_node 2] acadlm_plugins/rater_recipe --config c")
    assert (optional.recipe, optional.processes) == ("rater", 2)
    bare = tmp_path / "bare.yaml"
    bare.write_text("backbone_dir: x\njudgments: y\n")
    assert detect_recipe(load_config(bare), None)[0] == "rater"


def test_cli_table_json_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture):
    config = str(CONFIGS / "llama2/7b_to_2.7b_prune.yaml")
    assert main(["--config", config, "--reference", "llama-2-7b"]) == 0
    table = capsys.readouterr().out
    assert "6.74B (6,738,415,616)" in table and "2.70B (2,701,560,320)" in table
    assert "131.07K (131,072)" in table and "memory per GPU" in table
    assert main(["--config", config, "--reference", "llama-2-7b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"]["total_params"] == LLAMA2_7B
    assert data["tokens"]["total_tokens"] == 3200 * 131072
    assert main(["--config", config, "--reference", "llama-2-7b",
                 "pruning.target.embed_dim=5000"]) == 2
    assert "pruning.target.embed_dim" in capsys.readouterr().err


def test_reference_configs_are_the_published_shapes():
    expected = {"llama-2-7b": (32, 32, 32, 4096, 11008, 32000),
                "meta-llama-3-8b": (32, 32, 8, 4096, 14336, 128256),
                "llama-3.1-8b": (32, 32, 8, 4096, 14336, 128256),
                "sheared-llama-1.3b": (24, 16, 16, 2048, 5504, 32000),
                "sheared-llama-2.7b": (32, 20, 20, 2560, 6912, 32000)}
    for name, shape in expected.items():
        spec = hf_model_spec(reference_config(name))
        assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.embed_dim,
                spec.intermediate_dim, spec.vocab_size) == shape
    assert hf_model_spec(reference_config("llama-3.1-8b")).rope.scaled


@pytest.mark.parametrize("config, override, key", [
    ("tiny/prune.yaml", "validation.max_packs_per_domain=0", "validation.max_packs_per_domain"),
    ("tiny/prune.yaml", "validation.batch_sise=3", "validation.batch_sise"),
    ("tiny/continued_pretrain.yaml", "validation.batch_size=0", "validation.batch_size"),
    ("llama3/prolong_64k_stage1.yaml", "validation.batch_sise=3", "validation.batch_sise"),
])
def test_cli_refuses_the_validation_block_as_the_recipe_does(
        tmp_path: Path, capsys: pytest.CaptureFixture, config: str, override: str, key: str):
    """The recipe's `validation_settings` refusals, made by the plan (exit 2, key named)."""
    overrides = (tiny_overrides(tmp_path) if config.startswith("tiny/")
                 else [f"model_dir={model_dir(tmp_path, 'meta-llama-3-8b')}"])
    assert main(["--config", str(CONFIGS / config), *overrides, override]) == 2
    assert f"`{key}`" in capsys.readouterr().err
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / config, [*overrides, override])
    assert err.value.key == key


def test_one_shot_note_says_importance_is_scored_on_every_rank_device(
        tmp_path: Path, capsys: pytest.CaptureFixture):
    """`pruning.method=importance`: the note says what `one_shot_prune_and_export` does (every
    rank scores on its device; rank 0's CPU only slices a float32 copy), and the activations
    are one calibration forward pass without gradients."""
    from acadlm_plugins.planning.memory import ActivationShape, activation_bytes

    config = str(CONFIGS / "tiny/prune.yaml")
    assert main(["--config", config, *tiny_overrides(tmp_path),
                 "pruning.method=importance"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "every rank scores importance on the run's own model on its device (cpu, float32" in out
    assert "forward passes only" in out and "FLOPs on each rank" in out
    assert "rebuilds the model in float32 there" in out and "and slices it" in out
    assert "scores importance there" not in out and "FLOPs on CPU" not in out
    assert "the GPUs hold only the sharded weights" not in out

    plan = plan_config(CONFIGS / "tiny/prune.yaml",
                       [*tiny_overrides(tmp_path), "pruning.method=importance",
                        "pruning.calibration.batch_size=3"])
    pack = plan.budget.sequence_length
    forward = ActivationShape(tokens=3 * pack, logit_positions=3 * pack,
                              architecture=plan.source.architecture, bytes_per_value=4,
                              logit_bytes_per_value=8, offloaded=True)
    assert plan.memory.activations_full == plan.memory.activations_checkpointed
    assert plan.memory.activations == activation_bytes(forward, checkpointed=True) > 0


def test_tiny_config_headers_give_a_command_that_finds_tiny_setup():
    """configs/tiny/*.yaml: the command of a config that builds `tiny_setup.byte_tokenizer` sets
    `PYTHONPATH=tests` (without it `tune run` stops with ModuleNotFoundError: tiny_setup), and
    acadlm-plan still reads the recipe and process count from such a line."""
    line = launch_line("#   PYTHONPATH=tests tune run --nproc_per_node 2 "
                       "acadlm_plugins/prune_recipe --config configs/tiny/prune.yaml \\\n")
    assert (line.recipe, line.processes) == ("prune", 2)
    assert line.text.startswith("tune run --nproc_per_node 2")
    recipes = {}
    for path in sorted((CONFIGS / "tiny").glob("*.yaml")):
        text = path.read_text()
        line = launch_line(text)
        assert line is not None, path.name
        recipes[path.name] = line.recipe
        header = next(row for row in text.splitlines() if line.text in row)
        body = "\n".join(row for row in text.splitlines() if not row.lstrip().startswith("#"))
        if "tiny_setup." in body:
            assert f"PYTHONPATH=tests {line.text}" in header, path.name
    assert recipes["prune.yaml"] == "prune" and recipes["long_context.yaml"] == "long_context"
    assert recipes["qurating_train.yaml"] == "continued_pretrain"
    assert recipes["stock_qurating_selected.yaml"] == "sft"


STEP_INTERVAL_CASES = [
    ("eval_every_n_steps=-3", "eval_every_n_steps"),  # passed the old divisibility test
    ("eval_every_n_steps=0", "eval_every_n_steps"),  # was a ZeroDivisionError
    ("eval_every_n_steps=2.0", "eval_every_n_steps"),
    ("log_every_n_steps=0", "log_every_n_steps"),
    ("save_every_n_steps=-1", "save_every_n_steps"),
    ("keep_last_n_checkpoints=0", "keep_last_n_checkpoints"),
]


@pytest.mark.parametrize("dynamic_batch_loading", [True, False])
@pytest.mark.parametrize("override, key", STEP_INTERVAL_CASES)
def test_step_intervals_are_refused_as_the_recipe_refuses_them(
        tmp_path: Path, capsys: pytest.CaptureFixture, override: str, key: str,
        dynamic_batch_loading: bool):
    """The planner reads the loop's step intervals with the recipe's own reader (after the
    plugins, as the recipe does), so what a run refuses the plan refuses: exit 2, key named."""
    overrides = [*tiny_overrides(tmp_path),
                 f"dynamic_batch_loading.enabled={dynamic_batch_loading}", override]
    assert main(["--config", str(CONFIGS / "tiny/continued_pretrain.yaml"), *overrides]) == 2
    assert f"`{key}`" in capsys.readouterr().err
    rater = [f"model_dir={model_dir(tmp_path, 'sheared-llama-1.3b')}", "judgments=x.jsonl",
             override]
    with pytest.raises(ConfigError) as err:
        plan_config(CONFIGS / "sheared_llama/qurater_1.3b.yaml", rater)
    assert err.value.key == key


def test_the_recipes_and_the_planner_read_the_same_step_intervals():
    """One reader serves every training loop and the planner, with the recipes' defaults."""
    from omegaconf import OmegaConf

    from acadlm_plugins.training.run_checks import STEP_INTERVAL_DEFAULTS, step_interval

    empty = OmegaConf.create({})
    assert {key: step_interval(empty, key, 7) for key in STEP_INTERVAL_DEFAULTS} == {
        "log_every_n_steps": 1, "eval_every_n_steps": 7, "save_every_n_steps": 7,
        "keep_last_n_checkpoints": 2}


def test_evaluation_count_is_what_the_training_loop_does():
    """One evaluation at step 0, then after every step `runtime.is_due` says (every interval-th
    step and the last), for intervals below, at and above the number of steps."""
    from acadlm_plugins.planning.loop_recipes import evaluation_count
    from acadlm_plugins.training.runtime import is_due

    for steps in range(1, 13):
        for interval in range(1, 15):
            loop = 1 + sum(is_due(step, interval, steps) for step in range(1, steps + 1))
            assert evaluation_count(steps, interval) == loop, (steps, interval)


@pytest.mark.parametrize("overrides, line", [
    # dynamic batch loading sets the unset interval to its update interval (tiny prune: 5)
    ([], ("evaluation every 5 steps (eval_every_n_steps unset: "
          "dynamic_batch_loading.update_interval): 7 evaluations of the validation packs in 30 "
          "steps")),
    (["eval_every_n_steps=1", "max_steps=4", "pruning.lagrangian_warmup_steps=2",
      "dynamic_batch_loading.update_interval=2"],
     ("evaluation every 1 steps (eval_every_n_steps): 5 evaluations of the validation packs in "
      "4 steps")),
    (["dynamic_batch_loading.enabled=False", "max_steps=7", "pruning.lagrangian_warmup_steps=2"],
     "evaluation every 7 steps (eval_every_n_steps unset: max_steps): 2 evaluations"),
])
def test_the_plan_says_how_often_and_how_many_times_the_run_evaluates(
        tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str], line: str):
    plan = plan_config(CONFIGS / "tiny/prune.yaml", [*tiny_overrides(tmp_path), *overrides])
    evaluations = [note for note in plan.notes if note.startswith("evaluation every")]
    assert len(evaluations) == 1 and line in evaluations[0], evaluations
    assert "and 2 after training (the masked and the materialized model)" in evaluations[0]
    assert not any("update_interval is" in note for note in plan.notes)
    assert main(["--config", str(CONFIGS / "tiny/prune.yaml"), *tiny_overrides(tmp_path),
                 *overrides]) == 0
    assert line in " ".join(capsys.readouterr().out.split())
    one_shot = plan_config(CONFIGS / "tiny/prune.yaml",
                           [*tiny_overrides(tmp_path), *overrides, "pruning.method=importance"])
    assert not any(note.startswith("evaluation every") for note in one_shot.notes)  # no steps


@pytest.mark.parametrize("max_steps, words", [
    (4, ("dynamic_batch_loading.update_interval is 5 and the run has 4 steps: no domain-weight "
         "update ever happens")),
    (5, ("dynamic_batch_loading.update_interval is 5 and the run has 5 steps: the only "
         "domain-weight update comes after the last step")),
    (6, None),  # one update, after step 5: step 6 trains on the new weights
])
def test_the_plan_notes_an_update_interval_that_never_changes_the_training_mixture(
        tmp_path: Path, max_steps: int, words: str | None):
    plan = plan_config(CONFIGS / "tiny/continued_pretrain.yaml",
                       [*tiny_overrides(tmp_path), "dynamic_batch_loading.update_interval=5",
                        f"max_steps={max_steps}", f"save_every_n_steps={max_steps}"])
    notes = [note for note in plan.notes if "update_interval is" in note]
    if words is None:
        assert notes == []
    else:
        assert len(notes) == 1 and words in notes[0] and "dataset.weights" in notes[0]
    assert any(note.startswith("evaluation every 5 steps") for note in plan.notes)


@pytest.mark.parametrize("value", ["typo", "TensorWise", "true"])
def test_a_mistyped_float8_recipe_is_refused_on_a_machine_without_cuda(
        tmp_path: Path, capsys: pytest.CaptureFixture, value: str):
    """Without CUDA the plan sets a valid float8 name aside (the GPU is checked at run time),
    but a name no GPU could run is refused as the recipe refuses it."""
    overrides = [*tiny_overrides(tmp_path), f"torchao.float8={value}"]
    assert main(["--config", str(CONFIGS / "tiny/continued_pretrain.yaml"), *overrides]) == 2
    assert "`torchao.float8`" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the set-aside applies without CUDA")
def test_a_valid_float8_recipe_is_set_aside_without_cuda(tmp_path: Path):
    plan = plan_config(CONFIGS / "tiny/continued_pretrain.yaml",
                       [*tiny_overrides(tmp_path), "torchao.float8=rowwise"])
    assert plan.recipe == "continued_pretrain"


def test_an_int4_group_size_no_layer_fits_is_refused_as_the_run_refuses_it(tmp_path: Path):
    """The run checks the int4 group size against the exported model before training; the
    plan makes the same check on the meta model (for a prune, on the target's widths)."""
    int4 = ["torchao.quantized_export=int4_weight_only"]
    for config in ("tiny/continued_pretrain.yaml", "tiny/prune.yaml"):
        with pytest.raises(ConfigError) as err:
            plan_config(CONFIGS / config,
                        [*tiny_overrides(tmp_path), *int4, "torchao.group_size=256"])
        assert err.value.key == "torchao.group_size"
    plan = plan_config(CONFIGS / "tiny/continued_pretrain.yaml",
                       [*tiny_overrides(tmp_path), *int4, "torchao.group_size=32"])
    assert any("int4 group size" in item for item in plan.checked)


def test_a_fractional_eval_interval_is_named_not_the_update_interval(
        tmp_path: Path, capsys: pytest.CaptureFixture):
    """`eval_every_n_steps=2.0` next to an update interval it does not divide names itself."""
    overrides = [*tiny_overrides(tmp_path), "dynamic_batch_loading.update_interval=3",
                 "eval_every_n_steps=2.0"]
    assert main(["--config", str(CONFIGS / "tiny/continued_pretrain.yaml"), *overrides]) == 2
    assert "`eval_every_n_steps`" in capsys.readouterr().err


def test_rope_table_bytes_equal_the_modules_own_buffers():
    """Qwen2's RoPE module caches [S, 2 x dim] (cos and sin of both halves), twice what the
    Llama modules cache; it was counted at the Llama size."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
    from torchtune.modules import RotaryPositionalEmbeddings

    from acadlm_plugins.planning.memory import rope_table_bytes

    for rope in (RotaryPositionalEmbeddings(dim=32, max_seq_len=512),
                 Qwen2RotaryPositionalEmbeddings(dim=32, max_seq_len=512),
                 Llama3ScaledRoPE(dim=32, max_seq_len=512)):
        if not getattr(rope, "is_cache_built", True):
            rope.rope_init()
        actual = sum(b.numel() * b.element_size() for b in rope.buffers())
        assert rope_table_bytes(torch.nn.ModuleList([rope])) == actual, type(rope).__name__


def test_one_process_mixed_precision_plans_what_autocast_keeps(tmp_path: Path):
    """One process computes `mixed_precision: true` under autocast (fp32 residual stream, three
    more bf16 copies of each layer's norm output, bf16 weight copies kept for the backward);
    FSDP2 casts the gathered weights and keeps none of it. The plan adds autocast's bytes for
    one process only (tests/test_plan_activation_memory.py measures them)."""
    config = CONFIGS / "tiny/continued_pretrain.yaml"
    base = [*tiny_overrides(tmp_path), "dtype=bf16", "enable_activation_checkpointing=False"]
    for world_size in (1, 2):
        plain = plan_config(config, base, world_size=world_size)
        mixed = plan_config(config, [*base, "mixed_precision=true"], world_size=world_size)
        extra = mixed.memory.activations_full - plain.memory.activations_full
        if world_size == 2:
            assert extra == 0
            continue
        a = plain.source.architecture
        tokens = 4 * 64  # batch_size x dataset.max_seq_len
        weights = a.embed_dim * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads) + (
            3 * a.embed_dim * a.intermediate_dim)
        assert extra == 2 * (a.num_layers * (tokens * 3 * a.embed_dim + weights)
                             + a.vocab_size * a.embed_dim)


def test_a_one_process_mixed_precision_rater_has_no_vocabulary_weight_copy(tmp_path: Path):
    """The rater reads scalar heads off the final hidden states: under one-process autocast
    the plan adds the layers' copies, not the V x h output projection's a decoder has."""
    name = "sheared_llama/qurater_1.3b.yaml"
    overrides = PAPER_CONFIGS[name][0](tmp_path)
    plain = plan_config(CONFIGS / name, [*overrides, "mixed_precision=false"], world_size=1)
    mixed = plan_config(CONFIGS / name, [*overrides, "mixed_precision=true"], world_size=1)
    a = plain.source.architecture
    tokens = 2 * 16 * 513  # two texts a pair x batch_size x (max_tokens + BOS)
    weights = a.embed_dim * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads) + (
        3 * a.embed_dim * a.intermediate_dim)
    extra = mixed.memory.activations_full - plain.memory.activations_full
    assert extra == 2 * a.num_layers * (tokens * 3 * a.embed_dim + weights)


def test_our_recipes_refuse_a_model_that_returns_hidden_states(tmp_path: Path):
    """`model.project_in_loss` is for torchtune's stock recipes; ours compute their losses from
    the logits, so the plan (and the recipe, through the same check) refuses it by name."""
    name = "llama3/prolong_64k_stage1.yaml"
    with pytest.raises(ConfigError) as refused:
        plan_config(CONFIGS / name, [*PAPER_CONFIGS[name][0](tmp_path),
                                     "model.project_in_loss=True"])
    assert refused.value.key == "model.project_in_loss"
    assert "long_context.chunked_loss_tokens" in refused.value.fix
