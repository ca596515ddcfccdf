"""Tiny, self-contained training setups for fast tests: a byte tokenizer, a 2-layer 64-dim
random Llama checkpoint in Hugging Face format, and a small multi-domain corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TINY_VOCAB = 512
REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny" / "continued_pretrain.yaml"


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


def run_tune_subprocess(recipe: str, args: list[str], *, cwd: Path, log_file: Path,
                        nproc: int = 1, timeout: int = 240) -> None:
    """``tune run [--nproc_per_node N] <recipe> <args>`` in a subprocess, as a user runs it.

    Fails the calling test with the log's tail when the run fails or hangs (a collective that
    not every rank reached).
    """
    import os
    import subprocess
    import sys

    import pytest

    tune = Path(sys.executable).with_name("tune")
    launcher = [str(tune), "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
           "OMP_NUM_THREADS": "1", "ACADLM_NO_PROGRESS": "1",
           "ACADLM_PLUGINS_DISABLE_AUTOLOAD": "1"}

    def tail() -> str:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-60:])

    with open(log_file, "w") as handle:
        try:
            done = subprocess.run([*launcher, recipe, *args], cwd=cwd, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`tune run` (nproc={nproc}) hung for {timeout} s:\n{tail()}")
    assert done.returncode == 0, f"`tune run` (nproc={nproc}) failed:\n{tail()}"
