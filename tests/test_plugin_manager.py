"""Tests for acadlm_plugins.plugin_manager and the built-in non-finite loss guard."""

from __future__ import annotations

import importlib.util
import logging
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import acadlm_plugins.plugins.nonfinite_loss_guard as guard_module
from acadlm_plugins import hookimpl, plugin_manager
from acadlm_plugins.errors import AcadlmError, ConfigError
from acadlm_plugins.plugin_manager import (
    ALLOW_ENV,
    BUILTIN_PLUGINS,
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    TRACE_ENV,
    PluginLoadError,
    build_plugin_manager,
    collect_metrics,
    list_plugins,
    plugin_states,
    restore_plugin_states,
)
from acadlm_plugins.plugins.nonfinite_loss_guard import NonFiniteLossError

EXAMPLE_PLUGIN_DIR = Path(__file__).parent / "example_plugin"
GUARD = "acadlm_plugins.plugins.nonfinite_loss_guard"
Z_LOSS = "acadlm_example_plugin:ZLossPlugin"


def _write_dist_info(site: Path, dist_name: str, entry_points: dict[str, str]) -> None:
    """Fake `pip install`: the metadata folder importlib.metadata reads entry points from."""
    dist_info = site / f"{dist_name.replace('-', '_')}-0.1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1.0\n"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def example_on_path(monkeypatch):
    """Make `acadlm_example_plugin` importable, without installing it."""
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_DIR))


