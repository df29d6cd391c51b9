"""Config files: GO Feature Flag's exporter sections unchanged, env expansion, and errors that
name the file, the line and the path, and never echo a value."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagsink.config import Config, ConfigError, load_config, parse_config
from flagsink.event import new_feature_event, new_tracking_event
from flagsink.exporters.file import FileExporter
from flagsink.exporters.log import LogExporter
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import Registry, installed_plugins

SECRET = "sup3r-s3cret"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, registry: Registry | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=registry or Registry())
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(path: Path) -> str:
    (problem,) = problems_of(path)
    return problem


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def read_json_lines(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.json"))
        for line in path.read_text().splitlines()
    ]


# -- GO Feature Flag files accepted unchanged ----------------------------------------------

GOFF_PROXY = """\
# goff-proxy.yaml, as the GO Feature Flag relay proxy reads it
listen: 1031
pollingInterval: 1000
startWithRetrieverError: false
enableSwagger: true
retriever:
  kind: file
  path: /goff/flags.goff.yaml
notifier:
  - kind: slack
    slackWebhookUrl: https://hooks.slack.com/services/T000/B000/XXXX
exporter:
  kind: file
  outputDir: {out}
  flushInterval: 10000
  maxEventInMemory: 1000
  eventType: feature
  format: csv
  filename: "flag-variation-{{{{ .Hostname}}}}-{{{{ .Timestamp}}}}.{{{{ .Format}}}}"
  csvTemplate: "{{{{ .Kind}}}};{{{{ .ContextKind}}}};{{{{ .UserKey}}}};{{{{ .CreationDate}}}};\
{{{{ .Key}}}};{{{{ .Variation}}}};{{{{ .Value}}}};{{{{ .Default}}}};{{{{ .Source}}}}\\n"
"""


def test_realistic_goff_proxy_yaml_is_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "events"
    path = write(tmp_path, "goff-proxy.yaml", GOFF_PROXY.format(out=json.dumps(str(out))))
    with caplog.at_level(logging.INFO, logger="flagsink.config"):
        config = load_config(path, registry=Registry())

    assert isinstance(config, Config)
    assert config.source == str(path)
    (section,) = config.exporters
    assert section.path == "exporter"
    assert section.exporter_class is FileExporter
    assert section.label == "file"
    timing = section.scheduling
    assert timing.kind == "file"
    assert timing.flush_interval == 10_000
    assert timing.max_event_in_memory == 1_000
    assert timing.event_type == "feature"
    assert section.settings.output_dir == str(out)  # type: ignore[attr-defined]
    assert section.settings.format == "csv"  # type: ignore[attr-defined]
    assert section.settings.csv_template.endswith("{{ .Source}}\n")  # type: ignore[attr-defined]
    ignored = caplog.text
    for key in ("retriever", "notifier", "pollingInterval", "startWithRetrieverError"):
        assert repr(key) in ignored
    assert "hooks.slack.com" not in ignored

    # and it runs: the csv lands in outputDir in GO Feature Flag's default layout
    pipeline = from_config(config)
    try:
        pipeline.add_event(new_feature_event("u1", "flag-a", True, "on", creation_date=1_700_000))
        assert pipeline.flush(10)
    finally:
        assert pipeline.close(10)
    (written,) = out.glob("flag-variation-*.csv")
    assert written.read_text() == "feature;user;u1;1700000;flag-a;on;true;false;SERVER\n"


def test_exporters_list_with_defaults_and_tracking(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "relay.yaml",
        """\
exporters:
  - kind: file
    outputDir: a
  - kind: log
    eventType: tracking
    logFormat: "{{ .UserKey}} did {{ .Key}}"
