"""The HTML pages, as Jinja2 templates kept in Python strings (no package data, no front-end build).

The environment autoescapes everything: prompts and model answers are untrusted text, shown with
``white-space: pre-wrap`` and never as markup. The one inline script carries the per-response CSP nonce.
"""

from __future__ import annotations

import jinja2

from rlhfkit.feedback.episode_templates import EPISODES

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - rlhfkit feedback</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #f6f6f4; }
header { display: flex; gap: 1em; align-items: center; padding: .5em 1em; background: #243b53; color: #fff; }
header a, header button { color: #fff; } header .grow { flex: 1; }
header form { margin: 0; } header button { background: none; border: 1px solid #fff8; cursor: pointer; }
main { max-width: 60em; margin: 1em auto; padding: 0 1em; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.card { background: #fff; border: 1px solid #ccd; border-radius: 6px; padding: .7em 1em; margin: .7em 0; }
.card.ranked { border-color: #2f855a; }
.key { display: inline-block; min-width: 1.4em; text-align: center; font-weight: bold;
       border: 1px solid #999; border-radius: 4px; background: #eee; }
.ranks label { margin-right: .8em; cursor: pointer; }
.error { color: #9b1c1c; font-weight: bold; } .muted { color: #666; }
table { border-collapse: collapse; }
td, th { padding: .2em .7em; border-bottom: 1px solid #ddd; text-align: left; }
.actions button { font-size: 1em; padding: .4em 1em; margin-right: .5em; cursor: pointer; }
</style></head><body>
{% if user %}<header><strong>rlhfkit feedback</strong>
<a href="/label">Label</a>{% if user.role == "admin" %}<a href="/admin">Admin</a>{% endif %}
<span class="grow"></span><span>{{ user.name }} ({{ user.role }})</span>
<form method="post" action="/logout"><input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit">Log out</button></form></header>{% endif %}
<main>{% block main %}{% endblock %}</main>
{% block script %}{% endblock %}
</body></html>"""

LOGIN = """{% extends "base.html" %}{% block main %}
<h1>Log in</h1>
{% if error %}<p class="error">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="csrf" value="{{ login_csrf }}">
<p><label>Name <input name="name" autocomplete="username" required autofocus></label></p>
<p><label>Password
<input name="password" type="password" autocomplete="current-password" required></label></p>
<p><button type="submit">Log in</button></p>
</form>{% endblock %}"""

PROGRESS = """<p class="muted" id="progress">Done: <strong>{{ done }}</strong> &middot;
Remaining: <strong>{{ remaining }}</strong></p>"""

DONE = """{% extends "base.html" %}{% block main %}
<h1>Nothing left to label</h1>{% include "progress.html" %}
<p>Thank you. Every item has its labels, or you have labelled all the items open to you.</p>
{% endblock %}"""

ITEM = """{% extends "base.html" %}{% block main %}
{% include "progress.html" %}
<details{% if done == 0 %} open{% endif %}><summary>Guidelines</summary><p class="text">{{ guidelines }}</p>
<p>Mouse: pick a rank for every answer (1 = best; the same rank for equally good answers), then
<em>Submit ranking</em>. Keyboard: press the answer letters from best to worst; press
<span class="key">=</span>
before a letter to tie it with the previous one; <span class="key">Backspace</span> clears,
<span class="key">Enter</span> submits, <span class="key">x</span> all bad,
<span class="key">s</span> skip.</p>
</details>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<h2>Prompt</h2>
{% if messages %}{% for m in messages %}<div class="card"><div class="muted">{{ m.role }}</div>
<div class="text">{{ m.content }}</div></div>{% endfor %}
{% else %}<div class="card text" id="prompt">{{ prompt }}</div>{% endif %}
<h2>Answers</h2>
<form method="post" action="/label/{{ item_id }}" id="label-form" data-k="{{ answers|length }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="submission_id" value="{{ submission_id }}">
{% for a in answers %}<div class="card answer" id="answer-{{ a.slot }}" data-slot="{{ a.slot }}">
<div><span class="key">{{ a.letter }}</span></div>
<div class="text answer-text">{{ a.text }}</div>
{% with slot = a.slot, k = answers|length %}{% include "rank_radios.html" %}{% endwith %}</div>{% endfor %}
{% include "rank_actions.html" %}{% endblock %}
{% block script %}{% include "rank_script.html" %}{% endblock %}"""

RANK_RADIOS = """<div class="ranks">Rank: {% for r in range(1, k + 1) %}
<label><input type="radio" name="rank_{{ slot }}" value="{{ r }}"
id="rank-{{ slot }}-{{ r }}"> {{ r }}</label>
{% endfor %}</div>"""
"""One candidate's rank radios (`slot`: its place on the page, `k`: how many), for answers and episodes."""

RANK_ACTIONS = """<p class="muted" id="order"></p>
<p class="actions">
<button type="submit" name="action" value="rank" id="submit-rank">Submit ranking</button>
<button type="submit" name="action" value="all_bad" id="submit-all-bad">All bad</button>
<button type="submit" name="action" value="skip" id="submit-skip">Skip</button>
</p></form>"""

RANK_SCRIPT = """<script nonce="{{ nonce }}">
(function () {
  var form = document.getElementById("label-form");
  var k = Number(form.dataset.k), letters = "abcdefghij", level = 0, tie = false, order = [];
  function show() {
    document.getElementById("order").textContent = order.length ? "Order: " + order.join(" ") : "";
    for (var s = 0; s < k; s++) {
      var ranked = form.querySelector('input[name="rank_' + s + '"]:checked') !== null;
      form.querySelector('[data-slot="' + s + '"]').classList.toggle("ranked", ranked);
    }
  }
  function rank(slot) {
    var r = tie && level > 0 ? level : level + 1;
    if (r > k) return;
    level = r;
    document.getElementById("rank-" + slot + "-" + r).checked = true;
    order.push((tie && order.length ? "= " : (order.length ? "> " : "")) + letters[slot].toUpperCase());
    tie = false;
  }
  function reset() {
    form.querySelectorAll('input[type="radio"]').forEach(function (e) { e.checked = false; });
    level = 0; tie = false; order = [];
  }
  form.addEventListener("change", show);
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var t = ev.target.tagName;
    if (t === "TEXTAREA" || (t === "INPUT" && ev.target.type === "text")) return;
    var key = ev.key.toLowerCase(), slot = letters.indexOf(key);
    if (key.length === 1 && slot >= 0 && slot < k) rank(slot);
    else if (key === "=") tie = true;
    else if (key === "backspace") reset();
    else if (key === "enter") document.getElementById("submit-rank").click();
    else if (key === "x") document.getElementById("submit-all-bad").click();
    else if (key === "s") document.getElementById("submit-skip").click();
    else return;
    ev.preventDefault();
    show();
  });
  show();
})();
</script>"""
"""The ranking interaction of the answers and the episodes pages: radio buttons `rank_{slot}` in cards
with `data-slot`, or the keys (letters best to worst, `=` ties, Backspace, Enter, x, s)."""

MESSAGE = """{% extends "base.html" %}{% block main %}
<h1>{{ title }}</h1><p class="{{ 'error' if error else '' }}">{{ message }}</p>
<p><a href="/label">Continue</a></p>{% endblock %}"""

ADMIN = """{% extends "base.html" %}{% block main %}
<h1>Project</h1>
{% if message %}<p class="{{ 'error' if error else '' }}" id="message">{{ message }}</p>{% endif %}
<p>{{ counts["items"] }} items, overlap N = {{ overlap }}; {{ counts["complete"] }} items have N labels.
Labels: {{ counts["rank"] }} rankings, {{ counts["all_bad"] }} all bad, {{ counts["skip"] }} skipped.</p>
<p>Export: <a href="/admin/export?format=rankings">rankings</a> &middot;
<a href="/admin/export?format=pairs">pairs</a> (all-bad and skipped labels are left out)</p>
<h2>Agreement</h2>
<p>Over {{ report.items }} items ranked by two or more annotators.</p>
<table id="agreement">
<tr><th>Pairwise agreement</th><td>{{ pct(report.pairwise.value) }}</td>
<td class="muted">{{ report.pairwise.compared }} compared pairs</td></tr>
<tr><th>Leave-one-out agreement</th><td>{{ pct(report.leave_one_out.value) }}</td>
<td class="muted">each annotator against the others' mean rank</td></tr>
<tr><th>Krippendorff's alpha (interval, mid-ranks)</th><td>{{ num(report.alpha_interval) }}</td>
<td class="muted">1 = perfect, 0 = chance</td></tr>
<tr><th>Krippendorff's alpha (ordinal)</th><td>{{ num(report.alpha_ordinal) }}</td><td></td></tr>
</table>
<h2>Annotators</h2>
<table id="annotators"><tr><th>Name</th><th>Role</th><th>Rankings</th><th>All bad</th><th>Skipped</th>
<th>Leave-one-out agreement</th></tr>
{% for u in users %}<tr><td>{{ u.name }}</td><td>{{ u.role }}</td><td>{{ per_user[u.name]["rank"] }}</td>
<td>{{ per_user[u.name]["all_bad"] }}</td><td>{{ per_user[u.name]["skip"] }}</td>
<td>{{ pct(report.per_annotator[u.name].value) if u.name in report.per_annotator else "-" }}</td></tr>
{% endfor %}</table>
<h3>Add an account</h3>
<form method="post" action="/admin/users"><input type="hidden" name="csrf" value="{{ csrf }}">
<label>Name <input name="name" required></label>
<label>Role <select name="role"><option>annotator</option><option>admin</option></select></label>
<label>Password (8+ characters) <input name="password" type="password" minlength="8" required></label>
<button type="submit">Add</button></form>
<h2>Items, least agreement first</h2>
<table id="items"><tr><th>Item</th><th>Rankings</th><th>Pairwise</th><th>Leave-one-out</th></tr>
{% for item_id, n, pw, loo in items %}<tr><td>{{ item_id }}</td><td>{{ n }}</td><td>{{ pct(pw.value) }}</td>
<td>{{ pct(loo.value) }}</td></tr>{% endfor %}</table>
{% endblock %}"""

TEMPLATES = {
    "base.html": BASE,
    "login.html": LOGIN,
    "progress.html": PROGRESS,
    "done.html": DONE,
    "item.html": ITEM,
    "rank_script.html": RANK_SCRIPT,
    "rank_radios.html": RANK_RADIOS,
    "rank_actions.html": RANK_ACTIONS,
    "episodes.html": EPISODES,
    "message.html": MESSAGE,
    "admin.html": ADMIN,
}


def environment() -> jinja2.Environment:
    """Templates with autoescaping always on (not by file extension) and undefined names as errors."""
    env = jinja2.Environment(
        loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.globals["pct"] = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    env.globals["num"] = lambda v: "-" if v is None else f"{v:.3f}"
    return env
