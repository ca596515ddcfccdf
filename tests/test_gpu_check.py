"""benchmarks/gpu_check.py on a machine without a GPU: it refuses politely, its FLOP and MFU
arithmetic, its table, its time guard and its per-row isolation, and (``--smoke``) that every
row's code still runs against the package on tiny shapes, since the GPU it is meant for is
lent rarely."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from recipe_runs import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT, "gpu_check_under_test")


def _run_script(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=SCRIPT.parents[1], check=False)


def test_without_cuda_says_so_and_runs_nothing(tmp_path):
    result = _run_script("--json", str(tmp_path / "result.json"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "CUDA is not available" in lines[0] and "nothing was run" in lines[0]
    assert not (tmp_path / "result.json").exists()


def test_peak_flops_by_gpu_name(gpu_check):
    assert gpu_check.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_bf16_flops("NVIDIA L40S") == 362e12  # not the L4's
    assert gpu_check.peak_bf16_flops("NVIDIA L4") == 121e12
    assert gpu_check.peak_bf16_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert gpu_check.peak_bf16_flops("NVIDIA Quadro Imaginary 9000") is None


def test_step_flops_and_mfu_hand_computed(gpu_check):
    # 6 * 1e9 params * 1000 tokens, plus 6 * 2 layers * 3 heads * 4 dims * (2^2 + 3^2).
    flops = gpu_check.step_flops(1_000_000_000, 1000, layers=2, heads=3, head_dim=4,
                                 document_lengths=[2, 3])
    assert flops == 6e12 + 1872
    # SmolLM2-135M, one 4096-token document: 6 * 134,515,008 * 4096 + 6 * 30 * 9 * 64 * 4096^2.
    smollm2 = gpu_check.step_flops(134_515_008, 4096, layers=30, heads=9, head_dim=64,
                                   document_lengths=[4096])
    assert smollm2 == 3_305_840_836_608 + 1_739_461_754_880
    # Half an H200's 989 TFLOP/s; a quarter of an L4's 121 TFLOP/s over two seconds.
    assert gpu_check.mfu_text(494.5e12, 1.0, "NVIDIA H200") == "50.0%"
    assert gpu_check.mfu_text(60.5e12, 2.0, "NVIDIA L4") == "25.0%"
    assert gpu_check.mfu_text(1e12, 1.0, "Some Unknown GPU") == "n/a (unknown peak)"


def _cells(line: str) -> list[str]:
    """The cells of one markdown row (an escaped pipe stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_table_has_the_columns_and_a_failed_row(gpu_check):
    failed = gpu_check.failure_text(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"))
    rows = [
        {"id": "1", "check": "prune step", "result": "1.070x", "details": "4 x 4096 | bf16"},
        {"id": "2", "check": "long context", "result": failed},
        {"id": "5a", "check": "MFU", "result": "n/a (unknown peak)", "details": "x"},
    ]
    lines = gpu_check.format_table(rows).splitlines()
    assert _cells(lines[0]) == ["#", "check", "result", "details"]
    assert set(lines[1].replace("|", "")) == {"-"} and lines[1].count("|") == 5
    assert len(lines) == 2 + len(rows)
    body = [_cells(line) for line in lines[2:]]
    assert all(len(cells) == 4 for cells in body)
    assert body[0] == ["1", "prune step", "1.070x", "4 x 4096 \\| bf16"]
    assert body[1] == ["2", "long context", "failed: RuntimeError: CUDA out of memory.", ""]
    assert body[2][0] == "5a" and body[2][2] == "n/a (unknown peak)"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_guard_skips_the_rows_once_the_budget_is_spent(gpu_check):
    clock = FakeClock()
    guard = gpu_check.TimeGuard(480, clock=clock)

    def takes(seconds):
        def run(context):
            clock.now += seconds
            return {"result": f"took {seconds}"}
        return run

    checks = [gpu_check.Check("1", "first", takes(200), estimate_s=100),
              gpu_check.Check("2", "second", takes(200), estimate_s=100),
              gpu_check.Check("3", "third", takes(200), estimate_s=100),
              gpu_check.Check("5a", "free", takes(0), estimate_s=0),
              gpu_check.Check("4", "fourth", takes(10), estimate_s=100)]
    rows = gpu_check.run_checks(checks, None, guard)
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "ok", "skipped"]
    assert rows[1]["seconds"] == 200
    assert rows[2]["result"] == ("skipped: time guard (400 s of the 480 s budget used, this "
                                 "check takes up to 100 s)")
    assert clock.now == 1400.0  # the skipped checks never ran


def test_a_failing_or_missing_row_does_not_stop_the_others(gpu_check):
    calls = []

    def boom(context):
        raise ValueError("boom\nsecond line")

    def torchao_missing(context):
        try:
            raise ModuleNotFoundError("No module named 'torchao'", name="torchao")
        except ModuleNotFoundError as err:
            raise ImportError("torchao not installed") from err

    checks = [gpu_check.Check("1", "raises", boom, 1),
              gpu_check.Check("2", "needs a package", lambda c: {"result": "ran"}, 1,
                              needs=("surely_not_an_installed_module_xyz",)),
              gpu_check.Check("3", "import fails inside", torchao_missing, 1),
              gpu_check.Check("4", "fine", lambda c: {"result": "fine", "details": "d"}, 1)]
    rows = gpu_check.run_checks(checks, None, gpu_check.TimeGuard(480),
                                after_each=lambda: calls.append(1))
    assert [r["result"] for r in rows] == [
        "failed: ValueError: boom", "not run: surely_not_an_installed_module_xyz not installed",
        "not run: torchao not installed", "fine"]
    assert [r["status"] for r in rows] == ["failed", "not run", "not run", "ok"]
    assert len(calls) == 3  # after every check that ran


def test_smoke_run_goes_through_every_row_on_cpu(tmp_path):
    """The rows' code against the package, on tiny shapes (the figures mean nothing)."""
    pytest.importorskip("torchtune")
    pytest.importorskip("lm_eval")
    result = _run_script("--smoke", "--json", str(tmp_path / "smoke.json"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    statuses = {row["id"]: (row["status"], row["result"]) for row in report["rows"]}
    assert [row["id"] for row in report["rows"]] == ["1", "2", "3", "4", "5a", "5b", "6"]
    assert statuses["3"] == ("skipped", "skipped: needs sm89+, found no GPU")
    for row_id in ("1", "2", "4", "5a", "5b", "6"):
        assert statuses[row_id][0] == "ok", statuses[row_id]
    # row 6 compares runs from the same weights (the row checks that they start equal): fp32
    # against itself is 0, and the fp32-weight mixed run is far closer to it than pure bf16
    off = next(row for row in report["rows"] if row["id"] == "6")["values"]["off_fp32"]
    assert off["fp32"] == 0 and off["mixed"] < 0.5 * off["bf16"] and off["bf16"] > 0.5
    assert "| # | check | result | details |" in result.stdout


def test_unknown_row_ids_are_refused_with_the_valid_ones(gpu_check, capsys):
    """`--smoke --rows 99` used to select nothing and exit 0 with an empty table."""
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(["--smoke", "--rows", "1,99"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown row id(s) '99'" in err
    assert f"valid ids: {', '.join(c.id for c in gpu_check.CHECKS)}" in err
    assert gpu_check.parse_args(["--rows", "1, 5a"]).rows == "1, 5a"
