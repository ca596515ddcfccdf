"""Tokenize a corpus once and reuse it: token arrays are cached on disk by content hash.

The cache key covers the data files' bytes, the tokenizer (its class, vocabulary size and the
ids it gives a probe sentence) and the BOS/EOS choice, so a changed file or tokenizer can never
serve stale tokens.

Cache entries get the permissions the user's umask gives any new file or folder (not the
0600/0700 of the temporary files they are written as), so a ``cache_dir`` shared by a group
works for everyone in it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from acadlm_plugins.data.documents import iter_texts
from acadlm_plugins.data.packing import TokenizedDocuments

log = logging.getLogger(__name__)

_PROBE = "The quick brown fox, déjà vu: def f(x):\n    return x ** 2  # 123"


def tokenize_texts(texts: Iterable[str], tokenizer, *, add_bos: bool = True,
                   add_eos: bool = True, desc: str = "tokenizing") -> TokenizedDocuments:
    """Encode every text with ``tokenizer.encode`` into one :class:`TokenizedDocuments`."""
    chunks = list(iter_token_arrays(texts, tokenizer, add_bos=add_bos, add_eos=add_eos,
                                    desc=desc))
    lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedDocuments(tokens, offsets)


def iter_token_arrays(texts: Iterable[str], tokenizer, *, add_bos: bool = True,
                      add_eos: bool = True, desc: str = "tokenizing",
                      batch_chars: int | None = None) -> Iterator[np.ndarray]:
    """Yield each text's token ids as an int32 array, in order, with a progress bar.

    Texts are encoded in groups of 64 when the tokenizer has ``encode_batch`` (a group also
    closes once it holds ``batch_chars`` characters, if given: a batch tokenizer's working
    memory grows with the text it is handed). Only one group is held at a time, so a caller
    that writes the arrays away keeps memory bounded.
    """
    batch_encode = getattr(tokenizer, "encode_batch", None)
    progress = tqdm(desc=desc, unit="doc", leave=False,
                    disable=os.environ.get("ACADLM_NO_PROGRESS") == "1")
    for group in _groups(texts, 64 if batch_encode else 1, max_chars=batch_chars):
        encoded = (batch_encode(group, add_bos=add_bos, add_eos=add_eos) if batch_encode else
                   [tokenizer.encode(group[0], add_bos=add_bos, add_eos=add_eos)])
        for ids in encoded:
            yield np.asarray(ids, dtype=np.int32)
        progress.update(len(group))
    progress.close()


def _groups(items: Iterable[str], size: int, *,
            max_chars: int | None = None) -> Iterable[list[str]]:
    group: list[str] = []
    chars = 0
    for item in items:
        group.append(item)
        chars += len(item)
        if len(group) == size or (max_chars is not None and chars >= max_chars):
            yield group
            group, chars = [], 0
    if group:
        yield group


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes whenever the tokenizer would tokenize differently: its class,
    vocabulary size, the ids of a probe text with BOS/EOS and, for a Hugging Face
    ``tokenizer.json`` tokenizer, its whole definition (a changed normalizer or merge list can
    leave the probe's ids as they were and still change other texts')."""
    probe = tokenizer.encode(_PROBE, add_bos=True, add_eos=True)
    vocab = getattr(tokenizer, "vocab_size", None)
    definition = hashlib.sha256(_tokenizer_definition(tokenizer).encode()).hexdigest()
    parts = f"{type(tokenizer).__qualname__}|{vocab}|{probe}|{definition}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def _tokenizer_definition(tokenizer) -> str:
    """The JSON of the Rust tokenizer under ours (``SmolLM2Tokenizer._base.tokenizer``) or
    torchtune's ``HuggingFaceBaseTokenizer`` (``.tokenizer``); empty for other tokenizers,
    whose fingerprint then rests on the probe."""
    for rust in (getattr(getattr(tokenizer, "_base", None), "tokenizer", None),
                 getattr(tokenizer, "tokenizer", None)):
        if callable(getattr(rust, "to_str", None)):
            return rust.to_str()
    return ""


def load_or_tokenize(files: Sequence[Path], tokenizer, *, text_field: str = "text",
                     cache_dir: str | Path | None = None, add_bos: bool = True,
                     add_eos: bool = True, desc: str = "tokenizing") -> TokenizedDocuments:
    """Tokenized documents of ``files``, from the cache when it has them.

    ``cache_dir=None`` disables caching. Cache files are written atomically, so a killed run
    never leaves a half-written cache entry behind.
    """
    if cache_dir is None:
        return tokenize_texts(iter_texts(files, text_field=text_field), tokenizer,
                              add_bos=add_bos, add_eos=add_eos, desc=desc)
    key = corpus_cache_key(files, tokenizer, text_field=text_field, add_bos=add_bos,
                           add_eos=add_eos)
    path = Path(cache_dir).expanduser() / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return TokenizedDocuments(cached["tokens"], cached["offsets"])
    docs = tokenize_texts(iter_texts(files, text_field=text_field), tokenizer,
                          add_bos=add_bos, add_eos=add_eos, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, tokens=docs.tokens, offsets=docs.offsets)
        apply_umask_mode(Path(tmp))  # before the rename: the entry never appears as 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return docs


def current_umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where Linux exposes it, since the
    portable way (set a umask, restore the old one) briefly changes it for every thread."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_mode(path: Path) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it under the current
    umask (0666 or 0777 minus the umask): ``mkstemp``/``mkdtemp`` create 0600/0700, which
    would lock everyone else out of a shared cache folder."""
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def corpus_cache_key(files: Sequence[Path], tokenizer, *, text_field: str = "text",
                     add_bos: bool = True, add_eos: bool = True) -> str:
    """The content key of tokenizing ``files``: their names and bytes, the tokenizer's
    fingerprint and the text field / BOS / EOS choices. Files are hashed in 1 MiB blocks."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(Path(file).name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    digest.update(f"{tokenizer_fingerprint(tokenizer)}|{text_field}|{add_bos}|{add_eos}".encode())
    return digest.hexdigest()[:24]

