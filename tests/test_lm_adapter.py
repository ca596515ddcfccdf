"""lm-eval's `acadlm` model on the tiny checkpoint: scores against an independent forward pass
(transformers' own Llama), rolling windows, KV-cache generation against full recomputation,
grouped-query decoding against torchtune's attention, stop sequences, batching (`auto`
included), too-long contexts, chat templates, lm-eval's built-in tasks of every output type on
local files, an exported checkpoint scored identically by `--model hf`, and data-parallel
evaluation over 2 processes (gloo) giving the 1-process results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from tiny_setup import write_builtin_task_configs, write_tiny_model_dir

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.evaluation import lm_adapter
from acadlm_plugins.evaluation.generation import (
    StopRule,
    causal_mask_rows,
    final_hidden_states,
    grouped_query_attention,
)
from acadlm_plugins.evaluation.lm_adapter import AcadLM
from acadlm_plugins.evaluation.registry import MODEL_NAME, register_lm_eval_model

PAIRS = [("Question: the answer is", " 42"), ("Question: the answer is", " 4"),
         ("def f ( x ) :", " return x + y"), ("the dog and the cat", " were in the house"),
         ("", "of and to"), ("1 2 3 4 5 6 7 8 9 10 11", " 12"), ("a  ", "b")]


def _instances(kind: str, args: list[tuple], task: str = "tiny_task") -> list[Instance]:
    return [Instance(kind, {}, arg, i, (task, i, 1)) for i, arg in enumerate(args)]


def decoding_logits(model, prompts: list[list[int]], fed: list[list[int]], *,
                    grouped: bool) -> torch.Tensor:
    """Logits of a left-padded batch: the prompts prefilled into torchtune KV caches, then
    ``fed`` given one token per step (the same tokens either way, so both runs see the same
    inputs); with or without :func:`grouped_query_attention`. ``steps + 1 x rows x vocab``."""
    from contextlib import nullcontext

    from torchtune.generation import get_position_ids_from_padding_mask
    from torchtune.modules.common_utils import local_kv_cache

    rows, width, steps = len(prompts), max(map(len, prompts)), len(fed[0])
    total = width + steps
    tokens = torch.zeros((rows, total), dtype=torch.long)
    real = torch.ones((rows, total), dtype=torch.bool)
    for row, (prompt, more) in enumerate(zip(prompts, fed, strict=True)):
        tokens[row, width - len(prompt):] = torch.tensor(prompt + more)
        real[row, :width - len(prompt)] = False
    positions = get_position_ids_from_padding_mask(real)
    weight = model.tok_embeddings.weight
    logits = []
    caches = local_kv_cache(model, batch_size=rows, device=weight.device, dtype=weight.dtype,
                            decoder_max_seq_len=total)
    with torch.inference_mode(), caches, grouped_query_attention(model) if grouped else (
            nullcontext()):
        for start, stop in [(0, width)] + [(end, end + 1) for end in range(width, total)]:
            hidden = final_hidden_states(model, tokens[:, start:stop],
                                         input_pos=positions[:, start:stop],
                                         mask=causal_mask_rows(real, start, stop, total))
            logits.append(model.output(hidden[:, -1]).float())
    return torch.stack(logits)


def sdpa_key_heads(monkeypatch) -> list[tuple[int, int, int]]:
    """Records ``(query heads, key heads, query length)`` of every SDPA call from now on."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], q.shape[2]))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return seen


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


