"""The console's Jinja2 templates, its style sheet and its one small script, as Python strings.

Why strings in a module and not files in a folder: the package then needs no package-data rules and
the MAP's staging copies it like any other module; the pages are small. Autoescaping is on for
every template (:mod:`app.web.console`), so a UID or an error message can never become markup.
"""

from __future__ import annotations

BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · HyperCT Node</title>
<link rel="stylesheet" href="/static/console.css">
<script src="/static/console.js" defer></script>
</head>
<body>
<header>
  <strong>HyperCT Node</strong>
  <nav>
    <a href="/"{% if nav == 'status' %} class="here"{% endif %}>Status</a>
    <a href="/studies"{% if nav == 'studies' %} class="here"{% endif %}>Studies</a>
    <a href="/jobs"{% if nav == 'jobs' %} class="here"{% endif %}>Jobs</a>
    <a href="/outbox"{% if nav == 'outbox' %} class="here"{% endif %}>Outbox</a>
  </nav>
  <span id="live" title="live updates">offline</span>
</header>
<p class="ruo">Research use only. Not a medical device; results are not for diagnosis.</p>
{% if message %}<p class="message" role="status">{{ message }}</p>{% endif %}
<main data-live>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

STATUS = """{% extends "base.html" %}
{% block main %}
<h1>Node status</h1>
{% for w in warnings %}<p class="warning">warning: {{ w }}</p>{% endfor %}
<div class="cards">
<section class="card" id="receiver">
  <h2>Receiver</h2>
  <dl>
    <dt>state</dt><dd class="{{ 'ok' if receiver.listening else 'bad' }}">{{ 'listening' if receiver.listening else 'stopped' }}</dd>
    <dt>AE title</dt><dd>{{ receiver.ae_title }}</dd>
    <dt>address</dt><dd>{{ receiver.bind }}:{{ receiver.port }}{% if receiver.tls %} (TLS){% endif %}</dd>
    <dt>received since start</dt><dd>{{ receiver.received }}</dd>
    <dt>failed since start</dt><dd>{{ receiver.failed }}</dd>
    <dt>associations rejected</dt><dd>{{ receiver.rejected }}</dd>
    <dt>instances (all time)</dt><dd>{{ counts.instances }} (duplicates {{ counts.duplicates }})</dd>
    <dt>STOW-RS</dt><dd>{% if stow %}/dicomweb/studies as {{ stow }}{% else %}off{% endif %}</dd>
  </dl>
</section>
<section class="card" id="worker">
  <h2>Worker</h2>
  <dl>
    <dt>state</dt><dd>{% if worker.running %}running job {% for j in worker.running %}<a href="/jobs/{{ j.id }}">{{ j.id }}</a> {% endfor %}{% elif worker.ready %}idle{% else %}loading the model{% endif %}</dd>
    <dt>queue depth</dt><dd>{{ queue_depth }}</dd>
    <dt>jobs</dt><dd>{{ counts.jobs|states }}</dd>
    <dt>processing</dt><dd>{% if counts.processing_count %}{{ '%.1f'|format(counts.processing_seconds / counts.processing_count) }} s per job ({{ counts.processing_count }} runs){% else %}-{% endif %}</dd>
  </dl>
</section>
<section class="card" id="outbox-card">
  <h2>Outbox</h2>
  <dl>
    <dt>rows</dt><dd>{{ counts.outbox|states }}</dd>
    <dt>destinations</dt><dd>{% for d in outbox.destinations %}{{ d }}{% if not loop.last %}, {% endif %}{% else %}none (results stay in results/){% endfor %}</dd>
    <dt>next attempt</dt><dd>{{ outbox.next_due|when }}</dd>
  </dl>
</section>
<section class="card" id="disk">
  <h2>Disk</h2>
  <dl>
    <dt>free</dt><dd class="{{ 'bad' if disk.free_fraction < 0.1 else 'ok' }}">{{ disk.free|size }} of {{ disk.total|size }} ({{ '%.0f'|format(100 * disk.free_fraction) }} %)</dd>
    <dt>studies</dt><dd>{{ counts.studies|states }}</dd>
  </dl>
</section>
</div>
<h2>Last errors</h2>
{% if errors %}
<table><thead><tr><th>when</th><th>kind</th><th>study</th><th>job</th><th>message</th></tr></thead><tbody>
{% for e in errors %}<tr><td>{{ e.at|when }}</td><td>{{ e.kind }}</td><td>{% if e.study_uid %}<a href="/studies/{{ e.study_uid }}">{{ e.study_uid|short }}</a>{% endif %}</td><td>{% if e.job_id %}<a href="/jobs/{{ e.job_id }}">{{ e.job_id }}</a>{% endif %}</td><td class="text">{{ e.message|truncate(300) }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p>none</p>{% endif %}
{% endblock %}
"""

