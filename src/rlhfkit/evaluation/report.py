"""One self-contained HTML page about a run: headline numbers, timings, training curves, over-optimisation.

    rlhfkit report --run runs/x                   # -> runs/x/report.html and runs/x/plots/*.png

    from rlhfkit.evaluation.report import build_report
    build_report("runs/x")

It reads what the pipeline writes into a run directory (each part optional):
    pipeline.json                       stage timings, model, algorithm
    sft/metrics.jsonl, rm/metrics.jsonl {"step", "split": "train"|"eval", "loss", "accuracy", ...} per line
    rl/metrics.jsonl                    {"step", "score", "kl", "gold" (optional), ...} per iteration
    eval/eval.json, eval/answers.jsonl  from `rlhfkit eval` (`rlhfkit.evaluation.evaluate`)
A part that is missing is left out with a note saying so, never an error.

The page has no script and no external resource: CSS is inline and the plots are PNGs embedded as base64
data URIs (also saved as plots/*.png), so it can be mailed or archived as one file. Model answers are
untrusted text: every string from the run is HTML-escaped, and a Content-Security-Policy forbids scripts
anyway. Plots use matplotlib's object API on an Agg canvas (no pyplot), so building a report changes no
global matplotlib state of the caller (a notebook keeps its backend).

The over-optimisation plot follows Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization",
arXiv:2210.10760): gold reward against sqrt(KL(pi || pi_ref)) as RL proceeds. Rising then falling gold
while the reward-model score keeps rising is the signature of the policy exploiting the reward model.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeGuard

from rlhfkit.data.encoding import chat_prompt_text
from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluation.evaluate import ALPACAEVAL_HUMAN_AGREEMENT, ALPACAEVAL_SOURCE
from rlhfkit.fileio import write_atomic

SAMPLE_ANSWERS = 6  # prompts shown side by side: the first ones of the (shuffled) eval set, not picked
STAGES = ("sft", "feedback", "rm", "rl", "eval")
EVAL_KEYS = ("n_prompts", "win_rate", "gold", "kl", "length_tokens", "length_words", "eos_rate")

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;max-width:1100px;
margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #d8dde6}
table{border-collapse:collapse;margin:.6em 0} th,td{padding:.35em .8em;border-bottom:1px solid #e3e7ee;
text-align:left;vertical-align:top} th{background:#f3f5f9}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td:first-child{min-width:13em}
.meta{color:#5a6374} .note{color:#7a5b00;background:#fff8e0;padding:.4em .7em;border-radius:4px}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #e3e7ee}
figcaption{color:#5a6374;font-size:.9em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin:.4em 0 1.4em}
.answer{white-space:pre-wrap;word-wrap:break-word;background:#f7f8fb;border:1px solid #e3e7ee;
border-radius:4px;padding:.6em;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
.prompt{font-weight:600} .win{color:#1a7f37} .loss{color:#b42318} .tie{color:#5a6374}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ------------------------------------------------------------------------------------------ reading
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; lines that are not a JSON object (a run killed mid-write) are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def series(rows: Sequence[dict[str, Any]], key: str, split: str = "train") -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows of one split, finite numbers only."""
    steps, values = [], []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if row.get("split", "train") != split or not _is_number(value) or not _is_number(step):
            continue
        if math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------ plots
def figure(ncols: int, height: float = 3.2, width: float | None = None) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on an Agg canvas (no pyplot) and its `ncols` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or min(3.9 * ncols, 11.0), height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _curve(ax: Any, rows: Sequence[dict[str, Any]], key: str, title: str) -> bool:
    """Train (line) and eval (markers) series of `key` on one axis; False when neither has a point."""
    drawn = False
    for split, style in (("train", {"lw": 1.4}), ("eval", {"marker": "o", "ms": 4, "lw": 1.0})):
        steps, values = series(rows, key, split)
        if steps:
            ax.plot(steps, values, label=split, **style)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def curves_plot(rows: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str]]) -> bytes | None:
    """One panel per (key, title) that has data; None when no key has any."""
    present = [(k, t) for k, t in keys if any(series(rows, k, s)[0] for s in ("train", "eval"))]
    if not present:
        return None
    fig, axes = figure(len(present))
    for ax, (key, title) in zip(axes, present, strict=True):
        _curve(ax, rows, key, title)
    return png_bytes(fig)


