"""``portvakt audit verify|query|reveal|auditor-keygen``: reading the audit trail.

- ``verify --key-file KEY FILE...``: checks every record's MAC, the hash chain (``prev``), the
  sequence numbers and, when ``<active file>.head`` exists (or ``--head``), that the trail is not
  cut short. Files may be given in any order (rotated files and the active one); they are put in
  chain order by their first ``seq``. Prints ``OK ...`` and exits 0, or names the first bad
  record as ``FAIL file:line: why`` and exits 1.
- ``query --organization ORGNO --since ISO8601 [--until ISO8601] FILE...``: the records that
  concern one organisation (as target, as caller, or as the grantor/holder of a privilege), as
  JSON lines, unchanged (they stay verifiable); ``request_completed`` records of matching
  requests are included.
- ``reveal --key AUDITOR_PRIVATE_KEY [--request-id ID]... FILE...``: opens the sealed person ids
  and prints ``{"request_id", "time", "field", "pseudonym", "pid"}`` lines.
- ``auditor-keygen PRIVATE PUBLIC``: makes an X25519 auditor key pair (PEM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from gateway.audit.chainfile import GENESIS, canonical, head_path, line_body, line_hash
from gateway.audit.keys import derive_keys, read_key_text, unseal

Loc = tuple[str, int]


class TrailFile:
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.first_seq: int | None = None
        for line in self.data.split(b"\n", 1)[:1]:
            try:
                self.first_seq = int(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                pass

    def lines(self) -> Iterator[tuple[int, bytes, bool]]:
        """(line number, bytes without newline, complete?)"""
        parts = self.data.split(b"\n")
        last = len(parts) - 1
        for i, p in enumerate(parts):
            if i == last:
                if p:
                    yield i + 1, p, False
                return
            yield i + 1, p, True


def _trail(files: list[str]) -> list[TrailFile]:
    tfs = [TrailFile(f) for f in files if not f.endswith((".head", ".lock", ".tmp"))]
    # Chain order by first seq; unreadable or empty files keep their given order at the end.
    return sorted(tfs, key=lambda t: (t.first_seq is None, t.first_seq or 0))


class VerifyError(Exception):
    def __init__(self, loc: Loc, why: str):
        super().__init__(f"{loc[0]}:{loc[1]}: {why}")


def _all_seqs(tfs: list[TrailFile]) -> set[int]:
    out: set[int] = set()
    for tf in tfs:
        for _n, line, _c in tf.lines():
            try:
                out.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                pass
    return out


def verify(
    files: list[str], key: bytes | list[bytes], head: str | None = None, require_head: bool = False
) -> dict[str, Any]:
    """Verify a trail. Returns a summary; raises VerifyError naming the first bad record.

    ``require_head`` (the CLI's default): a trail whose head file is missing fails, since
    without it records cut from the end (and the head deleted with them) go unnoticed.

    ``key`` may be several audit keys (the trail spans a key change): a record passes when one
    of them made its MAC."""
    mac_keys = [derive_keys(k)[0] for k in (key if isinstance(key, list) else [key])]

    def mac_ok(mac: str, data: bytes) -> bool:
        return any(hmac.compare_digest(mac, hmac.new(k, data, hashlib.sha256).hexdigest()) for k in mac_keys)

    tfs = _trail(files)
    if not tfs:
        raise VerifyError(("(none)", 0), "no audit files given")
    expect_seq: int | None = None
    expect_prev: str | None = None
    count = 0
    first_seq = None
    last_loc: Loc = (tfs[0].path, 0)
    seen: set[int] = set()
    later = _all_seqs(tfs)
    for tf in tfs:
        for n, line, complete in tf.lines():
            loc = (tf.path, n)
            last_loc = loc
            if not complete:
                raise VerifyError(loc, "incomplete last record (file truncated)")
            parts = line_body(line)
            try:
                rec = json.loads(line)
                seq = rec["seq"]
                prev = rec["prev"]
                rec.pop("mac")
            except (ValueError, KeyError, TypeError, AttributeError):
                raise VerifyError(loc, "not an audit record (edited or truncated)") from None
            if parts is None or not isinstance(seq, int) or not isinstance(prev, str):
                raise VerifyError(loc, "malformed chain fields (edited)")
            body, mac = parts
            if not mac_ok(mac, body):
                raise VerifyError(loc, f"seq {seq}: MAC does not match (record edited, forged, or wrong key)")
            if canonical(rec) != body:
                raise VerifyError(loc, f"seq {seq}: record bytes changed (edited)")
            if expect_seq is None:
                first_seq = seq
                if seq == 1 and prev != GENESIS:
                    raise VerifyError(loc, "first record does not start the chain")
            else:
                if seq > expect_seq:
                    if any(s in later for s in range(expect_seq, seq)):
                        raise VerifyError(
                            loc,
                            f"seq {seq}: out of order, expected {expect_seq} which comes later (reordered)",
                        )
                    raise VerifyError(
                        loc, f"seq {seq}: records {expect_seq}..{seq - 1} missing before it (deleted)"
                    )
                if seq < expect_seq:
                    why = "a copy of an earlier record (inserted)" if seq in seen else "reordered or inserted"
                    raise VerifyError(loc, f"seq {seq}: out of order, expected {expect_seq}: {why}")
                if prev != expect_prev:
                    raise VerifyError(
                        loc,
                        f"seq {seq}: does not link to the previous record (deleted, inserted or reordered)",
                    )
            expect_seq = seq + 1
            expect_prev = line_hash(line)
            seen.add(seq)
            count += 1
    summary: dict[str, Any] = {
        "records": count,
        "files": len(tfs),
        "first_seq": first_seq,
        "last_seq": (expect_seq - 1) if expect_seq else None,
        "head": "absent",
    }
    if first_seq is not None and first_seq != 1:
        summary["note"] = f"trail starts at seq {first_seq}: earlier files were not given"
    hp = head
    if hp is None:
        for tf in tfs:
            if os.path.exists(head_path(tf.path)):
                hp = head_path(tf.path)
    if hp is None and require_head:
        end = (last_loc[0], last_loc[1] + 1)
        raise VerifyError(
            end,
            f"no head file {head_path(tfs[-1].path)}: records cut from the end would go unnoticed "
            "(give --head FILE, or --no-head to check the records alone)",
        )
    if hp is not None:
        try:
            with open(hp, encoding="utf-8") as f:
                h = json.load(f)
            hmac_ = h.pop("mac")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            why = str(e) if isinstance(e, (OSError, ValueError)) else "not a head record"
            raise VerifyError((hp, 1), f"head unreadable: {why}") from None
        if not isinstance(hmac_, str) or not mac_ok(hmac_, canonical(h)):
            raise VerifyError((hp, 1), "head MAC does not match (edited or wrong key)")
        last = summary["last_seq"] or 0
        if h["seq"] > last:
            end = (last_loc[0], last_loc[1] + 1)
            raise VerifyError(
                end, f"trail ends at seq {last} but its head records seq {h['seq']} (truncated)"
            )
        if h["seq"] == last and h["hash"] != expect_prev:
            raise VerifyError(last_loc, "last record differs from the one the head records (edited)")
        summary["head"] = f"seq {h['seq']} verified"
    return summary


def _parse_time(s: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t


def _records(files: list[str]) -> Iterator[tuple[Loc, bytes, dict[str, Any]]]:
    for tf in _trail(files):
        for n, line, complete in tf.lines():
            if not complete:
                continue
            try:
                yield (tf.path, n), line, json.loads(line)
            except ValueError:
                continue


_ORG_FIELDS = ("authorized_org", "consumer_org", "certificate_org")


def concerns(rec: dict[str, Any], org: str) -> bool:
    if rec.get("target_org") == org:
        return True
    caller = rec.get("caller") or {}
    if any(caller.get(k) == org for k in _ORG_FIELDS):
        return True
    t = str(rec.get("type", ""))
    if t.startswith(("grant_", "integration_")):
        return rec.get("organization") == org or rec.get("authorized_org") == org
    return False


def query(
    files: list[str], org: str, since: dt.datetime, until: dt.datetime | None = None
) -> Iterator[bytes]:
    matched: set[str] = set()
    for _loc, line, rec in _records(files):
        if rec.get("type") == "request_completed":
            if rec.get("request_id") in matched:
                yield line
            continue
        try:
            t = _parse_time(rec["time"])
        except (KeyError, ValueError, TypeError):
            continue
        if t < since or (until is not None and t >= until):
            continue
        if concerns(rec, org):
            if rec.get("type") == "request":
                matched.add(rec.get("request_id"))
            yield line


def reveal(
    files: list[str], private_key: Any, request_ids: set[str] | None = None
) -> Iterator[dict[str, Any]]:
    for loc, _line, rec in _records(files):
        rid = rec.get("request_id")
        if request_ids and rid not in request_ids:
            continue
        for field, person in (
            ("caller.person", (rec.get("caller") or {}).get("person")),
            ("target_person", rec.get("target_person")),
        ):
            if not person:
                continue
            out = {
                "request_id": rid,
                "time": rec.get("time"),
                "field": field,
                "pseudonym": person.get("pseudonym"),
            }
            sealed = person.get("sealed")
            if not sealed:
                out["error"] = "not sealed (no auditor key configured when written)"
            else:
                try:
                    out["pid"] = unseal(private_key, sealed, person.get("pseudonym") or "")
                except ValueError as e:
                    out["error"] = f"{loc[0]}:{loc[1]}: {e}"
            yield out


# ----------------------------------------------------------------------------------- commands


def _load_audit_keys(args: argparse.Namespace) -> list[bytes]:
    keys = []
    for path in args.key_file or []:
        with open(path, encoding="utf-8") as f:
            keys.append(read_key_text(f.read()))
    for var in args.key_env or ([] if keys else ["PORTVAKT_AUDIT_KEY"]):
        val = os.environ.get(var)
        if val:
            keys.append(read_key_text(val))
    if not keys:
        raise ValueError("give --key-file FILE or --key-env VAR (the audit key; repeat for a key change)")
    return keys


def _cmd_verify(args: argparse.Namespace) -> int:
    try:
        key = _load_audit_keys(args)
        s = verify(args.files, key, args.head, require_head=not args.no_head)
    except VerifyError as e:
        print(f"FAIL {e}")
        return 1
    except (OSError, ValueError) as e:
        print(f"portvakt audit verify: {e}", file=sys.stderr)
        return 2
    extra = f"; {s['note']}" if "note" in s else ""
    print(
        f"OK {s['records']} records in {s['files']} file(s), seq {s['first_seq']}..{s['last_seq']}, head {s['head']}{extra}"
    )
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    try:
        since = _parse_time(args.since)
        until = _parse_time(args.until) if args.until else None
        out = sys.stdout.buffer
        for line in query(args.files, args.organization, since, until):
            out.write(line + b"\n")
        out.flush()
    except (OSError, ValueError) as e:
        print(f"portvakt audit query: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_reveal(args: argparse.Namespace) -> int:
    try:
        with open(args.key, "rb") as f:
            priv = serialization.load_pem_private_key(f.read(), password=None)
        bad = 0
        for item in reveal(args.files, priv, set(args.request_id) if args.request_id else None):
            bad += "error" in item
            print(json.dumps(item, ensure_ascii=False, sort_keys=True))
    except (OSError, ValueError) as e:
        print(f"portvakt audit reveal: {e}", file=sys.stderr)
        return 2
    return 1 if bad else 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    priv = x25519.X25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(args.private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        with open(args.public, "wb") as f:
            f.write(
                priv.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
    except OSError as e:
        print(f"portvakt audit auditor-keygen: {e}", file=sys.stderr)
        return 1
    print(f"auditor key pair: {args.private} (keep offline), {args.public} (audit.auditor_public_key)")
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``portvakt audit verify|query|reveal|auditor-keygen``."""
    p = subparsers.add_parser("audit", help="Verify, query and reveal the audit trail")
    sub = p.add_subparsers(dest="audit_action", required=True)
    v = sub.add_parser("verify", help="Check the hash chain, MACs and head; name the first bad record")
    v.add_argument("--key-file", action="append", help="File holding the audit key (repeatable: key changes)")
    v.add_argument(
        "--key-env",
        action="append",
        help="Environment variable holding the audit key (default PORTVAKT_AUDIT_KEY)",
    )
    v.add_argument("--head", help="Chain head file (default: <file>.head beside the files)")
    v.add_argument(
        "--no-head",
        action="store_true",
        help="Accept a trail without its head file (records cut from the end then go unnoticed)",
    )
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=_cmd_verify)
    q = sub.add_parser("query", help="Records concerning one organisation, as JSON lines")
    q.add_argument("--organization", required=True, metavar="ORGNO")
    q.add_argument("--since", required=True, metavar="ISO8601")
    q.add_argument("--until", metavar="ISO8601")
    q.add_argument("files", nargs="+", metavar="FILE")
    q.set_defaults(func=_cmd_query)
    r = sub.add_parser("reveal", help="Open sealed person ids with the auditor's private key")
    r.add_argument("--key", required=True, metavar="AUDITOR_PRIVATE_KEY")
    r.add_argument("--request-id", action="append", metavar="ID", help="Only these requests (repeatable)")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.set_defaults(func=_cmd_reveal)
    k = sub.add_parser("auditor-keygen", help="Make an X25519 auditor key pair")
    k.add_argument("private")
    k.add_argument("public")
    k.set_defaults(func=_cmd_keygen)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m gateway.audit.cli ...``), same commands as ``portvakt``."""
    ap = argparse.ArgumentParser(prog="portvakt")
    sp = ap.add_subparsers(dest="command", required=True)
    register_commands(sp)
    from gateway import identity

    identity.register_commands(sp)
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
