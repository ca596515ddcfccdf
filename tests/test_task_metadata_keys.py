"""The ``--metadata`` keys of our tasks: a key no task of ours reads is warned about once, with
the closest known key; the keys lm-eval merges in (the model args, the YAML's ``version``,
``config_source``) are not; a value of the wrong form for a key we read is an error naming the
task and the key, even for a task that does not use it (``num_shots`` on ``acadlm_icl``).

Tasks are built through lm-eval's ``TaskManager`` (as ``lm_eval --metadata`` builds them) at one
short length with a tokenizer trained on the spot and a small local ICL file.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from helmet_fixtures import icl_rows, write_jsonl, write_tokenizer_dir
from lm_eval.utils import simple_parse_args_string

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation import TASKS_DIR, task_base, task_manager

#: The registry of settings (imported by our task modules); its logger.
REGISTRY = LOGGER = "acadlm_plugins.evaluation.task_settings"
EVALUATION_DIR = Path(task_base.__file__).parent
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("metadata_keys")
    return {"pretrained": str(write_tokenizer_dir(root / "model")), "max_seq_lengths": [2048],
            "num_samples": 1, "icl_path": str(write_jsonl(root / "icl.jsonl", icl_rows()))}


@pytest.fixture
def warnings_log(monkeypatch: pytest.MonkeyPatch,
                 caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog on the registry's logger, with no key warned about yet in this process (and our
    package's log lines reaching the root logger even after a recipe routed them)."""
    registry = sys.modules.get(REGISTRY)  # absent before it existed: the tests then fail
    if registry is not None:
        monkeypatch.setattr(registry, "_WARNED", set())
    monkeypatch.setattr(logging.getLogger("acadlm_plugins"), "propagate", True)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return caplog


def build(metadata: dict[str, Any], *tasks: str) -> dict[str, Any]:
    """``tasks`` built by lm-eval from ``metadata``, by name."""
    return dict(task_manager(metadata, include_defaults=False).load(list(tasks))["tasks"])


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


def test_typo_key_is_warned_once_with_the_closest_key(meta: dict[str, Any],
                                                      warnings_log: pytest.LogCaptureFixture):
    """`num_sample` (for `num_samples`) leaves the default of 20 samples in force: one WARNING
    names the key and suggests `num_samples`, for the whole process however many tasks see it."""
    build({**meta, "num_sample": 2}, "acadlm_icl", "acadlm_json_kv")
    build({**meta, "num_sample": 2}, "acadlm_icl")
    found = warnings(warnings_log)
    assert found == [("metadata key `num_sample` is not read by any acadlm task; did you mean "
                      "`num_samples`? (see docs/evaluation.md; ignore this for a key meant for "
                      "another project's task)")]
    assert all(r.levelno == logging.WARNING for r in warnings_log.records if r.name == LOGGER)


def test_retired_and_far_keys(meta: dict[str, Any], warnings_log: pytest.LogCaptureFixture):
    """A key of the former merged QA task names its replacements; a key close to none of ours
    gets no suggestion."""
    build({**meta, "qa_path": "/data/squad.jsonl", "my_other_project_flag": True}, "acadlm_icl")
    found = warnings(warnings_log)
    assert len(found) == 2
    assert found[0].startswith("metadata key `qa_path` is not read by any acadlm task any more; "
                               "use `squad_path` / `hotpotqa_path`")
    assert found[1].startswith("metadata key `my_other_project_flag` is not read by any acadlm "
                               "task (see docs/evaluation.md;")


def test_keys_lm_eval_merges_in_are_not_warned_about(meta: dict[str, Any],
                                                     warnings_log: pytest.LogCaptureFixture):
    """lm-eval's CLI merges the model args (`--model_args`, as its parser reads them) under
    `--metadata`, and its task factory adds the YAML's `version` and `config_source`: none is
    warned about, whichever model the args are for (ours, `hf`, vLLM, an API)."""
    model_args = simple_parse_args_string(
        f"pretrained={meta['pretrained']},dtype=bfloat16,batch_size=4,max_batch_size=8,"
        "device=cpu,trust_remote_code=True,revision=main,parallelize=False,prefill_chunk=512,"
        "kv_cache=True,max_gen_toks=64,max_length=4096,gpu_memory_utilization=0.8,"
        "attn_implementation=sdpa,"
        "tensor_parallel_size=1,base_url=http://localhost:8000/v1,num_concurrent=2,"
        "add_bos_token=True")
    metadata = model_args | {key: value for key, value in meta.items() if key != "pretrained"}
    task = build(metadata, "acadlm_icl")["acadlm_icl"]
    assert {"version", "config_source", "dtype", "batch_size"} <= set(task.config.metadata)
    assert warnings(warnings_log) == []


