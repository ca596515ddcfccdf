"""QuRating rater: Bradley-Terry loss, margin filtering, save/load, and the rater recipe on a
2-layer model trained on synthetic judgments that follow a known hidden quality."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from family_checkpoints import (
    FAMILY_CONFIGS,
    TOLERANCE,
    tokens,
    transformers_logits,
    write_family,
    write_family_tokenizer,
)
from recipe_runs import run_recipe_main, torch_threads
from tiny_setup import (
    _WORDS,
    REPO_ROOT,
    run_tune_subprocess,
    write_tiny_checkpoint,
    write_tiny_model_dir,
)

from acadlm_plugins.errors import ConfigError, DataError
from acadlm_plugins.models import hf_model_spec
from acadlm_plugins.plugins.nonfinite_loss_guard import NonFiniteLossError
from acadlm_plugins.qurating.rater import (
    BACKBONE_DIRNAME,
    PairwiseJudgments,
    RaterModel,
    RaterTokenizer,
    bradley_terry_loss,
    frame,
    is_held_out,
    load_backbone,
    load_rater,
    pad_batch,
    pool,
    read_judgments,
    save_rater,
)
from acadlm_plugins.training.checkpointing import STARTING_WEIGHTS_KEY, latest_checkpoint

TINY_RATER_CONFIG = REPO_ROOT / "configs" / "tiny" / "qurating_rater.yaml"
# Hidden quality of a text: the share of its words drawn from GOOD rather than BAD. Each word
# is a token of the tiny tokenizer, so the feature is learnable by a 2-layer model in a few
# dozen steps; what the test checks is that the Bradley-Terry training recovers it from
# pairwise preferences alone.
GOOD = _WORDS["numbers"][:20]
BAD = _WORDS["prose"]
JUDGE_SHARPNESS = 8.0


@pytest.fixture(autouse=True)
def quiet_single_threaded(monkeypatch):
    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    with torch_threads(1):
        yield


def synthetic_text(rng: random.Random) -> tuple[str, float]:
    """A text of 12-24 words and its hidden quality (share of GOOD words)."""
    share = rng.random()
    words = [rng.choice(GOOD) if rng.random() < share else rng.choice(BAD)
             for _ in range(rng.randint(12, 24))]
    return " ".join(words), sum(w in GOOD for w in words) / len(words)


def write_synthetic_judgments(path: Path, *, num_texts: int = 300, num_pairs: int = 600,
                              seed: int = 0) -> Path:
    """Judgments with p(B better) = sigmoid(k (q_B - q_A)) for ``educational_value`` and the
    reverse preference for ``writing_style`` (two heads that must learn opposite rankings)."""
    rng = random.Random(seed)
    texts = [synthetic_text(rng) for _ in range(num_texts)]
    with open(path, "w") as handle:
        for k in range(num_pairs):
            index_a, index_b = rng.sample(range(len(texts)), 2)  # the draws of sample(texts, 2)
            (text_a, q_a), (text_b, q_b) = texts[index_a], texts[index_b]
            p = 1.0 / (1.0 + math.exp(-JUDGE_SHARPNESS * (q_b - q_a)))
            handle.write(json.dumps({
                "pair_id": f"pair-{k}", "text_a": text_a, "text_b": text_b,
                "source_a": "synthetic", "source_b": "synthetic", "domain_a": "prose",
                "domain_b": "prose", "doc_id_a": f"text-{index_a}", "doc_id_b": f"text-{index_b}",
                "judgments": {"educational_value": p, "writing_style": 1.0 - p}}) + "\n")
    return path


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties."""
    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in np.unique(values):  # average the ranks of ties
            tied = values == value
            result[tied] = result[tied].mean()
        return result
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("rater") / "tiny_model", weight_std=None)


# ------------------------------------------------------------------------- loss and data
def test_bradley_terry_loss_is_bce_of_the_score_difference_and_raises_the_preferred_score():
    s_a = torch.tensor([[0.3, -1.0], [2.0, 0.0]], requires_grad=True)
    s_b = torch.tensor([[0.3, 1.0], [-1.0, 0.5]], requires_grad=True)
    p_b = torch.tensor([[0.9, 0.2], [0.8, 0.5]])
    mask = torch.tensor([[True, True], [True, False]])
    loss = bradley_terry_loss(s_a, s_b, p_b, mask)

    d = (s_b - s_a).detach()
    manual = -(p_b * torch.log(torch.sigmoid(d)) + (1 - p_b) * torch.log(1 - torch.sigmoid(d)))
    assert loss.item() == pytest.approx(float(manual[mask].mean()), rel=1e-6)
    loss.backward()
    # Judge prefers B (p = 0.9) and the scores tie: descending the gradient raises s_B, lowers s_A.
    assert s_b.grad[0, 0] < 0 < s_a.grad[0, 0]
    # Judge prefers A (p = 0.2) while the model prefers B: s_B goes down, s_A up.
    assert s_b.grad[0, 1] > 0 > s_a.grad[0, 1]
    # Gradient is (sigmoid(d) - p) / count, exactly.
    expected = (torch.sigmoid(d) - p_b) * mask / mask.sum()
    torch.testing.assert_close(s_b.grad, expected)
    assert s_a.grad[1, 1] == 0 and s_b.grad[1, 1] == 0, "a masked entry gets no gradient"
    assert bradley_terry_loss(s_a, s_b, p_b, torch.zeros_like(mask)).item() == 0.0
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3), torch.full((3,), 0.5)).item() == (
        pytest.approx(math.log(2)))


def test_margin_keeps_confident_pairs_with_per_criterion_masks(tiny_model_dir, tmp_path):
    rows = [
        ("both", {"educational_value": 0.9, "writing_style": 0.1}),
        ("only_ev", {"educational_value": 0.8, "writing_style": 0.55}),
        ("at_margin", {"educational_value": 0.75}),          # ws not judged
        ("neither", {"educational_value": 0.6, "writing_style": 0.3}),
    ]
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps({"pair_id": pid, "text_a": "1 2 3", "text_b": "the a",
                                        "judgments": judged}) + "\n" for pid, judged in rows))
    criteria, pairs = read_judgments(path)
    assert criteria == ["writing_style", "educational_value"]  # the built-in order
    assert math.isnan(pairs[2].p_b[0])
    data = PairwiseJudgments.build(criteria, pairs, RaterTokenizer(tiny_model_dir), margin=0.25,
                                   validation_fraction=0.0, max_tokens=2)
    assert data.pair_ids == ["both", "only_ev", "at_margin"]
    assert data.mask.tolist() == [[True, True], [False, True], [False, True]]
    assert data.counts["per_criterion"]["writing_style"]["confident"] == 1
    assert data.tokens_a[0][0] == RaterTokenizer(tiny_model_dir).bos_id
    assert max(len(t) for t in data.tokens_a + data.tokens_b) <= 3, "BOS + max_tokens"
    batch = data.collate([0, 2])
    assert batch["tokens"].shape[0] == 4 and batch["targets"].tolist()[1] == [0.5, 0.75]
    # A wider margin drops "only_ev" and "at_margin" entirely; a narrower one keeps "neither".
    assert PairwiseJudgments.build(criteria, pairs, RaterTokenizer(tiny_model_dir), margin=0.35,
                                   validation_fraction=0.0).pair_ids == ["both"]
    assert len(PairwiseJudgments.build(criteria, pairs, RaterTokenizer(tiny_model_dir),
                                       margin=0.1, validation_fraction=0.0).pair_ids) == 4


