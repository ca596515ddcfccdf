"""Knowledge distillation: the chunked KL against the formula, and the plugin in the continued
pre-training and prune recipes on the 2-layer, 64-dim model (teacher: the tiny source)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import REPO_ROOT, tiny_run_args, write_tiny_checkpoint

from acadlm_plugins import hookimpl
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.smollm2 import tiny_llama
from acadlm_plugins.training.checkpointing import latest_checkpoint
from acadlm_plugins.training.chunked_loss import shifted_targets
from acadlm_plugins.training.distillation_loss import (
    forward_kl_chunked,
    forward_kl_reference,
    output_projection_weight,
    teacher_final_hidden,
)

CONTINUED = "acadlm_plugins.continued_pretrain_recipe"
PRUNE = "acadlm_plugins.prune_recipe"
PRUNE_CONFIG = REPO_ROOT / "configs" / "tiny" / "prune.yaml"


@pytest.fixture(autouse=True)
def quiet_isolated_runs(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")


# ------------------------------------------------------------------------------ the loss


def test_kd_loss_equals_a_hand_computation_with_temperature_and_ignored_labels():
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, -2.0, 0.0],
                             [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 4.0],
                             [2.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, -100, 2]])  # position t predicts label t + 1
    temperature = 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(z / temperature) for z in row]
        return [e / sum(exps) for e in exps]

    expected = 0.0
    for position in (0, 2):  # labels[1] and labels[3] are the counted targets
        p_t = softmax(teacher[0, position].tolist())
        p_s = softmax(student[0, position].tolist())
        expected += temperature ** 2 * sum(t * math.log(t / s) for t, s in zip(p_t, p_s))

    kl_sum, count = forward_kl_chunked(student, teacher, shifted_targets(labels),
                                       temperature=temperature, vocab_chunk_size=2)
    assert int(count) == 2
    assert float(kl_sum) == pytest.approx(expected, rel=1e-5)
    per_position = forward_kl_reference(student, teacher, temperature)
    assert float(per_position[0, 0] + per_position[0, 2]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 7, 16, 50, 64])
@pytest.mark.parametrize("projected", [False, True], ids=["teacher_logits", "teacher_hidden"])
def test_chunked_kl_and_its_gradient_equal_the_reference(temperature, chunk, projected):
    generator = torch.Generator().manual_seed(0)
    vocab, dim = 50, 8  # 7 and 16 do not divide 50
    student = torch.randn(2, 6, vocab, generator=generator).mul(3).requires_grad_()
    hidden = torch.randn(2, 6, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator)
    teacher_logits = hidden @ weight.T
    targets = torch.randint(0, vocab, (2, 6), generator=generator)
    targets[0, 2] = targets[1, 0] = targets[1, 5] = -100

    want = forward_kl_reference(student, teacher_logits, temperature)[targets != -100].sum()
    (want_grad,) = torch.autograd.grad(want, student)
    got, count = forward_kl_chunked(
        student, hidden if projected else teacher_logits, targets,
        teacher_weight=weight if projected else None, temperature=temperature,
        vocab_chunk_size=chunk)
    (got_grad,) = torch.autograd.grad(got, student)
    assert int(count) == 9
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_between_a_model_and_its_copy_and_hidden_times_weight_are_its_logits():
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 24))
    targets = torch.randint(0, 512, (2, 24))
    for tied in (True, False):
        student = tiny_llama(tie_word_embeddings=tied).eval()
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            logits = student(tokens)
            hidden = teacher_final_hidden(teacher, tokens)
            weight = output_projection_weight(teacher)
            assert weight is (teacher.tok_embeddings.weight if tied else teacher.output.weight)
            torch.testing.assert_close(hidden @ weight.T, logits, rtol=1e-5, atol=1e-5)
            assert "unembed" not in vars(teacher)  # the swap is undone: logits come back again
            assert teacher(tokens).shape == (2, 24, 512)
        for chunk in (100, 512):
            kl_sum, count = forward_kl_chunked(logits, hidden, targets, teacher_weight=weight,
                                               vocab_chunk_size=chunk)
            assert int(count) == 48 and float(kl_sum.detach()) / 48 < 1e-6


# ------------------------------------------------------------------------------ config


def distillation_args(teacher_dir: Path, *extra: str) -> list[str]:
    """Command-line overrides that add a `distillation:` block with the tiny model as teacher."""
    teacher = "distillation.teacher"
    return [f"{teacher}.model._component_=acadlm_plugins.models.smollm2.tiny_llama",
            f"{teacher}.model.vocab_size=512",
            f"{teacher}.checkpointer._component_=torchtune.training.FullModelHFCheckpointer",
            f"{teacher}.checkpointer.checkpoint_dir={teacher_dir}",
            f"{teacher}.checkpointer.checkpoint_files=[model.safetensors]",
            f"{teacher}.checkpointer.model_type=LLAMA3_2", "distillation.kd_ratio=0.5", *extra]


def distill_run_args(root: Path, *extra: str) -> list[str]:
    args = tiny_run_args(root)  # writes root/tiny_model, the student's source and the teacher
    return [*args, *distillation_args(root / "tiny_model"), *extra]


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """``key``'s value at every step the run's DiskLogger wrote it."""
    values = {}
    for path in (run_dir / "logs").glob("*.txt"):
        for line in path.read_text().splitlines():
            step, _, fields = line.partition(" | ")
            for item in fields.split():
                name, _, value = item.partition(":")
                if name == key:
                    values[int(step.split()[1])] = float(value)
    return values


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next((latest_checkpoint(run_dir) / "model").glob("*.safetensors")))


@pytest.mark.parametrize("override, key", [
    ("distillation.kd_ratio=1.5", "distillation.kd_ratio"),
    ("distillation.temperature=0", "distillation.temperature"),
    ("distillation.temperature=inf", "distillation.temperature"),  # a NaN loss at step 0
    ("distillation.kd_ratio=true", "distillation.kd_ratio"),  # not read as 1.0
    ("distillation.vocab_chunk_size=true", "distillation.vocab_chunk_size"),
    ("distillation.vocab_chunk_size=0", "distillation.vocab_chunk_size"),
    ("distillation.teacher_path=x", "distillation.teacher_path"),
    ("distillation.teacher.tokenizer=x", "distillation.teacher.tokenizer"),
    ("distillation.teacher.model._component_=no.such.builder", "distillation.teacher.model._component_"),
])
def test_bad_configs_name_the_key_before_training(tmp_path, monkeypatch, override, key):
    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distill_run_args(tmp_path, override))
    assert err.value.key == key
    assert "Fix:" in str(err.value)
    assert not latest_checkpoint(tmp_path / "run")


def test_a_block_without_teacher_names_the_teacher(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="`distillation.teacher`: is missing") as err:
        run_recipe_main(monkeypatch, CONTINUED, tiny_run_args(tmp_path, "distillation.kd_ratio=0.5"))
    assert err.value.key == "distillation.teacher"


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other_vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
                     ).save_pretrained(other)
    args = [*distill_run_args(tmp_path), f"distillation.teacher.checkpointer.checkpoint_dir={other}",
            "distillation.teacher.model.vocab_size=256", "distillation.teacher.model.num_layers=1"]
    with pytest.raises(ConfigError, match="vocabulary of 256 words, the student 512") as err, \
            torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, args)
    assert err.value.key == "distillation.teacher.model"


@pytest.mark.parametrize("recipe", ["long_context", "rater", "annotate"])
def test_recipes_that_do_not_hand_over_logits_refuse_distillation(recipe):
    from acadlm_plugins.plugin_manager import build_plugin_manager

    pm = build_plugin_manager(load_entry_points=False)
    cfg = OmegaConf.create({"distillation": {"teacher": {"model": {"_component_": "x"},
                                                         "checkpointer": {"_component_": "y"}}}})
    with pytest.raises(ConfigError, match="does not hand the student's logits") as err:
        pm.hook.acadlm_configure(cfg=cfg, recipe=recipe)
    assert err.value.key == "distillation"
    pm = build_plugin_manager(load_entry_points=False)  # a null block is no distillation at all
    pm.hook.acadlm_configure(cfg=OmegaConf.create({"distillation": None}), recipe=recipe)
    plugin = pm.get_plugin("acadlm_plugins.plugins.distillation:DistillationPlugin")
    assert not plugin.enabled


# ------------------------------------------------------------------------------ recipes


class _Interrupt:
    """Simulates a kill right after step 5 (the last checkpoint is step 3's)."""

    @hookimpl
    def acadlm_after_optimizer_step(self, step, metrics):
        if step == 5:
            raise KeyboardInterrupt


def test_distilled_run_logs_the_kl_and_resumes_exactly(tmp_path, monkeypatch):
    import sys

    straight = distill_run_args(tmp_path / "a")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, straight)
    run_a = tmp_path / "a" / "run"
    kl = logged(run_a, "distillation/kl")
    assert sorted(kl) == [1, 2, 3, 4, 5, 6]
    assert kl[1] < 1e-6  # the student starts as the teacher's copy
    assert kl[6] > 1e-4  # and moves away from it on the LM half of the loss
    assert sorted(logged(run_a, "loss/distillation")) == [1, 2, 3, 4, 5, 6]

    module = type(sys)("_acadlm_distillation_interrupt")
    module.Interrupt = _Interrupt
    monkeypatch.setitem(sys.modules, module.__name__, module)
    broken = distill_run_args(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt), torch_threads():
        run_recipe_main(monkeypatch, CONTINUED,
                        [*broken, "plugins=[_acadlm_distillation_interrupt:Interrupt]"])
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_000003"
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, broken)
    a, b = final_weights(run_a), final_weights(tmp_path / "b" / "run")
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step_000006"
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=1e-6, msg=name)
    assert logged(tmp_path / "b" / "run", "distillation/kl")[6] == pytest.approx(kl[6], rel=1e-5)

    other = write_tiny_checkpoint(tmp_path / "other_teacher", seed=1)
    with pytest.raises(ConfigError, match="differs from the teacher of the checkpoint") as err, \
            torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, [
            *broken, "max_steps=9", f"distillation.teacher.checkpointer.checkpoint_dir={other}"])
    assert err.value.key == "distillation.teacher"