def test_num_shots_of_the_wrong_type_on_icl_is_an_error(meta: dict[str, Any]):
    """ICL fills its prompts with demonstrations and never reads `num_shots`, but the metadata
    is the run's: "abc" is refused naming the task and the key, as HELMET's other tasks do."""
    with pytest.raises(ConfigError, match=re.escape("config `acadlm_icl: num_shots`: 'abc' is "
                                                    "not an integer.")):
        build({**meta, "num_shots": "abc"}, "acadlm_icl")
    with pytest.raises(ConfigError, match=re.escape("config `acadlm_json_kv: num_shots`: -1 is "
                                                    "below the minimum of 0.")):
        build({**meta, "num_shots": -1}, "acadlm_json_kv")


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("rag_path", 5, "5 is not a path."),
    ("length_budget", "tokens", "'tokens' is not a length budget."),
    ("helmet_chat_template", "some", "'some' is not a choice."),
    ("judge", "gpt-4o", "'gpt-4o' is not a mapping."),
    ("depth", "middle", "'middle' is not a number."),
])
def test_wrong_values_of_keys_a_task_does_not_read(meta: dict[str, Any], key: str, value: Any,
                                                   problem: str):
    """Every key we read is checked by every task of ours, by the reader's own check where there
    is one (a path only for its form: the task reading it looks it up)."""
    with pytest.raises(ConfigError, match=re.escape(f"config `acadlm_icl: {key}`: {problem}")):
        build({**meta, key: value}, "acadlm_icl")


def test_check_runs_for_direct_dataset_calls(meta: dict[str, Any]):
    """The dataset functions check the metadata too (tests and Python callers use them)."""
    from acadlm_plugins.evaluation import helmet

    with pytest.raises(ConfigError, match=re.escape("`acadlm_icl: num_shots`")):
        helmet.icl_dataset("acadlm_icl", {**meta, "num_shots": "abc"})


# ------------------------------------------------------------------ the registry cannot drift


@pytest.fixture
def task_settings() -> Any:
    return importlib.import_module(REGISTRY)


#: How our modules read a metadata key by its name.
READ_PATTERNS = (
    r"metadata\.get\(\s*\"(\w+)\"", r"metadata\[\s*\"(\w+)\"\s*\]",
    r"_setting\(\s*metadata,\s*\"(\w+)\"", r"data_path\(\s*metadata,\s*\"(\w+)\"",
    r"task_error\(\s*\w+,\s*\"(\w+)\"",
)


def test_every_key_read_in_the_source_is_declared(task_settings: Any):
    """A key read by name anywhere in our evaluation code (or named in a task's error) is a
    declared setting, a retired one or lm-eval's, so that the warning never flags a key we read."""
    known = set(task_settings.known_settings()) | set(task_settings._RETIRED) | set(
        task_settings.LM_EVAL_KEYS)
    read = {(path.name, key) for path in EVALUATION_DIR.glob("*.py")
            for pattern in READ_PATTERNS
            for key in re.findall(pattern, path.read_text(encoding="utf-8"))}
    assert read, "the patterns found nothing: has the source changed its idiom?"
    assert {(name, key) for name, key in read if key not in known} == set()


def test_every_declaring_module_is_imported_before_the_registry_is_read(task_settings: Any):
    """A module that declares settings is one the registry imports first (else a run without
    its tasks would warn about its keys)."""
    declaring = {path.stem for path in EVALUATION_DIR.glob("*.py")
                 if "declare_settings(" in path.read_text(encoding="utf-8")}
    assert declaring - {"task_settings"} == set(task_settings.READER_MODULES)


def test_task_yaml_metadata_holds_only_lm_eval_keys(task_settings: Any):
    """Our YAMLs' own metadata blocks (merged under --metadata) hold lm-eval's keys only."""
    yaml_keys = set()
    for path in TASKS_DIR.rglob("*"):
        if path.suffix == ".yaml" or path.name.endswith("_yaml"):
            text = path.read_text(encoding="utf-8")
            block = re.search(r"^metadata:\n((?:[ #].*\n?|\n)*)", text, re.MULTILINE)
            if block:
                yaml_keys |= set(re.findall(r"^  (\w+):", block.group(1), re.MULTILINE))
    assert yaml_keys and yaml_keys <= task_settings.LM_EVAL_KEYS


def test_every_declared_key_is_documented(task_settings: Any):
    """The warning points at the docs: every key we read is named there."""
    text = (DOCS / "evaluation.md").read_text() + (DOCS / "evaluation_data.md").read_text()
    missing = [key for key in task_settings.known_settings() if f"`{key}`" not in text]
    assert missing == []
