"""recipes/prolong/pipeline.py end to end on the tiny model: evaluation, two long-context stages
(the second from the first's export and optimizer state), stock-recipe SFT, evaluation again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_checkpoints import write_family, write_family_tokenizer
from omegaconf import OmegaConf
from recipe_runs import load_script, run_until_first_stage
from test_long_context_recipe import write_long_documents
from tiny_setup import REPO_ROOT, write_tiny_corpus, write_tiny_model_dir

PIPELINE = REPO_ROOT / "recipes" / "prolong" / "pipeline.py"
TINY = REPO_ROOT / "configs" / "tiny"
SMOLLM2 = REPO_ROOT / "configs" / "smollm2"
HAYSTACK = " ".join(f"The {w} sat by the river and watched the boats go by." for w in
                    ("heron", "fisher", "child", "miller", "poet", "sailor") * 40)


def pipeline_args(tmp_path: Path, *, stage1_steps: int = 2, skip_eval: bool = False
                  ) -> list[str]:
    """The pipeline on the tiny model, its data written under ``tmp_path`` (once)."""
    model = tmp_path / "model"
    if not model.is_dir():
        write_tiny_model_dir(model)
        write_tiny_corpus(tmp_path / "corpus")
        write_long_documents(tmp_path / "long" / "docs.jsonl")
        (tmp_path / "hay.txt").write_text(HAYSTACK)
    corpus, long_docs = tmp_path / "corpus", tmp_path / "long" / "docs.jsonl"
    stage = [f"dataset.sources.long.data_files={long_docs}",
             f"dataset.sources.short.data_files={corpus / 'prose' / 'train.jsonl'}",
             f"validation_dataset.data_dir={corpus}", "validation.max_packs_per_domain=1",
             "keep_last_n_checkpoints=1"]  # as the SmolLM2 stage configs: older steps deleted
    return [
        "--output-dir", str(tmp_path / "out"), "--base-model", str(model),
        "--stage1-config", str(TINY / "long_context.yaml"),
        "--stage2-config", str(TINY / "long_context.yaml"),
        "--sft-config", str(TINY / "sft.yaml"),
        "--stage1-steps", str(stage1_steps), "--stage2-steps", "1", "--sft-steps", "2",
        "--eval-tasks", "acadlm_niah_single_1", "--eval-lengths", "384,512",
        "--eval-samples", "1",
        "--set", "eval:model.args.batch_size=1",
        "--set", f"eval:task_metadata={{haystack_path: {tmp_path / 'hay.txt'}}}",
        *[f"--set=stage1:{o}" for o in stage], *[f"--set=stage2:{o}" for o in stage],
        "--set", "stage2:long_context.max_seq_len=256",
        "--set", "stage2:long_context.rope_base=160000.0",
        "--set", "stage2:long_context.trained_length=null",
        *(["--skip-eval"] if skip_eval else []),
    ]


def run_pipeline(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1",
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.run([sys.executable, str(PIPELINE), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_pipeline_runs_every_stage_and_reports_scores_before_and_after(tmp_path) -> None:
    """A full run; a rerun from another base model stops before stage 1, naming the stage-1
    and stage-2 folders. A rerun with one more stage-1 step (--skip-eval): stage 1 resumes and
    its new export replaces the one stage 2 was trained from, so the pipeline stops before
    stage 2 naming the folder to delete (it used to fail inside stage 2, asking to restore a
    deleted model path); once deleted, the rerun retrains stage 2 and SFT from the new export
    and reports no scores, as eval_before/ and eval_after/ are the first run's."""
    done = run_pipeline(tmp_path, pipeline_args(tmp_path))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    out = tmp_path / "out"
    report = json.loads((out / "pipeline_summary.json").read_text())
    first, second = report["stages"]["stage1"], report["stages"]["stage2"]
    assert first["stage"]["rope_base"] == 40000.0 and first["steps"] == 2
    assert second["stage"]["source_rope_base"] == 40000.0  # read from stage 1's export
    assert second["stage"]["rope_base"] == 160000.0 and second["stage"]["max_seq_len"] == 256
    assert second["stage"]["previous_stage"].endswith("stage1")
    assert 0.9 < first["packing"]["efficiency"] <= 1.0
    for when in ("scores_before", "scores_after"):
        assert set(report[when]["acadlm_niah_single_1"]) == {"384", "512"}
    sft_config = json.loads((out / "sft" / "epoch_0" / "config.json").read_text())
    assert sft_config["rope_theta"] == 160000.0  # SFT kept stage 2's RoPE base
    assert "ProLong pipeline summary" in done.stdout and "before -> after" in done.stdout

    # what the SFT check reads: the starting model torchtune saved with the SFT run's config
    assert load_pipeline().recorded_sft_source(out / "sft") == (
        out / "sft" / "torchtune_config.yaml", str(out / "stage2" / "step_000001" / "model"))

    # another base model: stopped before stage 1 trains, stage 2's folder named as well
    other = shutil.copytree(tmp_path / "model", tmp_path / "other_model")
    args = pipeline_args(tmp_path, skip_eval=True)
    args[args.index("--base-model") + 1] = str(other)
    refused = run_pipeline(tmp_path, args)
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert (f"stage stage1: {out / 'stage1'} holds a checkpoint (step_000002) trained from "
            f"{tmp_path / 'model'}, but this run starts stage1 from {other}") in message, message
    assert (f"delete the folders {out / 'stage1'} and {out / 'stage2'} and rerun ("
            f"{out / 'stage2'}: later stages") in message
    assert "$ " not in refused.stdout  # no stage ran

    rerun = pipeline_args(tmp_path, stage1_steps=3, skip_eval=True)
    refused = run_pipeline(tmp_path, rerun)
    assert refused.returncode != 0
    assert not (out / "stage1" / "step_000002").exists()  # stage 1 went on to step 3
    message = " ".join(refused.stderr.split())
    assert (f"stage stage2: {out / 'stage2'} holds a checkpoint (step_000001) trained from "
            f"{out / 'stage1' / 'step_000002' / 'model'}, but this run starts stage2 from "
            f"{out / 'stage1' / 'step_000003' / 'model'}") in message, refused.stderr[-3000:]
    assert f"delete the folder {out / 'stage2'} and rerun" in message
    assert "differs from the checkpoint being resumed" not in refused.stdout + refused.stderr
    assert (out / "stage2" / "step_000001").is_dir()  # nothing deleted by the pipeline

    shutil.rmtree(out / "stage2")
    done = run_pipeline(tmp_path, rerun)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    report = json.loads((out / "pipeline_summary.json").read_text())
    assert report["stages"]["stage1"]["steps"] == 3
    assert report["scores_before"] == report["scores_after"] == {}  # eval_*/ are stale
    assert (out / "eval_after" / "results.json").is_file()
    assert "not evaluated (--skip-eval)" in done.stdout and "before -> after" not in done.stdout


