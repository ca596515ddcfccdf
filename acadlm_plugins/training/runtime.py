"""The process side every recipe shares: joining the process group, FSDP sharding, gathering
full states on rank 0, sums over ranks, the progress bar, teardown and ``recipe_main``.

With ``WORLD_SIZE > 1`` (``tune run --nproc_per_node N``) each helper does the collective work;
in a single process it is the plain local operation, so a recipe reads the same either way.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LRScheduler
from torchtune import training, utils
from torchtune.training.metric_logging import MetricLoggerInterface
from tqdm.auto import tqdm

from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.training.checkpointing import Stateful, restore_rng_state
from acadlm_plugins.training.components import instantiate_component
from acadlm_plugins.training.run_checks import check_device


class ProcessInfo(NamedTuple):
    """Where this process runs and its place among the ranks."""

    distributed: bool
    device: torch.device
    dtype: torch.dtype
    world_size: int
    rank: int


def init_process(cfg: DictConfig) -> ProcessInfo:
    """Pick the configured ``device`` and ``dtype`` and, under a multi-process launch, join the
    process group (NCCL on CUDA, gloo otherwise) so that every later collective has one."""
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    check_device(cfg)  # torchtune would fall back to the CPU for a missing GPU
    device = configured_device(cfg.get("device", "cpu"))
    dtype = configured_dtype(cfg.get("dtype", "fp32"), device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world_size, rank = utils.get_world_size_and_rank()
    return ProcessInfo(distributed, device, dtype, world_size, rank)


def configured_device(value: Any) -> torch.device:
    """The config's ``device`` as torchtune resolves it (``cuda`` picks this rank's GPU; null,
    torchtune's own choice); a value torch does not know, or a GPU this machine lacks, is a
    :class:`ConfigError` naming ``device`` rather than torch's traceback."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError("device", f"is {value!r}, not a device name.",
                          "use `cpu`, `cuda` or `cuda:<index>`.")
    try:
        return utils.get_device(value)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ConfigError("device", f"{value!r} cannot be used here: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}",
                          "use `cpu`, or `cuda` on a machine with a CUDA GPU.") from err


def configured_dtype(value: Any, device: torch.device) -> torch.dtype:
    """The config's ``dtype`` (``fp32``, ``bf16``, ``fp16``, ``fp64``) as torchtune resolves it
    for ``device``; an unknown name, or bf16 where the device lacks it, is a
    :class:`ConfigError` naming ``dtype``."""
    try:
        return training.get_dtype(value if value is None else str(value), device=device)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError("dtype", f"{value!r} cannot be used on {device}: {err}",
                          "use `fp32` or `bf16` (`bf16` needs a GPU or CPU that supports "
                          "it).") from err


