"""The anchor trainer inside verl's own v1 trainer classes, on a stand-in TransferQueue (no Ray).

Drives verl's real `_compute_advantage` / `_compute_old_log_prob` code of every trainer mode,
so the base advantages are exactly verl's and gamma is applied on top of them.
"""

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

import verl_anchor.integration.plugin  # noqa: F401  (entry point: wraps get_trainer_cls and validate_config)
from verl_anchor.core.credit import token_weights
from verl_anchor.integration import trainer as anchor_trainer
from verl_anchor.integration.handoff import ANCHOR_OPTIONS_KEY
from verl_anchor.integration.settings import read_settings

MODES = ["sync", "colocate_async", "separate_async"]
# Two prompts x two responses; one response of length 1, all with real rewards at their last token.
LENGTHS = [6, 4, 1, 5]
SCORES = [1.0, 0.0, 0.0, 1.0]
UIDS = ["p0", "p0", "p1", "p1"]


def compose_verl(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=["actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.rollout.n=2", *overrides],
        )


def nested(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=torch.float32) for r in rows], layout=torch.jagged)


class FakeTQ:
    """The two TransferQueue calls the trainer makes, on an in-memory dict of per-sample fields."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.tags: dict[str, dict] = {}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        names = [f for f in (select_fields or self.rows[keys[0]]) if f in self.rows[keys[0]]]
        fields = {}
        for name in names:
            values = [self.rows[key][name] for key in keys]
            fields[name] = NonTensorStack(*values) if isinstance(values[0], str) else nested(values)
        return TensorDict(fields, batch_size=[len(keys)])

    def kv_batch_put(self, keys, partition_id, fields):
        for name in fields.keys():
            for key, value in zip(keys, fields[name].unbind() if fields[name].is_nested else fields[name]):
                self.rows.setdefault(key, {})[name] = value.clone()
        return KVBatchMeta(keys=list(keys), tags=[self.tags.get(key, {}) for key in keys], partition_id=partition_id)


def fill(tq, with_values=False, padding=False, multi_output=False):
    gen = torch.Generator().manual_seed(0)
    keys = [f"{uid}_{i % 2}_0" for i, uid in enumerate(UIDS)]  # verl: {uid}_{session}_{output}
    if multi_output:  # the second response of p1 is a second output of the first one's session
        keys[3] = f"{UIDS[3]}_0_1"
    for key, uid, n, score in zip(keys, UIDS, LENGTHS, SCORES):
        rm = torch.zeros(n)
        rm[-1] = score
        waad = torch.rand(n, generator=gen) * 10
        fai = torch.rand(n, generator=gen)
        fai[-1:] = math.nan
        tq.rows[key] = {
            "uid": uid,
            "response_mask": torch.ones(n),
            "rm_scores": rm,
            "prompts": torch.tensor([3.0, 4.0, 5.0 + UIDS.index(uid)]),
            "old_log_probs": -torch.rand(n, generator=gen),
            "entropy": torch.rand(n, generator=gen),
            "anchor_waad": waad,
            "anchor_fai": fai,
            "anchor_seq": torch.tensor([1.0, 9.0, 0.0]),
        }
        if with_values:
            tq.rows[key]["values"] = torch.rand(n, generator=gen)
    tags = [{} for _ in keys]
    if padding:  # what verl's _balance_batch appends to reach a multiple of the ranks: 1 masked token
        keys.append("padxyz_0_0")
        tq.rows[keys[-1]] = {
            **{name: value[:1] for name, value in tq.rows[keys[0]].items() if name != "uid"},
            "uid": "padxyz",
            "rm_scores": torch.zeros(1),
            "response_mask": torch.zeros(1),
            "anchor_seq": torch.tensor([1.0, 9.0, 0.0]),
        }
        tags.append({"is_padding": True})
    tq.tags.update(zip(keys, tags))
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train")


def bare_trainer(cls, config, global_steps=1, local_trigger_step=0):
    """A trainer object with only what the advantage step reads (no Ray, no workers).

    Like the real construction: a plain estimator gets verl's own class."""
    settings = read_settings(config)
    trainer = object.__new__(cls if settings is not None else cls._anchor_base)
    trainer.config = config
    trainer.global_steps = global_steps
    trainer.local_trigger_step = local_trigger_step
    if settings is not None:
        trainer.anchor = settings
    return trainer


@pytest.fixture
def tq(monkeypatch):
    from verl.trainer.ppo.v1 import trainer_base

    fake = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", fake)
    monkeypatch.setattr(anchor_trainer, "tq", fake)
    return fake