def load_pipeline():
    """recipes/prolong/pipeline.py as a module (it is a script, not a package)."""
    return load_script(PIPELINE, "prolong_pipeline")


def test_a_base_model_gives_every_training_stage_its_tokenizer_and_model_type(tmp_path) -> None:
    pipeline = load_pipeline()
    base = write_family("qwen2", tmp_path / "qwen2", num_hidden_layers=2)
    for name in ("long_context_stage1.yaml", "long_context_stage2.yaml", "long_context_sft.yaml"):
        assert pipeline.base_model_overrides(SMOLLM2 / name, base)[:2] == [
            "checkpointer.model_type=QWEN2", f"tokenizer.path={base}"], name
    # the test configs' byte tokenizer reads no path
    assert pipeline.base_model_overrides(TINY / "long_context.yaml", base)[:1] == [
        "checkpointer.model_type=QWEN2"]
    assert not any(o.startswith("tokenizer.path") for o in pipeline.base_model_overrides(
        TINY / "long_context.yaml", base))
    assert pipeline.base_model_overrides(SMOLLM2 / "long_context_stage1.yaml", None) == []


@pytest.mark.parametrize("name", ["long_context_stage1.yaml", "long_context_stage2.yaml"])
def test_the_stage_configs_load_another_base_model_with_the_pipelines_overrides(
        name, tmp_path) -> None:
    """`pipeline.py --base-model <a Llama-3.2-style folder with a ChatML tokenizer>`: the
    stage's model takes every weight of the checkpoint and the tokenizer is the base model's
    (the configs used to build SmolLM2-135M and read SmolLM2's tokenizer whatever the base
    model was)."""
    from torchtune import training

    from acadlm_plugins.long_context_recipe import read_stage, source_model_config
    from acadlm_plugins.training.components import instantiate_component

    pipeline = load_pipeline()
    base = write_family_tokenizer("llama3.2", write_family(
        "llama3.2", tmp_path / "llama", num_hidden_layers=2, vocab_size=512))
    overrides = [*pipeline.checkpoint_overrides(base),
                 *pipeline.base_model_overrides(SMOLLM2 / name, base),
                 f"output_dir={tmp_path / 'out'}"]
    cfg = OmegaConf.merge(OmegaConf.load(SMOLLM2 / name), OmegaConf.from_dotlist(overrides))
    stage = read_stage(cfg, source_model_config(cfg))
    with torch.device("meta"):
        model = instantiate_component(cfg, "model", rope_base=stage.rope_base,
                                      max_seq_len=max(stage.max_seq_len,
                                                      stage.source_max_positions))
    weights = instantiate_component(cfg, "checkpointer").load_checkpoint()[training.MODEL_KEY]
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    assert not unexpected and not missing
    assert len(model.layers) == 2 and model.tok_embeddings.embedding_dim == 64
    rope = model.layers[0].attn.pos_embeddings  # the base model's llama3 scaling, new θ
    assert rope.scale_factor == 32 and rope.base == stage.rope_base
    tokenizer = instantiate_component(cfg, "tokenizer")
    assert tokenizer.encode("alpha beta", add_bos=False, add_eos=False)
    assert tokenizer.vocab_size <= model.tok_embeddings.num_embeddings