""",
    )
    config = load_config(path, registry=Registry())
    first, second = config.exporters
    assert [first.path, second.path] == ["exporters[0]", "exporters[1]"]
    assert first.exporter_class is FileExporter
    assert second.exporter_class is LogExporter
    assert first.scheduling.flush_interval == 60_000  # GO Feature Flag's defaults
    assert first.scheduling.max_event_in_memory == 100_000
    assert first.scheduling.event_type == "feature"
    assert first.settings.format == "json"  # type: ignore[attr-defined]
    assert second.scheduling.event_type == "tracking"


def test_exporter_and_exporters_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "both.yaml",
        "exporter:\n  kind: log\nexporters:\n  - kind: file\n    outputDir: x\n",
    )
    config = load_config(path, registry=Registry())
    assert [(e.path, e.scheduling.kind) for e in config.exporters] == [
        ("exporter", "log"),
        ("exporters[0]", "file"),
    ]


def test_json_config_is_equivalent(tmp_path: Path) -> None:
    data = {
        "pollingInterval": 500,
        "retrievers": [{"kind": "http", "url": "https://example.com/flags.yaml"}],
        "exporters": [
            {
                "kind": "file",
                "outputDir": "out",
                "flushInterval": 2500,
                "maxEventInMemory": 10,
                "format": "parquet",
                "parquetCompressionCodec": "zstd",
                "filename": "{{ .Year}}/{{ .Month}}/events-{{ .Timestamp}}.{{ .Format}}",
            }
        ],
    }
    config = load_config(write(tmp_path, "c.json", json.dumps(data)), registry=Registry())
    (section,) = config.exporters
    assert section.scheduling.flush_interval == 2500
    assert section.scheduling.max_event_in_memory == 10
    assert section.settings.parquet_compression_codec == "ZSTD"  # type: ignore[attr-defined]
    assert config.raw == data


def test_camel_case_exporter_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
exporter:
  kind: file
  name: archive
  outputDir: out
  maxEventInMemory: 7
  maxBufferedEvents: 70
  retryInitialInterval: 250
  retryMaxInterval: 4000
  parquetCompressionCodec: gzip
  csvTemplate: "{{ .Key}}\\n"
""",
    )
    (section,) = load_config(path, registry=Registry()).exporters
    timing = section.scheduling
    assert (timing.max_event_in_memory, timing.max_buffered_events) == (7, 70)
    assert (timing.retry_initial_interval, timing.retry_max_interval) == (250, 4000)
    assert section.label == "archive"
    assert section.settings.csv_template == "{{ .Key}}\n"  # type: ignore[attr-defined]
    assert section.settings.parquet_compression_codec == "GZIP"  # type: ignore[attr-defined]


def test_parse_config_accepts_parsed_data() -> None:
    config = parse_config({"exporter": {"kind": "log"}}, registry=Registry())
    assert config.source == "<config>"
    assert config.exporters[0].exporter_class is LogExporter


# -- environment variables -----------------------------------------------------------------


def test_variables_are_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FS_OUT", str(tmp_path / "from-env"))
    monkeypatch.setenv("FS_FLUSH", "1500")
    monkeypatch.setenv("FS_EMPTY", "")
    monkeypatch.delenv("FS_UNSET", raising=False)
    path = write(
        tmp_path,
        "c.yaml",
        """\
exporters:
  - kind: file
    outputDir: ${FS_OUT}
    flushInterval: ${FS_FLUSH}
    maxEventInMemory: ${FS_UNSET:-42}
    name: "${FS_EMPTY:-fallback}-$${FS_OUT}-${FS_EMPTY}-end"
""",
    )
    (section,) = load_config(path, registry=Registry()).exporters
    assert section.settings.output_dir == str(tmp_path / "from-env")  # type: ignore[attr-defined]
    assert section.scheduling.flush_interval == 1500
    assert section.scheduling.max_event_in_memory == 42
    assert section.label == "fallback-${FS_OUT}--end"


def test_missing_variable_names_variable_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FS_MISSING_DIR", raising=False)
    path = write(
        tmp_path,
        "c.yaml",
        "exporters:\n  - kind: log\n  - kind: file\n    outputDir: ${FS_MISSING_DIR}/x\n",
    )
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: exporters[1].outputDir: ")
    assert "FS_MISSING_DIR is not set" in problem
    assert "${FS_MISSING_DIR:-default}" in problem


