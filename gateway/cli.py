"""The ``portvakt`` command line.

    portvakt run --config FILE [--workers N]   serve (N > 1: a supervisor and N workers)
    portvakt check-config FILE                 list every config problem (exit 1) or print "ok"
    portvakt version
    portvakt demo                              what `make run` calls (dev certs, demo upstream)

Other modules add their own subcommands through ``register_commands(subparsers)``; each sets
``func`` (taking the parsed args, returning an exit code) with ``set_defaults``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__

# Modules that contribute subcommands, in this order. A module that is not there at all is
# skipped (it belongs to work not merged yet); any other import error propagates.
COMMAND_MODULES = (
    "gateway.dev.ca",
    "gateway.dev.issuer",
    "filters.integrations",
    "gateway.audit.cli",
    "gateway.identity",
)


class _BadRequestRedactor(logging.Filter):
    """aiohttp logs a request it cannot parse (header line too long, invalid characters, ...)
    with a traceback whose message quotes the offending bytes: the start of an Authorization,
    IntegrasjonPassord or Cookie value, or a fødselsnummer. Keep one line without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc, HttpProcessingError):
            record.msg = "bad HTTP request from %s: %s (%s)"
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (peer, type(exc).__name__, getattr(exc, "code", 400))
            record.exc_info = None
            record.exc_text = None
        return True


def _configure_logging(level: str | None = None) -> None:
    """Text logs until the config is loaded (gateway/logsetup.py; ``logging:`` then applies).
    ``level`` (--log-level / PORTVAKT_LOG_LEVEL) wins over the config's ``logging.level``."""
    from gateway import logsetup

    logsetup.LEVEL_OVERRIDE = level
    logsetup.configure("text", level or "INFO")
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestRedactor) for f in server_log.filters):
        server_log.addFilter(_BadRequestRedactor())


def _install_uvloop() -> None:
    if os.environ.get("PORTVAKT_NO_UVLOOP"):
        return
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional speed-up
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.config import ConfigError, load_config

    _configure_logging(args.log_level)
    workers = args.workers
    if workers is None and args.worker_index is None:
        try:
            workers = load_config(args.config).server.workers
        except ConfigError as e:
            for p in e.problems:
                print(p, file=sys.stderr)
            return 2
    if args.worker_index is None and workers and workers > 1:
        from gateway.supervisor import supervise

        return supervise(args.config, workers, log_level=args.log_level)
    from gateway.server import serve

    in_supervisor = args.worker_index is not None
    if in_supervisor:
        from gateway import parentwatch

        parentwatch.arm()  # SIGTERM when the supervisor dies, even by kill -9
    _install_uvloop()
    return asyncio.run(
        serve(
            args.config,
            reuse_port=in_supervisor,
            admin=not in_supervisor,
            admin_socket=args.admin_socket,
            worker_index=args.worker_index,
        )
    )


def check_config(path: str) -> list[str]:
    """Every error in the config file (empty when it is fine), each ``file: yaml.path: reason``:
    schema, cross-checks and files/build in one run (gateway/configcheck.py); warnings left out."""
    from gateway import configcheck

    report = configcheck.check(path)
    return [f.line(path) for f in report.errors]


def file_problems(cfg: Any, path: str) -> list[str]:
    """The files and the build of a loaded config: TLS context, audit paths, upstream CA bundles,
    then the runtime built (not started). Each ``file: yaml.path: reason``."""
    problems: list[str] = []
    if cfg.server.tls is not None and not cfg.server.plain_http:
        from gateway import tlsutil

        try:
            tlsutil.build_context(cfg.server.tls, cfg.resolve_path)
        except ValueError as e:
            problems.append(f"{path}: {e}")

    from gateway.admin import resolve_reload_token

    try:
        resolve_reload_token(cfg)
    except ValueError as e:
        problems.append(f"{path}: {e}")

    from gateway.audit import audit_path_problems

    problems += [f"{path}: {p}" for p in audit_path_problems(cfg)]
    # Upstream CA bundles are read when the runtime starts (not at build): check them here.
    import ssl

    for name, up in cfg.upstreams.items():
        if up.ca_file and up.url.startswith("https://"):
            ca = cfg.resolve_path(up.ca_file)
            try:
                ssl.create_default_context(cafile=ca)
            except ssl.SSLError:  # (an OSError too: first)
                problems.append(f"{path}: upstreams.{name}.ca_file: {ca} holds no usable PEM certificate")
            except OSError as e:
                problems.append(f"{path}: upstreams.{name}.ca_file: cannot read {ca}: {e.strerror or e}")

    try:
        problems += asyncio.run(build_problems(cfg, path))
    except Exception as e:  # reported, never a traceback
        problems.append(_build_problem(path, e))
    return problems