@pytest.fixture
def site_dir(tmp_path, monkeypatch) -> Path:
    """An empty directory on sys.path to write fake installed distributions into."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def installed_example(example_on_path, site_dir) -> Path:
    """The example plugin as if `pip install tests/example_plugin` had run."""
    _write_dist_info(site_dir, "acadlm-example-plugin", {"z_loss": Z_LOSS})
    return site_dir


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Write a module into an importable tmp dir: plugin_module(name, source)."""
    modules = tmp_path / "modules"
    modules.mkdir()
    monkeypatch.syspath_prepend(str(modules))

    def write(name: str, source: str) -> str:
        (modules / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def _call_extra_loss(pm, logits, loss, step=1):
    return pm.hook.acadlm_extra_loss(model=None, batch={}, logits=logits, loss=loss, step=step,
                                     step_tokens=1.0, micro_batches=1)


def _states(pm) -> dict:
    """The plugins' states of a checkpoint, without the record of which plugin saved which."""
    return {k: v for k, v in plugin_states(pm).items() if k != "_acadlm_plugin_names"}


# --- discovery -------------------------------------------------------------------------------


def test_installed_plugin_is_discovered_by_entry_point(installed_example):
    pm = build_plugin_manager(builtins=(GUARD,))
    assert list_plugins(pm) == [GUARD, "z_loss"]
    assert type(pm.get_plugin("z_loss")).__name__ == "ZLossPlugin"


def test_allow_list_excludes_entry_points_not_named(installed_example, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "some_other_plugin")
    assert list_plugins(build_plugin_manager(builtins=(GUARD,))) == [GUARD]
    monkeypatch.setenv(ALLOW_ENV, " some_other_plugin , z_loss")
    assert list_plugins(build_plugin_manager(builtins=(GUARD,))) == [GUARD, "z_loss"]


def test_misspelled_allow_name_warns_with_the_closest_installed_name(installed_example,
                                                                      monkeypatch, caplog):
    """``ACADLM_PLUGINS_ALLOW=z_los`` leaves every installed plugin out; the warning says
    which name was meant, so the user sees why the plugin does not run."""
    monkeypatch.setenv(ALLOW_ENV, "z_los")
    logger = logging.getLogger("acadlm_plugins.plugin_manager")
    logger.addHandler(caplog.handler)  # the package logger may not propagate (route_package_logs)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            assert list_plugins(build_plugin_manager(builtins=(GUARD,))) == [GUARD]
    finally:
        logger.removeHandler(caplog.handler)
    assert "'z_los' (did you mean 'z_loss'?)" in caplog.text
    assert "installed: z_loss; of those, this run loads: none" in caplog.text


def test_allow_list_never_excludes_config_plugins(installed_example, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "some_other_plugin")
    pm = build_plugin_manager([Z_LOSS], builtins=(GUARD,))
    assert list_plugins(pm) == [GUARD, Z_LOSS]


def test_disable_autoload_loads_no_entry_points(installed_example, monkeypatch):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert list_plugins(build_plugin_manager(builtins=(GUARD,))) == [GUARD]
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    assert list_plugins(build_plugin_manager(builtins=(GUARD,), load_entry_points=False)) == [GUARD]


def test_config_dotted_path_registers_plugin(example_on_path):
    pm = build_plugin_manager([Z_LOSS], builtins=())
    assert list_plugins(pm) == [Z_LOSS]
    # torchtune's `_component_` style, without the colon, works too.
    pm = build_plugin_manager(["acadlm_example_plugin.ZLossPlugin"], builtins=())
    assert list_plugins(pm) == ["acadlm_example_plugin.ZLossPlugin"]
    # A single entry written without list brackets in the YAML.
    assert list_plugins(build_plugin_manager(Z_LOSS, builtins=())) == [Z_LOSS]


def test_plugin_found_twice_is_registered_once(installed_example):
    pm = build_plugin_manager([Z_LOSS, Z_LOSS], builtins=(GUARD,))
    assert list_plugins(pm) == [GUARD, "z_loss"]
    assert len(pm.hook.acadlm_state_dict()) == 1


def test_class_plugin_is_instantiated_per_manager(example_on_path):
    first = build_plugin_manager([Z_LOSS], builtins=())
    second = build_plugin_manager([Z_LOSS], builtins=())
    assert first.get_plugin(Z_LOSS) is not second.get_plugin(Z_LOSS)
    _call_extra_loss(first, torch.zeros(1, 2, 5), torch.tensor(1.0))
    assert _states(first) == {"acadlm_example_plugin.z_loss": {"steps_penalised": 1}}
    assert _states(second) == {"acadlm_example_plugin.z_loss": {"steps_penalised": 0}}


def test_builtins_are_registered_like_other_plugins():
    assert GUARD in BUILTIN_PLUGINS
    assert "acadlm_plugins.plugins.dynamic_batch_loading:DynamicBatchLoadingPlugin" in (
        BUILTIN_PLUGINS
    )
    pm = build_plugin_manager(builtins=(GUARD,), load_entry_points=False)
    assert list_plugins(pm) == [GUARD]
    assert pm.hook.acadlm_extra_loss.get_hookimpls()[0].plugin_name == GUARD


@pytest.mark.skipif(
    importlib.util.find_spec("acadlm_plugins.plugins.dynamic_batch_loading") is None,
    reason="acadlm_plugins.plugins.dynamic_batch_loading is not written yet",
)
def test_default_builtins_all_load():
    pm = build_plugin_manager(load_entry_points=False)
    assert list_plugins(pm) == list(BUILTIN_PLUGINS)


# --- tracing ---------------------------------------------------------------------------------


def test_trace_logs_hook_calls(monkeypatch, caplog):
    monkeypatch.setenv(TRACE_ENV, "1")
    caplog.set_level(logging.INFO, logger="acadlm_plugins.plugin_manager")
    pm = build_plugin_manager(builtins=(GUARD,), load_entry_points=False)
    _call_extra_loss(pm, None, torch.tensor(2.5), step=4)
    assert "acadlm_extra_loss" in caplog.text
    assert "step: 4" in caplog.text
    assert "finish acadlm_extra_loss" in caplog.text


def test_no_trace_by_default(caplog):
    caplog.set_level(logging.DEBUG, logger="acadlm_plugins.plugin_manager")
    pm = build_plugin_manager(builtins=(GUARD,), load_entry_points=False)
    caplog.clear()
    _call_extra_loss(pm, None, torch.tensor(2.5))
    assert caplog.text == ""


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["acadlm_no_such_package.plugin", "acadlm_no_such_pkg:Plugin"])
def test_unimportable_path_names_key_and_path(path):
    with pytest.raises(ConfigError) as error:
        build_plugin_manager([path], builtins=())
    assert error.value.key == "plugins"
    assert path in str(error.value)
    assert "ModuleNotFoundError" in str(error.value)
    assert "install the package" in str(error.value)


def test_missing_attribute_names_path(example_on_path):
    with pytest.raises(ConfigError, match="acadlm_example_plugin:NoSuchPlugin.*AttributeError"):
        build_plugin_manager(["acadlm_example_plugin:NoSuchPlugin"], builtins=())


def test_broken_entry_point_names_itself_its_distribution_and_the_way_out(site_dir, monkeypatch):
    _write_dist_info(site_dir, "acadlm-broken-plugin", {"broken": "acadlm_gone_module:Plugin"})
    with pytest.raises(PluginLoadError) as error:
        build_plugin_manager(builtins=())
    message = str(error.value)
    assert "'broken = acadlm_gone_module:Plugin'" in message
    assert "acadlm-broken-plugin 0.1.0" in message
    assert ALLOW_ENV in message
    # The fix it names works: an allow-list without it never imports it.
    monkeypatch.setenv(ALLOW_ENV, "z_loss")
    assert list_plugins(build_plugin_manager(builtins=())) == []


def test_misspelled_hook_names_plugin_hook_and_fix(plugin_module):
    module = plugin_module(
        "typo_plugin",
        """
        from acadlm_plugins import hookimpl

        @hookimpl
        def acadlm_extra_los(loss, step):
            return None
        """,
    )
    with pytest.raises(ConfigError) as error:
        build_plugin_manager([module], builtins=())
    message = str(error.value)
    assert error.value.key == "plugins"
    assert "'typo_plugin'" in message
    assert "'acadlm_extra_los'" in message
    assert "rename 'acadlm_extra_los' to 'acadlm_extra_loss'" in message