def test_heldout_pairs_sharing_a_training_document_are_counted(tiny_model_dir, tmp_path):
    """The split is by pair id, so a held-out pair can show a document a training pair also
    shows; the counts say how many do (null when the rows name no documents)."""
    ids = [f"pair-{i}" for i in range(40)]
    held = [i for i in ids if is_held_out(i, 0.3)]
    train = [i for i in ids if not is_held_out(i, 0.3)]
    assert len(held) >= 3 and len(train) >= 3
    docs = {train[0]: ("d1", "d2"), train[1]: ("d3", "d4"),
            held[0]: ("d1", "d9"),    # shares d1 with a training pair
            held[1]: ("d8", "d9"),    # shares only with another held-out pair: unseen
            held[2]: (None, None)}    # names no document: not counted
    rows = [{"pair_id": pid, "text_a": "1 2 3", "text_b": "the a",
             "judgments": {"educational_value": 0.9},
             **({"doc_id_a": docs[pid][0], "doc_id_b": docs[pid][1]} if pid in docs else {})}
            for pid in ids]
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    criteria, pairs = read_judgments(path)
    assert pairs[ids.index(held[0])].doc_id_a == "d1"
    data = PairwiseJudgments.build(criteria, pairs, RaterTokenizer(tiny_model_dir),
                                   validation_fraction=0.3, max_tokens=4)
    assert data.counts["heldout_pairs_sharing_a_training_document"] == 1
    assert data.counts["pairs_without_document_ids"] == len(ids) - 4
    from acadlm_plugins.rater_recipe import document_overlap_note

    note = document_overlap_note(data.counts)
    assert note.startswith(f"1 of {len(held)} held-out pairs share a document with a training "
                           "pair: accuracy over unseen pairs, not unseen documents")
    for row in rows:  # rows written before document ids were: unknown, not 0
        row.pop("doc_id_a", None), row.pop("doc_id_b", None)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PairwiseJudgments.build(*read_judgments(path), RaterTokenizer(tiny_model_dir),
                                   validation_fraction=0.3, max_tokens=4)
    assert data.counts["heldout_pairs_sharing_a_training_document"] is None
    assert "is unknown" in document_overlap_note(data.counts)


def sharing_docs(pairs, indices: list[int], others: list[int]) -> list[int]:
    """The pairs of ``indices`` that show a document one of the pairs of ``others`` shows."""
    docs = {d for i in others for d in (pairs[i].doc_id_a, pairs[i].doc_id_b)}
    return [i for i in indices if pairs[i].doc_id_a in docs or pairs[i].doc_id_b in docs]


def test_a_split_by_documents_keeps_heldout_documents_out_of_training(tiny_model_dir, tmp_path):
    """``validation_split="documents"`` holds out the pairs ``pairs`` holds out and leaves
    every training pair that shows one of their documents out of training (counted); under
    ``pairs`` those pairs train, and nothing is left out."""
    from acadlm_plugins.rater_recipe import document_overlap_note

    path = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_texts=150, num_pairs=200)
    criteria, pairs = read_judgments(path)
    split = {name: PairwiseJudgments.build(criteria, pairs, RaterTokenizer(tiny_model_dir),
                                           validation_fraction=0.2, max_tokens=4,
                                           validation_split=name)
             for name in ("pairs", "documents")}
    by_pairs, by_docs = split["pairs"], split["documents"]
    kept = [pairs[[p.pair_id for p in pairs].index(pid)] for pid in by_pairs.pair_ids]
    assert by_docs.pair_ids == by_pairs.pair_ids
    assert by_docs.heldout_indices == by_pairs.heldout_indices, "the same held-out pairs"
    shared = sharing_docs(kept, by_pairs.train_indices, by_pairs.heldout_indices)
    assert len(shared) > 0 and by_pairs.counts["heldout_pairs_sharing_a_training_document"] > 0
    assert sharing_docs(kept, by_docs.train_indices, by_docs.heldout_indices) == []
    assert by_docs.train_indices == [i for i in by_pairs.train_indices if i not in shared]
    assert by_docs.counts["train_pairs_left_out_for_heldout_documents"] == len(shared)
    assert by_docs.counts["heldout_pairs_sharing_a_training_document"] == 0
    assert by_docs.counts["train_pairs"] == len(by_docs.train_indices)
    assert by_docs.counts["validation_split"] == "documents"
    assert by_pairs.counts["train_pairs_left_out_for_heldout_documents"] == 0
    assert by_pairs.counts["train_pairs"] == len(by_pairs.train_indices)
    assert document_overlap_note(by_docs.counts).startswith(
        f"0 of {len(by_docs.heldout_indices)} held-out pairs share a document with a training "
        f"pair; {len(shared)} training pairs showing a held-out document were left out")


def test_a_split_by_documents_refuses_pairs_that_do_not_name_both_documents(tiny_model_dir,
                                                                            tmp_path):
    """A side without a document id could be a held-out document trained on: ``documents``
    refuses it, naming `validation_split` and the fixes; a pair the margin drops is not
    checked, and ``pairs`` trains on such rows as before."""
    rows = [{"pair_id": f"pair-{i}", "text_a": "1 2 3", "text_b": "the a",
             "doc_id_a": f"d{i}", "doc_id_b": f"e{i}",
             "judgments": {"educational_value": 0.9}} for i in range(20)]
    rows[3].pop("doc_id_b")
    rows[5]["doc_id_a"] = rows[5]["doc_id_b"] = None
    path = tmp_path / "judgments.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = RaterTokenizer(tiny_model_dir)
    with pytest.raises(DataError, match=r"`validation_split` is 'documents', but 2 of the 20 "
                                        r"confident pairs do not name both their documents "
                                        r"\(first: .*judgments.jsonl:4, pair 'pair-3'\).* Fix: "
                                        r"set `validation_split: pairs`, or re-judge"):
        PairwiseJudgments.build(*read_judgments(path), tokenizer, validation_fraction=0.3,
                                max_tokens=4, validation_split="documents")
    assert len(PairwiseJudgments.build(*read_judgments(path), tokenizer, validation_fraction=0.3,
                                       max_tokens=4).pair_ids) == 20
    for row in (rows[3], rows[5]):
        row["judgments"] = {"educational_value": 0.5}  # dropped by the margin: not checked
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PairwiseJudgments.build(*read_judgments(path), tokenizer, validation_fraction=0.3,
                                   max_tokens=4, validation_split="documents")
    assert len(data.pair_ids) == 18
    assert data.counts["train_pairs_left_out_for_heldout_documents"] == 0  # no shared docs


