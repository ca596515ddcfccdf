"""Tiny, self-contained training setups for fast tests: a byte tokenizer, a 2-layer 64-dim
random Llama checkpoint in Hugging Face format, and a small multi-domain corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from omegaconf import OmegaConf

TINY_VOCAB = 512
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "continued_pretrain.yaml"
# The tiny config's AdamW learning rate, which bounds how far a weight can move per step.
TINY_LR = float(OmegaConf.load(TINY_CONFIG).optimizer.lr)


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 pad, 1 bos, 2 eos): enough of a ModelTokenizer for recipes."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259
    max_seq_len = None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def byte_tokenizer() -> ByteTokenizer:
    """Builder used by `_component_: tiny_setup.byte_tokenizer` in test configs."""
    return ByteTokenizer()


def write_tiny_checkpoint(model_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer, 64-dim Llama (tied embeddings) saved with transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=512, rope_theta=10_000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


_WORDS = {
    "prose": ["the", "a", "of", "and", "to", "in", "that", "it", "was", "he", "for", "on", "are", "as", "with", "his", "they", "at", "be", "this", "from"],
    "numbers": [str(n) for n in range(40)],
    "code": ["def", "return", "if", "else", "for", "in", "range", "print", "x", "y", "z", "(", ")", ":", "=", "+", "=="],
}


def write_tiny_corpus(root: Path, docs_per_domain: int = 24, seed: int = 0) -> Path:
    """``root/<domain>/{train,validation}.jsonl`` for three domains with different statistics."""
    rng = random.Random(seed)
    for domain, words in _WORDS.items():
        for split, count in (("train", docs_per_domain), ("validation", max(2, docs_per_domain // 6))):
            folder = root / domain
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{split}.jsonl", "w") as handle:
                for i in range(count):
                    text = " ".join(rng.choice(words) for _ in range(rng.randint(10, 120)))
                    handle.write(json.dumps({"text": text, "domain": domain,
                                             "source": "synthetic", "id": f"{domain}-{split}-{i}"})
                                 + "\n")
    return root


def tiny_run_args(tmp_path: Path, *overrides: str) -> list[str]:
    """Command-line arguments for the tiny continued-pretraining config in ``tmp_path``."""
    model_dir = tmp_path / "tiny_model"
    corpus = tmp_path / "tiny_corpus"
    if not model_dir.exists():
        write_tiny_checkpoint(model_dir)
    if not corpus.exists():
        write_tiny_corpus(corpus)
    return ["--config", str(TINY_CONFIG), f"output_dir={tmp_path / 'run'}",
            f"checkpointer.checkpoint_dir={model_dir}", f"dataset.data_dir={corpus}",
            f"validation_dataset.data_dir={corpus}", *overrides]


def _tune_command(recipe: str, args: list[str], nproc: int) -> tuple[list[str], dict[str, str]]:
    """The ``tune run`` command line and environment the subprocess tests launch: this repo and
    tests/ importable, one thread, no progress bars, no installed plugins, our errors as one
    line (no ``ACADLM_TRACEBACK``)."""
    import os
    import sys

    tune = Path(sys.executable).with_name("tune")
    launcher = [str(tune), "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1",
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1"}
    env.pop("ACADLM_TRACEBACK", None)
    return [*launcher, recipe, *args], env


def run_tune_expecting_failure(recipe: str, args: list[str], *, cwd: Path, nproc: int = 2,
                               timeout: int = 240) -> str:
    """``tune run [--nproc_per_node N] <recipe> <args>`` that must fail (a refusal, an error on
    some rank): its stdout and stderr together. Fails the calling test if it succeeds, or hangs
    (a rank left waiting in a collective)."""
    import subprocess

    import pytest

    command, env = _tune_command(recipe, args, nproc)
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"`tune run` (nproc={nproc}) hung for {timeout} s (a rank left waiting in a "
                    f"collective?):\n{hung.stdout}\n{hung.stderr}")
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"`tune run` (nproc={nproc}) succeeded:\n{output[-3000:]}"
    return output


def run_tune_subprocess(recipe: str, args: list[str], *, cwd: Path, log_file: Path,
                        nproc: int = 1, timeout: int = 240) -> None:
    """``tune run [--nproc_per_node N] <recipe> <args>`` in a subprocess, as a user runs it.

    Fails the calling test with the log's tail when the run fails or hangs (a collective that
    not every rank reached).
    """
    import subprocess

    import pytest

    command, env = _tune_command(recipe, args, nproc)

    def tail() -> str:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-60:])

    with open(log_file, "w") as handle:
        try:
            done = subprocess.run(command, cwd=cwd, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`tune run` (nproc={nproc}) hung for {timeout} s:\n{tail()}")
    assert done.returncode == 0, f"`tune run` (nproc={nproc}) failed:\n{tail()}"


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def assert_adam_runs_agree(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *,
                           lr: float, steps: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Two AdamW runs that saw the same batches, summed in another order (gloo's all-reduce adds
    the ranks' halves, one process the whole batch), end with the same weights: every tensor
    within ``rtol``/``atol`` in all but 0.1% of its elements, and no element further than AdamW
    can move it in ``steps`` steps of ``lr``. The allowance is for AdamW alone: it divides each
    gradient element by that element's running magnitude, so an element whose gradient is as
    small as the summation-order error takes a visibly different step (one element of 8,192
    by 3e-5 after 3 steps on an AVX-512/AMX Xeon). A sharding or reduction error moves whole
    rows, far more than 0.1% of a tensor."""
    assert got.keys() == want.keys()
    for name, value in want.items():
        close = torch.isclose(got[name], value, rtol=rtol, atol=atol)
        assert (~close).float().mean().item() <= 1e-3, (name, int((~close).sum()))
        assert (got[name] - value).abs().max().item() <= 2 * lr * steps, name