def test_plugin_without_hooks_is_rejected(plugin_module):
    module = plugin_module(
        "undecorated_plugin",
        """
        def acadlm_extra_loss(loss, step):
            return None
        """,
    )
    with pytest.raises(ConfigError, match="implements no acadlm hook.*@hookimpl"):
        build_plugin_manager([module], builtins=())


def test_hook_argument_not_in_spec_is_rejected():
    from acadlm_plugins import hookimpl

    class WrongArguments:
        @hookimpl
        def acadlm_extra_loss(self, loss, learning_rate):
            return None

    with pytest.raises(ConfigError) as error:
        build_plugin_manager([WrongArguments], builtins=())
    assert "WrongArguments" in str(error.value)
    assert "{'learning_rate'} are declared in the hookimpl" in str(error.value)


# --- helpers ---------------------------------------------------------------------------------


def test_collect_metrics_merges_and_skips_none():
    assert collect_metrics([{"a": 1.0}, None, {"b": 2.0}]) == {"a": 1.0, "b": 2.0}
    assert collect_metrics([]) == {}


def test_collect_metrics_refuses_key_clash():
    with pytest.raises(AcadlmError, match="same key 'z_loss'"):
        collect_metrics([{"z_loss": 1.0}, {"other": 0.0, "z_loss": 2.0}])


def test_collect_metrics_refuses_non_dict():
    with pytest.raises(AcadlmError, match="returned float"):
        collect_metrics([1.0])


def test_plugin_state_round_trips_through_a_checkpoint(example_on_path, tmp_path):
    trained = build_plugin_manager([Z_LOSS], builtins=(GUARD,))
    for step in range(1, 4):
        _call_extra_loss(trained, torch.randn(2, 3, 7), torch.tensor(1.0), step=step)
    torch.save({"plugins": plugin_states(trained)}, tmp_path / "ckpt.pt")

    resumed = build_plugin_manager([Z_LOSS], builtins=(GUARD,))
    restore_plugin_states(resumed, torch.load(tmp_path / "ckpt.pt")["plugins"])
    assert _states(resumed) == {"acadlm_example_plugin.z_loss": {"steps_penalised": 3}}
    _call_extra_loss(resumed, torch.randn(2, 3, 7), torch.tensor(1.0), step=4)
    assert resumed.get_plugin(Z_LOSS).steps_penalised == 4


def test_example_plugin_changes_the_training_loss_and_metrics(example_on_path):
    pm = build_plugin_manager([Z_LOSS], builtins=(GUARD,))
    pm.hook.acadlm_configure(cfg={"z_loss_coefficient": 0.01}, recipe="continued_pretrain")
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    loss = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))

    terms = collect_metrics(_call_extra_loss(pm, [logits[:, :3], logits[:, 3:]], loss))
    expected = 0.01 * logits.logsumexp(dim=-1).pow(2).mean()
    assert set(terms) == {"z_loss"}
    torch.testing.assert_close(terms["z_loss"], expected)

    (loss + sum(terms.values())).backward(retain_graph=True)
    with_z_loss = logits.grad.clone()
    logits.grad = None
    loss.backward()
    assert not torch.allclose(with_z_loss, logits.grad)

    metrics = collect_metrics(pm.hook.acadlm_after_optimizer_step(step=1, metrics={}))
    assert metrics["z_loss/steps"] == 1
    assert metrics["z_loss/mean_log_z"] == pytest.approx(
        float(logits.detach().logsumexp(-1).mean())
    )


@pytest.mark.parametrize("value", [-1, "abc", True, float("inf"), None])
def test_example_plugin_config_error_names_key(example_on_path, value):
    """A typo, a boolean or an infinite coefficient is a ConfigError naming the key (as
    docs/plugins.md promises), not a bare ValueError or a coefficient of 1.0."""
    pm = build_plugin_manager([Z_LOSS], builtins=())
    with pytest.raises(ConfigError, match="z_loss_coefficient") as error:
        pm.hook.acadlm_configure(cfg={"z_loss_coefficient": value}, recipe="prune")
    assert error.value.key == "z_loss_coefficient"
    assert "Fix:" in str(error.value)


# --- non-finite loss guard -------------------------------------------------------------------


