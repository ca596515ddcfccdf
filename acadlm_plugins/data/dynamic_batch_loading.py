"""Dynamic batch loading: shift the data mix toward domains that lag behind their reference.

Sheared-LLaMA (Xia et al. 2023, Algorithm 1): at each update, with per-domain validation
loss l_i and reference loss r_i,

    excess_i = max(l_i - r_i, 0)
    a_i      = w_i * exp(eta * excess_i)
    w_i'     = (1 - c) * a_i / sum_j a_j + c / k

so a domain whose loss is above its reference gets more of the next batches, and the
smoothing c (1e-4 in the paper) keeps every domain alive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def excess_losses(losses: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """Per-domain ``max(loss - reference, 0)``."""
    return np.maximum(np.asarray(losses, dtype=np.float64) - np.asarray(reference,
                                                                         dtype=np.float64), 0.0)


def update_domain_weights(weights: Sequence[float], losses: Sequence[float],
                          reference: Sequence[float], *, eta: float = 1.0,
                          smoothing: float = 1e-4) -> np.ndarray:
    """One dynamic-batch-loading update of the domain ``weights`` (see the module docstring)."""
    weights = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(losses)):
        raise ValueError(f"non-finite domain losses {list(losses)}: cannot update weights")
    # Exponentiate in log space: a large excess must not overflow.
    logits = np.log(np.maximum(weights, 1e-300)) + eta * excess_losses(losses, reference)
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
