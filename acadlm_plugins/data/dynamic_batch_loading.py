"""Dynamic batch loading: shift the data mix toward domains that lag behind their reference.

Sheared-LLaMA (Xia et al. 2023, Algorithm 1): at each update, with per-domain validation
loss l_i and reference loss r_i,

    excess_i = max(l_i - r_i, 0)
    a_i      = w_i * exp(eta * excess_i)
    w_i'     = (1 - c) * a_i / sum_j a_j + c / k

so a domain whose loss is above its reference gets more of the next batches, and the
smoothing c (1e-4 in the paper) keeps every domain alive.

The released code (LLM-Shearing's ``DynamicLoadingCallback.update_proportion``) uses the
signed difference ``excess_i = l_i - r_i`` instead: a domain already below its reference
then loses share in proportion to how far below it is, where the paper's clamp treats every
such domain alike. ``excess="signed"`` selects that; ``"clamped"`` (the paper) is the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

#: How the excess loss that drives the update is formed: ``clamped`` = ``max(l - r, 0)``, the
#: paper's Algorithm 1; ``signed`` = ``l - r``, LLM-Shearing's released callback.
EXCESS_MODES = ("clamped", "signed")


def excess_losses(losses: Sequence[float], reference: Sequence[float],
                  excess: str = "clamped") -> np.ndarray:
    """Per-domain ``max(loss - reference, 0)`` (``clamped``) or ``loss - reference``
    (``signed``): what the update exponentiates."""
    if excess not in EXCESS_MODES:
        raise ValueError(f"excess must be one of {EXCESS_MODES}, got {excess!r}")
    difference = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return np.maximum(difference, 0.0) if excess == "clamped" else difference


def update_domain_weights(weights: Sequence[float], losses: Sequence[float],
                          reference: Sequence[float], *, eta: float = 1.0,
                          smoothing: float = 1e-4, excess: str = "clamped") -> np.ndarray:
    """One dynamic-batch-loading update of the domain ``weights`` (see the module docstring);
    ``excess`` is one of :data:`EXCESS_MODES`."""
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"non-finite domain losses {list(losses)}: cannot update weights")
    # Exponentiate in log space: a large excess must not overflow.
    logits = np.log(np.maximum(weights, 1e-300)) + eta * excess_losses(losses, reference, excess)
    logits -= logits.max()
    updated = np.exp(logits)
    updated /= updated.sum()
    return (1.0 - smoothing) * updated + smoothing / len(updated)


def ordered(values: Mapping[str, float], names: Sequence[str], *, field: str) -> list[float]:
    """``values`` in ``names`` order; raises KeyError naming the missing domains."""
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"`{field}` has no value for domains {missing}")
    return [float(values[n]) for n in names]