@pytest.mark.parametrize(("given", "device", "message"), [
    (False, "cuda:0", (r"`--device`: was not given, so lm-eval used its default 'cuda:0', "
                       r"but CUDA is not available on this machine\. Fix: pass --device cpu\.")),
    (None, "cuda:0", (r"'cuda:0' \(lm-eval's default when --device is not given\) was asked "
                      r"for.*Fix: pass --device cpu\.")),
    (True, "cuda:0", r"'cuda:0' was asked for but CUDA is not available\. Fix: use --device cpu"),
    (False, "cuda:1", r"'cuda:1' was asked for but CUDA is not available\. Fix: use --device cpu"),
])
def test_a_cuda_device_without_cuda_says_where_it_came_from(monkeypatch, given, device,
                                                             message):
    """Without ``--device``, lm-eval hands the model its default ``cuda:0``: on a machine
    without CUDA the error says that default was used, not that the user asked for it."""
    from acadlm_plugins.evaluation.registry import DEVICE_OPTION_GIVEN

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    token = DEVICE_OPTION_GIVEN.set(given)
    try:
        with pytest.raises(ConfigError, match=message):
            lm_adapter._resolve_device(device)
    finally:
        DEVICE_OPTION_GIVEN.reset(token)
    assert lm_adapter._resolve_device("cpu") == torch.device("cpu")


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
    assert (lm.tokenizer.bos_id, lm.eot_token_id, lm.tokenizer.stop_ids) == (1, 2, {0, 2})
    assert lm.chat_template(True) == config["chat_template"]  # still read from the config
    # An empty context is conditioned on what lm-eval's `hf` uses: transformers' BOS, else its
    # EOS (Qwen2/2.5: no BOS named; generation_config's bos is not it).
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok.bos_token_id is None
    assert lm.prefix_token_id == hf_tok.eos_token_id == 2
    assert AcadLM(pretrained=str(model_dir)).prefix_token_id == AutoTokenizer.from_pretrained(
        str(model_dir)).bos_token_id


def test_prefix_token_is_the_bos_named_only_in_special_tokens_map(model_dir, tmp_path):
    """Older Hugging Face folders name BOS/EOS only in special_tokens_map.json, which
    transformers merges over tokenizer_config.json: lm-eval's `hf` then conditions an empty
    context on that BOS, and so must we (not on the EOS)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    named = {key: config.pop(key) for key in ("bos_token", "eos_token")}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(named))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2}))
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    lm = AcadLM(pretrained=str(model_dir), tokenizer=str(folder))
    assert hf_tok.bos_token_id is not None and hf_tok.bos_token_id != hf_tok.eos_token_id
    assert lm.prefix_token_id == hf_tok.bos_token_id


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


def test_grouped_query_decoding_equals_torchtunes_attention(lm, monkeypatch):
    """Decoding steps read the KV cache with its 2 KV heads un-repeated (4 query heads) and
    give torchtune's logits (left padding included); the layers are restored afterwards."""
    attention = lm.model.layers[0].attn
    assert (attention.num_heads, attention.num_kv_heads) == (4, 2)
    prompts = [lm.tok_encode(p) for p in ("the dog and the cat were", "def f", "1 2 3 4")]
    fed = [lm.tok_encode(" x = 1 2 in the house")[:6] for _ in prompts]
    reference = decoding_logits(lm.model, prompts, fed, grouped=False)
    seen = sdpa_key_heads(monkeypatch)
    grouped = decoding_logits(lm.model, prompts, fed, grouped=True)
    assert (grouped - reference).abs().max() < 1e-5
    layers = len(lm.model.layers)
    assert seen[:layers] == [(4, 4, max(map(len, prompts)))] * layers  # prefill: torchtune's
    assert seen[layers:] == [(4, 2, 1)] * (len(seen) - layers) and len(seen) > layers
    assert attention.num_kv_heads == 2 and not hasattr(attention._attention_call, "group")
    seen.clear()
    assert torch.equal(decoding_logits(lm.model, prompts, fed, grouped=False), reference)
    assert {key_heads for _, key_heads, _ in seen} == {4}  # unpatched again: repeated heads