def test_kd_ratio_zero_trains_exactly_as_without_distillation(tmp_path, monkeypatch):
    plain = tiny_run_args(tmp_path / "plain", "max_steps=3")
    zero = distill_run_args(tmp_path / "zero", "max_steps=3", "distillation.kd_ratio=0")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, plain)
        run_recipe_main(monkeypatch, CONTINUED, zero)
    a, b = final_weights(tmp_path / "plain" / "run"), final_weights(tmp_path / "zero" / "run")
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(b[name], value), name
    assert logged(tmp_path / "zero" / "run", "distillation/kl")[3] > 0


def test_pruning_with_distillation_from_the_source(tmp_path, monkeypatch):
    args = [a for a in distill_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    args[1] = str(PRUNE_CONFIG)
    with torch_threads():
        out = run_recipe_main(monkeypatch, PRUNE, [*args, "max_steps=6", "save_every_n_steps=6"])
    kl = logged(out, "distillation/kl")
    assert sorted(kl) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in kl.values())
    assert kl[6] > 1e-5  # the masks make the student differ from its unpruned source
    assert sorted(logged(out, "loss/lagrangian")) == [1, 2, 3, 4, 5, 6]
    assert (out / "pruned_model" / "config.json").is_file()


def test_one_shot_pruning_checks_the_block_but_never_loads_the_teacher(tmp_path, monkeypatch):
    """`pruning.method: importance` trains nothing: the pipeline hands its one-shot arm the
    distilled prune config, and loading the teacher there (the source again) only doubled the
    weights in memory. The block is still checked, and the plan counts no teacher."""
    import json

    from acadlm_plugins.planning import plan_config
    from acadlm_plugins.plugins import distillation

    args = [a for a in distill_run_args(tmp_path) if not a.startswith("validation_dataset.")]
    args[1] = str(PRUNE_CONFIG)
    overrides = [*args[2:], "max_steps=6"]
    learned = plan_config(PRUNE_CONFIG, overrides)
    one_shot = plan_config(PRUNE_CONFIG, [*overrides, "pruning.method=importance"])
    assert learned.teacher is not None and learned.memory.teacher_weights > 0
    assert one_shot.teacher is None and one_shot.memory.teacher_weights == 0

    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, PRUNE, [*args, "pruning.method=importance",
                                             "distillation.kd_ratio=1.5"])
    assert err.value.key == "distillation.kd_ratio"

    def refuse(*_args, **_kwargs):
        raise AssertionError("a one-shot prune run loaded its distillation teacher")

    monkeypatch.setattr(distillation, "load_teacher", refuse)
    with torch_threads():
        out = run_recipe_main(monkeypatch, PRUNE, [*args, "pruning.method=importance"])
    summary = json.loads((out / "pruning_summary.json").read_text())
    assert summary["method"] == "importance" and "distillation" not in summary
    assert (out / "pruned_model" / "config.json").is_file()