STUDIES = """{% extends "base.html" %}
{% block main %}
<h1>Studies</h1>
<table id="studies"><thead><tr><th>study</th><th>state</th><th>instances</th><th>first received</th><th>last received</th><th>job</th><th>processing</th><th>note</th></tr></thead><tbody>
{% for s in studies %}<tr data-study="{{ s.study_uid }}" data-state="{{ s.state }}"><td><a href="/studies/{{ s.study_uid }}">{{ s.study_uid }}</a></td><td class="state {{ s.state }}">{{ s.state }}</td><td>{{ s.instance_count }}</td><td>{{ s.first_received|when }}</td><td>{{ s.last_received|when }}</td><td>{% if s.job %}<a href="/jobs/{{ s.job.id }}">{{ s.job.id }}</a> {{ s.job.state }}{% endif %}</td><td>{{ s.job|duration }}</td><td class="text">{{ (s.error or '')|truncate(200) }}</td></tr>
{% else %}<tr><td colspan="8">no study yet</td></tr>{% endfor %}
</tbody></table>
<h2>Purge</h2>
<form method="post" action="/purge" class="inline">
  <input type="hidden" name="csrf" value="{{ csrf }}">
  forget studies finished more than <input name="older_than_days" value="30" size="4" inputmode="decimal"> days ago
  <label><input type="checkbox" name="include_failed" value="1"> failed ones too</label>
  <button type="submit">purge</button>
</form>
{% endblock %}
"""

STUDY = """{% extends "base.html" %}
{% block main %}
<h1>Study {{ study.study_uid }}</h1>
<dl class="facts">
  <dt>state</dt><dd class="state {{ study.state }}" id="study-state">{{ study.state }}</dd>
  <dt>instances</dt><dd>{{ study.instance_count }} ({{ study.trigger_count }} CT)</dd>
  <dt>calling AE</dt><dd>{{ study.calling_ae or '-' }}</dd>
  <dt>first / last received</dt><dd>{{ study.first_received|when }} / {{ study.last_received|when }}</dd>
  <dt>updated</dt><dd>{{ study.updated_at|when }}</dd>
  {% if study.error %}<dt>error</dt><dd class="text bad">{{ study.error }}</dd>{% endif %}
</dl>
<h2>Jobs</h2>
<table><thead><tr><th>job</th><th>state</th><th>tries</th><th>created</th><th>started</th><th>finished</th><th>time</th><th>reason</th></tr></thead><tbody>
{% for j in jobs %}<tr><td><a href="/jobs/{{ j.id }}">{{ j.id }}</a></td><td class="state {{ j.state }}">{{ j.state }}</td><td>{{ j.attempts }}</td><td>{{ j.created_at|when }}</td><td>{{ j.started_at|when }}</td><td>{{ j.finished_at|when }}</td><td>{{ j|duration }}</td><td class="text">{{ (j.reason or '')|truncate(200) }}</td></tr>
{% else %}<tr><td colspan="8">no job</td></tr>{% endfor %}
</tbody></table>
<h2>Findings</h2>
{% if results %}
<p>Job {{ results.job_id }}, model {{ results.model.name }} {{ results.model.version }}{% if results.model.synthetic %} <strong class="bad">SYNTHETIC DEMO MODEL, NOT CLINICAL</strong>{% endif %}.</p>
<table id="findings"><thead><tr><th>finding</th><th>group</th><th>probability</th><th>threshold</th><th>decision</th><th>key image</th></tr></thead><tbody>
{% for t in results.tasks %}<tr data-task="{{ t.key }}" class="{{ t.decision }}"><td>{{ t.name }}</td><td>{{ t.group }}</td><td>{{ '%.3f'|format(t.probability) }}</td><td>{{ '%.3f'|format(t.threshold) }}</td><td>{{ t.decision }}</td><td>{% if t.key_image %}<a href="#key-{{ t.key }}">view</a>{% endif %}</td></tr>
{% endfor %}</tbody></table>
<h2>Key images</h2>
<div class="gallery">
{% for t in results.tasks if t.key_image %}<figure id="key-{{ t.key }}"><img src="/key-images/{{ results.job_id }}/{{ t.key }}.png" alt="key image: {{ t.name }}" width="640" height="608" loading="lazy"><figcaption>{{ t.name }}: {{ '%.3f'|format(t.probability) }}; the slice where the model's attention peaks (not a lesion outline)</figcaption></figure>
{% else %}<p>no key image (no positive finding with an attention map)</p>{% endfor %}
</div>
{% else %}<p>no results yet</p>{% endif %}
{% endblock %}
"""

