"""Data components: domain corpora, packing with document boundaries, domain mixtures."""
