"""lm-eval's `acadlm` model on the embedded SmolLM2-135M-Instruct against lm-eval's own `hf`
model on the same folder: lm-eval's built-in tasks of every output type (multiple choice,
loglikelihood, rolling loglikelihood, greedy generation with stop sequences), on small local
files with their datasets' schemas, give the same scores and the same generations; and
grouped-query decoding (9 query heads on 3 KV heads) gives torchtune's own logits."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_lm_adapter import decoding_logits, sdpa_key_heads
from tiny_setup import write_builtin_task_configs

from acadlm_plugins.defaults import require_default_model
from acadlm_plugins.evaluation.registry import register_lm_eval_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(require_default_model())


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    return write_builtin_task_configs(tmp_path_factory.mktemp("builtin_tasks"))


def test_grouped_query_decoding_equals_torchtunes_attention(smollm2, monkeypatch):
    """Left-padded prompts prefilled into the KV cache, then 8 decoding steps: SmolLM2's 3 KV
    heads are read un-repeated by its 9 query heads, and the fp32 logits are torchtune's."""
    from acadlm_plugins.evaluation.lm_adapter import AcadLM

    lm = AcadLM(pretrained=smollm2, batch_size=4)
    prompts = [lm.tok_encode(text) for text in (
        "The capital of France is Paris, and the capital of Italy is",
        "def add(a, b):\n    return", "1, 2, 3, 5, 8,")]
    fed = [lm.tok_encode(" Rome. The river that runs through it")[:8] for _ in prompts]
    reference = decoding_logits(lm.model, prompts, fed, grouped=False)
    seen = sdpa_key_heads(monkeypatch)
    grouped = decoding_logits(lm.model, prompts, fed, grouped=True)
    assert (grouped - reference).abs().max() < 1e-5
    assert {(q, k) for q, k, length in seen if length == 1} == {(9, 3)}
    assert reference.abs().max() > 1.0  # real logits, not a degenerate comparison


def _evaluate(model: str, model_args: dict, tasks: list[Path], **kwargs) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    register_lm_eval_model()
    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=[str(t) for t in tasks], log_samples=True,
                                   task_manager=TaskManager(include_defaults=False),
                                   bootstrap_iters=0, **kwargs)


def _both(smollm2: str, tasks: list[Path], **kwargs) -> tuple[dict, dict]:
    ours = _evaluate("acadlm", {"pretrained": smollm2, "batch_size": 4}, tasks, **kwargs)
    hf = _evaluate("hf", {"pretrained": smollm2, "batch_size": 4, "device": "cpu",
                          "dtype": "float32"}, tasks, **kwargs)
    return ours, hf


def _scores(samples: list[dict]) -> list[float]:
    return [resp[0][0] if isinstance(resp[0], (list, tuple)) else resp[0]
            for sample in samples for resp in sample["resps"]]


def test_builtin_tasks_score_identically_to_lm_evals_hf_model(smollm2, tasks):
    """1-shot arc_easy (multiple choice), lambada_openai (loglikelihood), wikitext (rolling)
    and gsm8k (generation until its stop sequences): same metrics, same per-request scores
    and word-for-word the same generations."""
    ours, hf = _both(smollm2, list(tasks.values()), num_fewshot=1,
                     gen_kwargs={"max_gen_toks": 32})
    assert ours["results"]["arc_easy"]["acc,none"] == hf["results"]["arc_easy"]["acc,none"]
    assert ours["results"]["arc_easy"]["acc_norm,none"] == hf["results"]["arc_easy"][
        "acc_norm,none"]
    assert ours["results"]["lambada_openai"]["acc,none"] == hf["results"]["lambada_openai"][
        "acc,none"]
    for task in ("arc_easy", "lambada_openai", "wikitext"):
        assert _scores(ours["samples"][task]) == pytest.approx(_scores(hf["samples"][task]),
                                                               abs=2e-3, rel=1e-5), task
    assert ours["results"]["wikitext"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["wikitext"]["word_perplexity,none"], rel=1e-4)
    ours_text = [s["resps"][0][0] for s in ours["samples"]["gsm8k"]]
    assert ours_text == [s["resps"][0][0] for s in hf["samples"]["gsm8k"]]
    assert any(text.strip() for text in ours_text)
    assert not any("Question:" in text for text in ours_text)  # cut at the task's stop sequence
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["results"]["gsm8k"][metric] == hf["results"]["gsm8k"][metric]
    # A trained model does better than chance on the easy questions.
    assert ours["results"]["arc_easy"]["acc,none"] >= 0.5


def test_chat_template_runs_identically_to_lm_evals_hf_model(smollm2, tasks):
    """`--apply_chat_template`: the same rendered prompts (SmolLM2's own template) and the
    same answers from both models."""
    ours, hf = _both(smollm2, [tasks["arc_easy"], tasks["gsm8k"]], apply_chat_template=True,
                     num_fewshot=1, gen_kwargs={"max_gen_toks": 24}, limit=2)
    for task in ("arc_easy", "gsm8k"):
        ours_args = [s["arguments"] for s in ours["samples"][task]]
        assert ours_args == [s["arguments"] for s in hf["samples"][task]]
        assert ours_args[0][0][0].startswith("<|im_start|>system\n")
    assert ours["results"]["arc_easy"]["acc,none"] == hf["results"]["arc_easy"]["acc,none"]
    assert [s["resps"] for s in ours["samples"]["gsm8k"]] == [
        s["resps"] for s in hf["samples"]["gsm8k"]]