def test_an_unknown_validation_split_is_refused_naming_the_key_and_the_choices(tiny_model_dir):
    from omegaconf import OmegaConf

    from acadlm_plugins.rater_recipe import rating_settings

    words = r"config `validation_split`: unknown value 'docs'.* Fix: use one of \['pairs', "
    with pytest.raises(ConfigError, match=words + r"'documents'\]"):
        rating_settings(OmegaConf.create({"validation_split": "docs"}))
    with pytest.raises(ConfigError, match=words):
        PairwiseJudgments.build(["educational_value"], [], RaterTokenizer(tiny_model_dir),
                                validation_split="docs")
    assert rating_settings(OmegaConf.create({}))[2] == "pairs"


def test_a_tokenizer_json_that_truncates_or_pads_does_not_cut_documents(tiny_model_dir,
                                                                       tmp_path):
    """truncation/padding in tokenizer.json apply to every Rust encode: the rater (training
    excerpts and annotation, hence num_tokens and the selection budget), pair sampling (the
    lm-eval adapter's tokenizer) and the training tokenizer must switch them off."""
    import shutil

    from tokenizers import Tokenizer

    from acadlm_plugins.evaluation.lm_adapter import AcadTokenizer
    from acadlm_plugins.models.tokenizer import smollm2_tokenizer

    folder = tmp_path / "truncating"
    shutil.copytree(tiny_model_dir, folder)
    rust = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rust.enable_truncation(max_length=16)
    rust.enable_padding(length=24, pad_id=0, pad_token="<|endoftext|>")
    rust.save(str(folder / "tokenizer.json"))
    text = " ".join(GOOD * 3)
    whole = RaterTokenizer(tiny_model_dir).encode([text, "one"])
    assert len(whole[0]) > 16 and len(whole[1]) < 16
    assert RaterTokenizer(folder).encode([text, "one"]) == whole
    adapter = AcadTokenizer(folder)
    assert adapter.encode(text, add_special_tokens=False) == whole[0]
    assert len(adapter.rust.encode(text, add_special_tokens=False).offsets) == len(whole[0])
    training = smollm2_tokenizer(str(folder))
    assert training.encode(text) == [training.bos_id, *whole[0], training.eos_id]
    assert training.encode_batch([text])[0] == training.encode(text)
    from acadlm_plugins.evaluation.lengths import _load_tokenizer_file  # eval prompt lengths

    counter = _load_tokenizer_file(str(folder / "tokenizer.json"))
    assert counter.encode(text, add_special_tokens=False).ids == whole[0]


def test_held_out_split_follows_the_pair_id_hash():
    ids = [f"pair-{i}" for i in range(4000)]
    held = [is_held_out(i, 0.1) for i in ids]
    assert 0.08 < sum(held) / len(held) < 0.12
    assert held == [is_held_out(i, 0.1) for i in ids], "deterministic"
    assert not any(is_held_out(i, 0.0) for i in ids)
    # A pair held out at 10% stays held out at 20% (a threshold on one hash).
    assert all(is_held_out(i, 0.2) for i, h in zip(ids, held) if h)