@pytest.mark.distributed
def test_two_ranks_distil_as_one_process_with_the_same_global_batch(tmp_path):
    """Teacher and student both sharded with FSDP2 (gloo, CPU): the output projection is
    gathered for the chunked KL, and the weights match one process with the same batches."""
    from tiny_setup import TINY_LR, assert_adam_runs_agree, run_tune_subprocess

    runs = {}
    for nproc, batch_size in ((2, 2), (1, 4)):
        out = tmp_path / f"ranks{nproc}"
        args = [*distill_run_args(tmp_path), f"output_dir={out}", f"batch_size={batch_size}",
                "max_steps=3", "save_every_n_steps=3", "distillation.vocab_chunk_size=200"]
        run_tune_subprocess("acadlm_plugins/continued_pretrain_recipe", args, cwd=tmp_path,
                            log_file=tmp_path / f"ranks{nproc}.log", nproc=nproc, timeout=180)
        runs[nproc] = out
    for key in ("distillation/kl", "loss/distillation", "loss"):  # loss/...: over all ranks
        one_process = logged(runs[1], key)
        assert sorted(one_process) == [1, 2, 3], key
        for step, value in one_process.items():
            assert logged(runs[2], key)[step] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert_adam_runs_agree(final_weights(runs[2]), final_weights(runs[1]), lr=TINY_LR, steps=3)



