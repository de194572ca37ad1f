"""The HTML report: plots, headline table and escaped model text on a run with a real tiny-model evaluation;
missing parts become notes; a real headless Chromium shows every plot and runs no model text; the CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl
from tests.helpers import eval_prompts, perturbed_model, reward_model
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluation.evaluate import EvalConfig, run_eval
from rlhfkit.evaluation.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

INJECTED = '<script>window.__pwned = 1; alert("x")</script><img src=x onerror="window.__pwned = 2">'
PLOTS = {"rl_curves", "rl_health", "sft_loss", "rm_curves", "overoptimisation"}
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([a-z_]+)">')


def synthetic_metrics(run: Path) -> None:
    """Small metrics files as the trainers write them; the RL gold rises then falls (over-optimisation)."""
    (run / "sft").mkdir(parents=True)
    (run / "rm").mkdir()
    (run / "rl").mkdir()
    sft = [{"step": s, "split": "train", "loss": 2.0 / s} for s in range(1, 11)]
    sft += [{"step": s, "split": "eval", "loss": 2.2 / s} for s in (5, 10)]
    rm = [
        {"step": s, "split": "train", "loss": 0.7 - 0.05 * s, "accuracy": 0.5 + 0.04 * s} for s in range(1, 9)
    ]
    rm.append({"step": 8, "split": "eval", "loss": 0.45, "accuracy": 0.68})
    rl = [
        {"step": s, "split": "train", "score": 0.2 * s, "kl": 0.5 * s * s,
         "gold": -1 + 0.3 * s - 0.03 * s * s, "answer_length": 40 - s, "seconds_rollout": 1.0}
        for s in range(1, 13)
    ]  # fmt: skip
    write_jsonl(run / "sft" / "metrics.jsonl", sft)
    write_jsonl(run / "rm" / "metrics.jsonl", rm)
    write_jsonl(run / "rl" / "metrics.jsonl", rl)
    health = {"config": {"action": "warn"}, "thresholds": {"kl": 10.0}, "events": {}}
    (run / "rl" / "health.json").write_text(json.dumps(health))
    with open(run / "rl" / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 13, "split": "tr')  # a run killed mid-write: the partial line is skipped
    stages = {name: {"seconds": sec, "status": "done"} for name, sec in
              (("sft", 61.5), ("feedback", 3.25), ("rm", 42.0), ("rl", 250.0), ("eval", 12.25))}  # fmt: skip
    (run / "pipeline.json").write_text(
        json.dumps({"stages": stages, "model": "tiny-llama", "algorithm": "ppo"})
    )


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: synthetic training metrics and a real evaluation of two tiny models with an RM,
    whose first policy answer is then replaced by markup that would run if it were not escaped."""
    root = tmp_path_factory.mktemp("report-run")
    run = root / "run"
    synthetic_metrics(run)
    run_eval(EvalConfig(
        policy=str(perturbed_model(tiny_model, root / "policy", seed=2)),
        reference=str(perturbed_model(tiny_model, root / "reference", seed=1)),
        reward=str(reward_model(tiny_model, root / "rm-model")), prompts=str(eval_prompts(root / "p.jsonl")),
        output=str(run / "eval"), max_new_tokens=10, batch_size=4,
    ))  # fmt: skip
    answers = run / "eval" / "answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    rows[0]["policy_answer"] = INJECTED
    rows[0]["prompt"] = [{"role": "user", "content": "Is <b>this</b> bold?"}]
    write_jsonl(answers, rows)
    return run


@pytest.fixture(scope="module")
def report(run: Path) -> Path:
    return build_report(run)


def test_report_has_plots_table_and_escaped_text(run: Path, report: Path):
    page = report.read_text(encoding="utf-8")
    assert report == run / "report.html"
    images = IMG.findall(page)
    assert {alt for _, alt in images} == PLOTS and len(images) == 5
    for data, alt in images:  # embedded PNG == the saved plots/NAME.png
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert (run / "plots" / f"{alt}.png").read_bytes() == png
    ev = json.loads((run / "eval" / "eval.json").read_text())
    wr = ev["win_rate"]
    assert "Win rate of policy over reference" in page
    assert f"{100 * wr['rate']:.1f}% [{100 * wr['low']:.1f}%, {100 * wr['high']:.1f}%]" in page
    assert f"{ev['kl']['mean']:.3f} ± {ev['kl']['stderr']:.3f}" in page
    assert "65.7%" in page and "Reward model agrees with gold" in page
    assert "1 min 01.5 s" in page and "4 min 10.0 s" in page  # sft and rl timings
    assert "6 min 09.0 s" in page and "tiny-llama" in page
    # model text is shown as text: no tag, no handler, no markup from the prompt survives
    assert "&lt;script&gt;window.__pwned = 1; alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page.lower() and 'onerror="' not in page and "<b>this" not in page
    assert "Is &lt;b&gt;this&lt;/b&gt; bold?" in page
    assert "class='note'" not in page and 'class="note"' not in page  # every part was present


