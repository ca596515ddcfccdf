"""lm-eval's `acadlm` model on the tiny checkpoint: scores against an independent forward pass
(transformers' own Llama), rolling windows, KV-cache generation against full recomputation,
stop sequences, batching, too-long contexts, chat templates, lm-eval's built-in tasks of every
output type on local files, and an exported checkpoint scored identically by `--model hf`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from tiny_setup import write_builtin_task_configs, write_tiny_model_dir

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.evaluation.lm_adapter import AcadLM
from acadlm_plugins.evaluation.registry import MODEL_NAME, register_lm_eval_model

PAIRS = [("Question: the answer is", " 42"), ("Question: the answer is", " 4"),
         ("def f ( x ) :", " return x + y"), ("the dog and the cat", " were in the house"),
         ("", "of and to"), ("1 2 3 4 5 6 7 8 9 10 11", " 12"), ("a  ", "b")]


def _instances(kind: str, args: list[tuple], task: str = "tiny_task") -> list[Instance]:
    return [Instance(kind, {}, arg, i, (task, i, 1)) for i, arg in enumerate(args)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lm(model_dir) -> AcadLM:
    return AcadLM(pretrained=str(model_dir), batch_size=4)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' Llama on the same folder: an implementation independent of ours."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[i+1] | ids[:i+1]) for every i, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------------------------- registry


def test_registered_beside_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    register_lm_eval_model()
    register_lm_eval_model()  # idempotent
    assert get_model(MODEL_NAME) is AcadLM  # materializes the lazy placeholder
    register_lm_eval_model()  # still fine once materialized
    assert get_model("hf").__name__ == "HFLM"


def test_registry_refuses_a_foreign_acadlm(monkeypatch):
    from lm_eval.api import registry

    foreign = registry.Registry("model", base_cls=registry.model_registry._base_cls)
    foreign.register(MODEL_NAME, target="somebody_else.models:Other")
    monkeypatch.setattr(registry, "model_registry", foreign)
    with pytest.raises(AcadlmError, match="already registered"):
        register_lm_eval_model()


@pytest.mark.parametrize("path", ["HuggingFaceTB/SmolLM2-135M", "/no/such/model_dir"])
def test_non_local_pretrained_is_refused(path):
    with pytest.raises(ConfigError, match="never downloads"):
        AcadLM(pretrained=path)


def test_tokenizer_ids_from_generation_config_when_tokenizer_config_lacks_them(model_dir,
                                                                              tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": None}))
    with pytest.raises(ConfigError, match="cannot tell the BOS/EOS"):
        AcadLM(pretrained=str(model_dir), tokenizer=str(folder))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, 0]}))
    lm = AcadLM(pretrained=str(model_dir), tokenizer=str(folder / "tokenizer.json"))
    assert (lm.prefix_token_id, lm.eot_token_id, lm.tokenizer.stop_ids) == (1, 2, {0, 2})
    assert lm.chat_template(True) == config["chat_template"]  # still read from the config


# ---------------------------------------------------------------------------------- scoring


def test_loglikelihood_equals_a_direct_forward_pass(lm, reference):
    model, hf_tok = reference
    results = lm.loglikelihood(_instances("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results, strict=True):
        if context:
            moved = len(context) - len(context.rstrip())  # trailing spaces go to the continuation
            context, continuation = context.rstrip(), context[len(context) - moved:] + continuation
            ctx_ids = hf_tok(context).input_ids
            whole = hf_tok(context + continuation).input_ids
        else:
            ctx_ids, whole = [hf_tok.bos_token_id], [hf_tok.bos_token_id] + hf_tok(
                continuation).input_ids
        expected = _reference_logprobs(model, whole)[len(ctx_ids) - 1:]
        assert len(expected) == len(whole) - len(ctx_ids) > 0
        assert logprob == pytest.approx(float(expected.sum()), abs=1e-4)
        assert greedy is False  # a random model does not predict these


def test_greedy_flag_is_true_for_the_models_own_continuation(lm, reference):
    model, hf_tok = reference
    context = hf_tok("the dog and the cat").input_ids
    with torch.no_grad():
        greedy = model.generate(torch.tensor([context]), max_new_tokens=5, do_sample=False,
                                pad_token_id=0)[0, len(context):].tolist()
    (score, is_greedy), (_, other) = lm._loglikelihood_tokens(
        [(None, context, greedy), (None, context, greedy[:-1] + [(greedy[-1] + 1) % 512])])
    assert is_greedy and not other
    assert score == pytest.approx(float(_reference_logprobs(model, context + greedy)
                                        [len(context) - 1:].sum()), abs=1e-4)


def test_batching_gives_the_results_of_batch_size_one(model_dir, lm):
    single = AcadLM(pretrained=str(model_dir), batch_size=1)
    requests = _instances("loglikelihood", PAIRS)
    for (a, greedy_a), (b, greedy_b) in zip(lm.loglikelihood(requests, disable_tqdm=True),
                                            single.loglikelihood(requests, disable_tqdm=True),
                                            strict=True):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b
    prompts = ["def", "the dog and the cat were", "1 2 3", "Question: what is it?\nAnswer:",
               "x"]
    gen = _instances("generate_until", [(p, {"until": ["\n\n"], "max_gen_toks": 12})
                                        for p in prompts])
    assert lm.generate_until(gen, disable_tqdm=True) == single.generate_until(
        gen, disable_tqdm=True)


def test_rolling_scores_disjoint_windows_of_max_length(model_dir, reference):
    model, hf_tok = reference
    window = 16
    lm = AcadLM(pretrained=str(model_dir), max_length=window, batch_size=3)
    texts = [("the a of and to in that it was he for on are as with his they at be this "
              "from " * 3).strip(), "def f ( x ) : return x"]
    totals = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]),
                                      disable_tqdm=True)
    for text, total in zip(texts, totals, strict=True):
        ids = hf_tok(text).input_ids
        sequence = [lm.prefix_token_id] + ids
        expected, end = 0.0, 0
        while end < len(ids):  # each window predicts up to `window` new tokens
            predicted = min(window, len(ids) - end)
            end += predicted
            inputs = sequence[max(0, end - window):end + 1]  # the window, plus its last target
            expected += float(_reference_logprobs(model, inputs)[-predicted:].sum())
        assert total == pytest.approx(expected, abs=1e-3)
    assert len(hf_tok(texts[0]).input_ids) > 2 * window  # really several windows


# ---------------------------------------------------------------------------------- generation


def test_kv_cache_generation_equals_full_recomputation(model_dir, lm, reference):
    model, hf_tok = reference
    prompts = [hf_tok(p).input_ids for p in ("the dog", "def f ( x ) : return", "1 2 3 4 5 6",
                                             "Question: the")]
    caps = [10, 7, 12, 3]
    cached = lm._generate(prompts, caps)
    recompute = AcadLM(pretrained=str(model_dir), kv_cache=False)._generate(prompts, caps)
    chunked = AcadLM(pretrained=str(model_dir), prefill_chunk=3)._generate(prompts, caps)
    assert cached == recompute == chunked
    assert [len(tokens) for tokens in cached] == caps
    with torch.no_grad():  # and transformers' own greedy decoding agrees
        expected = model.generate(torch.tensor([prompts[1]]), max_new_tokens=7, do_sample=False,
                                  pad_token_id=0)[0, len(prompts[1]):].tolist()
    assert cached[1] == expected


def test_chunked_mask_rows_equal_torchtunes_full_mask():
    from torchtune.generation import get_causal_mask_from_padding_mask

    real = torch.tensor([[False, False, True, True, True, True, True, True, True],
                         [True, True, True, True, True, True, True, True, True]])
    full = get_causal_mask_from_padding_mask(real)
    rows = torch.cat([AcadLM._mask(real, 0, 3, 9), AcadLM._mask(real, 3, 8, 9),
                      AcadLM._mask(real, 8, 9, 9)], dim=1)
    assert torch.equal(rows, full)
    assert torch.equal(AcadLM._mask(real, 0, 5, 5),
                       get_causal_mask_from_padding_mask(real[:, :5]))


def test_stop_sequences_and_max_gen_toks(lm):
    prompt = "the dog and the cat were"

    def generate(**gen_kwargs) -> str:
        return lm.generate_until(_instances("generate_until", [(prompt, gen_kwargs)]),
                                 disable_tqdm=True)[0]

    free = generate(until=[], max_gen_toks=24)
    tokens = lm._generate([lm.tok_encode(prompt)], [24])[0]
    assert free == lm.tok_decode(tokens) and len(tokens) == 24
    assert generate(until=[], max_gen_toks=5) == lm.tok_decode(tokens[:5])
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = free[:free.index(stop)]
    assert len(cut) < len(free)
    assert generate(until=[stop], max_gen_toks=24) == cut
    early = lm._generate([lm.tok_encode(prompt)], [24], stop_strings=[stop])[0]
    assert len(early) < 24  # generation stopped, not just the text cut
    first_new = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    original = lm.tokenizer.stop_ids
    lm.tokenizer.stop_ids = {tokens[first_new]}  # ends generation, and is part of the output
    try:
        assert lm._generate([lm.tok_encode(prompt)], [24])[0] == tokens[:first_new + 1]
    finally:
        lm.tokenizer.stop_ids = original


def test_unsupported_generation_settings_name_the_task(lm):
    request = _instances("generate_until", [("x", {"until": [], "num_beams": 4})], task="beamy")
    with pytest.raises(ConfigError, match="beamy.*num_beams"):
        lm.generate_until(request, disable_tqdm=True)
    greedy = _instances("generate_until", [("x", {"until": [], "max_gen_toks": 3,
                                                  "top_p": 0.9, "do_sample": False})])
    assert lm.generate_until(greedy, disable_tqdm=True) == lm.generate_until(
        _instances("generate_until", [("x", {"until": [], "max_gen_toks": 3})]),
        disable_tqdm=True)


def test_sampling_uses_temperature_and_top_k(lm):
    def sampled(seed: int, **settings) -> str:
        torch.manual_seed(seed)
        request = _instances("generate_until", [("the dog", {"until": [], "max_gen_toks": 12,
                                                             "do_sample": True, **settings})])
        return lm.generate_until(request, disable_tqdm=True)[0]

    greedy = lm.generate_until(_instances("generate_until", [("the dog", {
        "until": [], "max_gen_toks": 12})]), disable_tqdm=True)[0]
    hot = [sampled(seed, temperature=5.0) for seed in range(3)]
    assert hot[0] == sampled(0, temperature=5.0)  # seeded by torch, as lm-eval seeds it
    assert len(set(hot)) > 1 and greedy not in hot
    assert sampled(7, temperature=5.0, top_k=1) == greedy  # top-1 sampling is greedy
    with pytest.raises(ConfigError, match="top_p"):
        sampled(0, temperature=1.0, top_p=0.9)


# ---------------------------------------------------------------------------------- lengths


def test_too_long_context_is_an_error_naming_the_task(model_dir):
    lm = AcadLM(pretrained=str(model_dir), max_length=32)
    long_text = "the dog and the cat were in the house " * 6
    assert len(lm.tok_encode(long_text)) > 32
    with pytest.raises(ConfigError, match=r"ruler_niah.*max_seq_lengths.*32"):
        lm.loglikelihood(_instances("loglikelihood", [("a b", " c"), (long_text, " end")],
                                    task="ruler_niah"), disable_tqdm=True)
    with pytest.raises(ConfigError, match=r"helmet_qa.*max_seq_lengths"):
        lm.generate_until(_instances("generate_until", [(long_text, {"until": []})],
                                     task="helmet_qa"), disable_tqdm=True)
    # Rolling loglikelihood windows long texts instead: no error.
    assert math.isfinite(lm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(long_text,)]), disable_tqdm=True)[0])


def test_generation_is_capped_at_the_room_left(model_dir, monkeypatch):
    lm = AcadLM(pretrained=str(model_dir), max_length=32)
    prompt = "the dog and the cat were in the house"
    length = len(lm.tok_encode(prompt))
    seen = []
    original = lm._generate
    monkeypatch.setattr(lm, "_generate", lambda prompts, caps, **kw: seen.append(caps)
                        or original(prompts, caps, **kw))
    text = lm.generate_until(_instances("generate_until", [(prompt, {"until": [],
                                                                     "max_gen_toks": 100})]),
                             disable_tqdm=True)[0]
    assert seen == [[32 - length]] and 0 < 32 - length < 100
    assert text == lm.tok_decode(original([lm.tok_encode(prompt)], [32 - length])[0])


# ---------------------------------------------------------------------------------- chat


def test_chat_template_renders_like_transformers(lm, reference):
    _, hf_tok = reference
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello "}]
    assert lm.apply_chat_template(chat[:2]) == hf_tok.apply_chat_template(
        chat[:2], tokenize=False, add_generation_prompt=True)
    continued = lm.apply_chat_template(chat, add_generation_prompt=False)
    assert continued == hf_tok.apply_chat_template(chat, tokenize=False,
                                                   continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nHello ")
    assert lm.chat_template(True) == json.loads(
        (Path(lm.tokenizer.folder) / "tokenizer_config.json").read_text())["chat_template"]
    assert lm.tokenizer_name.endswith("model")


def test_missing_chat_template_is_a_clear_error(model_dir, tmp_path):
    folder = tmp_path / "no_template"
    folder.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    lm = AcadLM(pretrained=str(model_dir), tokenizer=str(folder))
    with pytest.raises(ConfigError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def builtin_tasks(tmp_path_factory) -> dict[str, Path]:
    return write_builtin_task_configs(tmp_path_factory.mktemp("builtin_tasks"))


def _evaluate(model: str, model_args: dict, tasks: list[Path], **kwargs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    register_lm_eval_model()
    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=[str(t) for t in tasks], log_samples=True,
                                   task_manager=TaskManager(include_defaults=False),
                                   bootstrap_iters=0, **kwargs)


def test_builtin_tasks_of_every_output_type(model_dir, builtin_tasks):
    out = _evaluate("acadlm", {"pretrained": str(model_dir), "batch_size": 4},
                    list(builtin_tasks.values()), num_fewshot=0,
                    gen_kwargs={"max_gen_toks": 8})
    results, samples = out["results"], out["samples"]
    assert {task: out["configs"][task]["output_type"] for task in builtin_tasks} == {
        "arc_easy": "multiple_choice", "lambada_openai": "loglikelihood",
        "wikitext": "loglikelihood_rolling", "gsm8k": "generate_until"}
    # The built-in configs themselves ran: their prompts, stop sequences and metrics.
    assert samples["arc_easy"][0]["arguments"][0] == (
        "Question: Which of these is a mammal?\nAnswer:", " a trout")
    assert samples["gsm8k"][0]["arguments"][0][1]["until"] == ["Question:", "</s>",
                                                              "<|im_end|>"]
    assert 0.0 <= results["arc_easy"]["acc,none"] <= 1.0
    assert len(samples["arc_easy"]) == 4 and len(samples["arc_easy"][2]["resps"]) == 3
    assert results["lambada_openai"]["perplexity,none"] > 1.0
    assert 0.0 < results["wikitext"]["bits_per_byte,none"] < 20.0
    assert results["gsm8k"]["exact_match,strict-match"] == 0.0
    assert all(isinstance(s["resps"][0][0], str) for s in samples["gsm8k"])


def test_builtin_task_over_the_limit_names_it(model_dir, builtin_tasks):
    with pytest.raises(ConfigError, match="lambada_openai.*max_seq_lengths"):
        _evaluate("acadlm", {"pretrained": str(model_dir), "max_length": 8},
                  [builtin_tasks["lambada_openai"]])


def test_apply_chat_template_through_lm_eval(model_dir, builtin_tasks):
    out = _evaluate("acadlm", {"pretrained": str(model_dir)}, [builtin_tasks["arc_easy"]],
                    apply_chat_template=True, limit=1)
    context = out["samples"]["arc_easy"][0]["arguments"][0][0]
    assert context.startswith("<|im_start|>user\nQuestion: Which of these is a mammal?")
    assert context.endswith("<|im_start|>assistant\n")


def test_pruned_export_scores_identically_with_lm_evals_hf_model(model_dir, builtin_tasks,
                                                                  tmp_path):
    """A checkpoint as `prune_recipe` exports it (head size no longer hidden / heads) through
    `--model acadlm` and lm-eval's own `--model hf`: same accuracy, same per-choice scores."""
    from acadlm_plugins.models.llama import llama_decoder
    from acadlm_plugins.pruning.architecture import Architecture
    from acadlm_plugins.pruning.export import export_pruned_model

    arch = Architecture(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=48,
                        intermediate_dim=96, head_dim=16, vocab_size=512)
    torch.manual_seed(1)
    pruned = llama_decoder(vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                           embed_dim=48, intermediate_dim=96, head_dim=16, max_seq_len=512,
                           rope_base=10_000.0)
    for parameter in pruned.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    export = export_pruned_model(pruned, arch, model_dir, tmp_path / "pruned")
    tasks = [builtin_tasks["arc_easy"], builtin_tasks["wikitext"]]
    ours = _evaluate("acadlm", {"pretrained": str(export), "batch_size": 2}, tasks)
    hf = _evaluate("hf", {"pretrained": str(export), "batch_size": 2, "device": "cpu",
                          "dtype": "float32"}, tasks)
    assert ours["results"]["arc_easy"]["acc,none"] == hf["results"]["arc_easy"]["acc,none"]
    for a, b in zip(ours["samples"]["arc_easy"], hf["samples"]["arc_easy"], strict=True):
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]],
                                                             abs=1e-4)
    assert ours["results"]["wikitext"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["wikitext"]["word_perplexity,none"], rel=1e-5)
