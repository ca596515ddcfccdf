"""Judge LMs that say how likely text B is the better one, from the probabilities of "A"/"B".

A judge receives prompts rendered from a criterion's template (text A and text B filled in;
the template asks for one letter) and returns, per prompt, ``p_b``: the probability of the
answer "B" normalised over the two answers, ``p(B) / (p(A) + p(B))``. Reading probabilities
rather than a sampled letter gives a graded confidence from a single forward pass (QuRating's
"confidence" labels), and normalising over A and B ignores whatever mass the judge puts on
other tokens. That mass is reported as ``answer_mass``: a judge that rarely answers with A or
B at all is not following the prompt, and the summary shows it.

Two backends:

* :class:`LocalJudge` -- a local Hugging Face model folder (SmolLM2-135M-Instruct by default)
  run as a torchtune decoder, loaded and tokenized with the lm-eval adapter's pieces
  (:mod:`acadlm_plugins.evaluation.lm_adapter`). The prompt goes through the folder's chat
  template with the assistant turn opened; the next-token distribution is read at that point.
  "A" and "B" may each be several tokens of the vocabulary ("A" and " A"); the probabilities of
  a letter's tokens are added. Without a chat template the prompt ends in ``"\\n\\nAnswer:"``.
* :class:`OpenAIJudge` -- any OpenAI-compatible server (vLLM, say), ``/v1/chat/completions``
  or ``/v1/completions``, asked for one token with ``top_logprobs``. Only the standard library
  is used (urllib). The API key comes from an environment variable named in the config and goes
  into the ``Authorization`` header only; it is never logged, written or part of an error.
  Timeouts, connection failures, 5xx and 429 answers are retried with exponential backoff
  (``Retry-After`` honoured); other 4xx answers fail at once, since repeating them cannot help.
  After the last retry the error names the URL and the last failure. Requests are paced by a
  requests-per-second limiter shared by a few worker threads.

**Answers that are neither A nor B.** A local judge always has a probability for both letters.
A server's answer is judged from its top log-probabilities: when neither letter is among them
(or, without log-probabilities, the answer text is not a letter A/B), the judgment carries a
``problem`` instead of a probability. Such an answer is never turned into 0.5: that criterion
is left missing (``null``) for the pair, the answer is recorded in a ``rejected`` file, and the
summary counts it (see :mod:`acadlm_plugins.qurating.judging`). When only one letter is among the top
log-probabilities, the other is taken as 0 (its true probability is below the smallest one
listed). When a server returns no log-probabilities at all, the answer letter itself is used
(``p_b`` 0 or 1) and counted as a letter-only judgment.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.evaluation.lm_adapter import (
    DTYPES,
    AcadTokenizer,
    final_hidden_states,
    load_decoder,
    render_chat,
)

log = logging.getLogger(__name__)

ANSWERS = ("A", "B")
COMPLETION_SUFFIX = "\n\nAnswer:"
# Marks some servers leave on raw tokens: GPT-2 byte-level space, SentencePiece space.
_TOKEN_SPACE_MARKS = ("Ġ", "▁")
_LETTER_ANSWER = re.compile(r"^\W*(?:[Tt]ext\s+)?([AB])\b")


class JudgeRequestError(AcadlmError, RuntimeError):
    """A remote judge could not be asked: retries exhausted, a refused request, or an answer
    that is not an OpenAI-style response. The message names the URL, never the key."""


@dataclass(frozen=True)
class Judgment:
    """One prompt's answer: ``p_b`` (None when the answer is not A/B, see ``problem``), the
    probability mass on the two answers (None when unknown), the raw answer text of a remote
    judge, and whether only the letter (no probabilities) was available."""

    p_b: float | None
    answer_mass: float | None = None
    problem: str | None = None
    answer: str | None = None
    letter_only: bool = False


class Judge(Protocol):
    """What :func:`acadlm_plugins.qurating.judging.judge_pairs` needs of a judge.

    A judge may also have ``label_settings``: ``{config key: value}`` of what decides its
    probabilities (model, precision, prompting, answer tokens), recorded with the judgments file
    so that a resumed run with another judge is refused; without it the ``description`` stands
    for the judge."""

    description: str

    def judge(self, prompts: Sequence[str]) -> list[Judgment]:
        """One judgment per prompt, in order."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for the summary (requests, failed attempts, ...)."""
        ...


# ---------------------------------------------------------------------- local judge


