"""`verl-anchor compare`: the paper's comparison in miniature, on CPU, through verl's `main_ppo`.

Every (estimator, seed) run starts from the same trained Countdown policy (`verl_anchor.models.policy`), trains
on the same RL prompts (never seen in its SFT) with the same budget (steps, batch, learning rate) and the
same seed for data order and rollout sampling, and saves the policy as a Hugging Face model every
`--eval-every` steps (verl's `hf_model` checkpoint). Each saved policy, and the starting one as step 0,
is then evaluated on one fixed protocol: the same held-out problems for every run, greedy accuracy and
mean@k accuracy (k samples per problem at temperature 1.0, with a fixed sampling seed), through
`policy.evaluate` (batched HF generation, the same function that reports the SFT policy's accuracy).

Writes `results.csv` (estimator, seed, step, greedy, mean@k), `accuracy.png` (mean and standard error
over seeds vs step) and `table.md` (final-step accuracy per estimator, mean +- standard error over
seeds, the difference to the first estimator and the smallest difference the runs can detect). A run
whose checkpoints are there for the same training settings is not trained again, and an evaluation
already made with the same evaluation settings is read back, so an interrupted comparison resumes and
a change of `--heldout` or `--samples` only re-evaluates.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console

from verl_anchor.usage import UsageError, make_dir, out_dir, positive_int
from verl_anchor.usage import seed as seed_option


class CompareError(UsageError):
    """A run that failed (verl's exit code, a missing checkpoint): one `error:` line, its log named."""


DEFAULT_ESTIMATORS = ("grpo", "anchor_coupled", "anchor_random")
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5% test, 80% power
ACCURACY_KEYS = ("greedy", "mean_at_k", "train_mean_at_16")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_dir, default=Path("outputs/compare"), help="where runs and results go")
    parser.add_argument(
        "--estimators",
        nargs="+",
        default=list(DEFAULT_ESTIMATORS),
        help="algorithm.adv_estimator values; the first is the baseline of the table",
    )
    parser.add_argument("--seeds", nargs="+", type=seed_option, default=[0, 1, 2], help="seeds (data order, sampling)")
    parser.add_argument("--steps", type=positive_int, default=30, help="training steps per run")
    parser.add_argument("--eval-every", type=positive_int, default=5, help="evaluate every this many steps")
    parser.add_argument("--heldout", type=positive_int, default=256, help="held-out problems evaluated")
    parser.add_argument("--samples", type=positive_int, default=4, help="k of mean@k (temperature 1.0)")
    parser.add_argument(
        "--train-problems",
        type=positive_int,
        default=16,
        help="RL prompts (the same for every run; also evaluated, 16 samples each)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra hydra overrides for every run, e.g. actor_rollout_ref.actor.optim.lr=1e-4"
    )


def run(args: argparse.Namespace) -> int:
    from verl_anchor.commands.demo import POLICY_OVERRIDES, POLICY_RUN, check_estimator
    from verl_anchor.integration.compose import check_main_ppo
    from verl_anchor.integration.cpu.launch import hold_output_dir
    from verl_anchor.models.policy import DEFAULT_RECIPE, ensure_policy, policy_dir

    for name in args.estimators:
        check_estimator(name)
    if len(set(args.estimators)) != len(args.estimators) or len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--estimators and --seeds must not repeat a value")
    if args.steps % args.eval_every:
        raise UsageError(
            f"--steps {args.steps} is not a multiple of --eval-every {args.eval_every}: the last step "
            "would not be evaluated; choose steps that are"
        )
    if args.heldout > DEFAULT_RECIPE.heldout_problems:
        raise UsageError(
            f"--heldout {args.heldout} is more than the policy's {DEFAULT_RECIPE.heldout_problems} held-out problems"
        )
    # What decides a run's checkpoints, and what decides an evaluation: each cache is keyed by its own part
    # (the starting policy by its weights' digest, added once the policy is there).
    training = {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "train_problems": args.train_problems,
        "run": POLICY_RUN,
        "overrides": [*POLICY_OVERRIDES, *args.overrides],
    }
    runs = [(e, s) for s in args.seeds for e in args.estimators]  # seed-major: partial results stay balanced
    for estimator, seed in runs:  # each run's main_ppo config, before the policy is built or evaluated
        check_main_ppo(
            run_overrides(
                args.out.resolve() / "runs" / f"{estimator}-s{seed}",
                estimator,
                seed,
                policy_dir(),
                training,
                build=False,
            )
        )
    console = Console()
    out = make_dir(args.out.resolve())
    hold_output_dir(out)  # before a run dir is cleared: a killed comparison's run may still write in it
    policy = ensure_policy()
    training["policy"] = weights_digest(policy)
    protocol = {"heldout": args.heldout, "samples": args.samples, "train_problems": args.train_problems}
    start = time.time()
    baseline = _evaluate_cached(out / "step0.json", policy, protocol)
    rows = []
    for index, (estimator, seed) in enumerate(runs, 1):
        console.print(
            f"[bold]run {index}/{len(runs)}[/bold]: {estimator}, seed {seed} "
            f"({(time.time() - start) / 60:.0f} min so far)"
        )
        evals = _run_one(out / "runs" / f"{estimator}-s{seed}", estimator, seed, policy, training, protocol, console)
        rows += [{"estimator": estimator, "seed": seed, "step": 0, **baseline}]
        rows += [{"estimator": estimator, "seed": seed, "step": step, **acc} for step, acc in sorted(evals.items())]
    _write_csv(out / "results.csv", rows)
    table = summary_table(rows, args.estimators, args.samples)
    (out / "table.md").write_text(table + "\n")
    plot_accuracy(rows, args.estimators, args.samples, out / "accuracy.png")
    console.print(table, markup=False)
    console.print(
        f"done in {(time.time() - start) / 60:.1f} min: {out / 'results.csv'}, {out / 'table.md'}, "
        f"{out / 'accuracy.png'}"
    )
    return 0