@pytest.fixture
def guarded():
    return build_plugin_manager(builtins=(GUARD,), load_entry_points=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_guard_stops_on_non_finite_loss(guarded, bad):
    with pytest.raises(NonFiniteLossError) as error:
        _call_extra_loss(guarded, None, torch.tensor(bad), step=17)
    message = str(error.value)
    # the hook's step counts the steps taken; the error names the one in progress, as logged
    assert error.value.step == 18
    assert "step 18" in message
    assert "optimizer.lr" in message
    assert "clip_grad_norm" in message
    assert "last checkpoint on disk is intact" in message


def test_guard_passes_finite_loss_and_adds_no_term(guarded):
    assert _call_extra_loss(guarded, None, torch.tensor(3.2, requires_grad=True)) == []
    assert _call_extra_loss(guarded, None, 0.5) == []


def test_guard_also_checks_other_plugins_terms(example_on_path):
    pm = build_plugin_manager([Z_LOSS], builtins=(GUARD,))
    logits = torch.zeros(1, 2, 4)
    logits[0, 1, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="`loss/z_loss` is inf at step 10"):
        _call_extra_loss(pm, logits, torch.tensor(1.0), step=9)


def test_guard_runs_no_collective_in_a_single_process(guarded, monkeypatch):
    from acadlm_plugins.plugins.nonfinite_loss_guard import check_finite_on_every_rank

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_collective)
    assert _call_extra_loss(guarded, None, torch.tensor(1.0)) == []
    with pytest.raises(NonFiniteLossError, match="`loss/kl` is inf at step 4;") as error:
        check_finite_on_every_rank([("loss", 1.0), ("loss/kl", torch.tensor([0.0, math.inf]))],
                                   step=4)
    assert error.value.ranks is None


class NanLossOnRankOne:
    """Test plugin for `tune run --nproc_per_node 2`: in the second step, rank 1's logits turn
    NaN (as a bf16 overflow in its micro-batch alone would); rank 0's loss stays finite."""

    @hookimpl
    def acadlm_model_built(self, model):
        self.step = -1

        def poison(module, args, out):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            return out * float("nan") if rank == 1 and self.step == 1 and module.training else out

        model.register_forward_hook(poison)

    @hookimpl
    def acadlm_batch_ready(self, step):
        self.step = step


class InfTermOnRankOne:
    """Test plugin: adds a loss term, zero but on rank 1 in the second step, where it is inf."""

    @hookimpl
    def acadlm_extra_loss(self, logits, step):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        bad = rank == 1 and step == 1
        return {"probe": logits.sum() * 0.0 + (math.inf if bad else 0.0)}


@pytest.mark.distributed
@pytest.mark.parametrize(("probe", "named"), [("NanLossOnRankOne", "`loss` is nan"),
                                              ("InfTermOnRankOne", "`loss/probe` is inf")])
def test_guard_stops_every_rank_when_one_rank_sees_a_non_finite_loss(tmp_path, probe, named):
    """A NaN loss or plugin term on one rank only stops every rank, before backward, with the
    one-line error and exit code 2: no rank goes on into FSDP's collectives alone (on gloo a
    "Connection closed by peer" traceback, on NCCL a hang)."""
    import re

    from tiny_setup import run_tune_expecting_failure, tiny_run_args

    args = tiny_run_args(tmp_path, "batch_size=2", "max_steps=3", "save_every_n_steps=3",
                         f"plugins=[test_plugin_manager:{probe}]")
    log = run_tune_expecting_failure("acadlm_plugins/continued_pretrain_recipe", args,
                                     cwd=tmp_path)
    for rank in (0, 1):
        assert f"error (rank {rank}): {named} at step 2 (on rank 1 of 2);" in log, log
    # torchrun's summary: the ranks exited 2; torchrun stops the other rank (SIGTERM, -15) as
    # soon as one has exited, which can beat that rank's own exit after its error line
    codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", log)]
    assert 2 in codes and set(codes) <= {2, -15}, log
    assert "Connection closed" not in log, log
    # the launcher prints one traceback for its ChildFailedError; no rank prints one
    assert not re.search(r'File "[^"]*acadlm_plugins', log), log
    assert log.count("Traceback (most recent call last)") <= 1, log
    assert not list((tmp_path / "run").glob("step_*"))  # nothing saved after the NaN


# --- what third-party plugins return, and the errors that name them --------------------------


class FloatTerm:
    @hookimpl
    def acadlm_extra_loss(self, loss):
        return {"my_float": 0.5}


class VectorTerm:
    @hookimpl
    def acadlm_extra_loss(self, loss):
        return {"my_vector": loss * torch.ones(4)}


class ListOfTerms:
    @hookimpl
    def acadlm_extra_loss(self, loss):
        return [loss * 0]


class GoodTerm:
    @hookimpl
    def acadlm_extra_loss(self, loss):
        return {"good": loss * 0}


class StepMetricA:
    @hookimpl
    def acadlm_after_optimizer_step(self, step):
        return {"shared/metric": 1.0}


class StepMetricB:
    @hookimpl
    def acadlm_after_optimizer_step(self, step):
        return {"shared/metric": 2.0}


