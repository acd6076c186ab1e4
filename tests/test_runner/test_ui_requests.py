"""The UI refuses cross-site and malformed requests (runner/request_checks.py), over raw HTTP on 127.0.0.1, in
a seeded fuzz of malformed requests, and in a real headless Chromium visiting another site."""

import http.server
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from pipelines import registry
from runner import history

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_ID = "smoke-20260101-000000-abcdef"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
  """`patchflow ui` on 127.0.0.1 over a history holding one finished smoke run: (process, port, home)."""
  home = tmp_path_factory.mktemp("home")
  defaults = {k: d for k, (_, d) in registry.signature(registry.get_pipeline("smoke")).items()}
  history.save_run(str(home), {"id": RUN_ID, "pipeline": "smoke", "status": "SUCCEEDED", "params": defaults,
                               "target": "local", "started": time.time(), "steps": {}})
  port = _free_port()
  exe = os.path.join(os.path.dirname(sys.executable), "patchflow")
  process = subprocess.Popen([exe, "ui", "--home", str(home), "--port", str(port)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  for _ in range(200):
    try:
      urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=1)
      break
    except OSError:
      time.sleep(0.05)
  yield process, port, home
  process.terminate()
  process.wait(10)


def _exchange(port, data: bytes, timeout=10.0):
  """Sends raw bytes, closes the sending side, reads the answer to the end: (status or None, head, body)."""
  with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
    try:
      s.sendall(data)
      s.shutdown(socket.SHUT_WR)
    except OSError:
      pass  # the server may answer (and close) before reading all of a refused request
    chunks = []
    try:
      while (chunk := s.recv(65536)):
        chunks.append(chunk)
    except ConnectionResetError:
      pass
  raw = b"".join(chunks)
  head, _, body = raw.partition(b"\r\n\r\n")
  first = head.split(b"\r\n", 1)[0].split()
  status = int(first[1]) if len(first) >= 2 and first[0].startswith(b"HTTP/1.") and first[1].isdigit() else None
  return status, head.decode("latin-1"), body


def _request(port, method="POST", path=f"/api/runs/{RUN_ID}/rerun", headers=None, body=b"", host=None):
  lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
  lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json_post(port, body=b"{}", **extra):
  return _request(port, headers={"Content-Type": "application/json", "Content-Length": str(len(body)), **extra},
                  body=body)


def _run_ids(home):
  return [r["id"] for r in history.list_runs(str(home))]


@pytest.mark.parametrize("name, make, status, error", [
    ("text/plain JSON, as a cross-site form or no-cors fetch sends it",
     lambda p: _request(p, headers={"Content-Type": "text/plain", "Content-Length": "2"}, body=b"{}"), 415,
     "a change must be a JSON request (Content-Type: application/json), got 'text/plain'"),
    ("a form post", lambda p: _request(p, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                   "Content-Length": "7"}, body=b"steps=5"), 415, None),
    ("no content type", lambda p: _request(p, headers={"Content-Length": "2"}, body=b"{}"), 415, None),
    ("another site's origin", lambda p: _json_post(p, Origin="http://evil.example"), 403,
     "origin 'http://evil.example' is not this server's"),
    ("an opaque origin", lambda p: _json_post(p, Origin="null"), 403, None),
    ("the right host on another port as origin", lambda p: _json_post(p, Origin="http://127.0.0.1:1"), 403, None),
    ("a rebound name", lambda p: _request(p, "GET", "/api/runs", host=f"rebind.example:{p}"), 403,
     f"host 'rebind.example:{{port}}' is not this server's (a DNS rebinding?)"),
    ("another port in Host", lambda p: _request(p, "GET", "/", host="127.0.0.1:1"), 403, None),
    ("no Host", lambda p: f"GET /api/runs HTTP/1.0\r\n\r\n".encode(), 400, "exactly one Host header is required"),
    ("a body over the cap", lambda p: _json_post(p, body=b"", **{"Content-Length": str(400 * 2**20)}), 413,
     "request body of 419430400 bytes is over the limit of 65536"),
    ("a malformed Content-Length", lambda p: _request(p, headers={"Content-Type": "application/json",
                                                                  "Content-Length": "12abc"}, body=b"{}"), 400,
     "Content-Length '12abc' is not a byte count"),
    ("a negative Content-Length", lambda p: _request(p, headers={"Content-Type": "application/json",
                                                                 "Content-Length": "-2"}, body=b"{}"), 400, None),
    ("a chunked body", lambda p: _request(p, headers={"Content-Type": "application/json",
                                                      "Transfer-Encoding": "chunked"}, body=b"2\r\n{}\r\n0\r\n\r\n"),
     411, None),
    ("%00 in a file path", lambda p: _request(p, "GET", "/files/a%00b"), 400,
     "the path holds a control character"),
    ("%00 in a run path", lambda p: _request(p, "GET", "/runs/x%00"), 400, None),
    ("not UTF-8 when decoded", lambda p: _request(p, "GET", "/files/%ff"), 400, None),
    ("an absolute target", lambda p: _request(p, "GET", "http://evil.example/api/runs"), 400, None),
    ("a cross-origin preflight", lambda p: _request(p, "OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}), 405, None),
    ("a body shorter than its Content-Length", lambda p: _request(p, headers={
        "Content-Type": "application/json", "Content-Length": "50"}, body=b"{}"), 400, None),
    ("a JSON list", lambda p: _json_post(p, b"[1]"), 400,
     "the request body must be a JSON object of parameter overrides"),
    ("not JSON", lambda p: _json_post(p, b"{steps: 5}"), 400, None),
    ("deeply nested JSON", lambda p: _json_post(p, b"[" * 30000 + b"]" * 30000), 400, None),
])
def test_a_refused_request_is_answered_and_starts_nothing(ui, name, make, status, error):
  process, port, home = ui
  got, head, body = _exchange(port, make(port))
  assert got == status, f"{name}: {head!r} {body[:300]!r}"
  assert "Access-Control-Allow-Origin" not in head
  if error:
    assert json.loads(body)["error"] == error.format(port=port)
  assert process.poll() is None and _run_ids(home) == [RUN_ID]


def test_curl_on_this_machine_reaches_the_parameter_checks(ui):
  """`curl -H 'Content-Type: application/json' --data ...`: no Origin, the bound host; localhost names it too."""
  _, port, home = ui
  status, _, body = _exchange(port, _json_post(port, b'{"steps": "lots"}', **{"User-Agent": "curl/8"}))
  assert (status, json.loads(body)) == (400, {"error": "parameter 'steps': expected int, got 'lots'"})
  for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
    status, _, body = _exchange(port, _request(port, "GET", "/api/runs", host=host))
    assert status == 200 and [r["id"] for r in json.loads(body)] == [RUN_ID]


@pytest.mark.slow
def test_a_json_post_from_this_machine_or_the_uis_own_page_starts_a_listed_rerun(ui):
  _, port, home = ui
  status, _, body = _exchange(port, _json_post(port, b'{"steps": 3}', Origin=f"http://127.0.0.1:{port}",
                                               **{"Content-Type": "application/json; charset=utf-8"}))
  assert status == 202, body
  new_id = json.loads(body)["id"]
  record = history.get_run(str(home), new_id)  # listed when the answer came
  assert record["status"] == "RUNNING" and record["parent"] == RUN_ID and record["params"]["steps"] == 3
  deadline = time.time() + 60
  while not history.get_run(str(home), new_id)["steps"] and time.time() < deadline:
    time.sleep(0.2)  # until its DAG runs
  assert history.get_run(str(home), new_id)["pid"] == record["pid"] != process_of_ui(ui)
  os.kill(record["pid"], signal.SIGTERM)  # the run's own process: stopping it is recorded
  while history.get_run(str(home), new_id)["status"] == "RUNNING" and time.time() < deadline:
    time.sleep(0.2)
  stopped = history.get_run(str(home), new_id)
  assert (stopped["status"], stopped["reason"]) == ("INTERRUPTED", "stopped by SIGTERM")
  _forget(home, new_id)  # the other tests of this module expect the one run


def process_of_ui(ui):
  return ui[0].pid


def _forget(home, run_id):
  import sqlite3
  with sqlite3.connect(os.path.join(home, history.DB_NAME)) as db:
    db.execute("DELETE FROM runs WHERE id = ?", (run_id,))


def _malformed(rng: random.Random, port: int) -> tuple[str, bytes]:
  """One malformed request: (its kind, its bytes). Every kind is wrong in a way that must be refused before
  anything runs."""
  host = f"127.0.0.1:{port}"
  target = f"/api/runs/{RUN_ID}/rerun"
  junk = "".join(rng.choice("abcXYZ019-_.~!*'();:@&=+$,/?#[]% ") for _ in range(rng.randint(1, 12)))
  kind = rng.choice(["method", "version", "request_line", "path", "content_length", "content_type", "origin",
                     "host", "chunked", "json", "short_body", "header_line", "long_header", "many_headers",
                     "overrides", "unknown_run", "absolute", "nul_header", "binary"])
  post = lambda headers, body=b"{}": _request(port, "POST", target, {
      "Content-Type": "application/json", "Content-Length": str(len(body)), **headers}, body)
  if kind == "method":
    return kind, _request(port, rng.choice(["PUT", "DELETE", "PATCH", "HEAD", "TRACE", "CONNECT", "OPTIONS",
                                            "FOO", junk.replace(" ", "").replace("/", "") or "X"]), "/")
  if kind == "version":
    version = rng.choice(["HTTP/1.1.1", "HTTP/x", "HTTP/2.0", "HTTP/9.9", "FTP/1.0", "HTTP/1", "HTTP/01.01.1"])
    return kind, f"GET / {version}\r\nHost: {host}\r\n\r\n".encode()
  if kind == "request_line":
    # (blank lines before a request line are skipped, RFC 9112 section 2.2: the request after them is answered)
    return kind, rng.choice([b"GET\r\n\r\n", b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", b"\r\n\r\nPOST\r\n\r\n",
                             b"/ HTTP/1.1\r\n\r\n", f"GET /{junk} HTTP/1.1 more words\r\n\r\n".encode()])
  if kind == "path":
    bad = rng.choice(["%00", "%0a", "%0d%0a", "%1b", "%7f", "%ff", "%c3%28", "%e2%82"])
    return kind, _request(port, "GET", rng.choice(["/files/", "/runs/", "/api/runs/", "/"]) + junk.replace(" ", "")
                          .replace("%", "") + bad)
  if kind == "content_length":
    value = rng.choice(["abc", "-1", "1e3", "12 12", "0x10", "99999999999999999999", "+5", "", str(10**9)])
    return kind, _request(port, "POST", target, {"Content-Type": "application/json", "Content-Length": value},
                          b"{}")
  if kind == "content_type":
    kind_value = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/jsonp", "text/json", "application/json-seq", junk])
    return kind, _request(port, "POST", target, {"Content-Type": kind_value, "Content-Length": "2"}, b"{}")
  if kind == "origin":
    return kind, post({"Origin": rng.choice(["null", "http://evil.example", f"http://127.0.0.1:{port + 1}",
                                             f"https://127.0.0.1:{port}", f"http://localhost.evil:{port}",
                                             f"http://{junk}"])})
  if kind == "host":
    value = rng.choice([f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"127.0.0.2:{port}",
                        f"{junk}:{port}", f"localhost.:{port}x", ""])
    return kind, f"GET /api/runs HTTP/1.1\r\nHost: {value}\r\n\r\n".encode("latin-1")
  if kind == "chunked":
    return kind, _request(port, "POST", target, {"Content-Type": "application/json",
                                                 "Transfer-Encoding": rng.choice(["chunked", "gzip, chunked"])},
                          b"2\r\n{}\r\n0\r\n\r\n")
  if kind == "json":
    return kind, post({}, rng.choice([b"{", b"[]", b"1", b"\"x\"", b"null", b"{\"a\":}", b"\xff\xfe{}",
                                      b"[" * 20000 + b"]" * 20000, junk.encode()]))
  if kind == "short_body":
    return kind, _request(port, "POST", target, {"Content-Type": "application/json",
                                                 "Content-Length": str(rng.randint(10, 5000))}, b"{}")
  if kind == "header_line":
    return kind, f"GET / HTTP/1.1\r\nHost: {host}\r\n{junk.replace(':', '')}\r\n\r\n".encode()
  if kind == "long_header":
    return kind, _request(port, "GET", "/", {"X-Long": "a" * rng.randint(70_000, 100_000)})
  if kind == "many_headers":
    return kind, _request(port, "GET", "/", {f"X-{i}": "1" for i in range(rng.randint(101, 200))})
  if kind == "overrides":
    return kind, post({}, json.dumps(rng.choice([{"steps": "lots"}, {"stepz": 1}, {"steps": -5},
                                                 {"learning_rate": "nan"}, {"seq_len": 0},
                                                 {"max_patches_per_image": 999}, {"overrides": "x"}])).encode())
  if kind == "unknown_run":
    return kind, _request(port, "POST", f"/api/runs/{junk.replace(' ', '').replace('/', '') or 'x'}x/rerun",
                          {"Content-Type": "application/json", "Content-Length": "2"}, b"{}")
  if kind == "absolute":
    return kind, _request(port, "GET", rng.choice(["http://evil.example/", "*", "evil", f"//{host}/api/runs"]))
  if kind == "nul_header":
    return kind, f"GET / HTTP/1.1\r\nHost: {host}\r\nX-A: a\x00b\r\n\r\n".encode()
  return kind, bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n"


def test_a_hundred_malformed_requests_are_each_answered_with_a_4xx(ui):
  process, port, home = ui
  rng, start, kinds = random.Random(19), time.time(), {}
  for i in range(100):
    kind, data = _malformed(rng, port)
    status, head, body = _exchange(port, data, timeout=10)
    assert status is not None and 400 <= status < 500, f"request {i} ({kind}) {data[:200]!r}: {head!r} {body[:200]!r}"
    assert process.poll() is None, f"the UI died on request {i} ({kind})"
    kinds[kind] = kinds.get(kind, 0) + 1
  assert time.time() - start < 120
  assert len(kinds) >= 15  # the generator reached most kinds of malformation
  status, _, body = _exchange(port, _request(port, "GET", "/api/runs"))
  assert status == 200 and [r["id"] for r in json.loads(body)] == [RUN_ID]  # nothing was started


_ATTACKER = """<!doctype html><html><body>
<form id="form" method="POST" enctype="text/plain" action="{ui}/api/runs/{run}/rerun">
<input name='{{"steps": 3, "x": "' value='"}}'></form>
<script>
async function noCors() {{
  await fetch('{ui}/api/runs/{run}/rerun', {{method: 'POST', mode: 'no-cors',
    headers: {{'Content-Type': 'text/plain'}}, body: '{{}}'}});
  return 'sent';
}}
async function asJson() {{
  try {{
    await fetch('{ui}/api/runs/{run}/rerun', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
      body: '{{}}'}});
    return 'answered';
  }} catch (e) {{ return 'blocked: ' + e.message; }}
}}
</script></body></html>"""


@pytest.mark.slow
def test_another_site_in_a_real_browser_cannot_start_a_rerun(ui):
  if CHROMIUM is None:
    if os.environ.get("CI"):
      pytest.fail("chromium is not installed; .ci/run installs it")
    pytest.skip("chromium is not installed (apt-get install chromium)")
  from playwright.sync_api import sync_playwright
  process, port, home = ui
  base = f"http://127.0.0.1:{port}"
  page_html = _ATTACKER.format(ui=base, run=RUN_ID).encode()

  class Attacker(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      self.send_response(200)
      self.send_header("Content-Type", "text/html")
      self.send_header("Content-Length", str(len(page_html)))
      self.end_headers()
      self.wfile.write(page_html)

    def log_message(self, *args):
      pass
  attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
  threading.Thread(target=attacker.serve_forever, daemon=True).start()
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, args=[
          "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP rebind.test 127.0.0.1"])
      page = browser.new_page()
      page.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
      assert page.evaluate("asJson()").startswith("blocked: ")  # its preflight is refused: no POST is sent
      assert page.evaluate("noCors()") == "sent"  # sent, and refused by the UI (415)
      with page.expect_navigation() as navigation:
        page.evaluate("document.getElementById('form').submit()")
      assert navigation.value.status == 403  # Chromium sends the attacker's Origin with the form
      # DNS rebinding: another name for 127.0.0.1, as a rebinding attacker's domain resolves.
      response = page.goto(f"http://rebind.test:{port}/api/runs")
      assert response.status == 403 and RUN_ID not in page.content()
      # The UI's own page still posts: its rerun form reaches the parameter checks.
      page.goto(f"{base}/runs/{RUN_ID}")
      page.fill("input[name=steps]", "lots")
      page.click("form#changes button")
      page.wait_for_function("document.getElementById('message').textContent.length > 0")
      assert "parameter 'steps': expected int, got 'lots'" in page.text_content("#message")
      browser.close()
  finally:
    attacker.shutdown()
  assert process.poll() is None and _run_ids(home) == [RUN_ID]