def test_variable_value_is_not_expanded_again_or_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FS_TOKEN", f"{SECRET}-${{FS_NOT_SET}}")
    monkeypatch.delenv("FS_NOT_SET", raising=False)
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: log\n  name: ${FS_TOKEN}\n")
    (section,) = load_config(path, registry=Registry()).exporters
    assert section.label == f"{SECRET}-${{FS_NOT_SET}}"

    path = write(tmp_path, "d.yaml", "exporter:\n  kind: log\n  flushInterval: ${FS_TOKEN}\n")
    problem = only_problem(path)
    assert "exporter.flushInterval" in problem
    assert SECRET not in problem


# Environment values: any text without NUL (which the OS cannot store) or surrogates.
env_values = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


@settings(max_examples=75, deadline=None)
@given(value=env_values, literal=st.text(st.sampled_from("ab{}$:-_ "), max_size=12))
def test_expansion_is_one_exact_substitution(value: str, literal: str) -> None:
    data = {
        "exporter": {"kind": "log", "name": "<${FS_HYPO}>" + literal.replace("$", "$$")},
    }
    with mock.patch.dict(os.environ, {"FS_HYPO": value}):
        config = parse_config(data, registry=Registry())
    expected_literal = literal.replace("$", "$$").replace("$${", "${")
    assert config.exporters[0].label == f"<{value}>{expected_literal}"


# -- errors: file, line, path ----------------------------------------------------------------


def test_error_names_file_line_and_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "relay.yaml",
        """\
exporters:
  - kind: file
    outputDir: ok
    flushInterval: soon
  - kind: file
    format: csv
""",
    )
    problems = problems_of(path)
    assert problems == [
        f"{path}:4: exporters[0].flushInterval: Input should be a valid integer, "
        "unable to parse string as an integer",
        f"{path}:5: exporters[1].outputDir: required",
    ]


@pytest.mark.parametrize(
    ("section", "path_and_message"),
    [
        ("flushInterval: 0", "exporter.flushInterval: Input should be greater than 0"),
        ("maxEventInMemory: 1.5", "exporter.maxEventInMemory: Input should be a valid integer"),
        ("eventType: both", "exporter.eventType: Input should be 'feature' or 'tracking'"),
        ("outputDir: [a, b]", "exporter.outputDir: Input should be a valid string"),
        ("format: 3", "exporter.format: Input should be a valid string"),
        ("outputDirectory: x", "exporter.outputDirectory: unknown key (did you mean 'outputDir'?)"),
        (
            "flushIntervall: 5",
            "exporter.flushIntervall: unknown key (did you mean 'flushInterval'?)",
        ),
    ],
)
def test_wrong_types_and_unknown_keys(tmp_path: Path, section: str, path_and_message: str) -> None:
    path = write(tmp_path, "c.yaml", f"exporter:\n  kind: file\n  outputDir: out\n  {section}\n")
    problems = problems_of(path)
    assert any(p.startswith(f"{path}:4: {path_and_message}") for p in problems), problems


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: log\n  logFormats: x\n")
    problem = only_problem(path)
    assert problem.startswith(
        f"{path}:3: exporter.logFormats: unknown key (did you mean 'logFormat'?)"
    )
    assert "valid keys: " in problem
    for key in ("logFormat", "level", "flushInterval", "eventType"):
        assert key in problem


def test_missing_kind_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporters:\n  - outputDir: out\n")
    assert only_problem(path).startswith(f"{path}:2: exporters[0].kind: required")


def test_invalid_csv_template_is_reported_at_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        "exporters:\n  - kind: file\n    outputDir: out\n    format: csv\n"
        '    csvTemplate: "{{ .Kind}};{{ .Flag }}"\n',
    )
    problem = only_problem(path)
    prefix = f"{path}:5: exporters[0].csvTemplate: "
    assert problem.startswith(prefix)
    detail = problem.removeprefix(prefix)
    assert not detail.startswith("csvTemplate")  # the key is named once
    assert ".Flag" in detail
    assert ".UserKey" in detail  # lists what is available