class ReplacesTheLoss:
    """Returns the recipe's own `loss` from acadlm_after_optimizer_step."""

    @hookimpl
    def acadlm_after_optimizer_step(self, step):
        return {"loss": 123.0}


class ReplacesTheValLoss:
    @hookimpl
    def acadlm_evaluation_end(self, step):
        return {"val_loss": 0.0}


class ReplacesTheSummarySteps:
    @hookimpl
    def acadlm_model_exported(self, model_dir):
        return {"steps": 0}


class HalfDecorated:
    def __init__(self):
        self.n = 0

    @hookimpl
    def acadlm_after_optimizer_step(self, step):
        self.n += 1

    def acadlm_state_dict(self):  # without @hookimpl: never called, its state never saved
        return {"half": {"n": self.n}}


class NeedsArgs:
    def __init__(self, coefficient):
        self.coefficient = coefficient

    @hookimpl
    def acadlm_run_end(self, summary):
        pass


class InitRaises:
    def __init__(self):
        raise RuntimeError("init failed in the plugin")

    @hookimpl
    def acadlm_run_end(self, summary):
        pass


class ParamGroupsDict:
    @hookimpl
    def acadlm_optimizer_param_groups(self, model):
        return {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}


class ParamGroupsOfTensors:
    @hookimpl
    def acadlm_optimizer_param_groups(self, model):
        return [torch.nn.Parameter(torch.zeros(2))]


class ExportNonDict:
    @hookimpl
    def acadlm_model_exported(self, model_dir):
        return "done"


class RaisesKeyError:
    @hookimpl
    def acadlm_after_optimizer_step(self, step):
        raise KeyError("oops_inside_plugin")


class RaisesConfigError:
    @hookimpl
    def acadlm_configure(self, cfg):
        raise ConfigError("my_key", "is wrong.", "set it right.")


class SeesStates:
    @hookimpl
    def acadlm_load_state_dict(self, states):
        self.states = states


def _named(cls) -> str:
    return f"{__name__}:{cls.__qualname__}"


@pytest.mark.parametrize(("plugin", "key", "shown"), [(FloatTerm, "my_float", "float 0.5"),
                                                     (VectorTerm, "my_vector", "shape (4,)")])
def test_extra_loss_term_that_is_not_a_scalar_tensor_names_plugin_hook_and_key(plugin, key,
                                                                                 shown):
    pm = build_plugin_manager([plugin], builtins=(GUARD,), load_entry_points=False)
    with pytest.raises(AcadlmError) as error:
        _call_extra_loss(pm, None, torch.tensor(1.0))
    message = str(error.value)
    assert f"plugin '{_named(plugin)}'" in message
    assert "`acadlm_extra_loss`" in message
    assert f"loss term '{key}'" in message and shown in message
    assert "not a scalar tensor" in message and "Fix: return `{name: scalar tensor}`" in message


def test_extra_loss_that_is_not_a_dict_names_plugin_and_hook():
    pm = build_plugin_manager([ListOfTerms], builtins=(GUARD,), load_entry_points=False)
    with pytest.raises(AcadlmError, match=rf"plugin '{_named(ListOfTerms)}' returned list .* "
                                          r"from `acadlm_extra_loss`"):
        _call_extra_loss(pm, None, torch.tensor(1.0))


def test_guard_skips_a_result_that_is_not_a_dict_for_collect_metrics_to_refuse():
    """A non-dict result that reaches the guard (a plugin registered past the manager's checks)
    is left to collect_metrics' clear error instead of crashing inside the guard."""
    pm = build_plugin_manager(builtins=(GUARD,), load_entry_points=False)
    pm.register(ListOfTerms(), name="raw")  # not wrapped by build_plugin_manager
    results = _call_extra_loss(pm, None, torch.tensor(1.0))
    with pytest.raises(AcadlmError, match="returned list"):
        collect_metrics(results)


def test_guard_runs_one_check_of_the_same_entries_on_every_rank_whatever_plugins_return(
        monkeypatch):
    """Under torch.distributed the guard makes one all-reduce per call: a non-dict result must
    not end it early on one rank (the other ranks would wait in the collective)."""
    calls = []
    monkeypatch.setattr(guard_module, "_world_size", lambda: 2)
    monkeypatch.setattr(guard_module, "check_finite_on_every_rank",
                        lambda values, step: calls.append([name for name, _ in values]))
    pm = build_plugin_manager([GoodTerm], builtins=(GUARD,), load_entry_points=False)
    pm.register(ListOfTerms(), name="raw")
    _call_extra_loss(pm, None, torch.tensor(1.0))
    assert calls == [["loss", "loss/good"]]


