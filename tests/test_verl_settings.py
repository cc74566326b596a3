"""`algorithm.anchor.*` validation on real composed verl configs, and the driver-side hook."""

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from verl_anchor import AnchorConfig
from verl_anchor.integration.settings import read_settings

BASE = ["trainer.v1.trainer_mode=anchor_sync", "algorithm.adv_estimator=anchor_coupled"]


def compose_verl(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_defaults_resolve_to_the_spec_defaults():
    settings = read_settings(compose_verl(BASE))
    assert settings.cfg == AnchorConfig(strategy="coupled")
    assert settings.base_estimator == "grpo" and settings.estimator == "anchor_coupled"


def test_options_and_strategy_come_through():
    settings = read_settings(compose_verl([
        "trainer.v1.trainer_mode=anchor_sync", "algorithm.adv_estimator=anchor_global_anchor",
        "+algorithm.anchor.ratio=0.2", "+algorithm.anchor.sign=positive", "+algorithm.anchor.layers=[3,5]",
        "+algorithm.anchor.base_estimator=rloo",
    ]))
    assert settings.cfg == AnchorConfig(strategy="global_anchor", ratio=0.2, sign="positive", layers=(3, 5))
    assert settings.base_estimator == "rloo"


def test_plain_estimators_are_left_alone():
    assert read_settings(compose_verl(["algorithm.adv_estimator=grpo"])) is None
    assert read_settings(compose_verl(["algorithm.adv_estimator=grpo", "trainer.v1.trainer_mode=anchor_sync"])) is None


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.adv_estimator=anchor_coupled"],
     "algorithm.adv_estimator=anchor_coupled needs trainer.v1.trainer_mode=anchor_sync (got 'sync')"),
    (BASE + ["+algorithm.anchor.ratio=2.0"], "algorithm.anchor.ratio=2.0 is invalid: use a finite number in (0, 1]"),
    (BASE + ["+algorithm.anchor.strategy=coupled"], "algorithm.anchor.strategy='coupled' is not an option"),
    (BASE + ["+algorithm.anchor.gama_amp=2"], "did you mean algorithm.anchor.gamma_amp"),
    (BASE + ["+algorithm.anchor.base_estimator=gae"], "algorithm.anchor.base_estimator=gae is not supported"),
    (BASE + ["+algorithm.anchor.base_estimator=nope"], "base_estimator=nope is not a registered verl estimator"),
    (BASE + ["+algorithm.anchor.base_estimator=anchor_random"], "the base must be a plain verl estimator"),
    (BASE + ["algorithm.rollout_correction.bypass_mode=true"], "set algorithm.rollout_correction.bypass_mode=false"),
    (BASE + ["actor_rollout_ref.actor.strategy=megatron"], "actor_rollout_ref.actor.strategy=megatron is not supported"),
    (BASE + ["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
     "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 is not supported"),
    (BASE + ["trainer.use_v1=false"], "set trainer.use_v1=true"),
])
def test_bad_configs_name_option_value_and_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        read_settings(compose_verl(overrides))
    assert message in str(err.value)


def test_megatron_is_fine_for_strategies_without_attention():
    settings = read_settings(compose_verl([
        "trainer.v1.trainer_mode=anchor_sync", "algorithm.adv_estimator=anchor_random",
        "actor_rollout_ref.actor.strategy=megatron",
    ]))
    assert settings.cfg.strategy == "random"


def test_validate_config_hook_runs_the_anchor_checks_first():
    import verl.utils.config as verl_config

    import verl_anchor.verl_plugin  # noqa: F401  (entry point module: patches validate_config)

    assert getattr(verl_config.validate_config, "_verl_anchor", False)
    with pytest.raises(ValueError, match="needs trainer.v1.trainer_mode=anchor_sync"):
        verl_config.validate_config(compose_verl(["algorithm.adv_estimator=anchor_coupled"]),
                                    use_reference_policy=False, use_critic=False)
