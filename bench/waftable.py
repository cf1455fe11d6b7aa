"""The WAF table's parts: corpora replayed as raw requests (``bench/replay.py``), and the reference row,
nginx + libmodsecurity3 + the same CRS files at PL1 (one worker, its own prefix).

A corpus record (``../shared/waf/*.jsonl``, ``bench/data/waf-dense.jsonl``) becomes one HTTP/1.1
request with the record's method, URI, headers and body, re-framed so that keep-alive replay
cannot desynchronise: ``Content-Length`` is recomputed, ``Transfer-Encoding``/``Connection``/
``Host`` replaced, and records an HTTP client cannot send at all (control bytes in the request
line or a header, a URI not starting with ``/``) are left out and counted. Every target gets the
same requests in the same order.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
from pathlib import Path

DROP = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "expect",
    "te",
    "trailer",
}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD = re.compile(r"[\x00-\x20\x7f]")


def raw_request(rec: dict) -> bytes | None:
    """The record as one well-framed HTTP/1.1 request, or None when it cannot be sent as such."""
    method, uri = rec.get("method") or "GET", rec.get("uri") or "/"
    if not _TOKEN.match(method) or not uri.startswith("/") or _BAD.search(uri):
        return None
    try:
        body = (
            base64.b64decode(rec["body"]) if rec.get("body_b64") else (rec.get("body") or "").encode("utf-8")
        )
        lines = [f"{method} {uri} HTTP/1.1".encode("latin-1"), b"Host: localhost"]
        for k, v in (rec.get("headers") or {}).items():
            if k.lower() in DROP:
                continue
            if not _TOKEN.match(k) or "\r" in v or "\n" in v or "\x00" in v:
                return None
            lines.append(f"{k}: {v}".encode("latin-1"))
    except (UnicodeEncodeError, ValueError):
        return None
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def load_corpus(path: Path) -> tuple[list[bytes], int]:
    """(requests, records left out). Request-direction records only."""
    out: list[bytes] = []
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("direction", "request") != "request":
                continue
            raw = raw_request(rec)
            if raw is None:
                skipped += 1
            else:
                out.append(raw)
    random.Random(1).shuffle(out)  # a slice is then a fair sample of every rule file
    return out, skipped


def write_slice(requests: list[bytes], start: int, count: int, path: Path) -> Path:
    """``count`` requests from ``start`` (wrapping), length-prefixed, for ``bench/replay.py``."""
    with open(path, "wb") as f:
        for i in range(count):
            raw = requests[(start + i) % len(requests)]
            f.write(b"%d\n" % len(raw))
            f.write(raw)
    return path


def modsec_available() -> str | None:
    """None when nginx and its ModSecurity module are installed, else what is missing."""
    if not os.path.exists("/usr/sbin/nginx"):
        return "nginx not installed (apt-get install nginx-light)"
    if modsec_module() is None:
        return "ModSecurity module not installed (apt-get install libnginx-mod-http-modsecurity)"
    return None


def modsec_module() -> str | None:
    for p in (
        "/usr/lib/nginx/modules/ngx_http_modsecurity_module.so",
        "/usr/share/nginx/modules/ngx_http_modsecurity_module.so",
    ):
        if os.path.exists(p):
            return p
    return None


def modsec_conf(work: Path, port: int, upstream: str, crs_dir: Path) -> Path:
    """nginx + ModSecurity + CRS at PL1 (crs-setup's default), one worker, prefix ``work/modsec``.

    The ModSecurity settings are the recommended ones that matter for request inspection (body
    access, JSON/XML body processors, limits with Reject); the audit log is off, as Portvakt's
    WAF writes no separate audit log either (its verdicts go into the one audit record)."""
    d = work / "modsec"
    for sub in ("", "tmp", "data", "body", "proxy"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rules = d / "main.conf"
    rules.write_text(f"""SecRuleEngine On
SecRequestBodyAccess On
SecRequestBodyLimit 13107200
SecRequestBodyNoFilesLimit 131072
SecRequestBodyLimitAction Reject
SecPcreMatchLimit 1000
SecPcreMatchLimitRecursion 1000
SecResponseBodyAccess Off
SecAuditEngine Off
SecDebugLogLevel 0
SecTmpDir {d}/tmp
SecDataDir {d}/data
SecArgumentSeparator &
SecCookieFormat 0
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRule REQBODY_ERROR "!@eq 0" "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.'"
Include {crs_dir}/crs-setup.conf.example
Include {crs_dir}/rules/*.conf
""")
    user = "user root root;" if os.geteuid() == 0 else ""
    up = upstream.removeprefix("http://")
    conf = d / "nginx.conf"
    conf.write_text(f"""{user}
load_module {modsec_module()};
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log error;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  client_max_body_size 10m;
  upstream bench {{ server {up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    modsecurity on;
    modsecurity_rules_file {rules};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
""")
    return conf
