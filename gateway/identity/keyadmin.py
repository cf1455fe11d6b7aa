"""``portvakt assertion-keys create|rotate|prune|list DIR``: managing the assertion key directory.

The manifest's rules are in ``keys.py``; files are written atomically (temporary file, fsync,
rename), private keys with mode 0600.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.identity.keys import (
    DEFAULT_MAX_LIFETIME,
    DEFAULT_PUBLISH_DELAY,
    MANIFEST,
    make_signing_key,
    read_manifest,
)


def _write_json_atomic(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_key_file(key_dir: str) -> tuple[str, str]:
    priv = ec.generate_private_key(ec.SECP256R1())
    kid = make_signing_key(priv).kid
    name = f"{kid}.pem"
    pem = priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(os.path.join(key_dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return kid, name


def keys_create(key_dir: str, max_lifetime: int = DEFAULT_MAX_LIFETIME, now: float | None = None) -> str:
    """Create a key directory with one key usable at once. Returns its kid."""
    now = time.time() if now is None else now
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(key_dir, MANIFEST)):
        raise FileExistsError(f"{key_dir}/{MANIFEST} exists: use rotate")
    kid, name = _new_key_file(key_dir)
    doc = {
        "max_lifetime": max_lifetime,
        "keys": [{"kid": kid, "file": name, "created": now, "not_before_signing": now, "retire_at": None}],
    }
    _write_json_atomic(os.path.join(key_dir, MANIFEST), doc)
    return kid


def keys_rotate(key_dir: str, publish_delay: float = DEFAULT_PUBLISH_DELAY, now: float | None = None) -> str:
    """Add a key published now and used for signing from ``now + publish_delay``. Every key in
    use until then retires ``max_lifetime`` after that moment. Returns the new kid."""
    now = time.time() if now is None else now
    path = os.path.join(key_dir, MANIFEST)
    doc = read_manifest(key_dir)
    max_lifetime = int(doc.get("max_lifetime", DEFAULT_MAX_LIFETIME))
    kid, name = _new_key_file(key_dir)
    takeover = now + publish_delay
    for e in doc["keys"]:
        if e["not_before_signing"] >= takeover:  # a pending key overtaken before it ever signed
            e["retire_at"] = min(e.get("retire_at") or now, now)
            continue
        # Keys that would still sign before the new one takes over: they retire after the last
        # assertion they can have signed has expired.
        if e.get("retire_at") is None or e["retire_at"] > takeover + max_lifetime:
            e["retire_at"] = takeover + max_lifetime
    doc["keys"].append(
        {"kid": kid, "file": name, "created": now, "not_before_signing": takeover, "retire_at": None}
    )
    _write_json_atomic(path, doc)
    return kid


def keys_prune(key_dir: str, now: float | None = None) -> list[str]:
    """Delete keys whose retire time has passed. Returns their kids."""
    now = time.time() if now is None else now
    doc = read_manifest(key_dir)
    keep, gone = [], []
    for e in doc["keys"]:
        (gone if e.get("retire_at") is not None and e["retire_at"] <= now else keep).append(e)
    doc["keys"] = keep
    _write_json_atomic(os.path.join(key_dir, MANIFEST), doc)
    for e in gone:
        try:
            os.unlink(os.path.join(key_dir, e["file"]))
        except FileNotFoundError:
            pass
    return [e["kid"] for e in gone]


def _cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.keys_action == "create":
            kid = keys_create(args.dir, max_lifetime=args.max_lifetime)
            print(f"created {kid} (signing now)")
        elif args.keys_action == "rotate":
            kid = keys_rotate(args.dir, publish_delay=args.publish_delay)
            print(f"added {kid}: published now, signing from {time.time() + args.publish_delay:.0f}")
        elif args.keys_action == "prune":
            gone = keys_prune(args.dir)
            print("pruned " + (", ".join(gone) if gone else "nothing"))
        else:  # list
            doc = read_manifest(args.dir)
            print(json.dumps(doc, indent=2, sort_keys=True))
    except (OSError, ValueError) as e:
        print(f"portvakt assertion-keys: {e}", file=sys.stderr)
        return 1
    return 0


def register_commands(subparsers: Any) -> None:
    """Add ``portvakt assertion-keys create|rotate|prune|list DIR`` to the CLI."""
    p = subparsers.add_parser("assertion-keys", help="Create and rotate the identity assertion signing keys")
    sub = p.add_subparsers(dest="keys_action", required=True)
    c = sub.add_parser("create", help="Create a key directory with its first key")
    c.add_argument("dir")
    c.add_argument(
        "--max-lifetime",
        type=int,
        default=DEFAULT_MAX_LIFETIME,
        help="Longest assertion lifetime any gateway using these keys may configure (seconds)",
    )
    r = sub.add_parser("rotate", help="Publish a new key now; sign with it after the publish delay")
    r.add_argument("dir")
    r.add_argument("--publish-delay", type=float, default=DEFAULT_PUBLISH_DELAY, help="Seconds (default 300)")
    pr = sub.add_parser("prune", help="Delete keys whose last assertion has expired")
    pr.add_argument("dir")
    ls = sub.add_parser("list", help="Print the manifest")
    ls.add_argument("dir")
    for sp in (c, r, pr, ls):
        sp.set_defaults(func=_cmd_keys)
