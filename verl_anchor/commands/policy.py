"""`verl-anchor policy`: the shipped Countdown policy's path and recorded accuracy; `--evaluate` measures it
again; `--train --out DIR` reruns the training that produced it (`models.policy`)."""

from __future__ import annotations

import argparse
import json

from verl_anchor.models import policy
from verl_anchor.usage import UsageError, out_dir


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="measure the shipped policy's held-out accuracy again (about a minute on 2 cores)",
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="train the default recipe into --out (about 3 minutes on 2 cores): the command that "
        "produced the shipped policy",
    )
    parser.add_argument("--out", type=out_dir, help="a new or empty directory for --train")


def run(args: argparse.Namespace) -> int:
    from verl_anchor.models.tiny import build_once

    if args.train != (args.out is not None):
        raise UsageError("--train and --out go together: verl-anchor policy --train --out DIR")
    if args.train and args.evaluate:
        raise UsageError("--evaluate measures the shipped policy; --train evaluates what it trains: give one")
    if args.train:
        out = args.out.resolve()
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--out {args.out} is not empty: give a new or empty directory")
        if out.is_dir():
            out.rmdir()  # build_once renames the finished policy into place
        info = json.loads(
            (build_once(out, lambda tmp: policy.train_policy(tmp, policy.DEFAULT_RECIPE)) / "policy.json").read_text()
        )
        print(
            f"trained {out}: {_accuracy_line(info['heldout_accuracy'])}; "
            f"ship it by replacing {policy.SHIPPED_POLICY} with it"
        )
        return 0
    path = policy.shipped_policy()
    info = json.loads((path / "policy.json").read_text())
    print(f"shipped policy {path} (recipe digest {info['digest']}, {info['parameters'] / 1e6:.2f}M parameters)")
    print(f"recorded: {_accuracy_line(info['heldout_accuracy'])}")
    if args.evaluate:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        print(f"measured: {_accuracy_line(policy.heldout_accuracy(model, AutoTokenizer.from_pretrained(str(path))))}")
    return 0


def _accuracy_line(accuracy: dict[str, float]) -> str:
    return (
        f"held-out accuracy {accuracy['sampled_t1']:.1%} sampled at temperature 1, {accuracy['greedy']:.1%} "
        f"greedy ({policy.DEFAULT_RECIPE.heldout_problems} problems)"
    )
