"""`verl-anchor demo`: a few GRPO steps with `anchor_coupled` through real verl, on CPU, offline.

Builds a tiny random Qwen3-architecture model and tokenizer and a small Countdown set
locally, runs `python -m verl.trainer.main_ppo` in CPU mode with the anchor trainer, shows
each step's anchor metrics as it finishes, and says where everything went.
"""

from __future__ import annotations

import argparse
import difflib
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from verl_anchor.usage import UsageError, make_dir, out_dir, positive_int

SHOWN = [
    ("timing_s/step", "step s"),
    ("timing_s/old_log_prob", "old_log_prob s"),
    ("timing_s/anchor_stats", "anchor stats s"),
    ("anchor/selected_frac", "selected"),
    ("anchor/amplified_frac", "amplified"),
    ("anchor/gamma_mean", "mean gamma"),
    ("anchor/waad_mean", "WAAD"),
    ("anchor/fai_mean", "FAI"),
    ("anchor/span_local", "span loc"),
    ("anchor/span_global", "span glob"),
    ("anchor/degenerate_frac", "degenerate"),
    ("critic/score/mean", "reward"),
    ("critic/vf_loss", "critic loss"),  # only with a critic (e.g. +algorithm.anchor.base_estimator=gae)
]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_dir, default=Path("outputs/demo"), help="where model, data and logs go")
    parser.add_argument("--steps", type=positive_int, default=3, help="GRPO steps (an integer >= 1)")
    parser.add_argument("--estimator", default="anchor_coupled",
                        help="algorithm.adv_estimator (anchor_local_chunk, anchor_global_anchor, anchor_coupled, "
                             "anchor_random, anchor_entropy, or grpo for the plain baseline)")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides passed to verl, e.g. +algorithm.anchor.ratio=0.2")


def check_estimator(name: str) -> None:
    """`UsageError` unless ``name`` is an anchor estimator or one verl knows (before anything is built)."""
    from verl_anchor.integration.settings import ANCHOR_ESTIMATORS

    plain = ("gae", "grpo")  # verl computes gae outside its registry
    if name in ANCHOR_ESTIMATORS or name in plain:
        return
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    verl_names = sorted({*ADV_ESTIMATOR_REGISTRY, *plain} - set(ANCHOR_ESTIMATORS))
    if name in verl_names:
        return
    close = difflib.get_close_matches(name, [*ANCHOR_ESTIMATORS, *verl_names], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UsageError(f"--estimator {name!r} is not an advantage estimator: {hint}"
                     f"use one of the anchor estimators ({', '.join(ANCHOR_ESTIMATORS)}) "
                     f"or one of verl's ({', '.join(verl_names)})")


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value the last `key=value` (or `+key=`, `++key=`) override gives, if any."""
    value = None
    for item in overrides:
        name, sep, rest = item.lstrip("+").partition("=")
        if sep and name == key:
            value = rest
    return value


def demo_overrides(out: Path, steps: int, estimator: str, user_overrides: list[str] = ()) -> list[str]:
    """Model, data and the verl overrides of the demo run (builds the assets on first use).

    `user_overrides` go last (they win); CPU mode follows two of them through the rest of the
    config: `trainer.n_gpus_per_node` (fake logical GPUs) and `actor_rollout_ref.actor.use_dynamic_bsz`
    (the log-prob pass and the critic must match it).
    """
    from verl_anchor import rewards
    from verl_anchor.cpu import cpu_overrides
    from verl_anchor.data import prepare_countdown
    from verl_anchor.tiny import ensure_tiny_model

    model = ensure_tiny_model(out / "cache")
    data = out / "data"
    if not (data / "train.parquet").exists():
        prepare_countdown(data, train_size=64, test_size=16, seed=0)
    user_overrides = list(user_overrides)
    n_gpus = int(_override_value(user_overrides, "trainer.n_gpus_per_node") or 1)
    dynamic = (_override_value(user_overrides, "actor_rollout_ref.actor.use_dynamic_bsz") or "false").lower() == "true"
    return cpu_overrides(
        model, data / "train.parquet", data / "test.parquet", adv_estimator=estimator,
        total_training_steps=steps, max_prompt_length=256, max_response_length=48,
        use_remove_padding=True, attn_implementation="sdpa", n_gpus=n_gpus, use_dynamic_bsz=dynamic,
    ) + [
        f"reward.custom_reward_function.path={Path(rewards.__file__)}",
        "reward.custom_reward_function.name=compute_score",
        f"trainer.default_local_dir={out / 'checkpoints'}",
        "trainer.project_name=verl_anchor_demo", "trainer.experiment_name=" + estimator,
    ] + user_overrides


def run(args: argparse.Namespace) -> int:
    from verl_anchor.cpu.launch import parse_step_metrics, run_main_ppo

    check_estimator(args.estimator)
    console = Console()
    out = make_dir(args.out.resolve())
    with console.status("building the tiny model, tokenizer and Countdown data (first run only)"):
        overrides = demo_overrides(out, args.steps, args.estimator, list(args.overrides))
    log_path = out / "main_ppo.log"
    console.print(f"[bold]verl main_ppo[/bold] on CPU: {args.estimator}, {args.steps} steps; full log: {log_path}")
    start = time.time()
    with console.status("starting Ray, TransferQueue and the verl workers (about a minute)") as status:
        def on_line(line: str) -> None:
            for step, metrics in parse_step_metrics(line).items():
                cells = ", ".join(f"{label} {metrics[key]:.3g}" for key, label in SHOWN if key in metrics)
                console.print(f"step {step}: {cells}")
                status.update(f"step {step} done; running the next")
            if "Traceback" in line or "Error" in line:
                status.update("an error was printed; see the log")

        rc = run_main_ppo(overrides, out, log_path, on_line=on_line)
    steps = parse_step_metrics(log_path.read_text(errors="replace"))
    if rc != 0 or not steps:
        console.print(f"[red]verl exited with code {rc}[/red]; the end of {log_path}:")
        console.print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]), markup=False)
        return rc or 1
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
        console.print(f"statistics took {last['timing_s/anchor_stats']:.3f} s of the "
                      f"{last['timing_s/old_log_prob']:.3f} s old-log-prob step (last step)")
    console.print(f"done in {time.time() - start:.0f} s. model + tokenizer: {out / 'cache'}; data: {out / 'data'}; "
                  f"log: {log_path}; checkpoints (if saved): {out / 'checkpoints'}")
    return 0
