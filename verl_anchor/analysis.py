"""`verl-anchor analyze`: per-token WAAD / FAI / entropy of a model's own responses, as a report.

For each prompt: chat-template it, sample a response (or take the given one), run ONE forward
of prompt + response under `AttentionCapture` in analysis mode (FAI horizon from offset 0 to
the end of the response), and read the group-averaged WAAD (local heads) and FAI (global
heads), the token entropy from the same forward's logits, and the preplan (top WAAD jumps)
and anchor (top FAI) tokens. Writes `report.html`, `metrics.json`, `tokens.csv` and one
`curves_{i}.png` per prompt. Memory is linear in the sequence length (no N x N matrix).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from verl_anchor.config import AnchorConfig

RATIO = 0.4

DEMO_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn? Let's think step by step.",
    "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs. "
    "How much more money does Betty need? Let's think step by step.",
]


def analysis_config() -> AnchorConfig:
    """Analysis mode: FAI over every later query of the response (no horizon cut)."""
    return AnchorConfig(fai_h_lo=0, fai_h_hi=None)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hugging Face model id or local path (e.g. Qwen/Qwen3-4B-Base)")
    source.add_argument("--demo", action="store_true", help="use the tiny offline random model (no downloads)")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="jsonl with a `prompt` field per line (optional `response`: then no generation)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    parser.add_argument("--seed", type=int, default=0)


def load_prompts(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return [{"prompt": p} for p in DEMO_PROMPTS]
    items = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: each line must be a JSON object with a string `prompt`")
        items.append(item)
    if not items:
        raise ValueError(f"{path} has no prompts")
    return items


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, model name) for `--demo` or `--model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.demo:
        from verl_anchor.tiny import ensure_tiny_model

        path = str(ensure_tiny_model(Path(args.out) / "cache"))
    else:
        path = args.model
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        model = model.to("cuda")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path), path


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: torch.nn.Module, tokenizer: Any, ids: list[int], max_new_tokens: int, temperature: float,
             seed: int) -> list[int]:
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, **sampling)
    response = out[0, len(ids):].tolist()
    eos = tokenizer.eos_token_id
    if eos is not None and eos in response:  # keep the eos, drop any padding after it
        response = response[: response.index(eos) + 1]
    return response


def analyze_one(model: torch.nn.Module, capture: Any, ids: list[int], response: list[int],
                cfg: AnchorConfig) -> dict[str, Any]:
    """One forward of prompt + response: group signals, head spans, entropy and marks."""
    from verl_anchor.credit import select_tokens, waad_jumps
    from verl_anchor.metrics import group_heads, group_signals

    device = next(model.parameters()).device
    full = torch.tensor([ids + response], device=device)
    prompt_len, n = len(ids), len(response)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits[0]
    (stats,) = capture.pop()
    head = stats.response(prompt_len)
    if n:
        logp = torch.log_softmax(logits[prompt_len - 1 : prompt_len - 1 + n].float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1)
        signals = group_signals(head, cfg)
        loc, glob = group_heads(head.span, cfg)
        waad, fai = signals.waad.float().cpu(), signals.fai.float().cpu()
        preplan = select_tokens(waad_jumps(waad), RATIO)
        anchor = select_tokens(fai, RATIO)
        span_loc, span_glob = signals.span_loc, signals.span_glob
    else:
        entropy = waad = fai = torch.zeros(0)
        preplan = anchor = torch.zeros(0, dtype=torch.bool)
        loc = glob = torch.zeros(0, dtype=torch.long)
        span_loc = span_glob = math.nan
    return {
        "prompt_len": prompt_len,
        "waad": _floats(waad),
        "fai": _floats(fai),
        "entropy": _floats(entropy),
        "head_span": _floats(head.span),
        "local_heads": loc.tolist(),
        "global_heads": glob.tolist(),
        "span_loc": _float(span_loc),
        "span_glob": _float(span_glob),
        "preplan": preplan.nonzero().flatten().tolist(),
        "anchor": anchor.nonzero().flatten().tolist(),
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from verl_anchor.capture import AttentionCapture, CaptureError

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        items = load_prompts(args.prompts)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model, tokenizer, name = load_model(args)
    cfg = analysis_config()
    try:
        capture = AttentionCapture(model, cfg)
    except CaptureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = []
    for i, item in enumerate(tqdm(items, desc="analyze", unit="prompt", disable=None)):
        ids = prompt_ids(tokenizer, item["prompt"])
        if isinstance(item.get("response"), str):
            response = list(tokenizer(item["response"], add_special_tokens=False)["input_ids"])
            generated = False
        else:
            response = generate(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.seed + i)
            generated = True
        try:
            with capture:
                metrics = analyze_one(model, capture, ids, response, cfg)
        except CaptureError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        results.append({
            "index": i,
            "prompt": item["prompt"],
            "response": tokenizer.decode(response),
            "generated": generated,
            "token_ids": response,
            "tokens": [tokenizer.decode([t]) for t in response],
            **metrics,
        })
        plot_curves(results[-1], out / f"curves_{i}.png")
    payload = {
        "model": name,
        "layers": capture.layers,
        "config": cfg.to_dict(),
        "ratio": RATIO,
        "seed": args.seed,
        "temperature": args.temperature,
        "prompts": results,
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    write_csv(results, out / "tokens.csv")
    (out / "report.html").write_text(render_html(payload, out), encoding="utf-8")
    print(f"wrote {out / 'report.html'}, metrics.json, tokens.csv and {len(results)} curves_*.png")
    return 0


# -- outputs -------------------------------------------------------------------------------

def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "position", "token_id", "token", "waad", "fai", "entropy", "preplan", "anchor"])
        for r in results:
            pre, anc = set(r["preplan"]), set(r["anchor"])
            for j, (tid, tok) in enumerate(zip(r["token_ids"], r["tokens"])):
                writer.writerow([r["index"], j, tid, tok, r["waad"][j], _csv(r["fai"][j]), r["entropy"][j],
                                 int(j in pre), int(j in anc)])


def plot_curves(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 6), sharex=True)
    x = list(range(len(result["tokens"])))
    series = [("WAAD (local heads)", result["waad"], "tab:blue", result["preplan"]),
              ("FAI (global heads)", result["fai"], "tab:red", result["anchor"]),
              ("entropy (nats)", result["entropy"], "tab:green", [])]
    for ax, (label, values, colour, marks) in zip(axes, series):
        ys = [math.nan if v is None else v for v in values]
        ax.plot(x, ys, color=colour, lw=1)
        if marks:
            ax.scatter(marks, [ys[j] for j in marks], color=colour, s=12, zorder=3)
        ax.set_ylabel(label, fontsize=8)
    axes[0].set_title(f"prompt {result['index']}: dots = preplan (WAAD) / anchor (FAI) tokens", fontsize=9)
    axes[-1].set_xlabel("response token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
.resp{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ccc;padding:.6em}
.tok{border-radius:2px}
.preplan{border-bottom:3px solid #1f5fbf}
.anchor{outline:2px solid #c0392b}
.prompt{color:#444;white-space:pre-wrap}
.key{font-size:.85em;color:#333}
.swatch-preplan{border-bottom:3px solid #1f5fbf}
.swatch-anchor{outline:2px solid #c0392b}
"""

