"""The eval recipe and the `acadlm-lm-eval` command: config checks, outputs, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_setup import REPO_ROOT, run_tune_subprocess, write_tiny_model_dir

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.eval_recipe import check_config, task_metadata

HAYSTACK = ("The keeper of the small lighthouse walked along the shore every morning. "
            "He counted the boats, wrote the weather in a thick book, and mended nets. ") * 40


def _cfg(tmp_path: Path, model_dir: Path, **extra) -> OmegaConf:
    base = {"output_dir": str(tmp_path / "eval"),
            "model": {"name": "acadlm", "args": {"pretrained": str(model_dir), "batch_size": 2}},
            "tasks": ["acadlm_niah_single_1"], "lengths": [384, 512], "num_samples": 2,
            "seed": 7, "task_metadata": {"haystack_path": str(tmp_path / "hay.txt")}}
    base.update(extra)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def test_unknown_key_is_named_with_a_suggestion(tmp_path, tiny_model_dir) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, lenghts=[1024])
    with pytest.raises(ConfigError, match=r"`lenghts`.*did you mean `lengths`"):
        check_config(cfg)


def test_missing_model_folder_is_refused(tmp_path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"model\.args\.pretrained.*not a local model folder"):
        check_config(cfg)


def test_unsupported_model_name_is_refused(tmp_path, tiny_model_dir) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg.model.name = "vllm"
    with pytest.raises(ConfigError, match=r"model\.name"):
        check_config(cfg)


def test_task_metadata_carries_lengths_samples_seed_and_extras(tmp_path, tiny_model_dir) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    metadata = task_metadata(cfg, {"pretrained": "x"})
    assert metadata["max_seq_lengths"] == [384, 512]
    assert metadata["num_samples"] == 2 and metadata["seed"] == 7
    assert metadata["pretrained"] == "x"
    assert metadata["haystack_path"].endswith("hay.txt")


def test_tune_run_eval_recipe_writes_results_samples_table_and_heatmap(tmp_path,
                                                                      tiny_model_dir) -> None:
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    out = tmp_path / "eval"
    run_tune_subprocess(
        "acadlm_plugins/eval_recipe",
        ["--config", str(REPO_ROOT / "configs/smollm2/eval_long_context.yaml"),
         f"output_dir={out}", f"model.args.pretrained={tiny_model_dir}", "model.args.batch_size=2",
         "tasks=[acadlm_niah_single_1,acadlm_niah_multikey_2]", "lengths=[384,512]",
         "num_samples=2", f"task_metadata={{haystack_path: {tmp_path / 'hay.txt'}}}"],
        cwd=tmp_path, log_file=tmp_path / "eval.log", timeout=300)
    results = json.loads((out / "results.json").read_text())
    for task in ("acadlm_niah_single_1", "acadlm_niah_multikey_2"):
        scores = results["results"][task]
        assert 0.0 <= scores["384,none"] <= 100.0 and 0.0 <= scores["512,none"] <= 100.0
        rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").open()]
        assert len(rows) == 4
    assert results["acadlm"]["metadata"]["max_seq_lengths"] == [384, 512]
    table = (out / "acadlm_long_table.md").read_text()
    assert "| acadlm_niah_multikey_2 |" in table and "| 384 | 512 |" in table
    assert (out / "acadlm_long_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    log = (tmp_path / "eval.log").read_text()
    assert "Scores by context length" in log


def test_the_recipes_system_instruction_reaches_the_run_and_the_tasks(tmp_path,
                                                                     tiny_model_dir) -> None:
    """``system_instruction`` goes to lm-eval (which writes it into every prompt) and to the
    tasks' metadata (which count it in the length budget); with only one of the two, a RULER
    task would refuse the run."""
    from acadlm_plugins.eval_recipe import run_evaluation

    (tmp_path / "hay.txt").write_text(HAYSTACK)
    cfg = _cfg(tmp_path, tiny_model_dir, lengths=[512], num_samples=1,
               system_instruction="Be brief.")
    results = run_evaluation(cfg)
    assert results["acadlm"]["metadata"]["system_instruction"] == "Be brief."
    [row] = [json.loads(line) for line in
             (tmp_path / "eval" / "samples_acadlm_niah_single_1.jsonl").open()]
    assert "Be brief." in json.dumps(row["arguments"])


def test_acadlm_lm_eval_command_prints_table_and_writes_report(tmp_path, tiny_model_dir,
                                                               capsys) -> None:
    from acadlm_plugins.evaluation.cli import main

    (tmp_path / "hay.txt").write_text(HAYSTACK)
    metadata = {"max_seq_lengths": [384], "num_samples": 2,
                "haystack_path": str(tmp_path / "hay.txt")}
    main(["--model", "acadlm", "--model_args", f"pretrained={tiny_model_dir}",
          "--tasks", "acadlm_niah_single_2", "--metadata", json.dumps(metadata),
          "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "lm")])
    printed = capsys.readouterr().out
    assert "Scores by context length" in printed and "| acadlm_niah_single_2 |" in printed
    results_files = list((tmp_path / "lm").rglob("results_*.json"))
    assert len(results_files) == 1
    heatmaps = list(results_files[0].parent.glob("acadlm_long_*_heatmap.png"))
    assert len(heatmaps) == 1
