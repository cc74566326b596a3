"""The anchor step in verl's legacy trainer (`trainer.use_v1=false`): verl's real `RayPPOTrainer` methods and
module functions, patched in place by the plugin, on hand-made padded batches (no Ray; end to end:
`test_verl_pipelines.py::test_legacy_trainer_applies_anchor_credit`)."""

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from tensordict import TensorDict
from verl import DataProto

import verl_anchor.integration.plugin  # noqa: F401  (entry point: patches verl's modules on import)
from verl_anchor.core.credit import token_weights
from verl_anchor.integration import legacy
from verl_anchor.integration.handoff import ANCHOR_OPTIONS_KEY
from verl_anchor.integration.settings import read_settings

PROMPTS = [[3, 4, 5], [6, 7], [3, 4, 5], [6, 7]]
LENGTHS = [6, 4, 1, 5]  # response tokens
SCORES = [1.0, 0.0, 0.0, 1.0]
UIDS = ["p0", "p1", "p0", "p1"]
P, R = 3, 6  # prompt and response widths (left- and right-padded)


def compose_verl(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                "actor_rollout_ref.rollout.name=hf",
                "actor_rollout_ref.rollout.n=2",
                "trainer.use_v1=false",
                *overrides,
            ],
        )


def padded_batch(with_statistics=True):
    """A DataProto as RayPPOTrainer.fit holds it before the advantage step, with the anchor columns that the
    patched `_compute_old_log_prob` adds (NaN past each response)."""
    gen = torch.Generator().manual_seed(0)
    rows = len(LENGTHS)
    attention = torch.zeros(rows, P + R, dtype=torch.long)
    prompts = torch.zeros(rows, P, dtype=torch.long)
    responses = torch.zeros(rows, R, dtype=torch.long)
    rewards = torch.zeros(rows, R)
    for i, (prompt, n) in enumerate(zip(PROMPTS, LENGTHS)):
        prompts[i, P - len(prompt) :] = torch.tensor(prompt)
        attention[i, P - len(prompt) : P + n] = 1
        responses[i, :n] = torch.randint(10, 20, (n,), generator=gen)
        rewards[i, n - 1] = SCORES[i]
    response_mask = attention[:, P:].float()
    waad = torch.rand(rows, R, generator=gen) * 10
    fai = torch.rand(rows, R, generator=gen)
    fai[:, -1] = math.nan
    waad[response_mask == 0] = math.nan
    fai[response_mask == 0] = math.nan
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention,
        "response_mask": response_mask,
        "token_level_rewards": rewards,
        "token_level_scores": rewards,
        "values": torch.rand(rows, R, generator=gen),
    }
    if with_statistics:
        tensors.update(anchor_waad=waad, anchor_fai=fai, anchor_seq=torch.tensor([[1.0, 9.0, 0.5]] * rows))
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array(UIDS, dtype=object)})


class BareTrainer:
    """What the advantage step reads of a RayPPOTrainer (config, step, settings), registered as init_workers does."""

    def __init__(self, config, global_steps=1):
        self.config, self.global_steps, self.role_worker_mapping = config, global_steps, {}
        legacy._with_anchor_workers(build_workers)(self)  # verl's init_workers itself needs Ray


def build_workers(trainer):
    """What verl's init_workers leaves behind that the anchor start-up uses: the actor's worker group."""
    trainer.actor_rollout_wg = FakeActorGroup()


def advantage_step(overrides, batch=None, global_steps=1):
    from verl.trainer.ppo import ray_trainer

    config = compose_verl(overrides)
    trainer = BareTrainer(config, global_steps)
    batch = padded_batch() if batch is None else batch
    return trainer, ray_trainer.compute_advantage(
        batch,
        adv_estimator=config.algorithm.adv_estimator,
        gamma=config.algorithm.gamma,
        lam=config.algorithm.lam,
        num_repeat=2,
        norm_adv_by_std_in_grpo=True,
        config=config.algorithm,
    )


