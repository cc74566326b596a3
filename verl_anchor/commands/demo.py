"""`verl-anchor demo`: a few GRPO steps with `anchor_coupled` through real verl, on CPU, offline.

Takes the small Qwen3-architecture Countdown policy the package ships, which already solves a few
problems (`verl_anchor.models.policy`), writes its RL prompts and held-out problems as verl parquet,
runs `python -m verl.trainer.main_ppo` in CPU mode with the anchor trainer, shows each step's
reward, accuracy and anchor metrics as it finishes, and says where everything went. verl's own
output (warnings included) goes to the log file, not the console.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from verl_anchor.usage import UsageError, make_dir, out_dir, positive_int

ACCURACY = "demo/accuracy"  # share of the step's responses scored 1.0, from verl's rollout dump
_DUMPED = re.compile(r"Dumped generations to .*?(\d+)\.jsonl")
SHOWN = [
    ("critic/score/mean", "reward"),
    (ACCURACY, "accuracy"),
    ("timing_s/step", "step s"),
    ("timing_s/old_log_prob", "old_log_prob s"),
    ("timing_s/anchor_stats", "anchor stats s"),
    ("anchor/selected_frac", "selected"),
    ("anchor/amplified_frac", "amplified share"),
    ("anchor/gamma_mean", "mean gamma"),
    ("anchor/waad_mean", "WAAD"),
    ("anchor/fai_mean", "FAI"),
    ("anchor/span_local", "span loc"),
    ("anchor/span_global", "span glob"),
    ("anchor/degenerate_frac", "degenerate"),
    ("critic/advantages/max", "max advantage"),
    ("critic/vf_loss", "critic loss"),  # only with a critic (e.g. +algorithm.anchor.base_estimator=gae)
]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_dir, default=Path("outputs/demo"), help="where model, data and logs go")
    parser.add_argument("--steps", type=positive_int, default=3, help="GRPO steps (an integer >= 1)")
    parser.add_argument(
        "--estimator",
        default="anchor_coupled",
        help="algorithm.adv_estimator (anchor_local_chunk, anchor_global_anchor, anchor_coupled, "
        "anchor_random, anchor_entropy, or grpo for the plain baseline)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra hydra overrides passed to verl, e.g. +algorithm.anchor.ratio=0.2"
    )


def check_estimator(name: str) -> None:
    """`UsageError` unless ``name`` is an anchor estimator or one verl knows (before anything is built)."""
    from verl_anchor.integration.settings import ANCHOR_ESTIMATORS, suggest_estimator

    plain = ("gae", "grpo")  # verl computes gae outside its registry
    if name in ANCHOR_ESTIMATORS or name in plain:
        return
    from verl_anchor.integration.verl_api import ADV_ESTIMATOR_REGISTRY

    verl_names = sorted({*ADV_ESTIMATOR_REGISTRY, *plain} - set(ANCHOR_ESTIMATORS))
    if name in verl_names:
        return
    close = suggest_estimator(name, [*ANCHOR_ESTIMATORS, *verl_names])
    hint = f"did you mean {close}? " if close else ""
    raise UsageError(
        f"--estimator {name!r} is not an advantage estimator: {hint}"
        f"use one of the anchor estimators ({', '.join(ANCHOR_ESTIMATORS)}) "
        f"or one of verl's ({', '.join(verl_names)})"
    )


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value the last `key=value` (or `+key=`, `++key=`) override gives, if any."""
    value = None
    for item in overrides:
        name, sep, rest = item.lstrip("+").partition("=")
        if sep and name == key:
            value = rest
    return value


# Runs on the trained policy (demo, compare). 4 prompts x 8 responses per step: at ~12% solved, 8 samples
# give a group with both solved and unsolved responses (a non-zero GRPO advantage) ~3 times as often as 4.
# lr 1e-4: 2e-4 lowered held-out accuracy within 10 steps, 3e-5 did not move it in 20 (docs/experiments.md).
POLICY_RUN: dict[str, Any] = dict(
    train_batch_size=4, rollout_n=8, ppo_mini_batch_size=4, micro_batch_size_per_gpu=8, lr=1e-4
)
# Reward = correct equation only: the policy already writes the format, and GRPO's std normalisation would
# turn a 0.1 format bonus on a rare format slip into a full-size advantage about formatting.
POLICY_OVERRIDES = ["+reward.custom_reward_function.reward_kwargs.format_score=0.0"]
RL_PROBLEMS = 64  # the demo's RL prompts: the generator's stream right after the policy's SFT problems
VAL_PROBLEMS = 16


