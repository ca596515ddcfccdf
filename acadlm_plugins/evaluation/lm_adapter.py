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

Generation runs with torchtune KV caches (``local_kv_cache``) on left-padded batches, masks and
positions from ``torchtune.generation``; a prompt is prefilled in chunks so that long-context
prompts do not need a full ``length x length`` mask or ``length x vocab`` logits at once.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
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
from torchtune import training
from torchtune.generation import get_position_ids_from_padding_mask, sample
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer
from tqdm import tqdm

from acadlm_plugins._compat import hf_checkpoint_files
from acadlm_plugins.errors import ConfigError
from acadlm_plugins.evaluation.lengths import task_error
from acadlm_plugins.models.llama import empty_llama_from_hf_config
from acadlm_plugins.quantization import (
    is_quantized_copy,
    load_quantized_decoder,
    read_quantization,
    scheme_dtype,
)

MODEL_NAME = "acadlm"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# Generation settings that only matter when sampling; greedy decoding ignores them, as hf does.
SAMPLING_ONLY_KWARGS = {"top_p", "top_k", "min_p", "typical_p"}


def _never_downloads(key: str, value: Any, problem: str) -> ConfigError:
    return ConfigError(
        f"--model_args {key}", f"{value!r}: {problem} lm-eval's `{MODEL_NAME}` model only reads "
        "local Hugging Face model folders and never downloads.",
        "point it at a local folder: the embedded default "
        "(~/.cache/acadlm/models/SmolLM2-135M-Instruct, built by `acadlm-defaults build`), a "
        "pruned export or a checkpoint's model folder; use `--model hf` for hub models.")


class AcadTokenizer:
    """A model folder's ``tokenizer.json`` with what lm-eval needs around it.

    Built on torchtune's ``HuggingFaceBaseTokenizer`` (which finds bos/eos from
    ``tokenizer_config.json`` / ``generation_config.json``), so it works for any tokenizer a
    checkpoint ships, SmolLM2's and the tiny test ones alike. Encoding applies the tokenizer's
    own post-processor, like ``transformers`` does, so contexts get a BOS exactly when ``hf``
    would give them one. The chat template is the folder's ``chat_template.jinja`` or
    ``tokenizer_config.json``'s ``chat_template``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        config_file = folder / "tokenizer_config.json"
        generation_file = folder / "generation_config.json"
        config_path = str(config_file) if config_file.is_file() else None
        generation_path = str(generation_file) if generation_file.is_file() else None
        # torchtune reads bos/eos from tokenizer_config.json first and refuses one whose
        # bos_token is null; generation_config.json alone then still names the ids.
        attempts = [(config_path, generation_path), (None, generation_path)]
        for config_arg, generation_arg in attempts:
            try:
                self.base = HuggingFaceBaseTokenizer(
                    str(folder / "tokenizer.json"), tokenizer_config_json_path=config_arg,
                    generation_config_path=generation_arg)
                break
            except ValueError:
                continue
        else:
            raise ConfigError(
                "--model_args tokenizer", f"{folder}: cannot tell the BOS/EOS tokens.",
                "add `bos_token`/`eos_token` to tokenizer_config.json or a "
                "generation_config.json with `bos_token_id`/`eos_token_id`.")
        self.rust = self.base.tokenizer
        self.config: dict[str, Any] = (json.loads(config_file.read_text())
                                       if config_file.is_file() else {})
        generation = self.base.generation_config or {}
        self.bos_id: int = int(self.base.bos_id)
        eos = self.base.eos_id  # generation_config.json may list several (the first is EOS)
        self.eos_id: int = int(eos[0] if isinstance(eos, list) else eos)
        self.bos_text = self.rust.id_to_token(self.bos_id)
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
        raise ConfigError("--device", f"{device!r} was asked for but CUDA is not available.",
                          "use --device cpu.")
    return chosen


def load_decoder(model_dir: Path, *, max_seq_len: int | None, device: torch.device,
                 dtype: torch.dtype) -> TransformerDecoder:
    """The torchtune decoder of an HF Llama folder, weights loaded, in eval mode.

    Weights go through torchtune's ``FullModelHFCheckpointer`` exactly as our recipes load
    them (its ``output_dir`` is a throw-away folder: evaluation writes nothing).
    """
    if is_quantized_copy(model_dir):
        return load_quantized_decoder(model_dir, max_seq_len=max_seq_len, device=device)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type", "llama") != "llama":
        raise ConfigError("--model_args pretrained", f"{model_dir} is a "
                          f"{config.get('model_type')!r} model; `{MODEL_NAME}` runs the Llama "
                          "architecture our recipes train.", "evaluate it with `--model hf`.")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ConfigError("--model_args pretrained", f"{model_dir}/config.json asks for RoPE "
                          f"scaling {scaling}, which `{MODEL_NAME}` does not implement (it would "
                          "score a different model).", "evaluate it with `--model hf`.")
    files = hf_checkpoint_files(model_dir)
    if not files:
        raise ConfigError("--model_args pretrained", f"no *.safetensors or *.bin weights in "
                          f"{model_dir}.", "point it at a complete model folder.")
    model = empty_llama_from_hf_config(str(model_dir), max_seq_len=max_seq_len, device=device,
                                       dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="acadlm_eval_") as scratch:
        checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(model_dir), checkpoint_files=files, model_type="LLAMA3_2",
            output_dir=scratch)
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        state.pop("output.weight", None)  # some exporters also write the tied head
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError("--model_args pretrained", f"{model_dir}: the weights do not fit its "
                          f"config.json (missing {missing}, unexpected {unexpected}).",
                          "re-export the checkpoint.")
    model.eval().requires_grad_(False)
    return model


def final_hidden_states(model: TransformerDecoder, tokens: torch.Tensor, *,
                        mask: torch.Tensor | None = None,
                        input_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states of ``tokens`` (``batch x length x dim``): the decoder's forward
    without its output projection, so a caller projects only the positions it needs onto the
    vocabulary (``length x vocab`` logits of a long or batched input are large)."""
    hidden = model.tok_embeddings(tokens)
    for layer in model.layers:
        hidden = layer(hidden, mask=mask, input_pos=input_pos)
    return model.norm(hidden)


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


