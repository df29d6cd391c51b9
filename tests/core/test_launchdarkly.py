"""The LaunchDarkly event processor, against the real SDK offline (TestData and Files sources)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ldclient = pytest.importorskip("ldclient")

from ldclient import Context, LDClient  # noqa: E402
from ldclient.config import Config  # noqa: E402
from ldclient.integrations import Files  # noqa: E402
from ldclient.integrations.test_data import TestData  # noqa: E402

from flagsink.event import FeatureEvent, TrackingEvent  # noqa: E402
from flagsink.integrations.launchdarkly import (  # noqa: E402
    FlagsinkEventProcessor,
    flagsink_event_processor,
)
from flagsink.pipeline import Pipeline  # noqa: E402
from flagsink.scheduler import DataExporterScheduler  # noqa: E402
from flagsink.testing import InMemoryExporter, wait_until  # noqa: E402

SDK_KEY = "sdk-test-key"


class Sink:
    """A pipeline over two in-memory exporters: one for feature, one for tracking events."""

    def __init__(self) -> None:
        self.features = InMemoryExporter()
        self.tracking = InMemoryExporter()
        self.pipeline = Pipeline(
            [
                (DataExporterScheduler(self.features, flush_interval=60), "feature"),
                (DataExporterScheduler(self.tracking, flush_interval=60), "tracking"),
            ]
        )

    def close(self) -> None:
        self.pipeline.close(5)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def make_client(update_processor: Any, processor: Any, **options: Any) -> LDClient:
    config = Config(
        SDK_KEY,
        update_processor_class=update_processor,
        send_events=True,
        event_processor_class=processor,
        diagnostic_opt_out=True,
        **options,
    )
    client = LDClient(config=config, start_wait=5)
    assert client.is_initialized()
    return client


@pytest.fixture
def td() -> TestData:
    data = TestData.data_source()
    data.update(data.flag("bool-flag").boolean_flag().variation_for_all(True))
    data.update(
        data.flag("string-flag")
        .variations("red", "green", "blue")
        .fallthrough_variation(2)
        .variation_for_user("vip", 1)
    )
    data.update(data.flag("number-flag").variations(1, 2.5, 42).variation_for_all(2))
    data.update(
        data.flag("json-flag")
        .variations({"colour": "red", "sizes": [1, 2]}, ["a", None, True])
        .variation_for_all(0)
    )
    data.update(data.flag("off-flag").variations("x", "y").on(False))
    return data


USERS = [
    Context.create("user-1"),
    Context.builder("anon-7").anonymous(True).build(),
    Context.create("vip"),
]
DEFAULTS = {
    "bool-flag": False,
    "string-flag": "none",
    "number-flag": -1,
    "json-flag": {},
    "off-flag": "fallback",
    "missing-flag": "dflt",
}


def test_evaluations_export_field_by_field(td: TestData, sink: Sink) -> None:
    client = make_client(td, flagsink_event_processor(sink.pipeline))
    expected: list[FeatureEvent] = []
    started = int(time.time())
    for context in USERS:
        state = client.all_flags_state(context).to_json_dict()["$flagsState"]
        for key, default in DEFAULTS.items():
            detail = client.variation_detail(key, context, default)
            index = detail.variation_index
            expected.append(
                FeatureEvent(
                    "anonymousUser" if context.anonymous else "user",
                    context.key,
                    0,
                    key,
                    "SdkDefault" if index is None else str(index),
                    detail.value,
                    index is None,
                    str(state[key]["version"]) if key in state else "",
                    "SERVER",
                )
            )
            assert client.variation(key, context, default) == detail.value
            expected.append(expected[-1])
    client.close()
    assert wait_until(lambda: len(sink.features.events) == len(expected), 5)
    got = sink.features.events
    for event, want in zip(got, expected, strict=True):
        assert type(event) is FeatureEvent
        assert started - 1 <= event.creation_date <= int(time.time())
        assert event.context_kind == want.context_kind
        assert event.user_key == want.user_key
        assert event.key == want.key
        assert event.variation == want.variation
        assert event.value == want.value
        assert event.default == want.default
        assert event.version == want.version
        assert event.source == "SERVER"
        assert event.metadata is None
    # Spot-check the values the flags were set up to return.
    by = {(e.user_key, e.key): e for e in got}
    assert by[("user-1", "bool-flag")].value is True
    assert by[("user-1", "bool-flag")].variation == "0"  # boolean flags: [true, false]
    assert by[("vip", "string-flag")].value == "green"
    assert by[("user-1", "string-flag")].value == "blue"
    assert by[("anon-7", "number-flag")].value == 42
    assert by[("anon-7", "number-flag")].context_kind == "anonymousUser"
    assert by[("user-1", "json-flag")].value == {"colour": "red", "sizes": [1, 2]}
    off = by[("user-1", "off-flag")]
    # TestData gives an off flag its last variation as off variation.
    assert (off.value, off.variation, off.default) == ("y", "1", False)
    missing = by[("user-1", "missing-flag")]
    assert (missing.value, missing.variation, missing.default, missing.version) == (
        "dflt",
        "SdkDefault",
        True,
        "",
    )
    assert not sink.tracking.events


def test_flag_version_follows_updates(td: TestData, sink: Sink) -> None:
    client = make_client(td, flagsink_event_processor(sink.pipeline))
    user = Context.create("u")
    client.variation("bool-flag", user, False)
    td.update(td.flag("bool-flag").boolean_flag().variation_for_all(False))
    assert client.variation("bool-flag", user, True) is False
    client.close()
    assert wait_until(lambda: len(sink.features.events) == 2, 5)
    first, second = sink.features.events
    assert isinstance(first, FeatureEvent)
    assert isinstance(second, FeatureEvent)
    assert int(second.version) == int(first.version) + 1
    assert (first.value, second.value) == (True, False)
    assert (first.variation, second.variation) == ("0", "1")


def test_track_becomes_tracking_events(td: TestData, sink: Sink) -> None:
    processor = flagsink_event_processor(sink.pipeline, context_attributes=["plan", "absent"])
    client = make_client(td, processor)
    user = Context.builder("buyer").set("plan", "pro").set("email", "x@example.com").build()
    anon = Context.builder("anon-1").anonymous(True).build()
    client.track("checkout", user, {"amount": 12.5, "items": ["a"]}, metric_value=12.5)
    client.track("page-view", anon)
    client.track("scalar", user, "just text")
    client.identify(user)  # not exported
    client.close()
    assert wait_until(lambda: len(sink.tracking.events) == 3, 5)
    checkout, view, scalar = sink.tracking.events
    assert isinstance(checkout, TrackingEvent)
    assert (checkout.context_kind, checkout.user_key, checkout.key) == ("user", "buyer", "checkout")
    assert checkout.tracking_event_details == {"amount": 12.5, "items": ["a"], "value": 12.5}
    # Only allow-listed attributes: never the e-mail address.
    assert checkout.evaluation_context == {"targetingKey": "buyer", "kind": "user", "plan": "pro"}
    assert isinstance(view, TrackingEvent)
    assert (view.context_kind, view.user_key, view.key) == ("anonymousUser", "anon-1", "page-view")
    assert view.evaluation_context == {"targetingKey": "anon-1", "kind": "user", "anonymous": True}
    assert view.tracking_event_details == {}
    assert isinstance(scalar, TrackingEvent)
    assert scalar.tracking_event_details == {"data": "just text"}
    assert not sink.features.events
    assert abs(checkout.creation_date - time.time()) < 60


def test_other_context_kinds_and_multi_contexts(sink: Sink) -> None:
    td = TestData.data_source()
    td.update(td.flag("f").variations("a", "b").variation_for_all(1))
    client = make_client(td, flagsink_event_processor(sink.pipeline, metadata={"env": "test"}))
    org = Context.create("acme", "org")
    multi_with_user = Context.create_multi(org, Context.builder("bob").anonymous(True).build())
    multi_without_user = Context.create_multi(org, Context.create("d-1", "device"))
    for context in (org, multi_with_user, multi_without_user):
        assert client.variation("f", context, "z") == "b"
    client.close()
    assert wait_until(lambda: len(sink.features.events) == 3, 5)
    org_event, with_user, without_user = sink.features.events
    assert isinstance(org_event, FeatureEvent)
    assert (org_event.user_key, org_event.context_kind) == ("acme", "user")
    assert org_event.metadata == {"env": "test", "ldContextKind": "org"}
    assert isinstance(with_user, FeatureEvent)
    assert (with_user.user_key, with_user.context_kind) == ("bob", "anonymousUser")
    assert with_user.metadata == {"env": "test"}
    assert isinstance(without_user, FeatureEvent)
    assert without_user.user_key == multi_without_user.fully_qualified_key
    assert without_user.metadata == {"env": "test", "ldContextKind": "multi"}


def _flag(key: str, version: int, *, track: bool, prerequisites: Any = ()) -> dict[str, Any]:
    return {
        "key": key,
        "version": version,
        "on": True,
        "variations": ["off", "on"],
        "fallthrough": {"variation": 1},
        "offVariation": 0,
        "trackEvents": track,
        "prerequisites": [{"key": p, "variation": 1} for p in prerequisites],
        "salt": "s",
    }


@pytest.fixture
def flag_file(tmp_path: Path) -> Path:
    path = tmp_path / "flags.json"
    flags = {
        "tracked": _flag("tracked", 3, track=True),
        "untracked": _flag("untracked", 5, track=False),
        "parent": _flag("parent", 7, track=True, prerequisites=["untracked"]),
        "no-off": {**_flag("no-off", 2, track=True), "on": False, "offVariation": None},
    }
    path.write_text(json.dumps({"flags": flags}))
    return path


@pytest.mark.parametrize("track_events_only", [False, True])
def test_track_events_and_prerequisites(
    flag_file: Path, sink: Sink, track_events_only: bool
) -> None:
    source = Files.new_data_source(paths=[str(flag_file)])
    processor = flagsink_event_processor(sink.pipeline, track_events_only=track_events_only)
    client = make_client(source, processor)
    user = Context.create("u-1")
    for key in ("tracked", "untracked", "parent"):
        assert client.variation(key, user, "default") == "on"
    # Off without an off variation: the SDK returns the application's default.
    assert client.variation("no-off", user, "default") == "default"
    client.close()
    no_off = [e for e in sink.features.events if isinstance(e, FeatureEvent) and e.key == "no-off"]
    assert [(e.value, e.variation, e.default, e.version) for e in no_off] == [
        ("default", "SdkDefault", True, "2")
    ]
    seen = [
        (e.key, e.version, e.value, (e.metadata or {}).get("prerequisiteOf"))
        for e in sink.features.events
        if isinstance(e, FeatureEvent) and e.key != "no-off"
    ]
    if track_events_only:
        # LaunchDarkly sends full events only for trackEvents flags: the prerequisite and
        # the untracked flag are left out.
        assert seen == [("tracked", "3", "on", None), ("parent", "7", "on", None)]
    else:
        assert seen == [
            ("tracked", "3", "on", None),
            ("untracked", "5", "on", None),
            ("untracked", "5", "on", "parent"),
            ("parent", "7", "on", None),
        ]


class Recorder(BaseHTTPRequestHandler):
    posts: list[tuple[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).posts.append((self.path, json.loads(body)))
        self.send_response(202)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    handler = type("Handler", (Recorder,), {"posts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.posts
    server.shutdown()
    server.server_close()


def test_forward_also_sends_to_launchdarkly(
    td: TestData, sink: Sink, recorder: tuple[str, list[tuple[str, Any]]]
) -> None:
    url, posts = recorder
    client = make_client(td, flagsink_event_processor(sink.pipeline, forward=True), events_uri=url)
    user = Context.create("user-1")
    assert client.variation("string-flag", user, "none") == "blue"
    client.track("checkout", user, {"amount": 3})
    client.close()
    assert wait_until(lambda: len(sink.features.events) == 1, 5)
    assert wait_until(lambda: len(sink.tracking.events) == 1, 5)
    # LaunchDarkly's own processor delivered its payload to the (local) events service.
    assert wait_until(lambda: bool(posts), 5)
    kinds = [event["kind"] for path, payload in posts if path == "/bulk" for event in payload]
    assert "summary" in kinds
    assert "custom" in kinds


def test_forward_to_an_unreachable_service_does_not_break(td: TestData, sink: Sink) -> None:
    client = make_client(
        td,
        flagsink_event_processor(sink.pipeline, forward=True),
        events_uri="http://127.0.0.1:9",
    )
    user = Context.create("user-1")
    assert client.variation("bool-flag", user, False) is True
    client.flush()
    client.close()
    assert wait_until(lambda: len(sink.features.events) == 1, 5)


class BrokenPipeline(Pipeline):
    def add_event(self, event: Any) -> None:
        raise RuntimeError("broken")

    def flush(self, timeout: float | None = None) -> bool:
        raise RuntimeError("broken")


def test_never_raises_into_the_sdk(td: TestData) -> None:
    pipeline = BrokenPipeline([])
    holder: list[FlagsinkEventProcessor] = []

    def build(config: Config) -> FlagsinkEventProcessor:
        holder.append(flagsink_event_processor(pipeline)(config))
        return holder[0]

    client = make_client(td, build)
    user = Context.create("user-1")
    assert client.variation("bool-flag", user, False) is True
    client.track("t", user)
    client.flush()
    client.close()
    assert holder[0].errors == 2


def test_flush_does_not_wait_and_close_pipeline_closes(td: TestData, sink: Sink) -> None:
    client = make_client(td, flagsink_event_processor(sink.pipeline, close_pipeline=True))
    client.variation("bool-flag", Context.create("u"), False)
    start = time.monotonic()
    client.flush()
    assert time.monotonic() - start < 0.5
    assert wait_until(lambda: len(sink.features.events) == 1, 5)  # flush exported it
    client.close()
    assert sink.features.closed
    assert sink.tracking.closed


def test_no_processor_when_events_are_off(td: TestData, sink: Sink) -> None:
    built: list[object] = []
    config = Config(
        SDK_KEY,
        update_processor_class=td,
        send_events=False,
        event_processor_class=built.append,
    )
    client = LDClient(config=config, start_wait=5)
    client.variation("bool-flag", Context.create("u"), False)
    client.close()
    assert built == []


def test_docs_offline_example_runs_as_documented(tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    page = Path(__file__).resolve().parents[2] / "docs" / "pages" / "launchdarkly.md"
    text = page.read_text(encoding="utf-8")
    (config,) = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    online, offline, _options = re.findall(
        r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL
    )
    # The offline program is the online one with TestData in place of the SDK key.
    assert online.split("user = Context")[1] == offline.split("user = Context")[1]
    (tmp_path / "flagsink.yaml").write_text(config)
    (tmp_path / "app.py").write_text(offline)
    run = subprocess.run(
        [sys.executable, "app.py"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    (feature_file,) = (tmp_path / "flag-events" / "feature").iterdir()
    (tracking_file,) = (tmp_path / "flag-events" / "tracking").iterdir()
    assert feature_file.name.startswith("flag-variation-")
    features = [json.loads(line) for line in feature_file.read_text().splitlines()]
    documented = [
        json.loads(line) for line in re.findall(r'^\{"kind":"feature".*$', text, re.MULTILINE)
    ]
    assert len(features) == len(documented) == 2
    for got, want in zip(features, documented, strict=True):
        assert abs(got.pop("creationDate") - time.time()) < 120
        want.pop("creationDate")
        assert got == want
    tracking = [json.loads(line) for line in tracking_file.read_text().splitlines()]
    assert [(e["userKey"], e["key"], e["trackingEventDetails"]) for e in tracking] == [
        ("user-42", "checkout-completed", {"total": 42.5}),
        ("visitor-7", "checkout-completed", {"total": 42.5}),
    ]
