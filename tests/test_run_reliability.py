"""Bad input to the training recipes (issue 16's adversarial table): each is refused before any
work with the key or file and the fix, and a refused run leaves an earlier run's output_dir
byte-identical. Tiny model, tiny corpus."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import REPO_ROOT, tiny_run_args, write_tiny_checkpoint

from acadlm_plugins.data.documents import read_texts
from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.training.checkpointing import latest_checkpoint
from acadlm_plugins.training.run_checks import clean_interrupted_writes

CPT = "acadlm_plugins.continued_pretrain_recipe"
PRUNE = "acadlm_plugins.prune_recipe"
PRUNE_CONFIG = REPO_ROOT / "configs" / "tiny" / "prune.yaml"


def cpt_args(root: Path, *overrides: str) -> list[str]:
    return tiny_run_args(root, "max_steps=2", "save_every_n_steps=2", *overrides)


def prune_args(root: Path, *overrides: str) -> list[str]:
    args = [a for a in tiny_run_args(root) if not a.startswith("validation_dataset.")]
    args[1] = str(PRUNE_CONFIG)
    return [*args, "max_steps=2", "save_every_n_steps=2", *overrides]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its content's hash (folders: "dir")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(monkeypatch, module: str, args: list[str]) -> Path:
    with torch_threads():
        return run_recipe_main(monkeypatch, module, args)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished continued-pretraining run and one finished pruning run (2 steps each),
    sharing a tiny model and corpus; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    monkeypatch = pytest.MonkeyPatch()
    try:
        run(monkeypatch, CPT, cpt_args(root))
        shutil.move(root / "run", root / "cpt")
        run(monkeypatch, PRUNE, prune_args(root))
        shutil.move(root / "run", root / "prune")
    finally:
        monkeypatch.undo()
    return root


@pytest.fixture
def workspace(finished_runs, tmp_path):
    """A copy of the finished runs, which go on reading the shared model and corpus (their
    paths are part of the runs' identity)."""
    for name in ("cpt", "prune"):
        shutil.copytree(finished_runs / name, tmp_path / name)
    for name in ("tiny_model", "tiny_corpus"):
        (tmp_path / name).symlink_to(finished_runs / name)
    return tmp_path


def shared(workspace: Path) -> Path:
    """The folder whose model and corpus the finished runs were trained on."""
    return (workspace / "tiny_model").resolve().parent


def with_output(args: list[str], output_dir: Path) -> list[str]:
    return [a if not a.startswith("output_dir=") else f"output_dir={output_dir}" for a in args]


# (name, recipe, the finished run it is pointed at, overrides, the key the error must name)
REFUSALS = [
    ("changed dataset", CPT, "cpt", ["dataset.max_seq_len=32", "validation_dataset.max_seq_len=32"],
     "dataset.max_seq_len"),
    ("resume false", CPT, "cpt", ["resume=false"], "resume"),
    ("changed pruning target", PRUNE, "prune", ["pruning.target.num_layers=2"],
     "pruning.target.num_layers"),
    ("prune into a continued-pretraining run", PRUNE, "cpt", [], "output_dir"),
    ("continued pretraining into a pruning run", CPT, "prune", [], "output_dir"),
    ("another model on resume", CPT, "cpt", ["checkpointer.checkpoint_dir={other_model}"],
     "checkpointer.checkpoint_dir"),
    ("another seed on resume", CPT, "cpt", ["seed=7"], "seed"),
    ("save every 0 steps", CPT, "cpt", ["save_every_n_steps=0"], "save_every_n_steps"),
    ("0 accumulation steps", CPT, "cpt", ["gradient_accumulation_steps=0"],
     "gradient_accumulation_steps"),
    ("0 steps", CPT, "cpt", ["max_steps=0"], "max_steps"),
    ("negative steps", PRUNE, "prune", ["max_steps=-3"], "max_steps"),
    ("packs longer than the model", CPT, "cpt", ["dataset.max_seq_len=4096"], "dataset.max_seq_len"),
    ("typo in a component block", CPT, "cpt", ["dataset.weigths=0.5"], "dataset.weigths"),
    ("missing checkpoint folder", CPT, "cpt", ["checkpointer.checkpoint_dir={missing}"],
     "checkpointer.checkpoint_dir"),
    ("a model_type that converts the weights wrongly", CPT, "cpt",
     ["checkpointer.model_type=QWEN2"], "checkpointer.model_type"),
    ("missing checkpoint file", CPT, "cpt", ["checkpointer.checkpoint_files=[nope.safetensors]"],
     "checkpointer.checkpoint_files"),
]
if not torch.cuda.is_available():
    REFUSALS.append(("cuda without a GPU", CPT, "cpt", ["device=cuda"], "device"))


@pytest.mark.parametrize("name, module, target, overrides, key", REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_a_refused_run_names_the_key_and_leaves_the_output_dir_byte_identical(
        workspace, monkeypatch, name, module, target, overrides, key):
    other_model = write_tiny_checkpoint(workspace / "other_model", seed=1)
    filled = [o.format(other_model=other_model, missing=workspace / "nowhere") for o in overrides]
    make_args = cpt_args if module == CPT else prune_args
    args = with_output(make_args(shared(workspace), *filled), workspace / target)
    before = snapshot(workspace / target)
    with pytest.raises(ConfigError) as err:
        run(monkeypatch, module, args)
    assert err.value.key == key, str(err.value)
    assert "Fix:" in str(err.value)
    assert snapshot(workspace / target) == before


def test_a_typo_in_a_component_block_suggests_the_parameter(workspace, monkeypatch):
    """Fresh or resumed: the resumed run used to report the typo as a setting that "differs
    from the checkpoint being resumed (was None, is 0.5)", with no suggestion."""
    with pytest.raises(ConfigError, match=r"did you mean `dataset.weights`"):
        run(monkeypatch, CPT, cpt_args(workspace, "dataset.weigths=0.5",
                                       f"output_dir={workspace / 'fresh'}"))
    assert not (workspace / "fresh").exists()
    args = with_output(cpt_args(shared(workspace), "dataset.weigths=0.5"), workspace / "cpt")
    before = snapshot(workspace / "cpt")
    with pytest.raises(ConfigError, match=r"did you mean `dataset.weights`") as err:
        run(monkeypatch, CPT, args)
    assert "differs from the checkpoint" not in str(err.value)
    assert snapshot(workspace / "cpt") == before


def test_a_refused_fresh_run_leaves_no_empty_output_dir(workspace, monkeypatch):
    """torchtune's checkpointer makes output_dir (and its missing parents) when it is built,
    before the dataset is checked: a refused fresh run used to leave them behind, empty."""
    fresh = workspace / "new_parent" / "run"
    with pytest.raises(ConfigError) as err:
        run(monkeypatch, PRUNE, prune_args(shared(workspace), "dataset.max_seq_len=4096",
                                           f"output_dir={fresh}"))
    assert err.value.key == "dataset.max_seq_len"
    assert not (workspace / "new_parent").exists()
    kept = workspace / "holds_a_file"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError):
        run(monkeypatch, CPT, cpt_args(shared(workspace), "dataset.max_seq_len=4096",
                                       f"output_dir={kept}"))
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_packs_longer_than_the_model_are_refused_before_tokenizing(workspace, monkeypatch):
    with pytest.raises(ConfigError, match=r"is 4096, above the model's 512 positions") as err:
        run(monkeypatch, CPT, cpt_args(workspace, "dataset.max_seq_len=4096",
                                       f"output_dir={workspace / 'fresh'}"))
    assert err.value.key == "dataset.max_seq_len"
    assert not (workspace / "fresh").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_loading(workspace, monkeypatch):
    file = workspace / "a_file"
    file.write_text("keep me\n")
    with pytest.raises(ConfigError) as err:
        run(monkeypatch, CPT, cpt_args(workspace, f"output_dir={file}"))
    assert err.value.key == "output_dir" and "is a file" in str(err.value)
    assert file.read_text() == "keep me\n"


def test_a_read_only_output_dir_is_refused_before_loading(workspace, monkeypatch):
    target = workspace / "read_only"
    target.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: stand in for the permission check
        real_access = os.access
        monkeypatch.setattr("acadlm_plugins.training.config_checks.os.access",
                            lambda path, mode: False if Path(path) == target
                            else real_access(path, mode))
    else:
        target.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as err:
            run(monkeypatch, CPT, cpt_args(workspace, f"output_dir={target}"))
    finally:
        target.chmod(0o700)
    assert err.value.key == "output_dir" and "not writable" in str(err.value)
    assert list(target.iterdir()) == []


def test_non_utf8_bytes_in_a_corpus_name_the_file_and_line(tmp_path):
    corpus = tmp_path / "train.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: byte 0xe9 at column 14 is not UTF-8"):
        read_texts([corpus])