def policy_data_files(data: Path) -> tuple[Path, Path]:
    """Where `write_policy_data` writes the RL prompts and the validation problems."""
    return data / "train.parquet", data / "test.parquet"


def write_policy_data(
    data: Path, rl_problems: int = RL_PROBLEMS, val_problems: int = VAL_PROBLEMS
) -> tuple[Path, Path]:
    """`train.parquet` (RL prompts the policy never saw in SFT) and `test.parquet` (the first `val_problems`
    of its held-out set), short prompts (a second or so: written on every call)."""
    from verl_anchor.data.countdown import COUNTDOWN_SCHEMA, countdown_rows
    from verl_anchor.data.schema import write_parquet
    from verl_anchor.models.policy import policy_splits

    train, test = policy_data_files(data)
    splits = policy_splits(rl_problems=rl_problems)
    write_parquet(countdown_rows(splits.rl, "train", "short"), COUNTDOWN_SCHEMA, train)
    write_parquet(countdown_rows(splits.heldout[:val_problems], "test", "short"), COUNTDOWN_SCHEMA, test)
    return train, test


def demo_overrides(
    out: Path,
    steps: int,
    estimator: str,
    user_overrides: list[str] = (),
    model: Path | None = None,
    rl_problems: int = RL_PROBLEMS,
    build: bool = True,
    **cpu_options: Any,
) -> list[str]:
    """Model, data and the verl overrides of the demo run (builds the assets on first use).

    `model`: default the trained Countdown policy (`policy.ensure_policy`, shared cache); tests pass the
    tiny random model. `rl_problems`: how many RL prompts `train.parquet` holds. `cpu_options` go to
    `cpu.cpu_overrides` (batch sizes, learning rate, seed). `build=False`: the same overrides, but
    nothing is trained or written (the paths are where the assets will be), to check them first.
    `user_overrides` go last (they win); CPU mode follows two of them through the
    rest of the config: `trainer.n_gpus_per_node` (fake logical GPUs) and
    `actor_rollout_ref.actor.use_dynamic_bsz` (the log-prob pass and the critic must match it).
    """
    from verl_anchor import rewards
    from verl_anchor.integration.cpu import cpu_overrides
    from verl_anchor.models.policy import MAX_NEW_TOKENS, ensure_policy, policy_dir

    if build:
        model = ensure_policy() if model is None else model
        train, test = write_policy_data(out / "data", rl_problems)
    else:
        model = policy_dir() if model is None else model
        train, test = policy_data_files(out / "data")
    user_overrides = list(user_overrides)
    n_gpus = int(_override_value(user_overrides, "trainer.n_gpus_per_node") or 1)
    dynamic = (_override_value(user_overrides, "actor_rollout_ref.actor.use_dynamic_bsz") or "false").lower() == "true"
    return (
        cpu_overrides(
            model,
            train,
            test,
            adv_estimator=estimator,
            total_training_steps=steps,
            max_prompt_length=256,
            max_response_length=MAX_NEW_TOKENS,
            use_remove_padding=True,
            attn_implementation="sdpa",
            n_gpus=n_gpus,
            use_dynamic_bsz=dynamic,
            **cpu_options,
        )
        + [
            f"reward.custom_reward_function.path={Path(rewards.__file__)}",
            "reward.custom_reward_function.name=compute_score",
            f"trainer.default_local_dir={out / 'checkpoints'}",
            f"trainer.rollout_data_dir={out / 'rollouts'}",
            "trainer.project_name=verl_anchor_demo",
            "trainer.experiment_name=" + estimator,
        ]
        + user_overrides
    )