def advantage_step(tq, mode, overrides, with_values=False, padding=False, multi_output=False, **steps):
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = compose_verl(overrides)
    batch = fill(tq, with_values=with_values, padding=padding, multi_output=multi_output)
    trainer = bare_trainer(get_trainer_cls(mode), config, **steps)
    metrics = {}
    trainer._compute_advantage(batch, metrics)
    got = {key: {name: tq.rows[key][name] for name in ("advantages", "returns")} for key in batch.keys}
    return got, metrics, batch.keys


# ---- the estimator is the only switch -------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_comes_back_as_an_anchor_variant_of_verls_own_class(mode):
    from verl.trainer.ppo.v1 import get_trainer_cls, trainer_base

    stock = trainer_base.TRAINER_REGISTRY[mode]
    cls = get_trainer_cls(mode)
    assert issubclass(cls, stock) and issubclass(cls, anchor_trainer.AnchorTrainerMixin)
    assert get_trainer_cls(mode) is cls  # one variant per class
    assert trainer_base.get_trainer_cls(mode) is cls  # both lookup paths are wrapped


def test_legacy_anchor_sync_name_resolves_to_the_sync_variant():
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    assert get_trainer_cls("anchor_sync").__mro__[2] is PPOTrainerSync


def test_a_plain_estimator_gets_verls_class_untouched():
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    trainer = get_trainer_cls("sync")(config=compose_verl(["algorithm.adv_estimator=grpo"]))
    assert type(trainer) is PPOTrainerSync


def test_an_anchor_estimator_gets_the_anchor_class_with_the_mode_string_unchanged():
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = compose_verl(["algorithm.adv_estimator=anchor_coupled", "trainer.v1.trainer_mode=anchor_sync"])
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config=config)
    assert isinstance(trainer, anchor_trainer.AnchorTrainerMixin)
    assert trainer.trainer_mode == "sync" and trainer.anchor.cfg.strategy == "coupled"


# ---- the base advantage is verl's own -------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("base", ["grpo", "rloo", "reinforce_plus_plus", "gae"])
def test_with_unit_gamma_advantages_are_bitwise_verls_base(tq, mode, base):
    critic = ["critic.enable=true"] if base == "gae" else []
    plain, _, keys = advantage_step(tq, mode, [f"algorithm.adv_estimator={base}", *critic], with_values=True)
    tq.rows.clear()
    anchored, metrics, _ = advantage_step(
        tq,
        mode,
        [
            "algorithm.adv_estimator=anchor_coupled",
            f"+algorithm.anchor.base_estimator={base}",
            "+algorithm.anchor.gamma_amp=1.0",
            *critic,
        ],
        with_values=True,
    )
    assert any(plain[k]["advantages"].abs().sum() > 0 for k in keys)
    for key in keys:
        assert torch.equal(anchored[key]["advantages"], plain[key]["advantages"])
        assert torch.equal(anchored[key]["returns"], plain[key]["returns"])
    assert metrics["anchor/gamma_mean"] == 1.0


@pytest.mark.parametrize("base", ["grpo", "gae"])
def test_gamma_scales_the_actors_advantages_and_not_the_critics_returns(tq, base):
    critic = ["critic.enable=true"] if base == "gae" else []
    plain, _, keys = advantage_step(tq, "sync", [f"algorithm.adv_estimator={base}", *critic], with_values=True)
    tq.rows.clear()
    anchored, metrics, _ = advantage_step(
        tq,
        "sync",
        ["algorithm.adv_estimator=anchor_coupled", f"+algorithm.anchor.base_estimator={base}", *critic],
        with_values=True,
    )
    cfg = read_settings(compose_verl(["algorithm.adv_estimator=anchor_coupled"])).cfg
    for key in keys:
        row = tq.rows[key]
        gamma = token_weights(row["anchor_waad"], row["anchor_fai"], cfg)
        # GAE whitens the advantages first; gamma multiplies what verl's whitening produced.
        torch.testing.assert_close(anchored[key]["advantages"], plain[key]["advantages"] * gamma, rtol=0, atol=0)
        assert torch.equal(anchored[key]["returns"], plain[key]["returns"])
    assert 0 < metrics["anchor/selected_frac"] < 1


def test_padding_samples_keep_their_advantages_and_stay_out_of_the_metrics(tq):
    overrides = ["algorithm.adv_estimator=anchor_coupled"]
    got, metrics, keys = advantage_step(tq, "sync", overrides, padding=True)
    assert torch.equal(got[keys[-1]]["advantages"], torch.zeros(1))
    assert sum(int((got[k]["advantages"] != 0).sum()) for k in keys[:-1]) > 0
    tq.rows.clear()
    _, without_padding, _ = advantage_step(tq, "sync", overrides)
    assert metrics["anchor/selected_frac"] == without_padding["anchor/selected_frac"]


