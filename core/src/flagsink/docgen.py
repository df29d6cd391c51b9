"""Settings tables for the docs, generated from the pydantic settings models.

Markdown files mark where a table goes; everything between the markers is generated::

    <!-- settings-table: file -->      exporter `file`: kind, its own keys, the common keys
    <!-- settings-table: common -->    the keys common to every exporter section
    <!-- settings-table: service -->   the top-level keys of the relay service
    <!-- settings-table: spool -->     the keys of the ``spool:`` section
    <!-- settings-table: store:file --> store `file`: kind, its own keys, cacheTTL
    <!-- /settings-table -->

``python -m flagsink.docgen --write FILE...`` regenerates the tables in place;
``--check`` changes nothing and exits 1 listing the files whose tables are stale.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flagsink.config import SchedulingSettings, ServiceSettings
from flagsink.plugins import default_registry
from flagsink.spool import SpoolSettings

__all__ = [
    "DocgenError",
    "exporter_table",
    "main",
    "render_markers",
    "settings_table",
    "store_table",
]

COMMON = "common"
SERVICE = "service"
SPOOL = "spool"
STORE_PREFIX = "store:"
_CACHE_TTL_ROW = (
    "| `cacheTTL` | number | `15` | Seconds items stay cached in each process; `0` = no "
    "cache, negative = cache forever (see the stores overview). |"
)
_MARKER = re.compile(
    r"(?P<open><!-- settings-table: *(?P<kind>[A-Za-z0-9_.:-]+) *-->)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /settings-table -->)",
    re.DOTALL,
)
_OPEN = re.compile(r"<!-- settings-table:")
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_NAMES = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    SecretStr: "string (secret)",
    Path: "path",
    Any: "any",
}
_HEADER = "| Key | Type | Default | Description |\n|---|---|---|---|"


class DocgenError(Exception):
    """A marker is malformed or names an unknown exporter kind."""


def settings_table(model: type[BaseModel]) -> str:
    """A Markdown table of ``model``'s fields: camelCase key, type, default, description."""
    return "\n".join([_HEADER, *_rows(model)])


def exporter_table(kind: str) -> str:
    """The table for exporter ``kind``: ``kind``, its own settings, then the common keys.

    Use ``kind="common"`` for the common keys only, ``kind="service"`` for the relay's keys,
    ``kind="spool"`` for the ``spool:`` section.
    """
    if kind.startswith(STORE_PREFIX):
        return store_table(kind.removeprefix(STORE_PREFIX))
    if kind == COMMON:
        return settings_table(SchedulingSettings)
    if kind == SERVICE:
        return settings_table(ServiceSettings)
    if kind == SPOOL:
        return settings_table(SpoolSettings)
    settings_model = default_registry().exporter(kind).settings_model
    kind_row = f"| `kind` | string | required | Always `{kind}` for this exporter. |"
    common = [row for row in _rows(SchedulingSettings) if not row.startswith("| `kind` ")]
    return "\n".join([_HEADER, kind_row, *_rows(settings_model, nested=True), *common])


def store_table(kind: str) -> str:
    """The table for store ``kind`` (marker ``store:KIND``): ``kind``, its own settings,
    then ``cacheTTL`` (unless the store declares it itself)."""
    settings_model = default_registry().store(kind).settings_model
    kind_row = f"| `kind` | string | required | Always `{kind}` for this store. |"
    rows = _rows(settings_model, nested=True)
    if not any(row.startswith("| `cacheTTL` ") for row in rows):
        rows.append(_CACHE_TTL_ROW)
    return "\n".join([_HEADER, kind_row, *rows])


def render_markers(text: str, *, source: str = "<text>") -> str:
    """``text`` with the content between every pair of markers regenerated.

    Markers inside fenced code blocks are examples, left as they are.
    """
    parts: list[str] = []
    position = 0
    for fence in _FENCE.finditer(text):
        parts.append(_render_prose(text[position : fence.start()], source))
        parts.append(fence.group(0))
        position = fence.end()
    parts.append(_render_prose(text[position:], source))
    return "".join(parts)