def answer_token_ids(tokenizer: AcadTokenizer, context: str) -> dict[str, list[int]]:
    """The token ids that spell each answer letter right after ``context`` (a rendered prompt):
    the single-token encodings of ``"A"`` and ``" A"`` (likewise B), and the token the
    tokenizer actually produces for the letter appended to ``context``. Raises
    :class:`ConfigError` if a letter has no single token or the two letters share one."""
    base = tokenizer.encode(context, add_special_tokens=False)
    found: dict[str, list[int]] = {}
    for letter in ANSWERS:
        ids: set[int] = set()
        for variant in (letter, " " + letter):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        joined = tokenizer.encode(context + letter, add_special_tokens=False)
        if len(joined) == len(base) + 1 and joined[:len(base)] == base:
            ids.add(joined[-1])
        if not ids:
            raise ConfigError("judge.local.model_dir", f"{tokenizer.folder}: the tokenizer has "
                              f"no single token for the answer {letter!r}.",
                              "use a judge whose tokenizer has single-token letters (any "
                              "common LM), or an OpenAI-compatible server.")
        found[letter] = sorted(ids)
    if set(found["A"]) & set(found["B"]):
        raise ConfigError("judge.local.model_dir", f"{tokenizer.folder}: answers A and B share "
                          "a token.", "use another judge model.")
    return found