def test_a_stage_config_trains_a_qwen2_base_model_with_its_own_tokenizer(
        tmp_path, monkeypatch) -> None:
    """`pipeline.py --base-model <a Qwen2 folder>`: the stage config's own tokenizer component
    (`smollm2_tokenizer`) reads the Qwen2 tokenizer, whose tokenizer_config.json names no BOS
    (generation_config.json's `bos_token_id` is the BOS, as transformers takes it), and the
    stage trains. It used to stop at tokenizer setup ("Could not parse bos_token")."""
    from recipe_runs import torch_threads

    from acadlm_plugins.long_context_recipe import LongContextRecipe
    from acadlm_plugins.models import SmolLM2Tokenizer

    monkeypatch.setenv("ACADLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv("ACADLM_PLUGINS_DISABLE_AUTOLOAD", "1")
    pipeline = load_pipeline()
    base = write_family_tokenizer("qwen2", write_family(
        "qwen2", tmp_path / "qwen2", num_hidden_layers=2, vocab_size=512))
    corpus = write_tiny_corpus(tmp_path / "corpus", docs_per_domain=6)
    long_docs = write_long_documents(tmp_path / "long" / "docs.jsonl")
    config = SMOLLM2 / "long_context_stage1.yaml"
    overrides = [*pipeline.checkpoint_overrides(base), *pipeline.base_model_overrides(config, base),
                 f"output_dir={tmp_path / 'out'}", "max_steps=2",
                 "long_context.max_seq_len=128", "long_context.token_budget=256",
                 "long_context.chunked_loss_tokens=32", f"dataset.cache_dir={tmp_path / 'cache'}",
                 f"validation_dataset.data_dir={corpus}", "validation_dataset.max_seq_len=128",
                 f"validation_dataset.cache_dir={tmp_path / 'cache'}",
                 "validation.max_packs_per_domain=1", "enable_activation_checkpointing=False"]
    cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(overrides))
    cfg.dataset.sources = OmegaConf.create({
        "long": {"data_files": str(long_docs), "share": 0.6, "min_tokens": 100},
        "short": {"data_files": str(corpus / "prose" / "train.jsonl"), "share": 0.4}})
    assert cfg.tokenizer._component_.endswith("smollm2_tokenizer")
    assert cfg.tokenizer.path == str(base) and cfg.checkpointer.model_type == "QWEN2"

    with torch_threads():
        recipe = LongContextRecipe(cfg)
        try:
            recipe.setup(cfg)
            summary = recipe.train()
        finally:
            recipe.cleanup()
    tokenizer = recipe._tokenizer
    assert isinstance(tokenizer, SmolLM2Tokenizer)
    generation = json.loads((base / "generation_config.json").read_text())
    assert tokenizer.bos_id == generation["bos_token_id"] == tokenizer.document_separator_id
    assert (tokenizer.eos_id, tokenizer.pad_id) == (tokenizer.im_end_id, 0)
    assert summary["steps"] == 2 and summary["stage"]["rope_base"] == 1e6
    saved = json.loads((Path(summary["checkpoint"]) / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["rope_theta"] == 1e6


def test_a_resumed_sft_from_another_stage2_model_is_stopped_naming_the_folder(tmp_path) -> None:
    """SFT resumes only when asked (`resume_from_checkpoint`); then an SFT folder trained from
    another stage-2 export stops the pipeline, naming the folder to delete. Without resuming,
    torchtune's SFT starts afresh from the new export, so nothing is checked."""
    pipeline = load_pipeline()
    sft_dir = tmp_path / "out" / "sft"
    sft_dir.mkdir(parents=True)
    old, new = tmp_path / "stage2" / "step_000001" / "model", tmp_path / "stage2" / "step_000002"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(TINY / "sft.yaml"), OmegaConf.from_dotlist(
        [f"checkpointer.checkpoint_dir={old}", f"output_dir={sft_dir}"])),
        sft_dir / "torchtune_config.yaml")
    recorded = pipeline.recorded_sft_source(sft_dir)
    assert recorded == (sft_dir / "torchtune_config.yaml", str(old))
    overrides = [f"checkpointer.checkpoint_dir={new}"]
    assert not pipeline.sft_resumes(pipeline.stage_config(TINY / "sft.yaml", overrides))
    for resume in ("resume_from_checkpoint=True", "checkpointer.should_load_recipe_state=true"):
        assert pipeline.sft_resumes(pipeline.stage_config(TINY / "sft.yaml", [*overrides, resume]))
    with pytest.raises(SystemExit) as stop:
        pipeline.check_stage_source("sft", sft_dir, new, upstream="stage 2's newest export",
                                    recorded=recorded)
    message = str(stop.value)
    assert f"trained from {old}, but this run starts sft from {new}" in message
    assert f"delete the folder {sft_dir} and rerun" in message
    pipeline.check_stage_source("sft", sft_dir, old, upstream="x", recorded=recorded)  # same
    assert pipeline.recorded_sft_source(tmp_path / "nothing") is None


