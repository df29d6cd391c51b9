"""FlagsinkHook and FlagsinkTrackingProvider with the real OpenFeature SDK (no mocks)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import FlagEvaluationDetails, FlagResolutionDetails, Reason
from openfeature.provider import AbstractProvider, Metadata
from openfeature.provider.in_memory_provider import InMemoryFlag, InMemoryProvider
from openfeature.track import TrackingEventDetails

from flagsink import from_config
from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.integrations.openfeature import FlagsinkHook, FlagsinkTrackingProvider
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import InMemoryExporter

LONG = 3600.0
_domains = itertools.count()

FLAGS: dict[str, InMemoryFlag[Any]] = {
    "bool-flag": InMemoryFlag("on", {"on": True, "off": False}, {"version": "3"}),
    "string-flag": InMemoryFlag("blue", {"blue": "#00f", "red": "#f00"}, {"version": 7}),
    "int-flag": InMemoryFlag("big", {"big": 100, "small": 1}),
    "float-flag": InMemoryFlag("half", {"half": 0.5, "third": 0.333}, {"version": 1.5}),
    "object-flag": InMemoryFlag(
        "cfg", {"cfg": {"limits": [1, 2.5, None], "name": "x"}}, {"version": "v2"}
    ),
    "quiet-flag": InMemoryFlag("on", {"on": True}, {"trackEvents": False, "version": "1"}),
}

USER = EvaluationContext("user-42", {"email": "a@example.com", "plan": "pro", "region": "eu"})
ANONYMOUS = EvaluationContext("anon-7", {"anonymous": True, "email": "b@example.com"})


class Rig:
    def __init__(self) -> None:
        self.features = InMemoryExporter()
        self.tracking = InMemoryExporter()
        self.pipeline = Pipeline(
            [
                (DataExporterScheduler(self.features, flush_interval=LONG), "feature"),
                (DataExporterScheduler(self.tracking, flush_interval=LONG), "tracking"),
            ],
            exit_timeout=None,
        )

    def feature_events(self) -> list[FeatureEvent]:
        assert self.pipeline.flush(5)
        events = self.features.events
        assert all(type(e) is FeatureEvent for e in events)
        return events  # type: ignore[return-value]

    def tracking_events(self) -> list[TrackingEvent]:
        assert self.pipeline.flush(5)
        return self.tracking.events  # type: ignore[return-value]


@pytest.fixture
def rig() -> Iterator[Rig]:
    rig = Rig()
    yield rig
    rig.pipeline.close(5)


def client_for(provider: AbstractProvider, *hooks: FlagsinkHook) -> OpenFeatureClient:
    domain = f"flagsink-test-{next(_domains)}"
    api.set_provider(provider, domain)
    client = api.get_client(domain)
    client.add_hooks(list(hooks))
    return client


def evaluate_all(client: OpenFeatureClient, context: EvaluationContext) -> list[Any]:
    return [
        client.get_boolean_details("bool-flag", False, context),
        client.get_string_details("string-flag", "none", context),
        client.get_integer_details("int-flag", -1, context),
        client.get_float_details("float-flag", -1.0, context),
        client.get_object_details("object-flag", {"default": True}, context),
    ]


def assert_matches(
    event: FeatureEvent,
    details: FlagEvaluationDetails[Any],
    context: EvaluationContext,
    *,
    default: bool,
    version: str,
) -> None:
    anonymous = context.attributes.get("anonymous") is True
    assert event.key == details.flag_key
    assert event.value == details.value
    assert event.variation == (details.variant or "SdkDefault")
    assert event.default is default
    assert event.version == version
    assert event.user_key == context.targeting_key
    assert event.context_kind == ("anonymousUser" if anonymous else "user")
    assert event.source == "SERVER"
    assert event.metadata is None


VERSIONS = ["3", "7", "", "1.5", "v2"]


@pytest.mark.parametrize("context", [USER, ANONYMOUS], ids=["user", "anonymous"])
def test_after_records_every_flag_type_field_by_field(rig: Rig, context: EvaluationContext) -> None:
    client = client_for(InMemoryProvider(FLAGS), FlagsinkHook(rig.pipeline))
    evaluations = evaluate_all(client, context)
    assert all(d.error_code is None for d in evaluations)
    events = rig.feature_events()
    assert len(events) == len(evaluations)
    for event, details, version in zip(events, evaluations, VERSIONS, strict=True):
        assert_matches(event, details, context, default=False, version=version)
    # Exactly GO Feature Flag's JSON shape.
    encoded = json.loads(json.dumps(json.loads(_encode(events[0]))))
    assert encoded["kind"] == "feature"
    assert set(encoded) == {
        "kind", "contextKind", "userKey", "creationDate", "key",
        "variation", "value", "default", "version", "source",
    }  # fmt: skip


def _encode(event: Event) -> bytes:
    return msgspec.json.encode(event)


def test_global_hook_with_api_add_hooks(rig: Rig) -> None:
    hook = FlagsinkHook(rig.pipeline)
    api.add_hooks([hook])
    try:
        client = client_for(InMemoryProvider(FLAGS))
        details = client.get_boolean_details("bool-flag", False, USER)
    finally:
        api.clear_hooks()
    [event] = rig.feature_events()
    assert_matches(event, details, USER, default=False, version="3")


class RaisingProvider(AbstractProvider):
    """Every resolution raises, as a provider whose backend is down might."""

    def get_metadata(self) -> Metadata:
        return Metadata(name="raising")

    def _fail(self, *args: Any) -> Any:
        raise RuntimeError("backend down")

    resolve_boolean_details = _fail
    resolve_string_details = _fail
    resolve_integer_details = _fail
    resolve_float_details = _fail
    resolve_object_details = _fail


class ErrorResultProvider(RaisingProvider):
    """Reports errors in its results instead of raising."""

    def _fail(self, flag_key: str, default: Any, *args: Any) -> FlagResolutionDetails[Any]:
        return FlagResolutionDetails(
            default, reason=Reason.ERROR, error_code=ErrorCode.PARSE_ERROR, error_message="bad"
        )

    resolve_boolean_details = _fail
    resolve_string_details = _fail
    resolve_integer_details = _fail
    resolve_float_details = _fail
    resolve_object_details = _fail


@pytest.mark.parametrize("provider_type", [RaisingProvider, ErrorResultProvider])
@pytest.mark.parametrize("context", [USER, ANONYMOUS], ids=["user", "anonymous"])
def test_error_records_default_value_with_default_true(
    rig: Rig, context: EvaluationContext, provider_type: type[AbstractProvider]
) -> None:
    client = client_for(provider_type(), FlagsinkHook(rig.pipeline))
    evaluations = evaluate_all(client, context)
    assert all(d.error_code is not None for d in evaluations)
    events = rig.feature_events()
    assert len(events) == len(evaluations)
    for event, details in zip(events, evaluations, strict=True):
        assert_matches(event, details, context, default=True, version="")
        assert event.variation == "SdkDefault"


def test_flag_not_found_in_memory_provider_is_a_default_event(rig: Rig) -> None:
    client = client_for(InMemoryProvider(FLAGS), FlagsinkHook(rig.pipeline))
    details = client.get_string_details("missing", "fallback", USER)
    assert details.error_code == ErrorCode.FLAG_NOT_FOUND
    [event] = rig.feature_events()
    assert (event.key, event.value, event.variation, event.default) == (
        "missing",
        "fallback",
        "SdkDefault",
        True,
    )


def test_track_events_false_is_not_recorded(rig: Rig) -> None:
    client = client_for(InMemoryProvider(FLAGS), FlagsinkHook(rig.pipeline))
    assert client.get_boolean_value("quiet-flag", False, USER) is True
    client.get_boolean_value("bool-flag", False, USER)
    assert [e.key for e in rig.feature_events()] == ["bool-flag"]


def test_variant_missing_becomes_sdk_default(rig: Rig) -> None:
    def no_variant(
        flag: InMemoryFlag[Any], context: EvaluationContext
    ) -> FlagResolutionDetails[Any]:
        return FlagResolutionDetails(
            context.targeting_key == "user-42", reason=Reason.TARGETING_MATCH
        )

    flags = {"computed": InMemoryFlag("x", {"x": False}, context_evaluator=no_variant)}
    client = client_for(InMemoryProvider(flags), FlagsinkHook(rig.pipeline))
    details = client.get_boolean_details("computed", False, USER)
    [event] = rig.feature_events()
    assert details.variant is None
    assert (event.value, event.variation, event.default) == (True, "SdkDefault", False)


def test_metadata_static_plus_allow_listed_attributes_only(rig: Rig) -> None:
    hook = FlagsinkHook(
        rig.pipeline,
        metadata={"service": "shop", "env": "prod"},
        context_attributes=("plan", "region", "absent"),
    )
    client = client_for(InMemoryProvider(FLAGS), hook)
    client.get_boolean_value("bool-flag", False, USER)
    client.get_boolean_value("bool-flag", False, ANONYMOUS)  # has none of the attributes
    client.get_boolean_value("missing", False, USER)  # error path too
    first, second, third = rig.feature_events()
    assert first.metadata == {"service": "shop", "env": "prod", "plan": "pro", "region": "eu"}
    assert second.metadata == {"service": "shop", "env": "prod"}
    assert third.metadata == first.metadata
    for event in (first, second, third):
        assert "email" not in (event.metadata or {})


def test_allow_list_without_static_metadata(rig: Rig) -> None:
    hook = FlagsinkHook(rig.pipeline, context_attributes=["plan"])
    client = client_for(InMemoryProvider(FLAGS), hook)
    client.get_boolean_value("bool-flag", False, USER)
    client.get_boolean_value("bool-flag", False, ANONYMOUS)
    first, second = rig.feature_events()
    assert first.metadata == {"plan": "pro"}
    assert second.metadata is None


class BrokenPipeline(Pipeline):
    def add_event(self, event: Event) -> None:
        raise RuntimeError("pipeline broken")


def test_hook_failures_never_reach_the_application() -> None:
    pipeline = BrokenPipeline([], exit_timeout=None)
    hook = FlagsinkHook(pipeline)
    client = client_for(InMemoryProvider(FLAGS), hook)
    details = client.get_boolean_details("bool-flag", False, USER)
    # Had the hook raised in `after`, the SDK would have turned it into an error result.
    assert (details.value, details.variant, details.error_code) == (True, "on", None)
    failed = client.get_integer_details("missing", 5, USER)
    assert failed.value == 5
    client_for(RaisingProvider(), hook).get_string_value("x", "d", ANONYMOUS)
    assert hook.errors == 3


def test_odd_contexts_and_metadata_never_raise(rig: Rig) -> None:
    hook = FlagsinkHook(rig.pipeline, context_attributes=("plan",))
    client = client_for(InMemoryProvider(FLAGS), hook)
    client.get_boolean_value("bool-flag", False)  # no context at all
    client.get_boolean_value("bool-flag", False, EvaluationContext(None, {"anonymous": "yes"}))
    [first, second] = rig.feature_events()
    assert (first.user_key, first.context_kind) == ("", "user")
    assert (second.user_key, second.context_kind) == ("", "user")  # only True is anonymous
    assert hook.errors == 0


def test_pipeline_untracked_set_also_filters_hook_events(rig: Rig) -> None:
    rig.pipeline.untracked.current = frozenset({"int-flag"})
    client = client_for(InMemoryProvider(FLAGS), FlagsinkHook(rig.pipeline))
    evaluate_all(client, USER)
    assert "int-flag" not in [e.key for e in rig.feature_events()]
    assert rig.pipeline.filtered == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    value=st.dictionaries(st.text(max_size=5), json_values, max_size=4),
    key=st.text(max_size=12),
    anonymous=st.booleans(),
    variant=st.text(min_size=1, max_size=6),
)
def test_object_values_and_users_roundtrip(
    rig: Rig, value: Mapping[str, Any], key: str, anonymous: bool, variant: str
) -> None:
    rig.features.batches.clear()
    flags = {"obj": InMemoryFlag(variant, {variant: value})}
    client = client_for(InMemoryProvider(flags), FlagsinkHook(rig.pipeline))
    context = EvaluationContext(key, {"anonymous": anonymous})
    details = client.get_object_details("obj", {}, context)
    [event] = rig.feature_events()
    assert_matches(event, details, context, default=False, version="")


# -- tracking ---------------------------------------------------------------------------


def test_tracking_provider_routes_client_track_to_pipeline(rig: Rig) -> None:
    inner = InMemoryProvider(FLAGS)
    client = client_for(FlagsinkTrackingProvider(inner, rig.pipeline), FlagsinkHook(rig.pipeline))
    assert client.get_boolean_value("bool-flag", False, USER) is True  # evaluation delegated
    client.track("checkout", USER, TrackingEventDetails(19.99, {"currency": "EUR"}))
    client.track("visit", ANONYMOUS)
    checkout, visit = rig.tracking_events()
    assert (checkout.key, checkout.user_key, checkout.context_kind) == (
        "checkout",
        "user-42",
        "user",
    )
    assert checkout.tracking_event_details == {"currency": "EUR", "value": 19.99}
    assert checkout.evaluation_context == dict(USER.attributes)
    assert (visit.key, visit.user_key, visit.context_kind) == ("visit", "anon-7", "anonymousUser")
    assert visit.tracking_event_details == {}
    assert [e.key for e in rig.feature_events()] == ["bool-flag"]
    assert set(inner._tracking_events) == {"checkout", "visit"}  # the wrapped provider's too


def test_tracking_provider_delegates_metadata_and_async(rig: Rig) -> None:
    provider = FlagsinkTrackingProvider(InMemoryProvider(FLAGS), rig.pipeline)
    assert provider.get_metadata().name == "In-Memory Provider"
    client = client_for(provider)
    assert asyncio.run(client.get_string_value_async("string-flag", "x", USER)) == "#00f"


def test_end_to_end_from_config_to_file(tmp_path: Path) -> None:
    config = tmp_path / "flagsink.yaml"
    config.write_text(
        f"exporters:\n  - kind: file\n    outputDir: {tmp_path / 'out'}\n    format: json\n"
        f"  - kind: file\n    outputDir: {tmp_path / 'track'}\n    format: json\n"
        "    eventType: tracking\n"
    )
    pipeline = from_config(config, exit_timeout=None)
    client = client_for(
        FlagsinkTrackingProvider(InMemoryProvider(FLAGS), pipeline), FlagsinkHook(pipeline)
    )
    evaluations = evaluate_all(client, USER)
    client.track("checkout", USER, TrackingEventDetails(3.0))
    assert pipeline.close(5)
    lines = _lines(tmp_path / "out")
    assert [(e["key"], e["value"], e["variation"], e["version"]) for e in lines] == [
        (d.flag_key, d.value, d.variant, v) for d, v in zip(evaluations, VERSIONS, strict=True)
    ]
    [tracked] = _lines(tmp_path / "track")
    assert tracked["kind"] == "tracking"
    assert tracked["trackingEventDetails"] == {"value": 3.0}


def _lines(directory: Path) -> Sequence[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.json"))
        for line in path.read_text().splitlines()
    ]


# -- the documentation page -------------------------------------------------------------

DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "pages" / "openfeature.md"


def _blocks(language: str) -> list[str]:
    text = DOCS_PAGE.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_docs_page_example_runs_and_writes_the_documented_events(tmp_path: Path) -> None:
    [config] = _blocks("yaml")
    example = _blocks("python")[0]
    (tmp_path / "flagsink.yaml").write_text(config)
    result = subprocess.run(
        [sys.executable, "-c", example],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    features_doc, tracking_doc = (
        [json.loads(line) for line in block.splitlines()] for block in _blocks("text")
    )
    for written, documented in (
        (_lines(tmp_path / "flag-events"), features_doc),
        (_lines(tmp_path / "tracking-events"), tracking_doc),
    ):
        for event in (*written, *documented):
            event.pop("creationDate")
        assert list(written) == documented