def test_a_teacher_built_otherwise_than_its_checkpoint_is_refused(tmp_path, monkeypatch):
    """A Llama-3.2-style teacher (llama3 RoPE scaling) built with the tiny Llama builder would
    load its weights and teach another model: refused, naming the teacher's model key."""
    from family_checkpoints import write_family

    scaled = write_family("llama3.2", tmp_path / "scaled_teacher", vocab_size=512,
                          num_hidden_layers=2)
    args = [*distill_run_args(tmp_path),
            f"distillation.teacher.checkpointer.checkpoint_dir={scaled}"]
    with pytest.raises(ConfigError, match="llama3 scaling") as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, args)
    assert err.value.key == "distillation.teacher.model"
    assert not latest_checkpoint(tmp_path / "run")


# ------------------------------------------------------------------ gradient accumulation


class _MicroBatchProbe:
    """Records every micro-batch the recipe trains on (a copy, before the forward)."""

    batches: ClassVar[list[dict[str, torch.Tensor]]] = []

    @hookimpl
    def acadlm_batch_ready(self, batch, step):
        _MicroBatchProbe.batches.append(
            {"step": step, **{k: v.detach().clone() for k, v in batch.items()}})


def _probe_args(monkeypatch) -> str:
    import sys

    module = type(sys)("_acadlm_distillation_probe")
    module.Probe = _MicroBatchProbe
    monkeypatch.setitem(sys.modules, module.__name__, module)
    _MicroBatchProbe.batches = []
    return "plugins=[_acadlm_distillation_probe:Probe]"


def _counted(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("optimizer, packing", [
    # AdamW, as the audit ran it: micro-batches of 62 and 63 tokens; Adam turns any gradient,
    # however small, into a full-size step, so only an exactly cancelled LM gradient passes
    (["optimizer.weight_decay=0"], "split"),
    # plain SGD with micro-batches of very unequal size (63 and 35, 1 and 63 tokens)
    (["optimizer._component_=torch.optim.SGD", "optimizer.lr=0.1"], "whole"),
], ids=["adamw", "sgd_unequal"])
def test_kd_ratio_one_with_gradient_accumulation_leaves_the_teachers_copy_unchanged(
        tmp_path, monkeypatch, optimizer, packing):
    """kd_ratio 1 is the KD loss alone: a student that is its teacher's copy has nothing to
    learn, however unequal the token counts of the step's micro-batches are."""
    args = distill_run_args(tmp_path, "distillation.kd_ratio=1", *optimizer,
                            "gradient_accumulation_steps=2", "batch_size=1", "max_steps=4",
                            "save_every_n_steps=4", "dynamic_batch_loading.enabled=false",
                            f"dataset.packing={packing}", _probe_args(monkeypatch))
    with torch_threads():
        out = run_recipe_main(monkeypatch, CONTINUED, args)
    counts = [_counted(b) for b in _MicroBatchProbe.batches]
    assert len(counts) == 8 and any(a != b for a, b in zip(counts[::2], counts[1::2])), counts
    from safetensors.torch import load_file

    source = load_file(tmp_path / "tiny_model" / "model.safetensors")
    trained = final_weights(out)
    for name, value in source.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-9, msg=name)
    assert max(logged(out, "distillation/kl").values()) < 1e-6


