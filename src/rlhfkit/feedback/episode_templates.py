"""The ranking page of an episode item: the task, then each episode turn by turn, ranked like answers.

Every text on it (the task, the agent's turns, tool names and arguments, tool and user outputs) is model
or environment output and untrusted: it goes through Jinja2's autoescaping as text, never as markup (a tool
output holding ``<script>`` shows those characters). A long output is folded into ``<details>`` with its
first line as the summary. Episodes are named A, B, C... in a per-annotator random order; the model that
acted and the environment's reward are not on the page. The ranking radios and keys are the answers page's
(``rank_script.html``); each assistant turn has a "went wrong here" checkbox ``flag_{slot}`` = turn index.
"""

from __future__ import annotations

EPISODES = """{% extends "base.html" %}{% block main %}
<style>
.turn { border-left: 3px solid #ccd; padding: .2em .7em; margin: .5em 0; }
.turn.assistant { border-color: #2b6cb0; } .turn.tool { border-color: #b7791f; background: #fbf8f1; }
.turn.user { border-color: #718096; }
.who { font-size: .85em; font-weight: bold; color: #555; }
.call { font-family: ui-monospace, monospace; font-size: .9em; background: #eef2f7; padding: .2em .4em;
        margin: .2em 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.flag { font-size: .85em; color: #9b1c1c; cursor: pointer; }
.turn.assistant:has(.flag input:checked) { border-color: #9b1c1c; background: #fdf0f0; }
.output { font-family: ui-monospace, monospace; font-size: .9em; }
</style>
{% include "progress.html" %}
<details{% if done == 0 %} open{% endif %}><summary>Guidelines</summary><p class="text">{{ guidelines }}</p>
<p>Mouse: pick a rank for every episode (1 = best; the same rank for equally good episodes), tick
<em>went wrong here</em> on the turn where an episode went wrong, then <em>Submit ranking</em>.
Keyboard: press the episode letters from best to worst; press <span class="key">=</span> before a letter
to tie it with the previous one; <span class="key">Backspace</span> clears the ranks,
<span class="key">Enter</span> submits, <span class="key">x</span> all bad,
<span class="key">s</span> skip.</p>
</details>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<h2>Task</h2>
<div id="task">{% for m in prompt %}<div class="card"><div class="muted">{{ m.role }}</div>
<div class="text">{{ m.content }}</div></div>{% endfor %}</div>
{% if tools %}<details id="tools"><summary>Tools the agent had ({{ tools|length }})</summary><ul>
{% for t in tools %}<li><code>{{ t.name }}</code>: <span class="text">{{ t.description }}</span></li>
{% endfor %}</ul></details>{% endif %}
<h2>Episodes</h2>
<form method="post" action="/label/{{ item_id }}" id="label-form" data-k="{{ episodes|length }}">
<input type="hidden" name="csrf" value="{{ csrf }}">
<input type="hidden" name="submission_id" value="{{ submission_id }}">
{% for e in episodes %}<div class="card episode" id="episode-{{ e.slot }}" data-slot="{{ e.slot }}">
<div><span class="key">{{ e.letter }}</span> Episode {{ e.letter }}</div>
{% for t in e.turns %}<div class="turn {{ t.role }}">
{% if t.role == "assistant" %}<div class="who">Agent, turn {{ t.turn + 1 }}</div>
{% if t.content %}<div class="text assistant-text">{{ t.content }}</div>{% endif %}
{% for c in t.calls %}<div class="call">&#9654; {{ c.name }}({{ c.arguments }})</div>{% endfor %}
<label class="flag"><input type="checkbox" name="flag_{{ e.slot }}" value="{{ t.turn }}"
id="flag-{{ e.slot }}-{{ t.turn }}"> went wrong here</label>
{% else %}<div class="who">{% if t.role == "tool" %}Tool result{% if t.name %}: {{ t.name }}{% endif %}
{% else %}{{ t.role|capitalize }}{% endif %}</div>
{% if t.long %}<details class="folded"><summary><span class="text">{{ t.preview }}</span>
<span class="muted">({{ t.content|length }} characters)</span></summary>
<div class="text output">{{ t.content }}</div></details>
{% else %}<div class="text output">{{ t.content }}</div>{% endif %}{% endif %}
</div>{% endfor %}
{% if e.stopped %}<p class="muted stopped">The episode was stopped here by {{ e.stopped }}.</p>{% endif %}
{% with slot = e.slot, k = episodes|length %}{% include "rank_radios.html" %}{% endwith %}</div>{% endfor %}
{% include "rank_actions.html" %}{% endblock %}
{% block script %}{% include "rank_script.html" %}{% endblock %}"""
