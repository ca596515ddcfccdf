"""The eval recipe and the `acadlm-lm-eval` command: config checks, outputs, the report."""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_setup import (
    REPO_ROOT,
    run_tune_expecting_failure,
    run_tune_subprocess,
    write_tiny_model_dir,
)

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


def test_an_unknown_task_is_named_with_the_closest_names(tmp_path, tiny_model_dir) -> None:
    """A misspelt task stops the run at the config check (before the model loads) with the key,
    the closest names and where to list them, not lm-eval's KeyError from inside the run."""
    cfg = _cfg(tmp_path, tiny_model_dir, tasks=["acadlm_niah_single_1", "acadlm_niah_singel_2"])
    with pytest.raises(ConfigError, match=r"`tasks`: unknown task 'acadlm_niah_singel_2'.*"
                       r"Did you mean acadlm_niah_single_2.*acadlm-lm-eval ls tasks"):
        check_config(cfg)


def test_tasks_may_be_lm_evals_own_a_yaml_file_or_a_comma_separated_string(
        tmp_path, tiny_model_dir) -> None:
    from acadlm_plugins.eval_recipe import task_names

    check_config(_cfg(tmp_path, tiny_model_dir, tasks=["acadlm_niah_single_1", "arc_easy"]))
    own_task = tmp_path / "my_task.yaml"
    own_task.write_text("task: my_task\n")
    check_config(_cfg(tmp_path, tiny_model_dir, tasks=[str(own_task)]))
    cfg = _cfg(tmp_path, tiny_model_dir, tasks="acadlm_niah_single_1, acadlm_niah_single_2")
    check_config(cfg)
    assert task_names(cfg) == ["acadlm_niah_single_1", "acadlm_niah_single_2"]
    with pytest.raises(ConfigError, match=r"`tasks`: is 3, not a list of task names"):
        check_config(_cfg(tmp_path, tiny_model_dir, tasks=3))


def test_task_metadata_carries_lengths_samples_seed_and_extras(tmp_path, tiny_model_dir) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    metadata = task_metadata(cfg, {"pretrained": "x"})
    assert metadata["max_seq_lengths"] == [384, 512]
    assert metadata["num_samples"] == 2 and metadata["seed"] == 7
    assert metadata["pretrained"] == "x"
    assert metadata["haystack_path"].endswith("hay.txt")


@pytest.mark.parametrize(("value", "expected"), [
    ([384, 512], [384, 512]), (["1k"], [1024]), (1024, [1024]), ("1k,2k", [1024, 2048]),
    ([2048, "1k", 2048], [1024, 2048])])
def test_lengths_take_a_list_one_length_or_a_k_string(tmp_path, tiny_model_dir, value,
                                                      expected) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir, lengths=value)
    check_config(cfg)
    assert task_metadata(cfg, {})["max_seq_lengths"] == expected


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("lengths", ["1x"], "'1x' is not a length"), ("lengths", "1k,big", "'big' is not a length"),
    ("lengths", [100], "100 is too short"), ("lengths", [], "the list is empty"),
    ("lengths", {"a": 1024}, "not a list of token counts"),
    ("num_samples", "abc", "is 'abc', not an integer"), ("num_samples", 0, "below its minimum"),
    ("num_samples", 2.5, "not a whole number"), ("seed", "x", "is 'x', not an integer"),
    ("seed", None, "is null"), ("use_cache", True, "is True, not a path"),
    ("limit", "ten", "is 'ten', not a number"), ("limit", 0, "must be above 0"),
    ("limit", 2.5, "not a whole number"), ("num_fewshot", "two", "is 'two', not an integer"),
    ("num_fewshot", -1, "below its minimum")])
def test_a_bad_run_setting_is_named(tmp_path, tiny_model_dir, key, value, problem) -> None:
    """`lengths=[1x]` or `num_samples=abc` stops before anything loads with an error naming the
    key, not a bare ValueError from deep inside the run."""
    cfg = _cfg(tmp_path, tiny_model_dir, **{key: value})
    with pytest.raises(ConfigError, match=rf"`{key}`: .*{problem}"):
        check_config(cfg)