def test_the_refusal_offers_keeping_the_old_run_only_while_its_model_exists(tmp_path):
    """After `--stage1-steps 2` the 1-step export stage 2 was trained from may be deleted
    (stage 1 keeps its last checkpoints only): "rerun with the settings that produced it" then
    leads nowhere, and the message says it cannot be kept instead."""
    pipeline = load_pipeline()
    stage_dir = tmp_path / "stage2"
    old, new = tmp_path / "stage1/step_000001/model", tmp_path / "stage1/step_000002/model"
    recorded = (stage_dir / "step_000001", str(old))
    for exists in (True, False):
        if exists:
            old.mkdir(parents=True)
        else:
            old.rmdir()
        with pytest.raises(SystemExit) as stop:
            pipeline.check_stage_source("stage2", stage_dir, new, upstream="stage 1's newest "
                                        "export", recorded=recorded)
        message = str(stop.value)
        assert f"delete the folder {stage_dir} and rerun" in message
        assert ("to keep it, rerun with the settings that produced" in message) == exists
        assert (f"{old} no longer exists, so it cannot be kept" in message) == (not exists)


def test_eval_lengths_are_read_as_the_evaluation_reads_them():
    pipeline = load_pipeline()
    assert pipeline.parse_args(["--eval-lengths", "4k,8192"]).eval_lengths == [4096, 8192]
    for bad in ("4,096", "", "4k,abc"):
        with pytest.raises(SystemExit) as stop:
            pipeline.parse_args(["--eval-lengths", bad])
        assert stop.value.code == 2


