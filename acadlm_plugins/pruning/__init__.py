"""Sheared-LLaMA targeted structured pruning (Xia et al. 2023): hard-concrete masks over layers,
GQA-aware attention heads, the hidden dimension and MLP channels, Lagrangian constraints toward a
target architecture, and materialization of the smaller model."""
