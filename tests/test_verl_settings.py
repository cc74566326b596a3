"""`algorithm.anchor.*` validation on real composed verl configs, and the driver-side hook."""

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from verl_anchor import AnchorConfig
from verl_anchor.integration.settings import prepare_config, read_settings

BASE = ["algorithm.adv_estimator=anchor_coupled"]


def compose_verl(overrides, config_name="ppo_trainer", responses=2):
    """verl's own config as a launch script composes it; GRPO-style groups of `responses` unless overridden."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name=config_name, overrides=[f"actor_rollout_ref.rollout.n={responses}", *overrides])


def test_defaults_resolve_to_the_spec_defaults():
    settings = read_settings(compose_verl(BASE))
    assert settings.cfg == AnchorConfig(strategy="coupled")
    assert settings.base_estimator == "grpo" and settings.estimator == "anchor_coupled"


def test_options_and_strategy_come_through():
    settings = read_settings(
        compose_verl(
            [
                "algorithm.adv_estimator=anchor_global_anchor",
                "+algorithm.anchor.ratio=0.2",
                "+algorithm.anchor.sign=positive",
                "+algorithm.anchor.layers=[3,5]",
                "+algorithm.anchor.base_estimator=rloo",
            ]
        )
    )
    assert settings.cfg == AnchorConfig(strategy="global_anchor", ratio=0.2, sign="positive", layers=(3, 5))
    assert settings.base_estimator == "rloo"


def test_plain_estimators_are_left_alone():
    assert read_settings(compose_verl(["algorithm.adv_estimator=grpo"])) is None
    assert read_settings(compose_verl(["algorithm.adv_estimator=gae"])) is None


@pytest.mark.parametrize("mode", ["sync", "colocate_async", "separate_async"])
def test_the_estimator_alone_is_the_switch_in_every_trainer_mode(mode):
    settings = read_settings(compose_verl(BASE + [f"trainer.v1.trainer_mode={mode}"]))
    assert settings.cfg.strategy == "coupled"


def test_legacy_anchor_sync_mode_is_an_alias_of_sync():
    config = compose_verl(BASE + ["trainer.v1.trainer_mode=anchor_sync"])
    assert prepare_config(config).estimator == "anchor_coupled"
    assert config.trainer.v1.trainer_mode == "sync"


def test_gae_base_turns_the_critic_on_unless_the_user_turned_it_off():
    from verl.trainer.ppo.utils import need_critic

    config = compose_verl(BASE + ["+algorithm.anchor.base_estimator=gae"])
    assert not need_critic(config)
    assert prepare_config(config).base_estimator == "gae"
    assert config.critic.enable is True and need_critic(config)
    config = compose_verl(BASE + ["+algorithm.anchor.base_estimator=grpo"])
    prepare_config(config)
    assert config.critic.enable is None  # no critic for GRPO
    with pytest.raises(ValueError, match="critic.enable=false: set critic.enable=true"):
        prepare_config(compose_verl(BASE + ["+algorithm.anchor.base_estimator=gae", "critic.enable=false"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.adv_estimator=anchor_copuled"], "did you mean algorithm.adv_estimator=anchor_coupled?"),
        (["algorithm.adv_estimator=anchor_randon"], "did you mean algorithm.adv_estimator=anchor_random?"),
        (["algorithm.adv_estimator=coupled"], "did you mean algorithm.adv_estimator=anchor_coupled?"),
        (["algorithm.adv_estimator=anchor"], "the anchor estimators are anchor_local_chunk"),
        (BASE + ["+algorithm.anchor.dump_dir=123"], "algorithm.anchor.dump_dir=123 is invalid"),
        (BASE + ["+algorithm.anchor.dump_dir=/etc/passwd"], "algorithm.anchor.dump_dir='/etc/passwd' is invalid"),
        (BASE + ["+algorithm.anchor.enable=false"], "algorithm.anchor.enable=False contradicts"),
        (BASE + ["+algorithm.anchor.gamma_amp=1e39"], "algorithm.anchor.gamma_amp=1e+39 is invalid"),
        (
            BASE + ["+algorithm.anchor.seed=18446744073709551616"],
            "algorithm.anchor.seed=18446744073709551616 is invalid",
        ),
        (BASE + ["+algorithm.anchor.base_estimator=remax"], "never computes the greedy reward_baselines"),
        (BASE + ["+algorithm.anchor.base_estimator=gdpo"], "base_estimator=gdpo is not supported"),
        (BASE + ["+algorithm.anchor.base_estimator=optimal_token_baseline"], "never computes sum_pi_squared"),
        (BASE + ["+algorithm.anchor.base_estimator=tir_optimal_token_baseline"], "never computes sum_pi_squared"),
        (
            BASE + ["+algorithm.anchor.ratio=2.0"],
            "algorithm.anchor.ratio=2.0 is invalid: use a finite number in (0, 1]",
        ),
        (BASE + ["+algorithm.anchor.strategy=coupled"], "algorithm.anchor.strategy='coupled' is not an option"),
        (BASE + ["+algorithm.anchor.gama_amp=2"], "did you mean algorithm.anchor.gamma_amp"),
        (BASE + ["+algorithm.anchor.base_estimator=nope"], "base_estimator=nope is not a registered verl estimator"),
        (BASE + ["+algorithm.anchor.base_estimator=anchor_random"], "the base must be a plain verl estimator"),
        (
            BASE + ["algorithm.rollout_correction.bypass_mode=true"],
            "set algorithm.rollout_correction.bypass_mode=false",
        ),
        (
            BASE + ["actor_rollout_ref.actor.strategy=megatron"],
            "actor_rollout_ref.actor.strategy=megatron is not supported",
        ),
        (BASE + ["+trainer.data_plane=neoproto"], "set trainer.data_plane=classic"),  # verl's neo branch
        (
            BASE
            + [
                "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
                "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            ],
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 with actor_rollout_ref.model.override_config."
            "attn_implementation=sdpa is not supported by anchor_coupled: verl's Ulysses all-to-all runs only "
            "inside flash "
            "attention",
        ),
        (
            BASE
            + [
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=4",
                "+actor_rollout_ref.model.override_config.attn_implementation=eager",
            ],
            "set actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=1",
        ),
    ],
)
def test_bad_configs_name_option_value_and_fix(overrides, message):
    with pytest.raises(ValueError) as err:
        read_settings(compose_verl(overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
        "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
    ],
)
def test_ulysses_sequence_parallelism_with_flash_attention_is_accepted(key):
    """The capture reads verl's flash call after its all-to-all (test_capture_ulysses.py)."""
    assert read_settings(compose_verl(BASE + [f"{key}=2"])).cfg.strategy == "coupled"
    overrides = [f"{key}=2", "+actor_rollout_ref.model.override_config.attn_implementation=flash_attention_3"]
    assert read_settings(compose_verl(BASE + overrides)).cfg.strategy == "coupled"


