"""A torchtune ``ModelTokenizer`` for ChatML tokenizers: SmolLM2's and Qwen2's (byte-level BPE).

torchtune 0.6.1 reads a Hugging Face ``tokenizer.json`` with ``HuggingFaceBaseTokenizer``, but that
is only a text tokenizer; stock recipes and datasets need ``tokenize_messages``, ``pad_id`` and
``max_seq_len``. :class:`SmolLM2Tokenizer` adds those around it, rendering messages exactly as
SmolLM2's and Qwen2's own chat templates do::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Use it from a config with::

    tokenizer:
      _component_: acadlm_plugins.models.smollm2_tokenizer
      path: ${acadlm_home:}/models/SmolLM2-135M-Instruct
      max_seq_len: 2048

:func:`load_hf_base_tokenizer` is how every acadlm path reads a ``tokenizer.json`` with its BOS/EOS
(this class, the lm-eval adapter, the QuRating rater).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchtune.data import Message, truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

from acadlm_plugins.errors import DataError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

log = logging.getLogger(__name__)


def load_hf_base_tokenizer(
    tokenizer_json: str | Path,
    config_path: str | Path | None = None,
    generation_path: str | Path | None = None,
) -> HuggingFaceBaseTokenizer:
    """torchtune's ``HuggingFaceBaseTokenizer`` of ``tokenizer_json``, with BOS/EOS found as
    transformers finds them.

    torchtune 0.6.1 takes bos/eos from ``tokenizer_config.json`` (``config_path``) and refuses
    one whose ``bos_token`` is null, as Qwen2's and Qwen2.5's are, instead of reading
    ``generation_config.json``'s ``bos_token_id``. Such a tokenizer is loaded again with the
    ids from ``generation_config.json``; a token that ``tokenizer_config.json`` does name still
    wins (Qwen2.5-Instruct's ``eos_token`` ``<|im_end|>``), and ``.config`` keeps the file for
    readers of ``pad_token``. An ``eos_token_id`` list (several stop ids) gives its first id.

    A ``truncation`` or ``padding`` block in ``tokenizer.json`` is switched off: the Rust
    tokenizer applies it to every ``encode``, ``add_special_tokens=False`` or not, so a file
    with ``truncation: {max_length: 512}`` would silently cut every training document, every
    rater excerpt and every annotated document to 512 tokens (and their token counts with
    them), and padding would add tokens. ``transformers`` likewise ignores both unless a call
    asks for them; texts are cut and padded explicitly where that is meant.

    Raises:
        ValueError: neither file names a BOS and an EOS; callers turn it into an error that
            names their own key or file.
    """
    tokenizer_json = str(tokenizer_json)
    config_arg = str(config_path) if config_path else None
    generation_arg = str(generation_path) if generation_path else None
    try:
        base = HuggingFaceBaseTokenizer(tokenizer_json, tokenizer_config_json_path=config_arg,
                                        generation_config_path=generation_arg)
    except ValueError:
        if config_arg is None or generation_arg is None:
            raise
        base = HuggingFaceBaseTokenizer(tokenizer_json, generation_config_path=generation_arg)
        with open(config_arg, "rb") as handle:
            base.config = json.load(handle)
        for key, attribute in (("bos_token", "bos_id"), ("eos_token", "eos_id")):
            token_id = config_token_id(base, key)
            if token_id is not None:
                setattr(base, attribute, token_id)
    if isinstance(base.eos_id, list):
        base.eos_id = base.eos_id[0]
    disable_truncation_and_padding(base.tokenizer, tokenizer_json)
    empty = base.tokenizer.encode("").ids  # what torchtune's encode checks before adding bos/eos
    base.hf_adds_bos, base.hf_adds_eos = base.bos_id in empty, base.eos_id in empty
    return base


def disable_truncation_and_padding(tokenizer: Any, source: str | Path = "tokenizer.json"
                                   ) -> None:
    """Switch off the ``truncation`` and ``padding`` a ``tokenizers.Tokenizer`` was loaded with
    (see :func:`load_hf_base_tokenizer`), saying so at INFO level when there was any."""
    if tokenizer.truncation is not None:
        log.info("%s enables truncation (%s); it is switched off, so that documents are "
                 "tokenized whole.", source, tokenizer.truncation)
        tokenizer.no_truncation()
    if tokenizer.padding is not None:
        log.info("%s enables padding (%s); it is switched off.", source, tokenizer.padding)
        tokenizer.no_padding()


def config_token_id(base: HuggingFaceBaseTokenizer, key: str) -> int | None:
    """The id of the token ``tokenizer_config.json`` names under ``key`` (``"pad_token"``, a
    string or ``{"content": ...}``); None when it names none or one the vocabulary lacks."""
    token = (base.config or {}).get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return base.tokenizer.token_to_id(token) if isinstance(token, str) else None


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """A ChatML tokenizer (SmolLM2's, Qwen2's) with ChatML message rendering and torchtune's
    masking conventions.

    Special ids, from the model folder as transformers reads them (:func:`load_hf_base_tokenizer`):

    * SmolLM2: ``bos_id`` is ``<|im_start|>`` (1), ``eos_id`` and ``pad_id`` are ``<|im_end|>``
      (2), as in its tokenizer_config.json;
    * Qwen2 / Qwen2.5: tokenizer_config.json names no BOS, so ``bos_id`` is generation_config.json's
      ``bos_token_id`` (``<|endoftext|>``); ``eos_id`` is ``<|im_end|>`` (Instruct) or
      ``<|endoftext|>`` (base), ``pad_id`` is ``<|endoftext|>``.

    ``pad_id`` is tokenizer_config.json's ``pad_token``, else generation_config.json's
    ``pad_token_id``, else ``eos_id``. ``document_separator_id`` is ``<|endoftext|>``, the token
    both families were pre-trained with between documents; it is a stop token here, and corpus
    documents are framed with ``bos_id``/``eos_id`` as torchtune frames them (for
    SmolLM2-Instruct: ``<|im_start|>`` ... ``<|im_end|>``; see docs/data_mixtures.md).

    Args:
        tokenizer_json_path (str): the model's ``tokenizer.json``.
        tokenizer_config_json_path (Optional[str]): its ``tokenizer_config.json`` (names bos/eos).
        generation_config_path (Optional[str]): its ``generation_config.json`` (fallback for ids).
        max_seq_len (Optional[int]): truncate ``tokenize_messages`` output to this many tokens.
        default_system_prompt (Optional[str]): prepended as a system message when a conversation
            has none. SmolLM2's HF template does this with its own prompt; the default ``None``
            keeps conversations as given, which is what training data usually wants.
    """

    prompt_template = None  # the ChatML format is built in; recipes check this attribute

    def __init__(
        self,
        tokenizer_json_path: str,
        *,
        tokenizer_config_json_path: str | None = None,
        generation_config_path: str | None = None,
        max_seq_len: int | None = None,
        default_system_prompt: str | None = None,
    ) -> None:
        try:
            self._base = load_hf_base_tokenizer(
                tokenizer_json_path, tokenizer_config_json_path, generation_config_path)
        except ValueError as error:
            raise DataError(
                f"{tokenizer_json_path}: cannot tell the BOS/EOS tokens ({error}). Name them in "
                "the folder's tokenizer_config.json (`bos_token`, `eos_token`) or "
                "generation_config.json (`bos_token_id`, `eos_token_id`)."
            ) from error
        self.max_seq_len = max_seq_len
        self.default_system_prompt = default_system_prompt
        self.special_tokens = {
            token.content: token_id
            for token_id, token in self._base.tokenizer.get_added_tokens_decoder().items()
            if token.special
        }
        for token in (IM_START, IM_END, ENDOFTEXT):
            if token not in self.special_tokens:
                raise DataError(
                    f"{tokenizer_json_path}: special token {token} is missing; this is not a "
                    "ChatML tokenizer (SmolLM2's, Qwen2's). Point `tokenizer.path` at such a "
                    "model folder."
                )
        self.bos_id = self._base.bos_id
        self.eos_id = self._base.eos_id
        self.pad_id = self._pad_id()
        self.im_start_id = self.special_tokens[IM_START]
        self.im_end_id = self.special_tokens[IM_END]
        self.document_separator_id = self.special_tokens[ENDOFTEXT]
        self.stop_tokens = [self.im_end_id, self.document_separator_id]
        self._newline_ids = self._base.tokenizer.encode("\n", add_special_tokens=False).ids

    def _pad_id(self) -> int:
        pad_id = config_token_id(self._base, "pad_token")
        if pad_id is None:
            pad_id = (self._base.generation_config or {}).get("pad_token_id")
        return pad_id if isinstance(pad_id, int) else self.eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (49152 for SmolLM2)."""
        return self._base.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Token ids of plain text, optionally framed by ``bos_id`` / ``eos_id``."""
        ids = self._base.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: list[str], add_bos: bool = True,
                     add_eos: bool = True) -> list[list[int]]:
        """:meth:`encode` for many texts at once; the Rust tokenizer spreads them over cores."""
        encodings = self._base.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        return [head + e.ids + tail for e in encodings]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids; special tokens are dropped unless ``skip_special_tokens=False``."""
        return self._base.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def tokenize_message(self, message: Message, add_end_tokens: bool = True) -> list[int]:
        """One ChatML turn: ``<|im_start|>role\\ncontent`` and, if ``add_end_tokens``, ``<|im_end|>\\n``."""
        body = self._base.tokenizer.encode(
            f"{message.role}\n{message.text_content}", add_special_tokens=False
        ).ids
        tokens = [self.im_start_id, *body]
        if add_end_tokens:
            tokens += [self.im_end_id, *self._newline_ids]
        return tokens

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Token ids and loss mask (True = no loss) of a conversation as ChatML renders it.

        Each turn's tokens, its ``<|im_end|>`` included, take that message's ``masked`` flag, so an
        unmasked assistant turn teaches the model to stop. With ``add_end_tokens=False`` (inference)
        the last turn is left open: end the messages with an empty assistant message to get the
        generation prompt ``<|im_start|>assistant\\n``. A conversation longer than ``max_seq_len``
        is cut as torchtune's tokenizers cut it (the last kept token becomes ``eos_id``, masked,
        when end tokens are added); a conversation that fits is left exactly as rendered.
        """
        if self.default_system_prompt is not None and (
            not messages or messages[0].role != "system"
        ):
            messages = [
                Message(role="system", content=self.default_system_prompt, masked=True),
                *messages,
            ]
        tokens: list[int] = []
        mask: list[bool] = []
        cut = False
        for index, message in enumerate(messages):
            is_last = index == len(messages) - 1
            turn = self.tokenize_message(message, add_end_tokens=add_end_tokens or not is_last)
            tokens += turn
            mask += [message.masked] * len(turn)
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                cut = not is_last or len(tokens) > self.max_seq_len
                break
        if cut:
            # Only a conversation that does not fit is cut; one that fits keeps its own ending
            # (``<|im_end|>\n``), which torchtune's ``truncate`` would overwrite with eos.
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` by ``sample["tokens"]`` and ``sample["mask"]``."""
        messages = sample.pop("messages")
        tokens, mask = self.tokenize_messages(messages, add_end_tokens=not inference)
        sample["tokens"] = tokens
        sample["mask"] = mask
        return sample


