"""Benchmark scripts refuse flag values that would silently do something else, and accept the
forms their README shows."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture
def document_masking(monkeypatch):
    """The script with its measurements stubbed: only its argument handling runs."""
    module = _load("document_masking")
    measured: list[int] = []

    def fake_measure(method, lengths, cfg, path):
        measured.append(sum(lengths))
        return {"seconds": 1.0, "cpu_seconds": 1.0, "peak_bytes": 2**20}

    monkeypatch.setattr(module, "measure_in_fresh_process", fake_measure)
    monkeypatch.setattr(module, "max_difference", lambda a, b: 0.0)
    module.measured = measured
    return module


@pytest.mark.parametrize("argv", [["--lengths", "256,512"], ["--lengths", "256", "512"],
                                  ["--lengths", "256", "512,256"]])
def test_document_masking_takes_comma_or_space_separated_lengths(document_masking, argv, capsys):
    """benchmarks/README.md shows `--lengths 8192,16384`, which nargs='+' of int refused."""
    document_masking.main([*argv, "--device", "cpu"])
    assert sorted(set(document_masking.measured)) == [256, 512]
    out = capsys.readouterr().out
    assert "    256 " in out and "    512 " in out


@pytest.mark.parametrize("bad", ["8k", "0", "256,,512"])
def test_document_masking_refuses_a_length_that_is_not_a_positive_integer(document_masking,
                                                                         bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        document_masking.main(["--lengths", bad, "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--lengths" in capsys.readouterr().err
    assert document_masking.measured == []


@pytest.mark.parametrize("bad", ["0", "-3", "all"])
def test_packing_benchmark_refuses_a_limit_below_one(monkeypatch, bad, capsys):
    """`--limit-docs 0` used to read as "no limit" and pack the whole corpus."""
    module = _load("packing_vs_torchtune")

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(module, "load_tokenizer", no_run)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--limit-docs", bad])
    assert exit_.value.code == 2
    assert "--limit-docs" in capsys.readouterr().err


def test_packing_benchmark_limit_keeps_the_first_documents():
    module = _load("packing_vs_torchtune")
    assert len(module.stdlib_documents(3)) == 3
    assert module.positive_int("7") == 7
