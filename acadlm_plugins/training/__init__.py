"""Building blocks shared by the recipes: config checks, process setup and teardown
(``runtime``), checkpoints and resuming, validation, plots."""