def _model(model_dir: Path, **args) -> dict:
    return {"name": "acadlm", "args": {"pretrained": str(model_dir), **args}}


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("apply_chat_template", "false", "is 'false', not true or false"),
    ("apply_chat_template", "true", "is 'true', not true or false"),
    ("apply_chat_template", "maybe", "is 'maybe', not true or false"),
    ("apply_chat_template", 1, "is 1, not true or false"),
    ("log_samples", "false", "is 'false', not true or false"),
    ("log_samples", None, "is None, not true or false"),
    ("task_metadata", "abc", "is 'abc', not a mapping"),
    ("task_metadata", [1, 2], "not a mapping"),
    ("output_dir", True, "is True, not a folder path"), ("output_dir", "", "not a folder path"),
    ("output_dir", ["a"], "not a folder path"),
    ("system_instruction", 42, "is 42, not text"),
    ("gen_kwargs", 3, "is 3, not key=value settings"),
    ("gen_kwargs", "max_gen_toks", "has 'max_gen_toks', not a key=value pair"),
    ("seed", 2**32, "above its maximum 4294967295"),
    ("model", "abc", "is 'abc', not a mapping"),
    ("model.args", {"name": "acadlm", "args": "abc"}, "is 'abc', not a mapping"),
    ("model.args.batch_size", "abc", "is 'abc', not a batch size"),
    ("model.args.batch_size", 0, "is 0, not a batch size"),
    ("model.args.batch_size", 1.5, "is 1.5, not a batch size"),
    ("model.args.batch_size", "auto:0", "not a batch size"),
    ("model.args.max_batch_size", "many", "is 'many', not an integer"),
    ("model.args.device", 0, "is 0, not a device name")])
def test_a_value_of_the_wrong_type_is_named(tmp_path, tiny_model_dir, key, value,
                                            problem) -> None:
    """A quoted "false" (which bool() reads as true), `task_metadata=abc`, a list for a path, a
    number for text: refused by the config check with the key, not read as something else or a
    traceback mid-run; nothing is written."""
    if key.startswith("model.args."):
        extra = {"model": _model(tiny_model_dir, **{key.rsplit(".", 1)[1]: value})}
    else:
        extra = {key.split(".")[0]: value}
    cfg = _cfg(tmp_path, tiny_model_dir, **extra)
    with pytest.raises(ConfigError, match=rf"`{key}`: .*{problem}"):
        check_config(cfg)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("value", [True, False])
def test_switches_take_yaml_booleans(tmp_path, tiny_model_dir, value) -> None:
    from acadlm_plugins.eval_recipe import lm_eval_settings

    cfg = _cfg(tmp_path, tiny_model_dir, apply_chat_template=value, log_samples=value)
    check_config(cfg)
    settings = lm_eval_settings(cfg)
    assert settings["apply_chat_template"] is value and settings["log_samples"] is value
    assert task_metadata(cfg, {}).get("apply_chat_template", False) is value


def test_model_args_the_recipe_reads_are_checked_and_normalised(tmp_path,
                                                                tiny_model_dir) -> None:
    from acadlm_plugins.eval_recipe import lm_eval_settings, model_settings

    for given, expected in [(4, 4), ("4", 4), ("auto", "auto"), ("auto:2", "auto:2"), (None, 1)]:
        cfg = _cfg(tmp_path, tiny_model_dir, model=_model(tiny_model_dir, batch_size=given))
        check_config(cfg)
        assert model_settings(cfg)["batch_size"] == expected
    cfg = _cfg(tmp_path, tiny_model_dir, gen_kwargs={"max_gen_toks": 8},
               model=_model(tiny_model_dir, max_batch_size="8", device="cpu"))
    check_config(cfg)
    assert model_settings(cfg) == {"batch_size": 1, "max_batch_size": 8, "device": "cpu"}
    assert lm_eval_settings(cfg)["gen_kwargs"] == {"max_gen_toks": 8}


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_and_kept(tmp_path,
                                                                       tiny_model_dir) -> None:
    """`output_dir=<a file>` was a FileExistsError once the run started; now the config check
    refuses it (and a path under a file, and a `use_cache` under a file) and the file stays."""
    from acadlm_plugins.eval_recipe import run_evaluation

    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    for value, problem in [(existing, "is a file, not a folder"),
                           (existing / "eval", r"\(a parent of .*\) is a file")]:
        with pytest.raises(ConfigError, match=rf"`output_dir`: .*{problem}"):
            run_evaluation(_cfg(tmp_path, tiny_model_dir, output_dir=str(value)))
    with pytest.raises(ConfigError, match=r"`use_cache`: .* is a file"):
        check_config(_cfg(tmp_path, tiny_model_dir, use_cache=str(existing / "lm_cache")))
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(("override", "key"), [
    ("apply_chat_template='false'", "apply_chat_template"),
    ("log_samples='false'", "log_samples"), ("task_metadata=abc", "task_metadata"),
    ("output_dir={file}", "output_dir")])