def test_the_final_model_is_the_last_sft_epochs(tmp_path):
    """torchtune writes ``epoch_<n>`` after every SFT epoch; the evaluation after training used
    ``epoch_0`` whatever ``epochs`` said, so with two epochs it scored the first one."""
    pipeline = load_pipeline()
    config = REPO_ROOT / "configs" / "tiny" / "sft.yaml"
    sft = tmp_path / "sft"
    assert pipeline.sft_final_model(sft, pipeline.stage_config(config, [])) == sft / "epoch_0"
    assert pipeline.sft_final_model(sft, pipeline.stage_config(config, ["epochs=3"])) == (
        sft / "epoch_2")
    assert pipeline.sft_final_model(sft, None) == sft / "epoch_0"


# ------------------------------------------------------------- checks before the first stage
@pytest.mark.parametrize("argv, words", [
    (["--stage1-steps", "0"], "--stage1-steps 0: must be at least 1"),
    (["--stage1-steps", "-3"], "--stage1-steps -3: must be at least 1"),
    (["--stage2-steps", "0"], "--stage2-steps 0: must be at least 1"),
    (["--sft-steps", "0"], "--sft-steps 0: must be at least 1"),
    (["--eval-samples", "0"], "--eval-samples 0: must be at least 1"),
    (["--stage1-config", "nope.yaml"], "--stage1-config nope.yaml: no such file"),
    (["--sft-config", "nope.yaml"], "--sft-config nope.yaml: no such file"),
    (["--eval-tasks", ","], "--eval-tasks ',': name at least one task"),
])
def test_bad_flags_stop_before_any_stage_naming_the_flag(tmp_path, capsys, argv, words):
    """The pipeline used to start the (long) evaluation with these, and find them only at
    their own stage, naming the stage's key (`max_steps`) or with tune's traceback."""
    pipeline = load_pipeline()
    argv = ["--output-dir", str(tmp_path / "out"), *argv]
    assert run_until_first_stage(pipeline, argv).outcome == "exit 2"
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, key", [
    (["stage1:max_stepz=1"], "stage1:max_stepz"),
    (["stage1:seed=-1"], "stage1:seed"),
    (["stage2:long_context.attention=foo"], "stage2:long_context.attention"),
    (["stage2:eval_every_n_steps=0"], "stage2:eval_every_n_steps"),
    # stage 1's export is trained at θ 40000 (tiny config) and reaches 512 positions: stage 2
    # at 1024 with the same θ is refused, read against that export's config.json (the base
    # model's θ is 10000, against which the setting would pass)
    (["stage2:long_context.max_seq_len=1024", "stage2:long_context.rope_base=40000.0"],
     "stage2:long_context.rope_base"),
    (["sft:batch_size=0"], "sft:batch_size"),
    (["sft:max_steps_per_epoch=0"], "sft:max_steps_per_epoch"),
    (["eval:num_samplez=3"], "eval:num_samplez"),
    (["stage2:~no_such_key"], "--set stage2:~no_such_key"),
])
def test_a_setting_a_later_stage_refuses_stops_the_pipeline_before_the_first_stage(
        tmp_path, capsys, overrides, key):
    """Every stage's config, with the overrides it will get, is checked as its recipe checks
    it before the evaluation (the first stage) starts: exit 2 naming `<stage>:<key>`."""
    pipeline = load_pipeline()
    argv = [*pipeline_args(tmp_path), *[f"--set={o}" for o in overrides]]
    assert run_until_first_stage(pipeline, argv).outcome == "exit 2"
    err = capsys.readouterr().err
    assert f"`{key}`" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("skip_eval, first", [(False, "eval_before"), (True, "stage1")])