def test_distillation_loss_is_the_token_weighted_mix_over_the_whole_step(tmp_path, monkeypatch):
    """One step of two micro-batches with unequal token counts, another model as teacher: the
    loss the recipe trains (logged LM loss + the plugin's term) is (1 - r) LM + r KL, both
    summed over every counted token of the step and divided by their number."""
    import torch.nn.functional as F
    from torchtune import training

    teacher_dir = write_tiny_checkpoint(tmp_path / "teacher", seed=1)
    ratio, temperature = 0.3, 2.0
    args = distill_run_args(tmp_path, f"distillation.kd_ratio={ratio}",
                            f"distillation.temperature={temperature}",
                            f"distillation.teacher.checkpointer.checkpoint_dir={teacher_dir}",
                            "gradient_accumulation_steps=2", "batch_size=1", "max_steps=1",
                            "dynamic_batch_loading.enabled=false", "dataset.packing=whole",
                            _probe_args(monkeypatch))
    with torch_threads():
        out = run_recipe_main(monkeypatch, CONTINUED, args)
    batches = _MicroBatchProbe.batches
    assert len(batches) == 2 and abs(_counted(batches[0]) - _counted(batches[1])) > 10

    def load(model_dir: Path) -> torch.nn.Module:
        model = tiny_llama(vocab_size=512)
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2", output_dir=str(tmp_path / "scratch"))
        model.load_state_dict(checkpointer.load_checkpoint()["model"], strict=False)
        return model.eval()

    student, teacher = load(tmp_path / "tiny_model"), load(teacher_dir)
    lm_sum = kl_sum = tokens = 0.0
    with torch.no_grad():
        for batch in batches:
            kwargs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos")}
            s_logits = student(batch["tokens"], **kwargs)[:, :-1].double()
            t_logits = teacher(batch["tokens"], **kwargs)[:, :-1].double()
            targets = batch["labels"][:, 1:]
            counted = targets != -100
            lm_sum += float(F.cross_entropy(s_logits[counted], targets[counted], reduction="sum"))
            p_t = F.softmax(t_logits[counted] / temperature, dim=-1)
            log_p_s = F.log_softmax(s_logits[counted] / temperature, dim=-1)
            kl_sum += float(temperature ** 2 * (p_t * (p_t.log() - log_p_s)).sum())
            tokens += int(counted.sum())
    lm, kl = lm_sum / tokens, kl_sum / tokens
    assert logged(out, "loss")[1] == pytest.approx(lm, rel=1e-5)
    assert logged(out, "distillation/kl")[1] == pytest.approx(kl, rel=1e-4)
    trained = logged(out, "loss")[1] + logged(out, "loss/distillation")[1]
    assert trained == pytest.approx((1 - ratio) * lm + ratio * kl, rel=1e-5)


# ------------------------------------------------------------------ teacher checks, resume mode


def _write_llama(folder: Path, **config: int) -> Path:
    """A 2-layer, 64-dim Llama like the tiny model, with ``config`` changed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 16, "max_position_embeddings": 512, "rope_theta": 10_000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True, **config}
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["checkpoint_vocab_600", "builder_embed_dim_32"])
def test_a_teacher_checkpoint_of_another_size_names_the_teacher_keys(tmp_path, monkeypatch, case):
    """The student's shape check, run on the teacher: no torch size-mismatch RuntimeError."""
    if case == "checkpoint_vocab_600":
        teacher = _write_llama(tmp_path / "vocab_600", vocab_size=600)
        override = f"distillation.teacher.checkpointer.checkpoint_dir={teacher}"
        shapes = "`tok_embeddings.weight` is [600, 64] in the checkpoint, [512, 64] in the model"
    else:
        override = "distillation.teacher.model.embed_dim=32"
        shapes = "`tok_embeddings.weight` is [512, 64] in the checkpoint, [512, 32] in the model"
    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distill_run_args(tmp_path, override))
    assert err.value.key == "distillation.teacher.model"
    message = str(err.value)
    assert shapes in message
    assert "`distillation.teacher.checkpointer.checkpoint_dir`" in message
    assert "`distillation.teacher.model._component_`" in message
    assert not latest_checkpoint(tmp_path / "run")