async def build_problems(cfg: Any, path: str) -> list[str]:
    """Build (without starting) the runtime of a loaded config; every stage or component that
    cannot be built, each as ``file: yaml.path: reason``. Used by check-config and by reload."""
    from gateway.audit import build_audit
    from gateway.chain import BuildEnv
    from gateway.identity import build_forwarder
    from gateway.pipeline import PIPELINE
    from gateway.runtime import build_runtime

    try:
        rt = build_runtime(cfg, None)
    except Exception as first:  # reported, never a traceback
        first_problem = _build_problem(path, first)
    else:
        await rt.close()
        return []
    # build_runtime stops at the first error: build each stage and component on its own
    # to list every one that cannot be built.
    env = BuildEnv(config=cfg, base_dir=os.path.dirname(os.path.abspath(path)), secrets={})
    builders: list[Any] = [decl.builder for decl in PIPELINE]
    builders += [build_audit, build_forwarder]
    found: list[str] = []
    for builder in builders:
        try:
            part = builder(env)
        except Exception as e:
            found.append(_build_problem(path, e))
            continue
        close = getattr(part, "close", None)
        if close is not None:
            await close()
    return found or [first_problem]


# A build error whose message starts with the yaml path it is about ("issuers.x.jwks_file: ...").
_PATHED = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*: ")


def _build_problem(path: str, e: BaseException) -> str:
    """``file: yaml.path: reason`` when the error names its yaml path, else ``file: runtime: ...``."""
    msg = str(e)
    if isinstance(e, ValueError) and _PATHED.match(msg):
        return f"{path}: {msg}"
    return f"{path}: runtime: {type(e).__name__}: {msg}"


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway import configcheck

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = configcheck.check(args.file)
    if args.format == "json":
        print(configcheck.render_json(report))
    else:
        for line in configcheck.render_text(report):
            print(line)
    return 1 if report.errors or (args.strict and report.warnings) else 0


def cmd_config_schema(_: argparse.Namespace) -> int:
    from gateway import configdoc

    print(json.dumps(configdoc.json_schema(), indent=2, ensure_ascii=False))
    return 0


def cmd_config_reference(_: argparse.Namespace) -> int:
    from gateway import configdoc

    sys.stdout.write(configdoc.reference_markdown())
    return 0


def cmd_reasons(_: argparse.Namespace) -> int:
    from gateway import reasoncatalog

    sys.stdout.write(reasoncatalog.render_markdown())
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    print(f"portvakt {__version__}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.dev import demo

    _configure_logging(args.log_level)
    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portvakt", description="Portvakt reverse-proxy security gateway")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="serve with a config file")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: server.workers)")
    p.add_argument(
        "--log-level",
        default=os.environ.get("PORTVAKT_LOG_LEVEL"),
        help="DEBUG | INFO | WARNING | ERROR (default: logging.level of the config)",
    )
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--admin-socket", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check-config",
        help="validate a config file; lists every error and warning",
        description="Schema, cross-checks and files/build in one run. Exit 0: no errors (warnings "
        "may be printed); 1: errors (or warnings with --strict); 2: usage error.",
    )
    p.add_argument("file")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (json for CI)")
    p.add_argument("--strict", action="store_true", help="warnings count as errors (exit 1)")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("config", help="the config model: JSON Schema, reference")
    csub = p.add_subparsers(dest="config_command", metavar="WHAT")
    csub.required = True
    c = csub.add_parser("schema", help="print the JSON Schema of the config file (for editors)")
    c.set_defaults(func=cmd_config_schema)
    c = csub.add_parser("reference", help="print the config reference (docs/config-reference.md)")
    c.set_defaults(func=cmd_config_reference)

    p = sub.add_parser("reasons", help="print the reason catalogue (docs/reasons.md)")
    p.set_defaults(func=cmd_reasons)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("demo", help="dev certificates, demo upstream and the gateway on config/demo.yaml")
    p.add_argument("--config", default=None, help="config (default: config/demo.yaml)")
    p.add_argument("--certs", default=None, help="dev certificate directory (default: certs/dev)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_demo)

    for modname in COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        register = getattr(mod, "register_commands", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc: Any = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
