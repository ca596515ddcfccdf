"""How a HELMET-style prompt is laid out and sized: the chat template per category, the answer
prefix, and the length budget (Yen et al. 2024; princeton-nlp/HELMET's ``configs/*.yaml``,
``data.py`` and ``model_utils.py``).

HELMET writes each prompt as a *user template* (instruction, demonstrations, context, question)
and a *system template*, the answer prefix (``Answer:``, ``Summary:``, ``Ranking:``, ...):

* without a chat template the model reads ``user + separator + prefix`` and continues it (the
  separator is a line break, or a blank line for InfiniteBench, Multi-LexSum and ALCE);
* with one, the user template alone is the user's message and the assistant's turn opens empty:
  there is no answer prefix at all. The run's ``--system_instruction`` is the system message
  then (counted in the budget); a plain prompt gets none, as HELMET's ``tokenize`` passes its
  ``system_message`` only with the chat template.

HELMET's configs choose the chat template per category (``use_chat_template``): on for
long-document QA, summarization and citations, off for recall, RAG, re-ranking and ICL, even for
an instruction-tuned model. lm-eval applies ``--apply_chat_template`` to every task of a run, so
a HELMET task of a category HELMET runs without it asks lm-eval for a plain prompt instead
(:class:`HelmetTask`); ``helmet_chat_template: all`` in the metadata turns that off. The tasks
learn whether the run applies a template from ``apply_chat_template`` in their metadata, which
``acadlm-lm-eval`` and the eval recipe fill in from the run's own flag; a task whose metadata
disagrees with the run stops with an error rather than build prompts for the wrong layout.

The budget is HELMET's (its ``tokenize`` truncates the context until the templated prompt plus
``generation_max_length`` fit the input length), which is RULER's as well: with
``length_budget: ruler`` (the default) the prompt, the chat template's tokens and the tokens to
generate (each task YAML's ``max_gen_toks``) fit inside *L*; ``length_budget: prompt`` fits the
prompt alone. The layout and counting are those of :mod:`acadlm_plugins.evaluation.ruler`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lm_eval.api.task import ConfigurableTask

from acadlm_plugins.evaluation.judge_metrics import JUDGE_KEY, METRICS
from acadlm_plugins.evaluation.lengths import LengthTokenizer, parse_lengths, task_error
from acadlm_plugins.evaluation.prompting import FittedPrompt
from acadlm_plugins.evaluation.ruler import (
    BudgetSettings,
    PromptFrame,
    check_generation_room,
    check_system_instruction,
    length_budget_setting,
    prompt_frame,
)
from acadlm_plugins.evaluation.task_base import LengthSweepTask, int_setting
from acadlm_plugins.evaluation.task_settings import check_task_metadata, declare_settings

log = logging.getLogger(__name__)

#: HELMET's categories whose configs set ``use_chat_template: true`` (longqa.yaml, summ.yaml,
#: cite.yaml); recall, rag, rerank and icl set it false.
CHAT_TEMPLATE_CATEGORIES = frozenset({"longqa", "summ", "cite"})
#: ``helmet_chat_template``: as HELMET's configs (the default), or every task of the run.
CHAT_MODES = ("per_category", "all")
CHAT_MODE_KEY = "helmet_chat_template"


def flag_setting(metadata: Mapping[str, Any], key: str) -> bool:
    """A yes/no metadata field: a bool, or a string that is not "", "false", "0" or "no"."""
    value = metadata.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no")
    return bool(value)


def run_applies_chat_template(metadata: Mapping[str, Any]) -> bool:
    """Whether the run renders prompts with a chat template, as the metadata says
    (``apply_chat_template``, filled in by ``acadlm-lm-eval`` from ``--apply_chat_template``)."""
    return flag_setting(metadata, "apply_chat_template")


def chat_mode(metadata: Mapping[str, Any], *, task: str) -> str:
    """``helmet_chat_template`` of the metadata, checked (default ``per_category``)."""
    mode = str(metadata.get(CHAT_MODE_KEY) or "per_category")
    if mode not in CHAT_MODES:
        raise task_error(task, CHAT_MODE_KEY, f"{mode!r} is not a choice.",
                         "Use `per_category` (the chat template only where HELMET's configs use "
                         "it: longqa, summ, cite) or `all` (every task of the run).")
    return mode


# The HELMET setting read above (the budget and the run's flags are declared by ruler.py).
declare_settings("HELMET's tasks", {CHAT_MODE_KEY: chat_mode})


def uses_chat_template(metadata: Mapping[str, Any], category: str, *, task: str) -> bool:
    """Whether a task of HELMET's ``category`` is rendered with the chat template: only when the
    run applies one, and then for every category under ``helmet_chat_template: all``, else for
    those HELMET's configs run with it (:data:`CHAT_TEMPLATE_CATEGORIES`)."""
    mode = chat_mode(metadata, task=task)
    return run_applies_chat_template(metadata) and (
        mode == "all" or category in CHAT_TEMPLATE_CATEGORIES)