@pytest.mark.parametrize("base", ["grpo", "rloo", "reinforce_plus_plus", "gae"])
def test_with_unit_gamma_advantages_are_bitwise_verls_base(base):
    critic = ["critic.enable=true"] if base == "gae" else []
    _, plain = advantage_step([f"algorithm.adv_estimator={base}", *critic])
    trainer, anchored = advantage_step(
        [
            "algorithm.adv_estimator=anchor_coupled",
            f"+algorithm.anchor.base_estimator={base}",
            "+algorithm.anchor.gamma_amp=1.0",
            *critic,
        ]
    )
    assert trainer.anchor.base_estimator == base
    assert plain.batch["advantages"].abs().sum() > 0
    assert torch.equal(anchored.batch["advantages"], plain.batch["advantages"])
    assert torch.equal(anchored.batch["returns"], plain.batch["returns"])
    metrics = anchored.meta_info[legacy.METRICS_KEY]
    assert metrics["anchor/gamma_mean"] == 1.0 and metrics["anchor/waad_mean"] > 0
    # The statistics leave the batch at the advantage step: the actor update ships none of them.
    assert not {"anchor_waad", "anchor_fai", "anchor_seq"} & set(anchored.batch.keys())


@pytest.mark.parametrize("base", ["grpo", "gae"])
def test_gamma_scales_the_actors_advantages_and_not_the_critics_returns(base):
    critic = ["critic.enable=true"] if base == "gae" else []
    statistics = padded_batch()
    _, plain = advantage_step([f"algorithm.adv_estimator={base}", *critic])
    trainer, anchored = advantage_step(
        ["algorithm.adv_estimator=anchor_coupled", f"+algorithm.anchor.base_estimator={base}", *critic]
    )
    for i, n in enumerate(LENGTHS):
        gamma = token_weights(
            statistics.batch["anchor_waad"][i, :n], statistics.batch["anchor_fai"][i, :n], trainer.anchor.cfg
        )
        torch.testing.assert_close(
            anchored.batch["advantages"][i, :n], plain.batch["advantages"][i, :n] * gamma, rtol=0, atol=0
        )
        assert torch.equal(anchored.batch["advantages"][i, n:], plain.batch["advantages"][i, n:])
    assert torch.equal(anchored.batch["returns"], plain.batch["returns"])
    assert 0 < anchored.meta_info[legacy.METRICS_KEY]["anchor/selected_frac"] < 1


def test_the_metrics_reach_every_trainers_metrics_call_once():
    from verl.trainer.ppo import metric_utils, ray_trainer

    _, anchored = advantage_step(["algorithm.adv_estimator=anchor_coupled"])
    again = copy.deepcopy(anchored)
    # fit calls ray_trainer's name; verl-recipe's DAPO imports it from metric_utils.
    for compute_data_metrics, batch in (
        (ray_trainer.compute_data_metrics, anchored),
        (metric_utils.compute_data_metrics, again),
    ):
        metrics = compute_data_metrics(batch=batch, use_critic=False)
        assert 0 < metrics["anchor/selected_frac"] < 1 and metrics["anchor/span_global"] == 9.0
        assert "critic/advantages/max" in metrics  # verl's own metrics are all still there
        assert "anchor/selected_frac" not in compute_data_metrics(batch=batch, use_critic=False)


def test_an_anchor_estimator_outside_an_anchor_trainer_is_refused():
    from verl.trainer.ppo import ray_trainer

    config = compose_verl(["algorithm.adv_estimator=anchor_coupled"])
    with pytest.raises(RuntimeError, match="applied only by the anchor step"):
        ray_trainer.compute_advantage(padded_batch(), adv_estimator="anchor_coupled", config=config.algorithm)


@pytest.mark.parametrize("estimator, column", [("anchor_coupled", "anchor_waad"), ("anchor_entropy", "anchor_entropy")])
def test_a_trainer_that_bypassed_the_old_log_prob_step_is_refused(estimator, column):
    with pytest.raises(
        RuntimeError, match=f"the batch has no {column}; .* bypasses RayPPOTrainer._compute_old_log_prob"
    ):
        advantage_step([f"algorithm.adv_estimator={estimator}"], batch=padded_batch(with_statistics=False))


