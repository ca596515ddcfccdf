"""``model.project_in_loss`` + ``LinearCrossEntropyLoss``: torchtune's stock recipes without the
step's whole logits. The same loss and gradients as torchtune's ``CEWithChunkedOutputLoss``, no
saved tensor of logits, clear errors for either half alone, and the stock distributed recipe
(FSDP2 on two gloo ranks) ending at the same weights as with torchtune's loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_setup import REPO_ROOT, run_tune_subprocess, write_tiny_model_dir
from torchtune.modules.loss import CEWithChunkedOutputLoss

from acadlm_plugins.errors import ConfigError
from acadlm_plugins.models.llama import llama_from_hf_config
from acadlm_plugins.training.linear_cross_entropy import (
    COMPONENT,
    LinearCrossEntropyLoss,
    projection_key,
)

BATCH, POSITIONS = 2, 23


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model"))


def _models(model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = llama_from_hf_config(str(model_dir))
    ours = llama_from_hf_config(str(model_dir), project_in_loss=True)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels shifted as the stock recipes shift them, some of them ignored."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (BATCH, POSITIONS), generator=generator)
    labels = tokens.clone()
    labels[0, :7] = -100                                   # a prompt not trained on
    labels = torch.hstack((labels[:, 1:], torch.full((BATCH, 1), -100)))
    return tokens, labels


def test_loss_and_gradients_equal_torchtunes_chunked_loss(model_dir: Path):
    theirs, ours = _models(model_dir)
    tokens, labels = _batch(theirs.tok_embeddings.num_embeddings)
    stock = CEWithChunkedOutputLoss(num_output_chunks=8)
    theirs.set_num_output_chunks(stock.num_output_chunks)
    want = stock(theirs(tokens), labels)
    got = LinearCrossEntropyLoss(chunk_tokens=5)(ours(tokens), labels)   # 5 does not divide 23
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want.backward()
    got.backward()
    grads = dict(theirs.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-5, atol=1e-7,
                                   msg=name)
    with torch.no_grad():                                   # evaluation: no checkpointing
        torch.testing.assert_close(LinearCrossEntropyLoss(7)(ours(tokens), labels), want)


def _saved_shapes(run) -> list[torch.Size]:
    shapes: list[torch.Size] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return shapes


def test_no_logits_are_kept_for_the_backward_pass(model_dir: Path):
    """What autograd keeps from the forward pass: with torchtune's loss, tensors of
    ``positions x vocabulary`` (its logits and log-softmax); with ours, none."""
    theirs, ours = _models(model_dir)
    vocab = theirs.tok_embeddings.num_embeddings
    tokens, labels = _batch(vocab)
    stock = CEWithChunkedOutputLoss(num_output_chunks=8)
    theirs.set_num_output_chunks(stock.num_output_chunks)
    saved_theirs = _saved_shapes(lambda: stock(theirs(tokens), labels))
    saved_ours = _saved_shapes(lambda: LinearCrossEntropyLoss(5)(ours(tokens), labels))
    def logits(shapes: list[torch.Size]) -> list[torch.Size]:
        return [shape for shape in shapes if len(shape) and shape[-1] == vocab]

    assert logits(saved_theirs)
    assert saved_ours and not logits(saved_ours), saved_ours


def test_either_half_alone_is_refused_naming_both_keys(model_dir: Path):
    theirs, ours = _models(model_dir)
    tokens, labels = _batch(theirs.tok_embeddings.num_embeddings)
    with pytest.raises(ConfigError) as plain_model:
        LinearCrossEntropyLoss()(theirs(tokens), labels)
    assert plain_model.value.key == "model.project_in_loss"
    with pytest.raises(ConfigError) as stock_loss:
        CEWithChunkedOutputLoss()(ours(tokens), labels)
    assert stock_loss.value.key == "loss._component_"
    for error in (plain_model.value, stock_loss.value):
        assert "model.project_in_loss: true" in error.fix and COMPONENT in error.fix
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="loss.chunk_tokens"):
            LinearCrossEntropyLoss(chunk_tokens=bad)
    with pytest.raises(ConfigError, match="model.project_in_loss"):
        llama_from_hf_config(str(model_dir), project_in_loss="yes")


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    (weights,) = sorted(out.glob("epoch_0/*.safetensors"))
    return load_file(weights)


def test_the_stock_distributed_recipe_ends_at_the_weights_of_torchtunes_loss(
        tmp_path: Path, model_dir: Path):
    """torchtune's own full_finetune_distributed on two gloo ranks (FSDP2), the SFT example, 5
    steps in fp32: the same weights with our two components as with torchtune's loss. The
    loss applies the output projection after the model's forward, so the root's gathered
    parameters must still be there and their gradients reduced across the ranks."""
    recipe, nproc = "tests/stock_distributed_on_cpu.py", 2   # run from REPO_ROOT
    finals = {}
    for name, extra in {"torchtune": [], "ours": [
            "model.project_in_loss=True", f"loss._component_={COMPONENT}",
            "loss.chunk_tokens=48"]}.items():
        out = tmp_path / name
        args = ["--config", str(REPO_ROOT / "configs" / "tiny" / "sft.yaml"), f"output_dir={out}",
                f"checkpointer.checkpoint_dir={model_dir}", "batch_size=2", *extra]
        run_tune_subprocess(recipe, args, cwd=REPO_ROOT, log_file=tmp_path / f"{name}.log",
                            nproc=nproc)
        finals[name] = _final_weights(out)
    assert finals["ours"].keys() == finals["torchtune"].keys()
    moved = False
    start = load_file(model_dir / "model.safetensors")
    for key, want in finals["torchtune"].items():
        torch.testing.assert_close(finals["ours"][key], want, rtol=1e-4, atol=1e-6, msg=key)
        moved = moved or not torch.equal(want, start[key])
    assert moved


def test_an_output_projection_sharded_on_its_own_is_refused(model_dir: Path, tmp_path: Path):
    """torchtune's custom_sharded_layers can make `output` an FSDP2 module of its own; the loss
    calls it once per chunk (each call a collective), so ranks with different chunk counts
    would hang: the first forward refuses it, naming the key (here on a one-rank group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        _, ours = _models(model_dir)
        # as torchtune's shard_model with custom_sharded_layers: the projection's module (the
        # embedding, which the tiny model ties it to) on its own, then the root
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(getattr(ours, projection_key(ours)), mesh=mesh)
        fully_shard(ours, mesh=mesh)
        with pytest.raises(ConfigError) as refused:
            ours(_batch(ours.tok_embeddings.num_embeddings)[0])
        assert refused.value.key == "custom_sharded_layers"
    finally:
        dist.destroy_process_group()
