"""lm-eval's ``acadlm`` model: any checkpoint our recipes write, run as a torchtune decoder.

Pruned exports, continued-pretraining and long-context checkpoints are all Hugging Face model
folders. This adapter builds the torchtune ``TransformerDecoder`` their ``config.json`` describes
(:func:`acadlm_plugins.models.llama.llama_from_hf_config`, so pruned shapes with their own head
size work), loads the weights the way our recipes do (torchtune's ``FullModelHFCheckpointer``),
and tokenizes with the folder's own ``tokenizer.json``. It answers all three request types of
lm-eval 0.4.13 -- ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` -- for our
tasks and lm-eval's built-in ones, with ``--apply_chat_template`` rendering the folder's own
chat template.

Behaviour follows lm-eval's ``hf`` model wherever a score depends on it (tokenization of
context/continuation pairs, rolling windows, stop sequences, greedy decoding), so a task scored
both ways gives the same numbers. Two deliberate differences:

* a context longer than the model's maximum is an error naming the task and the fix, never a
  silent left truncation (which would score a different prompt than the task wrote);
* a generation is capped at the room left in the context (``max_length - prompt length``)
  instead of truncating the prompt to make room for ``max_gen_toks``.

Generation (:mod:`acadlm_plugins.evaluation.generation`) runs left-padded batches through
torchtune KV caches, prefilling long prompts in chunks, and its decoding steps read grouped-query
KV heads without repeating them. ``batch_size=auto`` finds the largest batch that fits. Launched
by ``torchrun`` or ``accelerate launch``, every process evaluates its share of the documents and
lm-eval gathers the results through this model's ``all_gather``/``gather_object``/``barrier``,
as with lm-eval's ``hf`` model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches
from tqdm import tqdm

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.generation import StopRule, final_hidden_states, generate_tokens
from acadlm_plugins.evaluation.lengths import task_error
from acadlm_plugins.evaluation.registry import DEVICE_OPTION_GIVEN, LM_EVAL_DEFAULT_DEVICE
from acadlm_plugins.models.families import hf_model_spec
from acadlm_plugins.models.tokenizer import load_hf_base_tokenizer
from acadlm_plugins.quantization import (
    is_quantized_copy,
    load_quantized_decoder,
    read_quantization,
    scheme_dtype,
)
from acadlm_plugins.training.config_checks import config_value

log = logging.getLogger(__name__)

MODEL_NAME = "acadlm"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Generation settings that only matter when sampling; greedy decoding ignores them, as hf does.
SAMPLING_ONLY_KWARGS = {"top_p", "top_k", "min_p", "typical_p"}
# What ends a generation rather than shapes how each token is chosen; requests that differ
# only in these share batches.
PER_ROW_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens",
                  "max_completion_tokens"}
# lm-eval's `hf` model tries batches of up to this many requests under `--batch_size auto`.
DEFAULT_MAX_BATCH_SIZE = 64
# Share of the free CPU memory that `batch_size=auto` plans to use on a CPU.
CPU_MEMORY_SHARE = 0.5


def flag_value(value: Any, key: str) -> bool:
    """A yes/no setting named ``key``: a bool, ``true``/``false`` (any case, as lm-eval's
    ``--model_args``/``--gen_kwargs`` parser may leave them) or ``1``/``0``, else a
    :class:`ConfigError` naming ``key``: ``bool("no")`` would be True."""
    if not isinstance(value, bool) and isinstance(value, (int, str)) and str(
            value).strip() in ("0", "1"):
        return str(value).strip() == "1"
    return bool(config_value(value, key, bool))


def _never_downloads(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(
        f"--model_args {key}", f"{value!r}: {problem} lm-eval's `{MODEL_NAME}` model only reads "
        "local Hugging Face model folders and never downloads.",
        "point it at a local folder: the embedded default "
        "(~/.cache/acadlm/models/SmolLM2-135M-Instruct, built by `acadlm-defaults build`), a "
        "pruned export or a checkpoint's model folder; use `--model hf` for hub models.")


class AcadTokenizer:
    """A model folder's ``tokenizer.json`` with what lm-eval needs around it.

    Built on torchtune's ``HuggingFaceBaseTokenizer`` through
    :func:`~acadlm_plugins.models.tokenizer.load_hf_base_tokenizer` (bos/eos from
    ``tokenizer_config.json`` / ``generation_config.json``, a null ``bos_token`` as in Qwen2
    included), so it works for any tokenizer a
    checkpoint ships, SmolLM2's and the tiny test ones alike. Encoding applies the tokenizer's
    own post-processor, like ``transformers`` does, so contexts get a BOS exactly when ``hf``
    would give them one; a ``truncation`` or ``padding`` in the file is switched off, as
    ``transformers`` ignores them unless asked (QuRating's pair sampler measures and cuts
    excerpts with this tokenizer). The chat template is the folder's ``chat_template.jinja`` or
    ``tokenizer_config.json``'s ``chat_template``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config_file = folder / "tokenizer_config.json"
        generation_file = folder / "generation_config.json"
        try:
            self.base = load_hf_base_tokenizer(
                folder / "tokenizer.json", config_file if config_file.is_file() else None,
                generation_file if generation_file.is_file() else None)
        except ValueError as error:
            raise ConfigError(
                "--model_args tokenizer", f"{folder}: cannot tell the BOS/EOS tokens ({error}).",
                "add `bos_token`/`eos_token` to tokenizer_config.json or a "
                "generation_config.json with `bos_token_id`/`eos_token_id`.") from error
        self.rust = self.base.tokenizer
        self.config: dict[str, Any] = (json.loads(config_file.read_text())
                                       if config_file.is_file() else {})
        generation = self.base.generation_config or {}
        self.bos_id: int = int(self.base.bos_id)
        self.eos_id: int = int(self.base.eos_id)  # generation_config.json's list: its first
        self.bos_text = self.rust.id_to_token(self.bos_id)
        # What lm-eval's `hf` conditions an empty context on: transformers' bos_token_id (the
        # `bos_token` of tokenizer_config.json, overridden by special_tokens_map.json's, as
        # transformers merges them), else its eos_token_id. Qwen2/2.5 name no BOS, and their
        # generation_config's bos (<|endoftext|>) is not what `hf` uses.
        named = dict(self.config)
        special_map_file = folder / "special_tokens_map.json"
        if special_map_file.is_file():
            named.update(json.loads(special_map_file.read_text()))
        named_bos = self._token_id(named.get("bos_token"))
        named_eos = self._token_id(named.get("eos_token"))
        self.prefix_id: int = (named_bos if named_bos is not None
                               else named_eos if named_eos is not None else self.eos_id)
        self.pad_id = self._token_id(self.config.get("pad_token"))
        if self.pad_id is None:
            pad = generation.get("pad_token_id")
            self.pad_id = int(pad) if isinstance(pad, int) else self.eos_id
        extra_eos = generation.get("eos_token_id")
        extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        self.stop_ids = {self.eos_id, *(int(i) for i in extra_eos if isinstance(i, int))}
        self.chat_template = self._find_chat_template()

    def _token_id(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.rust.token_to_id(token) if isinstance(token, str) else None

    def _find_chat_template(self) -> str | None:
        jinja_file = self.folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {item.get("name"): item.get("template") for item in template}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce, added tokens included."""
        return self.rust.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the tokenizer's post-processor."""
        return self.rust.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a whole prompt: the post-processor runs (adding a BOS where the
        tokenizer does) unless the text already starts with the BOS token, as a chat-templated
        prompt often does, so a prompt never gets two BOS tokens."""
        return self.encode(text, add_special_tokens=not (self.bos_text
                                                         and text.startswith(self.bos_text)))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.rust.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_token_strings(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ... as strings, for chat templates that use them."""
        found = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = self.config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[key] = value
        return found


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def render_chat(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                special_tokens: dict[str, str]) -> str:
    """Render a Hugging Face chat template the way ``transformers`` renders it (sandboxed
    Jinja, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``/``tojson``/``strftime_now``).

    Without a generation prompt the last message is left open for the model to continue: the
    text stops right after its content, which is what lm-eval asks for when a task prefills
    the assistant's answer.
    """
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
        value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    text = env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            **special_tokens)
    if add_generation_prompt or not messages:
        return text
    content = str(messages[-1].get("content", ""))
    core = content.strip()
    if not core:
        return text
    start = text.rfind(core)
    if start < 0:
        raise ValueError("chat template: the last message's content does not appear in the "
                         "rendered chat, so it cannot be continued.")
    # Keep the content's trailing whitespace when the template reproduced it verbatim.
    verbatim = content.lstrip()
    keep = len(verbatim) if text[start:start + len(verbatim)] == verbatim else len(core)
    return text[:start + keep]


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if str(dtype).lower() not in DTYPES:
        raise ConfigError("--model_args dtype", f"unknown dtype {dtype!r}.",
                          f"use one of {sorted(DTYPES)}.")
    return DTYPES[str(dtype).lower()]


