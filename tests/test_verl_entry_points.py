"""The plugin at verl's entry points: what `import verl` loads, the fully-async pipeline, a missing TransferQueue."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(args, timeout=600, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("VERL_PLATFORM", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.mark.timeout(600)
def test_fully_async_main_refuses_anchor_estimators_before_ray_starts():
    """verl's DAPO fully-async launch (with Ulysses SP, as its example sets): the real module's driver."""
    proc = run_python(
        [
            "-m",
            "verl.experimental.fully_async_policy.fully_async_main",
            "algorithm.adv_estimator=anchor_coupled",
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=4",
            "actor_rollout_ref.rollout.n=4",
        ]
    )
    assert proc.returncode != 0
    assert (
        "algorithm.adv_estimator=anchor_coupled is not supported by python -m "
        "verl.experimental.fully_async_policy.fully_async_main"
    ) in proc.stderr
    assert "launch python -m verl.trainer.main_ppo instead" in proc.stderr
    # run_ppo prints its Ray arguments on the line before ray.init.
    assert "ray init kwargs" not in proc.stdout


@pytest.mark.timeout(600)
def test_one_step_off_main_refuses_anchor_estimators_before_ray_starts():
    """verl's one-step-off-policy pipeline builds its OneStepOffRayTrainer directly: even anchor_random never runs."""
    import verl

    # Its config finds verl's ppo_trainer by the relative search path file://verl/trainer/config, so it is
    # launched from the directory that holds verl, as verl's example scripts are from a verl checkout.
    proc = run_python(
        [
            "-m",
            "verl.experimental.one_step_off_policy.main_ppo",
            "algorithm.adv_estimator=anchor_random",
            "actor_rollout_ref.rollout.n=4",
        ],
        cwd=Path(verl.__file__).parents[1],
    )
    assert proc.returncode != 0
    assert (
        "algorithm.adv_estimator=anchor_random is not supported by python -m "
        "verl.experimental.one_step_off_policy.main_ppo: its OneStepOffRayTrainer"
    ) in proc.stderr
    assert "ray init kwargs" not in proc.stdout


def test_the_entry_point_check_leaves_main_ppo_and_plain_estimators_alone():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from verl.utils.device import auto_set_device  # the plugin's wrapper around verl's

    from verl_anchor.integration.settings import check_entry_point

    check_entry_point(OmegaConf.create({"algorithm": {"adv_estimator": "anchor_coupled"}}))  # main_ppo's config
    check_entry_point(OmegaConf.create({"algorithm": {"adv_estimator": "anchor_coupled"}}), "verl.trainer.main_ppo")
    # verl's SFT trainers call auto_set_device too, with a config that has no algorithm block, or with None.
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        sft = compose(config_name="sft_trainer_engine")
    assert getattr(auto_set_device, "_verl_anchor", False)
    auto_set_device(sft)
    auto_set_device(None)
    with pytest.raises(ValueError, match="anchor_coupled is not supported by python -m verl.experimental.one_step"):
        check_entry_point(
            OmegaConf.create({"algorithm": {"adv_estimator": "anchor_coupled"}}),
            "verl.experimental.one_step_off_policy.main_ppo",
        )
    check_entry_point(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}, "async_training": {}}))
    with pytest.raises(ValueError, match="anchor_random is not supported by python -m verl.experimental"):
        check_entry_point(OmegaConf.create({"algorithm": {"adv_estimator": "anchor_random"}, "async_training": {}}))


def test_a_missing_transfer_queue_fails_at_start_up_with_the_install_fix(monkeypatch):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from verl_anchor.integration.settings import read_settings

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(
            config_name="ppo_trainer",
            overrides=["algorithm.adv_estimator=anchor_coupled", "actor_rollout_ref.rollout.n=2"],
        )
    monkeypatch.setitem(sys.modules, "transfer_queue", None)  # what an install without verl[verl-core] finds
    fix = r"needs TransferQueue, and it is not installed: pip install 'verl\[verl-core\]'"
    with pytest.raises(ImportError, match=fix):
        read_settings(config)
    config.trainer.use_v1 = False  # the legacy trainer (the only one on verl's neo branch) moves no batch through it
    assert read_settings(config).estimator == "anchor_coupled"


@pytest.mark.timeout(600)
def test_import_verl_loads_no_trainer_modules_until_they_are_used():
    probe = (
        "import sys, warnings\n"
        "warnings.simplefilter('always')\n"
        "import verl\n"
        "sys.stderr.write('--imported--\\n'); sys.stderr.flush()\n"
        "heavy = [m for m in ('verl.trainer.ppo.v1', 'verl.trainer.ppo.core_algos', 'verl.workers.engine',\n"
        "                     'verl.workers.rollout', 'verl_anchor.integration.trainer',\n"
        "                     'verl_anchor.integration.cpu')\n"
        "         if m in sys.modules]\n"
        "print('heavy', heavy)\n"
        "from verl.trainer.ppo import core_algos\n"
        "print('estimator', 'anchor_coupled' in core_algos.ADV_ESTIMATOR_REGISTRY)\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "print('trainer', get_trainer_cls('sync').__name__)\n"
        "from verl.workers.rollout.base import _ROLLOUT_REGISTRY\n"
        "print('rollout', _ROLLOUT_REGISTRY.get(('hf', 'async')))\n"
    )
    proc = run_python(["-c", probe])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "heavy []" in lines
    # verl's engine and platform warnings come with its trainer modules, once used, not with `import verl`.
    import_output = proc.stderr.split("--imported--")[0]
    assert "--imported--" in proc.stderr and "warn" not in import_output.lower(), import_output
    assert "estimator True" in lines and "trainer AnchorPPOTrainerSync" in lines
    assert "rollout verl_anchor.integration.cpu.rollout.HFServerAdapter" in lines
