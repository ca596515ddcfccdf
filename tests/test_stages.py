"""The pipelines' stage runner: a failed stage's exit code and the stage's own name."""

from __future__ import annotations

import sys

import pytest

from acadlm_plugins.stages import run_stage, stage_overrides


def test_a_failed_stage_stops_the_pipeline_with_its_exit_code_and_name(capsys):
    """A recipe's user error exits 2; the pipeline passes the 2 on (it used to exit 1) and
    names the stage by its `--set` name, so stage1 and stage2 of one recipe differ."""
    with pytest.raises(SystemExit) as stop:
        run_stage([sys.executable, "-c", "import sys; sys.exit(2)"], stage="stage2")
    assert stop.value.code == 2
    assert "stage stage2 failed with exit code 2" in capsys.readouterr().err
    run_stage([sys.executable, "-c", "pass"], stage="stage1")  # success: no exit


def test_a_malformed_set_exits_2_with_an_error_line(capsys):
    with pytest.raises(SystemExit) as stop:
        stage_overrides(["judge:x"], ["judge", "rater"], example="rater:margin=0.1")
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: --set 'judge:x': expected STAGE:key=value")
    assert stage_overrides(["judge:a.b=1", "rater:~c"], ["judge", "rater"], example="x") == {
        "judge": ["a.b=1"], "rater": ["~c"]}