def test_tune_run_refuses_a_bad_value_in_one_line_and_writes_nothing(tmp_path, tiny_model_dir,
                                                                    override, key) -> None:
    """The reviewer's runs of the shipped config: each stops with `error: config `<key>`:`,
    no traceback, and neither output folder nor the file in the way is touched."""
    existing = tmp_path / "in_the_way.txt"
    existing.write_text("keep me")
    out = tmp_path / "eval"
    args = ["--config", str(REPO_ROOT / "configs/smollm2/eval_long_context.yaml"),
            f"output_dir={out}", f"model.args.pretrained={tiny_model_dir}",
            "tasks=[acadlm_niah_single_1]", "lengths=[384]", "num_samples=1",
            override.format(file=existing)]
    output = run_tune_expecting_failure("acadlm_plugins/eval_recipe", args, cwd=tmp_path,
                                        nproc=1)
    assert f"error: config `{key}`: " in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not out.exists() and existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_the_way.txt"]


@pytest.mark.parametrize(("limit", "expected"), [(None, None), (0.5, 0.5), (1, 1.0), (8, 8),
                                                ("16", 16)])
def test_limit_is_a_count_or_a_fraction(tmp_path, tiny_model_dir, limit, expected) -> None:
    from acadlm_plugins.eval_recipe import lm_eval_settings

    cfg = _cfg(tmp_path, tiny_model_dir, limit=limit)
    check_config(cfg)
    got = lm_eval_settings(cfg)["limit"]
    assert got == expected and type(got) is type(expected)


def test_use_cache_is_kept_apart_for_each_model(tmp_path, monkeypatch) -> None:
    """lm-eval keys cached answers by the request alone: with one `use_cache` for two models
    the second got the first one's answers (and its score). The recipe keys the cache by model:
    two models, two cache files; the same model again re-uses its own."""
    from acadlm_plugins import evaluation
    from acadlm_plugins.eval_recipe import run_evaluation

    # Our tasks only: indexing lm-eval's own thousands of tasks would take most of the time.
    monkeypatch.setattr(evaluation, "task_manager", partial(evaluation.task_manager,
                                                            include_defaults=False))

    (tmp_path / "hay.txt").write_text(HAYSTACK)
    first = write_tiny_model_dir(tmp_path / "first", seed=0)
    second = write_tiny_model_dir(tmp_path / "second", seed=1)
    cache = tmp_path / "cache" / "lm_cache"

    def answers(model_dir: Path, run: str) -> tuple[list, set[str]]:
        cfg = _cfg(tmp_path, model_dir, lengths=[384], num_samples=1, use_cache=str(cache),
                   output_dir=str(tmp_path / run), gen_kwargs="max_gen_toks=8")
        run_evaluation(cfg)
        rows = [json.loads(line) for line in
                (tmp_path / run / "samples_acadlm_niah_single_1.jsonl").open()]
        return [row["resps"] for row in rows], {p.name for p in cache.parent.iterdir()}

    first_answers, after_first = answers(first, "a")
    second_answers, after_second = answers(second, "b")
    assert second_answers != first_answers  # the second model answered for itself
    [first_file] = after_first
    assert len(after_second - after_first) == 1  # a cache file of its own
    assert first_file.startswith("lm_cache_") and first_file.endswith("_rank0.db")
    again, after_again = answers(first, "c")
    assert again == first_answers and after_again == after_second  # re-used, no new file
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["acadlm"]["use_cache"] + "_rank0.db" == str(cache.parent / first_file)