def test_prompts_of_similar_length_are_prefilled_together_without_padding(lm):
    """Longest-first runs of prompts within PREFILL_SLACK of their longest are prefilled as one
    batch each; the KV caches and first logits are those of prefilling the whole padded batch,
    and generation equals full recomputation."""
    from torchtune.generation import get_position_ids_from_padding_mask
    from torchtune.modules.common_utils import local_kv_cache

    from acadlm_plugins.evaluation.generation import _prefill, length_groups

    assert length_groups([40, 36, 35, 20, 3, 3]) == [slice(0, 3), slice(3, 4), slice(4, 6)]
    texts = ["the dog and the cat were in the house and", "the dog and the cat were in the",
             "def f ( x ) :", "1 2"]
    prompts = [lm.tok_encode(text) for text in texts]
    lengths = list(map(len, prompts))
    width = max(lengths)
    assert len(length_groups(lengths)) >= 3 and lengths == sorted(lengths, reverse=True)
    tokens = torch.zeros((len(prompts), width + 1), dtype=torch.long)  # + a slot to decode
    real = torch.ones_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):width] = torch.tensor(prompt)
        real[row, :width - len(prompt)] = False
    positions = get_position_ids_from_padding_mask(real)
    model, shapes = lm.model, []
    hook = model.tok_embeddings.register_forward_hook(lambda m, i, o: shapes.append(i[0].shape))

    def cached(run):
        with torch.inference_mode(), local_kv_cache(model, batch_size=len(prompts),
                                                    device=torch.device("cpu"),
                                                    dtype=torch.float32,
                                                    decoder_max_seq_len=width + 1):
            hidden = run()
            caches = [layer.attn.kv_cache for layer in model.layers]
            return (model.output(hidden).float(), [c.k_cache.clone() for c in caches],
                    [c.v_cache.clone() for c in caches], caches[0].size)

    try:
        grouped = cached(lambda: _prefill(model, tokens, real, positions, lengths, chunk=4))
        padded = cached(lambda: final_hidden_states(
            model, tokens[:, :width], input_pos=positions[:, :width],
            mask=causal_mask_rows(real, 0, width, width + 1))[:, -1])
    finally:
        hook.remove()
    # Each run covers only its own longest prompt (in chunks of 4), not the batch's width.
    assert sum(rows * length for rows, length in shapes[:-1]) < len(prompts) * width
    assert shapes[-1] == (len(prompts), width)  # the padded reference, in one pass
    assert (grouped[0] - padded[0]).abs().max() < 1e-4
    for got, want in zip(grouped[1] + grouped[2], padded[1] + padded[2], strict=True):
        filled = real[:, None, :width, None].expand_as(got[:, :, :width])
        assert (got - want)[:, :, :width][filled].abs().max() < 1e-5
    assert grouped[3] == padded[3] == width  # the caches continue at slot `width`
    caps = [6, 6, 6, 6]
    assert lm._generate(prompts[::-1], caps) == AcadLM(
        pretrained=str(lm.model_dir), kv_cache=False)._generate(prompts[::-1], caps)


def test_stop_rule_decodes_only_the_tail_that_can_hold_a_stop_string():
    decoded = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(chr(ord("a") + i % 26) for i in ids)

    rule = StopRule(100, ["xyz"], frozenset({99}))
    ids = list(range(60))
    assert not rule.done(ids[:25], decode) and rule.done(ids[:26], decode)  # ...x y z
    assert max(decoded) == rule.window == 4 * 3 + 2
    assert StopRule(100, [], frozenset({99})).done([1, 99], decode=None)  # a stop token
    assert not StopRule(100).done(ids[:30], decode=None)  # nothing to decode without strings
    assert StopRule(30).done(ids[:30], decode=None)


def test_generation_stops_as_soon_as_every_row_is_done(lm):
    steps = []  # decoding steps: forward passes over one new token per row
    hook = lm.model.tok_embeddings.register_forward_hook(
        lambda module, inputs, output: steps.append(1) if inputs[0].shape[1] == 1 else None)
    prompts = [lm.tok_encode("the dog"), lm.tok_encode("1 2 3 4 5")]
    try:
        lm._generate(prompts, [3, 5])
        assert len(steps) == 4  # the prefill gives the first token, then one step per token
        tokens = lm._generate(prompts, [5, 5])
        steps.clear()
        original = lm.tokenizer.stop_ids
        lm.tokenizer.stop_ids = {tokens[0][1], tokens[1][1]}
        try:
            assert [len(t) for t in lm._generate(prompts, [20, 20])] == [2, 2]
        finally:
            lm.tokenizer.stop_ids = original
        assert len(steps) == 1
    finally:
        hook.remove()