JOBS = """{% extends "base.html" %}
{% block main %}{% from "macros.html" import retry_form with context %}
<h1>Jobs{% if state %} ({{ state }}){% endif %}</h1>
<p class="filters">{% for s in job_states %}<a href="/jobs?state={{ s }}"{% if s == state %} class="here"{% endif %}>{{ s }}</a> {% endfor %}<a href="/jobs">all</a></p>
<table id="jobs"><thead><tr><th>job</th><th>study</th><th>state</th><th>tries</th><th>created</th><th>time</th><th>error</th><th></th></tr></thead><tbody>
{% for j in jobs %}<tr data-job="{{ j.id }}" data-state="{{ j.state }}"><td><a href="/jobs/{{ j.id }}">{{ j.id }}</a></td><td><a href="/studies/{{ j.study_uid }}">{{ j.study_uid|short }}</a></td><td class="state {{ j.state }}">{{ j.state }}</td><td>{{ j.attempts }}</td><td>{{ j.created_at|when }}</td><td>{{ j|duration }}</td><td class="text">{{ (j.reason or '')|truncate(200) }}</td><td>{% if j.retryable %}{{ retry_form(j.id) }}{% endif %}</td></tr>
{% else %}<tr><td colspan="8">no job</td></tr>{% endfor %}
</tbody></table>
{% endblock %}
"""

JOB = """{% extends "base.html" %}
{% block main %}{% from "macros.html" import retry_form with context %}
<h1>Job {{ job.id }}</h1>
<dl class="facts">
  <dt>study</dt><dd><a href="/studies/{{ job.study_uid }}">{{ job.study_uid }}</a> ({{ job.study.state }})</dd>
  <dt>state</dt><dd class="state {{ job.state }}" id="job-state">{{ job.state }}</dd>
  <dt>tries</dt><dd>{{ job.attempts }}</dd>
  <dt>created / started / finished</dt><dd>{{ job.created_at|when }} / {{ job.started_at|when }} / {{ job.finished_at|when }} ({{ job|duration }})</dd>
  <dt>outcome</dt><dd>{{ job.outcome or '-' }}</dd>
  {% if job.reason %}<dt>reason</dt><dd class="text">{{ job.reason }}</dd>{% endif %}
</dl>
{% if job.retryable %}{{ retry_form(job.id) }}{% endif %}
<h2>Results sent</h2>
<table id="job-outbox"><thead><tr><th>row</th><th>destination</th><th>SOP Instance UID</th><th>state</th><th>attempts</th><th>next attempt</th><th>sent</th><th>last error</th></tr></thead><tbody>
{% for r in job.outbox %}<tr data-state="{{ r.state }}"><td>{{ r.id }}</td><td>{{ r.destination }}</td><td>{{ r.sop_uid }}</td><td class="state {{ r.state }}">{{ r.state }}</td><td>{{ r.attempts }}</td><td>{{ r.next_attempt_at|when if r.state == 'pending' else '-' }}</td><td>{{ r.sent_at|when }}</td><td class="text">{{ (r.last_error or '')|truncate(200) }}</td></tr>
{% else %}<tr><td colspan="8">nothing to send</td></tr>{% endfor %}
</tbody></table>
<h2>Attempts</h2>
<table><thead><tr><th>kind</th><th>started</th><th>finished</th><th>ok</th><th>detail</th></tr></thead><tbody>
{% for a in job.attempts_log %}<tr><td>{{ a.kind }}{% if a.outbox_id %} (row {{ a.outbox_id }}){% endif %}</td><td>{{ a.started_at|when }}</td><td>{{ a.finished_at|when }}</td><td>{{ {1: 'yes', 0: 'no'}.get(a.ok, '-') }}</td><td class="text">{{ (a.detail or '')|truncate(300) }}</td></tr>
{% endfor %}</tbody></table>
<h2>Errors</h2>
<table><thead><tr><th>when</th><th>kind</th><th>message</th></tr></thead><tbody>
{% for e in job.errors %}<tr><td>{{ e.at|when }}</td><td>{{ e.kind }}</td><td class="text">{{ e.message|truncate(500) }}</td></tr>
{% else %}<tr><td colspan="3">none</td></tr>{% endfor %}
</tbody></table>
{% endblock %}
"""