def weights_digest(model_dir: Path) -> str:
    """The identity of the HF model in `model_dir`: a sha256 over its safetensors files' names and sha256s."""
    from verl_anchor.models.tiny import sha256_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CompareError(f"{model_dir} has no *.safetensors weights")
    return hashlib.sha256("".join(f"{p.name} {sha256_file(p)}\n" for p in files).encode()).hexdigest()


def _read_json(path: Path) -> object:
    """The JSON in `path`; None when it is missing, unreadable or not JSON (a cache cut short is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _evaluate_cached(path: Path, model_dir: Path, protocol: dict) -> dict:
    """Greedy and mean@k accuracy of the HF model in `model_dir` on the held-out problems, and mean@16 on the
    RL prompts (cached in `path` by the protocol and the model's `weights_digest`)."""
    weights = weights_digest(model_dir)
    cached = _read_json(path)
    if (
        isinstance(cached, dict)
        and cached.get("protocol") == protocol
        and cached.get("weights") == weights
        and isinstance(cached.get("accuracy"), dict)
        and set(cached["accuracy"]) == set(ACCURACY_KEYS)
    ):
        return cached["accuracy"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl_anchor.models.policy import evaluate, policy_splits

    splits = policy_splits(rl_problems=protocol["train_problems"])
    heldout = splits.heldout[: protocol["heldout"]]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    accuracy = {
        "greedy": evaluate(model, tokenizer, heldout, temperature=0.0),
        "mean_at_k": evaluate(model, tokenizer, heldout, temperature=1.0, samples=protocol["samples"], seed=1234),
        "train_mean_at_16": evaluate(model, tokenizer, splits.rl, temperature=1.0, samples=16, seed=1234),
    }
    partial = path.with_name(f".{path.name}.partial")  # renamed into place: a killed write leaves no cut-short cache
    partial.write_text(json.dumps({"protocol": protocol, "weights": weights, "accuracy": accuracy}) + "\n")
    os.replace(partial, path)
    return accuracy


def _run_one(
    run_dir: Path, estimator: str, seed: int, policy: Path, training: dict, protocol: dict, console: Console
) -> dict:
    """Train one run (unless its checkpoints for `training` are there) and evaluate them: {step: accuracy}."""
    from verl_anchor.integration.cpu.launch import parse_step_metrics, run_main_ppo

    trained = run_dir / "training.json"
    if _read_json(trained) == training:
        console.print("  trained already; checkpoints in " + str(run_dir / "checkpoints"))
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        make_dir(run_dir)
        overrides = run_overrides(run_dir, estimator, seed, policy, training)
        log_path = run_dir / "main_ppo.log"
        with console.status(f"  {estimator} seed {seed}: starting verl") as status:

            def on_line(line: str) -> None:
                for step, metrics in parse_step_metrics(line).items():
                    status.update(
                        f"  {estimator} seed {seed}: step {step}/{training['steps']}, "
                        f"reward {metrics.get('critic/score/mean', math.nan):.3f}"
                    )

            rc = run_main_ppo(overrides, run_dir, log_path, timeout=3600, on_line=on_line)
        if rc != 0:
            console.print("\n".join(log_path.read_text(errors="replace").splitlines()[-20:]), markup=False)
            raise CompareError(f"verl exited with code {rc} in run {run_dir.name}; its log: {log_path}")
        trained.write_text(json.dumps(training) + "\n")
    evals = {}
    for step in range(training["eval_every"], training["steps"] + 1, training["eval_every"]):
        model_dir = run_dir / "checkpoints" / f"global_step_{step}" / "actor" / "huggingface"
        if not (model_dir / "config.json").is_file():
            raise CompareError(
                f"run {run_dir.name} has no checkpoint of step {step} in {model_dir}; delete "
                f"{trained} to train it again"
            )
        with console.status(f"  evaluating step {step}"):
            evals[step] = _evaluate_cached(run_dir / f"eval_step{step}.json", model_dir, protocol)
        console.print(
            f"  step {step}: held-out greedy {evals[step]['greedy']:.3f}, mean@{protocol['samples']} "
            f"{evals[step]['mean_at_k']:.3f}; training prompts mean@16 {evals[step]['train_mean_at_16']:.3f}"
        )
    return evals


def run_overrides(
    run_dir: Path, estimator: str, seed: int, policy: Path, training: dict, build: bool = True
) -> list[str]:
    """The main_ppo overrides of one (estimator, seed) run; `build=False` writes nothing (to check them first)."""
    from verl_anchor.commands.demo import POLICY_RUN, demo_overrides

    return demo_overrides(
        run_dir,
        training["steps"],
        estimator,
        model=policy,
        seed=seed,
        rl_problems=training["train_problems"],
        build=build,
        **POLICY_RUN,
        user_overrides=[
            f"actor_rollout_ref.rollout.seed={seed}",
            f"trainer.save_freq={training['eval_every']}",
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,hf_model]",
            *training["overrides"],
        ],
    )


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["estimator", "seed", "step", *ACCURACY_KEYS])
        writer.writeheader()
        writer.writerows(rows)


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n); NaN for n < 2)."""
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def _metrics(samples: int) -> tuple[tuple[str, str], ...]:
    return (
        ("greedy", "held-out greedy accuracy"),
        ("mean_at_k", f"held-out mean@{samples} accuracy (T = 1.0)"),
        ("train_mean_at_16", "training prompts mean@16 accuracy (T = 1.0)"),
    )


def summary_table(rows: list[dict], estimators: list[str], samples: int) -> str:
    """Markdown table of the final step: mean +- SE over seeds per estimator, the difference to the first
    estimator with its SE, and the minimum detectable difference (two-sided 5%, 80% power:
    (1.96 + 0.84) x the SE of the difference)."""
    final = max(row["step"] for row in rows)
    lines = [f"| metric (step {final}) | " + " | ".join(estimators) + " |", "|---" * (len(estimators) + 1) + "|"]
    for metric, label in _metrics(samples):
        per = {e: [r[metric] for r in rows if r["estimator"] == e and r["step"] == final] for e in estimators}
        stats = {e: mean_and_se(v) for e, v in per.items()}
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{100 * m:.1f} +- {100 * se:.1f}" if not math.isnan(se) else f"{100 * m:.1f} (SE n/a, 1 seed)"
                for m, se in stats.values()
            )
            + " |"
        )
        base_mean, base_se = stats[estimators[0]]
        cells = ["-"]
        for e in estimators[1:]:
            mean, se = stats[e]
            diff_se = math.sqrt(se**2 + base_se**2)
            spread = (
                "SE n/a, 1 seed"
                if math.isnan(diff_se)
                else f"SE {100 * diff_se:.1f}, MDE {100 * (Z_ALPHA + Z_POWER) * diff_se:.1f}"
            )
            cells.append(f"{100 * (mean - base_mean):+.1f} ({spread})")
        lines.append(f"| {label}: difference to {estimators[0]} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    start = [r for r in rows if r["step"] == 0][:1]
    if start:
        lines.append(
            f"\nStep 0 (the SFT policy, shared): held-out greedy {100 * start[0]['greedy']:.1f}, "
            f"mean@{samples} {100 * start[0]['mean_at_k']:.1f}; training prompts mean@16 "
            f"{100 * start[0]['train_mean_at_16']:.1f}. Seeds: {seeds}; accuracy in %, "
            "mean +- standard error over seeds; MDE = smallest difference detectable at 5% (two-sided) "
            "with 80% power given that spread."
        )
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], estimators: list[str], samples: int, path: Path) -> None:
    """Accuracy vs step, one line per estimator (mean over seeds, band = +- one standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(samples)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), sharex=True)
    for axis, (metric, title) in zip(axes, metrics):
        for estimator in estimators:
            steps = sorted({r["step"] for r in rows if r["estimator"] == estimator})
            stats = [
                mean_and_se([r[metric] for r in rows if r["estimator"] == estimator and r["step"] == s]) for s in steps
            ]
            means = [100 * m for m, _ in stats]
            spread = [100 * (se if not math.isnan(se) else 0.0) for _, se in stats]
            axis.plot(steps, means, marker="o", label=estimator)
            axis.fill_between(
                steps, [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)], alpha=0.2
            )
        axis.set_title(title.replace(" accuracy", ""))
        axis.set_xlabel("training step")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