def _resolve_device(device: str | None) -> torch.device:
    chosen = torch.device(device or "cpu")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        given = DEVICE_OPTION_GIVEN.get()
        if device == LM_EVAL_DEFAULT_DEVICE and given is False:
            raise ConfigError("--device", f"was not given, so lm-eval used its default "
                              f"{LM_EVAL_DEFAULT_DEVICE!r}, but CUDA is not available on this "
                              "machine.", "pass --device cpu.")
        if device == LM_EVAL_DEFAULT_DEVICE and given is None:
            raise ConfigError("--device", f"{device!r} (lm-eval's default when --device is not "
                              "given) was asked for, but CUDA is not available on this machine.",
                              "pass --device cpu.")
        raise ConfigError("--device", f"{device!r} was asked for but CUDA is not available.",
                          "use --device cpu.")
    return chosen


def load_decoder(model_dir: Path, *, max_seq_len: int | None, device: torch.device,
                 dtype: torch.dtype) -> TransformerDecoder:
    """The torchtune decoder of an HF model folder (any family our recipes train: Llama 2/3/3.1/
    3.2, Mistral, Qwen2), weights loaded, in eval mode.

    The family's builder and ``FullModelHFCheckpointer`` model_type come from its
    ``config.json`` exactly as our recipes choose them, so Llama 3.1 RoPE scaling and Qwen2's
    q/k/v biases are honoured, and an architecture we cannot build faithfully is refused
    rather than scored as a different model.
    """
    if is_quantized_copy(model_dir):
        return load_quantized_decoder(model_dir, max_seq_len=max_seq_len, device=device)
    try:
        spec = hf_model_spec(model_dir)
        model = spec.load(max_seq_len=max_seq_len, device=device, dtype=dtype)
    except ConfigError as error:
        raise ConfigError("--model_args pretrained", f"{model_dir}: {error}",
                          "evaluate it with `--model hf` if the family is not supported."
                          ) from error
    model.requires_grad_(False)
    return model


