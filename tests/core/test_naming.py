"""File and object names from the ``filename`` template."""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import UTC, datetime

import pytest

from flagsink.naming import (
    DEFAULT_FILENAME,
    REMEMBERED,
    ObjectNamer,
    check_relative_path,
    hostname,
    with_suffix,
)
from flagsink.template import TemplateError

TS = 1_700_000_000


def test_default_template_renders_go_feature_flag_name() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "json")
    assert namer.next_name(TS) == f"flag-variation-{hostname()}-{TS}.json"


def test_default_template_uses_now_and_format() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "parquet")
    before = int(time.time())
    name = namer.next_name()
    after = int(time.time())
    match = re.fullmatch(rf"flag-variation-{re.escape(hostname())}-(\d+)\.parquet", name)
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_thousand_names_in_one_second_are_unique() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "json")
    names = [namer.next_name(TS + 0.5) for _ in range(1000)]
    assert len(set(names)) == 1000
    assert all(name.endswith(".json") for name in names)
    assert names[0] == f"flag-variation-{hostname()}-{TS}.json"
    assert names[1] == f"flag-variation-{hostname()}-{TS}-1.json"
    assert names[999] == f"flag-variation-{hostname()}-{TS}-999.json"


def test_consecutive_calls_with_real_clock_are_unique() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "csv")
    names = [namer.next_name() for _ in range(1000)]
    assert len(set(names)) == 1000
    assert all(name.endswith(".csv") for name in names)


def test_new_second_restarts_the_sequence() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "json")
    host = hostname()
    assert namer.next_name(TS) == f"flag-variation-{host}-{TS}.json"
    assert namer.next_name(TS) == f"flag-variation-{host}-{TS}-1.json"
    assert namer.next_name(TS + 1) == f"flag-variation-{host}-{TS + 1}.json"


def test_clock_stepping_back_never_repeats_a_name() -> None:
    namer = ObjectNamer("e-{{ .Timestamp}}.{{ .Format}}", "json")
    names = [namer.next_name(now) for now in (TS, TS + 1, TS, TS + 1, TS)]
    assert names == [
        f"e-{TS}.json",
        f"e-{TS + 1}.json",
        f"e-{TS}-1.json",
        f"e-{TS + 1}-1.json",
        f"e-{TS}-2.json",
    ]


def test_cycling_template_never_repeats_a_name() -> None:
    # {{ .Minute}} alone comes back every hour: names must still be new.
    namer = ObjectNamer("events-{{ .Minute}}.{{ .Format}}", "csv")
    names = [namer.next_name(TS + minute * 60) for minute in range(3 * 60)]
    assert len(set(names)) == len(names)
    assert all(name.endswith(".csv") for name in names)


def test_remembered_names_are_bounded() -> None:
    namer = ObjectNamer("e-{{ .Timestamp}}.json", "json")
    for second in range(REMEMBERED + 50):
        namer.next_name(TS + second)
    assert len(namer._used) == REMEMBERED
    # The most recent names are still remembered.
    assert namer.next_name(TS + REMEMBERED + 49) == f"e-{TS + REMEMBERED + 49}-1.json"


def test_template_without_extension_gets_plain_suffix() -> None:
    namer = ObjectNamer("events", "json")
    assert [namer.next_name(TS) for _ in range(3)] == ["events", "events-1", "events-2"]


@pytest.mark.parametrize(
    ("name", "sequence", "extension", "expected"),
    [
        ("a.json", 0, "json", "a.json"),
        ("a.json", 2, "json", "a-2.json"),
        ("a.csv", 2, "json", "a.csv-2"),
        ("a", 3, "", "a-3"),
        ("dir/a.parquet", 1, "parquet", "dir/a-1.parquet"),
    ],
)
def test_with_suffix(name: str, sequence: int, extension: str, expected: str) -> None:
    assert with_suffix(name, sequence, extension) == expected


def test_date_fields_are_utc() -> None:
    # 2024-12-31T23:30:00Z: already 2025-01-01 08:30 in Tokyo.
    moment = datetime(2024, 12, 31, 23, 30, tzinfo=UTC).timestamp()
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        namer = ObjectNamer(
            "{{ .Year}}/{{ .Month}}/{{ .Day}}/{{ .Hour}}/{{ .Minute}}/e.{{ .Format}}", "csv"
        )
        assert namer.next_name(moment) == "2024/12/31/23/30/e.csv"
        assert namer.next_name(datetime(2025, 3, 4, 5, 6, tzinfo=UTC).timestamp()) == (
            "2025/03/04/05/06/e.csv"
        )
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize(
    "template",
    [
        "/etc/passwd",
        "/tmp/{{ .Timestamp}}.{{ .Format}}",
        "\\share\\x.json",
        "C:/x.json",
        "../{{ .Timestamp}}.json",
        "a/../../x.json",
        "{{ .Year}}/../x",
        "a/./x.json",
        "a//x.json",
        "dir/",
        "",
        "a\\..\\x.json",
    ],
)
def test_escaping_names_rejected_at_construction(template: str) -> None:
    with pytest.raises(TemplateError) as info:
        ObjectNamer(template, "json", setting="filename")
    assert str(info.value).startswith("filename: ")


def test_nested_relative_names_allowed() -> None:
    namer = ObjectNamer("year={{ .Year}}/{{ .Hostname}}.{{ .Format}}", "json")
    assert namer.next_name(TS) == f"year=2023/{hostname()}.json"


def test_unknown_field_rejected_at_construction() -> None:
    with pytest.raises(TemplateError, match=r"did you mean \.Timestamp"):
        ObjectNamer("x-{{ .Timestmp}}.json", "json")


def test_check_relative_path_names_setting() -> None:
    assert check_relative_path("a/b.json") == "a/b.json"
    with pytest.raises(TemplateError, match=r"^path: "):
        check_relative_path("/abs", setting="path")
    with pytest.raises(TemplateError):
        check_relative_path("a\x00b")


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("web-01.example.com", "web-01.example.com"),
        ("evil/../host name", "evil-..-host-name"),
        ("../..", "unknown-host"),
        ("..", "unknown-host"),
        ("", "unknown-host"),
        ("a\\b:c", "a-b-c"),
        ("ホスト", "unknown-host"),
    ],
)
def test_hostname_sanitised(monkeypatch: pytest.MonkeyPatch, raw: str, safe: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: raw)
    assert hostname() == safe
    name = ObjectNamer(DEFAULT_FILENAME, "json").next_name(TS)
    assert name == f"flag-variation-{safe}-{TS}.json"
    assert "/" not in name
    assert "\\" not in name