def test_malformed_judgments_name_the_file_and_line(tmp_path):
    path = tmp_path / "judgments.jsonl"
    good = json.dumps({"pair_id": "a", "text_a": "x", "text_b": "y",
                       "judgments": {"educational_value": 0.9}})
    path.write_text(good + "\n\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_judgments(path)
    path.write_text(good + "\n" + json.dumps({"pair_id": "b", "text_a": "x", "text_b": "y",
                                               "judgments": {"educational_value": 1.7}}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: judgment 'educational_value' = 1.7"):
        read_judgments(path)
    path.write_text(good + "\n")
    with pytest.raises(ConfigError, match="config `criteria`"):
        read_judgments(path, criteria=["clarity"])


def test_pooling_and_padding_do_not_change_a_text_score(tiny_model_dir):
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    lengths = torch.tensor([2, 3])
    assert pool(hidden, lengths, "last").tolist() == [hidden[0, 1].tolist(), hidden[1, 2].tolist()]
    torch.testing.assert_close(pool(hidden, lengths, "mean")[0], hidden[0, :2].mean(0))

    tokenizer = RaterTokenizer(tiny_model_dir)
    backbone = load_backbone(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    for pooling in ("last", "mean"):
        model = RaterModel(backbone, ["a", "b"], pooling)
        torch.nn.init.normal_(model.heads.weight, generator=torch.Generator().manual_seed(0))
        texts = ["1 2 3 the", "the a of and to in that it was"]
        framed = [frame(ids, tokenizer.bos_id) for ids in tokenizer.encode(texts)]
        together = model(*pad_batch(framed, tokenizer.pad_id))
        alone = torch.cat([model(*pad_batch([f], tokenizer.pad_id)) for f in framed])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def normal_draw(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """``normal(0, std)`` float32 CPU draws of a generator seeded with ``seed``."""
    return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def test_rater_heads_start_as_quratings_score_layer_and_train_the_backbone_at_once(
        tiny_model_dir):
    """QuRating's score layer gets Hugging Face's init, normal(0, initializer_range), not
    zeros: with zero heads the first step gives the backbone no gradient at all (the gradient
    reaching the hidden states is the head weight). The draw is the generator's, so the same
    seed gives the same head and building a model leaves the global RNG alone."""
    backbone = load_backbone(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    criteria = ["educational_value", "writing_style"]
    global_rng = torch.get_rng_state()
    model = RaterModel(backbone, criteria, "last")
    assert torch.equal(torch.get_rng_state(), global_rng)
    # No generator: one seeded with 0; std 0.02, the default (the Llama configs' value).
    assert torch.equal(model.heads.weight, normal_draw((2, 64), 0.02, 0))
    seeded = RaterModel(backbone, criteria, "last", init_std=0.05,
                        generator=torch.Generator().manual_seed(7))
    assert torch.equal(seeded.heads.weight, normal_draw((2, 64), 0.05, 7))
    again = RaterModel(backbone, criteria, "last", init_std=0.05,
                       generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.heads.weight, seeded.heads.weight)
    # bf16 weights hold the same draw, rounded.
    half = RaterModel(load_backbone(tiny_model_dir, device=torch.device("cpu"),
                                    dtype=torch.bfloat16), criteria, "last")
    assert half.heads.weight.dtype == torch.bfloat16
    assert torch.equal(half.heads.weight, normal_draw((2, 64), 0.02, 0).to(torch.bfloat16))

    # One Bradley-Terry step: every criterion's head and the backbone get a gradient.
    model.train().requires_grad_(True)
    tokenizer = RaterTokenizer(tiny_model_dir)
    framed = [frame(ids, tokenizer.bos_id) for ids in tokenizer.encode(
        ["1 2 3 4 the", "the a of and to"])]
    s_a, s_b = model(*pad_batch(framed, tokenizer.pad_id)).split(1)
    bradley_terry_loss(s_a, s_b, torch.tensor([[0.9, 0.1]])).backward()
    assert model.heads.weight.grad.abs().min() > 0
    for name, parameter in model.backbone.named_parameters():
        if name.startswith("layers."):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert (s_a - s_b).abs().min() > 0  # the pair does not start at p = 0.5 exactly


def test_the_head_init_std_is_the_backbone_configs_initializer_range(tiny_model_dir, tmp_path):
    from acadlm_plugins.qurating.rater import DEFAULT_HEAD_INIT_STD, head_init_std

    assert DEFAULT_HEAD_INIT_STD == 0.02
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["initializer_range"] == 0.02 and head_init_std(tiny_model_dir) == 0.02
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    for value, want in ((0.05, 0.05), (1, 1.0), (None, DEFAULT_HEAD_INIT_STD)):
        (folder / "config.json").write_text(json.dumps({**config, "initializer_range": value}))
        assert head_init_std(folder) == want, value
    del config["initializer_range"]
    (folder / "config.json").write_text(json.dumps(config))
    assert head_init_std(folder) == DEFAULT_HEAD_INIT_STD
    for bad in (0, -0.02, "0.02", True):
        (folder / "config.json").write_text(json.dumps({**config, "initializer_range": bad}))
        with pytest.raises(ConfigError, match=r"config `backbone_dir`: .*initializer_range "
                                              rf"{re.escape(repr(bad))}"):
            head_init_std(folder)


def test_save_and_load_round_trip_gives_identical_scores(tiny_model_dir, tmp_path):
    backbone = load_backbone(tiny_model_dir, device=torch.device("cpu"), dtype=torch.float32)
    model = RaterModel(backbone, ["educational_value", "writing_style"], "mean")
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.weight, generator=torch.Generator().manual_seed(1))
        model.backbone.layers[0].mlp.w1.weight.mul_(1.5)  # differs from the source folder
    folder = save_rater(tmp_path / "rater", model.state_dict(), criteria=model.criteria,
                        pooling="mean", max_tokens=64, source_dir=tiny_model_dir,
                        training_info={"step": 0})
    assert {p.name for p in folder.iterdir()} == {BACKBONE_DIRNAME, "rater_heads.pt",
                                                  "rater.json"}
    assert (folder / BACKBONE_DIRNAME / "tokenizer.json").is_file()
    loaded = load_rater(folder)
    assert loaded.info.criteria == model.criteria and loaded.info.pooling == "mean"
    texts = ["1 2 3 4 5 the", "of and to in that"]
    framed = [frame(ids, loaded.tokenizer.bos_id) for ids in loaded.tokenizer.encode(texts)]
    batch = pad_batch(framed, loaded.tokenizer.pad_id)
    with torch.no_grad():
        assert torch.equal(loaded.model(*batch), model.eval()(*batch))


# ------------------------------------------------------------------------------ the recipe
def rater_args(tmp_path: Path, model_dir: Path, judgments: Path, *overrides: str) -> list[str]:
    return ["--config", str(TINY_RATER_CONFIG), f"backbone_dir={model_dir}",
            f"judgments={judgments}", f"output_dir={tmp_path / 'run'}", *overrides]


def run_in_process(monkeypatch, args: list[str]) -> dict:
    output_dir = run_recipe_main(monkeypatch, "acadlm_plugins.rater_recipe", args)
    return json.loads((output_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One process, 30 steps of 16 pairs on synthetic judgments: (judgments, output_dir)."""
    root = tmp_path_factory.mktemp("trained")
    judgments = write_synthetic_judgments(root / "judgments.jsonl")
    with pytest.MonkeyPatch.context() as monkeypatch, torch_threads(1):
        monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
        run_in_process(monkeypatch, rater_args(root, tiny_model_dir, judgments, *TRAINING))
    return judgments, root / "run"


TRAINING = ("max_steps=30", "batch_size=16", "eval_every_n_steps=30", "save_every_n_steps=30")


def unseen_scores(rater_dir: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Scores of 200 fresh synthetic texts, their hidden quality, and the criteria."""
    rater = load_rater(rater_dir)
    rng = random.Random(12345)
    texts, quality = zip(*(synthetic_text(rng) for _ in range(200)))
    framed = [frame(ids, rater.tokenizer.bos_id) for ids in rater.tokenizer.encode(texts)]
    with torch.no_grad():
        scores = rater.model(*pad_batch(framed, rater.tokenizer.pad_id)).numpy()
    return scores, np.array(quality), rater.info.criteria


def initial_heldout_metrics(model_dir: Path, judgments: Path, *, seed: int = 0,
                            heads: torch.Tensor | None = None
                            ) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out accuracy and loss per criterion of the rater the tiny config starts from: the
    backbone with heads drawn from normal(0, initializer_range) by a generator seeded with
    the run's ``seed`` (or set to ``heads``), scored in eval batches of 64 as the recipe scores
    them."""
    from acadlm_plugins.qurating.rater import head_init_std, pairwise_correct, split_scores

    tokenizer = RaterTokenizer(model_dir)
    data = PairwiseJudgments.build(*read_judgments(judgments), tokenizer, margin=0.25,
                                   validation_fraction=0.2, max_tokens=64)
    backbone = load_backbone(model_dir, device=torch.device("cpu"), dtype=torch.float32,
                             max_seq_len=65)
    model = RaterModel(backbone, data.criteria, "last", init_std=head_init_std(model_dir),
                       generator=torch.Generator().manual_seed(seed)).eval()
    if heads is not None:
        with torch.no_grad():
            model.heads.weight.copy_(heads)
    sums = torch.zeros(3, len(data.criteria), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(data.heldout_indices), 64):
            batch = data.collate(data.heldout_indices[start:start + 64])
            s_a, s_b = split_scores(model(batch["tokens"], batch["lengths"]))
            mask = batch["mask"].double()
            correct = pairwise_correct(s_a, s_b, batch["targets"]).double()
            losses = bradley_terry_loss(s_a, s_b, batch["targets"], reduction="none").double()
            sums += torch.stack([(correct * mask).sum(0), mask.sum(0), (losses * mask).sum(0)])
    return ({name: float(sums[0, c] / sums[1, c]) for c, name in enumerate(data.criteria)},
            {name: float(sums[2, c] / sums[1, c]) for c, name in enumerate(data.criteria)})


def test_a_rater_trained_on_synthetic_judgments_recovers_the_hidden_ranking(trained,
                                                                           tiny_model_dir):
    judgments, run = trained
    summary = json.loads((run / "summary.json").read_text())
    # Before training: the backbone with its seeded normal(0, 0.02) heads, whose random
    # preferences are not the zero heads' ties (accuracy 0.5, loss log 2 on every pair).
    accuracy, loss = initial_heldout_metrics(tiny_model_dir, judgments, seed=0)
    assert summary["heldout_accuracy_before"] == accuracy
    assert summary["heldout_loss_before"] == pytest.approx(loss, rel=1e-6)
    for criterion in accuracy:
        assert summary["heldout_loss_before"][criterion] != pytest.approx(math.log(2),
                                                                          rel=1e-6)
    for criterion, accuracy in summary["heldout_accuracy_after"].items():
        assert accuracy > 0.9, criterion
    assert summary["pairs"]["heldout_pairs"] > 50
    # 600 pairs of 300 texts: most held-out pairs show a text a training pair shows too.
    _, pairs = read_judgments(run.parent / "judgments.jsonl")
    pairs = [p for p in pairs if abs(p.p_b[0] - 0.5) >= 0.25 - 1e-9]  # the tiny config's margin
    held = [is_held_out(p.pair_id, 0.2) for p in pairs]  # and validation_fraction
    assert held.count(True) == summary["pairs"]["heldout_pairs"]
    training = {d for p, h in zip(pairs, held) if not h for d in (p.doc_id_a, p.doc_id_b)}
    sharing = sum(p.doc_id_a in training or p.doc_id_b in training
                  for p, h in zip(pairs, held) if h)
    assert summary["heldout_pairs_sharing_a_training_document"] == sharing > 0
    assert summary["pairs"]["heldout_pairs_sharing_a_training_document"] == sharing
    assert json.loads((run / "rater" / "rater.json").read_text())["training"]["pairs"][
        "heldout_pairs_sharing_a_training_document"] == sharing
    logged = "\n".join(p.read_text() for p in (run / "logs").glob("*.txt"))
    assert "heldout_acc/educational_value:" in logged and "heldout_acc/writing_style:" in logged
    assert json.loads((run / "rater" / "rater.json").read_text())["training"][
        "heldout_accuracy"] == summary["heldout_accuracy_after"]

    # Texts the rater never saw: its scores rank them by the hidden quality.
    scores, quality, criteria = unseen_scores(run / "rater")
    educational = spearman(scores[:, criteria.index("educational_value")], quality)
    style = spearman(scores[:, criteria.index("writing_style")], quality)
    print(f"held-out accuracy {summary['heldout_accuracy_after']}, Spearman on unseen texts: "
          f"educational_value {educational:.3f}, writing_style {style:.3f}")
    assert educational > 0.9
    assert style < -0.9, "the second head learned the opposite preference"


def test_the_recipe_draws_the_heads_with_its_seed_and_the_backbones_initializer_range(
        tiny_model_dir, tmp_path, monkeypatch):
    """The recipe builds its rater with heads drawn from normal(0, initializer_range of the
    backbone's config.json) by a generator seeded with the run's ``seed``. With seed 0 and
    0.02 (the tiny config's and the tiny backbone's) that is also RaterModel's default, so
    this run sets neither: the heads it starts from, kept as they are by a learning rate of
    0 and exported, are the draw of seed 5 at std 0.07, and so are its before-training
    held-out metrics."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "initializer_range": 0.07}))
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_texts=60,
                                          num_pairs=120)
    summary = run_in_process(monkeypatch, rater_args(
        tmp_path, folder, judgments, "seed=5", "max_steps=1", "batch_size=4",
        "optimizer.lr=0.0", "head_lr=null", "eval_every_n_steps=1", "save_every_n_steps=1"))
    heads = normal_draw((2, 64), 0.07, 5)
    exported = torch.load(tmp_path / "run" / "rater" / "rater_heads.pt", weights_only=True)
    assert torch.equal(exported["weight"], heads)
    accuracy, loss = initial_heldout_metrics(folder, judgments, heads=heads)
    assert summary["heldout_accuracy_before"] == accuracy
    assert summary["heldout_loss_before"] == pytest.approx(loss, rel=1e-6)
    # RaterModel's defaults (seed 0, std 0.02) would have started elsewhere.
    _, default_loss = initial_heldout_metrics(folder, judgments,
                                              heads=normal_draw((2, 64), 0.02, 0))
    assert summary["heldout_loss_before"] != pytest.approx(default_loss, rel=1e-6)


@pytest.mark.distributed
def test_tune_run_on_two_processes_trains_the_same_rater(tiny_model_dir, trained, tmp_path):
    """2 ranks x 8 pairs draw the global batches of 1 process x 16: same training."""
    judgments, single = trained
    args = rater_args(tmp_path, tiny_model_dir, judgments, *TRAINING, "batch_size=8")
    run_tune_subprocess("acadlm_plugins/rater_recipe", args, cwd=tmp_path,
                        log_file=tmp_path / "rater.log", nproc=2)
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert two["heldout_accuracy_after"] == pytest.approx(one["heldout_accuracy_after"], abs=0.02)
    scores_one, _, _ = unseen_scores(single / "rater")
    scores_two, _, _ = unseen_scores(tmp_path / "run" / "rater")
    np.testing.assert_allclose(scores_two, scores_one, rtol=1e-3, atol=1e-3)
    assert (tmp_path / "run" / "step_000030" / "recipe_state.pt").is_file()


class Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def test_a_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Killed after step 3 of 6 and rerun: the same weights as an uninterrupted run. The run
    uses a non-default seed (the pair order) and a warmup + cosine schedule, both of which the
    checkpoint must carry; another seed on resume is refused."""
    import acadlm_plugins.rater_recipe as recipe

    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=120)
    common = ("max_steps=6", "save_every_n_steps=3", "eval_every_n_steps=3", "batch_size=4",
              "log_every_n_steps=1", "seed=7",
              ("lr_scheduler._component_=torchtune.training.lr_schedulers."
               "get_cosine_schedule_with_warmup"), "lr_scheduler.num_warmup_steps=2")
    straight = tmp_path / "straight"
    run_in_process(monkeypatch, rater_args(straight, tiny_model_dir, judgments, *common))
    resumed = tmp_path / "resumed"
    save = recipe.RaterRecipe.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self._step == 3:
            raise Killed
        return path

    with monkeypatch.context() as patched:
        patched.setattr(recipe.RaterRecipe, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            run_in_process(patched, rater_args(resumed, tiny_model_dir, judgments, *common))
    assert latest_checkpoint(resumed / "run").name == "step_000003"
    summary = run_in_process(monkeypatch, rater_args(resumed, tiny_model_dir, judgments,
                                                     *common))
    assert summary["steps"] == 6

    want, got = load_rater(straight / "run" / "rater"), load_rater(resumed / "run" / "rater")
    for (name, a), (_, b) in zip(want.model.state_dict().items(), got.model.state_dict().items()):
        assert torch.equal(a, b), name
    state = json.loads((resumed / "run" / "rater" / "rater.json").read_text())
    assert state["training"]["step"] == 6
    logged = {run: re.findall(r"lr:(\S+)", "".join(
        p.read_text() for p in sorted((run / "run" / "logs").glob("*.txt"))))
        for run in (straight, resumed)}
    assert len(logged[straight]) == 6 and logged[straight] == logged[resumed]
    assert len(set(logged[straight])) > 2  # the schedule moved the rate

    more = [a for a in common if not a.startswith("max_steps=")] + ["max_steps=9"]
    with pytest.raises(ConfigError, match="config `margin`: differs from the checkpoint"):
        run_in_process(monkeypatch, rater_args(resumed, tiny_model_dir, judgments,
                                               *more, "margin=0.3"))
    # The seed orders the pairs of every epoch: another seed would train on another order.
    with pytest.raises(ConfigError, match=r"config `seed`: differs from the checkpoint .*"
                                          r"was 7, is 8"):
        run_in_process(monkeypatch, rater_args(resumed, tiny_model_dir, judgments,
                                               *more, "seed=8"))
    # Another split trains on other pairs; the key left out is its default, `pairs` (so the
    # difference found is the seed's, which comes after it).
    with pytest.raises(ConfigError, match=r"config `validation_split`: differs from the "
                                          r"checkpoint .*was pairs, is documents"):
        run_in_process(monkeypatch, rater_args(resumed, tiny_model_dir, judgments,
                                               *more, "validation_split=documents"))
    with pytest.raises(ConfigError, match=r"config `seed`: differs from the checkpoint"):
        run_in_process(monkeypatch, rater_args(resumed, tiny_model_dir, judgments,
                                               *more, "~validation_split", "seed=8"))


JUDGED_RUN = ("batch_size=4", "save_every_n_steps=1", "eval_every_n_steps=100")


def test_a_resumed_run_on_replaced_backbone_weights_is_refused_naming_backbone_dir(
        tiny_model_dir, tmp_path, monkeypatch):
    """The backbone folder rewritten at the same path with other weights (same config and
    tokenizer): the checkpoint was trained from the old ones, so resuming would export a rater
    that names this folder as its source but was not trained from it. With the folder's
    weights restored the run resumes."""
    backbone = Path(shutil.copytree(tiny_model_dir, tmp_path / "backbone"))
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    run_in_process(monkeypatch, rater_args(tmp_path, backbone, judgments, "max_steps=2",
                                           *JUDGED_RUN))
    write_tiny_checkpoint(backbone, seed=1)  # same architecture, other weights
    with pytest.raises(ConfigError, match=r"config `backbone_dir`: the starting model in .* "
                                          r"changed since the checkpoints .*model\.safetensors.*"
                                          r"Fix: choose a new `output_dir`.* or restore"):
        run_in_process(monkeypatch, rater_args(tmp_path, backbone, judgments, "max_steps=3",
                                               *JUDGED_RUN))
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    shutil.copy2(tiny_model_dir / "model.safetensors", backbone / "model.safetensors")
    summary = run_in_process(monkeypatch, rater_args(tmp_path, backbone, judgments,
                                                     "max_steps=3", *JUDGED_RUN))
    assert summary["steps"] == 3


def lowercase_the_text(backbone: Path) -> None:
    """The same vocabulary, another tokenization: texts are lower-cased first."""
    spec = json.loads((backbone / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (backbone / "tokenizer.json").write_text(json.dumps(spec))


def frame_with_another_bos(backbone: Path) -> None:
    """The same tokenizer.json, another BOS (which the rater puts before every text)."""
    config = json.loads((backbone / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|endoftext|>"
    (backbone / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("swap, changed", [(lowercase_the_text, "tokenizer.json"),
                                           (frame_with_another_bos, "tokenizer_config.json")])
def test_a_resumed_run_on_a_replaced_tokenizer_is_refused_naming_backbone_dir(
        tiny_model_dir, tmp_path, monkeypatch, swap, changed):
    """The rater reads its tokenizer from backbone_dir on every run: one swapped for another
    with the same vocabulary (the weights untouched) would silently tokenize the rest of the
    run, and the exported rater, another way."""
    backbone = Path(shutil.copytree(tiny_model_dir, tmp_path / "backbone"))
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    run_in_process(monkeypatch, rater_args(tmp_path, backbone, judgments, "max_steps=2",
                                           *JUDGED_RUN))
    swap(backbone)
    assert RaterTokenizer(backbone).vocab_size == RaterTokenizer(tiny_model_dir).vocab_size
    with pytest.raises(ConfigError, match=rf"config `backbone_dir`: the tokenizer in .* changed "
                                          rf"since the checkpoints .*{re.escape(changed)}.*"
                                          r"Fix: choose a new `output_dir`.* or restore the "
                                          r"backbone folder's tokenizer files"):
        run_in_process(monkeypatch, rater_args(tmp_path, backbone, judgments, "max_steps=3",
                                               *JUDGED_RUN))
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"


def test_a_checkpoint_without_a_backbone_fingerprint_resumes(tiny_model_dir, tmp_path,
                                                             monkeypatch):
    """A checkpoint records the backbone's fingerprint; one written before that was recorded
    resumes unchecked, and the resumed run's checkpoints record none either (as the other
    recipes treat a checkpoint without ``starting_weights``)."""
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments, "max_steps=2",
                                           *JUDGED_RUN))
    state_file = latest_checkpoint(tmp_path / "run") / "recipe_state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state[STARTING_WEIGHTS_KEY]["files"]["model.safetensors"]["sha256"]
    assert state["backbone_tokenizer"]["files"]["tokenizer.json"]["sha256"]
    del state[STARTING_WEIGHTS_KEY], state["backbone_tokenizer"]
    torch.save(state, state_file)
    summary = run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                                     "max_steps=3", *JUDGED_RUN))
    assert summary["steps"] == 3
    state = torch.load(latest_checkpoint(tmp_path / "run") / "recipe_state.pt",
                       weights_only=False)
    assert state[STARTING_WEIGHTS_KEY] is None and state["backbone_tokenizer"] is None


def test_a_resumed_run_on_changed_judgments_is_refused_naming_judgments(tiny_model_dir,
                                                                         tmp_path, monkeypatch):
    """The checkpoint's data position indexes the pairs as read: the same judgments file
    extended from 40 to 60 pairs would silently continue on another pair set."""
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments, "max_steps=2",
                                           *JUDGED_RUN))
    write_synthetic_judgments(judgments, num_pairs=60)  # the same 40 pairs and 20 more
    with pytest.raises(ConfigError, match=r"config `judgments`: holds other pairs than the "
                                          r"judgments the checkpoint .* 40 pairs .* 60 pairs.*"
                                          r"Fix: restore the judgments file"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "max_steps=3", *JUDGED_RUN))
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"


def test_the_same_judgments_under_another_path_resume(tiny_model_dir, tmp_path, monkeypatch):
    """Judgments are compared by content: the file spelled relative to the working directory,
    or a byte copy elsewhere, resumes. A checkpoint of an older version recorded only the
    configured path: it resumes when the path names the same file, however spelled, and is
    refused (naming `judgments`) for another file."""
    (tmp_path / "data").mkdir()
    judgments = write_synthetic_judgments(tmp_path / "data" / "judgments.jsonl", num_pairs=40)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(judgments.read_bytes())
    run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments, "max_steps=2",
                                           *JUDGED_RUN))
    monkeypatch.chdir(tmp_path)
    relative = Path("data/../data/judgments.jsonl")
    summary = run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, relative,
                                                     "max_steps=3", *JUDGED_RUN))
    assert summary["steps"] == 3
    summary = run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, copy,
                                                     "max_steps=4", *JUDGED_RUN))
    assert summary["steps"] == 4

    state_file = latest_checkpoint(tmp_path / "run") / "recipe_state.pt"
    state = torch.load(state_file, weights_only=False)
    state["config"].pop("judgments_content", None)
    state["config"]["judgments"] = str(copy)
    torch.save(state, state_file)
    with pytest.raises(ConfigError, match=r"config `judgments`: differs from the checkpoint"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "max_steps=5", *JUDGED_RUN))
    summary = run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir,
                                                     Path("copy.jsonl"), "max_steps=5",
                                                     *JUDGED_RUN))
    assert summary["steps"] == 5


def test_a_nan_loss_stops_the_run_before_any_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import acadlm_plugins.rater_recipe as recipe

    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=60)
    monkeypatch.setattr(recipe, "bradley_terry_loss",
                        lambda s_a, *a, **k: (s_a * float("nan")).sum())
    with pytest.raises(NonFiniteLossError, match="`loss` is nan at step 1"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "max_steps=2"))
    assert latest_checkpoint(tmp_path / "run") is None


def test_config_mistakes_are_named(tiny_model_dir, tmp_path, monkeypatch):
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=20)
    with pytest.raises(ConfigError, match="did you mean `margin`"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "+margn=0.3"))
    with pytest.raises(ConfigError, match="config `pooling`: unknown pooling 'max'"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "pooling=max"))
    with pytest.raises(ConfigError, match=r"config `backbone_dir`: .* \(no config.json\)"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               f"backbone_dir={tmp_path}"))
    with pytest.raises(DataError, match="none of the 1 judged pairs"):
        flat = tmp_path / "flat.jsonl"
        flat.write_text(json.dumps({"pair_id": "x", "text_a": "a", "text_b": "b",
                                    "judgments": {"educational_value": 0.6}}) + "\n")
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, flat))


@pytest.mark.parametrize(("override", "key", "problem"), [
    ("margin=abc", "margin", "is 'abc', not a number"),
    ("validation_fraction=0.1x", "validation_fraction", "is '0.1x', not a number"),
    ("validation_split=docs", "validation_split", "unknown value 'docs'"),
    ("margin=-0.1", "margin", "is -0.1, below its minimum"),
    ("seed=abc", "seed", "is 'abc', not an integer"),
    ("head_lr=fast", "head_lr", "is 'fast', not a number"),
    ("clip_grad_norm=-1.0", "clip_grad_norm", "is -1.0; it must be above 0"),
    ("criteria={educational_value: 1}", "criteria",
     "is {'educational_value': 1}, not a list of criterion names"),
])
def test_a_value_of_the_wrong_type_is_named_before_anything_is_written(
        tiny_model_dir, tmp_path, monkeypatch, override, key, problem):
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=20)
    with pytest.raises(ConfigError, match=rf"config `{key}`: {re.escape(problem)}.* Fix:"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments, override))
    assert not (tmp_path / "run").exists()


def test_one_criterion_given_as_a_string_trains_that_criterion(tiny_model_dir, tmp_path,
                                                               monkeypatch):
    """``criteria=educational_value`` is one criterion (as the judge reads it), not the list
    of its characters."""
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    summary = run_in_process(monkeypatch, rater_args(
        tmp_path, tiny_model_dir, judgments, "criteria=educational_value", "max_steps=1",
        "batch_size=4", "eval_every_n_steps=1", "save_every_n_steps=1"))
    assert summary["criteria"] == ["educational_value"]
    assert load_rater(tmp_path / "run" / "rater").info.criteria == ("educational_value",)


def test_the_rater_trains_with_8bit_adamw_states(tiny_model_dir, tmp_path, monkeypatch):
    """The optimizer switch reaches the rater recipe too: 8-bit states, and it still learns."""
    import torch

    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=120)
    summary = run_in_process(monkeypatch, rater_args(
        tmp_path, tiny_model_dir, judgments, "max_steps=6", "batch_size=16",
        "save_every_n_steps=6", "optimizer._component_=torchao.optim.AdamW8bit"))
    assert summary["steps"] == 6
    state = torch.load(latest_checkpoint(tmp_path / "run") / "recipe_state.pt",
                       weights_only=False)["optimizer"]["state"]
    assert "OptimState8bit" in {type(s["exp_avg"]).__name__ for s in state.values()}


# ---------------------------------------------------------------- other model families
@pytest.fixture(scope="module")
def qwen2_backbone(tmp_path_factory) -> Path:
    """A 2-layer random Qwen2 (q/k/v biases, half-split RoPE, θ 1e6) with a tokenizer that,
    like Qwen2.5's, names its BOS only in generation_config.json."""
    folder = write_family("qwen2", tmp_path_factory.mktemp("qwen2_rater") / "model",
                          vocab_size=512, num_hidden_layers=2)
    return write_family_tokenizer("qwen2", folder)


def test_a_qwen2_backbone_trains_and_exports_a_rater_transformers_reads_as_qwen2(
        qwen2_backbone, tmp_path, monkeypatch):
    """The rater builds its backbone through the family layer: Qwen2's biases train, the
    export is converted with Qwen2's own weight conversion (no Llama q/k permutation), and
    transformers computes the exported backbone as the rater does."""
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=120)
    summary = run_in_process(monkeypatch, rater_args(
        tmp_path, qwen2_backbone, judgments, "max_steps=4", "batch_size=8",
        "save_every_n_steps=4", "eval_every_n_steps=4"))
    assert summary["steps"] == 4
    rater_dir = tmp_path / "run" / "rater"
    rater = load_rater(rater_dir)
    assert rater.tokenizer.bos_id == 0  # Qwen's <|endoftext|>, from generation_config.json
    exported = rater_dir / BACKBONE_DIRNAME
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen2"
    source = hf_model_spec(qwen2_backbone).load()
    trained_bias = rater.model.backbone.layers[0].attn.q_proj.bias
    assert not torch.equal(trained_bias, source.layers[0].attn.q_proj.bias)
    ids = tokens(40, 512)
    with torch.no_grad():
        ours = rater.model.backbone(ids)
        assert (ours - transformers_logits(exported, ids)).abs().max() < TOLERANCE
        assert (ours - source(ids)).abs().max() > 1e-3, "training left the backbone unchanged"
    framed = [frame(t, rater.tokenizer.bos_id) for t in rater.tokenizer.encode(["1 2 3 the"])]
    with torch.no_grad():
        assert torch.isfinite(rater.model(*pad_batch(framed, rater.tokenizer.pad_id))).all()


def test_an_unsupported_backbone_family_is_refused_naming_the_config_field(tmp_path,
                                                                          monkeypatch):
    folder = tmp_path / "qwen3"
    folder.mkdir()
    config = {**FAMILY_CONFIGS["qwen2"]().to_dict(), "model_type": "qwen3", "head_dim": 16}
    (folder / "config.json").write_text(json.dumps(config))
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=20)
    with pytest.raises(ConfigError, match=r"config `backbone_dir`: .*config `model_type`: "
                                          r".*'qwen3' is not supported") as refused:
        run_in_process(monkeypatch, rater_args(tmp_path, folder, judgments))
    assert refused.value.key == "backbone_dir"


def test_an_output_dir_inside_the_backbone_is_refused_before_loading(tmp_path, monkeypatch):
    """torchtune's checkpointer refused it with a traceback once the judgments and the model
    had loaded."""
    model = write_tiny_model_dir(tmp_path / "model", weight_std=None)
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=20)
    with pytest.raises(ConfigError) as refused:
        run_in_process(monkeypatch, rater_args(tmp_path, model, judgments,
                                               f"output_dir={model / 'rater'}"))
    assert refused.value.key == "output_dir" and "backbone_dir" in str(refused.value)
    assert not (model / "rater").exists()


# ------------------------------------------------------------------------ export: best
def test_the_best_saved_evaluation_is_the_highest_mean_accuracy_of_a_saved_step():
    """Step 0 (the untrained rater) and steps without a checkpoint are not candidates; the
    earliest of equal means wins, as the Hugging Face Trainer keeps its first best."""
    from acadlm_plugins.rater_recipe import best_saved_evaluation

    def evaluation(step, a, b):
        return {"step": step, "accuracy": {"x": a, "y": b}}

    history = [evaluation(0, 0.9, 0.9), evaluation(2, 0.5, 0.75), evaluation(3, 0.99, 0.99),
               evaluation(4, 0.75, 0.5), evaluation(6, 0.625, 0.625), evaluation(8, 0.5, 0.5)]
    assert best_saved_evaluation(history, save_every=2, max_steps=8)["step"] == 2
    assert best_saved_evaluation(history, save_every=1, max_steps=8)["step"] == 3
    assert best_saved_evaluation(history[:1], save_every=1, max_steps=8) is None


@pytest.mark.parametrize("overrides, words", [
    (["export=first"], "not one of last, best"),
    (["export=best", "validation_fraction=0"], "no held-out accuracy"),
    (["export=best", "save_every_n_steps=3", "eval_every_n_steps=2"],
     "a multiple of `eval_every_n_steps`"),
])
def test_an_export_that_cannot_choose_is_refused_naming_export(tiny_model_dir, tmp_path,
                                                               monkeypatch, overrides, words):
    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=40)
    with pytest.raises(ConfigError, match="config `export`") as err:
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               "max_steps=6", *overrides))
    assert words in str(err.value)
    assert not (tmp_path / "run").exists()


