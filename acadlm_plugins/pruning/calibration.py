"""Calibration sequences for importance scores: a fixed, domain-balanced sample of packs.

Minitron ranks units by their activations over a few hundred calibration sequences. We take
them from the run's own training corpus, round-robin over its domains and spread evenly over
each domain's packs, so the ranking sees every domain and is the same on every rank and on
every rerun (no sampler state is consumed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from acadlm_plugins.data.mixture import PackedDomainCorpus, collate_domain_packs


def calibration_keys(corpus: PackedDomainCorpus, num_sequences: int) -> list[tuple[int, int]]:
    """``num_sequences`` (domain, pack) addresses: domains in turn, packs evenly spaced."""
    domains = len(corpus.num_packs)
    per_domain = [num_sequences // domains + (d < num_sequences % domains) for d in range(domains)]
    columns: list[list[tuple[int, int]]] = []
    for d, (wanted, available) in enumerate(zip(per_domain, corpus.num_packs)):
        wanted = min(wanted, available)
        stride = max(1, available // max(wanted, 1))
        columns.append([(d, i * stride) for i in range(wanted)])
    # domains in turn, so that the batches (and a truncated list) stay balanced
    longest = max((len(c) for c in columns), default=0)
    return [c[i] for i in range(longest) for c in columns if i < len(c)]


def calibration_batches(corpus: PackedDomainCorpus, num_sequences: int, batch_size: int,
                        device: torch.device | str = "cpu") -> Iterator[dict[str, Any]]:
    """Collated batches of the calibration packs, on ``device``."""
    keys = calibration_keys(corpus, num_sequences)
    for start in range(0, len(keys), batch_size):
        batch = collate_domain_packs([corpus.get(d, p) for d, p in keys[start:start + batch_size]])
        yield {k: v.to(device) for k, v in batch.items()}
