"""recipes/qurating/pipeline.py end to end on the tiny model: every stage runs, each reads the
previous stage's output, and the summary compares uniform and selected training at equal tokens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_runs import load_script, run_until_first_stage
from tiny_setup import REPO_ROOT, write_tiny_corpus, write_tiny_model_dir

PIPELINE = REPO_ROOT / "recipes" / "qurating" / "pipeline.py"
TINY = REPO_ROOT / "configs" / "tiny"


def run_pipeline(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1",
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    return subprocess.run([sys.executable, str(PIPELINE), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def tiny_pipeline_args(tmp_path: Path) -> list[str]:
    model = write_tiny_model_dir(tmp_path / "model")
    corpus = write_tiny_corpus(tmp_path / "corpus", docs_per_domain=12)
    files = "[" + ",".join(str(corpus / d / "train.jsonl") for d in ("prose", "numbers", "code")) + "]"
    return [
        "--output-dir", str(tmp_path / "out"),
        "--judge-config", str(TINY / "qurating_judge.yaml"),
        "--rater-config", str(TINY / "qurating_rater.yaml"),
        "--annotate-config", str(TINY / "qurating_annotate.yaml"),
        "--train-config", str(TINY / "qurating_train.yaml"),
        "--num-pairs", "8", "--rater-steps", "4", "--documents-per-file", "6",
        "--train-steps", "4", "--set", "select:top_k=true",
        "--set", f"judge:judge.local.model_dir={model}", "--set", f"judge:pairs.data={corpus}",
        "--set", f"rater:backbone_dir={model}", "--set", "rater:batch_size=4",
        "--set", f"annotate:data_files={files}",
        "--set", f"train:checkpointer.checkpoint_dir={model}",
        "--set", f"train:validation_dataset.data_dir={corpus}",
    ]


def test_pipeline_runs_every_stage_and_compares_uniform_with_selected(tmp_path) -> None:
    """One run of every stage, then a rerun with the same arguments that resumes them all."""
    args = tiny_pipeline_args(tmp_path)
    done = run_pipeline(args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = tmp_path / "out"
    report = json.loads((out / "pipeline_summary.json").read_text())

    assert report["judgments"]["pairs_in_file"] == 8
    assert report["rater"]["steps"] == 4
    assert set(report["rater"]["criteria"]) == {"writing_style", "educational_value"}
    # 6 documents of each of the 3 files were scored, and the selections drew from them.
    assert report["annotation"]["documents_scored"] == 18 and report["annotation"]["complete"]
    chosen, uniform = report["selection"]["selected"], report["selection"]["uniform"]
    assert chosen["settings"]["mode"] != uniform["settings"]["mode"]
    assert chosen["corpus"]["documents"] == uniform["corpus"]["documents"] == 18
    assert 0 < chosen["selected"]["documents"] < 18
    overlap = report["selection_overlap"]
    assert overlap["selected"] == chosen["selected"]["documents"]
    assert overlap["uniform"] == uniform["selected"]["documents"]
    assert overlap["shared"] < overlap["selected"], "top-k by score chose the uniform documents"
    # Both training runs took the same number of steps and were validated on the same data.
    trained = report["training"]
    assert trained["selected"]["steps"] == trained["uniform"]["steps"] == 4
    assert trained["selected"]["val_loss_before"] == trained["uniform"]["val_loss_before"]
    assert set(trained["selected"]["val_loss_after"]) == {"prose", "numbers", "code"}
    assert trained["selected"]["val_loss_after"] != trained["uniform"]["val_loss_after"]

    printed = done.stdout
    assert "QuRating pipeline summary" in printed
    for line in ("writing_style", "educational_value", "[selected]", "[uniform]", "sel - uni",
                 "documents in both selections"):
        assert line in printed
    for stage in ("judge_recipe", "rater_recipe", "annotate_recipe", "qurating.select",
                  "continued_pretrain_recipe"):
        assert stage in printed, f"the command of stage {stage} is not echoed"
    corpus = report["annotation"]["corpus"]
    assert corpus["documents"] == 18
    assert re.search(rf"annotation: 18 documents, {corpus['tokens']:,} tokens; this run scored "
                     r"18 documents at [\d,]+ tokens/s", printed), printed
    bias = re.search(r"position bias ([+-]\d\.\d{3})", printed)
    assert bias, printed

    # Rerun with the same arguments: every stage resumes, and the summary still reports the
    # judge's position bias and the annotated corpus, not "n/a" and "0 documents".
    rerun = run_pipeline(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    again = json.loads((out / "pipeline_summary.json").read_text())
    assert again["judgments"]["pairs_judged_this_run"] == 0
    assert again["judgments"]["position_bias"] == report["judgments"]["position_bias"]
    assert f"position bias {bias.group(1)}" in rerun.stdout
    assert again["annotation"]["shards_scored"] == 0 and again["annotation"]["corpus"] == corpus
    assert again["annotation"]["last_scoring_run"] == report["annotation"]["last_scoring_run"]
    assert re.search(rf"annotation: 18 documents, {corpus['tokens']:,} tokens, already annotated "
                     r"\(an earlier run scored 18 documents at [\d,]+ tokens/s\)",
                     rerun.stdout), rerun.stdout


def test_a_malformed_stage_override_is_refused_before_any_stage_runs(tmp_path) -> None:
    done = run_pipeline(["--output-dir", str(tmp_path / "out"), "--set", "rater margin=0.1"],
                        cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: --set 'rater margin=0.1': expected STAGE:key=value" in done.stderr
    assert "rater:margin=0.1" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["trainer:max_steps=3", "judge:num_pairs"])
def test_unknown_stage_or_missing_value_is_refused(tmp_path, bad) -> None:
    done = run_pipeline(["--output-dir", str(tmp_path / "out"), "--set", bad], cwd=tmp_path,
                        timeout=120)
    assert done.returncode == 2 and "expected STAGE:key=value" in done.stderr


# ------------------------------------------------------------- checks before the first stage
def first_stage(argv: list[str]) -> str:
    """The first stage the pipeline would start with ``argv``, or ``exit <code>``."""
    pipeline = load_script(PIPELINE, "qurating_pipeline")
    return run_until_first_stage(pipeline, argv).outcome


@pytest.mark.parametrize("argv, words", [
    (["--nproc-per-node", "0"], "--nproc-per-node 0: must be at least 1"),
    (["--documents-per-file", "-1"], "--documents-per-file -1: must be at least 0"),
    (["--train-steps", "0"], "--train-steps 0: must be at least 1"),
    (["--rater-steps", "0"], "--rater-steps 0: must be at least 1"),
    (["--num-pairs", "0"], "--num-pairs 0: must be at least 1"),
    (["--judge-config", "nope.yaml"], "--judge-config nope.yaml: no such file"),
    (["--select-config", "nope.yaml"], "--select-config nope.yaml: no such file"),
])
def test_bad_flags_stop_before_the_judge_naming_the_flag(tmp_path, capsys, argv, words):
    """These used to run the judge (and rater) first and fail at their own stage, naming the
    stage's key (`max_steps`), with tune's traceback, or (`--nproc-per-node 0`) not at all:
    tune_run then ran one process."""
    assert first_stage(["--output-dir", str(tmp_path / "out"), *argv]) == "exit 2"
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("margin, words", [("0.7", "outside [0, 0.5)"),
                                           ("-1", "below its minimum"), ("nan", "is nan")])
def test_a_margin_the_rater_refuses_is_named_as_the_flag_before_the_judge(tmp_path, capsys,
                                                                         margin, words):
    """The rater's own check (rating_settings), made before the judge runs, names the flag
    that set the key."""
    argv = [*tiny_pipeline_args(tmp_path), "--margin", margin]
    assert first_stage(argv) == "exit 2"
    err = capsys.readouterr().err
    assert "`--margin`" in err and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("override, key", [
    ("rater:validation_fraction=1.0", "rater:validation_fraction"),
    ("rater:validation_split=docs", "rater:validation_split"),
    ("rater:margin=0.5", "rater:margin"),
    ("rater:max_stepz=3", "rater:max_stepz"),
    ("rater:pooling=max", "rater:pooling"),
    ("rater:seed=abc", "rater:seed"),
    ("annotate:chunk_tokens=0", "annotate:chunk_tokens"),
    ("select:batch_size=0", "select:batch_size"),
    ("select:criteria.educational_value=abc", "select:criteria.educational_value"),
    ("select:budget_fraction=2", "select:budget_fraction"),
    ("train:max_stepz=3", "train:max_stepz"),
    ("train:gradient_accumulation_steps=0", "train:gradient_accumulation_steps"),
    ("train:~no_such_key", "--set train:~no_such_key"),
])
def test_a_setting_a_later_stage_refuses_stops_the_pipeline_before_the_judge(
        tmp_path, capsys, override, key):
    """Every run's config, with the overrides it will get, is checked before the judge runs:
    exit 2 naming `<stage>:<key>`, not after the judge and the rater have run."""
    argv = [*tiny_pipeline_args(tmp_path), "--set", override]
    assert first_stage(argv) == "exit 2"
    err = capsys.readouterr().err
    assert f"`{key}`" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_the_tiny_pipelines_runs_all_pass_the_up_front_checks(tmp_path):
    assert first_stage(tiny_pipeline_args(tmp_path)) == "judge"


def test_the_seed_bound_follows_the_processes_the_rater_runs_on(tmp_path, capsys):
    """torchtune seeds rank r with seed + r: 2**32 - 1 is valid for one process, not two."""
    argv = [*tiny_pipeline_args(tmp_path), "--set", "rater:seed=4294967295"]
    assert first_stage(argv) == "judge"
    assert first_stage([*argv, "--nproc-per-node", "2"]) == "exit 2"
    err = capsys.readouterr().err
    assert "`rater:seed`" in err and "for 2 processes" in err, err