@dataclass(frozen=True)
class HelmetFrame:
    """The layout of one task's prompts at one length: HELMET's answer ``prefix`` and the
    ``separator`` before it (plain text only), and the frame (chat template, token budget)."""

    frame: PromptFrame
    settings: BudgetSettings
    prefix: str
    separator: str

    @property
    def chat(self) -> bool:
        """Whether the prompt is rendered with the chat template."""
        return self.frame.closing is not None

    @property
    def budget(self) -> int:
        """The most tokens the laid-out prompt may count."""
        return self.frame.budget

    @property
    def answer_prefix(self) -> str:
        """lm-eval's ``gen_prefix``: HELMET's prefix in plain text, none under a chat template
        (HELMET opens the assistant's turn empty)."""
        return "" if self.chat else self.prefix

    def user_input(self, user: str) -> str:
        """The document's ``input`` for HELMET's user template ``user``: followed by the
        separator in plain text, so that lm-eval's ``gen_prefix`` comes on a line of its own."""
        return user if self.chat else user + self.separator

    def render(self, user: str) -> str:
        """The whole prompt the model reads for the user template ``user``."""
        return self.frame.lay_out(self.user_input(user), self.answer_prefix)

    def row(self, fitted: FittedPrompt, **fields: Any) -> dict[str, Any]:
        """A dataset row from a prompt fitted with :meth:`render`: the input and answer prefix
        lm-eval joins again, and the sizes tests and logs need."""
        return {"input": self.frame.user_text(fitted.text, self.answer_prefix),
                "gen_prefix": self.answer_prefix, "input_tokens": fitted.num_tokens,
                "budget_tokens": self.budget,
                "tokens_to_generate": self.settings.tokens_to_generate,
                "length_budget": self.settings.mode, "chat_template": self.chat, **fields}


def budget_settings(metadata: Mapping[str, Any], *, task: str, generation: int,
                    chat: bool) -> BudgetSettings:
    """``length_budget`` and ``tokens_to_generate`` (default ``generation``, the task YAML's
    ``max_gen_toks``) of a HELMET task, checked; the chat template and, with it, the system
    instruction count under ``ruler``."""
    mode = length_budget_setting(metadata, task=task)
    tokens = int_setting(metadata, "tokens_to_generate", generation, task=task, minimum=0)
    # HELMET gives a system message only with the chat template (model_utils.tokenize).
    instruction = str(metadata.get("system_instruction") or "") if chat else ""
    settings = BudgetSettings(mode, tokens, chat and mode == "ruler", instruction)
    check_generation_room(metadata, settings, task=task)
    return settings


