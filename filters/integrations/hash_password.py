"""``portvakt hash-password``: the argon2id hash for an ``integrations[].password_hash`` entry."""

from __future__ import annotations

import getpass
import sys
from typing import Any

import argon2
from argon2 import PasswordHasher, profiles

from filters.integrations.config import MAX_PASSWORD_LENGTH


def register_commands(subparsers: Any) -> None:
    """Add ``hash-password`` to the ``portvakt`` CLI (argparse sub-parsers)."""
    d = profiles.RFC_9106_LOW_MEMORY
    p = subparsers.add_parser(
        "hash-password",
        help="Print the argon2id hash of an integration password",
        description="Reads the password from stdin when it is not a terminal, else prompts twice. "
        "Prints the argon2id hash for an integrations[].password_hash entry.",
    )
    p.add_argument(
        "--time-cost", type=int, default=d.time_cost, help=f"argon2 iterations (default {d.time_cost})"
    )
    p.add_argument(
        "--memory-cost",
        type=int,
        default=d.memory_cost,
        help=f"argon2 memory in KiB (default {d.memory_cost})",
    )
    p.add_argument(
        "--parallelism", type=int, default=d.parallelism, help=f"argon2 lanes (default {d.parallelism})"
    )
    p.set_defaults(func=cmd_hash_password)


def cmd_hash_password(args: Any) -> int:
    if sys.stdin is not None and not sys.stdin.isatty():
        password = sys.stdin.read()
        # Drop exactly one line ending (echo adds one); keep any other whitespace, it may be meant.
        if password.endswith("\r\n"):
            password = password[:-2]
        elif password.endswith("\n"):
            password = password[:-1]
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            print("portvakt hash-password: passwords differ", file=sys.stderr)
            return 2
    if not password:
        print("portvakt hash-password: empty password", file=sys.stderr)
        return 2
    if len(password) > MAX_PASSWORD_LENGTH:
        print(f"portvakt hash-password: longer than {MAX_PASSWORD_LENGTH} characters", file=sys.stderr)
        return 2
    try:
        hasher = PasswordHasher(
            time_cost=args.time_cost, memory_cost=args.memory_cost, parallelism=args.parallelism
        )
        print(hasher.hash(password))
    except (argon2.exceptions.HashingError, ValueError) as e:
        print(f"portvakt hash-password: {e}", file=sys.stderr)
        return 2
    return 0