class LocalJudge:
    """A local model folder as a judge: chat-templated prompt, next-token p(A) vs p(B).

    ``chat_template``: ``"auto"`` uses the folder's template when it has one, ``True`` requires
    it, ``False`` ends the plain prompt with ``"\\n\\nAnswer:"``. Prompts are run
    ``batch_size`` at a time, longest first, right-padded (the decoder is causal, so padding
    after a prompt does not change it) and only the last real position of each is projected
    onto the vocabulary.
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8, chat_template: bool | str = "auto") -> None:
        key = "judge.local"
        folder = Path(model_dir).expanduser()
        if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"{key}.model_dir", f"{folder} is not a local model folder "
                              "(config.json, weights and tokenizer.json).",
                              "point it at the embedded default "
                              "(${acadlm_home:}/models/SmolLM2-135M-Instruct, built by "
                              "`acadlm-defaults build`) or another local HF Llama folder.")
        if str(dtype).lower() not in DTYPES:
            raise ConfigError(f"{key}.dtype", f"unknown dtype {dtype!r}.",
                              f"use one of {sorted(DTYPES)}.")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{key}.device", f"{device!r} was asked for but CUDA is not "
                              "available.", "use `cpu`.")
        if int(batch_size) < 1:
            raise ConfigError(f"{key}.batch_size", f"{batch_size!r} is not a positive integer.",
                              "use e.g. 8.")
        self.batch_size = int(batch_size)
        self.folder = folder.resolve()
        self.tokenizer = AcadTokenizer(self.folder)
        self.use_chat = self._chat_choice(chat_template)
        try:
            self.model = load_decoder(self.folder, max_seq_len=None, device=self.device,
                                      dtype=DTYPES[str(dtype).lower()])
        except ConfigError as err:
            raise ConfigError(f"{key}.model_dir", f"cannot load {self.folder} as a local "
                              f"judge: {err}", "the local judge runs HF folders of the families "
                              "acadlm builds (Llama, Mistral, Qwen2: docs/models.md); serve "
                              "other models with vLLM and use `judge.kind: openai`.") from None
        self.max_length = int(self.model.max_seq_len)
        self.answer_ids = answer_token_ids(self.tokenizer, self.format_prompt("Which? A or B."))
        self._prompts_run = 0
        prompting = "chat template" if self.use_chat else "plain prompt"
        self.description = (f"local {self.folder.name} ({prompting}, {self.device}, {dtype}, "
                            f"answer tokens A={self.answer_ids['A']} B={self.answer_ids['B']})")
        # What decides this judge's probabilities, for the judgments file's record (see
        # judging.labelling_settings). Not the device or batch size: those change only the
        # rounding, and a run resumed on another device is the same judge.
        self.label_settings: dict[str, Any] = {
            "judge.kind": "local",
            "judge.local.model_dir": self.folder.name,
            "judge.local.model_config_sha256": _sha256((self.folder / "config.json").read_bytes()),
            "judge.local.dtype": str(dtype).lower(),
            "judge.local.chat_template": (
                "sha256:" + _sha256(self.tokenizer.chat_template.encode("utf-8"))
                if self.use_chat and self.tokenizer.chat_template else "false (plain prompt)"),
            "judge.local.answer_tokens": {k: list(v) for k, v in self.answer_ids.items()},
        }

    def _chat_choice(self, chat_template: bool | str) -> bool:
        choice = str(chat_template).lower()
        if choice not in ("auto", "true", "false"):
            raise ConfigError("judge.local.chat_template", f"{chat_template!r} is not one of "
                              "auto, true, false.", "use `auto`.")
        if choice == "true" and self.tokenizer.chat_template is None:
            raise ConfigError("judge.local.chat_template", f"{self.folder} has no chat template "
                              "(chat_template.jinja or tokenizer_config.json).",
                              "set it to `auto` or `false` (plain prompt ending in 'Answer:').")
        return choice != "false" and self.tokenizer.chat_template is not None

    def format_prompt(self, prompt: str) -> str:
        """What the model reads: the prompt as a user turn with the assistant turn opened, or
        the plain prompt followed by ``"\\n\\nAnswer:"``."""
        if not self.use_chat:
            return prompt + COMPLETION_SUFFIX
        return render_chat(self.tokenizer.chat_template or "",
                           [{"role": "user", "content": prompt}], add_generation_prompt=True,
                           special_tokens=self.tokenizer.special_token_strings())

    @torch.inference_mode()
    def judge(self, prompts: Sequence[str]) -> list[Judgment]:
        """p(B) / (p(A) + p(B)) of the next token after each prompt."""
        encoded = [self.tokenizer.encode_prompt(self.format_prompt(p)) for p in prompts]
        for tokens in encoded:
            if len(tokens) > self.max_length:
                raise ConfigError("pairs.max_tokens", f"a judge prompt of {len(tokens)} tokens "
                                  f"does not fit the judge's context of {self.max_length} "
                                  "tokens.", "lower `pairs.max_tokens` (each prompt holds two "
                                  "excerpts plus the criterion's instructions).")
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        ids_a = torch.tensor(self.answer_ids["A"], device=self.device)
        ids_b = torch.tensor(self.answer_ids["B"], device=self.device)
        results: list[Judgment | None] = [None] * len(encoded)
        for begin in range(0, len(order), self.batch_size):
            batch = order[begin:begin + self.batch_size]
            width = len(encoded[batch[0]])
            inputs = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, index in enumerate(batch):
                inputs[row, :len(encoded[index])] = torch.tensor(encoded[index])
            last = torch.tensor([len(encoded[index]) - 1 for index in batch])
            hidden = final_hidden_states(self.model, inputs.to(self.device))
            picked = hidden[torch.arange(len(batch), device=self.device), last.to(self.device)]
            logprobs = torch.log_softmax(self.model.output(picked).float(), dim=-1)
            log_a = torch.logsumexp(logprobs[:, ids_a], dim=-1)
            log_b = torch.logsumexp(logprobs[:, ids_b], dim=-1)
            p_b = torch.sigmoid(log_b - log_a)
            mass = torch.exp(torch.logaddexp(log_a, log_b))
            for row, index in enumerate(batch):
                results[index] = Judgment(p_b=float(p_b[row]), answer_mass=float(mass[row]))
        self._prompts_run += len(encoded)
        return [result for result in results if result is not None]

    def stats(self) -> dict[str, int]:
        """Prompts run (a local judge has no failed requests)."""
        return {"prompts": self._prompts_run, "requests": 0, "failed_attempts": 0,
                "failed_requests": 0}


# ---------------------------------------------------------------------- remote judge


class RateLimiter:
    """At most ``per_second`` starts per second across threads (None or 0: no limit): each
    caller is given the next free slot and sleeps until it."""

    def __init__(self, per_second: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        """Block until this caller's slot."""
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self._sleep(slot - now)


@dataclass
class _Counters:
    requests: int = 0
    failed_attempts: int = 0
    failed_requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)


def _letter(token: str) -> str | None:
    """"A" or "B" when a token is that letter (ignoring spaces and space marks), else None."""
    text = token
    for mark in _TOKEN_SPACE_MARKS:
        text = text.replace(mark, " ")
    text = text.strip()
    return text if text in ANSWERS else None


def judgment_from_logprobs(candidates: dict[str, float], answer: str) -> Judgment:
    """A judgment from a server's first-token log-probabilities ``{token: logprob}`` and its
    answer text. The letters' probabilities are the sums over the tokens spelling them."""
    mass = {letter: 0.0 for letter in ANSWERS}
    for token, logprob in candidates.items():
        letter = _letter(token)
        if letter is not None and logprob is not None and math.isfinite(float(logprob)):
            mass[letter] += math.exp(float(logprob))
    total = mass["A"] + mass["B"]
    if total <= 0.0:
        shown = sorted(candidates, key=lambda t: -candidates[t])[:5]
        return Judgment(p_b=None, answer=answer, problem=f"neither A nor B among the top "
                        f"{len(candidates)} first tokens {shown}")
    return Judgment(p_b=mass["B"] / total, answer_mass=min(1.0, total), answer=answer)


