"""What the analysis commands share: model and prompts, generation, one captured forward per response.

`Session(args)` loads the model (`--model PATH`, or the trained Countdown policy with `--demo`), its tokenizer
and the prompts, and wraps the model in one `AttentionCapture` in *analysis mode* (FAI horizon
from offset 0 to the end of the response). `Session.analyses()` then yields, per prompt, a
`ResponseAnalysis`: the response (sampled with `generate`, or given in the prompts file) and every
signal read from ONE forward of prompt + response. Memory is linear in the sequence length: no
`N x N` matrix is built (the optional attention maps are pooled in chunks).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from verl_anchor.capture.hooks import AttentionCapture, CaptureError
from verl_anchor.core.config import MAX_LAYERS, AnchorConfig
from verl_anchor.core.credit import select_tokens, waad_jumps
from verl_anchor.core.metrics import GroupSignals, HeadStats, group_heads, response_signals
from verl_anchor.usage import (
    UsageError,
    bounded_int,
    in_path,
    layer_list,
    make_dir,
    model_ref,
    out_dir,
    seed,
    temperature,
)

RATIO = 0.4  # share of tokens marked preplan / anchor, as `select_tokens` does in training

# Responses longer than this exceed every current model's context (the paper's longest runs: 8k tokens).
MAX_NEW_TOKENS = 2**20
DEMO_PROBLEMS = 6  # `--demo` analyses the first held-out Countdown problems of the trained demo policy
DEFAULT_NUM_LAYERS = AnchorConfig.num_layers  # training's default, the paper's


def demo_prompts() -> list[str]:
    """`--demo`'s prompts: the demo policy's first held-out Countdown problems, in its short prompt."""
    from verl_anchor.data.countdown import countdown_prompt
    from verl_anchor.models.policy import policy_splits

    return [
        countdown_prompt(p.numbers, p.target, "short")[0]["content"] for p in policy_splits().heldout[:DEMO_PROBLEMS]
    ]


class AnalysisError(UsageError):
    """Bad input to an analysis command (the message names it and what to do)."""


def add_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """The options every analysis command takes."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=model_ref, help="Hugging Face model id or local path (e.g. Qwen/Qwen3-4B-Base)")
    source.add_argument(
        "--demo",
        action="store_true",
        help="the small Countdown policy of `verl-anchor demo` (trained on first use, no downloads) "
        "on its held-out problems",
    )
    parser.add_argument(
        "--prompts",
        type=in_path,
        default=None,
        help="jsonl with a `prompt` field per line (optional `response`: then no generation), or "
        "a verl parquet such as `verl-anchor data gsm8k` writes; "
        "default: the demo policy's first six held-out Countdown problems (short prompt)",
    )
    parser.add_argument("--limit", type=bounded_int(1), default=None, help="use only the first LIMIT prompts")
    parser.add_argument("--out", type=out_dir, required=True, help="output directory")
    parser.add_argument(
        "--max-new-tokens",
        type=bounded_int(1, MAX_NEW_TOKENS, "longer than any model's context"),
        default=max_new_tokens,
        help=f"response length limit (at most {MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--temperature", type=temperature, default=0.7, help="sampling temperature: 0 = greedy, else 0.01 to 100"
    )
    parser.add_argument("--seed", type=seed, default=0, help="prompt i is sampled with seed + i")
    parser.add_argument(
        "--num-layers",
        type=bounded_int(1, MAX_LAYERS, "no model has more layers"),
        default=None,
        help=f"layers captured: this many evenly spaced over the middle third (default "
        f"{DEFAULT_NUM_LAYERS}, or all of the middle third when it has fewer; more than it has "
        "is refused)",
    )
    parser.add_argument(
        "--layers",
        type=layer_list,
        default=None,
        help="capture exactly these layers instead, comma-separated 0-based indices (e.g. 3,7; "
        "for hybrid models, whose refusal lists the layers that can be captured)",
    )


