"""A test plugin: writes the dtype of the first linear layer's output (the first layer's query
projection) to the file named by ``$ACADLM_TEST_MATMUL_DTYPE_FILE``, to see which precision a
run's matrix products run in (torchtune returns the logits in fp32 whatever the dtype)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from acadlm_plugins import hookimpl


class MatmulDtypeProbe:
    @hookimpl
    def acadlm_model_built(self, model: Any, cfg: Any, device: Any) -> None:
        path = Path(os.environ["ACADLM_TEST_MATMUL_DTYPE_FILE"])

        def record(_module: Any, _args: Any, output: Any) -> None:
            path.write_text(str(output.dtype))

        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(record)