def test_requests_with_their_own_stops_and_budgets_share_a_batch(model_dir, lm, monkeypatch):
    """Greedy requests batch together whatever their `until` and `max_gen_toks`; every row
    stops on its own and gets what it gets alone."""
    prompts = ["the dog and the cat were", "def f ( x ) :", "1 2 3", "Question: what?"]
    alone = AcadLM(pretrained=str(model_dir), batch_size=1)
    free = [alone.generate_until(_instances("generate_until", [(p, {"until": [],
            "max_gen_toks": 16})]), disable_tqdm=True)[0] for p in prompts]
    settings = [{"until": [free[0][3:5]], "max_gen_toks": 16}, {"until": [], "max_gen_toks": 4},
                {"until": ["\n\n", free[2][6:8]], "max_gen_toks": 16},
                {"until": [], "max_gen_toks": 9, "do_sample": False}]
    requests = _instances("generate_until", list(zip(prompts, settings, strict=True)))
    batches = []
    original = lm._generate_rows
    monkeypatch.setattr(lm, "_generate_rows", lambda prompts, rules, **kw: batches.append(
        [rule.cap for rule in rules]) or original(prompts, rules, **kw))
    together = lm.generate_until(requests, disable_tqdm=True)
    assert sorted(map(sorted, batches)) == [[4, 9, 16, 16]]
    assert together == alone.generate_until(requests, disable_tqdm=True)
    assert together[0] == free[0][:free[0].index(free[0][3:5])]
    assert together[2] == free[2][:free[2].index(free[2][6:8])]
    assert len(together[1]) < len(free[1]) and free[3].startswith(together[3])


def test_chunked_mask_rows_equal_torchtunes_full_mask():
    from torchtune.generation import get_causal_mask_from_padding_mask

    real = torch.tensor([[False, False, True, True, True, True, True, True, True],
                         [True, True, True, True, True, True, True, True, True]])
    full = get_causal_mask_from_padding_mask(real)
    rows = torch.cat([causal_mask_rows(real, 0, 3, 9), causal_mask_rows(real, 3, 8, 9),
                      causal_mask_rows(real, 8, 9, 9)], dim=1)
    assert torch.equal(rows, full)
    assert torch.equal(causal_mask_rows(real, 0, 5, 5),
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
    # a cold temperature concentrates the distribution on the argmax: the temperature reaches
    # the sampler (at the default 1.0 these seeds do not all give the greedy text)
    assert [sampled(seed, temperature=1e-3) for seed in range(3)] == [greedy] * 3
    assert [sampled(seed, temperature=1.0) for seed in range(3)] != [greedy] * 3
    with pytest.raises(ConfigError, match="top_p"):
        sampled(0, temperature=1.0, top_p=0.9)


# ---------------------------------------------------------------------------------- batch size


def test_batch_size_values():
    parse = AcadLM._parse_batch_size
    assert [parse(v) for v in (None, 3, "5", "auto", "auto:4")] == [
        (1, 0), (3, 0), (5, 0), (None, 1), (None, 4)]
    for bad in ("big", "auto:0", "auto:x", 0, -2, "2.5"):
        with pytest.raises(ConfigError, match="--batch_size"):
            parse(bad)
    assert AcadLM._parse_max_batch_size(None) == 64  # lm-eval's `hf` default
    with pytest.raises(ConfigError, match="--max_batch_size"):
        AcadLM._parse_max_batch_size("0")


@pytest.mark.parametrize(("key", "value"), [
    ("prefill_chunk", "big"), ("prefill_chunk", 0), ("prefill_chunk", -8), ("max_gen_toks", "x"),
    ("max_gen_toks", 0), ("max_length", "4k"), ("max_length", 0), ("max_length", 2.5)])
def test_a_model_arg_that_is_not_a_positive_integer_is_named(model_dir, key, value):
    """`--model_args prefill_chunk=big` or `max_length=4k` stops with an error naming the arg,
    before the weights load; `max_length=0` is refused rather than read as "not given"."""
    with pytest.raises(ConfigError, match=rf"`--model_args {key}`: is {value!r}"):
        AcadLM(pretrained=str(model_dir), **{key: value})


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (False, False), ("true", True), ("False", False), ("TRUE", True), (1, True),
    (0, False), ("1", True), ("0", False)])
def test_yes_no_values_are_read_as_such(value, expected):
    assert lm_adapter.flag_value(value, "--model_args kv_cache") is expected


@pytest.mark.parametrize("value", ["no", "maybe", "yes", "", 2, None])
def test_a_kv_cache_that_is_not_true_or_false_is_named(model_dir, value):
    """`--model_args kv_cache=no` reached the model as the string "no", which ``bool`` read as
    true: it stops with an error naming the arg, before the weights load."""
    with pytest.raises(ConfigError, match=r"`--model_args kv_cache`: is"):
        AcadLM(pretrained=str(model_dir), kv_cache=value)