def test_invalid_filename_template_is_reported_at_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, "c.yaml", 'exporter:\n  kind: file\n  outputDir: o\n  filename: "../x"\n'
    )
    assert only_problem(path).startswith(f"{path}:4: exporter.filename: ")


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: log\nauthorisedKeys: {}\n")
    problem = only_problem(path)
    assert problem.startswith(
        f"{path}:3: authorisedKeys: unknown key (did you mean 'authorizedKeys'?); valid keys: "
    )
    assert "exporters" in problem


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: file\n  outputDir: [out\n  x: 1\n\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:")
    assert "invalid YAML" in problem
    line = int(problem.split(":")[1])
    assert 3 <= line <= 5

    tabbed = write(tmp_path, "t.yaml", "exporter:\n  kind: file\n\tbad: 1\n")
    assert only_problem(tabbed).startswith(f"{tabbed}:3: invalid YAML: ")


def test_invalid_json_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{\n  "exporter": {\n    "kind": "log",\n  }\n}\n')
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: invalid JSON: ")


def test_recursive_yaml_alias_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter: &x\n  kind: log\n  name: *x\n")
    assert only_problem(path).startswith(f"{path}: invalid YAML")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a mapping with an `exporter` or `exporters` key"),
        ("- kind: log\n", "expected a mapping with an `exporter` or `exporters` key"),
        ("listen: 1031\n", "no exporter configured"),
        ("exporters: []\n", "no exporter configured"),
        ("exporters:\n  kind: log\n", "exporters: expected a list of exporter sections"),
        ("exporters:\n  - log\n", "exporters[0]: expected a mapping with at least a `kind` key"),
    ],
)
def test_shape_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "c.yaml", text)
    problem = only_problem(path)
    assert problem.startswith(str(path))
    assert message in problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)


# -- secrets are never echoed ----------------------------------------------------------------


def test_secret_values_never_appear_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FS_SECRET", SECRET)
    path = write(
        tmp_path,
        "c.yaml",
        f"""\
apiKey: {SECRET}
exporters:
  - kind: file
    outputDir: out
    flushInterval: {SECRET}
    maxEventInMemory: ${{FS_SECRET}}
    eventType: {SECRET}
    name: [{SECRET}]
    parquetCompressionCodec: {SECRET}
    password: {SECRET}
    headers:
      Authorization: Bearer {SECRET}
  - kind: log
    level: {SECRET}
    logFormat: [{SECRET}]
    token: ${{FS_SECRET}}
""",
    )
    problems = problems_of(path)
    assert len(problems) >= 10
    for problem in problems:
        assert SECRET not in problem
    text = "\n".join(problems)
    for where in (
        "apiKey: unknown key (did you mean 'apiKeys'?)",
        "exporters[0].flushInterval",
        "exporters[0].maxEventInMemory",
        "exporters[0].eventType",
        "exporters[0].name",
        "exporters[0].parquetCompressionCodec",
        "exporters[0].password: unknown key",
        "exporters[0].headers: unknown key",
        "exporters[1].level",
        "exporters[1].logFormat",
        "exporters[1].token: unknown key",
    ):
        assert where in text


def test_invalid_syntax_does_not_echo_the_text(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", f"exporter:\n  kind: log\n  token: '{SECRET}\n")
    assert SECRET not in only_problem(path)
    path = write(tmp_path, "c.json", f'{{"exporter": {{"kind": "log", "token": "{SECRET}}}')
    assert SECRET not in only_problem(path)


# -- several problems at once ----------------------------------------------------------------


def test_several_problems_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        """\
exportrs: []
exporters:
  - kind: file
    flushInterval: -5
    outptDir: out
  - kind: nosuchsink
  - kind: log
    level: LOUD
""",
    )
    problems = problems_of(path)
    expected = [
        f"{path}:1: exportrs: unknown key",
        f"{path}:4: exporters[0].flushInterval: Input should be greater than 0",
        f"{path}:3: exporters[0].outputDir: required",
        f"{path}:5: exporters[0].outptDir: unknown key (did you mean 'outputDir'?)",
        f"{path}:6: exporters[1].kind: unknown exporter 'nosuchsink'",
        f"{path}:8: exporters[2].level: ",
    ]
    assert len(problems) == len(expected)
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


