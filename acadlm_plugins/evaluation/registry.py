"""Make ``--model acadlm`` known to lm-eval without importing torch-heavy code up front.

lm-eval 0.4.13 has no entry-point mechanism for models: a model is whatever its
``model_registry`` holds when ``get_model`` is called. We register ``acadlm`` as a lazy
placeholder (``"module:Class"``), so the adapter module is imported only when the model is
actually built.
"""

from __future__ import annotations

from contextvars import ContextVar

from acadlm_plugins.errors import AcadlmError

MODEL_NAME = "acadlm"
MODEL_TARGET = "acadlm_plugins.evaluation.lm_adapter:AcadLM"
#: The device lm-eval's command line hands the model when ``--device`` is not given.
LM_EVAL_DEFAULT_DEVICE = "cuda:0"
#: Whether the ``acadlm-lm-eval`` command line gave ``--device`` (its ``main`` sets this, so
#: the adapter can tell lm-eval's default from a device the user asked for); None elsewhere
#: (lm-eval's Python API), where it is not known.
DEVICE_OPTION_GIVEN: ContextVar[bool | None] = ContextVar("acadlm_device_option_given",
                                                          default=None)


def register_lm_eval_model() -> None:
    """Register lm-eval's ``acadlm`` model; safe to call any number of times.

    ``lm_eval.models`` is imported first because ``lm_eval.api.registry.get_model`` fills the
    registry with lm-eval's own models (``hf``, ...) only while it is *empty*: registering ours
    into an empty registry would make every built-in model disappear.
    """
    import lm_eval.models  # noqa: F401  (registers hf & co. lazily)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME in model_registry:
        current = dict(model_registry.items())[MODEL_NAME]
        ours = current == MODEL_TARGET or (
            isinstance(current, type)
            and f"{current.__module__}:{current.__name__}" == MODEL_TARGET)
        if not ours:
            raise AcadlmError(f"lm-eval model name {MODEL_NAME!r} is already registered to "
                              f"{current!r}; uninstall or rename the other package's model.")
        return
    model_registry.register(MODEL_NAME, target=MODEL_TARGET)
