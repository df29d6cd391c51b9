"""Pipeline API for applications: track(), the atexit flush, fork safety, from_config."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path

import pytest
from openfeature.evaluation_context import EvaluationContext
from openfeature.track import TrackingEventDetails

from flagsink import from_config
from flagsink.event import FeatureEvent, TrackingEvent, new_feature_event
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import InMemoryExporter, wait_until

LONG = 3600.0


def memory_pipeline(**kwargs: object) -> tuple[Pipeline, InMemoryExporter, InMemoryExporter]:
    features, tracking = InMemoryExporter(), InMemoryExporter()
    pipeline = Pipeline(
        [
            (DataExporterScheduler(features, flush_interval=LONG), "feature"),
            (DataExporterScheduler(tracking, flush_interval=LONG), "tracking"),
        ],
        **kwargs,  # type: ignore[arg-type]
    )
    return pipeline, features, tracking


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "flagsink.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            exporters:
              - kind: file
                outputDir: {tmp_path / "features"}
                format: json
                flushInterval: 3600000
              - kind: file
                outputDir: {tmp_path / "tracking"}
                format: json
                flushInterval: 3600000
                eventType: tracking
            """
        )
    )
    return config


def read_events(directory: Path) -> list[dict[str, object]]:
    if not directory.exists():
        return []
    return [
        json.loads(line)
        for path in sorted(directory.glob("*.json"))
        for line in path.read_text().splitlines()
        if line
    ]


# -- track ------------------------------------------------------------------------------


def test_track_goes_to_tracking_exporters_only_with_goff_shape() -> None:
    pipeline, features, tracking = memory_pipeline(exit_timeout=None)
    context = EvaluationContext("user-1", {"plan": "pro", "anonymous": False})
    pipeline.track("checkout", context, {"amount": 12.5})
    pipeline.track("signup", {"targetingKey": "anon-2", "anonymous": True})
    pipeline.track("view", "user-3", TrackingEventDetails(3.0, {"page": "home"}))
    pipeline.track("click", context, TrackingEventDetails(attributes={"button": "buy"}))
    assert pipeline.close(5)
    assert features.events == []
    events = tracking.events
    assert all(type(event) is TrackingEvent for event in events)
    assert [(e.key, e.user_key, e.context_kind) for e in events] == [  # type: ignore[union-attr]
        ("checkout", "user-1", "user"),
        ("signup", "anon-2", "anonymousUser"),
        ("view", "user-3", "user"),
        ("click", "user-1", "user"),
    ]
    first, second, third, fourth = events
    assert isinstance(first, TrackingEvent)
    assert first.evaluation_context == {"plan": "pro", "anonymous": False}
    assert first.tracking_event_details == {"amount": 12.5}
    assert isinstance(second, TrackingEvent)
    assert second.evaluation_context == {"targetingKey": "anon-2", "anonymous": True}
    assert second.tracking_event_details == {}
    assert isinstance(third, TrackingEvent)
    assert third.tracking_event_details == {"page": "home", "value": 3.0}
    assert isinstance(fourth, TrackingEvent)
    assert fourth.tracking_event_details == {"button": "buy"}
    assert abs(first.creation_date - time.time()) < 60


def test_pipeline_is_a_context_manager_that_closes() -> None:
    pipeline, features, _ = memory_pipeline()
    with pipeline:
        pipeline.add_event(new_feature_event("u", "flag", True, "on"))
    assert features.closed
    assert [e.key for e in features.events] == ["flag"]


# -- atexit -----------------------------------------------------------------------------


def test_unclosed_pipeline_can_be_garbage_collected() -> None:
    pipeline, _, _ = memory_pipeline()
    ref = weakref.ref(pipeline)
    del pipeline
    gc.collect()
    assert ref() is None  # the atexit registration holds only a weak reference