def _render_prose(text: str, source: str) -> str:
    opened = len(_OPEN.findall(text))
    found = list(_MARKER.finditer(text))
    if opened != len(found) or text.count("<!-- /settings-table -->") != opened:
        raise DocgenError(
            f"{source}: every `<!-- settings-table: KIND -->` needs one "
            "`<!-- /settings-table -->` after it"
        )

    def replace(match: re.Match[str]) -> str:
        kind = match.group("kind")
        try:
            table = exporter_table(kind)
        except Exception as exc:
            raise DocgenError(f"{source}: settings-table {kind!r}: {exc}") from exc
        return f"{match.group('open')}\n\n{table}\n\n{match.group('close')}"

    return _MARKER.sub(replace, text)


def _rows(model: type[BaseModel], *, nested: bool = False, prefix: str = "") -> list[str]:
    """One row per field; with ``nested``, a field that is itself a settings model (such as
    kafka's ``kafka:`` mapping) is followed by rows for its keys, as ``kafka.topic``."""
    rows = []
    for name, info in model.model_fields.items():
        rows.append(_row(name, info, prefix))
        sub = info.annotation
        if nested and isinstance(sub, type) and issubclass(sub, BaseModel):
            rows.extend(_rows(sub, nested=True, prefix=f"{prefix}{info.alias or name}."))
    return rows


def _row(name: str, info: FieldInfo, prefix: str = "") -> str:
    key = prefix + (info.alias or name)
    default = "required" if info.is_required() else _default_text(info)
    description = (info.description or "").replace("\n", " ").strip()
    cells = [f"`{key}`", _type_text(info.annotation), default, description]
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _type_text(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return _either([_code(_value_text(arg)) for arg in args])
    if origin in (Union, types.UnionType):
        return _either([_type_text(arg) for arg in args if arg is not type(None)])
    if origin in (list, tuple, set, frozenset, Sequence):
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_text(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    name = _NAMES.get(annotation)
    if name is not None:
        return name
    return str(getattr(annotation, "__name__", annotation))


def _either(choices: list[str]) -> str:
    return " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 2 else choices)


def _default_text(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True, validated_data={})
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, SecretStr):
        return "hidden"
    return _code(_value_text(value))


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    padded = f" {text} " if fence != "`" else text
    return f"{fence}{padded}{fence}"


def _value_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True)
    if isinstance(value, str):
        return value.replace("\n", "\\n").replace("\t", "\\t") if value else '""'
    return json.dumps(value, default=str)


def _cell(text: str) -> str:
    """Escape ``|`` so it does not split the cell, in GitHub and Python-Markdown alike."""
    out: list[str] = []
    position = 0
    for match in _CODE.finditer(text):
        out.append(text[position : match.start()].replace("|", "\\|"))
        code = match.group(2)
        if "|" in code:
            out.append(f"<code>{html.escape(code).replace('|', '&#124;')}</code>")
        else:
            out.append(match.group(0))
        position = match.end()
    out.append(text[position:].replace("|", "\\|"))
    return "".join(out)


def _process(paths: Iterable[Path], *, write: bool) -> list[Path]:
    stale = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        fresh = render_markers(text, source=str(path))
        if fresh != text:
            stale.append(path)
            if write:
                path.write_text(fresh, encoding="utf-8")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flagsink.docgen --check|--write FILE...``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m flagsink.docgen",
        description="Regenerate (--write) or verify (--check) the settings tables between "
        "`<!-- settings-table: KIND -->` and `<!-- /settings-table -->` markers.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if any table is stale")
    mode.add_argument("--write", action="store_true", help="rewrite stale tables in place")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    try:
        stale = _process(args.files, write=args.write)
    except (DocgenError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in stale:
        print(f"{'updated' if args.write else 'stale'}: {path}")
    if stale and args.check:
        print(
            f"{len(stale)} file(s) have stale settings tables; run: python -m flagsink.docgen "
            f"--write {' '.join(str(p) for p in stale)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
