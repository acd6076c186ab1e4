"""`patchflow ui`: a local page over the run history, with Rerun and "rerun with changes".

Stdlib only (http.server). JSON API: GET /api/runs, GET /api/runs/{id}, POST /api/runs/{id}/rerun with an
optional JSON body of parameter overrides, answering {"id": <new run id>} once the run is listed; each rerun
runs in a process of its own.
Files are served from $PATCHFLOW_HOME only. Every request first passes runner/request_checks.py (Host, Origin,
JSON-only changes, sizes, paths); what it refuses is answered with a 4xx and a JSON {"error": ...}.
"""

import html
import json
import os
import re
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipelines import registry
from runner import history
from runner.local_run import start_run_process, step_log
from runner.request_checks import Refused, check_request, parse_json_body
from schemas.errors import ContractError

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
.SUCCEEDED,.SUCCESS{color:#1a7f37}.FAILED,.FAILURE,.INTERRUPTED{color:#c62828}.RUNNING{color:#9a6700}
.dag{display:flex;gap:.4em;align-items:center;flex-wrap:wrap}.step{border:2px solid #999;border-radius:6px;
padding:.4em .7em}.step.SUCCEEDED{border-color:#1a7f37}.step.FAILED,.step.INTERRUPTED{border-color:#c62828}
.step.RUNNING{border-color:#9a6700}pre{background:#f6f8fa;padding:.6em;max-height:30em;overflow:auto;font-size:12px}
code{font-size:12px}.error{color:#c62828}"""

_RERUN_JS = """
async function rerun(id, body) {
  const r = await fetch('/api/runs/' + encodeURIComponent(id) + '/rerun', {method: 'POST',
    headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body || {})});
  const out = await r.json();
  if (!r.ok) { document.getElementById('message').textContent = out.error; return; }
  location.href = '/runs/' + encodeURIComponent(out.id);
}
"""


def _page(title: str, body: str, refresh: bool = False) -> bytes:
  meta = "<meta http-equiv='refresh' content='2'>" if refresh else ""
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{meta}"
          f"<style>{_STYLE}</style><script>{_RERUN_JS}</script></head><body>{body}"
          f"<p id='message' class='error'></p></body></html>").encode()


def _duration(run: dict) -> str:
  seconds = run.get("duration_seconds")
  if seconds is None and run.get("started") and run["status"] == "RUNNING":
    seconds = time.time() - run["started"]
  return f"{seconds:.1f} s" if seconds is not None else "-"


class _Handler(BaseHTTPRequestHandler):
  home: str = "runs"
  bound: tuple[str, int] = ("127.0.0.1", 8080)  # the address and port served, for the Host and Origin checks
  timeout = 30  # seconds a client may take to send a request (headers and body)
  # A request line without a version is answered as HTTP/1.0, with a status line: http.server's HTTP/0.9
  # default would answer a malformed request with a bare body that no client can tell from a dropped one.
  default_request_version = "HTTP/1.0"

  def log_message(self, fmt, *args):  # quiet; the terminal shows run progress instead
    pass

  def parse_request(self) -> bool:
    """http.server's parsing, then every check of runner/request_checks.py before any do_* method runs."""
    for _ in range(8):  # blank lines before a request line are skipped (RFC 9112, 2.2); http.server would close
      if self.raw_requestline not in (b"\r\n", b"\n"):
        break
      self.raw_requestline = self.rfile.readline(65537)
    if len(self.raw_requestline) > 65536:
      self.send_error(414)
      return False
    if not super().parse_request():
      return False
    try:
      self.checked = check_request(self.command, self.path, self.headers.items(), *self.bound,
                                   every_header_line_parsed=not self.headers.defects)
    except Refused as refused:
      self.close_connection = True  # its body, if any, is left unread
      self._json(refused.status, {"error": refused.reason})
      return False
    if self.command == "GET" and self.headers.get("Content-Length", "0").strip() != "0":
      self.close_connection = True  # a GET's body is not read
    return True

  def send_error(self, code, message=None, explain=None):
    # http.server answers an HTTP version it does not speak with 505; to a client that is a malformed request
    # like any other, answered with a 4xx (docs/ui.md).
    self.close_connection = True
    super().send_error(400 if code == 505 else code, message, explain)

  def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8"):
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, value):
    self._send(status, json.dumps(value, sort_keys=True).encode(), "application/json")

  def do_GET(self):
    path = self.checked.path
    try:
      if path == "/api/runs":
        return self._json(200, history.list_runs(self.home))
      if (m := re.fullmatch(r"/api/runs/([\w.-]+)", path)):
        return self._json(200, history.get_run(self.home, m.group(1)))
      if path == "/":
        return self._send(200, self._index())
      if (m := re.fullmatch(r"/runs/([\w.-]+)", path)):
        return self._send(200, self._run_page(history.get_run(self.home, m.group(1))))
      if (m := re.fullmatch(r"/runs/([\w.-]+)/logs/([\w.-]+)", path)):
        run = history.get_run(self.home, m.group(1))
        lines = step_log(os.path.join(run["run_dir"], "kfp.log"), m.group(2))
        return self._send(200, "\n".join(lines).encode(), "text/plain; charset=utf-8")
      if path.startswith("/files/"):
        return self._file(path[len("/files/"):])
    except ContractError as e:
      return self._json(404, {"error": str(e)}) if path.startswith("/api/") else self._send(
          404, _page("not found", f"<p class='error'>{html.escape(str(e))}</p>"))
    except Exception as e:  # noqa: BLE001 - a bug answers 500 with its one line, never a dropped connection
      return self._failed(e)
    self._send(404, _page("not found", "<p>not found</p>"))

  def do_POST(self):
    m = re.fullmatch(r"/api/runs/([\w.-]+)/rerun", self.checked.path)
    try:
      try:
        raw = self.rfile.read(self.checked.body_length)
      except TimeoutError:
        raise Refused(408, f"the body did not arrive within {self.timeout} s") from None
      overrides = parse_json_body(raw, self.checked.body_length)
      if not m:
        return self._json(404, {"error": "not found"})
      new_id = start_rerun(self.home, m.group(1), overrides)
    except Refused as refused:
      self.close_connection = True
      return self._json(refused.status, {"error": refused.reason})
    except ContractError as e:
      return self._json(404 if "unknown run id" in str(e) else 400, {"error": str(e)})
    except Exception as e:  # noqa: BLE001 - as in do_GET
      return self._failed(e)
    self._json(202, {"id": new_id})

  def _failed(self, error: Exception):
    traceback.print_exc()
    self.close_connection = True
    self._json(500, {"error": f"{type(error).__name__}: {error}"})

  def _file(self, rel: str):
    root = os.path.realpath(self.home)
    full = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, full]) != root or not os.path.isfile(full):
      return self._send(404, _page("not found", "<p>not found</p>"))
    kind = "text/html; charset=utf-8" if full.endswith(".html") else (
        "application/json" if full.endswith(".json") else "text/plain; charset=utf-8")
    with open(full, "rb") as f:
      self._send(200, f.read(), kind)

  def _link(self, path: str | None) -> str:
    if not path:
      return ""
    rel = os.path.relpath(path, os.path.realpath(self.home))
    return f"<a href='/files/{urllib.parse.quote(rel)}'>{html.escape(os.path.basename(path))}</a>"

  def _index(self) -> bytes:
    runs = history.list_runs(self.home)
    rows = []
    for r in runs:
      params = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
      rows.append(
          f"<tr data-run='{html.escape(r['id'])}'><td><a href='/runs/{html.escape(r['id'])}'>{html.escape(r['id'])}</a></td>"
          f"<td>{html.escape(r['pipeline'])}</td><td class='{r['status']}'>{r['status']}</td><td>{_duration(r)}</td>"
          f"<td><code>{html.escape(params)}</code></td>"
          f"<td>{self._link(r.get('report')) or html.escape(r.get('reason') or '')}</td>"
          f"<td><button onclick=\"rerun('{html.escape(r['id'])}')\">Rerun</button></td></tr>")
    table = ("<table><tr><th>run</th><th>pipeline</th><th>status</th><th>duration</th><th>parameters</th>"
             "<th>report or reason</th><th></th></tr>" + "".join(rows) + "</table>") if rows else "<p>No runs yet.</p>"
    running = any(r["status"] == "RUNNING" for r in runs)
    return _page("patchflow runs", f"<h1>patchflow runs</h1><p>{len(runs)} runs under "
                 f"<code>{html.escape(self.home)}</code></p>{table}", refresh=running)

  def _run_page(self, run: dict) -> bytes:
    try:
      order = list(registry.dag_order(run["pipeline"]))
    except ContractError:
      order = list(run["steps"])
    steps = "<span>&rarr;</span>".join(
        f"<div class='step {run['steps'].get(s, {}).get('verdict') or run['steps'].get(s, {}).get('status', 'PENDING')}'>"
        f"<b>{html.escape(s)}</b><br>{run['steps'].get(s, {}).get('verdict') or run['steps'].get(s, {}).get('status', 'pending')}"
        f"<br>{run['steps'].get(s, {}).get('seconds', '')}{' s' if 'seconds' in run['steps'].get(s, {}) else ''}</div>"
        for s in order)
    artifacts = []
    root = run.get("pipeline_root") or ""
    if os.path.isdir(root):
      for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        shown = [n for n in sorted(names) if n != "executor_output.json" and not n.endswith((".png", ".tfrecord"))]
        hidden = len(names) - len(shown) - ("executor_output.json" in names)
        for name in shown:
          full = os.path.join(folder, name)
          artifacts.append(f"<li>{self._link(full)} <code>{html.escape(os.path.relpath(full, root))}</code></li>")
        if hidden:
          artifacts.append(f"<li>{hidden} more files (images, shards) in "
                           f"<code>{html.escape(os.path.relpath(folder, root))}</code></li>")
    logs = " ".join(f"<a href='/runs/{html.escape(run['id'])}/logs/{html.escape(s)}'>{html.escape(s)}</a>"
                    for s in order if s in run["steps"])
    log_path = os.path.join(run["run_dir"], "kfp.log") if run.get("run_dir") else ""
    log_tail = ""
    if log_path and os.path.exists(log_path):
      with open(log_path, encoding="utf-8", errors="replace") as f:
        log_tail = "".join(re.sub(r"\x1b\[[0-9;]*m", "", line) for line in f.readlines()[-60:])
    params = run["params"]
    form = "".join(f"<label>{html.escape(k)} <input name='{html.escape(k)}' value='{html.escape(_form_value(v))}'>"
                   "</label><br>" for k, v in sorted(params.items()))
    body = (f"<p><a href='/'>&larr; all runs</a></p><h1>{html.escape(run['id'])}</h1>"
            f"<p>pipeline <b>{html.escape(run['pipeline'])}</b>, status <b class='{run['status']}' id='status'>"
            f"{run['status']}</b>, duration {_duration(run)}"
            f"{', rerun of <a href=/runs/' + html.escape(run['parent']) + '>' + html.escape(run['parent']) + '</a>' if run.get('parent') else ''}</p>"
            f"<p>{('report: ' + self._link(run.get('report'))) if run.get('report') else ''}</p>"
            f"{'<p class=error id=reason>' + html.escape(run['reason']) + '</p>' if run.get('reason') else ''}"
            f"<button id='rerun' onclick=\"rerun('{html.escape(run['id'])}')\">Rerun</button>"
            f"<h2>DAG</h2><div class='dag'>{steps}</div>"
            f"<h2>Rerun with changes</h2><form id='changes' onsubmit=\"event.preventDefault();"
            f"rerun('{html.escape(run['id'])}', Object.fromEntries(new FormData(this)))\">{form}"
            f"<button type='submit'>Rerun with these parameters</button></form>"
            f"<h2>Artifacts</h2><ul>{''.join(artifacts)}</ul><h2>Logs</h2><p>per step: {logs}</p><h3>last lines</h3><pre>{html.escape(log_tail)}</pre>")
    return _page(run["id"], body, refresh=run["status"] == "RUNNING")