def test_a_run_resumes_over_what_an_interrupted_write_left(workspace, monkeypatch):
    run_dir = workspace / "cpt"
    partial = run_dir / ".step_000004.partial"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "model.safetensors").write_bytes(b"half")
    leftovers = [run_dir / "tmpk2j4x1.tmp", run_dir / ".acadlm-q8z1.tmp",
                 run_dir / "step_000002" / ".acadlm-r5.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    run(monkeypatch, CPT, with_output(cpt_args(shared(workspace), "max_steps=3",
                                               "save_every_n_steps=3"), run_dir))
    assert not partial.exists()
    assert not any(p.exists() for p in leftovers)
    assert latest_checkpoint(run_dir).name == "step_000003"


def test_cleaning_keeps_complete_checkpoints_and_other_files(tmp_path):
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "step_000001" / "recipe_state.pt").write_bytes(b"x")
    (tmp_path / "notes.tmp.txt").write_text("mine")
    (tmp_path / ".step_000002.partial").mkdir()
    removed = clean_interrupted_writes(tmp_path)
    assert [p.name for p in removed] == [".step_000002.partial"]
    assert (tmp_path / "step_000001" / "recipe_state.pt").exists()
    assert (tmp_path / "notes.tmp.txt").exists()


def test_cleaning_removes_a_quantized_copy_killed_half_way(tmp_path):
    """A run killed while the torchao plugin wrote a checkpoint's quantized copy left its
    scratch folder (a config.json, maybe part of the weights) inside the step folder for good."""
    step = tmp_path / "step_000002"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    scratch = step / ".model-int8_weight_only.partial-2f800a2edf1f"
    scratch.mkdir()
    (scratch / "config.json").write_text("{}")
    (step / "model-int8_weight_only").mkdir()
    removed = clean_interrupted_writes(tmp_path)
    assert removed == [scratch] and not scratch.exists()
    assert sorted(p.name for p in step.iterdir()) == ["model", "model-int8_weight_only"]