def test_megatron_is_fine_for_strategies_without_attention():
    settings = read_settings(
        compose_verl(
            [
                "algorithm.adv_estimator=anchor_random",
                "actor_rollout_ref.actor.strategy=megatron",
            ]
        )
    )
    assert settings.cfg.strategy == "random"


def test_validate_config_hook_runs_the_anchor_checks_first():
    import verl.utils.config as verl_config

    import verl_anchor.integration.plugin  # noqa: F401  (entry point module: patches validate_config)

    assert getattr(verl_config.validate_config, "_verl_anchor", False)
    with pytest.raises(ValueError, match="did you mean algorithm.adv_estimator=anchor_coupled"):
        verl_config.validate_config(
            compose_verl(["algorithm.adv_estimator=anchor_couple"]), use_reference_policy=False, use_critic=False
        )


def test_plain_names_that_verl_knows_are_not_typos():
    for name in ("grpo", "gae", "rloo", "gpg", "opo"):
        assert read_settings(compose_verl([f"algorithm.adv_estimator={name}"])) is None


def test_gae_base_starts_the_critic_from_the_actor_unless_a_critic_model_is_named():
    config = compose_verl(BASE + ["+algorithm.anchor.base_estimator=gae", "actor_rollout_ref.model.path=/m/actor"])
    prepare_config(config)
    assert config.critic.model.path == "/m/actor"
    config = compose_verl(
        BASE
        + [
            "+algorithm.anchor.base_estimator=gae",
            "actor_rollout_ref.model.path=/m/actor",
            "critic.model.path=/m/critic",
        ]
    )
    prepare_config(config)
    assert config.critic.model.path == "/m/critic"