def write_tiny_tokenizer(model_dir: Path, vocab_size: int = TINY_VOCAB) -> Path:
    """A real byte-level BPE ``tokenizer.json`` (trained on the tiny corpus words, at most
    ``vocab_size`` <= TINY_VOCAB ids) plus a ``tokenizer_config.json`` with a ChatML template,
    written into ``model_dir`` so the tiny checkpoint is a complete Hugging Face model folder.

    Special ids match the tiny model's config: 0 ``<|endoftext|>`` (pad), 1 ``<|im_start|>``
    (bos), 2 ``<|im_end|>`` (eos). The files load with ``tokenizers``, torchtune's
    ``HuggingFaceBaseTokenizer`` and ``transformers.AutoTokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    assert vocab_size <= TINY_VOCAB
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(30))
             for words in _WORDS.values() for _ in range(40)]
    lines += ["Question: what is the answer?\nAnswer: the answer is 42.", "user", "assistant"]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "model_max_length": 512,
              "chat_template": TINY_CHAT_TEMPLATE}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


def write_tiny_model_dir(model_dir: Path, seed: int = 0, weight_std: float | None = 0.15) -> Path:
    """The tiny checkpoint together with its tokenizer: a folder lm-eval's ``hf`` model and
    our ``acadlm`` model both load.

    With ``weight_std`` every weight but the norms is redrawn from N(0, weight_std^2): at the
    default init (std 0.02) a random model repeats its last token forever, which makes stop
    sequences and greedy ties meaningless to test; larger weights give varied generations.
    """
    from safetensors.torch import load_file, save_file

    write_tiny_checkpoint(model_dir, seed=seed)
    if weight_std is not None:
        weights_file = model_dir / "model.safetensors"
        state = load_file(weights_file)
        generator = torch.Generator().manual_seed(seed)
        for name, tensor in state.items():
            if "norm" not in name:
                state[name] = torch.randn(tensor.shape, generator=generator) * weight_std
        save_file(state, weights_file, metadata={"format": "pt"})
    return write_tiny_tokenizer(model_dir)


# lm-eval's own task configs, fed small local files with their datasets' schemas. Each task
# keeps its built-in YAML (prompt templates, metrics, filters, generation settings) through
# `include:`; only where the documents come from changes.
BUILTIN_TASK_DOCS: dict[str, list[dict]] = {
    "arc_easy": [
        {"id": "q1", "question": "Which of these is a mammal?", "answerKey": "B",
         "choices": {"text": ["a trout", "a whale", "a snake", "a frog"],
                     "label": ["A", "B", "C", "D"]}},
        {"id": "q2", "question": "What does a plant need to make food?", "answerKey": "A",
         "choices": {"text": ["sunlight", "sand", "darkness", "salt"],
                     "label": ["A", "B", "C", "D"]}},
        {"id": "q3", "question": "Water freezes at what temperature in Celsius?",
         "answerKey": "3", "choices": {"text": ["100 degrees", "50 degrees", "0 degrees"],
                                        "label": ["1", "2", "3"]}},
        {"id": "q4", "question": "Which planet is closest to the Sun?", "answerKey": "D",
         "choices": {"text": ["Earth", "Mars", "Jupiter", "Mercury"],
                     "label": ["A", "B", "C", "D"]}},
    ],
    "lambada_openai": [
        {"text": "She poured the tea into the cup and handed it to her friend, who thanked her"},
        {"text": "The dog barked at the mailman every morning until the mailman brought a treat"},
        {"text": "After the long winter the farmers were finally able to plant their seeds"},
    ],
    "wikitext": [
        {"page": " = Valkyria Chronicles = \n Senjō no Valkyria is a tactical role @-@ playing "
                 "video game developed by Sega . It was released in January 2011 in Japan , "
                 "and is the third game in the series . \n"},
        {"page": " = Tropical Storm = \n The storm formed on June 1 , moved west , and "
                 "dissipated over land two days later ; damage was minor . \n"},
    ],
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
         "answer": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
        {"question": "A box holds 4 pens. How many pens are in 3 boxes?",
         "answer": "3 boxes hold 3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
        {"question": "Sara had 10 dollars and spent 7. How many dollars are left?",
         "answer": "She has 10 - 7 = <<10-7=3>>3 dollars left.\n#### 3"},
    ],
}
BUILTIN_TASK_YAML = {"arc_easy": "arc/arc_easy.yaml",
                     "lambada_openai": "lambada/lambada_openai.yaml",
                     "wikitext": "wikitext/wikitext.yaml", "gsm8k": "gsm8k/gsm8k.yaml"}


def write_builtin_task_configs(root: Path) -> dict[str, Path]:
    """For each task of ``BUILTIN_TASK_DOCS``: a jsonl of its documents and a YAML that
    includes lm-eval's built-in config and reads that file (``dataset_path: json``) for every
    split the config names. Returns task name -> YAML path, usable as an lm-eval task spec
    (``simple_evaluate(tasks=[str(path)], task_manager=TaskManager(include_defaults=False))``,
    which skips indexing lm-eval's thousands of built-in tasks). Nothing is downloaded."""
    import lm_eval.tasks
    import yaml

    builtin_dir = Path(lm_eval.tasks.__file__).parent
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for task, docs in BUILTIN_TASK_DOCS.items():
        data = root / f"{task}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        config = {"include": str(builtin_dir / BUILTIN_TASK_YAML[task]), "task": task,
                  "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {split: str(data) for split in
                                                    ("train", "validation", "test")},
                                     "cache_dir": str(root / "hf_datasets_cache")}}
        written[task] = root / f"{task}.yaml"
        written[task].write_text(yaml.safe_dump(config, sort_keys=False))
    return written


def spawn_two_gloo_ranks(main, tmp_path: Path) -> None:
    """Run ``main(rank, store_path, out_dir)`` in two spawned processes (one thread each), which
    join a gloo process group through a file store in ``tmp_path`` and write what the test
    reads into it."""
    import os

    import torch.multiprocessing as mp

    saved_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.start_processes(main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                           start_method="spawn", join=True)
    finally:
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
