"""What `verl-anchor analyze` computes (`commands.analyze`):
per-token WAAD / FAI / entropy of a model's own responses, as a report.

For each prompt (see `common.Session`): one captured forward of prompt + response gives the
head spans and groups, WAAD over the local heads, FAI over the global heads (analysis horizon:
to the end of the response), the token entropy and the preplan / anchor marks, plus the
response's attention pooled per head for the maps. Writes `report.html` (self-contained),
`metrics.json`, `tokens.csv`, and per prompt `curves_{i}.png` and `attention_{i}.png`.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path
from typing import Any

import torch

from verl_anchor.analysis.common import (
    ResponseAnalysis,
)

# -- outputs -------------------------------------------------------------------------------


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "position", "token_id", "token", "waad", "fai", "entropy", "preplan", "anchor"])
        for r in results:
            pre, anc = set(r["preplan"]), set(r["anchor"])
            for j, (tid, tok) in enumerate(zip(r["token_ids"], r["tokens"])):
                writer.writerow(
                    [
                        r["index"],
                        j,
                        tid,
                        tok,
                        r["waad"][j],
                        _csv(r["fai"][j]),
                        r["entropy"][j],
                        int(j in pre),
                        int(j in anc),
                    ]
                )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(10, 6), sharex=True)
    x = list(range(len(result["tokens"])))
    series = [
        ("WAAD (local heads)", result["waad"], "tab:blue", result["preplan"]),
        ("FAI (global heads)", result["fai"], "tab:red", result["anchor"]),
        ("entropy (nats)", result["entropy"], "tab:green", []),
    ]
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


def plot_attention_maps(analysis: ResponseAnalysis, path: Path) -> None:
    """The response's attention averaged over the local and over the global heads (log colour scale).

    Local heads draw a sawtooth near the diagonal (phrasal chunks); global heads draw vertical stripes
    on the tokens later tokens keep reading (anchors). Long responses are pooled (`attention_map`).
    """
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    n = len(analysis.token_ids)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    pooled = analysis.attention_map
    for ax, (label, heads) in zip(
        axes,
        [("local heads (shortest span)", analysis.local_heads), ("global heads (longest span)", analysis.global_heads)],
    ):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("key (response token)")
        ax.set_ylabel("query (response token)")
        if pooled is None or n == 0 or heads.numel() == 0:
            ax.text(0.5, 0.5, "no response tokens", ha="center", va="center", transform=ax.transAxes)
            continue
        grid = pooled[heads].mean(dim=0)
        # Cells above the diagonal are exactly 0 (causal): blank them, and floor the log scale.
        positive = grid[grid > 0]
        floor = max(float(positive.min()), 1e-6) if positive.numel() else 1e-6
        cmap = plt.get_cmap("viridis").with_extremes(bad="white")
        image = ax.imshow(
            torch.where(grid > 0, grid.clamp(min=floor), math.nan).numpy(),
            cmap=cmap,
            norm=LogNorm(vmin=floor, vmax=max(float(grid.max()), floor * 10)),
            extent=(0, n, n, 0),
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention (mean over heads)")
    bins = 0 if pooled is None else pooled.shape[-1]
    pooled_note = f", pooled to {bins} x {bins} cells" if 0 < bins < n else ""
    fig.suptitle(f"prompt {analysis.index}: attention among the {n} response tokens{pooled_note}", fontsize=10)
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
.warn{background:#fff3cd;padding:.4em}
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
        "<p class='warn'>This is the small demo policy (<code>--demo</code>): a 1.4M-parameter model trained for a few "
        "minutes on Countdown, which solves only some of these problems; its attention shows what a model this small "
        "learns, not a large model's rhythm. Run with <code>--model</code> for a real model.</p>"
        if payload.get("demo")
        else "",
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
        parts.append(
            f"<p class='key'>{len(r['tokens'])} response tokens ({'generated' if r['generated'] else 'given'}); "
            f"mean span local {_fmt(r['span_loc'])}, global {_fmt(r['span_glob'])}; "
            f"local heads {r['local_heads']}, global heads {r['global_heads']}</p>"
        )
        spans = []
        for j, tok in enumerate(r["tokens"]):
            classes = "tok" + (" preplan" if j in pre else "") + (" anchor" if j in anc else "")
            w, f, e = r["waad"][j], r["fai"][j], r["entropy"][j]
            title = f"#{j} id={r['token_ids'][j]} WAAD={_fmt(w)} FAI={_fmt(f)} entropy={_fmt(e)}"
            title += (" preplan" if j in pre else "") + (" anchor" if j in anc else "")
            spans.append(
                f'<span class="{classes}" data-waad="{_fmt(w)}" data-fai="{_fmt(f)}" '
                f'data-ent="{_fmt(e)}" title="{esc(title)}">{esc(tok)}</span>'
            )
        parts.append(f"<div class='resp'>{''.join(spans)}")  # no separators: the response is pre-wrap
        figures = [
            _embedded_png(out, f"curves_{r['index']}.png", "WAAD, FAI and entropy curves"),
            _embedded_png(out, f"attention_{r['index']}.png", "attention maps of the local and global heads"),
        ]
        parts.append(f"</div>{''.join(figures)}</section>")
    parts.append(f"<script>{_JS}</script></body></html>")
    return "\n".join(parts)


def _embedded_png(out: Path | None, name: str, alt: str) -> str:
    png = None if out is None else Path(out) / name
    if png is None or not png.is_file():
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"<p><img alt='{alt}' src='data:image/png;base64,{data}' style='max-width:100%'></p>"


def _fmt(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _csv(v: float | None) -> str | float:
    return "" if v is None else v
