"""Training-loop building blocks shared by the recipes (checkpoints, validation, plots)."""
