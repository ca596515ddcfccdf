"""recipes/prolong/pipeline.py end to end on the tiny model: evaluation, two long-context stages
(the second from the first's export and optimizer state), stock-recipe SFT, evaluation again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_long_context_recipe import write_long_documents
from tiny_setup import REPO_ROOT, write_tiny_corpus, write_tiny_model_dir

PIPELINE = REPO_ROOT / "recipes" / "prolong" / "pipeline.py"
TINY = REPO_ROOT / "configs" / "tiny"
HAYSTACK = " ".join(f"The {w} sat by the river and watched the boats go by." for w in
                    ("heron", "fisher", "child", "miller", "poet", "sailor") * 40)


def test_pipeline_runs_every_stage_and_reports_scores_before_and_after(tmp_path) -> None:
    model = write_tiny_model_dir(tmp_path / "model")
    corpus = write_tiny_corpus(tmp_path / "corpus")
    long_docs = write_long_documents(tmp_path / "long" / "docs.jsonl")
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    stage = [f"dataset.sources.long.data_files={long_docs}",
             f"dataset.sources.short.data_files={corpus / 'prose' / 'train.jsonl'}",
             f"validation_dataset.data_dir={corpus}", "validation.max_packs_per_domain=1"]
    args = [
        "--output-dir", str(tmp_path / "out"), "--base-model", str(model),
        "--stage1-config", str(TINY / "long_context.yaml"),
        "--stage2-config", str(TINY / "long_context.yaml"),
        "--sft-config", str(TINY / "sft.yaml"),
        "--stage1-steps", "2", "--stage2-steps", "1", "--sft-steps", "2",
        "--eval-tasks", "acadlm_niah_single_1", "--eval-lengths", "384,512",
        "--eval-samples", "1",
        "--set", "eval:model.args.batch_size=1",
        "--set", f"eval:task_metadata={{haystack_path: {tmp_path / 'hay.txt'}}}",
        *[f"--set=stage1:{o}" for o in stage], *[f"--set=stage2:{o}" for o in stage],
        "--set", "stage2:long_context.max_seq_len=256",
        "--set", "stage2:long_context.rope_base=160000.0",
        "--set", "stage2:long_context.trained_length=null",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1",
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    done = subprocess.run([sys.executable, str(PIPELINE), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]

    report = json.loads((tmp_path / "out" / "pipeline_summary.json").read_text())
    first, second = report["stages"]["stage1"], report["stages"]["stage2"]
    assert first["stage"]["rope_base"] == 40000.0 and first["steps"] == 2
    assert second["stage"]["source_rope_base"] == 40000.0  # read from stage 1's export
    assert second["stage"]["rope_base"] == 160000.0 and second["stage"]["max_seq_len"] == 256
    assert second["stage"]["previous_stage"].endswith("stage1")
    assert 0.9 < first["packing"]["efficiency"] <= 1.0
    for when in ("scores_before", "scores_after"):
        assert set(report[when]["acadlm_niah_single_1"]) == {"384", "512"}
    sft_config = json.loads((tmp_path / "out" / "sft" / "epoch_0" / "config.json").read_text())
    assert sft_config["rope_theta"] == 160000.0  # SFT kept stage 2's RoPE base
    assert "ProLong pipeline summary" in done.stdout and "before -> after" in done.stdout