def test_random_draws_follow_each_responses_tokens_not_its_row():
    overrides = ["algorithm.adv_estimator=anchor_random"]
    _, first = advantage_step(overrides, batch=padded_batch(with_statistics=False))
    order = [2, 0, 3, 1]
    _, reordered = advantage_step(overrides, batch=padded_batch(with_statistics=False)[order])
    assert torch.equal(reordered.batch["advantages"], first.batch["advantages"][order])
    _, next_step = advantage_step(overrides, batch=padded_batch(with_statistics=False), global_steps=2)
    assert not torch.equal(next_step.batch["advantages"], first.batch["advantages"])


class FakeActorGroup:
    """The worker group's compute_log_prob as verl binds it (an instance attribute), answering like the anchor
    worker."""

    def __init__(self):
        self.received, self.prepared = [], []
        self.compute_log_prob = self._compute_log_prob

    def anchor_prepare(self, options: dict) -> list[list[int]]:  # ONE_TO_ALL: one answer per rank
        self.prepared.append(options)
        return [[1, 2]]

    def _compute_log_prob(self, data: TensorDict) -> TensorDict:
        from verl.utils import tensordict_utils as tu

        self.received.append(tu.get_non_tensor_data(data, ANCHOR_OPTIONS_KEY, default=None))
        lengths = data["attention_mask"][:, -data["response_mask"].shape[1] :].sum(-1).tolist()
        sequences = data["input_ids"].offsets().diff().tolist()

        def nested(sizes, value):
            return torch.nested.as_nested_tensor(
                [torch.full((n,), value + i) for i, n in enumerate(sizes)], layout=torch.jagged
            )

        output = TensorDict(
            {
                "log_probs": nested(sequences, -1.0),
                "entropy": nested(sequences, 0.5),
                "anchor_waad": nested(lengths, 10.0),
                "anchor_fai": nested(lengths, 0.0),
                "anchor_seq": nested([3] * len(lengths), 1.0),
            },
            batch_size=[len(lengths)],
        )
        tu.assign_non_tensor(output, metrics={"mfu": 0.0})
        return output


@pytest.mark.parametrize("estimator", ["anchor_coupled", "grpo"])
def test_old_log_prob_carries_the_options_and_keeps_the_statistics(estimator):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    trainer = object.__new__(RayPPOTrainer)
    trainer.config = compose_verl([f"algorithm.adv_estimator={estimator}"])
    trainer.role_worker_mapping = {}
    legacy._with_anchor_workers(build_workers)(trainer)
    group = trainer.actor_rollout_wg
    assert group.prepared == ([read_settings(trainer.config).cfg.to_dict()] if estimator != "grpo" else [])
    batch = padded_batch(with_statistics=False)
    batch.batch["position_ids"] = torch.cumsum(batch.batch["attention_mask"], 1) - 1
    old_log_prob, _ = trainer._compute_old_log_prob(batch)
    assert group.compute_log_prob == group._compute_log_prob  # the RPC is verl's own again
    if estimator == "grpo":
        assert group.received == [None] and "anchor_waad" not in old_log_prob.batch.keys()
        return
    assert group.received == [read_settings(trainer.config).cfg.to_dict()]
    waad = old_log_prob.batch["anchor_waad"]
    assert waad.shape == (len(LENGTHS), R) and old_log_prob.batch["anchor_seq"].shape == (len(LENGTHS), 3)
    for i, n in enumerate(LENGTHS):  # each row its own response's values, NaN past its end
        assert (waad[i, :n] == 10.0 + i).all() and torch.isnan(waad[i, n:]).all()
    assert read_settings(trainer.config) is not None  # and verl's own outputs are all still there
    assert {"old_log_probs", "entropys"} <= set(old_log_prob.batch.keys())