def test_key_clash_between_plugins_names_both_plugins_and_the_hook():
    pm = build_plugin_manager([StepMetricA, StepMetricB], builtins=(), load_entry_points=False)
    with pytest.raises(AcadlmError) as error:
        collect_metrics(pm.hook.acadlm_after_optimizer_step(step=1, metrics={}))
    message = str(error.value)
    assert f"'{_named(StepMetricA)}'" in message and f"'{_named(StepMetricB)}'" in message
    assert "both return key 'shared/metric' from `acadlm_after_optimizer_step`" in message


def test_plugin_key_that_the_recipe_already_has_is_refused_naming_plugin_hook_and_key():
    pm = build_plugin_manager([ReplacesTheLoss], builtins=(), load_entry_points=False)
    metrics = {"loss": 2.5, "lr": 1e-3}
    with pytest.raises(AcadlmError) as error:
        plugin_manager.add_plugin_results(
            metrics, pm.hook.acadlm_after_optimizer_step(step=1, metrics=metrics))
    assert (f"plugin '{_named(ReplacesTheLoss)}' returns key 'loss' from "
            "`acadlm_after_optimizer_step`") in str(error.value)
    assert metrics["loss"] == 2.5


@pytest.mark.parametrize("plugin", [ReplacesTheLoss, ReplacesTheValLoss, ReplacesTheSummarySteps])
def test_recipe_refuses_a_plugin_metric_or_summary_key_that_replaces_its_own(tmp_path,
                                                                             monkeypatch, plugin):
    from recipe_runs import run_recipe_main, torch_threads
    from tiny_setup import tiny_run_args

    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    args = tiny_run_args(tmp_path, "max_steps=1", "save_every_n_steps=1",
                         f"plugins=[{_named(plugin)}]")
    with pytest.raises(AcadlmError, match=f"plugin '{_named(plugin)}' returns key"), \
            torch_threads():
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe", args)


def test_hook_function_without_hookimpl_next_to_decorated_ones_is_refused():
    with pytest.raises(ConfigError) as error:
        build_plugin_manager([HalfDecorated], builtins=(), load_entry_points=False)
    assert error.value.key == "plugins"
    assert f"plugin '{_named(HalfDecorated)}' has acadlm_state_dict without" in str(error.value)
    assert "add `@acadlm_plugins.hookimpl` above acadlm_state_dict" in str(error.value)


@pytest.mark.parametrize(("plugin", "cause"), [(NeedsArgs, "TypeError"),
                                              (InitRaises, "RuntimeError: init failed")])
def test_plugin_class_that_cannot_be_created_is_a_config_error(plugin, cause):
    with pytest.raises(ConfigError) as error:
        build_plugin_manager([plugin], builtins=(), load_entry_points=False)
    assert error.value.key == "plugins"
    assert (f"plugin '{_named(plugin)}' could not be created with no arguments: {cause}"
            in str(error.value))


@pytest.mark.parametrize("plugin", [ParamGroupsDict, ParamGroupsOfTensors])
def test_optimizer_param_groups_must_be_a_list_of_dicts(plugin):
    pm = build_plugin_manager([plugin], builtins=(), load_entry_points=False)
    with pytest.raises(AcadlmError) as error:
        pm.hook.acadlm_optimizer_param_groups(model=None, cfg=None)
    assert f"plugin '{_named(plugin)}' returned" in str(error.value)
    assert "`acadlm_optimizer_param_groups`" in str(error.value)
    assert "a list of parameter-group dicts" in str(error.value)


def test_model_exported_that_is_not_a_dict_names_plugin_and_hook():
    pm = build_plugin_manager([ExportNonDict], builtins=(), load_entry_points=False)
    with pytest.raises(AcadlmError, match=rf"plugin '{_named(ExportNonDict)}' returned str "
                                          r"'done' from `acadlm_model_exported`"):
        pm.hook.acadlm_model_exported(model_dir="m", recipe="prune")


def test_exception_in_a_plugin_hook_keeps_its_type_and_notes_plugin_and_hook():
    pm = build_plugin_manager([RaisesKeyError], builtins=(), load_entry_points=False)
    with pytest.raises(KeyError) as error:
        pm.hook.acadlm_after_optimizer_step(step=1, metrics={})
    notes = getattr(error.value, "__notes__", [])
    assert any(f"'{_named(RaisesKeyError)}'" in note and "`acadlm_after_optimizer_step`" in note
               for note in notes), notes


def test_config_error_from_a_plugin_is_its_line_and_the_plugin_note_under_run_main(capsys):
    """No traceback for our error, but the note naming the plugin and hook it came from (a
    third-party plugin's ConfigError) follows the message line."""
    from acadlm_plugins.training.runtime import TRACEBACK_ENV, run_main

    pm = build_plugin_manager([RaisesConfigError], builtins=(), load_entry_points=False)
    assert run_main(lambda: pm.hook.acadlm_configure(cfg={}, recipe="prune")) == 2
    err = capsys.readouterr().err
    assert err == ("error: config `my_key`: is wrong. Fix: set it right.\n"
                   f"raised in acadlm plugin '{_named(RaisesConfigError)}', hook "
                   f"`acadlm_configure`\n(set {TRACEBACK_ENV}=1 to see the traceback)\n")
    assert "Traceback" not in err
    failing = build_plugin_manager([RaisesKeyError], builtins=(), load_entry_points=False)
    with pytest.raises(KeyError) as raised:  # not ours: its traceback is shown, with the note
        run_main(lambda: failing.hook.acadlm_after_optimizer_step(step=1, metrics={}))
    assert "RaisesKeyError" in "".join(raised.value.__notes__)


