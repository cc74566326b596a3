"""A small Countdown policy that can already do a little, built on CPU with no download.

The demo, `verl-anchor compare` and the analysis demos need a policy whose rewards vary: a random
model earns 0 on Countdown, so every GRPO advantage is 0 and nothing learns. The policy is trained by
supervised fine-tuning (SFT); the default recipe's is shipped in the package (`SHIPPED_POLICY`, the same
weights on every machine: training is deterministic on one machine, not across machines), and
`ensure_policy` returns it, training only another recipe (cached by the recipe's digest).
`verl-anchor policy --train --out DIR` reruns the training that produced the shipped weights.

* **Task.** Countdown with 3 numbers in 1..20 and targets up to 99 (every number and target one
  token of the tiny tokenizer), the short prompt (`data.countdown.countdown_prompt(style="short")`,
  ~48 tokens with the chat template: the long TinyZero prompt is ~114, which a model this small
  reads much more slowly), and a worked solution in the recipes' answer format, one step per
  operation of the generator's witness:
  `<think> 3 * 7 = 21, 21 + 5 = 26 </think> <answer> (3 * 7) + 5 </answer>` (~31 tokens, so the
  FAI horizon [10, 100] has keys to read).
* **Model.** The tiny tokenizer and a Qwen3-architecture decoder of 6 layers, 4 query / 2 KV heads
  of dim 32, hidden 128 (1.44M parameters): the middle third of 6 layers gives the statistics 3
  layers x 4 heads = 12 heads, so the local and global groups (30% each) are 3 heads apiece out of
  a spread of spans, not 1 of 4 as in the 2-layer test model.
* **Training.** A plain torch loop (AdamW, linear warm-up, cosine decay, loss on the response
  tokens only) rather than `transformers.Trainer`: a few hundred steps on one process, no
  accelerate/datasets machinery to configure, and bit-for-bit deterministic for a seed on a given
  machine (fixed batch order from a seeded generator, fixed thread count). Progress is a tqdm bar.

The policy's held-out accuracy (greedy and sampled at temperature 1.0, `heldout_accuracy`) is written
beside the weights in `policy.json` (`verl-anchor policy --evaluate` measures it again).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from verl_anchor.data.countdown import CountdownProblem, countdown_prompt, generate_countdown
from verl_anchor.rewards.countdown import score_countdown
from verl_anchor.usage import UsageError

# Bump when anything the recipe does not capture changes (the worked-solution format, the loop).
_POLICY_VERSION = 1
MAX_NEW_TOKENS = 48  # the demo's max_response_length; a worked solution is ~31 tokens
# The default recipe's policy, trained once and shipped in the package: training is deterministic on one
# machine but not across machines (11.7% vs 23.0% sampled held-out accuracy on two of them).
SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "assets" / "countdown-policy"
RETRAIN_COMMAND = f"verl-anchor policy --train --out DIR, then replace {SHIPPED_POLICY} with DIR"


@dataclasses.dataclass(frozen=True)
class PolicyRecipe:
    """Everything that decides the policy's weights (its digest names the cache entry)."""

    seed: int = 0
    numbers: int = 3
    max_number: int = 20
    max_target: int = 99
    sft_problems: int = 5000
    heldout_problems: int = 256
    layers: int = 6
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 384
    steps: int = 700
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 25
    threads: int = 2

    def digest(self) -> str:
        from verl_anchor.models import tiny

        text = json.dumps(
            {**dataclasses.asdict(self), "version": _POLICY_VERSION, "tiny": tiny._ASSET_VERSION}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEFAULT_RECIPE = PolicyRecipe()


@dataclasses.dataclass(frozen=True)
class PolicySplits:
    """The policy's problems: SFT training, then RL training prompts (never seen in SFT), and held-out."""

    sft: list[CountdownProblem]
    rl: list[CountdownProblem]
    heldout: list[CountdownProblem]


def policy_splits(recipe: PolicyRecipe = DEFAULT_RECIPE, rl_problems: int = 0) -> PolicySplits:
    """Disjoint, reproducible splits: the held-out set does not depend on the other sizes, and the RL
    prompts are the generator's train stream after the SFT problems."""
    train, heldout = generate_countdown(
        recipe.sft_problems + rl_problems,
        recipe.heldout_problems,
        seed=recipe.seed,
        min_numbers=recipe.numbers,
        max_numbers=recipe.numbers,
        max_target=recipe.max_target,
        max_number=recipe.max_number,
    )
    return PolicySplits(sft=train[: recipe.sft_problems], rl=train[recipe.sft_problems :], heldout=heldout)


def worked_solution(problem: CountdownProblem) -> str:
    """One `a op b = value` step per operation of the witness (innermost first), then the answer."""
    steps: list[str] = []

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        assert isinstance(node, ast.BinOp), ast.dump(node)
        left, right = value(node.left), value(node.right)
        symbol, result = {
            ast.Add: ("+", left + right),
            ast.Sub: ("-", left - right),
            ast.Mult: ("*", left * right),
            ast.Div: ("/", left // right),
        }[type(node.op)]
        steps.append(f"{left} {symbol} {right} = {result}")
        return result

    if value(ast.parse(problem.witness, mode="eval").body) != problem.target:
        raise AssertionError(f"witness {problem.witness!r} does not reach {problem.target}")
    return f"<think> {', '.join(steps)} </think> <answer> {problem.witness} </answer>"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: CountdownProblem) -> list[int]:
    """The prompt as verl's dataset renders it (chat template, generation prompt)."""
    messages = countdown_prompt(problem.numbers, problem.target, style="short")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _examples(tokenizer: PreTrainedTokenizerBase, problems: Sequence[CountdownProblem]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of prompt + worked solution + eos."""
    out = []
    for problem in problems:
        prompt = prompt_ids(tokenizer, problem)
        response = tokenizer(worked_solution(problem), add_special_tokens=False)["input_ids"]
        out.append((prompt + response + [tokenizer.eos_token_id], len(prompt)))
    return out


def _batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def train_policy(out_dir: str | os.PathLike, recipe: PolicyRecipe = DEFAULT_RECIPE, progress: bool = True) -> dict:
    """Build and SFT the policy into `out_dir` (model, tokenizer, generation config, `policy.json`)."""
    from transformers import get_cosine_schedule_with_warmup

    from verl_anchor.models.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    splits = policy_splits(recipe)
    examples = _examples(tokenizer, splits.sft)
    config = tiny_config(
        "qwen3",
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=512,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
            order = torch.Generator().manual_seed(recipe.seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
            schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
            model.train()
            bar = tqdm(range(recipe.steps), desc="SFT of the Countdown policy", unit="step", disable=not progress)
            loss_ema = math.nan
            for _ in bar:
                picked = torch.randint(len(examples), (recipe.batch_size,), generator=order).tolist()
                input_ids, labels, mask = _batch([examples[i] for i in picked], tokenizer.pad_token_id)
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
                bar.set_postfix(loss=f"{loss_ema:.3f}")
            model.eval()
            model.generation_config = GenerationConfig(
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
            )
            accuracy = heldout_accuracy(model, tokenizer, recipe)
    finally:
        torch.set_num_threads(threads)
    info = {
        "recipe": dataclasses.asdict(recipe),
        "digest": recipe.digest(),
        "final_loss_ema": loss_ema,
        "heldout_accuracy": accuracy,
        "heldout_problems": len(splits.heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    Path(out_dir, "policy.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def heldout_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, recipe: PolicyRecipe = DEFAULT_RECIPE
) -> dict[str, float]:
    """The accuracy `policy.json` records: the recipe's held-out problems, greedy and sampled at T = 1.0."""
    heldout = policy_splits(recipe).heldout
    return {
        "greedy": evaluate(model, tokenizer, heldout, temperature=0.0),
        "sampled_t1": evaluate(model, tokenizer, heldout, temperature=1.0, seed=recipe.seed),
    }


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[CountdownProblem],
    temperature: float = 1.0,
    samples: int = 1,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Share of (problem, sample) pairs scored 1.0 by the Countdown reward; greedy when `temperature` is 0.

    Sampling is plain (no top-k/top-p), as the recipes' rollouts at temperature 1.0.
    """
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    prompts = [prompt_ids(tokenizer, p) for p in problems for _ in range(samples if temperature > 0 else 1)]
    truths = [
        {"target": p.target, "numbers": list(p.numbers)}
        for p in problems
        for _ in range(samples if temperature > 0 else 1)
    ]
    solved = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            sampling = (
                dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                if temperature > 0
                else dict(do_sample=False)
            )
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            for row, truth in zip(out[:, width:], truths[start : start + batch_size]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                solved += score_countdown(text, truth) == 1.0
    return solved / len(prompts)


def default_cache_dir() -> Path:
    """`$VERL_ANCHOR_CACHE`, else `$XDG_CACHE_HOME/verl_anchor` (`~/.cache/verl_anchor`): shared by runs."""
    if os.environ.get("VERL_ANCHOR_CACHE"):
        return Path(os.environ["VERL_ANCHOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "verl_anchor"


class PolicyError(UsageError):
    """The shipped policy is damaged or no longer matches `DEFAULT_RECIPE`: one `error:` line saying what to do."""


def policy_dir(cache_dir: str | os.PathLike | None = None, recipe: PolicyRecipe = DEFAULT_RECIPE) -> Path:
    """Where `ensure_policy` finds the policy of `recipe`: `SHIPPED_POLICY` for `DEFAULT_RECIPE`, else
    `countdown-policy-<digest>` in `cache_dir` (default `default_cache_dir()`)."""
    if recipe == DEFAULT_RECIPE:
        return SHIPPED_POLICY
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"countdown-policy-{recipe.digest()}"


def shipped_policy() -> Path:
    """`SHIPPED_POLICY`, verified: every file matches its sha256 in `SHA256SUMS` and `policy.json` was trained
    with `DEFAULT_RECIPE` (its digest); `PolicyError` otherwise."""
    from verl_anchor.models.tiny import asset_problem

    problem = asset_problem(SHIPPED_POLICY)
    if problem is None:
        digest = json.loads((SHIPPED_POLICY / "policy.json").read_text()).get("digest")
        if digest != DEFAULT_RECIPE.digest():
            problem = f"it was trained with recipe digest {digest}, DEFAULT_RECIPE is {DEFAULT_RECIPE.digest()}"
    if problem is not None:
        raise PolicyError(
            f"the shipped policy {SHIPPED_POLICY} cannot be used: {problem}; reinstall verl-anchor, "
            f"or (after changing the recipe) retrain it: {RETRAIN_COMMAND}"
        )
    return SHIPPED_POLICY


def ensure_policy(
    cache_dir: str | os.PathLike | None = None, recipe: PolicyRecipe = DEFAULT_RECIPE, progress: bool = True
) -> Path:
    """The trained policy's directory: the shipped one for `DEFAULT_RECIPE` (`shipped_policy`), the same on
    every machine; any other recipe is trained on first use (about 3 minutes on 2 cores).

    Trained policies are cached under `cache_dir` (default `default_cache_dir()`) by the recipe's digest and
    built with `tiny.build_once`: atomically, checked against their `SHA256SUMS` on every use, rebuilt
    when incomplete; `tiny.CacheError` when the cache directory cannot be used.
    """
    from verl_anchor.models.tiny import build_once

    if recipe == DEFAULT_RECIPE:
        return shipped_policy()
    return build_once(policy_dir(cache_dir, recipe), lambda tmp: train_policy(tmp, recipe, progress))