def overoptimisation_plot(
    rl_rows: Sequence[dict[str, Any]], evaluation: dict[str, Any] | None
) -> bytes | None:
    """Gold reward against sqrt(KL) per RL iteration (Gao et al. 2022), with the final evaluation's point
    (gold and KL of the same temperature-1 policy samples) and its greedy golds as reference lines."""
    steps, kls = series(rl_rows, "kl")
    gold_at = dict(zip(*series(rl_rows, "gold"), strict=True))
    points = [
        (math.sqrt(max(kl, 0.0)), gold_at[s], s) for s, kl in zip(steps, kls, strict=True) if s in gold_at
    ]
    if not points:
        return None
    fig, (ax,) = figure(1, height=3.8, width=6.8)
    x, y, c = zip(*points, strict=True)
    ax.plot(x, y, color="#9aa4b5", lw=1.0, zorder=1)
    dots = ax.scatter(x, y, c=c, cmap="viridis", s=22, zorder=2, label="RL iterations (rollouts)")
    fig.colorbar(dots, ax=ax, label="RL iteration")
    if evaluation is not None:
        kl, gold = evaluation["kl"]["mean"], evaluation["gold"]
        ax.scatter([math.sqrt(max(kl, 0.0))], [gold["policy_sampled"]], marker="*", s=180, color="#d1495b",
                   zorder=3, label="final eval (T=1 samples)")  # fmt: skip
        ax.axhline(gold["reference"], ls="--", lw=1, color="#5a6374", label="reference, greedy")
        ax.axhline(gold["policy"], ls=":", lw=1.2, color="#d1495b", label="policy, greedy")
    ax.set_xlabel("sqrt(KL(policy || reference))  [sqrt nats]")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