def test_kv_cache_from_lm_evals_model_args_string(model_dir):
    """lm-eval turns `true`/`false` into bools and `0`/`1` into ints; `no` stays a string."""
    assert AcadLM.create_from_arg_string(f"pretrained={model_dir},kv_cache=0").kv_cache is False
    assert AcadLM.create_from_arg_string(f"pretrained={model_dir},kv_cache=True").kv_cache
    with pytest.raises(ConfigError, match=r"`--model_args kv_cache`: is 'no'"):
        AcadLM.create_from_arg_string(f"pretrained={model_dir},kv_cache=no")


def test_a_do_sample_that_is_not_true_or_false_names_the_task(lm):
    """`--gen_kwargs do_sample=no` reaches the model as "no"; read as true it would sample."""
    request = _instances("generate_until", [("x", {"until": [], "max_gen_toks": 3,
                                                  "do_sample": "no", "temperature": 1.0})],
                         task="sampler")
    with pytest.raises(ConfigError, match=r"`sampler: generation_kwargs do_sample`: is 'no'"):
        lm.generate_until(request, disable_tqdm=True)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("temperature", -1.0, "below its minimum"),
    ("top_k", "many", "is 'many', not an integer"), ("top_k", 2.5, "not a whole number")])
def test_a_sampling_setting_that_is_no_number_names_the_task(lm, key, value, problem):
    settings = {"until": [], "max_gen_toks": 3, "do_sample": True, "temperature": 1.0,
                key: value}
    request = _instances("generate_until", [("x", settings)], task="sampler")
    with pytest.raises(ConfigError, match=rf"`sampler: generation_kwargs {key}`: .*{problem}"):
        lm.generate_until(request, disable_tqdm=True)


def test_auto_batch_size_on_the_cpu_plans_from_free_memory(model_dir, lm, monkeypatch):
    import psutil

    auto = AcadLM(pretrained=str(model_dir), batch_size="auto", max_batch_size=3)
    assert auto.batch_size == "auto"
    scored = _instances("loglikelihood", PAIRS)
    for (ours, _), (reference, _) in zip(auto.loglikelihood(scored, disable_tqdm=True),
                                         lm.loglikelihood(scored, disable_tqdm=True),
                                         strict=True):
        assert ours == pytest.approx(reference, abs=1e-5)
    prompts = ["the dog", "def f ( x ) :", "1 2 3 4 5 6 7", "Question: the"]
    generated = _instances("generate_until", [(p, {"until": [], "max_gen_toks": 6})
                                              for p in prompts])
    assert auto.generate_until(generated, disable_tqdm=True) == lm.generate_until(
        generated, disable_tqdm=True)
    assert list(auto.batch_sizes.values()) == [3, 3]  # plenty of memory: the cap
    row = auto._row_bytes(len(auto.tok_encode(prompts[2])), 6, 1)
    assert row > auto._row_bytes(len(auto.tok_encode(prompts[2])), 0, 1)  # + the KV cache
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {
        "available": int(2.5 * row / lm_adapter.CPU_MEMORY_SHARE)})())
    auto.batch_sizes.clear()
    auto.generate_until(generated[2:3], disable_tqdm=True)
    assert list(auto.batch_sizes.values()) == [2]  # 2.5 rows' worth of memory


def test_auto_batch_size_on_a_gpu_shrinks_until_the_longest_requests_fit(model_dir, lm,
                                                                         monkeypatch):
    """Where running out of memory raises (a GPU), `auto:2` tries the longest requests of each
    half of the sorted list at 8 rows, then fewer (accelerate's rule), and uses what fits."""
    monkeypatch.setattr(lm_adapter, "_reports_out_of_memory", lambda device: True)
    auto = AcadLM(pretrained=str(model_dir), batch_size="auto:2", max_batch_size=8)
    tried = []

    def fits_three_rows(make_trial):
        def make(*args):
            trial = make_trial(*args)

            def run(rows: int) -> None:
                tried.append(rows)
                if rows > 3:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                trial(rows)
            return run
        return make

    monkeypatch.setattr(auto, "_scoring_trial", fits_three_rows(auto._scoring_trial))
    monkeypatch.setattr(auto, "_generation_trial", fits_three_rows(auto._generation_trial))
    scored = _instances("loglikelihood", PAIRS)
    for (ours, _), (reference, _) in zip(auto.loglikelihood(scored, disable_tqdm=True),
                                         lm.loglikelihood(scored, disable_tqdm=True),
                                         strict=True):
        assert ours == pytest.approx(reference, abs=1e-5)
    assert tried == [8, 7, 6, 5, 4, 3] * 2 and list(auto.batch_sizes.values()) == [3, 3]
    tried.clear()
    generated = _instances("generate_until", [(p, {"until": [], "max_gen_toks": 5})
                                              for p in ("the dog", "1 2 3 4", "x", "def")])
    assert auto.generate_until(generated, disable_tqdm=True) == lm.generate_until(
        generated, disable_tqdm=True)
    assert tried == [8, 7, 6, 5, 4, 3] * 2


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


