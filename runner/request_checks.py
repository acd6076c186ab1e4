"""What the UI accepts from a client, in one place, apart from any web framework: plain values in, the vetted
request out, or `Refused` (an HTTP status and a one-line reason). docs/ui.md lists the rules.

  checked = check_request(method, target, headers, bound_host, port)   # every request, before any handler
  overrides = parse_json_body(raw)                                       # a POST's body, once read

Why each rule: the UI starts runs (CPU, disk) and serves files of the run history, on a port any web page the
user visits can send requests to.
- Host must name this server (the bound address, or localhost's names when that is a loopback address; any IP
  literal when bound to all interfaces) with its port: a DNS-rebinding page reaches 127.0.0.1 under its own
  domain name, which this refuses, for reads as well as changes.
- Origin, when a browser sends one, must be this server's own: `http://` and an allowed Host.
- A change (POST) must be `Content-Type: application/json`. A browser sends that cross-site only after a CORS
  preflight (OPTIONS), which gets 405 and no Access-Control-* header here, so another site can neither submit a
  form (text/plain, urlencoded, multipart) nor fetch with a JSON body. curl or a script on this machine sends no
  Origin and is accepted: `curl -H 'Content-Type: application/json' --data '{}' URL`.
- Header lines are `Name: value` without control characters. Only GET and POST; the target is a path (origin-form); its percent-decoded form is UTF-8 without control
  characters (`%00` would otherwise reach the file system); a body has one decimal Content-Length of at most
  MAX_BODY_BYTES (no chunked bodies) and is a JSON object.
"""

import dataclasses
import ipaddress
import json
import re
import urllib.parse

MAX_BODY_BYTES = 64 * 1024
METHODS = ("GET", "POST")
CHANGES = ("POST",)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110, 5.1)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a header value (tab is)


class Refused(Exception):
  """A request the UI does not serve: `status` (4xx) and a one-line `reason`."""

  def __init__(self, status: int, reason: str):
    super().__init__(reason)
    self.status, self.reason = status, reason


@dataclasses.dataclass(frozen=True)
class Checked:
  path: str             # percent-decoded, without the query
  body_length: int      # bytes of body to read (0 for a GET)


def _only(headers: list[tuple[str, str]], name: str) -> str | None:
  values = [v for k, v in headers if k.lower() == name.lower()]
  if len(values) > 1:
    raise Refused(400, f"more than one {name} header")
  return values[0].strip() if values else None


def _split_host(value: str) -> tuple[str, int] | None:
  """'name:port', '[v6]:port' or 'name' (port 80) -> (lower-case name, port); None when malformed."""
  if value.startswith("["):
    name, _, rest = value[1:].partition("]")
    port = rest[1:] if rest.startswith(":") else ("80" if not rest else None)
  else:
    name, colon, port = value.rpartition(":")
    name, port = (name, port) if colon else (value, "80")
  if not name or port is None or not port.isascii() or not port.isdigit():
    return None
  return name.lower(), int(port)


def _is_ip(name: str) -> bool:
  try:
    ipaddress.ip_address(name)
    return True
  except ValueError:
    return False


def host_allowed(value: str, bound_host: str, port: int) -> bool:
  """Whether a Host header value (or an Origin's authority) names this server."""
  parsed = _split_host(value)
  if parsed is None or parsed[1] != port:
    return False
  name, bound = parsed[0], bound_host.lower().strip("[]")
  if bound in ("", "0.0.0.0", "::"):  # all interfaces: any address of this machine, never a name but localhost
    return _is_ip(name) or name == "localhost"
  loopback = bound == "localhost" or (_is_ip(bound) and ipaddress.ip_address(bound).is_loopback)
  return name == bound or (loopback and name in _LOOPBACK_NAMES)


def check_request(method: str, target: str, headers: list[tuple[str, str]], bound_host: str, port: int,
                  every_header_line_parsed: bool = True) -> Checked:
  """Every request's checks (see the module's docstring); raises Refused. `every_header_line_parsed`: False when
  the server's parser met a header line that is not `Name: value` (and dropped it, or the lines after it)."""
  if not every_header_line_parsed:
    raise Refused(400, "a header line is not `Name: value`")
  for name, value in headers:
    if not _TOKEN.fullmatch(name) or _CONTROL.search(value):
      raise Refused(400, f"header {name[:40]!r}: a malformed name or a control character in its value")
  if method not in METHODS:
    raise Refused(405, f"method {method!r} is not served (only {', '.join(METHODS)})")
  host = _only(headers, "Host")
  if host is None:
    raise Refused(400, "exactly one Host header is required")
  if not host_allowed(host, bound_host, port):
    raise Refused(403, f"host {host!r} is not this server's (a DNS rebinding?)")
  origin = _only(headers, "Origin")
  if origin is not None and not (origin.startswith("http://") and host_allowed(origin[7:], bound_host, port)):
    raise Refused(403, f"origin {origin!r} is not this server's")
  if not target.startswith("/") or target.startswith("//"):
    raise Refused(400, f"the request target must be a path, got {target[:80]!r}")
  try:
    path = urllib.parse.unquote(target.split("?", 1)[0].split("#", 1)[0], errors="strict")
  except UnicodeDecodeError:
    raise Refused(400, "the path is not UTF-8 once percent-decoded") from None
  if any(ord(c) < 0x20 or ord(c) == 0x7f for c in path):
    raise Refused(400, "the path holds a control character")
  if _only(headers, "Transfer-Encoding") is not None:
    raise Refused(411, "a body needs a Content-Length (chunked bodies are not read)")
  length = _only(headers, "Content-Length")
  if length is not None and not (length.isascii() and length.isdigit()):
    raise Refused(400, f"Content-Length {length[:40]!r} is not a byte count")
  length = int(length or 0)
  if length > MAX_BODY_BYTES:
    raise Refused(413, f"request body of {length} bytes is over the limit of {MAX_BODY_BYTES}")
  if method in CHANGES:
    kind = (_only(headers, "Content-Type") or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
      raise Refused(415, f"a change must be a JSON request (Content-Type: application/json), got {kind[:60]!r}")
  return Checked(path, length if method in CHANGES else 0)


def parse_json_body(raw: bytes, expected_length: int) -> dict:
  """A change's body -> the JSON object it holds (empty body: {}); raises Refused."""
  if len(raw) != expected_length:
    raise Refused(400, f"the body ended after {len(raw)} of its {expected_length} bytes (Content-Length)")
  if not raw:
    return {}
  try:
    value = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise Refused(400, "request body is not UTF-8") from None
  except json.JSONDecodeError as e:
    raise Refused(400, f"request body is not JSON: {e.msg}") from None
  except RecursionError:
    raise Refused(400, "request body is nested too deeply") from None
  if not isinstance(value, dict):
    raise Refused(400, "the request body must be a JSON object of parameter overrides")
  return value