@dataclass
class _Generation:
    """A tokenized ``generate_until`` request: where its answer goes, its prompt, when its row
    stops and how it picks tokens (the arguments of ``torchtune.generation.sample``)."""

    index: int
    tokens: list[int]
    rule: StopRule
    sampling: dict[str, Any]


@dataclass
class _TooLong(Exception):
    """A loglikelihood request that does not fit; re-raised with its task name."""

    index: int
    length: int


def _too_long_error(task: str | None, length: int, limit: int, what: str) -> ConfigError:
    return task_error(
        task or "<unnamed task>", "max_seq_lengths",
        f"a {what} of {length} tokens does not fit the model's maximum context of {limit} "
        f"tokens; `{MODEL_NAME}` never truncates a prompt silently.",
        f"lower `max_seq_lengths` (--metadata) to at most {limit} (minus the tokens to "
        "generate), or use fewer few-shot examples; `max_length=` in --model_args raises the "
        "limit only if the model was trained for longer contexts.")


def _sliding_window_error(error: ConfigError, model_dir: Path) -> ConfigError | None:
    """The family layer's refusal of a sliding window shorter than the context
    (``HFModelSpec.check_sliding_window``, which says to build the model with a shorter
    ``max_seq_len``) in lm-eval's terms: here the context is ``--model_args max_length``.
    None for any other error (``load_decoder`` wraps the family layer's errors, a quantized
    copy's loader does not)."""
    cause = error if error.key in _WINDOW_FIELDS else error.__cause__
    if not isinstance(cause, ConfigError) or cause.key not in _WINDOW_FIELDS:
        return None
    spec = hf_model_spec(model_dir)
    _, window = spec.sliding_window
    problem = cause.problem.removeprefix(f"{spec.config_file}: ")
    return ConfigError(
        "--model_args max_length", f"{spec.config_file}: `{cause.key}` {problem}",
        f"pass `--model_args max_length={window}` (or less) so that no context is longer "
        "than the window, or set `sliding_window: null` in config.json if the model was "
        "trained with full attention.")


#: config.json fields whose sliding-window refusal a shorter context avoids.
_WINDOW_FIELDS = ("sliding_window", "use_sliding_window")


class _AutoBatches:
    """lm-eval ``Collator`` ``batch_fn`` for ``batch_size=auto:N``.

    ``Collator`` asks it, request by request, how long the current batch is; it decides at a
    batch's first request. Requests come longest first, so at the start of each of the N parts
    of a request list, the part's first request is its longest, and ``largest(values, index)``
    finds the largest batch of requests like it; the rest of the part reuses that size.
    """

    def __init__(self, parts: int, largest: Callable[[tuple, int], int]) -> None:
        self.parts = parts
        self.largest = largest
        self.sizes: dict[int, int] = {}
        self.size = 1
        self.next_start = 0

    def __call__(self, index: int, values: tuple) -> int:
        if index == 0:  # a new request list (Collator starts over for every group)
            self.sizes, self.next_start = {}, 0
        if index == self.next_start:
            part = index * self.parts // len(values)
            if part not in self.sizes:
                self.sizes[part] = self.largest(values, index)
            self.size = self.sizes[part]
            self.next_start = index + self.size
        return self.size