def _form_value(value) -> str:
  """A parameter as the rerun form shows it and sends it back: lists and dicts (models, overrides) as JSON."""
  return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def start_rerun(home: str, run_id: str, overrides: dict) -> str:
  """Validates overrides against the pipeline's signature and ranges, creates the rerun (listed on return) and
  starts it in a process of its own; returns its id.

  Not in a thread of this server: kfp's DSL is not thread-safe (pipelines/registry.py), and a run's process
  handles the signals that stop it (INTERRUPTED) and outlives a restart of the UI."""
  previous = history.get_run(home, run_id)
  pipeline = registry.get_pipeline(previous["pipeline"])
  changed = registry.parse_parameters(pipeline, [f"{k}={v}" for k, v in overrides.items()])
  record, process = start_run_process(previous["pipeline"], {**previous["params"], **changed}, home, parent=run_id)
  threading.Thread(target=process.wait, daemon=True).start()  # reaps it when it ends
  return record["id"]


def serve(home: str, host: str = "127.0.0.1", port: int = 8080) -> None:
  handler = type("Handler", (_Handler,), {"home": os.path.realpath(home)})
  server = ThreadingHTTPServer((host, port), handler)
  handler.bound = (host, server.server_address[1])
  print(f"patchflow ui: http://{host}:{server.server_address[1]}/ (runs under {home}); Ctrl-C to stop", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