@pytest.mark.parametrize(("family_name", "changes"), [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
               "layer_types": ["sliding_attention"] * 2}),
])
def test_a_context_longer_than_a_sliding_window_names_max_length(tmp_path, family_name,
                                                                 changes):
    """A sliding window shorter than the context is refused (the decoder attends over the
    whole prefix); the fix names what an lm-eval user changes, `--model_args max_length`,
    not the recipes' `max_seq_len`. Within the window the model loads."""
    from family_checkpoints import write_family, write_family_tokenizer

    folder = write_family(family_name, tmp_path / "model", vocab_size=512, num_hidden_layers=2)
    write_family_tokenizer(family_name, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for max_length in (64, None):  # given, and left to max_position_embeddings
        with pytest.raises(ConfigError) as refused:
            AcadLM(pretrained=str(folder), max_length=max_length)
        message = str(refused.value)
        assert refused.value.key == "--model_args max_length", message
        assert "`--model_args max_length=16`" in message and "max_seq_len" not in message
        assert "sliding_window" in message and str(folder / "config.json") in message
    assert AcadLM(pretrained=str(folder), max_length=16).max_length == 16


def test_generation_is_capped_at_the_room_left(model_dir, monkeypatch):
    lm = AcadLM(pretrained=str(model_dir), max_length=32)
    prompt = "the dog and the cat were in the house"
    length = len(lm.tok_encode(prompt))
    seen = []
    original = lm._generate_rows
    monkeypatch.setattr(lm, "_generate_rows", lambda prompts, rules, **kw: seen.append(
        [rule.cap for rule in rules]) or original(prompts, rules, **kw))
    text = lm.generate_until(_instances("generate_until", [(prompt, {"until": [],
                                                                     "max_gen_toks": 100})]),
                             disable_tqdm=True)[0]
    assert seen == [[32 - length]] and 0 < 32 - length < 100
    assert text == lm.tok_decode(lm._generate([lm.tok_encode(prompt)], [32 - length])[0])


@pytest.mark.parametrize("kv_cache", [True, False])
def test_a_finished_row_beside_a_longer_one_never_runs_past_the_models_length(
        model_dir, kv_cache):
    """A long prompt with a short budget and a short prompt with a long one each fit the
    model's 32 tokens; batched, the finished long row is fed on while the short one generates,
    and its positions used to run past the RoPE table (IndexError at batch size 2)."""
    alone = AcadLM(pretrained=str(model_dir), max_length=32, batch_size=1, kv_cache=kv_cache)
    long_prompt = "the dog and the cat were in the house"  # 18 tokens: 14 left
    length = len(alone.tok_encode(long_prompt))
    requests = _instances("generate_until", [
        (long_prompt, {"until": [], "max_gen_toks": 32 - length}),
        ("1 2", {"until": [], "max_gen_toks": 24})])
    assert length > 32 - 24 - len(alone.tok_encode("1 2"))  # the two overrun together
    expected = alone.generate_until(requests, disable_tqdm=True)
    together = AcadLM(pretrained=str(model_dir), max_length=32, batch_size=2,
                      kv_cache=kv_cache)
    assert together.generate_until(requests, disable_tqdm=True) == expected


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
    assert lm.tokenizer_name.startswith(str(lm.tokenizer.folder).replace("/", "__"))


def test_the_request_cache_key_changes_with_the_chat_template(model_dir, tmp_path):
    """lm-eval keys cached requests (rendered prompts) by tokenizer_name: editing the chat
    template in place must change it, or --cache_requests would reuse the old prompts."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = AcadLM(pretrained=str(folder)).tokenizer_name
    assert AcadLM(pretrained=str(folder)).tokenizer_name == before  # stable
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert AcadLM(pretrained=str(folder)).tokenizer_name != before


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


def test_batch_size_auto_through_lm_eval(model_dir, builtin_tasks):
    tasks = [builtin_tasks["arc_easy"], builtin_tasks["gsm8k"]]
    fixed = _evaluate("acadlm", {"pretrained": str(model_dir), "batch_size": 1}, tasks,
                      num_fewshot=0, gen_kwargs={"max_gen_toks": 8})
    auto = _evaluate("acadlm", {"pretrained": str(model_dir)}, tasks, batch_size="auto",
                     max_batch_size=4, num_fewshot=0, gen_kwargs={"max_gen_toks": 8})
    assert auto["config"]["batch_size"] == "auto" and auto["config"]["batch_sizes"] == [4, 4]
    assert auto["results"] == fixed["results"]
    for task in ("arc_easy", "gsm8k"):
        assert_close(_answers(auto["samples"][task]), _answers(fixed["samples"][task]))


# ---------------------------------------------------------------------------------- processes


def test_a_plain_process_is_rank_zero_of_one(lm):
    assert (lm.rank, lm.world_size) == (0, 1)
    assert torch.equal(lm.all_gather(torch.tensor(5)), torch.tensor(5))
    assert lm.gather_object({"a": 1}) == [{"a": 1}]
    lm.barrier()


def assert_close(got, want, tol: float = 1e-4, where: str = "") -> None:
    """``got == want`` for nested lists/dicts, with numbers compared to ``tol``."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_close(got[key], want[key], tol, f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, tol, f"{where}[{index}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=tol), where
    else:
        assert got == want, where


def _answers(samples: list[dict]) -> dict[tuple[int, str], list]:
    """Each document's filtered responses (what its metrics see), per filter, numbers as
    floats: the samples file stores them as strings. (Not ``resps``: lm-eval pads the shorter
    rank with a copy of its last request, whose extra answer lands in that request's
    ``resps``; the filters take the first.)"""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        try:
            return float(value) if not isinstance(value, bool) and value not in (
                "True", "False") else str(value)
        except ValueError:
            return value
    return {(s["doc_id"], s["filter"]): plain(s["filtered_resps"]) for s in samples}


@pytest.mark.distributed
def test_two_processes_give_the_one_process_results(model_dir, builtin_tasks, tmp_path):
    """`torchrun --nproc_per_node 2 -m acadlm_plugins.evaluation.cli` on the CPU (gloo): lm-eval
    hands each rank every other document (padding the shorter rank) and gathers on rank 0;
    the metrics and every document's answers are those of one process."""
    tasks = [builtin_tasks[name] for name in ("arc_easy", "lambada_openai", "wikitext",
                                              "gsm8k")]
    output = tmp_path / "two_ranks"
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc_per_node", "2", "-m", "acadlm_plugins.evaluation.cli",
               "--model", "acadlm", "--model_args", f"pretrained={model_dir}",
               "--batch_size", "2", "--device", "cpu", "--num_fewshot", "0",
               "--gen_kwargs", "max_gen_toks=8", "--tasks", ",".join(map(str, tasks)),
               "--log_samples", "--output_path", str(output)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "on rank 1" in done.stderr  # lm-eval built rank 1's share of the requests
    (results_file,) = output.rglob("results_*.json")
    two = json.loads(results_file.read_text())
    one = _evaluate("acadlm", {"pretrained": str(model_dir), "batch_size": 2}, tasks,
                    num_fewshot=0, gen_kwargs={"max_gen_toks": 8})
    for task in ("arc_easy", "lambada_openai", "wikitext", "gsm8k"):
        for metric, value in one["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert two["results"][task][metric] == pytest.approx(value, rel=1e-5), metric
        (samples_file,) = output.rglob(f"samples_{task}_*.jsonl")
        gathered = _answers([json.loads(line) for line in samples_file.read_text().splitlines()])
        assert_close(gathered, _answers(one["samples"][task]), where=task)

