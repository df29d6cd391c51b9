"""A safe subset of Go's text/template: ``{{ .Field }}`` substitution and nothing else.

GO Feature Flag's ``csvTemplate``, ``logFormat`` and ``filename`` settings use Go templates.
flagsink accepts the same text for field substitution (with the ``{{-``/``-}}`` whitespace
trim markers) and rejects every other action at config time with an error that names the
setting, the position and the fields available. No code ever runs from a template.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

__all__ = ["Template", "TemplateError"]

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
_FIELD = re.compile(r"^\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*$")


class TemplateError(ValueError):
    """A template uses something other than ``{{ .Field }}`` or an unknown field."""


@dataclass(frozen=True)
class Template:
    """A parsed template: alternating literal text and field names.

    :param source: the template text, e.g. ``"{{ .Kind}};{{ .UserKey}}\\n"``.
    :param fields: the field names a template may use.
    :param setting: the setting name used in error messages (e.g. ``csvTemplate``).
    """

    source: str
    literals: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, source: str, fields: Collection[str], *, setting: str = "template") -> Template:
        """Parse ``source``; raise :class:`TemplateError` naming what is wrong and where."""
        literals: list[str] = []
        names: list[str] = []
        pending = ""
        position = 0
        for match in _ACTION.finditer(source):
            text = source[position : match.start()]
            if match.group(1):
                text = text.rstrip()
            literals.append(pending + text)
            name = _field_name(match.group(2), source, match.start(), fields, setting)
            names.append(name)
            position = match.end()
            pending = ""
            if match.group(3):
                rest = source[position:]
                position += len(rest) - len(rest.lstrip())
        tail = source[position:]
        stray = tail.find("{{")
        if stray >= 0:
            raise TemplateError(
                f"{setting}: unclosed '{{{{' at column {position + stray + 1}: "
                "close it with '}}', e.g. {{ .UserKey }}"
            )
        literals.append(pending + tail)
        return cls(source, tuple(literals), tuple(names))

    def render(self, values: Mapping[str, str]) -> str:
        """Substitute ``values`` (missing fields render empty)."""
        out = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            out.append(values.get(name, ""))
            out.append(literal)
        return "".join(out)

    def compile(self, getters: Mapping[str, Callable[[object], str]]) -> Callable[[object], str]:
        """Return a fast renderer that reads each field with ``getters[name](obj)``."""
        fmt = "{}".join(literal.replace("{", "{{").replace("}", "}}") for literal in self.literals)
        empty: Callable[[object], str] = _empty
        funcs = tuple(getters.get(name, empty) for name in self.names)
        format_ = fmt.format

        def render(obj: object) -> str:
            return format_(*[f(obj) for f in funcs])

        return render


def _empty(_: object) -> str:
    return ""


def _field_name(
    action: str, source: str, offset: int, fields: Collection[str], setting: str
) -> str:
    match = _FIELD.match(action)
    column = offset + 1
    if match is None:
        raise TemplateError(
            f"{setting}: unsupported template action '{{{{{action}}}}}' at column {column}: "
            "only field substitution such as {{ .UserKey }} is allowed"
        )
    name = match.group(1)
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean .{close[0]}?)" if close else ""
        raise TemplateError(
            f"{setting}: unknown field .{name} at column {column}{hint}; "
            f"available: {', '.join('.' + f for f in sorted(fields))}"
        )
    return name