class AcadLM(TemplateLM):
    """lm-eval model ``acadlm``: a local HF Llama folder run by torchtune.

    Model args (``--model_args key=value,...``):

    * ``pretrained`` (required): local model folder (config.json, weights, tokenizer.json).
    * ``tokenizer``: a folder (or ``tokenizer.json``) to tokenize with; default ``pretrained``.
    * ``batch_size``: requests per forward pass (lm-eval's ``--batch_size``), default 1.
    * ``max_length``: longest context in tokens; default ``max_position_embeddings``.
    * ``max_gen_toks``: default new-token budget when a task does not set one (256).
    * ``device``: ``cpu`` (default) or ``cuda[:n]`` (lm-eval's ``--device``).
    * ``dtype``: ``float32`` (default on CPU), ``bfloat16`` (default on GPU), ``float16``.
    * ``kv_cache``: generate with KV caches (default true); false recomputes every step.
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
        self._batch_size = self._parse_batch_size(batch_size)
        del max_batch_size  # lm-eval passes it along with --batch_size; only used for "auto"
        self._device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self._device)
        if is_quantized_copy(self.model_dir):
            # A quantized copy runs in the dtype it was made for (int4 kernels: bfloat16).
            self.dtype = scheme_dtype(read_quantization(self.model_dir)["scheme"])
        self.kv_cache = bool(kv_cache)
        self.prefill_chunk = int(prefill_chunk)
        self._max_gen_toks = int(max_gen_toks)
        self.model = load_decoder(self.model_dir, max_seq_len=int(max_length) if max_length
                                  else None, device=self._device, dtype=self.dtype)
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
    def _parse_batch_size(value: int | str | None) -> int:
        if value is None:
            return 1
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or value < 1:
            raise ConfigError("--batch_size", f"{value!r} is not supported by `{MODEL_NAME}`.",
                              "give a positive integer (requests are sorted by length, so "
                              "larger batches waste little on padding).")
        return value

    # ------------------------------------------------------------------ lm-eval properties

    @property
    def eot_token_id(self) -> int:
        """End of text: the tokenizer's EOS, as for ``hf``."""
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, as for ``hf``."""
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        """Longest sequence (context plus continuation) the model is run on."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """New-token budget of a generation whose task sets none."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Requests per forward pass."""
        return self._batch_size

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def tokenizer_name(self) -> str:
        """Fingerprint of the tokenizer (and its chat template) for lm-eval's request cache."""
        return str(self.tokenizer.folder).replace("/", "__")

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
        progress = tqdm(total=len(requests), disable=disable_tqdm or not requests,
                        desc="acadlm loglikelihood")
        for batch in ordered.get_batched(n=self.batch_size):
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
        """Continue each context until a stop sequence, EOS, ``max_gen_toks`` new tokens or the
        end of the model's context, whichever comes first (greedy unless ``do_sample``)."""
        items = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            tokens = self.tok_encode(context)
            if len(tokens) >= self.max_length:
                raise _too_long_error(request.task_name, len(tokens), self.max_length,
                                      "generation prompt (with no room left to generate)")
            items.append((index, tokens, gen_kwargs))
        results: list[str] = [""] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        progress = tqdm(total=len(requests), disable=disable_tqdm or not requests,
                        desc="acadlm generate_until")
        ordered = Collator(items, sort_fn=lambda item: (-len(item[1]), item[1]),
                           group_fn=lambda item: item[2], group_by="gen_kwargs")
        for batch in ordered.get_batched(n=self.batch_size):
            task = requests[batch[0][0]].task_name
            kwargs = dict(normalize_gen_kwargs(batch[0][2], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            budget = int(kwargs.pop("max_gen_toks"))
            sampling = self._sampling_settings(kwargs, task)
            prompts = [tokens for _, tokens, _ in batch]
            caps = [min(budget, self.max_length - len(tokens)) for tokens in prompts]
            outputs = self._generate(prompts, caps, stop_strings=until, **sampling)
            for (index, _, gen_kwargs), generated in zip(batch, outputs, strict=True):
                text = postprocess_generated_text(self.tok_decode(generated), stop=until,
                                                  think_end_token=None)
                results[index] = text
                self.cache_hook.add_partial("generate_until", (requests[index].args[0],
                                                               gen_kwargs), text)
                progress.update(1)
        progress.close()
        return results

    @staticmethod
    def _sampling_settings(kwargs: dict[str, Any], task: str | None) -> dict[str, Any]:
        """Greedy, or temperature/top-k sampling with torchtune's sampler; anything else a task
        asks of generation is refused rather than ignored."""
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = kwargs.pop("top_k", None)
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
        return {"temperature": temperature, "top_k": int(top_k) if top_k else None}

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], caps: list[int], *,
                  stop_strings: Sequence[str] = (), temperature: float = 0.0,
                  top_k: int | None = None) -> list[list[int]]:
        """New tokens for each prompt of a batch: at most ``caps[i]``, ending at (and including)
        the first stop token, or as soon as the decoded new text holds a stop string.

        Prompts are left-padded; ``torchtune.generation`` gives the padding-aware causal mask
        and positions. With ``kv_cache`` the prompt is prefilled in ``prefill_chunk`` pieces
        into a torchtune KV cache and each step feeds one token; without it every step reruns
        the whole sequence (the reference the cached path must equal).
        """
        rows, width = len(prompts), max(len(p) for p in prompts)
        total = width + max(caps)
        tokens = torch.full((rows, total), self.tokenizer.pad_id, dtype=torch.long,
                            device=self.device)
        real = torch.ones((rows, total), dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
            real[row, :width - len(prompt)] = False
        positions = get_position_ids_from_padding_mask(real)
        generated: list[list[int]] = [[] for _ in prompts]
        finished = [cap <= 0 for cap in caps]
        cache = (local_kv_cache(self.model, batch_size=rows, device=self.device,
                                dtype=self.dtype, decoder_max_seq_len=total)
                 if self.kv_cache else contextlib.nullcontext())
        with cache:
            filled = 0  # tokens already in the KV cache
            for end in range(width, total):
                if all(finished):
                    break
                if self.kv_cache:
                    for start, stop in self._chunks(filled, end):
                        hidden = self._hidden(tokens[:, start:stop],
                                              input_pos=positions[:, start:stop],
                                              mask=self._mask(real, start, stop, total))
                    filled = end
                else:
                    hidden = self._hidden(tokens[:, :end], input_pos=positions[:, :end],
                                          mask=self._mask(real, 0, end, end))
                last = self._project(hidden[:, -1])
                if temperature > 0.0:
                    chosen = sample(last, temperature=temperature, top_k=top_k).squeeze(-1)
                else:
                    chosen = last.argmax(dim=-1)
                tokens[:, end] = chosen
                for row, token in enumerate(chosen.tolist()):
                    if finished[row]:
                        continue
                    generated[row].append(token)
                    finished[row] = (token in self.tokenizer.stop_ids
                                     or len(generated[row]) >= caps[row]
                                     or self._holds_stop_string(generated[row], stop_strings))
        return generated

    def _chunks(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        step = max(1, self.prefill_chunk)
        for begin in range(start, end, step):
            yield begin, min(end, begin + step)

    @staticmethod
    def _mask(real: torch.Tensor, start: int, stop: int, keys: int) -> torch.Tensor:
        """Rows ``start:stop`` of the padding-aware causal mask over the first ``keys`` slots
        (True = may attend): what ``torchtune.generation.get_causal_mask_from_padding_mask``
        gives for the whole sequence, built one prefill chunk at a time so a long prompt never
        needs its full ``length x length`` mask. A padding slot sees only itself."""
        queries = torch.arange(start, stop, device=real.device)[:, None]
        slots = torch.arange(keys, device=real.device)[None, :]
        visible = (slots <= queries)[None] & real[:, None, :keys]
        return visible | (slots == queries)[None]

    def _holds_stop_string(self, generated: list[int], stop_strings: Sequence[str]) -> bool:
        if not stop_strings:
            return False
        text = self.tokenizer.decode(generated, skip_special_tokens=False)
        return any(stop and stop in text for stop in stop_strings)