def test_bypass_mode_refuses_what_needs_the_forward_and_lets_random_run():
    bypass = "algorithm.rollout_correction.bypass_mode=true"
    assert read_settings(compose_verl(["algorithm.adv_estimator=anchor_random", bypass])).cfg.strategy == "random"
    with pytest.raises(ValueError, match="reads the policy's token entropy"):
        read_settings(compose_verl(["algorithm.adv_estimator=anchor_entropy", bypass]))


def test_the_math_rewards_options_are_checked_in_the_driver(monkeypatch):
    import verl.utils.config as verl_config

    import verl_anchor.integration.plugin  # noqa: F401
    from verl_anchor.rewards import math_verify_pool

    reward = [
        "reward.custom_reward_function.path=pkg://verl_anchor.rewards",
        "reward.custom_reward_function.name=compute_score",
    ]
    with pytest.raises(ValueError, match=r"reward_kwargs.timeout_s must be a positive finite number"):
        verl_config.validate_config(
            compose_verl(reward + ["+reward.custom_reward_function.reward_kwargs.timeout_s=-1"]),
            use_reference_policy=False,
            use_critic=False,
        )

    config = compose_verl(reward)

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(math_verify_pool.importlib, "import_module", missing)
    with pytest.raises(ImportError, match="the math reward needs math-verify"):
        verl_config.validate_config(config, use_reference_policy=False, use_critic=False)


