"""GO Feature Flag flag files and the store items made from them.

A flag file (YAML, JSON or TOML) maps flag keys to flag definitions, exactly as GO Feature
Flag's retrievers read them. In a store, each flag is the item
``{"key": k, "version": n, "flag": <definition unchanged>}`` in namespace ``flags``: the
definition is served to providers as written (its own ``version`` string included), and
``version`` is the store's integer version.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from flagsink.store import Item

__all__ = [
    "FlagFileError",
    "content_hash",
    "flag_definition",
    "flag_item",
    "load_flag_file",
    "next_version",
    "numeric_version",
    "parse_flag_text",
    "tracks_events",
]

_NUMERIC = re.compile(r"^\s*(\d+)(?:\.0+)?\s*$")


class FlagFileError(Exception):
    """A flag file cannot be read; the message names the file and line when known."""


def parse_flag_text(text: str, source: str) -> dict[str, dict[str, Any]]:
    """Parse a flag file's text (format from ``source``'s suffix: .json, .toml, else YAML)."""
    suffix = Path(source).suffix.lower()
    data: Any
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FlagFileError(f"{source}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line = re.search(r"line (\d+)", str(exc))
            at = f":{line.group(1)}" if line else ""
            raise FlagFileError(f"{source}{at}: invalid TOML: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise FlagFileError(f"{source}{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlagFileError(f"{source}: expected a mapping of flag key -> flag definition")
    for key, definition in data.items():
        if not isinstance(definition, dict):
            raise FlagFileError(
                f"{source}{_line_of(text, str(key))}: flag {key!r}: expected a mapping "
                "(variations, defaultRule, ...)"
            )
    return {str(key): definition for key, definition in data.items()}


def _line_of(text: str, key: str) -> str:
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip(" \t\"'[")
        if stripped.startswith(key) and not line[:1].isspace():
            return f":{number}"
    return ""


def load_flag_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and parse the flag file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FlagFileError(f"{path}: cannot read: {exc}") from None
    return parse_flag_text(text, str(path))


def numeric_version(definition: Mapping[str, Any]) -> int | None:
    """The flag's own ``version`` as an int when numeric-ish (``3``, ``"3"``, ``"3.0"``)."""
    version = definition.get("version")
    if isinstance(version, bool):
        return None
    if isinstance(version, int) and version >= 0:
        return version
    if isinstance(version, float) and version.is_integer() and version >= 0:
        return int(version)
    if isinstance(version, str):
        match = _NUMERIC.match(version)
        if match:
            return int(match.group(1))
    return None


def content_hash(definition: Mapping[str, Any]) -> str:
    """A stable hash of a flag definition."""
    body = json.dumps(definition, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def flag_item(key: str, definition: Mapping[str, Any], version: int) -> Item:
    """The store item for flag ``key``."""
    return {"key": key, "version": version, "flag": dict(definition)}


def flag_definition(item: Mapping[str, Any]) -> dict[str, Any]:
    """The flag definition held by a store item (items written by other tools may hold
    the definition at top level: then everything but ``key`` is returned)."""
    inner = item.get("flag")
    if isinstance(inner, dict):
        return inner
    return {k: v for k, v in item.items() if k not in ("key", "deleted")}


def tracks_events(item: Mapping[str, Any]) -> bool:
    """False only when the flag says ``trackEvents: false``."""
    return flag_definition(item).get("trackEvents", True) is not False


def next_version(definition: Mapping[str, Any], current: Mapping[str, Any] | None) -> int | None:
    """The version to store ``definition`` with over ``current`` (None = unchanged, skip).

    A numeric ``version`` in the definition is used as is; otherwise the version goes up by
    one whenever the content changes.
    """
    own = numeric_version(definition)
    unchanged = current is not None and not current.get("deleted")
    if unchanged and current is not None and flag_definition(current) == dict(definition):
        return None
    base = int(current["version"]) if current is not None else 0
    if own is not None:
        return own
    return base + 1
