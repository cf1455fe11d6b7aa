"""The config model, described for people and editors: generated, so it cannot drift.

- ``json_schema()``: JSON Schema (draft 2020-12) of the YAML file, from the pydantic model
  (``portvakt config schema``; point an editor's YAML language server at it).
- ``reference_markdown()``: every key with its type, default and description
  (``portvakt config reference``, committed as docs/config-reference.md and kept equal by a test).
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gateway.config import Config


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema(mode="validation")
    schema.get("properties", {}).pop("source_path", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Portvakt configuration"
    return schema


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return f"map[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(f: Any) -> str:
    if f.is_required():
        return "**required**"
    if f.default_factory is not None:
        try:
            v = f.default_factory()
        except TypeError:  # a factory that takes the validated data
            return "(computed)"
    else:
        v = f.default
    if v is PydanticUndefined:
        return ""
    if isinstance(v, BaseModel):
        return "(see below)" if v.model_dump() else "{}"
    if isinstance(v, enum.Enum):
        v = v.value
    try:
        text = json.dumps(v, ensure_ascii=False, default=str)
    except TypeError:
        text = str(v)
    return f"`{text}`"


def _models(tp: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _models(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _models(a)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _rows(model: type[BaseModel], prefix: str, seen: tuple[type, ...]) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        key = f.alias or name
        path = f"{prefix}{key}"
        desc = (f.description or "").replace("|", "\\|").replace("\n", " ")
        out.append((path, _type_name(f.annotation), _default(f), desc))
        tp = f.annotation
        origin = typing.get_origin(tp)
        inner: Any = tp
        child = path + "."
        if origin in (typing.Union, types.UnionType):
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            inner = non_none[0] if len(non_none) == 1 else tp
            origin = typing.get_origin(inner)
        if origin is dict:
            inner, child = typing.get_args(inner)[1], f"{path}.<name>."
        elif origin in (list, tuple):
            inner, child = typing.get_args(inner)[0], f"{path}[]."
        for m in _models(inner):
            if m not in seen:
                out += _rows(m, child, seen + (m,))
    return out


def reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config model (`portvakt config reference`); `tests/gateway/test_configdoc.py`",
        "fails when this file and the model differ. Regenerate with",
        "`.venv/bin/portvakt config reference > docs/config-reference.md`.",
        "The JSON Schema of the same model: `portvakt config schema`.",
        "",
        "Unknown keys are errors. `${ENV_VAR}` and `${ENV_VAR:-default}` work in every string;",
        "relative paths resolve against the config file's directory. `<name>` is a key you choose,",
        "`[]` a list item.",
        "",
    ]
    for name, f in Config.model_fields.items():
        if f.exclude:
            continue
        lines += [f"## `{name}`", ""]
        if f.description:
            lines += [f.description, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for path, tp, default, desc in _section_rows(name, f):
            lines.append(f"| `{path}` | {tp} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def _section_rows(name: str, f: Any) -> list[tuple[str, str, str, str]]:
    rows = []
    desc = (f.description or "").replace("|", "\\|")
    rows.append((name, _type_name(f.annotation), _default(f), desc))
    tp = f.annotation
    origin = typing.get_origin(tp)
    inner: Any = tp
    child = name + "."
    if origin is dict:
        inner, child = typing.get_args(tp)[1], f"{name}.<name>."
    elif origin in (list, tuple):
        inner, child = typing.get_args(tp)[0], f"{name}[]."
    for m in _models(inner):
        rows += _rows(m, child, (m,))
    return rows