def test_missing_parts_become_notes(tmp_path: Path):
    run = tmp_path / "run"
    (run / "rl").mkdir(parents=True)
    write_jsonl(
        run / "rl" / "metrics.jsonl", [{"step": s, "split": "train", "score": s, "kl": s} for s in (1, 2)]
    )
    out = build_report(run, tmp_path / "elsewhere" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert out == tmp_path / "elsewhere" / "r.html" and not (run / "report.html").exists()
    assert [alt for _, alt in IMG.findall(page)] == ["rl_curves"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["rl_curves.png"]
    for note in ("No eval/eval.json", "No pipeline.json", "SFT: no metrics", "Reward model: no metrics",
                 "RL metrics have no gold score", "Needs RL metrics with both kl and gold",
                 "No eval/answers.jsonl", "No rl/health.json"):  # fmt: skip
        assert note in page, note
    empty = tmp_path / "empty"
    (empty / "eval").mkdir(parents=True)
    (empty / "eval" / "eval.json").write_text('{"n_prompts": 3, "gold": {}}')  # from another version
    page = build_report(empty).read_text()
    assert IMG.findall(page) == [] and "eval/eval.json lacks win_rate, kl" in page
    with pytest.raises(RlhfkitError, match="no such run directory"):
        build_report(tmp_path / "missing")


def test_report_in_a_real_browser(report: Path, chromium):
    """Every plot is decoded and laid out, and nothing from the model text ran (no script, no alert)."""
    dialogs: list[str] = []
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(report.as_uri(), wait_until="load")
        images = page.evaluate(
            """() => Array.from(document.images).map(img => {
                const r = img.getBoundingClientRect();
                return {alt: img.alt, complete: img.complete, natural: img.naturalWidth,
                        width: r.width, height: r.height};
            })"""
        )
        pwned = page.evaluate("() => window.__pwned === undefined ? null : window.__pwned")
        scripts = page.evaluate("() => document.scripts.length")
        text = page.inner_text("body")
    finally:
        page.close()
    assert {img["alt"] for img in images} == PLOTS and len(images) == 5  # the injected <img> is text
    for img in images:
        assert img["complete"] and img["natural"] > 0, img
        assert img["width"] > 300 and img["height"] > 150, img
    assert pwned is None and dialogs == [] and scripts == 0
    assert INJECTED in text  # shown to the reader, verbatim


@pytest.mark.slow
def test_cli_eval_and_report(run: Path, tmp_path: Path):
    """`rlhfkit eval` then `rlhfkit report` as a user runs them (YAML, --set and options combined); a bad run
    directory is a one-line error."""
    cfg = json.loads((run / "eval" / "eval.json").read_text())["config"]
    (tmp_path / "eval.yaml").write_text("max_new_tokens: 6\nkl_samples: 2\n")
    out = tmp_path / "run" / "eval"
    cmd = [sys.executable, "-m", "rlhfkit.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU
    done = subprocess.run(
        [*cmd, "eval", "--policy", cfg["policy"], "--reference", cfg["reference"],
         "--prompts", cfg["prompts"], "--output", str(out), "--config", str(tmp_path / "eval.yaml"),
         "--set", "limit=2"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "win rate" in done.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_prompts"] == 2 and ev["kl"]["samples"] == 4 and ev["config"]["max_new_tokens"] == 6
    assert ev["reward_model"] is None
    done = subprocess.run(
        [*cmd, "report", "--run", str(tmp_path / "run")], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "Win rate of policy over reference" in (tmp_path / "run" / "report.html").read_text()
    # a user error: one line, exit code 2 (in process: a third interpreter start adds seconds, not coverage)
    result = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rl_health_section_says_what_fired_and_plots_the_thresholds(tmp_path: Path):
    run = tmp_path / "run"
    (run / "rl").mkdir(parents=True)
    rows = [
        {"step": s, "split": "train", "entropy": 4.0 / s, "kl": 2.0 * s, "repeat_share": 0.1,
         "answer_length": 20.0, **({"health_kl": 1.0} if s >= 6 else {})}
        for s in range(1, 9)
    ]  # fmt: skip
    write_jsonl(run / "rl" / "metrics.jsonl", rows)
    event = {"first": 6, "last": 8, "count": 3, "text": "KL to the reference 12 nats exceeds <b>kl_max</b>"}
    health = {
        "config": {"action": "warn"},
        "thresholds": {"kl": 10.0, "entropy": 0.8},
        "events": {"kl": event},
    }
    (run / "rl" / "health.json").write_text(json.dumps(health))
    page = build_report(run).read_text(encoding="utf-8")
    assert (
        "rl_health" in [alt for _, alt in IMG.findall(page)] and (run / "plots" / "rl_health.png").is_file()
    )
    assert "<b>kl</b> fired at iteration 6 and in 2 later iterations (last 8)" in page
    assert "&lt;b&gt;kl_max&lt;/b&gt;" in page and "<b>kl_max</b>" not in page  # the text is escaped
    health["events"] = {}
    (run / "rl" / "health.json").write_text(json.dumps(health))
    assert "No RL health check fired" in build_report(run).read_text(encoding="utf-8")