def run_script(script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_normal_exit_flushes_from_config(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_script(
        f"""
        import flagsink
        pipeline = flagsink.from_config({str(config)!r})
        for i in range(3):
            pipeline.add_event(flagsink.new_feature_event(f"user-{{i}}", "flag", i, "v"))
        pipeline.track("checkout", {{"targetingKey": "user-0"}}, {{"amount": 1}})
        # no close(): the interpreter exits normally
        """
    )
    assert result.returncode == 0, result.stderr
    features = read_events(tmp_path / "features")
    assert sorted(e["userKey"] for e in features) == ["user-0", "user-1", "user-2"]  # type: ignore[type-var]
    assert [e["value"] for e in sorted(features, key=lambda e: str(e["userKey"]))] == [0, 1, 2]
    tracking = read_events(tmp_path / "tracking")
    assert [(e["kind"], e["key"], e["trackingEventDetails"]) for e in tracking] == [
        ("tracking", "checkout", {"amount": 1})
    ]


def test_exit_is_bounded_by_exit_timeout_and_close_unregisters(tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    result = run_script(
        f"""
        import threading, time
        from flagsink import DataExporterScheduler, Pipeline, new_feature_event
        from flagsink.testing import InMemoryExporter

        class Hanging(InMemoryExporter):
            def export(self, events):
                threading.Event().wait()  # never returns

        class Counting(InMemoryExporter):
            def close(self):
                with open({str(marker)!r}, "a") as f:
                    f.write("closed\\n")

        # Closed explicitly: the exit handler must not close it again.
        counting = Counting()
        with Pipeline([(DataExporterScheduler(counting, flush_interval=3600), "feature")]):
            pass
        hanging = Pipeline(
            [(DataExporterScheduler(Hanging(), flush_interval=3600), "feature")],
            exit_timeout=0.5,
        )
        hanging.add_event(new_feature_event("u", "flag", True, "on"))
        print(time.monotonic(), flush=True)
        """
    )
    finished = time.monotonic()
    assert result.returncode == 0, result.stderr
    started = float(result.stdout.strip())
    assert finished - started < 10  # bounded: the hanging export did not hold the exit
    assert "close timed out" in result.stderr
    assert marker.read_text() == "closed\n"


# -- fork -------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_after_from_config_exports_parent_and_child_once_each(tmp_path: Path) -> None:
    pipeline = from_config(write_config(tmp_path))
    # Buffered before the fork: the parent exports it; the child must not duplicate it.
    pipeline.add_event(new_feature_event("before-fork", "flag", 0, "v"))
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            for i in range(3):
                pipeline.add_event(new_feature_event(f"child-{i}", "flag", i, "v"))
            pipeline.track("child-track", "child-0")
            code = 0 if pipeline.close(10) else 2
        finally:
            os._exit(code)
    for i in range(3):
        pipeline.add_event(new_feature_event(f"parent-{i}", "flag", i, "v"))
    pipeline.track("parent-track", "parent-0")
    assert pipeline.close(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    features = sorted(str(e["userKey"]) for e in read_events(tmp_path / "features"))
    assert features == [
        "before-fork",
        "child-0",
        "child-1",
        "child-2",
        "parent-0",
        "parent-1",
        "parent-2",
    ]
    tracking = sorted(str(e["key"]) for e in read_events(tmp_path / "tracking"))
    assert tracking == ["child-track", "parent-track"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_exports_while_running(tmp_path: Path) -> None:
    """The child's worker runs (not only its close): a flush delivers at once."""
    pipeline = from_config(write_config(tmp_path))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            pipeline.add_event(new_feature_event("child", "flag", 1, "v"))
            flushed = pipeline.flush(10)
            ok = wait_until(lambda: bool(read_events(tmp_path / "features")), 10)
            code = 0 if flushed and ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [e["userKey"] for e in read_events(tmp_path / "features")] == ["child"]
    assert pipeline.close(5)
    assert pipeline.stats()[0].received == 0  # the parent saw none of the child's events


def test_feature_events_keep_type() -> None:
    pipeline, features, tracking = memory_pipeline(exit_timeout=None)
    pipeline.add_event(new_feature_event("u", "flag", 1, "v"))
    assert pipeline.close(5)
    assert [type(e) for e in features.events] == [FeatureEvent]
    assert tracking.events == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_untracked_flags_keep_refreshing_in_a_forked_child() -> None:
    from flagsink.pipeline import UntrackedFlags
    from flagsink.store import FLAGS
    from flagsink.store_cache import CachedStore
    from flagsink.testing import MemoryStore

    loud = {"variations": {"a": 1}, "defaultRule": {"variation": "a"}}
    quiet = {**loud, "trackEvents": False}
    backend = MemoryStore()
    backend.init_items({FLAGS: {"a": {"key": "a", "version": 1, "flag": quiet}}})
    untracked = UntrackedFlags.from_store(CachedStore(backend, ttl=0), interval=0.02)
    try:
        assert untracked.current == {"a"}
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # The store object is the child's copy: change it there.
                backend.upsert_item(FLAGS, {"key": "a", "version": 2, "flag": loud})
                backend.upsert_item(FLAGS, {"key": "b", "version": 1, "flag": quiet})
                code = 0 if wait_until(lambda: untracked.current == {"b"}, 10) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert untracked.current == {"a"}  # the parent's store did not change
    finally:
        untracked.close()
