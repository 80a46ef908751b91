"""Turn pydantic validation errors into one short line a person can act on.

Clients see these lines in HTTP 4xx bodies and in `error` messages on the control channel, so they
name the offending field and, for unknown names, list the known ones.
"""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

Schema = type[BaseModel] | dict[str, type[BaseModel]]  # a model, or a tagged union as {tag: model}


def describe(exc: ValidationError, schema: Schema) -> str:
    """One line for all errors of `exc`; `schema` resolves field paths to models for known-name lists."""
    lines: list[str] = []
    unknown: dict[tuple, list[str]] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden" and loc:
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            lines.append(_one(err, schema))
    for parent, names in unknown.items():
        lines.insert(0, _unknown(parent, names, schema))
    return "; ".join(dict.fromkeys(lines))


def _one(err: dict[str, Any], schema: Schema) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    where = _path(tuple(err["loc"]), schema)
    if kind == "json_invalid":
        return f"not valid JSON ({ctx.get('error', err['msg'])})"
    if kind == "union_tag_invalid":
        return f"unknown message type {ctx.get('tag')!r} (known: {_tags(schema)})"
    if kind == "union_tag_not_found":
        return f"message has no 'type' (known: {_tags(schema)})"
    if kind in ("dict_type", "model_type") and not where:
        return "expected a JSON object"
    if kind == "missing":
        return f"missing field {where!r}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    message = err["msg"][0].lower() + err["msg"][1:]
    return f"{where}: {message}" if where else message


def _unknown(parent: tuple, names: list[str], schema: Schema) -> str:
    model = _model_at(parent, schema)
    noun = "parameter" if model is not None and model.__name__.endswith("Params") else "field"
    plural = "s" if len(names) > 1 else ""
    quoted = ", ".join(repr(n) for n in names)
    known = f" (known: {', '.join(model.model_fields)})" if model is not None else ""
    return f"unknown {noun}{plural} {quoted}{known}"


def _tags(schema: Schema) -> str:
    return ", ".join(schema) if isinstance(schema, dict) else ""


def _path(loc: tuple, schema: Schema) -> str:
    """Dotted field path without the union tag pydantic puts first."""
    if isinstance(schema, dict) and loc and loc[0] in schema:
        loc = loc[1:]
    return ".".join(str(p) for p in loc)


def _model_at(loc: tuple, schema: Schema) -> type[BaseModel] | None:
    """The model class that holds the fields at `loc` (None when the path leaves the models)."""
    if isinstance(schema, dict):
        if not loc or loc[0] not in schema:
            return None
        model: type[BaseModel] | None = schema[loc[0]]
        loc = loc[1:]
    else:
        model = schema
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _as_model(field.annotation) if field is not None else None
    return model


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _as_model(arg)) is not None:
                return found
    return None