def test_resume_warns_about_a_plugin_state_whose_plugin_is_missing(example_on_path, caplog):
    trained = build_plugin_manager([Z_LOSS], builtins=(), load_entry_points=False)
    states = plugin_states(trained)
    resumed = build_plugin_manager([SeesStates], builtins=(), load_entry_points=False)
    logger = logging.getLogger("acadlm_plugins.plugin_manager")
    logger.addHandler(caplog.handler)  # the package logger may not propagate
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            restore_plugin_states(resumed, states)
    finally:
        logger.removeHandler(caplog.handler)
    assert "plugin 'acadlm_example_plugin:ZLossPlugin' (key 'acadlm_example_plugin.z_loss')" \
        in caplog.text
    assert "not restored" in caplog.text
    # plugins see the states only, not the record of who saved them
    assert resumed.get_plugin(_named(SeesStates)).states == {
        "acadlm_example_plugin.z_loss": {"steps_penalised": 0}}


def test_resume_with_the_plugin_listed_another_way_does_not_warn(example_on_path, caplog):
    """`pkg.mod:Cls` and `pkg.mod.Cls` (or an entry point's name) register the same plugin: the
    resumed run used to warn that it did not load the plugin whose state it had just restored."""
    trained = build_plugin_manager(["acadlm_example_plugin:ZLossPlugin"], builtins=(),
                                   load_entry_points=False)
    states = plugin_states(trained)
    resumed = build_plugin_manager(["acadlm_example_plugin.ZLossPlugin"], builtins=(),
                                   load_entry_points=False)
    logger = logging.getLogger("acadlm_plugins.plugin_manager")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            restore_plugin_states(resumed, states)
    finally:
        logger.removeHandler(caplog.handler)
    assert "not restored" not in caplog.text


# --- hook wrappers, notes without `add_note`, state-key clashes at setup ----------------------


class WrapperRaisesBeforeYield:
    @hookimpl(wrapper=True)
    def acadlm_after_optimizer_step(self, step):
        if step:
            raise KeyError("before the yield")
        return (yield)


class WrapperRaisesAfterYield:
    @hookimpl(wrapper=True)
    def acadlm_after_optimizer_step(self, step):
        yield
        raise KeyError("after the yield")


class OldStyleWrapperRaisesAfterYield:
    @hookimpl(hookwrapper=True)
    def acadlm_after_optimizer_step(self, step):
        yield
        raise KeyError("after the yield")


class WrapperAddsAMetric:
    @hookimpl(wrapper=True)
    def acadlm_after_optimizer_step(self, step):
        results = yield
        return [*results, {"wrapper/seen": len(results)}]


@pytest.mark.filterwarnings("ignore::pluggy.PluggyTeardownRaisedWarning")
@pytest.mark.parametrize("plugin", [WrapperRaisesBeforeYield, WrapperRaisesAfterYield,
                                    OldStyleWrapperRaisesAfterYield])
def test_exception_in_a_plugin_hook_wrapper_notes_plugin_and_hook(plugin):
    pm = build_plugin_manager([StepMetricA, plugin], builtins=(), load_entry_points=False)
    with pytest.raises(KeyError) as error:
        pm.hook.acadlm_after_optimizer_step(step=1, metrics={})
    assert getattr(error.value, "__notes__", []) == [
        f"raised in acadlm plugin '{_named(plugin)}', hook `acadlm_after_optimizer_step`"]


def test_guarded_hook_wrapper_still_wraps_the_call_and_passes_other_plugins_errors_on():
    pm = build_plugin_manager([StepMetricA, WrapperAddsAMetric], builtins=(),
                              load_entry_points=False)
    assert collect_metrics(pm.hook.acadlm_after_optimizer_step(step=1, metrics={})) == {
        "shared/metric": 1.0, "wrapper/seen": 1}
    # another plugin's error thrown through the wrapper keeps that plugin's note only
    failing = build_plugin_manager([RaisesKeyError, WrapperAddsAMetric], builtins=(),
                                   load_entry_points=False)
    with pytest.raises(KeyError) as error:
        failing.hook.acadlm_after_optimizer_step(step=1, metrics={})
    note = (f"raised in acadlm plugin '{_named(RaisesKeyError)}', "
            "hook `acadlm_after_optimizer_step`")
    assert error.value.__notes__ == [note]


