"""`verl-anchor analyze`: outputs, agreement with the dense eager oracle, given responses, errors,
linear memory on a 4k-token response, and the report in headless Chromium."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from helpers import pooled_reference
from test_metrics import _LargestTensor

from verl_anchor.analysis import common, report
from verl_anchor.cli import main
from verl_anchor.core.config import AnchorConfig
from verl_anchor.core.metrics import group_signals, reference_stats, select_layers

MAX_NEW = 24


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    assert main(["analyze", "--demo", "--out", str(out), "--max-new-tokens", str(MAX_NEW), "--map-bins", "16"]) == 0
    return out


def _metrics(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def _eager(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _session(model_path, map_bins):
    """A `Session` on a saved model, as `--model PATH` builds it (default options)."""
    args = argparse.Namespace(
        demo=False,
        model=model_path,
        prompts=None,
        out=None,
        max_new_tokens=MAX_NEW,
        temperature=0.7,
        seed=0,
        num_layers=None,
        limit=None,
    )
    return common.Session(args, map_bins=map_bins)


def test_files_exist(demo_out):
    data = _metrics(demo_out)
    assert len(data["prompts"]) == len(common.demo_prompts()) and data["demo"] is True
    for name in ("report.html", "metrics.json", "tokens.csv"):
        assert (demo_out / name).is_file()
    for i in range(len(data["prompts"])):
        for figure in (f"curves_{i}.png", f"attention_{i}.png"):
            assert (demo_out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    from transformers import AutoTokenizer

    data = _metrics(demo_out)
    model = _eager(data["model"])
    layers = select_layers(model.config.num_hidden_layers, 5)
    assert layers == data["layers"]
    cfg = AnchorConfig(fai_h_lo=0, fai_h_hi=None)
    tokenizer = AutoTokenizer.from_pretrained(data["model"])
    for p in data["prompts"]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert len(ids) == p["prompt_len"]
        full = torch.tensor([list(ids) + p["token_ids"]])
        with torch.no_grad():
            out = model(input_ids=full, output_attentions=True, use_cache=False)
        attn = torch.cat([out.attentions[layer][0] for layer in layers]).double()
        ref = reference_stats(attn, p["prompt_len"], cfg)
        signals = group_signals(ref, cfg)
        torch.testing.assert_close(torch.tensor(p["waad"], dtype=torch.float64), signals.waad, atol=1e-5, rtol=0)
        fai = torch.tensor([math.nan if v is None else v for v in p["fai"]], dtype=torch.float64)
        torch.testing.assert_close(fai, signals.fai, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(torch.tensor(p["head_span"], dtype=torch.float64), ref.span, atol=1e-4, rtol=1e-6)
        # Entropy of the distribution that predicted each response token.
        logp = torch.log_softmax(out.logits[0, p["prompt_len"] - 1 : -1].double(), dim=-1)
        torch.testing.assert_close(
            torch.tensor(p["entropy"], dtype=torch.float64), -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0
        )


def test_attention_maps_are_the_pooled_eager_attention(demo_out):
    data = _metrics(demo_out)
    p = data["prompts"][0]
    session = _session(data["model"], map_bins=16)
    analysis = session.analyze(0, p["prompt"], session.prompt_ids(p["prompt"]), p["token_ids"], generated=False)
    full = torch.tensor([analysis.prompt_ids + p["token_ids"]])
    with torch.no_grad():
        attentions = _eager(data["model"])(input_ids=full, output_attentions=True).attentions
    attn = torch.cat([attentions[layer][0] for layer in data["layers"]]).double()
    bins = min(16, len(p["token_ids"]))
    assert analysis.attention_map.shape == (attn.shape[0], bins, bins)
    torch.testing.assert_close(
        analysis.attention_map.double(), pooled_reference(attn, p["prompt_len"], 16), atol=1e-5, rtol=0
    )


def test_html_one_span_per_token(demo_out):
    page = (demo_out / "report.html").read_text(encoding="utf-8")
    data = _metrics(demo_out)
    assert page.count('class="tok') == sum(len(p["tokens"]) for p in data["prompts"])
    assert page.count('class="tok preplan') + page.count('anchor"') > 0
    assert page.count("data:image/png;base64,") == 2 * len(data["prompts"]) and "<script>" in page
    assert "small demo policy" in page  # the demo banner


def test_html_escapes_model_text():
    payload = {
        "model": "m",
        "layers": [0],
        "ratio": 0.4,
        "prompts": [
            {
                "index": 0,
                "prompt": "<b>x</b>",
                "generated": False,
                "tokens": ["<script>", "&"],
                "token_ids": [5, 6],
                "waad": [1.0, 2.0],
                "fai": [0.5, None],
                "entropy": [0.1, 0.2],
                "preplan": [0],
                "anchor": [0],
                "span_loc": 1.0,
                "span_glob": 2.0,
                "local_heads": [0],
                "global_heads": [1],
            }
        ],
    }
    page = report.render_html(payload)
    assert "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x" not in page
    assert page.count('class="tok') == 2 and 'class="tok preplan anchor"' in page
    assert "random" not in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not _chromium() and not os.environ.get("CI"), reason="Debian's chromium package is not installed")
def test_report_opens_in_headless_chromium(demo_out, tmp_path):
    """The page runs its script without console errors and the rendered DOM shows every token, coloured."""
    browser = _chromium()
    assert browser, "CI installs Debian's chromium (see .ci/run)"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    page = (demo_out / "report.html").as_uri()
    done = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    spans = re.findall(r'<span class="tok[^"]*"[^>]*>', done.stdout)
    assert len(spans) == sum(len(p["tokens"]) for p in _metrics(demo_out)["prompts"])
    assert all("background" in span for span in spans), "the colouring script did not run"
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, *flags, "--window-size=1000,1400", f"--screenshot={shot}", page],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_given_responses_skip_generation(demo_out, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _metrics(demo_out)["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    responses = ["48 / 2 = 24 and 48 + 24 = 72. #### 72", "12 * 50 / 60 = 10 \\boxed{10}", ""]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": r}) for i, r in enumerate(responses)))
    monkeypatch.setattr(
        common,
        "load_model",
        lambda args: (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, path),
    )

    def no_generate(*a, **k):
        raise AssertionError("generation must be skipped when responses are given")

    monkeypatch.setattr(common.Session, "generate", no_generate)
    out = tmp_path / "out"
    assert main(["analyze", "--demo", "--prompts", str(prompts), "--out", str(out)]) == 0
    data = _metrics(out)
    for p, r in zip(data["prompts"], responses, strict=True):
        assert not p["generated"]
        assert p["token_ids"] == tokenizer(r, add_special_tokens=False)["input_ids"]
        assert p["response"] == r
        assert "".join(p["tokens"]) == r
    assert data["prompts"][2]["waad"] == [] and data["prompts"][2]["span_loc"] is None  # empty response


def test_long_response_is_analysed_without_an_n_by_n_tensor(demo_out):
    """A 4k-token response: no tensor as large as one head's N x N attention, maps pooled to 64 x 64."""
    data = _metrics(demo_out)
    session = _session(data["model"], map_bins=64)
    ids = session.prompt_ids("Count to four thousand.")
    response = torch.randint(3, 1024, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    n = len(ids) + len(response)
    with _LargestTensor() as probe:
        analysis = session.analyze(0, "Count to four thousand.", ids, response, generated=False)
    assert analysis.signals.waad.shape == (4096,) and not torch.isnan(analysis.signals.waad).any()
    assert analysis.attention_map.shape[-2:] == (64, 64)
    assert probe.largest < n * n, f"a tensor of {probe.largest} elements (N x N = {n * n})"
    # The entropy, computed in blocks of rows, equals the entropy of the whole logits at once.
    with torch.no_grad():
        logits = session.model(input_ids=torch.tensor([ids + response]), use_cache=False).logits[0, len(ids) - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(analysis.entropy.double(), -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=0)


def test_model_without_attention_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", lambda args: (torch.nn.Linear(2, 2), None, "linear"))
    for command in ("analyze", "coupling", "perturb"):
        assert main([command, "--demo", "--out", str(tmp_path)]) == 2
        assert "no Hugging Face attention modules" in capsys.readouterr().err


def test_prompts_from_a_verl_parquet_with_limit(tmp_path):
    """`verl-anchor data gsm8k` output feeds the analysis commands (the paper's GSM8K setting)."""
    from verl_anchor.data import MATH_INSTRUCTION, prepare_math

    questions = [f"Tom has {i} apples and buys 2 more. How many apples does he have?" for i in range(5)]
    src = tmp_path / "test.jsonl"
    src.write_text(
        "\n".join(json.dumps({"question": q, "answer": f"... #### {i + 2}"}) for i, q in enumerate(questions))
    )
    written = prepare_math("gsm8k", tmp_path / "data", src, split="test")
    items = common.load_prompts(written["test"], limit=3)
    assert [item["prompt"] for item in items] == [q + MATH_INSTRUCTION for q in questions[:3]]
    assert len(common.load_prompts(written["test"])) == 5
    with pytest.raises(common.AnalysisError, match="--limit=0 is invalid"):
        common.load_prompts(written["test"], limit=0)
    with pytest.raises(common.AnalysisError, match="`prompt` column"):
        common.load_prompts(tmp_path / "missing.parquet")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "x"}\n', "string `prompt`"),
        ("not json\n", "not JSON"),
        ("\n", "has no prompts"),
    ],
)
def test_bad_prompts_file(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["analyze", "--demo", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is invalid"),
        (
            ["analyze", "--max-new-tokens", "99999999999999999999"],
            "argument --max-new-tokens: 99999999999999999999 is too large",
        ),
        (["analyze", "--temperature", "-1"], "argument --temperature: -1 is invalid"),
        (["analyze", "--num-layers", "0"], "--num-layers"),
        (["analyze", "--map-bins", "0"], "--map-bins=0 is invalid"),
        (["analyze", "--limit", "0"], "argument --limit: 0 is invalid"),
        (["coupling", "--peak-quantile", "0"], "--peak-quantile=0.0 is invalid"),
        (["perturb", "--candidates", "0"], "argument --candidates: 0 is invalid"),
    ],
)
def test_bad_options_exit_2_before_loading_a_model(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model was loaded"))
    assert main([*argv, "--demo", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def hybrid_model(tmp_path_factory):
    """A tiny saved qwen3_next (linear-attention layers 0-2, full attention at 3) with the project's tokenizer."""
    from transformers import AutoModelForCausalLM

    from verl_anchor.models.tiny import build_tokenizer, tiny_arch_config

    path = tmp_path_factory.mktemp("qwen3_next")
    tokenizer = build_tokenizer(path)
    torch.manual_seed(0)
    config = tiny_arch_config(
        "qwen3_next",
        vocab_size=-(-len(tokenizer) // 64) * 64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_layers_option_analyses_a_hybrid_model(hybrid_model, tmp_path, capsys):
    """--num-layers falls on linear-attention layers of a hybrid: refused, naming --layers; --layers 3 works."""
    argv = ["analyze", "--model", str(hybrid_model), "--max-new-tokens", "3", "--limit", "1", "--map-bins", "8"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "can read are [3]" in err and "--layers in the analysis commands" in err
    assert main([*argv, "--layers", "3", "--out", str(tmp_path / "b")]) == 0
    assert _metrics(tmp_path / "b")["layers"] == [3]


@pytest.mark.parametrize(
    "value, message",
    [
        ("a", "'a' in 'a' is not an integer"),
        ("-1", "layer indices are 0-based"),
        ("1,1", "lists layer 1 twice"),
        ("", "is invalid: give comma-separated"),
        ("1,,2", "is invalid: give comma-separated"),
    ],
)
def test_bad_layers_exit_2_before_loading_a_model(tmp_path, monkeypatch, capsys, value, message):
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model was loaded"))
    for command in ("analyze", "coupling", "perturb"):
        assert main([command, "--layers", value, "--demo", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_layers_option_reaches_the_config(tmp_path, monkeypatch):
    seen = {}

    def load(args):
        seen["args"] = args
        raise common.AnalysisError("stop here")

    monkeypatch.setattr(common, "load_model", load)
    assert main(["coupling", "--layers", "2, 0", "--demo", "--out", str(tmp_path)]) == 2
    assert seen["args"].layers == (2, 0)
    monkeypatch.setattr(common, "load_model", lambda args: pytest.fail("the model was loaded"))
    seen["args"].layers = (0, 2, 2)  # a bad list reaching the config (not through the parser) is one error too
    with pytest.raises(common.AnalysisError, match="--layers: layers=.* has duplicates"):
        common.Session(seen["args"])