def test_init_workers_gives_the_actor_role_the_anchor_worker_before_verl_builds_it():
    import ray
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

    from verl_anchor.integration.worker import AnchorActorRolloutRefWorker

    built = {}
    for estimator in ("anchor_random", "grpo"):
        trainer = object.__new__(BareTrainer)
        trainer.config = compose_verl([f"algorithm.adv_estimator={estimator}"])
        trainer.role_worker_mapping = {
            Role.ActorRollout: ray.remote(ActorRolloutRefWorker),
            Role.Critic: ray.remote(TrainingWorker),
        }
        legacy._with_anchor_workers(
            lambda self: (built.update({estimator: dict(self.role_worker_mapping)}), build_workers(self))  # noqa: B023
        )(trainer)
    actor = built["anchor_random"][Role.ActorRollout].__ray_metadata__.modified_class
    assert issubclass(actor, AnchorActorRolloutRefWorker)
    assert built["anchor_random"][Role.Critic].__ray_metadata__.modified_class.__bases__[0] is TrainingWorker
    assert built["grpo"][Role.ActorRollout].__ray_metadata__.modified_class.__bases__[0] is ActorRolloutRefWorker


def test_recipes_that_import_metrics_before_the_trainer_get_the_patched_functions():
    """verl-recipe's DAPO: `from metric_utils import compute_data_metrics`, then `from ray_trainer import ...`."""
    probe = (
        "from verl.trainer.ppo.metric_utils import compute_data_metrics\n"
        "from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage\n"
        "print(all(getattr(f, '_verl_anchor', False) for f in (compute_data_metrics, compute_advantage, "
        "RayPPOTrainer.init_workers, RayPPOTrainer._compute_old_log_prob)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


def test_recipes_that_leave_out_config_get_the_processs_anchor_trainer():
    """verl-recipe's PRIME, SPPO, ... call compute_advantage without config=."""
    from verl.trainer.ppo import ray_trainer

    trainer, with_config = advantage_step(["algorithm.adv_estimator=anchor_coupled"])
    without = ray_trainer.compute_advantage(padded_batch(), adv_estimator="anchor_coupled", num_repeat=2)
    assert torch.equal(without.batch["advantages"], with_config.batch["advantages"])
    other = BareTrainer(compose_verl(["algorithm.adv_estimator=anchor_coupled"]))
    with pytest.raises(RuntimeError, match="holds 2 anchor trainers: pass config=self.config.algorithm"):
        ray_trainer.compute_advantage(padded_batch(), adv_estimator="anchor_coupled", num_repeat=2)
    del trainer, other


def test_a_gae_base_on_a_trainer_built_without_a_critic_is_refused_before_its_workers():
    trainer = object.__new__(BareTrainer)
    trainer.config = compose_verl(["algorithm.adv_estimator=anchor_coupled", "+algorithm.anchor.base_estimator=gae"])
    trainer.role_worker_mapping, trainer.use_critic = {}, False  # what __init__ decided with critic.enable unset
    with pytest.raises(ValueError, match="built without one .* set critic.enable=true"):
        legacy._with_anchor_workers(build_workers)(trainer)
    assert not hasattr(trainer, "actor_rollout_wg")


@pytest.mark.parametrize(
    "use_v1, base, refused",
    [
        ("false", "gdpo", None),
        ("false", "optimal_token_baseline", None),
        ("false", "remax", "RayPPOTrainer.fit generates the greedy reward_baselines"),
        ("true", "gdpo", "v1 trainer does not give it the raw batch"),
    ],
)
def test_bases_are_refused_by_what_the_trainer_in_use_cannot_run(use_v1, base, refused):
    config = compose_verl(
        [
            "algorithm.adv_estimator=anchor_coupled",
            f"+algorithm.anchor.base_estimator={base}",
            f"trainer.use_v1={use_v1}",
        ]
    )
    if refused is None:
        assert read_settings(config).base_estimator == base
    else:
        with pytest.raises(ValueError, match=refused):
            read_settings(config)