# ------------------------------------------------------------------------------------------ html
def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3, pct: bool = False) -> str:
    """A number for the page: a percentage, or `digits` decimals (none from 1000 on); "—" when missing."""
    if not _is_number(value) or not math.isfinite(value):
        return "—"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells must already be escaped; columns in `numeric` are right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def note_html(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def figure_html(png: bytes, name: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(name)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")  # fmt: skip


def headline_html(ev: dict[str, Any]) -> str:
    """The table of final numbers from eval.json."""
    wr, gold, kl = ev["win_rate"], ev["gold"], ev["kl"]
    pct = round(100 * wr.get("confidence", 0.95))
    rows = [[
        "Win rate of policy over reference (gold)", "—",
        f"{fmt(wr['rate'], pct=True)} [{fmt(wr['low'], pct=True)}, {fmt(wr['high'], pct=True)}]",
        esc(f"{pct}% normal interval; wins {wr['wins']}, ties {wr['ties']}, losses {wr['losses']} "
            f"over {ev['n_prompts']} prompts"),
    ], [
        "Gold reward (greedy answers)", fmt(gold["reference"]), fmt(gold["policy"]),
        esc(f"change {gold['policy'] - gold['reference']:+.3f}; policy samples at T=1: "
            f"{fmt(gold.get('policy_sampled'))}"),
    ]]  # fmt: skip
    bon = ev.get("best_of_n")
    if bon:
        b = bon["win_rate"]
        rows.append([
            f"Win rate of best-of-{bon['n']} reference samples (reward model picks)", "—",
            f"{fmt(b['rate'], pct=True)} [{fmt(b['low'], pct=True)}, {fmt(b['high'], pct=True)}]",
            esc(f"the line RL is compared against; gold of the picked answers {bon['gold']:.3f}"),
        ])  # fmt: skip
    rm = ev.get("reward_model")
    if rm:
        rows.append(["Reward-model score (greedy answers)", fmt(rm["reference"]), fmt(rm["policy"]),
                     esc(f"change {rm['policy'] - rm['reference']:+.3f}")])  # fmt: skip
    else:
        rows.append(["Reward-model score", "—", "—", "no reward model given to the evaluation"])
    rows += [
        ["KL(policy || reference), nats per answer", "0", f"{fmt(kl['mean'])} ± {fmt(kl['stderr'])}",
         esc(f"mean ± standard error over {kl['samples']} policy samples at T=1")],
        ["Answer length, tokens", fmt(ev["length_tokens"]["reference"], 1),
         fmt(ev["length_tokens"]["policy"], 1), "greedy answers, EOS included"],
        ["Answer length, words", fmt(ev["length_words"]["reference"], 1),
         fmt(ev["length_words"]["policy"], 1), "whitespace-separated"],
        ["Answers that end with EOS", fmt(ev["eos_rate"]["reference"], pct=True),
         fmt(ev["eos_rate"]["policy"], pct=True), "the rest were cut at max_new_tokens"],
    ]  # fmt: skip
    acc = ev.get("rm_accuracy")
    if acc and acc.get("accuracy") is not None:
        human = acc.get("human_agreement", ALPACAEVAL_HUMAN_AGREEMENT)
        rows.append([
            "Reward model agrees with gold", "—", fmt(acc["accuracy"], pct=True),
            esc(f"over {acc['pairs']} answer pairs whose gold differs; human-human agreement on AlpacaEval: "
                f"{100 * human:.1f}% ({acc.get('human_agreement_source', ALPACAEVAL_SOURCE)})"),
        ])  # fmt: skip
    elif acc:
        rows.append(["Reward model agrees with gold", "—", "—", "no answer pair with different gold scores"])
    return table_html(["Metric", "Reference (before)", "Policy (after)", "Notes"], rows, numeric=(1, 2))


def timings_html(pipeline: dict[str, Any], known: Sequence[str] = STAGES) -> str:
    """Each stage's status and time from pipeline.json, the `known` stages first, in that order."""
    stages = pipeline.get("stages")
    if not isinstance(stages, dict):
        stages = {}
    order = [s for s in known if s in stages] + [s for s in stages if s not in known]
    rows, total = [], 0.0
    for name in order:
        info = stages[name] if isinstance(stages[name], dict) else {}
        seconds = info.get("seconds")
        if _is_number(seconds):
            total += seconds
        rows.append([esc(name), esc(info.get("status", "—")), _duration(seconds)])
    rows.append(["<b>total</b>", "", f"<b>{_duration(total)}</b>"])
    return table_html(["Stage", "Status", "Time"], rows, numeric=(2,))


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "—"
    minutes, sec = divmod(float(seconds), 60)
    return f"{int(minutes)} min {sec:04.1f} s" if minutes else f"{sec:.1f} s"


def answers_html(rows: Sequence[dict[str, Any]]) -> str:
    """Reference and policy answers side by side for the first prompts; all model text escaped."""
    parts = []
    for row in rows[:SAMPLE_ANSWERS]:
        outcome: Any = row.get("outcome")  # 1.0 a win, 0.0 a loss, anything else a tie
        label, css = {1.0: ("policy wins", "win"), 0.0: ("policy loses", "loss")}.get(outcome, ("tie", "tie"))
        prompt = row.get("prompt", "")
        prompt_text = chat_prompt_text(prompt) if isinstance(prompt, list | str) and prompt else ""
        cells = []
        for who in ("reference", "policy"):
            scores = f"gold {fmt(row.get(f'{who}_gold'))}"
            if row.get(f"{who}_rm") is not None:
                scores += f", RM {fmt(row.get(f'{who}_rm'))}"
            cells.append(f"<div><b>{who}</b> <span class='meta'>({esc(scores)})</span>"
                         f"<div class='answer'>{esc(row.get(f'{who}_answer', ''))}</div></div>")  # fmt: skip
        parts.append(f"<p class='prompt'>{esc(prompt_text)} <span class='{css}'>· {label}</span></p>"
                     f"<div class='pair'>{''.join(cells)}</div>")  # fmt: skip
    return "".join(parts)


# ------------------------------------------------------------------------------------------ RL health
HEALTH_PANELS = (  # (metric, title, thresholds in health.json drawn on it, check whose marks it shows)
    ("entropy", "policy entropy", ("entropy",), "entropy"),
    ("kl", "KL to reference (nats)", ("kl",), "kl"),
    ("repeat_share", "share of looping samples", ("repeat_share",), "looping"),
    ("answer_length", "answer length (tokens)", ("answer_length_low", "answer_length_high"), "length"),
)


def health_plot(rows: Sequence[dict[str, Any]], thresholds: dict[str, float]) -> bytes | None:
    """The watched quantities over iterations, each with its threshold (dashed) and the iterations where
    its check fired (red crosses); None when the run logged none of them."""
    present = [p for p in HEALTH_PANELS if series(rows, p[0])[0]]
    if not present:
        return None
    fig, axes = figure(len(present))
    for ax, (key, title, limits, check) in zip(axes, present, strict=True):
        _curve(ax, rows, key, title)
        for limit in limits:
            if _is_number(thresholds.get(limit)):
                ax.axhline(thresholds[limit], color="#b42318", ls="--", lw=1.0)
        marked = [(r["step"], r[key]) for r in rows if r.get(f"health_{check}") and _is_number(r.get(key))]
        if marked:
            ax.plot(*zip(*marked, strict=True), "x", color="#b42318", ms=7)
    return png_bytes(fig)


def health_html(rows: Sequence[dict[str, Any]], health: dict[str, Any] | None) -> tuple[str, bytes | None]:
    """The RL health section: what fired, in words, and the plot (`training.health`, OUTPUT/health.json)."""
    if health is None:
        return note_html("No rl/health.json in this run: the RL health checks did not run."), None
    events = health.get("events", {})
    action = health.get("config", {}).get("action", "warn")
    if not events:
        words = (
            "<p>No RL health check fired: entropy, KL, looping, unfinished answers and length stayed within "
        )
        words += f"their thresholds (train.health, action {esc(action)}).</p>"
    else:
        lines = []
        for name, e in events.items():
            later = f" and in {e['count'] - 1} later iterations (last {e['last']})" if e["count"] > 1 else ""
            what = f"fired at iteration {e['first']}{later}: {e['text']}"
            lines.append(f"<li><b>{esc(name)}</b> {esc(what)}</li>")
        items = "".join(lines)
        words = f"<p class='note'>RL health checks fired (action {esc(action)}):</p><ul>{items}</ul>"
    return words, health_plot(rows, health.get("thresholds", {}))


# ------------------------------------------------------------------------------------------ the report
def build_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the HTML report of a run directory (default RUN/report.html) and RUN/plots/*.png; returns the
    report's path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RlhfkitError(f"{run}: no such run directory (give the directory `rlhfkit pipeline` wrote)")
    out = Path(output) if output is not None else run / "report.html"
    pipeline = _read_json(run / "pipeline.json")
    evaluation = _read_json(run / "eval" / "eval.json")
    missing = [key for key in EVAL_KEYS if evaluation is not None and key not in evaluation]
    if missing:  # written by another version: leave it out rather than guess
        evaluation = None
    answers = read_metrics(run / "eval" / "answers.jsonl")
    sft, rm, rl = (read_metrics(run / stage / "metrics.jsonl") for stage in ("sft", "rm", "rl"))

    title = f"rlhfkit run: {run.resolve().name}"
    meta = []
    if pipeline:
        meta = [f"{k}: {pipeline[k]}" for k in ("model", "algorithm") if pipeline.get(k) is not None]
    if evaluation:
        cfg = evaluation.get("config", {})
        meta += [
            f"policy {cfg.get('policy')} vs reference {cfg.get('reference')}",
            f"prompts {cfg.get('prompts')}",
        ]
    body = [f"<h1>{esc(title)}</h1>", f"<p class='meta'>{esc(' · '.join(meta))}</p>"]

    body.append("<h2>Results on held-out prompts</h2>")
    if evaluation:
        body.append(headline_html(evaluation))
    elif missing:
        body.append(note_html(f"eval/eval.json lacks {', '.join(missing)}: run `rlhfkit eval` again."))
    else:
        body.append(note_html("No eval/eval.json in this run: run `rlhfkit eval` for the headline numbers."))

    body.append("<h2>Stage timings</h2>")
    body.append(
        timings_html(pipeline) if pipeline else note_html("No pipeline.json in this run: no stage timings.")
    )

    plots: dict[str, tuple[bytes, str]] = {}
    rl_keys = [
        ("score", "reward-model score"), ("kl", "KL to reference (nats)"), ("gold", "gold reward"),
        ("rm_online_accuracy", "RM accuracy on new labels"),
    ]  # fmt: skip
    figures = [
        ("rl_curves", "RL", rl, rl_keys, "Means over each iteration's rollouts (training temperature); with "
         "online feedback, the reward model's agreement with the panel's rankings of each new batch, before "
         "it learns from them."),
        ("sft_loss", "SFT", sft, [("loss", "loss")], "Cross-entropy per answer token."),
        ("rm_curves", "Reward model", rm, [("loss", "loss"), ("accuracy", "pairwise accuracy")],
         "Bradley-Terry loss and the share of pairs ordered like the labels."),
    ]  # fmt: skip
    body.append("<h2>Training curves</h2>")
    for name, label, rows, keys, caption in figures:
        png = curves_plot(rows, keys)
        if png is None:
            body.append(
                note_html(f"{label}: no metrics ({name.split('_')[0]}/metrics.jsonl missing or empty).")
            )
            continue
        plots[name] = (png, f"{label}. {caption}")
        body.append(f"<h3>{esc(label)}</h3>" + figure_html(png, name, plots[name][1]))
        if name == "rl_curves" and not series(rl, "gold")[0]:
            body.append(note_html("RL metrics have no gold score: the gold curve is not shown."))

    if rl:
        body.append("<h3>RL health</h3>")
        words, png = health_html(rl, _read_json(run / "rl" / "health.json"))
        body.append(words)
        if png is not None:
            caption = (
                "The quantities the RL health checks watch, per iteration; dashed: each check's threshold "
                "(relative to the first iteration); crosses: iterations where the check fired."
            )
            plots["rl_health"] = (png, caption)
            body.append(figure_html(png, "rl_health", caption))

    body.append("<h2>Over-optimisation (Gao et al. 2022)</h2>")
    png = overoptimisation_plot(rl, evaluation)
    if png is None:
        body.append(
            note_html("Needs RL metrics with both kl and gold per iteration; not available in this run.")
        )
    else:
        caption = (
            "Gold reward against sqrt(KL) per RL iteration. The star is the final evaluation (KL and gold of "
            "the same temperature-1 policy samples); the lines are the greedy answers' gold."
        )
        plots["overoptimisation"] = (png, caption)
        body.append(figure_html(png, "overoptimisation", caption))

    body.append("<h2>Answers before and after</h2>")
    if answers:
        shown = min(SAMPLE_ANSWERS, len(answers))
        intro = f"The first {shown} prompts of the evaluation set (greedy answers), not picked."
        body.append(f"<p class='meta'>{intro}</p>" + answers_html(answers))
    else:
        body.append(note_html("No eval/answers.jsonl in this run."))

    for name, (png, _) in plots.items():
        write_atomic(run / "plots" / f"{name}.png", png)
    write_atomic(out, page_html(title, body))
    return out


def page_html(title: str, body: Sequence[str]) -> str:
    """A self-contained page: inline CSS, no script, a Content-Security-Policy that allows nothing else."""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