def smollm2_tokenizer(
    path: str | None = None,
    max_seq_len: int | None = None,
    default_system_prompt: str | None = None,
) -> SmolLM2Tokenizer:
    """Build :class:`SmolLM2Tokenizer` from a model folder or a ``tokenizer.json``: SmolLM2's, or
    Qwen2's / Qwen2.5's (the ChatML tokenizers).

    ``path`` defaults to the embedded default model (``acadlm-defaults build``); the folder's
    ``tokenizer_config.json`` and ``generation_config.json`` are used when present.
    """
    if path is None:
        from acadlm_plugins.defaults.paths import require_default_model

        folder = require_default_model()
        tokenizer_json = folder / "tokenizer.json"
    else:
        given = Path(path).expanduser()
        folder, tokenizer_json = (
            (given, given / "tokenizer.json") if given.is_dir() else (given.parent, given)
        )
    if not tokenizer_json.is_file():
        from acadlm_plugins.defaults.paths import REBUILD_MODEL_HINT, is_default_model_dir

        if is_default_model_dir(folder):  # pointing `tokenizer.path` here again fixes nothing
            raise DataError(
                f"{tokenizer_json}: no such file in the embedded default model. "
                f"{REBUILD_MODEL_HINT}"
            )
        raise DataError(
            f"{tokenizer_json}: no such file. Set `tokenizer.path` to the model folder "
            "(e.g. ${acadlm_home:}/models/SmolLM2-135M-Instruct) or to its tokenizer.json."
        )
    config_json = folder / "tokenizer_config.json"
    generation_json = folder / "generation_config.json"
    return SmolLM2Tokenizer(
        str(tokenizer_json),
        tokenizer_config_json_path=str(config_json) if config_json.is_file() else None,
        generation_config_path=str(generation_json) if generation_json.is_file() else None,
        max_seq_len=max_seq_len,
        default_system_prompt=default_system_prompt,
    )