def test_the_cache_fingerprint_follows_the_models_files_and_args(tmp_path) -> None:
    from acadlm_plugins.evaluation.answer_cache import model_fingerprint
    from acadlm_plugins.evaluation.cli import key_cache_by_model

    folder = write_tiny_model_dir(tmp_path / "m")
    args = {"pretrained": str(folder), "dtype": "float32"}
    base = model_fingerprint("acadlm", args, "cpu")
    assert model_fingerprint("acadlm", args | {"batch_size": 8}, "cpu") == base
    assert model_fingerprint("acadlm", {**args, "pretrained": str(tmp_path / "." / "m")},
                             "cpu") == base  # the same folder, spelled otherwise
    assert len({base, model_fingerprint("hf", args, "cpu"),
                model_fingerprint("acadlm", args | {"dtype": "bfloat16"}, "cpu"),
                model_fingerprint("acadlm", args, "cuda")}) == 4
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-6}))
    changed_config = model_fingerprint("acadlm", args, "cpu")
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = model_fingerprint("acadlm", args, "cpu")
    assert len({base, changed_config, touched}) == 3
    # other weights copied over with the old size and time (cp -p, rsync -t) change it too
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert model_fingerprint("acadlm", args, "cpu") != touched
    # `acadlm-lm-eval --use_cache` gets the same keyed path from lm-eval's model_args string.
    kwargs = key_cache_by_model({"model": "acadlm", "model_args": f"pretrained={folder},"
                                 "dtype=float32", "device": "cpu", "use_cache": "c/lm"})
    assert kwargs["use_cache"] == f"c/lm_{model_fingerprint('acadlm', args, 'cpu')}"
    assert key_cache_by_model({"model": "acadlm", "use_cache": None})["use_cache"] is None


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


def _lm_eval_cli(capsys, *argv) -> tuple[int, str]:
    """``acadlm-lm-eval *argv``: its exit status and what it wrote to stderr."""
    from acadlm_plugins.evaluation.cli import main

    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def test_acadlm_lm_eval_user_errors_are_one_line_with_exit_2(tmp_path, tiny_model_dir, capsys,
                                                            monkeypatch) -> None:
    """A missing model folder or data file, a misspelt task, no --device on a machine without
    CUDA: `acadlm-lm-eval: error: ...` naming the option and the fix, exit status 2, and no
    traceback (ACADLM_TRACEBACK=1 brings it back)."""
    import lm_eval.tasks
    import torch

    class OurTasksOnly(lm_eval.tasks.TaskManager):
        """Indexing lm-eval's own thousands of tasks would take most of the time."""

        def __init__(self, *args, include_defaults: bool = True, **kwargs) -> None:
            super().__init__(*args, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OurTasksOnly)
    monkeypatch.delenv("ACADLM_TRACEBACK", raising=False)
    # lm-eval's log handler keeps the stderr of the first test that ran its CLI (a capture
    # closed since); the "--- Logging error ---" tracebacks that writing to it gives are not
    # the ones this test looks for.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    (tmp_path / "hay.txt").write_text(HAYSTACK)
    metadata = json.dumps({"max_seq_lengths": [384], "num_samples": 1,
                           "haystack_path": str(tmp_path / "hay.txt")})
    run = ["run", "--model", "acadlm", "--limit", "1"]

    def refused(*argv: object) -> str:
        code, err = _lm_eval_cli(capsys, *run, *argv)
        assert code == 2, err
        assert "Traceback" not in err
        assert "acadlm-lm-eval: error: config `" in err and "ACADLM_TRACEBACK=1" in err
        return err

    err = refused("--model_args", f"pretrained={tmp_path / 'nope'}", "--device", "cpu",
                  "--tasks", "acadlm_niah_single_2", "--metadata", metadata)
    assert "`--model_args pretrained`" in err and "no such local file or folder" in err
    err = refused("--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
                  "--tasks", "acadlm_rag", "--metadata",
                  json.dumps({"max_seq_lengths": [384], "rag_path": str(tmp_path / "no.jsonl")}))
    assert "rag_path`" in err and "does not exist" in err
    err = refused("--model_args", f"pretrained={tiny_model_dir}", "--device", "cpu",
                  "--tasks", "acadlm_niah_singel_2", "--metadata", metadata)
    assert "`--tasks`: unknown task 'acadlm_niah_singel_2'" in err
    assert "Did you mean acadlm_niah_single_2" in err and "`acadlm-lm-eval ls tasks`" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = refused("--model_args", f"pretrained={tiny_model_dir}", "--tasks",
                  "acadlm_niah_single_2", "--metadata", metadata)
    assert "`--device`: was not given, so lm-eval used its default 'cuda:0'" in err
    assert "Fix: pass --device cpu." in err

    monkeypatch.setenv("ACADLM_TRACEBACK", "1")
    with pytest.raises(ConfigError, match=r"`--model_args pretrained`"):
        _lm_eval_cli(capsys, *run, "--model_args", f"pretrained={tmp_path / 'nope'}",
                     "--device", "cpu", "--tasks", "acadlm_niah_single_2", "--metadata",
                     metadata)