def _reports_out_of_memory(device: torch.device) -> bool:
    """Whether running out of memory on ``device`` raises an error that ``batch_size=auto`` can
    catch and retry smaller (GPUs and other accelerators), rather than ending the process (the
    CPU, where Linux hands out memory it does not have and kills the process later)."""
    return device.type != "cpu"


def _decoding_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation settings that decide how tokens are chosen (greedy or how to sample),
    without the per-row ones (stop sequences, token budget)."""
    return {key: value for key, value in gen_kwargs.items() if key not in PER_ROW_KWARGS}


def join_process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)`` of this process for data-parallel evaluation.

    Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) the
    process joins torch.distributed's default group (NCCL on CUDA, gloo otherwise) unless the
    launcher's code already did, and a CUDA model goes to the GPU of its ``LOCAL_RANK``, as
    lm-eval's ``hf`` model places it under accelerate. A plain process is rank 0 of 1 on
    ``device``.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # The ranks wait for each other between request types; a long task on one rank must
        # not time the others out (lm-eval's `hf` model waits a year, too).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(weeks=52))
    return dist.get_rank(), dist.get_world_size(), device


class AcadLM(TemplateLM):
    """lm-eval model ``acadlm``: a local HF Llama folder run by torchtune.

    Model args (``--model_args key=value,...``):

    * ``pretrained`` (required): local model folder (config.json, weights, tokenizer.json).
    * ``tokenizer``: a folder (or ``tokenizer.json``) to tokenize with; default ``pretrained``.
    * ``batch_size``: requests per forward pass (lm-eval's ``--batch_size``), default 1;
      ``auto`` (or ``auto:N``) picks the largest batch that fits, up to ``max_batch_size``
      (default 64): by trial on a GPU, from free memory on the CPU (see ``_auto_batch_size``).
    * ``max_length``: longest context in tokens; default ``max_position_embeddings``.
    * ``max_gen_toks``: default new-token budget when a task does not set one (256).
    * ``device``: ``cpu`` (default) or ``cuda[:n]`` (lm-eval's ``--device``). Launched by
      ``torchrun``/``accelerate launch``, each rank evaluates its share of the requests, on
      the GPU of its ``LOCAL_RANK`` (see :func:`join_process_group`).
    * ``dtype``: ``float32`` (default on CPU), ``bfloat16`` (default on GPU), ``float16``.
    * ``kv_cache``: generate with KV caches (default true); false recomputes every step
      (``true``/``false`` or ``1``/``0``: anything else is an error naming it).
    * ``prefill_chunk``: prompt tokens per forward pass while filling the KV cache (2048).

    A quantized copy (``acadlm_plugins.quantization``, a folder with ``quantization.json``) is
    loaded with its torchao weights and runs in the dtype it was made for.
    """

    def __init__(self, pretrained: str, tokenizer: str | None = None,
                 batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 kv_cache: bool = True, prefill_chunk: int = 2048) -> None:
        super().__init__()
        self.model_dir = self._local_folder("pretrained", pretrained)
        if not (self.model_dir / "config.json").is_file():
            raise _never_downloads("pretrained", pretrained, "has no config.json, so it is not a "
                                   "model folder.")
        tokenizer_dir = self.model_dir if tokenizer is None else self._local_folder(
            "tokenizer", tokenizer)
        if tokenizer_dir.is_file():
            tokenizer_dir = tokenizer_dir.parent
        if not (tokenizer_dir / "tokenizer.json").is_file():
            raise ConfigError("--model_args tokenizer", f"no tokenizer.json in {tokenizer_dir}.",
                              "pass `tokenizer=<folder with tokenizer.json>`.")
        self.tokenizer = AcadTokenizer(tokenizer_dir)
        self._batch_size, self._auto_parts = self._parse_batch_size(batch_size)
        self.max_batch_size = self._parse_max_batch_size(max_batch_size)
        self.batch_sizes: dict[int, int] = {}  # what `auto` chose; lm-eval records these
        self._rank, self._world_size, self._device = join_process_group(_resolve_device(device))
        self.dtype = _resolve_dtype(dtype, self._device)
        if is_quantized_copy(self.model_dir):
            # A quantized copy runs in the dtype it was made for (int4 kernels: bfloat16).
            self.dtype = scheme_dtype(read_quantization(self.model_dir)["scheme"])
        self.kv_cache = flag_value(kv_cache, "--model_args kv_cache")
        self.prefill_chunk = config_value(prefill_chunk, "--model_args prefill_chunk", int,
                                          minimum=1)
        self._max_gen_toks = config_value(max_gen_toks, "--model_args max_gen_toks", int,
                                          minimum=1)
        context = config_value(max_length, "--model_args max_length", int, minimum=1,
                               allow_none=True)
        try:
            self.model = load_decoder(self.model_dir, max_seq_len=context, device=self._device,
                                      dtype=self.dtype)
        except ConfigError as error:
            reworded = _sliding_window_error(error, self.model_dir)
            if reworded is None:
                raise
            raise reworded from error
        self._max_length = int(self.model.max_seq_len)
        if self.tokenizer.vocab_size > self.model.tok_embeddings.num_embeddings:
            raise ConfigError("--model_args tokenizer", f"{tokenizer_dir} has "
                              f"{self.tokenizer.vocab_size} tokens but the model only "
                              f"{self.model.tok_embeddings.num_embeddings}.",
                              "use the tokenizer the checkpoint was trained with.")

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _local_folder(key: str, value: Any) -> Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise _never_downloads(key, value, "is not a path.")
        path = Path(value).expanduser()
        if not path.exists():
            raise _never_downloads(key, value, "no such local file or folder.")
        return path.resolve()

    @staticmethod
    def _parse_batch_size(value: int | str | None) -> tuple[int | None, int]:
        """``(fixed batch size, 0)``, or ``(None, N)`` for ``auto:N`` (``auto`` is ``auto:1``):
        the sorted requests are cut into N parts and each part's batch size is found anew."""
        if value is None:
            return 1, 0
        text = str(value).strip()
        if text.isdigit() and int(text) >= 1:
            return int(text), 0
        name, _, parts = text.partition(":")
        if name == "auto" and (not parts or (parts.isdigit() and int(parts) >= 1)):
            return None, int(parts or 1)
        raise ConfigError("--batch_size", f"{value!r} is not supported by `{MODEL_NAME}`.",
                          "give a positive integer, `auto` or `auto:N` (requests are sorted by "
                          "length, so larger batches waste little on padding).")

    @staticmethod
    def _parse_max_batch_size(value: int | str | None) -> int:
        if value is None:
            return DEFAULT_MAX_BATCH_SIZE
        if not str(value).strip().isdigit() or int(value) < 1:
            raise ConfigError("--max_batch_size", f"{value!r} is not a positive integer.",
                              f"give the largest batch `auto` may try (default "
                              f"{DEFAULT_MAX_BATCH_SIZE}).")
        return int(value)

    # ------------------------------------------------------------------ lm-eval properties

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS, as for ``hf``."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on, as for ``hf``: the tokenizer config's BOS,
        or its EOS where it names no BOS (Qwen2/2.5)."""
        return self.tokenizer.prefix_id

    @property
    def max_length(self) -> int:
        """Longest sequence (context plus continuation) the model is run on."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """New-token budget of a generation whose task sets none."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        """Requests per forward pass, or ``"auto"`` / ``"auto:N"`` (see ``batch_sizes``)."""
        if self._batch_size is not None:
            return self._batch_size
        return "auto" if self._auto_parts == 1 else f"auto:{self._auto_parts}"

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    # ------------------------------------------------------------------ data parallelism
    # lm-eval's evaluator gives each rank every world_size-th document, pads the ranks to the
    # same number of requests, and gathers the metrics through these hooks.

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated in rank order (a scalar counts as one item)."""
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist

        local = tensor.reshape(-1)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank ``dst``; None on the others."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @functools.cached_property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer (and its chat template) for lm-eval's request cache:
        the folder, then a short hash of its tokenizer definition, its BOS/EOS and its chat
        template, so prompts rendered before either was edited in place are not reused.
        Computed once per model (lm-eval asks for it per task)."""
        import hashlib

        digest = hashlib.sha256()
        digest.update(self.tokenizer.rust.to_str().encode())
        digest.update(f"|{self.tokenizer.bos_id}|{self.tokenizer.eos_id}|".encode())
        digest.update(str(self.tokenizer.chat_template).encode())
        return f"{str(self.tokenizer.folder).replace('/', '__')}_{digest.hexdigest()[:12]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The folder's chat template, or None when not asked for."""
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model folder's own chat template (lm-eval's
        ``--apply_chat_template``)."""
        template = self.tokenizer.chat_template
        if template is None:
            raise ConfigError("--apply_chat_template", f"{self.tokenizer.folder} has no chat "
                              "template (chat_template.jinja, or `chat_template` in "
                              "tokenizer_config.json).", "add one, or run without "
                              "--apply_chat_template.")
        return render_chat(template, chat_history, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.tokenizer.special_token_strings())

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results ``config``."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.dtype), "model_path": str(self.model_dir),
                "max_length": self.max_length}

    # ------------------------------------------------------------------ batch size

    def _batching(self, largest: Callable[[tuple, int], int]) -> dict[str, Any]:
        """Keyword arguments for lm-eval's ``Collator.get_batched``: the fixed batch size, or
        under ``auto`` a ``batch_fn`` that sizes batches with ``largest`` (see
        :class:`_AutoBatches`)."""
        if self._batch_size is not None:
            return {"n": self._batch_size}
        return {"n": 0, "batch_fn": _AutoBatches(self._auto_parts, largest)}

    def _auto_batch_size(self, trial: Callable[[int], None], row_bytes: int) -> int:
        """The largest batch, at most ``max_batch_size``, of requests like the measured one.

        * On a GPU (any device that raises out-of-memory errors), by trial, as lm-eval's ``hf``
          model does: ``trial(rows)`` runs the request's heaviest step at ``rows`` rows, from
          ``max_batch_size`` down (accelerate's ``find_executable_batch_size``); 1 if even
          that does not fit.
        * On the CPU, where running out of memory ends the process instead of raising, from
          the free memory: as many rows of ``row_bytes`` (an estimate, :meth:`_row_bytes`) as
          fit in ``CPU_MEMORY_SHARE`` of it.
        """
        if not _reports_out_of_memory(self.device):
            import psutil

            free = psutil.virtual_memory().available * CPU_MEMORY_SHARE
            size = int(max(1, min(self.max_batch_size, free // max(1, row_bytes))))
            how = f"from free CPU memory ({free / 2**30:.1f} GiB planned, "
            how += f"{row_bytes / 2**20:.0f} MiB per row)"
        else:
            from accelerate.utils import find_executable_batch_size
            from accelerate.utils.memory import clear_device_cache

            def attempt(batch_size: int) -> int:
                trial(batch_size)
                return batch_size

            try:
                size = find_executable_batch_size(attempt,
                                                  starting_batch_size=self.max_batch_size)()
            except RuntimeError as err:
                if "No executable batch size found" not in str(err):
                    raise
                size = 1
            clear_device_cache(garbage_collection=True)
            how = "by trial on the device"
        self.batch_sizes[len(self.batch_sizes)] = size
        log.info("batch_size=auto: %d (%s, at most %d)", size, how, self.max_batch_size)
        return size

    def _row_bytes(self, tokens: int, new_tokens: int, projected: int) -> int:
        """Rough upper bound of the memory one batch row needs beyond the weights: the KV cache
        of ``tokens + new_tokens`` slots (generation), one layer's activations for a forward
        pass over ``tokens`` (or a prefill chunk) with K/V repeated for every head, its mask,
        and the float32 logits and log-probabilities of ``projected`` positions."""
        attn = self.model.layers[0].attn
        element = torch.empty((), dtype=self.dtype).element_size()
        slots = tokens + new_tokens
        queries = min(tokens, self.prefill_chunk) if new_tokens else tokens
        inner = getattr(self.model.layers[0].mlp.w1, "out_features", 4 * attn.embed_dim)
        head_width = attn.num_heads * attn.head_dim
        cache = (2 * len(self.model.layers) * attn.num_kv_heads * attn.head_dim * slots
                 if new_tokens else 0)
        layer = queries * (4 * attn.embed_dim + 3 * inner + 2 * head_width)
        repeated = 2 * head_width * slots
        logits = 2 * projected * self.model.tok_embeddings.num_embeddings * 4
        return (cache + layer + repeated) * element + queries * slots + logits

    # ------------------------------------------------------------------ tokenization

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``. By default the tokenizer's post-processor runs (adding a BOS
        where the tokenizer does) unless the text already starts with the BOS token, e.g. a
        chat-templated prompt."""
        if add_special_tokens is None:
            return self.tokenizer.encode_prompt(string)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring

    def _hidden(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states of ``tokens``: ``TransformerDecoder.forward`` without its
        output projection, so callers project only the positions they score. The projection
        onto the vocabulary is a fifth of SmolLM2's forward FLOPs, and ``length x vocab``
        logits of a long context would not fit in memory (6 GiB for 32K tokens)."""
        return final_hidden_states(self.model, tokens, mask=mask, input_pos=input_pos)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 next-token logits of hidden states."""
        return self.model.output(hidden).float()

    def loglikelihood(self, requests: list[Instance],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), continuation is the greedy one)`` per request."""
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        except _TooLong as err:
            raise _too_long_error(requests[err.index].task_name, err.length, self.max_length,
                                  "context plus continuation") from None

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Score tokenized ``(strings, context, continuation)`` requests.

        Requests whose model input (context plus all but the last continuation token) is the
        same are run once -- multiple-choice answers of one token share a forward pass -- and
        inputs are batched longest first, right-padded.
        """
        for index, (_, context, continuation) in enumerate(requests):
            length = len(context) + len(continuation) - 1
            if length > self.max_length:
                raise _TooLong(index, length + 1)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if continuation:
                groups.setdefault(tuple(context + continuation[:-1]), []).append(index)
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # empty continuation
        span = {key: max(len(requests[i][2]) for i in members) for key, members in groups.items()}
        ordered = Collator(list(groups), sort_fn=lambda key: (-len(key), key))
        progress = tqdm(total=len(requests), desc="acadlm loglikelihood",
                        disable=disable_tqdm or not requests or self.rank != 0)

        def largest(keys: tuple, index: int) -> int:
            length, projected = len(keys[index]), max(span[key] for key in keys[index:])
            return self._auto_batch_size(self._scoring_trial(length, projected),
                                         self._row_bytes(length, 0, projected))

        for batch in ordered.get_batched(**self._batching(largest)):
            # Right-padded: the model is causal, so padding after a row changes nothing in it.
            width = len(batch[0])
            inputs = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, key in enumerate(batch):
                inputs[row, :len(key)] = torch.tensor(key, dtype=torch.long)
            with torch.inference_mode():
                hidden = self._hidden(inputs.to(self.device))
                # Only the positions that predict continuation tokens reach the vocabulary.
                rows = torch.cat([torch.full((span[key],), row) for row, key in enumerate(batch)])
                cols = torch.cat([torch.arange(len(key) - span[key], len(key)) for key in batch])
                picked = hidden[rows.to(self.device), cols.to(self.device)]
                scored = F.log_softmax(self._project(picked), dim=-1).split(
                    [span[key] for key in batch])
            for key, logprobs in zip(batch, scored, strict=True):
                needed = span[key]
                greedy = logprobs.argmax(dim=-1)
                for index in groups[key]:
                    strings, _, continuation = requests[index]
                    target = torch.tensor(continuation, dtype=torch.long, device=logprobs.device)
                    rows = logprobs[needed - len(continuation):]
                    answer = (float(rows.gather(1, target[:, None]).sum()),
                              bool((greedy[needed - len(continuation):] == target).all()))
                    results[index] = answer
                    if strings is not None:
                        self.cache_hook.add_partial("loglikelihood", strings, answer)
                    progress.update(1)
        progress.close()
        return results

    def _scoring_trial(self, length: int, projected: int) -> Callable[[int], None]:
        """A scoring batch's heaviest step at ``rows`` rows: a forward pass over ``length``
        tokens and the log-probabilities of ``projected`` positions per row."""
        def run(rows: int) -> None:
            tokens = torch.full((rows, length), self.tokenizer.pad_id, dtype=torch.long,
                                device=self.device)
            with torch.inference_mode():
                hidden = self._hidden(tokens)[:, -projected:]
                F.log_softmax(self._project(hidden.reshape(-1, hidden.shape[-1])), dim=-1)
        return run

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, scored in disjoint windows of ``max_length`` tokens
        (each window conditioned on the tokens before it inside the window), as ``hf`` does."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores, strict=True):
            totals[index] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its stop sequences, EOS, its ``max_gen_toks`` new
        tokens or the end of the model's context, whichever comes first (greedy unless
        ``do_sample``).

        Requests are batched longest first; requests that choose tokens alike (greedy, or the
        same sampling settings) share batches even when their stop sequences or token budgets
        differ, since every row stops on its own.
        """
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        items = [self._tokenized_generation(index, request, eos_text)
                 for index, request in enumerate(requests)]
        results: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="acadlm generate_until",
                        disable=disable_tqdm or not requests or self.rank != 0)
        ordered = Collator(items, sort_fn=lambda item: (-len(item.tokens), item.tokens),
                           group_fn=lambda item: item.sampling, group_by="gen_kwargs")

        def largest(values: tuple, index: int) -> int:
            prompt, new = values[index].tokens, max(item.rule.cap for item in values[index:])
            return self._auto_batch_size(self._generation_trial(prompt, new),
                                         self._row_bytes(len(prompt), new, 1))

        for batch in ordered.get_batched(**self._batching(largest)):
            outputs = self._generate_rows([item.tokens for item in batch],
                                          [item.rule for item in batch], **batch[0].sampling)
            for item, generated in zip(batch, outputs, strict=True):
                text = postprocess_generated_text(self.tok_decode(generated),
                                                  stop=list(item.rule.stop_strings),
                                                  think_end_token=None)
                results[item.index] = text
                self.cache_hook.add_partial("generate_until", requests[item.index].args, text)
                progress.update(1)
        progress.close()
        return results

    def _tokenized_generation(self, index: int, request: Instance,
                              eos_text: str) -> _Generation:
        """A request's prompt tokens, when its row stops (its ``until`` plus EOS, its
        ``max_gen_toks`` capped at the room the context leaves) and how it picks tokens."""
        context, gen_kwargs = request.args
        tokens = self.tok_encode(context)
        if len(tokens) >= self.max_length:
            raise _too_long_error(request.task_name, len(tokens), self.max_length,
                                  "generation prompt (with no room left to generate)")
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        cap = min(int(kwargs["max_gen_toks"]), self.max_length - len(tokens))
        until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
        sampling = self._sampling_settings(_decoding_kwargs(kwargs), request.task_name)
        return _Generation(index, tokens, StopRule(cap, until,
                                                   frozenset(self.tokenizer.stop_ids)), sampling)

    def _generation_trial(self, prompt: list[int], new_tokens: int) -> Callable[[int], None]:
        """A generation batch's heaviest step at ``rows`` rows: KV caches for the prompt and
        ``new_tokens``, the prompt's prefill and one decoding step."""
        def run(rows: int) -> None:
            try:
                generate_tokens(self.model, [prompt] * rows, [StopRule(new_tokens)] * rows,
                                pad_id=self.tokenizer.pad_id, decode=self.tok_decode,
                                kv_cache=self.kv_cache, prefill_chunk=self.prefill_chunk,
                                cache_dtype=self.dtype, max_steps=1)
            except RuntimeError:
                # torchtune's `local_kv_cache` leaves the caches it had set up when setting up
                # the rest runs out of memory; the next, smaller trial needs them gone.
                if self.model.caches_are_setup():
                    delete_kv_caches(self.model)
                raise
        return run

    @staticmethod
    def _sampling_settings(kwargs: dict[str, Any], task: str | None) -> dict[str, Any]:
        """Greedy, or temperature/top-k sampling with torchtune's sampler; anything else a task
        asks of generation is refused rather than ignored."""
        kwargs = dict(kwargs)
        do_sample = flag_value(kwargs.pop("do_sample", False),
                               f"{task or '<unnamed task>'}: generation_kwargs do_sample")
        field = f"{task or '<unnamed task>'}: generation_kwargs"
        temperature = config_value(kwargs.pop("temperature", 0.0) or 0.0, f"{field} temperature",
                                   float, minimum=0.0)
        top_k = config_value(kwargs.pop("top_k", None) or None, f"{field} top_k", int, minimum=1,
                             allow_none=True)
        if not do_sample:
            unsupported = set(kwargs) - SAMPLING_ONLY_KWARGS
        else:
            unsupported = set(kwargs)
        if unsupported:
            raise task_error(task or "<unnamed task>", "generation_kwargs",
                             f"`{MODEL_NAME}` does not implement {sorted(unsupported)}"
                             + (" when sampling" if do_sample else "") + ".",
                             "use greedy decoding, or temperature/top_k sampling, with "
                             "`until` and `max_gen_toks`.")
        if not do_sample or temperature <= 0.0:
            return {"temperature": 0.0, "top_k": None}
        return {"temperature": temperature, "top_k": top_k}

    def _generate(self, prompts: list[list[int]], caps: list[int], *,
                  stop_strings: Sequence[str] = (), temperature: float = 0.0,
                  top_k: int | None = None) -> list[list[int]]:
        """New tokens for each prompt of a batch: at most ``caps[i]``, ending at (and including)
        the first stop token, or as soon as the decoded new text holds a stop string."""
        rules = [StopRule(cap, stop_strings, frozenset(self.tokenizer.stop_ids)) for cap in caps]
        return self._generate_rows(prompts, rules, temperature=temperature, top_k=top_k)

    def _generate_rows(self, prompts: list[list[int]], rules: list[StopRule], *,
                       temperature: float = 0.0, top_k: int | None = None) -> list[list[int]]:
        """:func:`~acadlm_plugins.evaluation.generation.generate_tokens` with this model's
        settings (``kv_cache``, ``prefill_chunk``, dtype, padding id)."""
        return generate_tokens(
            self.model, prompts, rules, pad_id=self.tokenizer.pad_id,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
            temperature=temperature, top_k=top_k, kv_cache=self.kv_cache,
            prefill_chunk=self.prefill_chunk, cache_dtype=self.dtype)
