"""Every shipped recipe composes against the installed verl and passes verl's and our validation."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import verl_anchor.recipes as recipes
from verl_anchor.integration.settings import read_settings

RECIPES = sorted(p.stem for p in Path(recipes.__file__).parent.glob("*.yaml") if p.stem != "anchor_base")


def compose_recipe(name, overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl_anchor.recipes", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_the_recipes_of_the_paper_exist():
    assert RECIPES == ["countdown_qwen3_4b", "gsm8k_quick", "math_qwen3_4b_1k", "math_qwen3_4b_8k", "math_qwen3_8b_1k"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    config = compose_recipe(name)
    OmegaConf.resolve(config)
    settings = read_settings(config)
    assert settings.cfg.strategy == "coupled" and settings.base_estimator == "grpo"
    assert config.actor_rollout_ref.actor.optim.lr == 1e-6 and not config.actor_rollout_ref.actor.use_kl_loss
    assert config.actor_rollout_ref.actor.entropy_coeff == 0 and config.actor_rollout_ref.rollout.temperature == 1.0
    sequences = config.data.train_batch_size * config.actor_rollout_ref.rollout.n
    updates = config.data.train_batch_size // config.actor_rollout_ref.actor.ppo_mini_batch_size
    assert (sequences, updates) == (512, 16)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


@pytest.mark.parametrize(
    "overrides, strategy",
    [
        (["algorithm.adv_estimator=anchor_local_chunk"], "local_chunk"),
        (["algorithm.adv_estimator=anchor_random", "+algorithm.anchor.seed=3"], "random"),
        (
            [
                "algorithm.adv_estimator=anchor_global_anchor",
                "+algorithm.anchor.select=bottom",
                "+algorithm.anchor.sign=positive",
                "+algorithm.anchor.ratio=0.2",
            ],
            "global_anchor",
        ),
    ],
)
def test_strategy_and_ablations_are_one_override_away(overrides, strategy):
    settings = read_settings(compose_recipe("countdown_qwen3_4b", overrides))
    assert settings.cfg.strategy == strategy
    assert read_settings(compose_recipe("countdown_qwen3_4b", ["algorithm.adv_estimator=grpo"])) is None


def test_train_launcher_prepares_missing_data_and_prints_the_command(tmp_path, monkeypatch, capsys):
    from verl_anchor.cli import main

    monkeypatch.setenv("VERL_ANCHOR_DATA", str(tmp_path))
    assert main(["train", "countdown_qwen3_4b", "--dry-run", "algorithm.adv_estimator=anchor_random"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "countdown" / "train.parquet").exists() and (tmp_path / "countdown" / "test.parquet").exists()
    assert (
        "-m verl.trainer.main_ppo --config-path=pkg://verl_anchor.recipes --config-name=countdown_qwen3_4b "
        "algorithm.adv_estimator=anchor_random" in out
    )
    assert main(["train", "countdown_qwen3_4b", "--dry-run", f"data.train_files={tmp_path}/mystery/train.parquet"]) == 2
    assert "not a dataset verl-anchor can prepare" in capsys.readouterr().err


def test_a_recipe_follows_the_base_rule_and_its_critic_switch(tmp_path):
    """The recipes leave base_estimator unset: one response per prompt is refused, critic.enable=true is PPO
    (its model the actor's unless critic.model.path names one), and +algorithm.anchor.base_estimator works."""
    from verl_anchor.integration.compose import compose_recipe, validate
    from verl_anchor.models.tiny import ensure_tiny_model
    from verl_anchor.usage import UsageError

    with pytest.raises(UsageError, match="rollout.n=1 without critic.enable=true"):
        validate(compose_recipe("countdown_qwen3_4b", ["actor_rollout_ref.rollout.n=1"]))
    # verl's checks build the critic's model config, which reads the model: a local one (no downloads here).
    model = f"actor_rollout_ref.model.path={ensure_tiny_model(tmp_path)}"
    config = compose_recipe("countdown_qwen3_4b", ["critic.enable=true", model])
    validate(config)
    assert config.algorithm.anchor.base_estimator == "gae"
    assert config.critic.model.path == config.actor_rollout_ref.model.path
    config = compose_recipe("countdown_qwen3_4b", ["+algorithm.anchor.base_estimator=rloo"])
    validate(config)
    assert config.algorithm.anchor.base_estimator == "rloo"