def test_an_unknown_teacher_key_names_the_teacher_block_not_a_recipe(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as err:
        run_recipe_main(monkeypatch, CONTINUED,
                        distill_run_args(tmp_path, "distillation.teacher.checkpointr.x=1"))
    assert err.value.key == "distillation.teacher.checkpointr"
    assert "recipe" not in str(err.value)
    assert "is not a key of `distillation.teacher`" in str(err.value)
    assert "did you mean `distillation.teacher.checkpointer`?" in str(err.value)


def test_a_missing_teacher_folder_names_the_folder_not_a_file_in_it(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distill_run_args(
            tmp_path, f"distillation.teacher.checkpointer.checkpoint_dir={missing}"))
    assert err.value.key == "distillation.teacher.checkpointer.checkpoint_dir"
    assert f"{missing} is not a folder" in str(err.value)
    assert "config.json" not in str(err.value)


def test_a_missing_teacher_weight_file_is_named_in_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distill_run_args(
            tmp_path, "distillation.teacher.checkpointer.checkpoint_files=[nope.safetensors]"))
    assert err.value.key == "distillation.teacher.checkpointer.checkpoint_files"
    assert "nope.safetensors" in str(err.value) and "model.safetensors" in str(err.value)
    assert ".." not in str(err.value)


class _FailingCheckpointer:
    """A checkpointer whose load fails with a message that ends in a period, as torchtune's do."""

    def __init__(self, checkpoint_dir: str, output_dir: str) -> None:
        self.checkpoint_dir = checkpoint_dir

    def load_checkpoint(self) -> dict:
        raise ValueError(f"No file with name: x found in {self.checkpoint_dir}.")


def test_a_teacher_that_fails_to_load_is_reported_without_a_double_period(tmp_path, monkeypatch):
    import sys

    from acadlm_plugins.plugins.distillation import load_teacher

    module = type(sys)("_acadlm_failing_checkpointer")
    module.Checkpointer = _FailingCheckpointer
    monkeypatch.setitem(sys.modules, module.__name__, module)
    teacher_cfg = OmegaConf.create({
        "model": {"_component_": "acadlm_plugins.models.smollm2.tiny_llama"},
        "checkpointer": {"_component_": "_acadlm_failing_checkpointer.Checkpointer",
                         "checkpoint_dir": str(tmp_path)}})
    with pytest.raises(ConfigError) as err:
        load_teacher(teacher_cfg, dtype=torch.float32, device=torch.device("cpu"),
                     output_dir=tmp_path)
    assert err.value.key == "distillation.teacher.checkpointer"
    assert f"found in {tmp_path}. Fix:" in str(err.value)


def test_resuming_with_the_distillation_block_removed_or_added_is_refused(tmp_path, monkeypatch):
    """A resumed run distils exactly when the run it resumes did; with the same block it
    resumes as before."""
    first = ["max_steps=2", "save_every_n_steps=2"]
    distilled = distill_run_args(tmp_path / "kd", *first)
    plain = tiny_run_args(tmp_path / "plain", *first)
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distilled)
        run_recipe_main(monkeypatch, CONTINUED, plain)

    without_block = [a for a in distilled if not a.startswith("distillation.")]
    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, [*without_block, "max_steps=4"])
    assert err.value.key == "distillation"
    assert "trained with distillation" in str(err.value)
    assert "restore the `distillation:` block" in str(err.value)
    assert "new `output_dir`" in str(err.value)

    with pytest.raises(ConfigError) as err, torch_threads():
        run_recipe_main(monkeypatch, CONTINUED,
                        [*plain, *distillation_args(tmp_path / "plain" / "tiny_model"),
                         "max_steps=4"])
    assert err.value.key == "distillation"
    assert "trained without distillation" in str(err.value)
    assert "new `output_dir`" in str(err.value)
    for run in ("kd", "plain"):
        assert latest_checkpoint(tmp_path / run / "run").name == "step_000002"

    with torch_threads():  # the block as it was: resumes
        run_recipe_main(monkeypatch, CONTINUED, [*distilled, "max_steps=4"])
    assert latest_checkpoint(tmp_path / "kd" / "run").name == "step_000004"
    assert sorted(logged(tmp_path / "kd" / "run", "distillation/kl")) == [1, 2, 3, 4]