def user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command's `run(args)`: a model the capture cannot handle is bad input to these commands
    (an `AnalysisError`, which the CLI reports as one `error:` line with exit code 2)."""

    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except CaptureError as err:
            raise AnalysisError(str(err)) from err

    return guarded


def check_options(checks: list[tuple[str, Any, bool, str]]) -> None:
    """Raise `AnalysisError` for the first `(option, value, ok, allowed)` that is not ok."""
    for option, value, ok, allowed in checks:
        if not ok:
            raise AnalysisError(f"--{option}={value} is invalid: use {allowed}")


def make_out(args: argparse.Namespace) -> Path:
    """The `--out` directory, created; `AnalysisError` naming it when it cannot be."""
    return make_dir(Path(args.out), AnalysisError)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """A rich table of labels and numbers (floats to 3 decimals, None as n/a)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*("n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    Console().print(table)


def load_prompts(path: Path | None, limit: int | None = None) -> list[dict[str, Any]]:
    """Prompt items (`prompt`, optional `response`) from `path`, or the demo problems; at most `limit`."""
    if limit is not None and limit < 1:
        raise AnalysisError(f"--limit={limit} is invalid: use an integer >= 1")
    if path is None:
        items = [{"prompt": p} for p in demo_prompts()]
    elif Path(path).suffix == ".parquet":
        items = _parquet_prompts(Path(path))
    else:
        items = _jsonl_prompts(Path(path))
    if not items:
        raise AnalysisError(f"{path} has no prompts")
    return items[:limit]


def _jsonl_prompts(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise AnalysisError(f"cannot read --prompts {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise AnalysisError(f"cannot read --prompts {path}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnalysisError(f"{path}:{lineno}: not JSON ({err.msg})") from err
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise AnalysisError(f"{path}:{lineno}: each line must be a JSON object with a string `prompt`")
        if item.get("response") is not None and not isinstance(item["response"], str):
            raise AnalysisError(
                f"{path}:{lineno}: `response` is {type(item['response']).__name__}, expected a string "
                "(the response to analyze) or no `response` field (then one is generated)"
            )
        items.append(item)
    return items


def _parquet_prompts(path: Path) -> list[dict[str, Any]]:
    """verl's data schema: `prompt` is a list of chat messages; the user messages make the prompt."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path, columns=["prompt"]).column("prompt").to_pylist()
    except (OSError, KeyError, ValueError) as err:
        raise AnalysisError(f"cannot read the `prompt` column of --prompts {path}: {err}") from err
    items = []
    for index, messages in enumerate(rows):
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content") or "", str) for m in messages
        ):
            raise AnalysisError(
                f"{path}: row {index}: `prompt` is {type(messages).__name__}, expected a list of "
                "chat messages with text content (verl's schema, as `verl-anchor data` writes)"
            )
        text = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "user")
        if not text:
            raise AnalysisError(f"{path}: row {index} has no user message in `prompt`")
        items.append({"prompt": text})
    return items


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, model name) for `--demo` or `--model`; bfloat16 on a GPU, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.demo:
        from verl_anchor.models.policy import ensure_policy

        path = str(ensure_policy())
    else:
        path = args.model
    cuda = torch.cuda.is_available()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # transformers' ways of saying "not a (loadable) model"
        raise AnalysisError(f"cannot load --model {path}: {err}") from err
    if cuda:
        model = model.to("cuda")
    model.eval()
    return model, tokenizer, path


@dataclasses.dataclass
class ResponseAnalysis:
    """One response and the signals of its captured forward. Tensors are on the CPU, float32."""

    index: int
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    tokens: list[str]  # each token decoded on its own
    generated: bool
    head: HeadStats  # per captured head ((layer, head) order) over the response tokens
    entropy: torch.Tensor  # (n,) nats, of the distribution that predicted each response token
    signals: GroupSignals  # WAAD over the local group, FAI over the global group
    local_heads: torch.Tensor
    global_heads: torch.Tensor
    preplan: list[int]  # positions of the top RATIO of WAAD jumps
    anchor: list[int]  # positions of the top RATIO of FAI
    candidates: torch.Tensor | None = None  # (n, c) most likely token ids at each position, when asked
    attention_map: torch.Tensor | None = None  # (H, B, B) pooled response attention, when asked

    def summary(self) -> dict[str, Any]:
        """The JSON-ready numbers (tensors as lists, NaN as None)."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "prompt_len": len(self.prompt_ids),
            "generated": self.generated,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "waad": floats(self.signals.waad),
            "fai": floats(self.signals.fai),
            "entropy": floats(self.entropy),
            "head_span": floats(self.head.span),
            "local_heads": self.local_heads.tolist(),
            "global_heads": self.global_heads.tolist(),
            "span_loc": _finite(self.signals.span_loc),
            "span_glob": _finite(self.signals.span_glob),
            "preplan": self.preplan,
            "anchor": self.anchor,
        }


class Session:
    """A model, its tokenizer, the prompts and an analysis-mode capture, as the command line asked.

    `candidates`: also keep the `candidates` most likely token ids at each response position.
    `map_bins`: also pool each response's attention per head into at most `map_bins`^2 cells.
    """

    def __init__(self, args: argparse.Namespace, candidates: int = 0, map_bins: int | None = None) -> None:
        self.args = args
        self.items = load_prompts(args.prompts, args.limit)
        num_layers = DEFAULT_NUM_LAYERS if args.num_layers is None else args.num_layers
        try:
            self.cfg = AnchorConfig(
                fai_h_lo=0, fai_h_hi=None, num_layers=num_layers, layers=getattr(args, "layers", None)
            )
        except ValueError as err:
            raise AnalysisError(f"--num-layers: {err}" if "num_layers" in str(err) else f"--layers: {err}") from err
        self.model, self.tokenizer, self.name = load_model(args)
        self.capture = AttentionCapture(self.model, self.cfg, map_bins=map_bins)
        self._check_num_layers()
        for index, item in enumerate(self.items):
            if not self.prompt_ids(item["prompt"]):
                raise AnalysisError(
                    f"prompt {index} is empty and the tokenizer of {self.name} has no chat template "
                    "to wrap it: give every prompt some text"
                )
        self.candidates = candidates
        self.device = next(self.model.parameters()).device

    def _check_num_layers(self) -> None:
        """An explicit `--num-layers` the model cannot give (the middle third has fewer distinct layers) is refused,
        not silently cut to what there is."""
        asked = self.args.num_layers
        if asked is None or self.cfg.layers is not None or asked <= len(self.capture.layers):
            return
        got = self.capture.layers
        raise AnalysisError(
            f"--num-layers {asked} is more layers than the middle third of {self.name} has: "
            f"{len(got)} ({', '.join(map(str, got))}); use --num-layers {len(got)} or fewer, "
            "or --layers to choose layers anywhere in the model"
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the model sees it: the chat template when the tokenizer has one."""
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate(
        self, prefixes: list[list[int]], max_new_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        """Continuations of equal-length `prefixes` in one batch, each cut after its end-of-sequence token."""
        if len({len(p) for p in prefixes}) != 1:
            raise ValueError("generate takes prefixes of one length (no padding)")
        inputs = torch.tensor(prefixes, device=self.device)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        with torch.no_grad():
            out = self.model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                **sampling,
            )
        continuations = []
        for row in out[:, inputs.shape[1] :].tolist():
            if eos is not None and eos in row:  # keep the eos, drop the padding after it
                row = row[: row.index(eos) + 1]
            continuations.append(row)
        return continuations

    def analyses(self, desc: str) -> Iterator[ResponseAnalysis]:
        """Per prompt, its response and signals, with a progress bar over the prompts."""
        from tqdm import tqdm

        args = self.args
        for i, item in enumerate(tqdm(self.items, desc=desc, unit="prompt", disable=None)):
            ids = self.prompt_ids(item["prompt"])
            given = item.get("response")
            if isinstance(given, str):
                response = list(self.tokenizer(given, add_special_tokens=False)["input_ids"])
            else:
                (response,) = self.generate([ids], args.max_new_tokens, args.temperature, args.seed + i)
            yield self.analyze(i, item["prompt"], ids, response, generated=not isinstance(given, str))

    def analyze(
        self, index: int, prompt: str, ids: list[int], response: list[int], generated: bool
    ) -> ResponseAnalysis:
        """One forward of prompt + response under the capture, and every signal of the response."""
        full = torch.tensor([ids + response], device=self.device)
        prompt_len, n = len(ids), len(response)
        self.capture.map_from = prompt_len
        with torch.no_grad(), self.capture:
            logits = self.model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits[0]
        (stats,) = self.capture.pop()
        head = stats.response(prompt_len)
        head = HeadStats(span=head.span.float().cpu(), waad=head.waad.float().cpu(), fai=head.fai.float().cpu())
        entropy, candidates = self._predictions(logits[prompt_len - 1 : prompt_len - 1 + n])
        signals = response_signals(stats, n, self.cfg)  # empty vectors and NaN spans for an empty response
        signals = dataclasses.replace(signals, waad=signals.waad.float().cpu(), fai=signals.fai.float().cpu())
        no_heads = torch.zeros(0, dtype=torch.long)
        local_heads, global_heads = group_heads(head.span, self.cfg) if n else (no_heads, no_heads)
        preplan = select_tokens(waad_jumps(signals.waad), RATIO).nonzero().flatten().tolist()
        anchor = select_tokens(signals.fai, RATIO).nonzero().flatten().tolist()
        pooled = None if stats.attention_map is None else stats.attention_map.float().cpu()
        return ResponseAnalysis(
            index=index,
            prompt=prompt,
            prompt_ids=ids,
            token_ids=response,
            tokens=[self.tokenizer.decode([t]) for t in response],
            generated=generated,
            head=head,
            entropy=entropy,
            signals=signals,
            local_heads=local_heads,
            global_heads=global_heads,
            preplan=preplan,
            anchor=anchor,
            candidates=candidates,
            attention_map=pooled,
        )

    def _predictions(self, logits: torch.Tensor, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entropy and top candidate ids of the distributions that predicted the response tokens.

        `logits[j]` predicts response token j. Float32 in blocks of `rows`, so a long response with a
        large vocabulary does not hold several float32 copies of all its logits at once.
        """
        entropy, candidates = [], []
        for block in logits.split(rows):
            logp = torch.log_softmax(block.float(), dim=-1)
            entropy.append(-(logp.exp() * logp).sum(dim=-1).cpu())
            if self.candidates:
                candidates.append(logp.topk(min(self.candidates, logp.shape[-1]), dim=-1).indices.cpu())
        if not entropy:  # an empty response
            return torch.zeros(0), torch.zeros(0, 0, dtype=torch.long) if self.candidates else None
        return torch.cat(entropy), torch.cat(candidates) if self.candidates else None

    def meta(self) -> dict[str, Any]:
        """What produced the results (model, layers, analysis config, sampling), for the JSON outputs."""
        return {
            "model": self.name,
            "layers": self.capture.layers,
            "config": self.cfg.to_dict(),
            "ratio": RATIO,
            "seed": self.args.seed,
            "temperature": self.args.temperature,
        }


def write_json(payload: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")


def floats(t: torch.Tensor) -> list[float | None]:
    return [_finite(v) for v in t.detach().float().cpu().tolist()]


def _finite(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v