OUTBOX = """{% extends "base.html" %}
{% block main %}{% from "macros.html" import retry_form with context %}
<h1>Outbox</h1>
<p>{{ counts|states }}</p>
<table id="outbox"><thead><tr><th>row</th><th>job</th><th>study</th><th>destination</th><th>SOP Instance UID</th><th>state</th><th>attempts</th><th>next attempt</th><th>sent</th><th>last error</th><th></th></tr></thead><tbody>
{% for r in rows %}<tr data-row="{{ r.id }}" data-state="{{ r.state }}"><td>{{ r.id }}</td><td>{% if r.job_id %}<a href="/jobs/{{ r.job_id }}">{{ r.job_id }}</a>{% endif %}</td><td><a href="/studies/{{ r.study_uid }}">{{ r.study_uid|short }}</a></td><td>{{ r.destination }}</td><td>{{ r.sop_uid|short }}</td><td class="state {{ r.state }}">{{ r.state }}</td><td>{{ r.attempts }}</td><td>{{ r.next_attempt_at|when if r.state == 'pending' else '-' }}</td><td>{{ r.sent_at|when }}</td><td class="text">{{ (r.last_error or '')|truncate(200) }}</td><td>{% if r.state == 'failed' and r.job_id %}{{ retry_form(r.job_id) }}{% endif %}</td></tr>
{% else %}<tr><td colspan="11">empty</td></tr>{% endfor %}
</tbody></table>
{% endblock %}
"""

MACROS = """{% macro retry_form(job_id) -%}
<form method="post" action="/jobs/{{ job_id }}/retry" class="inline"><input type="hidden" name="csrf" value="{{ csrf }}"><button type="submit" class="retry" data-job="{{ job_id }}">retry</button></form>
{%- endmacro %}
"""

TEMPLATES = {
    "base.html": BASE,
    "status.html": STATUS,
    "studies.html": STUDIES,
    "study.html": STUDY,
    "jobs.html": JOBS,
    "job.html": JOB,
    "outbox.html": OUTBOX,
    "macros.html": MACROS,
}

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1.2em; background: #1d2b3a; color: #fff; }
header nav a { color: #cfe3ff; margin-right: 1em; text-decoration: none; }
header nav a.here { color: #fff; font-weight: 600; border-bottom: 2px solid #fff; }
#live { margin-left: auto; font-size: 12px; color: #ffb4a8; }
#live.on { color: #9be39b; }
.ruo { margin: 0; padding: .3em 1.2em; background: #fff4d6; font-size: 12px; }
.message { margin: .6em 1.2em; padding: .5em .8em; background: #e6f4ea; border: 1px solid #9bcfa8; }
main { padding: .4em 1.2em 2em; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.4em; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border: 1px solid #dde1e6; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #eef1f4; font-weight: 600; }
td.text { max-width: 40em; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(18em, 1fr)); gap: 1em; }
.card { background: #fff; border: 1px solid #dde1e6; padding: .4em 1em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dt { color: #5b6672; } dd { margin: 0; }
.ok, .done, .sent { color: #1a7f37; }
.bad, .failed, .quarantined { color: #b42318; font-weight: 600; }
.pending, .queued, .running, .processing, .sending, .receiving, .complete { color: #8a5a00; }
tr.present td { background: #fff1f0; }
form.inline { display: inline; }
button { cursor: pointer; }
.warning { color: #8a5a00; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; background: #000; color: #eee; padding: .4em; }
.gallery img { display: block; max-width: 100%; height: auto; }
.filters a { margin-right: .6em; } .filters a.here { font-weight: 600; }
"""

JS = """// Live updates: the node sends a server-sent event when its state changes; the page fetches
// itself again and swaps its <main>, so nothing reloads and no click is lost.
(function () {
  'use strict';
  var main = document.querySelector('main[data-live]');
  var badge = document.getElementById('live');
  if (!main || !window.EventSource) { return; }
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: 'same-origin', headers: { 'Accept': 'text/html' } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, 'text/html').querySelector('main[data-live]');
        if (fresh && fresh.innerHTML !== main.innerHTML) { main.innerHTML = fresh.innerHTML; }
        document.body.setAttribute('data-updated', String(Date.now()));
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource('/events');
  source.addEventListener('open', function () { badge.textContent = 'live'; badge.className = 'on'; });
  source.addEventListener('error', function () { badge.textContent = 'reconnecting'; badge.className = ''; });
  source.addEventListener('change', refresh);
})();
"""