def judgment_from_letter(answer: str) -> Judgment:
    """A hard judgment (0 or 1) from an answer text such as ``"B"``, ``"A."`` or ``"Text B"``,
    for servers that return no log-probabilities."""
    match = _LETTER_ANSWER.match(answer or "")
    if match is None:
        return Judgment(p_b=None, answer=answer, problem="the answer is not a letter A or B "
                        "(and the server gave no log-probabilities)", letter_only=True)
    return Judgment(p_b=1.0 if match.group(1) == "B" else 0.0, answer=answer, letter_only=True)


class OpenAIJudge:
    """An OpenAI-compatible server as a judge (see the module docstring for the protocol).

    ``url`` is the API base (``http://host:8000/v1``) or a full ``.../chat/completions`` or
    ``.../completions`` URL; ``endpoint`` picks ``chat`` or ``completions`` for a base URL.
    """

    def __init__(self, url: str, model: str, *, endpoint: str = "chat",
                 api_key_env: str | None = None, timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 requests_per_second: float | None = None, concurrency: int = 4,
                 top_logprobs: int = 5, max_tokens: int = 1,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        key = "judge.openai"
        if not url or urllib.parse.urlparse(str(url)).scheme not in ("http", "https"):
            raise ConfigError(f"{key}.url", f"{url!r} is not an http(s) URL.",
                              "give the server's API base, e.g. http://localhost:8000/v1.")
        if not model:
            raise ConfigError(f"{key}.model", "is required: the model name the server serves.",
                              "e.g. the name given to `vllm serve`.")
        if endpoint not in ("chat", "completions"):
            raise ConfigError(f"{key}.endpoint", f"{endpoint!r} is not `chat` or `completions`.",
                              "use `chat` for /v1/chat/completions.")
        for name, value, low in (("timeout_s", timeout_s, 1e-3), ("max_retries", max_retries, 0),
                                 ("backoff_s", backoff_s, 0), ("concurrency", concurrency, 1),
                                 ("top_logprobs", top_logprobs, 1), ("max_tokens", max_tokens, 1),
                                 ("requests_per_second", requests_per_second or 1, 1e-6)):
            if float(value) < low:
                raise ConfigError(f"{key}.{name}", f"{value!r} is too small (at least {low}).")
        base = str(url).rstrip("/")
        if base.endswith("/chat/completions"):
            endpoint = "chat"
        elif base.endswith("/completions"):
            endpoint = "completions"
        else:
            base += "/chat/completions" if endpoint == "chat" else "/completions"
        self.url, self.endpoint, self.model = base, endpoint, str(model)
        self._api_key: str | None = None
        if api_key_env:
            value = os.environ.get(str(api_key_env))
            if not value:
                raise ConfigError(f"{key}.api_key_env", f"the environment variable "
                                  f"{api_key_env!r} is not set.", f"export {api_key_env}=<key>, "
                                  "or set `api_key_env: null` for a server without a key.")
            self._api_key = value
            host = urllib.parse.urlparse(base).hostname or ""
            if base.startswith("http://") and not _is_loopback(host):
                log.warning("The API key goes to %s over plain http (unencrypted).", host)
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.concurrency, self.top_logprobs = int(concurrency), int(top_logprobs)
        self.max_tokens = int(max_tokens)
        self.limiter = RateLimiter(requests_per_second, sleep=sleep)
        self._sleep = sleep
        self._counters = _Counters()
        self.description = (f"OpenAI-compatible {self.url} model {self.model!r} "
                            f"({'with' if self._api_key else 'without'} API key)")
        # What decides this judge's probabilities (see judging.labelling_settings): not the
        # URL (a server moved to another host serves the same model), retries or pacing.
        self.label_settings: dict[str, Any] = {
            "judge.kind": "openai", "judge.openai.model": self.model,
            "judge.openai.endpoint": self.endpoint,
            "judge.openai.top_logprobs": self.top_logprobs,
            "judge.openai.max_tokens": self.max_tokens,
        }

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.description})"

    def request_body(self, prompt: str) -> dict[str, Any]:
        """The JSON body for one prompt: one greedy token with its top log-probabilities."""
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "temperature": 0.0}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body["prompt"] = prompt + COMPLETION_SUFFIX
            body["logprobs"] = self.top_logprobs
        return body

    def judge(self, prompts: Sequence[str]) -> list[Judgment]:
        """One request per prompt, ``concurrency`` at a time, answers in prompt order."""
        if self.concurrency == 1 or len(prompts) <= 1:
            return [self._judge_one(prompt) for prompt in prompts]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._judge_one, prompt) for prompt in prompts]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def stats(self) -> dict[str, int]:
        """Requests sent, attempts that failed and were retried, requests that failed."""
        counters = self._counters
        return {"prompts": counters.requests, "requests": counters.requests,
                "failed_attempts": counters.failed_attempts,
                "failed_requests": counters.failed_requests}

    def _judge_one(self, prompt: str) -> Judgment:
        response = self._post(self.request_body(prompt))
        return self.parse_response(response)

    def parse_response(self, response: dict[str, Any]) -> Judgment:
        """A judgment from a chat or completions response (first choice, first token)."""
        try:
            choice = response["choices"][0]
            logprobs = choice.get("logprobs")
            if self.endpoint == "chat":
                answer = (choice.get("message") or {}).get("content") or ""
                content = (logprobs or {}).get("content") or []
                candidates = {}
                if content:
                    first = content[0]
                    candidates = {item["token"]: item["logprob"]
                                  for item in first.get("top_logprobs") or []}
                    candidates.setdefault(first["token"], first["logprob"])
            else:
                answer = choice.get("text") or ""
                candidates = {}
                if logprobs:
                    tops = logprobs.get("top_logprobs") or []
                    candidates = dict(tops[0]) if tops and tops[0] else {}
                    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
                    if tokens and values:
                        candidates.setdefault(tokens[0], values[0])
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise JudgeRequestError(f"{self.url}: the response is not an OpenAI-style "
                                    f"{self.endpoint} completion ({type(err).__name__}: {err}); "
                                    f"got {json.dumps(response)[:300]}") from None
        if candidates:
            return judgment_from_logprobs(candidates, answer)
        return judgment_from_letter(answer)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries: timeouts, connection failures, 5xx and 429 are retried with
        exponential backoff; after ``max_retries`` retries a :class:`JudgeRequestError`."""
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = "no attempt made"
        self._counters.add(requests=1)
        for attempt in range(self.max_retries + 1):
            self.limiter.wait()
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = response.read()
            except urllib.error.HTTPError as err:
                detail = _body_excerpt(err)
                if err.code != 429 and err.code < 500:
                    self._counters.add(failed_requests=1)
                    hint = (" Check the key in the environment variable named by "
                            "`judge.openai.api_key_env`." if err.code in (401, 403) else
                            " Check `judge.openai.model` and `judge.openai.endpoint`.")
                    raise JudgeRequestError(f"{self.url} refused the request: HTTP {err.code} "
                                            f"{err.reason}: {detail}.{hint}") from None
                last = f"HTTP {err.code} {err.reason}: {detail}"
                retry_after = _retry_after(err.headers.get("Retry-After") if err.headers
                                           else None)
                if retry_after is not None:
                    wait = min(self.max_backoff_s, max(wait, retry_after))
            except (TimeoutError, ConnectionError, http.client.HTTPException,
                    urllib.error.URLError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError) or isinstance(err, TimeoutError):
                    last = f"timed out after {self.timeout_s:g} s"
                else:
                    last = f"connection failed ({type(reason).__name__}: {reason})"
            else:
                try:
                    parsed = json.loads(payload)
                except json.JSONDecodeError:
                    self._counters.add(failed_requests=1)
                    raise JudgeRequestError(f"{self.url}: the response is not JSON: "
                                            f"{payload[:200]!r}") from None
                if not isinstance(parsed, dict):
                    self._counters.add(failed_requests=1)
                    raise JudgeRequestError(f"{self.url}: the response is not a JSON object.")
                return parsed
            self._counters.add(failed_attempts=1)
            if attempt < self.max_retries:
                log.warning("Judge request to %s failed (%s); retry %d/%d in %.1f s.", self.url,
                            last, attempt + 1, self.max_retries, wait)
                self._sleep(wait)
        self._counters.add(failed_requests=1)
        raise JudgeRequestError(f"{self.url}: no answer after {self.max_retries + 1} attempts; "
                                f"last: {last}. Judgments written so far are kept; run the same "
                                "command again to resume once the server answers.")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _body_excerpt(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 -- the body is only for the message
        return "(no body)"
    return " ".join(text.split())[:200] or "(empty body)"


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
