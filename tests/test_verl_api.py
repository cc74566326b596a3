"""The seam to verl's internals (`integration.verl_api`): one contract test per pinned symbol against the installed
verl, a verl that moved symbols failing at start-up with one message, and no module reaching past the seam."""

import ast
import inspect
import shutil
from pathlib import Path

import pytest

import verl_anchor
from verl_anchor.integration import verl_api
from verl_anchor.integration.verl_api import PINS, TESTED_VERL, Pin, VerlApiError

PACKAGE = Path(verl_anchor.__file__).parent


def test_the_installed_verl_is_the_one_the_pins_were_taken_from():
    assert verl_api.installed_version() == TESTED_VERL


@pytest.mark.parametrize("key", sorted(PINS))
def test_pin_holds_in_the_installed_verl(key):
    """Each pin: present live with its leading parameters, and found the same way in the source."""
    pin = PINS[key]
    live = verl_api.resolve(key)
    assert live is not None, f"{pin.name}: {pin.used_by}"
    if pin.params is not None:
        params = list(inspect.signature(inspect.unwrap(live)).parameters)
        assert params[: len(pin.params)] == list(pin.params), f"verl {TESTED_VERL} {pin.name}: {params}"
    if pin.static:
        assert verl_api._source_problem(pin, {}) is None, f"verl {TESTED_VERL} {pin.name} ({pin.used_by})"


def test_every_pipeline_checks_from_source_in_milliseconds_without_importing(monkeypatch):
    imported = []
    monkeypatch.setattr(verl_api.importlib, "import_module", lambda name, *a: imported.append(name))
    verl_api.check_installed(verl_api.PIPELINES, roots={})
    assert imported == []
    with pytest.raises(ValueError, match="unknown pipelines"):
        verl_api.check_installed(["megatron"])


@pytest.fixture
def moved_verl(tmp_path):
    """A copy of the installed verl's sources with what a release might do: a method's parameter renamed,
    a module function gone, a module moved."""
    import verl

    root = tmp_path / "verl"
    shutil.copytree(Path(verl.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    ray_trainer = root / "trainer" / "ppo" / "ray_trainer.py"
    source = ray_trainer.read_text()
    assert "    def _compute_old_log_prob(self, batch: DataProto):" in source
    ray_trainer.write_text(
        source.replace(
            "    def _compute_old_log_prob(self, batch: DataProto):",
            "    def _compute_old_log_prob(self, data: DataProto, step: int):",
        )
    )
    metric_utils = root / "trainer" / "ppo" / "metric_utils.py"
    metric_utils.write_text(metric_utils.read_text().replace("def compute_data_metrics(", "def data_metrics("))
    (root / "workers" / "utils" / "padding.py").rename(root / "workers" / "utils" / "paddings.py")
    return root


def test_a_verl_that_moved_symbols_fails_in_one_message_naming_each(moved_verl):
    with pytest.raises(VerlApiError) as err:
        verl_api.check_installed(["legacy"], roots={"verl": moved_verl})
    message = str(err.value)
    assert "verl.trainer.ppo.ray_trainer.RayPPOTrainer._compute_old_log_prob" in message
    assert "takes (self, data, step), not (self, batch, ...)" in message
    assert "verl.trainer.ppo.metric_utils.compute_data_metrics (wrapped: the anchor/* metrics" in message
    assert f"tested with verl {TESTED_VERL}: pip install 'verl[verl-core]=={TESTED_VERL}'" in message
    assert "response_to_nested" not in message  # a v1 pin: not this pipeline's
    with pytest.raises(VerlApiError, match="verl.workers.utils.padding.response_to_nested .* cannot be found"):
        verl_api.check_installed(["v1"], roots={"verl": moved_verl})
    verl_api.check_installed(["cpu"], roots={"verl": moved_verl})  # nothing the CPU mode needs moved


def test_start_up_checks_the_pins_of_the_pipeline_it_runs(monkeypatch):
    from test_verl_settings import compose_verl

    from verl_anchor.integration.settings import read_settings

    checked = []
    monkeypatch.setattr(verl_api, "check_installed", lambda pipelines: checked.append(sorted(pipelines)))
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    read_settings(compose_verl(["algorithm.adv_estimator=anchor_coupled"]))
    read_settings(
        compose_verl(
            [
                "algorithm.adv_estimator=anchor_coupled",
                "trainer.use_v1=false",
                "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
            ]
        )
    )
    read_settings(
        compose_verl(
            ["algorithm.adv_estimator=anchor_random", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"]
        )
    )
    assert checked == [["cpu", "v1"], ["cpu", "legacy", "ulysses"], ["cpu", "v1"]]
    monkeypatch.undo()

    def moved(pipelines):
        raise VerlApiError("the installed verl 0.10.0 lacks what verl_anchor relies on: ...")

    monkeypatch.setattr(verl_api, "check_installed", moved)
    with pytest.raises(VerlApiError, match="lacks what verl_anchor relies on"):
        read_settings(compose_verl(["algorithm.adv_estimator=anchor_coupled"]))


def test_a_missing_symbol_fails_where_it_is_imported_naming_it(monkeypatch):
    monkeypatch.setitem(PINS, "gone", Pin("verl.utils.config", "validate_configuration", "a test"))
    monkeypatch.setitem(PINS, "changed", Pin("verl.utils.config", "validate_config", "a test", params=("cfg",)))
    with pytest.raises(ImportError, match=r"verl.utils.config.validate_configuration \(a test\) does not exist"):
        from verl_anchor.integration.verl_api import gone  # noqa: F401
    with pytest.raises(VerlApiError, match=r"takes \(config, use_reference_policy, use_critic\), not \(cfg, ...\)"):
        verl_api.resolve("changed")


def test_patching_wraps_once_where_the_symbol_lives(monkeypatch):
    import verl.utils.config as verl_config

    monkeypatch.setattr(verl_config, "validate_config", verl_config.validate_config)  # restored after the test
    monkeypatch.setattr(verl_config, "validate_config", inspect.unwrap(verl_config.validate_config))
    calls = []

    def counting(original):
        def validate(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        return validate

    first = verl_api.patch("validate_config", counting)
    assert verl_api.patch("validate_config", counting) is first is verl_config.validate_config
    assert inspect.unwrap(first).__name__ == "validate_config" and first._verl_anchor


# Modules whose names change between releases; verl_anchor reaches them only through the seam.
INTERNAL_PREFIXES = (
    "verl",
    "transfer_queue",
    "transformers.modeling_utils",
    "transformers.integrations",
    "transformers.modeling_flash_attention_utils",
)


def test_no_module_but_the_seam_imports_verl_internals():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "verl_api.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else []
            )
            for name in names:
                if name.split(".")[0] == "verl" or any(
                    name == p or name.startswith(p + ".") for p in INTERNAL_PREFIXES[1:]
                ):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert offenders == []