def mixed_precision_dtype(cfg: DictConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The compute dtype of a ``mixed_precision: true`` run (its ``dtype``, bf16), or None.

    torchtune trains in ``dtype`` throughout: in bf16 the weights and AdamW's moments are bf16
    too, and an update below half a bf16 step of its weight (about 2e-5 on a weight of 0.01,
    the size of a 1e-5 learning rate's) rounds away. The original recipes (Hugging Face's
    ``--bf16``, Composer's ``amp_bf16``) keep fp32 weights and optimizer state and compute in
    bf16; ``mixed_precision: true`` does the same."""
    from acadlm_plugins.training.config_checks import config_value

    if not config_value(cfg.get("mixed_precision", False), "mixed_precision", bool,
                        allow_none=True):
        return None
    if dtype != torch.bfloat16:
        raise ConfigError("mixed_precision", f"computes in `dtype`, which is {dtype}; only "
                          "bf16 is supported (fp16 would need loss scaling).",
                          "set `dtype: bf16`, or `mixed_precision: false`.")
    from acadlm_plugins.plugins.torchao import float8_recipe

    if float8_recipe((cfg.get("torchao", None) or {}).get("float8", None),
                     field="torchao.float8"):
        raise ConfigError("mixed_precision", "is not combined with `torchao.float8` (float8 "
                          "training converts bf16 linear layers).", "remove one of the two.")
    return dtype


def run_precision(cfg: DictConfig, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """The dtype a training recipe builds its weights (and so its optimizer state) in, and the
    compute dtype of mixed precision (None without): ``(dtype, None)``, or ``(float32, bf16)``
    for ``mixed_precision: true`` (:func:`mixed_precision_dtype`)."""
    compute_dtype = mixed_precision_dtype(cfg, dtype)
    return (dtype if compute_dtype is None else torch.float32), compute_dtype


def place_model(model: torch.nn.Module, *, distributed: bool, device: torch.device,
                compute_dtype: torch.dtype | None) -> None:
    """Make a training recipe's loaded model ready to train: sharded with FSDP2 under
    ``--nproc_per_node`` (in mixed precision when ``compute_dtype``), or on one process with its
    forward under autocast to ``compute_dtype`` (nothing to do without it)."""
    if distributed:
        shard_decoder_layers(model, compute_dtype=compute_dtype)
    elif compute_dtype is not None:
        compute_in(model, compute_dtype, device)


def shard_decoder_layers(model: torch.nn.Module, *,
                         compute_dtype: torch.dtype | None = None) -> None:
    """Shard ``model`` with FSDP2, one unit per transformer layer (the torchtune default).
    With ``compute_dtype`` (``mixed_precision``), FSDP2's mixed precision: each layer's fp32
    shards are gathered in ``compute_dtype`` for its forward and backward, and gradients are
    reduced in fp32 onto the fp32 shards the optimizer updates (torchtune's ``shard_model``
    takes no such policy, so the layers are sharded here as it shards them)."""
    from torchtune.modules import TransformerSelfAttentionLayer

    if compute_dtype is None:
        training.shard_model(
            model, [lambda _n, m: isinstance(m, TransformerSelfAttentionLayer)],
            cpu_offload=False, reshard_after_forward=True)
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for module in reversed(list(model.modules())):
        if isinstance(module, TransformerSelfAttentionLayer):
            fully_shard(module, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, reshard_after_forward=True, mp_policy=policy)


def compute_in(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Run ``model``'s forward (and so its backward) under autocast to ``compute_dtype`` on
    one device, its parameters staying in their own (fp32) dtype, as Hugging Face's ``--bf16``
    and Composer's ``amp_bf16`` do. The state dict is unchanged. Unlike FSDP2's mixed precision,
    which casts the gathered weights, autocast casts each matrix product's inputs: the
    embedding output and the residual stream stay fp32 and the bf16 weight copies are kept for
    the backward, so one process holds more activations than a sharded run."""
    model.forward = torch.autocast(device.type, dtype=compute_dtype)(model.forward)


def full_model_state(model: torch.nn.Module, *, distributed: bool,
                     is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) CPU state dict on rank 0; every rank must call this, since
    gathering FSDP shards is a collective."""
    if distributed:
        return training.gather_cpu_state_dict(model, is_rank_zero)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                         distributed: bool, is_rank_zero: bool) -> dict[str, Any]:
    """The optimizer's full state dict on rank 0 (gathered from every rank under FSDP; torchao's
    low-bit moments are gathered as float32, see ``optimizers.float_states``)."""
    if distributed:
        from acadlm_plugins.training.optimizers import float_states

        with float_states(optimizer):
            return training.get_full_optimizer_state_dict(model, optimizer, is_rank_zero)
    return optimizer.state_dict()


def restore_training_state(state: dict[str, Any], *, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, lr_scheduler: LRScheduler | None,
                           sampler: Stateful, distributed: bool, device: torch.device,
                           extra: Mapping[str, Callable[[Any], None]] | None = None,
                           finished: bool = False) -> None:
    """Load what :func:`~acadlm_plugins.training.checkpointing.recipe_state` saved: optimizer
    (resharded under FSDP), scheduler, data position, then ``extra[key](state[key])`` for each
    extra entry (e.g. plugin state) and last the RNG, so that nothing restored after it can
    draw from it.

    The optimizer's hyperparameters stay the config's (:func:`keep_configured_hyperparameters`):
    loading a state dict would otherwise put back the saved learning rate, weight decay and
    betas, and a run resumed with a lower ``optimizer.lr`` after a NaN would repeat the old one.
    A ``finished`` run (the checkpoint is at ``max_steps``) trains no step more, so a changed
    hyperparameter would change nothing while its outputs were reported as made with it: that
    is a :class:`~acadlm_plugins.errors.ConfigError` naming the key.
    """
    configured = [{key: value for key, value in group.items() if key != "params"}
                  for group in optimizer.param_groups]
    if distributed:
        training.load_from_full_optimizer_state_dict(model, optimizer, state["optimizer"], device)
    else:
        optimizer.load_state_dict(state["optimizer"])
    from acadlm_plugins.training.optimizers import match_loaded_states

    # low-bit moments saved as float32 (distributed), or a run resumed with another optimizer
    # than it saved with (AdamW8bit -> AdamW): every moment gets the form this optimizer updates
    converted = match_loaded_states(optimizer)
    if converted:
        utils.get_logger("INFO").info("%d resumed optimizer moments converted to this "
                                      "optimizer's form", converted)
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    changed = keep_configured_hyperparameters(optimizer, lr_scheduler, configured)
    if finished and changed:
        from acadlm_plugins.errors import ConfigError

        raise ConfigError(changed[0], f"differs from the finished run's checkpoint (changed: "
                          f"{', '.join(changed)}), but the run is already at its last step "
                          f"({state.get('step')}), so nothing would be trained with it and its "
                          "results would be reported as if it had.",
                          "write to a new `output_dir` (or raise `max_steps` to train on), or "
                          "restore the value the run was made with.")
    sampler.load_state_dict(state["sampler"])
    for key, restore in (extra or {}).items():
        restore(state[key])
    restore_rng_state(state["rng"])


def keep_configured_hyperparameters(optimizer: torch.optim.Optimizer,
                                    lr_scheduler: LRScheduler | None,
                                    configured: list[dict[str, Any]]) -> list[str]:
    """Put the config's hyperparameters (``configured``: the freshly built optimizer's param
    groups, read before a checkpoint was loaded into it) back after the load, logging each one
    that differs from the checkpoint's. The peak learning rate is the scheduler's base; the
    current one is recomputed at the restored step. Unchanged values leave the resumed run
    exactly as the uninterrupted one. Returns the changed keys (``optimizer.lr``, with the param
    group when there are several)."""
    log = utils.get_logger("INFO")
    groups = optimizer.param_groups
    changed: list[str] = []
    if len(groups) != len(configured):
        return changed  # another grouping than the config builds: nothing to compare
    rebased = lr_scheduler is None or isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    changed_lr = False
    for index, (group, fresh) in enumerate(zip(groups, configured, strict=True)):
        peak_key = "initial_lr" if "initial_lr" in fresh else "lr"
        for key, value in fresh.items():
            if key == "lr" and peak_key == "initial_lr":
                continue  # the current rate follows from the peak and the step
            if key not in group or _same_setting(group[key], value):
                continue
            name = "lr" if key == peak_key else key
            if key == peak_key and not rebased:
                log.warning("optimizer.lr: the config's %s is not used; the resumed run keeps "
                            "the checkpoint's schedule (%s cannot be re-based)", value,
                            type(lr_scheduler).__name__)
                continue
            log.info("optimizer.%s%s: the config's %s replaces the checkpoint's %s", name,
                     f" (param group {index})" if len(groups) > 1 else "", value, group[key])
            changed.append(f"optimizer.{name}" + (f" (param group {index})"
                                                  if len(groups) > 1 else ""))
            group[key] = value
            changed_lr |= key == peak_key
    if lr_scheduler is None or not rebased:
        return changed
    # Recomputed even when no value changed: the schedule is the config's (a larger
    # `max_steps` stretches it), while the loaded optimizer holds the rate the checkpoint's
    # schedule gave, which the first resumed step would otherwise train at. With the same
    # config the two are the same number, so the resume stays exact.
    if changed_lr:
        lr_scheduler.base_lrs = [group["initial_lr"] for group in groups]
    rates = [base * schedule(lr_scheduler.last_epoch)
             for base, schedule in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(groups, rates, strict=True):
        if isinstance(group["lr"], torch.Tensor):  # torchao's low-bit optimizers keep a tensor
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    lr_scheduler._last_lr = rates
    return changed


def _same_setting(saved: Any, configured: Any) -> bool:
    """Equal as hyperparameters: betas saved as a list equal the config's tuple."""
    if isinstance(saved, (list, tuple)) and isinstance(configured, (list, tuple)):
        return list(saved) == list(configured)
    return bool(saved == configured)


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  lr_scheduler: LRScheduler | None, clip_grad_norm: float | None, *,
                  step: int | None = None) -> torch.Tensor:
    """Check the gradients, clip them (when ``clip_grad_norm`` is set), step the optimizer and
    scheduler; return the gradient norm before clipping (over all shards under FSDP).

    A finite loss can still leave NaN or infinite gradients (an overflow in backward); one
    optimizer step with them ruins the weights, and the next checkpoint would save them. So the
    norm is computed every step, clipping or not, and a non-finite one raises
    :class:`~acadlm_plugins.plugins.nonfinite_loss_guard.NonFiniteLossError` naming
    ``grad_norm`` (at ``step``) before the optimizer or the scheduler moves: the weights and
    the last checkpoint on disk stay as they were. Every rank sees the same global norm, so
    every rank stops."""
    from acadlm_plugins.plugins.nonfinite_loss_guard import NonFiniteLossError

    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    # a DTensor under FSDP: clipping takes it as it is, the check and the caller the whole
    grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if not bool(torch.isfinite(grad_norm)):
        raise NonFiniteLossError(step, "grad_norm", float(grad_norm))
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, float(clip_grad_norm), norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return grad_norm