@pytest.mark.parametrize("override, key, was, now", [
    ("distillation.kd_ratio=0.0", "distillation.kd_ratio", "0.5", "0.0"),  # the LM loss alone
    ("distillation.temperature=2.0", "distillation.temperature", "1.0", "2.0"),
])
def test_resuming_with_another_loss_setting_is_refused(tmp_path, monkeypatch, override, key,
                                                       was, now):
    """Another `kd_ratio` or `temperature` would switch the loss mid-run, and the summary would
    report the new value for the whole run: refused mid-run and for a finished run alike. The
    same settings (and another `vocab_chunk_size`, which does not change the loss) resume."""
    distilled = distill_run_args(tmp_path, "max_steps=2", "save_every_n_steps=2")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distilled)
    run_dir = tmp_path / "run"
    for max_steps in ("max_steps=4", "max_steps=2"):  # mid-run, and the finished run rerun
        with pytest.raises(ConfigError) as err, torch_threads():
            run_recipe_main(monkeypatch, CONTINUED, [*distilled, override, max_steps])
        assert err.value.key == key
        message = str(err.value)
        assert f"differs from the checkpoint being resumed (in {run_dir}): was {was}, is {now}" \
            in message
        assert f"restore `{key}: {was}`" in message and "new `output_dir`" in message
        assert latest_checkpoint(run_dir).name == "step_000002"
    summary = (run_dir / "summary.json").read_text()
    assert '"kd_ratio": 0.5' in summary and '"temperature": 1.0' in summary

    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED,
                        [*distilled, "max_steps=4", "distillation.vocab_chunk_size=100"])
    assert latest_checkpoint(run_dir).name == "step_000004"


def test_a_checkpoint_without_recorded_loss_settings_resumes_with_a_warning(
        tmp_path, monkeypatch, caplog):
    """A checkpoint written before `kd_ratio` and `temperature` were recorded (only the teacher's
    fingerprint in its distillation state) still resumes; one warning says they went unchecked."""
    from acadlm_plugins.training.checkpointing import RECIPE_STATE_FILENAME

    distilled = distill_run_args(tmp_path, "max_steps=2", "save_every_n_steps=2")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, distilled)
    state_file = latest_checkpoint(tmp_path / "run") / RECIPE_STATE_FILENAME
    state = torch.load(state_file, weights_only=False)
    saved = state["plugins"]["distillation"]
    recorded = (saved.get("kd_ratio"), saved.get("temperature"))
    state["plugins"]["distillation"] = {"teacher": saved["teacher"]}  # the old format
    torch.save(state, state_file)

    caplog.set_level("WARNING", logger="acadlm_plugins.plugins.distillation")
    with torch_threads():
        run_recipe_main(monkeypatch, CONTINUED, [*distilled, "max_steps=4"])
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    warnings = [r.getMessage() for r in caplog.records if "could not be checked" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "`distillation.kd_ratio` and `distillation.temperature`" in warnings[0]
    assert "kd_ratio 0.5, temperature 1.0" in warnings[0]
    assert recorded == (0.5, 1.0)  # what a checkpoint of this version records


def test_a_word_the_teacher_rules_out_adds_nothing_to_the_kl():
    """Teacher logit -inf (a masked word): p_t = 0 there and its KL term is 0, not NaN
    (0 * (-inf - log p_s)); the code guards it with torch.where, no test reaches the guard."""
    from acadlm_plugins.training.distillation_loss import forward_kl_chunked

    student = torch.tensor([[[0.0, 1.0, 2.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 1.0, -math.inf]]])
    targets = torch.tensor([[1]])
    kl, _count = forward_kl_chunked(student, teacher, targets, vocab_chunk_size=2)
    p_t = torch.softmax(torch.tensor([0.0, 1.0]), -1)
    log_p_s = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)[:2]
    want = float((p_t * (p_t.log() - log_p_s)).sum())
    assert math.isfinite(float(kl)) and abs(float(kl) - want) < 1e-5
    kl.backward()
    assert torch.isfinite(student.grad).all()