# -- kinds -----------------------------------------------------------------------------------


def test_unknown_kind_lists_installed_kinds_and_suggests_pip(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: snowflake\n  account: x\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: exporter.kind: unknown exporter 'snowflake'")
    installed = problem.split("Installed: ")[1].split(".")[0]
    assert {"file", "log"} <= set(installed.split(", "))
    assert "pip install flagsink-snowflake" in problem


@pytest.mark.parametrize(
    ("alias", "package"),
    [("googleStorage", "flagsink-gcs"), ("azureBlobStorage", "flagsink-azureblob")],
)
def test_goff_kind_aliases_point_at_their_plugin(tmp_path: Path, alias: str, package: str) -> None:
    if any(p.name in ("gcs", "azureblob") for p in installed_plugins()):
        pytest.skip("a gcs/azureblob plugin is installed in this environment")
    path = write(
        tmp_path,
        "c.yaml",
        f"exporter:\n  kind: {alias}\n  bucket: events\n  flushInterval: 1000\n",
    )
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: exporter.kind: unknown exporter {alias!r}")
    assert f"pip install {package}" in problem


# -- from_config -----------------------------------------------------------------------------


def test_from_config_routes_feature_and_tracking_events(tmp_path: Path) -> None:
    features, tracking = tmp_path / "features", tmp_path / "tracking"
    path = write(
        tmp_path,
        "flagsink.yaml",
        f"""\
exporters:
  - kind: file
    outputDir: {json.dumps(str(features))}
    flushInterval: 600000
  - kind: file
    name: tracking-archive
    outputDir: {json.dumps(str(tracking))}
    eventType: tracking
    flushInterval: 600000
""",
    )
    pipeline = from_config(path)
    assert isinstance(pipeline, Pipeline)
    try:
        assert [s.name for s in pipeline.schedulers] == ["file", "tracking-archive"]
        assert pipeline.schedulers[0].flush_interval == 600.0
        for i in range(3):
            pipeline.add_event(new_feature_event(f"u{i}", "flag", i, "v", creation_date=1_000))
        pipeline.add_event(new_tracking_event("u9", "checkout", {"total": 3}, creation_date=1_000))
        assert pipeline.flush(10)
    finally:
        assert pipeline.close(10)
    got_features = read_json_lines(features)
    got_tracking = read_json_lines(tracking)
    assert [e["kind"] for e in got_features] == ["feature"] * 3
    assert [e["userKey"] for e in got_features] == ["u0", "u1", "u2"]
    assert got_tracking == [
        {
            "kind": "tracking",
            "contextKind": "user",
            "userKey": "u9",
            "creationDate": 1000,
            "key": "checkout",
            "evaluationContext": {},
            "trackingEventDetails": {"total": 3},
        }
    ]


def test_from_config_flushes_on_max_event_in_memory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write(
        tmp_path,
        "c.yaml",
        f"exporter:\n  kind: file\n  outputDir: {json.dumps(str(out))}\n"
        "  flushInterval: 600000\n  maxEventInMemory: 2\n",
    )
    with from_config(path) as pipeline:
        pipeline.add_event(new_feature_event("a", "f", 1, "v"))
        pipeline.add_event(new_feature_event("b", "f", 2, "v"))
        assert wait_until(lambda: len(read_json_lines(out)) == 2)


def test_from_config_reports_unusable_output_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    path = write(
        tmp_path,
        "c.yaml",
        "exporters:\n  - kind: log\n"
        f"  - kind: file\n    outputDir: {json.dumps(str(blocker / 'sub'))}\n",
    )
    config = load_config(path, registry=Registry())  # shape is valid
    with pytest.raises(ConfigError) as info:
        from_config(config)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3: exporters[1].outputDir: cannot create directory")


def test_from_config_with_invalid_file_raises_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "exporter:\n  kind: file\n")
    with pytest.raises(ConfigError, match=r"exporter\.outputDir: required"):
        from_config(path)
