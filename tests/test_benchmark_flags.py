"""Benchmark scripts refuse flag values that would silently do something else, and accept the
forms their README shows."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipe_runs import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return load_script(BENCHMARKS / f"{name}.py", f"{name}_under_test")


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
    from acadlm_plugins.cli_types import int_at_least

    assert int_at_least(1)("7") == 7


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_packing_benchmark_refuses_fewer_than_one_repeat(monkeypatch, bad, capsys):
    module = _load("packing_vs_torchtune")
    monkeypatch.setattr(module, "load_tokenizer", lambda *a, **k: pytest.fail("it started"))
    with pytest.raises(SystemExit) as exit_:
        module.main(["--repeats", bad])
    assert exit_.value.code == 2
    assert "--repeats" in capsys.readouterr().err


def _packing_run(tokens_in=1000, tt_kept=700, truncated=300, wall=(2.0, 1.0, 1.5)):
    counts = {"packs": 4, "tokens_kept": tokens_in, "positions": 1024}
    common = {"peak_rss_delta_mib": 10.0, "exact_peak": True}
    return {"torchtune": {"packs": 3, "tokens_kept": tt_kept, "positions": 768,
                          "wall_s": wall[0], **common},
            "ours": {**counts, "tokens_in": tokens_in, "wall_s": wall[1], "tokenize_s": 0.9,
                     "pack_s": 0.1, "truncated_docs": 1, "truncated_tokens": truncated,
                     **common},
            "streaming": {**counts, "tokens_in": tokens_in, "tokenize_s": 1.0, "pack_s": 0.0,
                          "read_s": wall[2] - 1.0, **common}}


def test_packing_benchmark_reports_medians_of_its_repeats():
    module = _load("packing_vs_torchtune")
    runs = [_packing_run(wall=(2.0, 1.0, 1.5)), _packing_run(wall=(2.0, 2.0, 2.0)),
            _packing_run(wall=(4.0, 1.0, 1.2))]
    report = module.format_report(runs, documents=5, max_seq_len=256, source="test")
    assert module.accounting_problems(runs, 256) == []
    assert "median of 3 repeat(s)" in report
    # per-repeat ours / torchtune 0.5, 1.0, 0.25: the median ratio is 0.5 (not 4/8 of sums)
    assert [line for line in report.splitlines()
            if line.startswith("wall time, every pack built ")][-1].split()[-2] == "0.500x"
    assert "(0.250x)" in report


@pytest.mark.parametrize("broken, expected", [
    ({"tt_kept": 650}, "did not tokenize identically"),
    ({"truncated": 200, "tt_kept": 800}, None),  # consistent in itself, not with repeat 1
])
def test_packing_benchmark_checks_the_token_accounting(broken, expected):
    module = _load("packing_vs_torchtune")
    problems = module.accounting_problems([_packing_run(), _packing_run(**broken)], 256)
    if expected is None:
        assert problems == [f"repeat 2: {p} counted differently from repeat 1"
                            for p in ("torchtune",)]
    else:
        assert any(expected in p for p in problems)


def test_packing_benchmark_fails_when_streaming_packs_differently():
    module = _load("packing_vs_torchtune")
    run = _packing_run()
    run["streaming"]["packs"] = 5
    assert module.accounting_problems([run], 256) == [
        "repeat 1: the streaming pipeline tokenized or packed differently from ours"]


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--held-out", "0"], ["--steps", "x"]])
def test_low_bit_optimizers_refuses_too_few_steps_or_held_out_windows(argv, capsys):
    """--steps 1 divided by zero (s/step excludes the first step); --held-out 0 averaged an
    empty list."""
    module = _load("low_bit_optimizers")
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv)
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert module.parse_args(["--steps", "2", "--held-out", "1"]).steps == 2


@pytest.mark.parametrize("argv", [["--decode-tokens", "1"], ["--repeats", "0"]])
def test_quantized_export_refuses_settings_that_measure_nothing(argv, capsys):
    module = _load("quantized_export")
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv)
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_quantized_export_flags_a_round_whose_decode_time_is_not_positive(monkeypatch):
    """Noise that makes the whole generation no slower than the 1-token one printed up to
    3e10 tokens/s; such a round now has no decode figure and is left out of the median."""
    module = _load("quantized_export")

    class FakeLM:
        def _hidden(self, tokens):
            return tokens

    times = iter([0.5, 0.4, 0.5, 0.9])  # (one, whole) per round: 0.5 / 0.4, then 0.5 / 0.9
    monkeypatch.setattr(module, "generation_seconds", lambda lm, context, n: next(times))
    prompt = list(range(128))
    flagged = module.time_model(FakeLM(), prompt, 9)
    measured = module.time_model(FakeLM(), prompt, 9)
    assert flagged[1] is None
    assert measured[1] == pytest.approx(8 / 0.4)
    assert module.median_or_none([flagged[1], measured[1]]) == pytest.approx(20.0)
    assert module.median_or_none([None, None]) is None
    assert module.ratio_cell(None, 2.0, 7) == "      -"


def test_document_mask_build_exits_1_when_the_masks_differ(monkeypatch, capsys):
    import torch

    module = _load("document_mask_build")

    def fake_build(method, length, out, repeats):
        if out != "-":
            if method.startswith("collate"):
                torch.save({"tokens": torch.zeros(2), "labels": torch.zeros(2),
                            "input_pos": torch.zeros(2)}, out)
            else:  # torch's mask and ours differ in one element
                torch.save(torch.tensor([True, method == "ours"]), out)
        return {"median_s": 0.5, "median_cpu_s": 0.5, "grown_mib": 1.0, "setup_s": 0.1,
                "batch_bytes": 10, "mask_bytes": 4}

    monkeypatch.setattr(module, "build", fake_build)
    assert module.main(["--lengths", "256", "--ours-only", "", "--collate", "256"]) == 1
    out = capsys.readouterr()
    assert "| 256 | 0.500, 1 | 0.500, 1.0 | 1x | 1x | False |" in out.out
    assert "MISMATCH" in out.err
    monkeypatch.setattr(module, "build", lambda *a: pytest.fail("it started"))
    with pytest.raises(SystemExit) as exit_:
        module.main(["--repeats", "0"])
    assert exit_.value.code == 2


def test_eval_adapter_benchmark_fails_when_the_answers_differ(capsys):
    module = _load("eval_adapter_vs_hf")
    same = {("acadlm", "loglikelihood"): [(-1.0, True), (-1.0008, False), (-3.0, False),
                                          (-4.0, False)],
            ("hf", "loglikelihood"): [(-1.0001, True), (-1.0008, False), (-3.0, False),
                                      (-4.0, False)],
            ("acadlm", "generate_until"): ["a", "b"], ("acadlm-tt", "generate_until"): ["a", "b"],
            ("hf", "generate_until"): ["a", "b"]}
    kinds = ["loglikelihood", "generate_until"]
    assert module.agreement(kinds, same)
    assert "(ok)" in capsys.readouterr().out
    for key, value in [(("hf", "generate_until"), ["a", "c"]),
                       (("acadlm-tt", "generate_until"), ["b", "b"]),
                       (("hf", "loglikelihood"), [(-1.01, True), (-1.0008, False),
                                                  (-3.0, False), (-4.0, False)]),
                       # every difference within tolerance, but another choice picked
                       (("hf", "loglikelihood"), [(-1.0005, False), (-1.0004, True),
                                                  (-3.0, False), (-4.0, False)])]:
        assert not module.agreement(kinds, {**same, key: value})
        assert "(MISMATCH)" in capsys.readouterr().out


def test_distillation_memory_runs_every_setting_and_refuses_too_few_tokens(capsys):
    """Each setting computes a finite loss and its backward on SmolLM2's shapes (16 tokens
    here); fewer than 2 tokens leave nothing to predict and are refused."""
    module = _load("distillation_memory")
    for setting in module.SETTINGS:  # measure() asserts a finite loss and a student gradient
        row = module.measure(setting, 16, "float32")
        assert row["setting"] == setting
        assert row["logits_mb"] == 16 * module.VOCAB * 4 / 2**20
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--tokens", "1"])
    assert exit_info.value.code == 2 and "--tokens must be at least 2" in capsys.readouterr().err