def test_random_draws_follow_the_prompt_not_verls_random_uid(tq):
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = compose_verl(["algorithm.adv_estimator=anchor_random", "+algorithm.anchor.seed=5"])
    first, *_ = advantage_step(tq, "sync", ["algorithm.adv_estimator=anchor_random", "+algorithm.anchor.seed=5"])
    # A second run: the same prompts and responses under fresh uuids, in another row order.
    renamed = {key: "run2" + key for key in first}
    rows = {renamed[key]: dict(tq.rows[key], uid="run2" + tq.rows[key]["uid"]) for key in first}
    tq.rows.clear()
    tq.rows.update(rows)
    keys = list(reversed(list(rows)))
    trainer = bare_trainer(get_trainer_cls("sync"), config)
    trainer._compute_advantage(KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train"), {})
    for key in first:
        assert torch.equal(tq.rows[renamed[key]]["advantages"], first[key]["advantages"])


def test_async_local_steps_draw_anew_for_the_random_baseline(tq):
    overrides = ["algorithm.adv_estimator=anchor_random"]
    first, *_ = advantage_step(tq, "colocate_async", overrides, global_steps=3, local_trigger_step=0)
    tq.rows.clear()
    again, *_ = advantage_step(tq, "colocate_async", overrides, global_steps=3, local_trigger_step=0)
    tq.rows.clear()
    second, *_ = advantage_step(tq, "colocate_async", overrides, global_steps=3, local_trigger_step=1)
    assert all(torch.equal(first[k]["advantages"], again[k]["advantages"]) for k in first)
    assert any(not torch.equal(first[k]["advantages"], second[k]["advantages"]) for k in first)


# ---- separate_async: statistics under the pi_old weights ------------------------------------------
class StandInWorkerGroup:
    """Records the separate_async weight juggling and what the log-prob call was asked for."""

    def __init__(self, tq):
        self.tq, self.calls = tq, []

    def save_model_to_cpu(self, step):
        self.calls.append(("save", step))

    def restore_model_from_cpu(self, step):
        self.calls.append(("restore", step))

    def clear_cpu_model(self, step):
        self.calls.append(("clear", step))

    def compute_log_prob(self, batch):
        self.calls.append(("compute_log_prob", dict(batch.extra_info).get(ANCHOR_OPTIONS_KEY)))
        for key in batch.keys:
            n = len(self.tq.rows[key]["response_mask"])
            self.tq.rows[key]["log_probs"] = -torch.ones(n + 3)  # full sequence: 3 prompt tokens
            self.tq.rows[key]["entropy"] = torch.ones(n + 3)
        return batch


@pytest.mark.parametrize(
    "local_step, juggling",
    [
        (0, [("save", 0)]),
        (1, [("save", 1), ("restore", 0)]),
    ],
)
def test_separate_async_computes_statistics_with_the_old_weights(tq, local_step, juggling):
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = compose_verl(
        [
            "algorithm.adv_estimator=anchor_coupled",
            "trainer.v1.trainer_mode=separate_async",
            "actor_rollout_ref.rollout.calculate_log_probs=false",
        ]
    )
    trainer = bare_trainer(get_trainer_cls("separate_async"), config, local_trigger_step=local_step)
    trainer.actor_rollout_wg = StandInWorkerGroup(tq)
    batch = fill(tq)
    trainer._compute_old_log_prob(batch, {})
    calls = trainer.actor_rollout_wg.calls
    assert calls[: len(juggling)] == juggling
    assert calls[len(juggling)] == ("compute_log_prob", trainer.anchor.cfg.to_dict())  # stats asked for
    if local_step:
        assert calls[len(juggling) + 1 :] == [("restore", local_step), ("clear", local_step)]
    assert ANCHOR_OPTIONS_KEY not in batch.extra_info  # kept out of later RPCs
    assert tq.rows[batch.keys[0]]["old_log_probs"].shape == (LENGTHS[0],)


def test_separate_async_picks_the_anchor_detach_worker():
    import ray
    from verl.experimental.separation.engine_workers import DetachActorWorker
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from verl_anchor.integration.worker import (
        AnchorActorRolloutRefWorker,
        AnchorDetachActorWorker,
        anchor_worker_cls,
    )

    # verl's role mapping holds ray.remote(...) actor classes, which are not classes themselves.
    assert anchor_worker_cls(ray.remote(DetachActorWorker)) is AnchorDetachActorWorker
    assert anchor_worker_cls(ray.remote(ActorRolloutRefWorker)) is AnchorActorRolloutRefWorker
    assert anchor_worker_cls(DetachActorWorker) is AnchorDetachActorWorker
    assert issubclass(AnchorDetachActorWorker, DetachActorWorker)


def test_masked_tokens_inside_a_response_take_no_credit(tq):
    from verl.trainer.ppo.v1 import get_trainer_cls

    config = compose_verl(["algorithm.adv_estimator=anchor_global_anchor"])
    batch = fill(tq)
    first = batch.keys[0]
    tq.rows[first]["response_mask"] = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # tool output at 1..3
    tq.rows[first]["anchor_fai"] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2, math.nan])
    trainer = bare_trainer(get_trainer_cls("sync"), config)
    trainer._compute_advantage(batch, {})
    plain_trainer = bare_trainer(get_trainer_cls("sync"), compose_verl(["algorithm.adv_estimator=grpo"]))
    shaped = tq.rows[first]["advantages"].clone()
    plain_trainer._compute_advantage(batch, {})
    ratio = shaped / tq.rows[first]["advantages"]
    # Budget ceil(0.4 * 2 defined trainable) = 1: the higher of positions 0 (0.1) and 4 (0.2).
    assert ratio[[0, 4]].tolist() == pytest.approx([1.0, 1.5], rel=1e-6)


