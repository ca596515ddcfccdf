"""Test doubles for lm-eval: a perfect model that reads answers out of the prompt and a
constant model, to prove that task scoring can reach both 100 and 0."""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM


class OracleLM(LM):
    """Answers a generation request with the document's expected outputs that occur in the
    prompt: a task whose prompt lacks its answer cannot score 100 with this model.

    A document may name ``oracle_answer`` (e.g. a ranking written as text); it is returned when
    every expected output occurs in the prompt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request in requests:
            prompt, doc = request.arguments[0], request.doc
            self.prompts.append(prompt)
            found = [out for out in doc["outputs"] if out in prompt]
            if doc.get("oracle_answer") and len(found) == len(doc["outputs"]):
                answers.append(doc["oracle_answer"])
            else:
                answers.append(" ".join(found))
        return answers

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError("the oracle only generates")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError("the oracle only generates")


class BlankLineFirstOracleLM(OracleLM):
    """The oracle's answer after a blank line, cut at the first of the request's stop strings
    (``until``) as a real model's generation is: SmolLM2 opens its answers so on RULER's frequent
    words extraction, and a stop at a blank line would leave it nothing to score."""

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request, answer in zip(requests, super().generate_until(requests), strict=True):
            text = "\n\n" + answer
            for stop in request.arguments[1].get("until") or []:
                text = text.split(stop, 1)[0]
            answers.append(text)
        return answers


class ConstantLM(OracleLM):
    """Always says the same thing, whatever the prompt."""

    def __init__(self, answer: str = "I do not know.") -> None:
        super().__init__()
        self.answer = answer

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self.prompts.extend(request.arguments[0] for request in requests)
        return [self.answer for _ in requests]


#: A ChatML-style chat template, written into a model folder as ``chat_template.jinja``.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatOracleLM(OracleLM):
    """The oracle with :data:`CHAT_TEMPLATE`: what lm-eval needs for
    ``apply_chat_template=True``."""

    tokenizer_name = "tiny-chat"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return CHAT_TEMPLATE

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        from acadlm_plugins.evaluation.lm_adapter import render_chat

        return render_chat(CHAT_TEMPLATE, chat_history,
                           add_generation_prompt=add_generation_prompt, special_tokens={})