_JS = """
function colour(metric){
  var spans=document.querySelectorAll('.tok');
  var lo=Infinity,hi=-Infinity;
  spans.forEach(function(s){var v=parseFloat(s.dataset[metric]);if(!isNaN(v)){lo=Math.min(lo,v);hi=Math.max(hi,v);}});
  spans.forEach(function(s){var v=parseFloat(s.dataset[metric]);
    if(isNaN(v)){s.style.background='#eee';return;}
    var f=hi>lo?(v-lo)/(hi-lo):0;s.style.background='rgba(255,140,0,'+(0.05+0.85*f).toFixed(3)+')';});
}
document.querySelectorAll('input[name=metric]').forEach(function(r){r.addEventListener('change',function(){colour(r.value);});});
colour('waad');
"""


def render_html(payload: dict[str, Any], out: Path | None = None) -> str:
    """The self-contained report (curves embedded as base64 PNGs when `out` holds them)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>verl-anchor analyze</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Attention analysis</h1>",
        f"<p>model: <code>{esc(str(payload['model']))}</code>, layers {esc(str(payload['layers']))}; "
        "WAAD averaged over the local (shortest-span) heads, FAI over the global (longest-span) heads; "
        f"marks = top {payload['ratio']:.0%} of WAAD jumps / FAI.</p>",
        "<p>colour by: <label><input type='radio' name='metric' value='waad' checked> WAAD</label> "
        "<label><input type='radio' name='metric' value='fai'> FAI</label> "
        "<label><input type='radio' name='metric' value='ent'> entropy</label></p>",
        "<p class='key'><span class='swatch-preplan'>underlined</span> = preplan token, "
        "<span class='swatch-anchor'>boxed</span> = anchor token; hover a token for its numbers.</p>",
    ]
    for r in payload["prompts"]:
        pre, anc = set(r["preplan"]), set(r["anchor"])
        parts.append(f"<section><h2>Prompt {r['index']}</h2><div class='prompt'>{esc(r['prompt'])}</div>")
        parts.append(f"<p class='key'>{len(r['tokens'])} response tokens ({'generated' if r['generated'] else 'given'}); "
                     f"mean span local {_fmt(r['span_loc'])}, global {_fmt(r['span_glob'])}; "
                     f"local heads {r['local_heads']}, global heads {r['global_heads']}</p><div class='resp'>")
        for j, tok in enumerate(r["tokens"]):
            classes = "tok" + (" preplan" if j in pre else "") + (" anchor" if j in anc else "")
            w, f, e = r["waad"][j], r["fai"][j], r["entropy"][j]
            title = f"#{j} id={r['token_ids'][j]} WAAD={_fmt(w)} FAI={_fmt(f)} entropy={_fmt(e)}"
            title += (" preplan" if j in pre else "") + (" anchor" if j in anc else "")
            parts.append(f'<span class="{classes}" data-waad="{_fmt(w)}" data-fai="{_fmt(f)}" '
                         f'data-ent="{_fmt(e)}" title="{esc(title)}">{esc(tok)}</span>')
        png = None if out is None else Path(out) / f"curves_{r['index']}.png"
        img = ""
        if png is not None and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            img = f"<p><img alt='WAAD, FAI and entropy curves' src='data:image/png;base64,{data}' style='max-width:100%'></p>"
        parts.append(f"</div>{img}</section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def _float(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _floats(t: torch.Tensor) -> list[float | None]:
    return [_float(v) for v in t.detach().float().cpu().tolist()]


def _fmt(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _csv(v: float | None) -> str | float:
    return "" if v is None else v