def test_multi_output_sessions_keep_verls_grpo_broadcast(tq):
    # Two outputs in one session ({uid}_{session}_{i}): verl scores the last and broadcasts it.
    plain, _, keys = advantage_step(tq, "sync", ["algorithm.adv_estimator=grpo"], multi_output=True)
    tq.rows.clear()
    anchored, _, _ = advantage_step(
        tq, "sync", ["algorithm.adv_estimator=anchor_coupled", "+algorithm.anchor.gamma_amp=1.0"], multi_output=True
    )
    assert any(k.endswith("_1") for k in keys)
    for key in keys:
        assert torch.equal(anchored[key]["advantages"], plain[key]["advantages"])


def test_a_subclass_of_the_anchor_variant_keeps_its_overrides_on_a_plain_run():
    import copy
    import pickle

    from verl.trainer.ppo.v1 import get_trainer_cls

    class RecipeTrainer(get_trainer_cls("sync")):
        recipe_hook = True

    plain = RecipeTrainer(config=compose_verl(["algorithm.adv_estimator=grpo"]))
    assert isinstance(plain, RecipeTrainer) and plain.anchor is None
    anchored = RecipeTrainer(config=compose_verl(["algorithm.adv_estimator=anchor_coupled"]))
    assert anchored.anchor.estimator == "anchor_coupled" and anchored.recipe_hook
    variant = get_trainer_cls("sync")(config=compose_verl(["algorithm.adv_estimator=anchor_coupled"]))
    assert type(copy.copy(variant)) is type(variant)
    assert pickle.loads(pickle.dumps(type(variant))) is type(variant)  # found by reference


class StandInPoolTrainer:
    """verl's _init_resource_pool_mgr, reduced to the role mapping it fills."""

    def __init__(self, worker_cls):
        self.worker_cls = worker_cls

    def _init_resource_pool_mgr(self):
        import ray
        from verl.trainer.ppo.utils import Role

        self.role_worker_mapping = {
            Role.ActorRollout: ray.remote(self.worker_cls),
            Role.RefPolicy: ray.remote(self.worker_cls),
        }


def test_the_actor_role_gets_the_anchor_variant_of_whatever_worker_was_mapped():
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker

    from verl_anchor.integration.worker import AnchorActorRolloutRefWorker, AnchorWorkerMixin

    class RecipeWorker(ActorRolloutRefWorker):
        pass

    for worker_cls, expected_base in (
        (ActorRolloutRefWorker, AnchorActorRolloutRefWorker),
        (RecipeWorker, RecipeWorker),
    ):
        cls = anchor_trainer.anchor_trainer_cls(StandInPoolTrainer)
        trainer = object.__new__(cls)
        trainer.__init__(worker_cls)
        trainer.anchor = read_settings(compose_verl(["algorithm.adv_estimator=anchor_coupled"]))
        trainer._init_resource_pool_mgr()
        actor = type(trainer.role_worker_mapping[Role.ActorRollout])
        assert issubclass(actor, expected_base) and issubclass(actor, AnchorWorkerMixin)
        assert not issubclass(type(trainer.role_worker_mapping[Role.RefPolicy]), AnchorWorkerMixin)