@dataclass(frozen=True)
class HelmetLayout:
    """What a HELMET task fixes about its prompts: its category (which decides the chat
    template), its answer prefix and separator, and the tokens it generates by default."""

    category: str
    prefix: str
    separator: str
    generation: int

    def frame(self, metadata: Mapping[str, Any], length: int, tokenizer: LengthTokenizer, *,
              task: str) -> HelmetFrame:
        """The frame of ``task``'s prompts at ``length``."""
        chat = uses_chat_template(metadata, self.category, task=task)
        settings = budget_settings(metadata, task=task, generation=self.generation, chat=chat)
        return HelmetFrame(prompt_frame(settings, length, tokenizer, task=task), settings,
                           self.prefix, self.separator)


class HelmetTask(LengthSweepTask):
    """A HELMET-style task: per-length metrics plus the further measures it reports
    (``<length>_<measure>``, declared so that lm-eval aggregates them as means without a
    warning), the tokens to generate taken from its YAML, and HELMET's chat template per
    category.

    Subclasses name their ``category``, the model-free ``measures`` they always report and the
    ``judge_kind`` whose judge metrics they report when the metadata names a judge.
    """

    category: str = ""
    measures: tuple[str, ...] = ()
    judge_kind: str | None = None

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        config.pop("class", None)
        metadata = dict(config.get("metadata") or {})
        task = config.get("task", "?")
        check_task_metadata(metadata, task=task)
        budget = (config.get("generation_kwargs") or {}).get("max_gen_toks")
        if budget is not None:
            metadata.setdefault("tokens_to_generate", int(budget))
        config["metadata"] = metadata
        chat_mode(metadata, task=task)
        lengths = parse_lengths(metadata.get("max_seq_lengths"), task=task)
        names = ("", *self.measure_names(metadata))
        config["metric_list"] = [
            {"metric": f"{length}_{name}" if name else str(length), "aggregation": "mean",
             "higher_is_better": True} for length in lengths for name in names]
        ConfigurableTask.__init__(self, config=config)

    @classmethod
    def measure_names(cls, metadata: Mapping[str, Any]) -> tuple[str, ...]:
        """The further measures reported at each length: the model-free ones, then the judge's
        when a judge is configured."""
        judged = cls.judge_kind is not None and bool(metadata.get(JUDGE_KEY))
        return (*cls.measures, *(METRICS[cls.judge_kind] if judged and cls.judge_kind else ()))

    def build_all_requests(self, **kwargs: Any) -> Any:
        """lm-eval's request building, with the chat template (and the run's system
        instruction) only where HELMET uses it.

        The prompts were built for the layout ``apply_chat_template`` in the metadata names, so
        a run that applies a template the metadata does not mention (or the reverse) is refused,
        and so is, under the template, a system instruction other than the metadata's. A plain
        prompt gets no system message, as in HELMET.
        """
        metadata = self.config.metadata or {}
        name = self.config.task or "?"
        if bool(kwargs.get("apply_chat_template")) != run_applies_chat_template(metadata):
            applied = "applies" if kwargs.get("apply_chat_template") else "does not apply"
            raise task_error(name, "apply_chat_template", f"the run {applied} a chat template "
                             "but the task metadata says the opposite, and HELMET's prompts "
                             "(answer prefix, sizing) depend on it.",
                             "Run through acadlm-lm-eval (it passes --apply_chat_template on "
                             "to the tasks), or give the same value in --metadata "
                             "'{\"apply_chat_template\": true}'.")
        if kwargs.get("apply_chat_template") and not uses_chat_template(
                metadata, self.category, task=name):
            log.info("%s: plain prompt without the chat template, as HELMET runs its %s "
                     "category (helmet_chat_template: all to change).", name, self.category)
            kwargs.update(apply_chat_template=False, chat_template=None,
                          fewshot_as_multiturn=False, tokenizer_name="")
        if kwargs.get("apply_chat_template"):
            check_system_instruction(metadata, kwargs.get("system_instruction"), task=name)
        elif kwargs.get("system_instruction"):
            log.info("%s: no system message in a plain prompt, as HELMET gives none without "
                     "the chat template.", name)
            kwargs["system_instruction"] = None
        return super().build_all_requests(**kwargs)