def test_export_best_exports_the_best_checkpoint_and_keeps_it(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    """`export: best` (TrainQuRater.sh's --load_best_model_at_end): the exported rater is the
    saved step with the best mean held-out accuracy, and its checkpoint survives
    `keep_last_n_checkpoints: 1`; a resume may not switch back to `last`."""
    from acadlm_plugins.rater_recipe import best_saved_evaluation

    judgments = write_synthetic_judgments(tmp_path / "judgments.jsonl", num_pairs=120)
    common = ("max_steps=6", "save_every_n_steps=1", "eval_every_n_steps=1", "batch_size=4",
              "keep_last_n_checkpoints=1", "optimizer.lr=3e-2", "export=best")
    summary = run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                                     *common))
    run = tmp_path / "run"
    history = torch.load(latest_checkpoint(run) / "recipe_state.pt",
                         weights_only=False)["history"]["evaluations"]
    best = best_saved_evaluation(history, save_every=1, max_steps=6)
    assert summary["export"] == "best" and summary["exported_step"] == best["step"]
    assert summary["heldout_accuracy_exported"] == best["accuracy"]
    kept = sorted(p.name for p in run.glob("step_*"))
    assert kept == sorted({"step_000006", f"step_{best['step']:06d}"})
    exported = load_rater(run / "rater").model.state_dict()
    source = load_rater(run / f"step_{best['step']:06d}" / "rater").model.state_dict()
    for name, value in source.items():
        assert torch.equal(exported[name], value), name
    # at this learning rate the last step is not the best one (step 4 of 6 here), so the
    # export differs from what `export: last` gives
    assert best["step"] != 6
    with pytest.raises(ConfigError, match=r"config `export`: differs from the checkpoint"):
        run_in_process(monkeypatch, rater_args(tmp_path, tiny_model_dir, judgments,
                                               *[a for a in common if a != "export=best"],
                                               "max_steps=7"))
