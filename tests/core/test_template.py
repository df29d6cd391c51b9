"""The safe ``{{ .Field }}`` subset of Go templates."""

from __future__ import annotations

import operator
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from flagsink.template import Template, TemplateError

FIELDS = frozenset({"UserKey", "Key", "Value", "Kind"})


def _render(source: str, **values: str) -> str:
    return Template.parse(source, FIELDS).render(values)


def _compiled(source: str, **values: str) -> str:
    template = Template.parse(source, FIELDS)
    getters = {name: operator.attrgetter(name) for name in FIELDS}
    return template.compile(getters)(SimpleNamespace(**values))


@pytest.mark.parametrize("render", [_render, _compiled])
def test_field_substitution(render: Callable[..., str]) -> None:
    source = '[x] user="{{ .UserKey}}", flag="{{.Key}}", value="{{   .Value   }}"\n'
    out = render(source, UserKey="u1", Key="f", Value="true", Kind="feature")
    assert out == '[x] user="u1", flag="f", value="true"\n'


def test_parse_splits_literals_and_names() -> None:
    template = Template.parse("a{{ .Key }}b{{ .Value }}", FIELDS)
    assert template.literals == ("a", "b", "")
    assert template.names == ("Key", "Value")
    assert template.source == "a{{ .Key }}b{{ .Value }}"


def test_missing_values_render_empty() -> None:
    assert _render("<{{ .Key }}|{{ .Value }}>", Key="k") == "<k|>"


def test_compile_missing_getter_renders_empty() -> None:
    template = Template.parse("<{{ .Key }}|{{ .Value }}>", FIELDS)
    render = template.compile({"Key": lambda obj: "k"})
    assert render(object()) == "<k|>"


@pytest.mark.parametrize("render", [_render, _compiled])
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a   {{- .Key }}   b", "ak   b"),
        ("a   {{ .Key -}}   b", "a   kb"),
        ("a \n\t {{- .Key -}} \n\t b", "akb"),
        ("{{ .Key -}}\n\n{{- .Value }}", "kv"),
        ("x {{- .Key -}}{{- .Value -}} y", "xkvy"),
        ("{{- .Key -}}", "k"),
    ],
)
def test_whitespace_trim_markers(render: Callable[..., str], source: str, expected: str) -> None:
    assert render(source, Key="k", Value="v", UserKey="", Kind="") == expected


@pytest.mark.parametrize(
    ("source", "column"),
    [
        ("{{ if .Key }}x{{ end }}", 1),
        ("ab{{ .Key | printf }}", 3),
        ("{{ .Key }};{{ range .Value }}", 12),
        ('{{ printf "%s" .Key }}', 1),
        ("{{ call .Key }}", 1),
        ("{{/* comment */}}", 1),
        ("{{ . }}", 1),
        ("{{ .Key.Sub }}", 1),
        ("{{ $x := .Key }}", 1),
        ("{{}}", 1),
    ],
)
def test_unsupported_actions_rejected_with_setting_and_column(source: str, column: int) -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse(source, FIELDS, setting="csvTemplate")
    message = str(info.value)
    assert message.startswith("csvTemplate: ")
    assert "unsupported template action" in message
    assert f"at column {column}" in message


def test_unknown_field_rejected_with_did_you_mean() -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse("a;{{ .UserKy }}", FIELDS, setting="logFormat")
    message = str(info.value)
    assert message.startswith("logFormat: unknown field .UserKy at column 3")
    assert "did you mean .UserKey?" in message
    assert ".Key, .Kind, .UserKey, .Value" in message


def test_unknown_field_without_close_match_lists_fields() -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse("{{ .Zzzzzzzz }}", FIELDS)
    assert "did you mean" not in str(info.value)
    assert "available: .Key" in str(info.value)


def test_field_names_are_case_sensitive() -> None:
    with pytest.raises(TemplateError, match=r"did you mean \.UserKey"):
        Template.parse("{{ .userKey }}", FIELDS)


@pytest.mark.parametrize(
    ("source", "column"),
    [("{{ .Key", 1), ("ok {{ .Key }} then {{ .Value", 20), ("{{", 1), ("a{{ .Key }}{{", 12)],
)
def test_unclosed_action_rejected(source: str, column: int) -> None:
    with pytest.raises(TemplateError) as info:
        Template.parse(source, FIELDS, setting="filename")
    assert str(info.value).startswith(f"filename: unclosed '{{{{' at column {column}")


def test_default_setting_name_in_errors() -> None:
    with pytest.raises(TemplateError, match=r"^template: "):
        Template.parse("{{ if }}", FIELDS)


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


@pytest.mark.parametrize("render", [_render, _compiled])
def test_values_are_never_interpreted(render: Callable[..., str]) -> None:
    tricky = "{{ .Key }} {0} {} %s ${HOME} __import__('os')"
    out = render("<{{ .UserKey }}>{}", UserKey=tricky, Key="SECRET", Value="", Kind="")
    assert out == f"<{tricky}>{{}}"
    assert "SECRET" not in out


def test_literal_braces_in_compiled_template() -> None:
    assert _compiled('{"user": "{{ .UserKey }}"} }', UserKey="u", Key="", Value="", Kind="") == (
        '{"user": "u"} }'
    )


@given(st.text().filter(lambda text: "{{" not in text))
def test_literal_text_renders_unchanged(text: str) -> None:
    template = Template.parse(text, FIELDS)
    assert template.names == ()
    assert template.render({}) == text
    assert template.compile({})(object()) == text


@given(
    st.lists(st.text().filter(lambda t: "{{" not in t and "}" not in t), min_size=1, max_size=5),
    st.lists(st.sampled_from(sorted(FIELDS)), min_size=4, max_size=4),
)
def test_literals_around_fields_preserved(parts: list[str], names: list[str]) -> None:
    source = "".join(
        part + (f"{{{{ .{names[i % 4]} }}}}" if i < len(parts) - 1 else "")
        for i, part in enumerate(parts)
    )
    # A literal ending in "{" would join the next action's braces; skip those.
    assume(not any(part.endswith("{") for part in parts[:-1]))
    values = {name: f"<{name}>" for name in FIELDS}
    expected = "".join(
        part + (values[names[i % 4]] if i < len(parts) - 1 else "") for i, part in enumerate(parts)
    )
    template = Template.parse(source, FIELDS)
    assert template.render(values) == expected

    def getter(name: str) -> Callable[[object], str]:
        return lambda _: values[name]

    assert template.compile({n: getter(n) for n in FIELDS})(None) == expected