def test_the_tiny_pipelines_stages_all_pass_the_up_front_checks(tmp_path, skip_eval, first):
    pipeline = load_pipeline()
    argv = pipeline_args(tmp_path, skip_eval=skip_eval)
    assert run_until_first_stage(pipeline, argv).outcome == first


def test_a_base_model_that_is_not_a_model_folder_is_refused_naming_the_flag(tmp_path, capsys):
    """It used to reach the stages' checkpointer as a raw ConfigError traceback naming
    `checkpointer.checkpoint_dir`."""
    pipeline = load_pipeline()
    corpus = write_tiny_corpus(tmp_path / "corpus")
    for folder, words in ((corpus, "config.json does not exist"),
                          (tmp_path / "nothing", "does not exist")):
        argv = ["--output-dir", str(tmp_path / "out"), "--skip-eval", "--base-model",
                str(folder)]
        assert run_until_first_stage(pipeline, argv).outcome == "exit 2"
        err = capsys.readouterr().err
        assert "config `--base-model`:" in err and words in err, err
        assert "checkpointer.checkpoint_dir" not in err and "Traceback" not in err


def test_a_malformed_stage_config_is_named_not_a_yaml_traceback(tmp_path, capsys):
    pipeline = load_pipeline()
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: :\n")
    argv = [*pipeline_args(tmp_path), "--sft-config", str(bad)]
    assert run_until_first_stage(pipeline, argv).outcome == "exit 2"
    err = capsys.readouterr().err
    assert "config `--sft-config`:" in err and "not valid YAML (line 2)" in err, err
    assert "Traceback" not in err


def test_an_unset_value_says_which_set_gives_it(tmp_path, capsys):
    pipeline = load_pipeline()
    sft = tmp_path / "sft.yaml"
    sft.write_text((REPO_ROOT / "configs" / "tiny" / "sft.yaml").read_text()
                   + "\nextra_setting: ???\n")
    argv = [*pipeline_args(tmp_path), "--sft-config", str(sft)]
    assert run_until_first_stage(pipeline, argv).outcome == "exit 2"
    err = capsys.readouterr().err
    assert "`sft:extra_setting`" in err and "--set sft:extra_setting=..." in err, err


def test_a_base_model_frees_the_smollm2_trained_length(tmp_path) -> None:
    """stage 1's trained_length 2048 is SmolLM2's: another base model's is its own."""
    pipeline = load_pipeline()
    base = write_family("qwen2", tmp_path / "qwen2", num_hidden_layers=2)
    overrides = pipeline.base_model_overrides(SMOLLM2 / "long_context_stage1.yaml", base)
    assert "long_context.trained_length=null" in overrides


def test_a_bad_eval_length_names_the_pipelines_flag(capsys):
    """The evaluation's message suggested lm-eval's --metadata, which the pipeline has not."""
    pipeline = load_pipeline()
    with pytest.raises(SystemExit) as stop:
        pipeline.parse_args(["--eval-lengths", "100"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --eval-lengths: '100': 100 is too short" in err
    assert "--eval-lengths 4096,8192,16384" in err and "--metadata" not in err