def test_megatron_refusal_names_a_fix_after_which_verl_builds_the_fsdp_engine(monkeypatch):
    """run_qwen3_8b_megatron.sh composes ppo_megatron_trainer; verl picks the actor's engine from its config class."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    script = BASE + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
    with pytest.raises(ValueError) as err:
        read_settings(compose_verl(script, config_name="ppo_megatron_trainer"))
    assert "McoreActorConfig (model_engine=megatron)" in str(err.value) and "set model_engine=dp" in str(err.value)

    # The old advice, actor.strategy=fsdp, leaves verl building a Megatron engine: still refused.
    old_fix = compose_verl(script + ["actor_rollout_ref.actor.strategy=fsdp"], config_name="ppo_megatron_trainer")
    assert omega_conf_to_dataclass(old_fix.actor_rollout_ref.actor).engine.strategy == "megatron"
    with pytest.raises(ValueError, match="set model_engine=dp"):
        read_settings(old_fix)

    fixed = compose_verl(script + ["model_engine=dp"], config_name="ppo_megatron_trainer")
    assert read_settings(fixed).cfg.strategy == "coupled"
    # What verl's ActorRolloutRefWorker does with that config (workers/engine_workers.py, TrainingWorker).
    engine_config = omega_conf_to_dataclass(fixed.actor_rollout_ref.actor).engine
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")
    assert EngineRegistry.get_engine_cls("language_model", engine_config.strategy) is FSDPEngineWithLMHead
    assert fixed.actor_rollout_ref.ref.strategy == "fsdp" and fixed.critic.strategy == "fsdp"


def test_a_critic_turned_on_makes_the_base_gae():
    from verl.trainer.ppo.utils import need_critic

    config = compose_verl(BASE + ["critic.enable=true", "critic.model.path=/m/critic"], responses=1)
    assert prepare_config(config).base_estimator == "gae"
    assert need_critic(config) and config.critic.model.path == "/m/critic"


def test_ppo_example_with_one_response_is_refused_naming_the_base_option():
    """ppo_trainer/run_qwen3_8b_fsdp.sh's config with gae not on the command line (pytest's argv): a critic model,
    rollout.n=1, no critic.enable."""
    with pytest.raises(ValueError) as err:
        read_settings(compose_verl(BASE + ["critic.model.path=/m/critic"], responses=1))
    message = str(err.value)
    assert "algorithm.anchor.base_estimator is unset and actor_rollout_ref.rollout.n=1" in message
    assert "set +algorithm.anchor.base_estimator=gae" in message
    with pytest.raises(ValueError, match="rollout.n=1 without critic.enable=true"):
        read_settings(compose_verl(BASE + ["critic.enable=false"], responses=1))


def test_an_explicit_base_always_wins():
    for base in ("rloo", "grpo", "reinforce_plus_plus"):
        config = compose_verl(
            BASE + [f"+algorithm.anchor.base_estimator={base}", "critic.model.path=/m/critic"], responses=1
        )
        assert read_settings(config).base_estimator == base


def test_the_chosen_base_and_why_are_logged_once(caplog):
    with caplog.at_level("WARNING", logger="verl_anchor.integration.settings"):
        read_settings(compose_verl(BASE, responses=4))
    lines = [r.getMessage() for r in caplog.records if "base estimator" in r.getMessage()]
    assert lines == [
        "verl_anchor: anchor_coupled runs on the grpo base estimator (critic.enable is not true, rollout.n=4)"
    ]


@pytest.mark.parametrize(
    "argv, base",
    [
        # ppo_trainer/run_qwen3_8b_fsdp.sh "$@" with the switch appended: PPO with its critic, rollout.n=1.
        (
            ["algorithm.adv_estimator=gae", "critic.model.path=/m/critic", "algorithm.adv_estimator=anchor_coupled"],
            "gae",
        ),
        # the RLOO example: its groups stay RLOO's.
        (["algorithm.adv_estimator=rloo", "+algorithm.adv_estimator=anchor_coupled"], "rloo"),
        (
            ["algorithm.adv_estimator='reinforce_plus_plus'", "algorithm.adv_estimator=anchor_coupled"],
            "reinforce_plus_plus",
        ),
    ],
)
def test_the_estimator_the_switch_replaced_on_the_command_line_is_the_base(monkeypatch, argv, base):
    from verl.trainer.ppo.utils import need_critic

    monkeypatch.setattr("sys.argv", ["main_ppo.py", *argv])
    config = compose_verl(BASE + ["critic.model.path=/m/critic"], responses=1 if base == "gae" else 4)
    assert prepare_config(config).base_estimator == base
    # Decided once in the driver and written back, so the trainer (another process, another argv) agrees.
    assert config.algorithm.anchor.base_estimator == base
    assert need_critic(config) == (base == "gae")
    monkeypatch.setattr("sys.argv", ["ray-worker"])
    assert read_settings(config).base_estimator == base


def test_an_explicit_base_wins_over_the_command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["main_ppo.py", "algorithm.adv_estimator=rloo", *BASE])
    config = compose_verl(BASE + ["+algorithm.anchor.base_estimator=grpo"], responses=4)
    assert read_settings(config).base_estimator == "grpo"


def test_replaced_estimator_reads_hydra_order():
    from verl_anchor.integration.settings import replaced_estimator

    assert replaced_estimator(["algorithm.adv_estimator=gae", *BASE]) == "gae"
    assert replaced_estimator(BASE) is None
    assert replaced_estimator(["algorithm.adv_estimator=gae"]) is None  # no anchor run at all
    assert replaced_estimator(["algorithm.adv_estimator=rloo", *BASE, "algorithm.adv_estimator=grpo"]) is None
    assert replaced_estimator(["algorithm.adv_estimator=rloo", "algorithm.adv_estimator=gae", *BASE]) == "gae"


def test_a_null_anchor_block_takes_the_chosen_base(monkeypatch):
    """`algorithm.anchor: null` means no options; the driver still writes the base it chose into the block."""
    monkeypatch.setattr("sys.argv", ["main_ppo.py"])
    config = compose_verl(BASE + ["+algorithm.anchor=null"], responses=4)
    assert prepare_config(config).base_estimator == "grpo"
    assert config.algorithm.anchor.base_estimator == "grpo"
