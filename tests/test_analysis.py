"""`verl-anchor analyze`: outputs, agreement with the dense eager oracle, given responses, errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from verl_anchor import analysis
from verl_anchor.config import AnchorConfig
from verl_anchor.metrics import group_signals, reference_stats, select_layers

MAX_NEW = 24


def _run(argv: list[str]) -> int:
    parser = analysis.argparse.ArgumentParser()
    analysis.configure_parser(parser)
    return analysis.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    assert _run(["--demo", "--out", str(out), "--max-new-tokens", str(MAX_NEW)]) == 0
    return out


def _metrics(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_files_exist(demo_out):
    data = _metrics(demo_out)
    assert len(data["prompts"]) == len(analysis.DEMO_PROMPTS)
    for name in ("report.html", "metrics.json", "tokens.csv"):
        assert (demo_out / name).is_file()
    for i in range(len(data["prompts"])):
        assert (demo_out / f"curves_{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(demo_out / "tokens.csv", encoding="utf-8")))
    assert len(rows) == sum(len(p["tokens"]) for p in data["prompts"])
    for p in data["prompts"]:
        n = len(p["tokens"])
        assert 0 < n <= MAX_NEW and p["generated"]
        assert len(p["waad"]) == len(p["fai"]) == len(p["entropy"]) == len(p["token_ids"]) == n
        assert all(e is not None and 0 <= e <= math.log(2048) for e in p["entropy"])
        assert len(p["preplan"]) == math.ceil(0.4 * n - 1e-9)
        assert set(p["local_heads"]).isdisjoint(p["global_heads"])


def test_matches_eager_reference(demo_out):
    from transformers import AutoModelForCausalLM

    data = _metrics(demo_out)
    model = AutoModelForCausalLM.from_pretrained(data["model"], dtype=torch.float32, attn_implementation="eager")
    model.eval()
    layers = select_layers(model.config.num_hidden_layers, 5)
    assert layers == data["layers"]
    cfg = AnchorConfig(fai_h_lo=0, fai_h_hi=None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    for p in data["prompts"]:
        ids = analysis.prompt_ids(tokenizer, p["prompt"])
        assert len(ids) == p["prompt_len"]
        full = torch.tensor([ids + p["token_ids"]])
        with torch.no_grad():
            out = model(input_ids=full, output_attentions=True, use_cache=False)
        attn = torch.cat([out.attentions[layer][0] for layer in layers]).double()
        ref = reference_stats(attn, p["prompt_len"], cfg)
        signals = group_signals(ref, cfg)
        torch.testing.assert_close(torch.tensor(p["waad"], dtype=torch.float64), signals.waad, atol=1e-5, rtol=0)
        fai = torch.tensor([math.nan if v is None else v for v in p["fai"]], dtype=torch.float64)
        torch.testing.assert_close(fai, signals.fai, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(torch.tensor(p["head_span"], dtype=torch.float64), ref.span, atol=1e-4, rtol=1e-6)


def test_html_one_span_per_token(demo_out):
    page = (demo_out / "report.html").read_text(encoding="utf-8")
    data = _metrics(demo_out)
    assert page.count('class="tok') == sum(len(p["tokens"]) for p in data["prompts"])
    assert page.count('class="tok preplan') + page.count("anchor\"") > 0
    assert "data:image/png;base64," in page and "<script>" in page


def test_html_escapes_model_text():
    payload = {"model": "m", "layers": [0], "ratio": 0.4, "prompts": [{
        "index": 0, "prompt": "<b>x</b>", "generated": False, "tokens": ["<script>", "&"], "token_ids": [5, 6],
        "waad": [1.0, 2.0], "fai": [0.5, None], "entropy": [0.1, 0.2], "preplan": [0], "anchor": [0],
        "span_loc": 1.0, "span_glob": 2.0, "local_heads": [0], "global_heads": [1]}]}
    page = analysis.render_html(payload)
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x" not in page
    assert page.count('class="tok') == 2 and 'class="tok preplan anchor"' in page


def test_given_responses_skip_generation(demo_out, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _metrics(demo_out)["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    responses = ["48 / 2 = 24 and 48 + 24 = 72. #### 72", "12 * 50 / 60 = 10 \\boxed{10}"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": r}) for i, r in enumerate(responses)))

    def load(args):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, path

    monkeypatch.setattr(analysis, "load_model", load)

    def no_generate(*a, **k):
        raise AssertionError("generation must be skipped when responses are given")

    monkeypatch.setattr(analysis, "generate", no_generate)
    out = tmp_path / "out"
    assert _run(["--demo", "--prompts", str(prompts), "--out", str(out)]) == 0
    data = _metrics(out)
    for p, r in zip(data["prompts"], responses, strict=True):
        assert not p["generated"]
        assert p["token_ids"] == tokenizer(r, add_special_tokens=False)["input_ids"]
        assert p["response"] == r
        assert "".join(p["tokens"]) == r


def test_model_without_attention_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(analysis, "load_model", lambda args: (torch.nn.Linear(2, 2), None, "linear"))
    assert _run(["--demo", "--out", str(tmp_path)]) == 2
    assert "no Hugging Face attention modules" in capsys.readouterr().err


def test_bad_prompts_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert _run(["--demo", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "prompt" in capsys.readouterr().err