def step_accuracy(rollouts: Path, step: int) -> float | None:
    """Share of step `step`'s responses that the reward scored 1.0 (a correct equation), from verl's
    `trainer.rollout_data_dir` dump; None before it is written."""
    path = rollouts / f"{step}.jsonl"
    try:
        scores = [json.loads(line)["score"] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return None
    return sum(score >= 1.0 for score in scores) / len(scores) if scores else None


def run(args: argparse.Namespace) -> int:
    from verl_anchor.integration.compose import check_main_ppo
    from verl_anchor.integration.cpu.launch import hold_output_dir, parse_step_metrics, run_main_ppo
    from verl_anchor.models.policy import ensure_policy

    check_estimator(args.estimator)
    out, user_overrides = args.out.resolve(), [*POLICY_OVERRIDES, *args.overrides]
    # The config main_ppo will compose, checked before the policy is trained or any file written.
    check_main_ppo(demo_overrides(out, args.steps, args.estimator, user_overrides, build=False, **POLICY_RUN))
    console = Console()
    make_dir(out)
    hold_output_dir(out)  # before anything is built there: an earlier demo's run may still write in it
    policy = ensure_policy()  # the shipped policy (verl_anchor/assets), checked against its checksums
    info = json.loads((policy / "policy.json").read_text())
    accuracy = info["heldout_accuracy"]
    console.print(
        f"policy: {policy} ({info['parameters'] / 1e6:.1f}M parameters); held-out accuracy "
        f"{accuracy['sampled_t1']:.1%} sampled at temperature 1, {accuracy['greedy']:.1%} greedy"
    )
    overrides = demo_overrides(out, args.steps, args.estimator, user_overrides, model=policy, **POLICY_RUN)
    log_path = out / "main_ppo.log"
    rollouts = out / "rollouts"
    console.print(f"[bold]verl main_ppo[/bold] on CPU: {args.estimator}, {args.steps} steps; full log: {log_path}")
    shutil.rmtree(rollouts, ignore_errors=True)  # a step's accuracy must come from this run's dump
    start = time.time()
    pending: dict[int, dict[str, float]] = {}  # steps whose metrics line came before their rollout dump
    dumped: set[int] = set()

    def show(step: int) -> None:
        metrics = pending.pop(step)
        solved = step_accuracy(rollouts, step) if step in dumped else None
        if solved is not None:
            metrics[ACCURACY] = solved
        console.print(
            f"step {step}: " + ", ".join(f"{label} {metrics[key]:.3g}" for key, label in SHOWN if key in metrics)
        )

    with console.status("starting Ray, TransferQueue and the verl workers (about a minute)") as status:

        def on_line(line: str) -> None:
            pending.update(parse_step_metrics(line))
            dump = _DUMPED.search(line)
            if dump:  # verl prints this once the file is written (its dump runs on a background thread)
                dumped.add(int(dump.group(1)))
            for step in sorted(pending):
                if step in dumped:
                    show(step)
                    status.update(f"step {step} done; running the next")
            if "Traceback" in line or "Error" in line:
                status.update("an error was printed; see the log")

        rc = run_main_ppo(overrides, out, log_path, on_line=on_line)
    for step in sorted(pending):
        show(step)
    steps = parse_step_metrics(log_path.read_text(errors="replace"))
    if rc != 0 or not steps:
        console.print(f"[red]verl exited with code {rc}[/red]; the end of {log_path}:")
        console.print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]), markup=False)
        return rc or 1
    for step, metrics in steps.items():
        solved = step_accuracy(rollouts, step)
        if solved is not None:
            metrics[ACCURACY] = solved
    table = Table(title=f"{args.estimator}: per-step metrics from verl's tracker")
    table.add_column("metric")
    for step in sorted(steps):
        table.add_column(f"step {step}", justify="right")
    for key, _ in SHOWN:
        if not any(key in steps[s] for s in steps):
            continue  # e.g. the critic's loss in a run without a critic
        table.add_row(key, *(f"{steps[s][key]:.4g}" if key in steps[s] else "-" for s in sorted(steps)))
    console.print(table)
    last = steps[max(steps)]
    if "timing_s/anchor_stats" in last and last.get("timing_s/old_log_prob"):
        console.print(
            f"statistics took {last['timing_s/anchor_stats']:.3f} s of the "
            f"{last['timing_s/old_log_prob']:.3f} s old-log-prob step (last step)"
        )
    console.print(
        f"done in {time.time() - start:.0f} s. policy: {policy}; data: {out / 'data'}; "
        f"rollouts: {rollouts}; log: {log_path}; checkpoints (if saved): {out / 'checkpoints'}"
    )
    return 0