def all_reduce_sum(tensor: torch.Tensor, *, distributed: bool,
                   device: torch.device) -> torch.Tensor:
    """``tensor`` summed over ranks, on the CPU (the communication runs on ``device``, which
    NCCL requires to be the GPU); ``tensor`` itself in a single process."""
    if not distributed:
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved)
    return moved.cpu()


def all_reduce_float(value: float, *, distributed: bool, device: torch.device) -> float:
    """``value`` summed over ranks, in float64."""
    summed = all_reduce_sum(torch.tensor([value], dtype=torch.float64), distributed=distributed,
                            device=device)
    return float(summed[0])


def current_world_size() -> int:
    """The number of ranks of the process group: 1 when ``torch.distributed`` is not
    initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rows_from_every_rank(row: torch.Tensor, *, device: torch.device | None = None
                         ) -> torch.Tensor:
    """Every rank's ``row`` (a vector of ``k`` numbers; the same ``k`` on every rank), stacked
    into a ``world_size x k`` float64 table on the CPU, row ``r`` from rank ``r``: each rank
    fills its own row of a table of zeros, and one sum over ranks (:func:`all_reduce_sum`, on
    ``device``; None: the GPU under NCCL, which reduces only GPU tensors, else the CPU) gives
    every rank the whole table. Every rank must call it at the same point: it is one collective
    on each, whatever the rows hold. In a single process (``torch.distributed`` not
    initialized): ``row[None]``, with no collective."""
    row = row.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    world_size = current_world_size()
    if world_size == 1:
        return row[None]
    table = torch.zeros(world_size, row.numel(), dtype=torch.float64)
    table[dist.get_rank()] = row
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
    return all_reduce_sum(table, distributed=True, device=device)


T = TypeVar("T")


def together(work: Callable[[], T], what: str, *, run_here: bool, distributed: bool,
             device: torch.device | None = None) -> T | None:
    """``work()`` where ``run_here`` (None elsewhere); under ``torch.distributed`` the ranks
    then share which of them it raised on (one collective, :func:`rows_from_every_rank` on
    ``device``, which also makes them wait for each other, as a barrier would), so that none is
    left waiting in a later collective for one that stopped: a rank whose work raised raises
    its own error, the others an :class:`~acadlm_plugins.errors.AcadlmError` naming the ranks
    that stopped and ``what`` they were doing (their own error, printed by them, names the
    cause and the fix). In a single process: ``work()``, with no collective."""
    if not distributed:
        return work() if run_here else None
    result, error = None, None
    if run_here:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the others know
            error = err
    reports = rows_from_every_rank(torch.tensor([0.0 if error is None else 1.0]), device=device)
    failed = [r for r, (flag,) in enumerate(reports.tolist()) if flag]
    if error is not None:
        raise error
    if failed:
        ranks = ", ".join(str(r) for r in failed)
        raise AcadlmError(f"rank{'s' if len(failed) > 1 else ''} {ranks} stopped while {what} "
                          f"(the error printed by rank {failed[0]} names the cause and the "
                          "fix); this rank stops with it.")
    return result


def barrier(distributed: bool) -> None:
    """Wait for every rank (a no-op in a single process)."""
    if distributed:
        dist.barrier()


def rank_zero_metric_logger(cfg: DictConfig,
                            is_rank_zero: bool) -> MetricLoggerInterface | None:
    """The configured ``metric_logger`` with the config logged to it, on rank 0 only (the other
    ranks' metrics are reduced onto rank 0 first)."""
    if not is_rank_zero:
        return None
    metric_logger = instantiate_component(cfg, "metric_logger")
    metric_logger.log_config(cfg)
    return metric_logger


def progress_bar(*, total: int, initial: int, desc: str, is_rank_zero: bool) -> tqdm:
    """A step progress bar on rank 0, silenced by ``ACADLM_NO_PROGRESS=1`` (tests, batch jobs)."""
    return tqdm(total=total, initial=initial, desc=desc,
                disable=not is_rank_zero or os.environ.get("ACADLM_NO_PROGRESS") == "1",
                dynamic_ncols=True)


def is_due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, evaluate, save) runs after ``step``: every ``every``
    steps, and always after the last one."""
    return step % every == 0 or step == max_steps


def close_process(distributed: bool,
                  metric_logger: MetricLoggerInterface | None = None) -> None:
    """Flush and close the metric logger (if any), then leave the process group."""
    if metric_logger is not None:
        metric_logger.close()
    if distributed and dist.is_initialized():
        dist.destroy_process_group()


class Recipe(Protocol):
    """What :func:`run_recipe` calls on a recipe object besides its stages."""

    def setup(self, cfg: DictConfig) -> None: ...

    def cleanup(self) -> None: ...


R = TypeVar("R", bound=Recipe)


@contextmanager
def no_new_empty_folders_on_error(cfg: DictConfig, key: str = "output_dir") -> Iterator[None]:
    """Run the block (a recipe's ``setup``); if it raises, remove the folders of ``cfg[key]``
    that did not exist before it and are still empty. torchtune's checkpointer makes its
    ``output_dir`` when it is built, so a fresh run refused by a later check (a dataset typo)
    would otherwise leave an empty run folder behind; a folder holding anything is kept."""
    value = cfg.get(key, None)
    created: list[Path] = []
    if isinstance(value, (str, Path)):
        folder = Path(value).expanduser().absolute()
        while not folder.exists() and folder != folder.parent:
            created.append(folder)  # deepest first
            folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone: another rank): keep what is left
                break
        raise


def run_recipe(cfg: DictConfig, recipe_class: Callable[[DictConfig], R],
               *stages: Callable[[R], object]) -> None:
    """The body of a torchtune ``recipe_main``: build the recipe, ``setup(cfg)``, run each
    stage (e.g. ``MyRecipe.train``) in order, ``cleanup()``. A setup that refuses the run
    leaves no new empty ``output_dir`` behind."""
    with no_new_empty_folders_on_error(cfg):
        recipe = recipe_class(cfg)
        recipe.setup(cfg)
    for stage in stages:
        stage(recipe)
    recipe.cleanup()
    # FSDP2's modules hold the process group's finished collectives in reference cycles; freed
    # only at interpreter shutdown, gloo's work objects can abort the process there ("terminate
    # called without an active exception", seen once on a rank of a finished 2-process run).
    del recipe
    gc.collect()


TRACEBACK_ENV = "ACADLM_TRACEBACK"


def run_main(recipe_main: Callable[[], object]) -> int:
    """What ``tune run <recipe>`` runs: ``recipe_main()``, with our errors (a config key, a data
    file, a missing default, a non-finite loss: each names its fix) printed as one line with
    exit code 2 instead of a traceback, which would bury the fix; so is a ``???`` value left
    unset, and so is a command line torchtune cannot read (a ``--config`` file missing, an
    override it cannot merge, a ``${...}`` that resolves to nothing), checked before the recipe
    starts (:func:`~acadlm_plugins.training.command_line.check_command_line`). Notes added to
    the error (``__notes__``: the plugin and hook it was raised in) follow the line, one a
    line. ``ACADLM_TRACEBACK=1`` shows the traceback, for reporting a bug;
    errors that are not ours, and ours that report a bug (``user_error`` False), always show
    it."""
    from omegaconf.errors import MissingMandatoryValue

    from acadlm_plugins.training.command_line import check_command_line

    try:
        try:
            check_command_line(sys.argv[1:])
            recipe_main()
        except MissingMandatoryValue as err:  # a `???` in the config that nobody filled in
            key = getattr(err, "full_key", None) or "?"
            raise ConfigError(key, "is `???` in the config: it has no default and must be "
                              "given.", f"add `{key}=<value>` to the command line.") from err
    except AcadlmError as err:
        if os.environ.get(TRACEBACK_ENV) == "1" or not err.user_error:
            raise
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        # the notes added on the way up (the plugin and hook a plugin's error came from)
        notes = "".join(f"\n{note}" for note in getattr(err, "__notes__", ()))
        print(f"error{where}: {err}{notes}\n(set {TRACEBACK_ENV}=1 to see the traceback)",
              file=sys.stderr, flush=True)
        return 2
    return 0