class NoAddNoteConfigError(ConfigError):
    """Our error as Python 3.10 builds it: its class has no `add_note` (new in 3.11)."""

    def __getattribute__(self, name):
        if name == "add_note":
            raise AttributeError(name)
        return super().__getattribute__(name)


class RaisesWithoutAddNote:
    @hookimpl
    def acadlm_configure(self, cfg):
        raise NoAddNoteConfigError("my_key", "is wrong.", "set it right.")


def test_add_error_note_without_add_note_appends_to_dunder_notes():
    err = NoAddNoteConfigError("k", "is wrong.")
    assert not hasattr(err, "add_note")
    plugin_manager.add_error_note(err, "first")
    plugin_manager.add_error_note(err, "second")
    assert err.__notes__ == ["first", "second"]
    native = KeyError("x")  # where add_note exists, it is the one used
    plugin_manager.add_error_note(native, "note")
    assert native.__notes__ == ["note"]


def test_plugin_note_reaches_run_main_where_exceptions_have_no_add_note(capsys):
    from acadlm_plugins.training.runtime import run_main

    pm = build_plugin_manager([RaisesWithoutAddNote], builtins=(), load_entry_points=False)
    assert run_main(lambda: pm.hook.acadlm_configure(cfg={}, recipe="prune")) == 2
    assert (f"raised in acadlm plugin '{_named(RaisesWithoutAddNote)}', hook "
            "`acadlm_configure`") in capsys.readouterr().err


STEPS_RUN: list[int] = []  # steps a recipe run reached, by SavesSharedStateA's batch hook


class SavesSharedStateA:
    @hookimpl
    def acadlm_batch_ready(self, step):
        STEPS_RUN.append(step)

    @hookimpl
    def acadlm_state_dict(self):
        return {"shared_state": {"from": "a"}}


class SavesSharedStateB:
    @hookimpl
    def acadlm_state_dict(self):
        return {"shared_state": {"from": "b"}}


class StateEmptyAtSetup:
    """Has state only once it has trained: nothing to save (and no key to clash) at setup."""

    def __init__(self):
        self.steps = 0

    @hookimpl
    def acadlm_batch_ready(self, step):
        self.steps += 1

    @hookimpl
    def acadlm_state_dict(self):
        return {"shared_state": self.steps} if self.steps else {}


class StateNotReadyAtSetup:
    """Builds its state during training; its state dict raises before that."""

    def __init__(self):
        self.tracker = None

    @hookimpl
    def acadlm_state_dict(self):
        return {"not_ready": self.tracker.state_dict()}


def _clash_message_check(message: str) -> None:
    assert f"'{_named(SavesSharedStateA)}'" in message
    assert f"'{_named(SavesSharedStateB)}'" in message
    assert "both return key 'shared_state' from `acadlm_state_dict`" in message
    assert "Fix: rename the key in one of the plugins" in message


def test_state_key_clash_is_refused_by_the_setup_check():
    pm = build_plugin_manager([SavesSharedStateA, SavesSharedStateB], builtins=(),
                              load_entry_points=False)
    with pytest.raises(plugin_manager.PluginHookError) as error:
        plugin_manager.check_plugin_state_keys(pm)
    _clash_message_check(str(error.value))


def test_state_check_at_setup_passes_plugins_with_no_state_yet():
    pm = build_plugin_manager([SavesSharedStateA, StateEmptyAtSetup, StateNotReadyAtSetup],
                              builtins=(), load_entry_points=False)
    assert pm.hook.acadlm_optimizer_param_groups(model=None, cfg=None) == []
    plugin_manager.check_plugin_state_keys(pm)
    pm.hook.acadlm_batch_ready(batch={}, step=0)  # now it saves the same key: the save says so
    pm.get_plugin(_named(StateNotReadyAtSetup)).tracker = torch.nn.Linear(1, 1)
    with pytest.raises(plugin_manager.PluginHookError, match="key 'shared_state'"):
        plugin_states(pm)


def test_recipe_refuses_plugins_saving_the_same_state_key_before_the_first_step(tmp_path,
                                                                               monkeypatch):
    from recipe_runs import run_recipe_main, torch_threads
    from tiny_setup import tiny_run_args

    monkeypatch.setenv("ACADLM_NO_PROGRESS", "1")
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    monkeypatch.setattr(f"{__name__}.STEPS_RUN", [])
    args = tiny_run_args(tmp_path, "max_steps=2", "save_every_n_steps=1",
                         f"plugins=[{_named(SavesSharedStateA)},{_named(SavesSharedStateB)}]")
    with pytest.raises(plugin_manager.PluginHookError) as error, torch_threads():
        run_recipe_main(monkeypatch, "acadlm_plugins.continued_pretrain_recipe", args)
    _clash_message_check(str(error.value))
    assert STEPS_RUN == []
