"""End to end with GO Feature Flag's own provider (issue 6): the real OpenFeature Python SDK
and the real ``gofeatureflag-python-provider``, evaluating in process, get their flag
configuration from a running ``flagsink serve`` whose store is DynamoDB (on moto) and send
their evaluation events back to it; the relay exports them to S3 (on moto).

Flags are loaded with ``flagsink store init`` and ``flagsink flags push``. After the
provider is shut down (it flushes its events) and the relay is stopped with SIGTERM (it
flushes its exporter), every object in the bucket is read back with boto3 and must hold
exactly the evaluations made: flag key, variation, value, version, user key, context kind
and source, and nothing for the flag with ``trackEvents: false``. Every wait has a
deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gofeatureflag_python_provider.options import GoFeatureFlagOptions
from gofeatureflag_python_provider.provider import GoFeatureFlagProvider
from goff_e2e_support import REGION, MotoServer, aws_env, free_port
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails

from flagsink.testing import wait_until

KEY = "goff-e2e-key-4f1b7a"
TABLE = "flags"
BUCKET = "events"
DOMAIN = "flagsink-goff-e2e"
ENRICHMENT = {"env": "e2e"}
EXPORTER_METADATA = {"app": "checkout-e2e"}
START_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
CLI = (sys.executable, "-m", "flagsink.cli")

LIGHT = {"mode": "light", "contrast": 1.0, "accents": ["blue", "green"]}
DARK = {"mode": "dark", "contrast": 1.5, "accents": ["orange"]}

# A GO Feature Flag flag file: one flag of each type, rules on attributes, a percentage
# rollout, a rule on the relay's evaluationContextEnrichment, and one untracked flag.
FLAGS: dict[str, dict[str, Any]] = {
    "new-checkout": {
        "variations": {"enabled": True, "disabled": False},
        "targeting": [{"name": "beta-testers", "query": "beta eq true", "variation": "enabled"}],
        "defaultRule": {"percentage": {"enabled": 50, "disabled": 50}},
        "version": "4",
    },
    "banner-text": {
        "variations": {"english": "Welcome!", "french": "Bienvenue !"},
        "targeting": [{"query": 'country eq "fr"', "variation": "french"}],
        "defaultRule": {"variation": "english"},
        "version": "2",
    },
    "max-items": {
        "variations": {"small": 10, "large": 100},
        "targeting": [{"query": 'env eq "e2e" and plan eq "premium"', "variation": "large"}],
        "defaultRule": {"variation": "small"},
        "version": "7",
    },
    "theme": {
        "variations": {"light": LIGHT, "dark": DARK},
        "targeting": [{"query": "anonymous eq true", "variation": "light"}],
        "defaultRule": {"variation": "dark"},
        "version": "1.5",
    },
    "audit-mode": {
        "variations": {"on": "audit", "off": "none"},
        "defaultRule": {"variation": "on"},
        "trackEvents": False,
        "version": "3",
    },
}

# (targeting key, attributes): three users and two anonymous visitors.
CONTEXTS: list[tuple[str, dict[str, Any]]] = [
    ("user-alice", {"beta": True, "country": "fr", "plan": "premium"}),
    ("user-bob", {"country": "us", "plan": "free"}),
    ("user-carol", {"beta": False, "country": "fr", "plan": "premium"}),
    ("anon-7f3a", {"anonymous": True, "country": "de"}),
    ("anon-91bc", {"anonymous": True, "country": "fr"}),
]


def expected_variation(flag: str, attributes: dict[str, Any]) -> str | None:
    """The variation the rules above give (None: the percentage rollout decides)."""
    if flag == "new-checkout":
        return "enabled" if attributes.get("beta") is True else None
    if flag == "banner-text":
        return "french" if attributes.get("country") == "fr" else "english"
    if flag == "max-items":  # env comes from the relay's evaluationContextEnrichment
        return "large" if attributes.get("plan") == "premium" else "small"
    if flag == "theme":
        return "light" if attributes.get("anonymous") is True else "dark"
    assert flag == "audit-mode"
    return "on"


# -- processes --------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m flagsink.cli ARGS``; fails the test with its output unless it exits 0."""
    result = subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=aws_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"flagsink {' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class Relay:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then the exit status (the relay flushes its exporters first)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(SHUTDOWN_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"relay did not stop after SIGTERM:\n{self.stderr()}")

    def metric(self, sample: str) -> float:
        """One sample of the relay's Prometheus metrics, named with its labels if any."""
        answer = httpx.get(f"{self.url}/metrics", headers={"X-API-Key": KEY}, timeout=5)
        assert answer.status_code == 200, answer.text
        match = re.search(rf"^{re.escape(sample)} (\S+)$", answer.text, re.MULTILINE)
        assert match is not None, f"{sample} not in /metrics:\n{answer.text}"
        return float(match.group(1))


@pytest.fixture
def relay_config(moto_server: MotoServer, tmp_path: Path) -> Path:
    """The relay's config: dynamodb store and s3 exporter on moto, an API key."""
    config = {
        "authorizedKeys": {"evaluation": [KEY]},
        "shutdownTimeout": SHUTDOWN_TIMEOUT,
        "logLevel": "info",
        "evaluationContextEnrichment": ENRICHMENT,
        "store": {
            "kind": "dynamodb",
            "table": TABLE,
            "endpointUrl": moto_server.endpoint,
            "region": REGION,
            "cacheTTL": 0,
        },
        "exporter": {
            "kind": "s3",
            "bucket": BUCKET,
            "endpointUrl": moto_server.endpoint,
            "region": REGION,
            "path": "flag-events",
            "flushInterval": 500,
            "format": "json",
        },
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[[Path], Relay]]:
    """Start ``python -m flagsink.cli serve``; waits (with a deadline) for /health."""
    started: list[Relay] = []

    def start(config: Path) -> Relay:
        port = free_port()
        log = tmp_path / f"relay-{len(started)}.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                [*CLI, "serve", "--config", str(config), "--port", str(port)],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=aws_env(),
            )
        relay = Relay(process, port, log)
        started.append(relay)

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"relay exited with {process.returncode}:\n{relay.stderr()}")
            try:
                return httpx.get(f"{relay.url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_until(healthy, START_TIMEOUT, 0.05):
            pytest.fail(f"relay not healthy within {START_TIMEOUT}s:\n{relay.stderr()}")
        return relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait()


# -- reading S3 -------------------------------------------------------------------------------


def read_bucket(moto_server: MotoServer) -> tuple[list[str], list[dict[str, Any]]]:
    """Every object key in the bucket, and every JSON line of every object."""
    s3 = moto_server.client("s3")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    records: list[dict[str, Any]] = []
    for key in sorted(keys):
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        records.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return keys, records


def as_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """What must match between an evaluation and its exported event."""
    return (
        record["key"],
        record["userKey"],
        record["contextKind"],
        record["variation"],
        json.dumps(record["value"], sort_keys=True),
        record.get("version"),
        record["source"],
        record.get("default", False),
    )


# -- the test ---------------------------------------------------------------------------------


def evaluate(client: OpenFeatureClient, flag: str, context: EvaluationContext) -> Any:
    if flag == "new-checkout":
        return client.get_boolean_details(flag, False, context)
    if flag in ("banner-text", "audit-mode"):
        return client.get_string_details(flag, "fallback", context)
    if flag == "max-items":
        return client.get_integer_details(flag, -1, context)
    assert flag == "theme"
    return client.get_object_details(flag, {"mode": "fallback"}, context)


def test_in_process_provider_events_reach_s3_through_the_relay(
    moto_server: MotoServer,
    relay_config: Path,
    start_relay: Callable[[Path], Relay],
    tmp_path: Path,
) -> None:
    moto_server.client("s3").create_bucket(Bucket=BUCKET)

    # The table and the flags, with the command line, as an operator would.
    created = run_cli("store", "init", "--config", str(relay_config), cwd=tmp_path)
    assert "store dynamodb: created" in created.stdout
    flag_file = tmp_path / "flags.yaml"
    flag_file.write_text(yaml.safe_dump(FLAGS, sort_keys=False), encoding="utf-8")
    pushed = run_cli("flags", "push", str(flag_file), "--config", str(relay_config), cwd=tmp_path)
    assert f"{len(FLAGS)} flag(s) written" in pushed.stdout
    listed = run_cli("flags", "list", "--json", "--config", str(relay_config), cwd=tmp_path)
    tracked = {row["key"]: row["trackEvents"] for row in json.loads(listed.stdout)}
    assert tracked == {key: key != "audit-mode" for key in FLAGS}

    relay = start_relay(relay_config)

    # GO Feature Flag's provider, in process: flags from the relay, events to the relay.
    options = GoFeatureFlagOptions(
        endpoint=relay.url,
        api_key=KEY,
        data_flush_interval=600_000,  # only the shutdown flush delivers the events
        flag_config_poll_interval_seconds=600,
        exporter_metadata=EXPORTER_METADATA,
        wasm_pool_size=2,
    )
    assert options.evaluation_type.value == "inprocess"
    provider = GoFeatureFlagProvider(options=options)
    expected: list[tuple[Any, ...]] = []
    rollout: dict[str, str] = {}
    try:
        api.set_provider_and_wait(provider, DOMAIN)
        client = api.get_client(DOMAIN)
        for _ in range(2):  # every evaluation is an event, repeated ones too
            for targeting_key, attributes in CONTEXTS:
                context = EvaluationContext(targeting_key, attributes)
                for flag, definition in FLAGS.items():
                    details: FlagEvaluationDetails[Any] = evaluate(client, flag, context)
                    assert details.error_code is None, (flag, targeting_key, details)
                    variation = details.variant
                    assert variation is not None, (flag, details)
                    assert variation in definition["variations"], (flag, details)
                    assert details.value == definition["variations"][variation]
                    wanted = expected_variation(flag, attributes)
                    if wanted is None:  # the rollout: the same user always gets the same one
                        wanted = rollout.setdefault(targeting_key, variation)
                    assert variation == wanted, (flag, targeting_key, details)
                    assert details.flag_metadata.get("version") == definition["version"]
                    if definition.get("trackEvents") is False:
                        continue
                    kind = "anonymousUser" if attributes.get("anonymous") is True else "user"
                    expected.append(
                        as_row(
                            {
                                "key": flag,
                                "userKey": targeting_key,
                                "contextKind": kind,
                                "variation": variation,
                                "value": details.value,
                                "version": definition["version"],
                                "source": "INPROCESS",
                            }
                        )
                    )
    finally:
        api.shutdown()  # shuts the provider down: it posts every buffered event, then returns

    evaluations = 2 * len(CONTEXTS) * len(FLAGS)
    assert set(rollout.values()) == {"enabled", "disabled"}, "the rollout splits these users"
    # The provider read its flags from the relay (the DynamoDB store behind it).
    fetched = (
        'flagsink_relay_requests_total{method="POST",path="/v1/flag/configuration",status="200"}'
    )
    assert relay.metric(fetched) >= 1
    assert len(expected) == 2 * len(CONTEXTS) * (len(FLAGS) - 1)

    # The provider never sends events of a trackEvents: false flag (it reads the flag's
    # trackEvents from the configuration the relay served): the relay received exactly
    # the tracked evaluations and filtered none.
    assert relay.metric("flagsink_relay_events_received_total") == len(expected)
    assert relay.metric("flagsink_relay_events_accepted_total") == len(expected)
    assert relay.metric("flagsink_relay_events_filtered_total") == 0
    assert len(expected) < evaluations

    # An untracked flag's event that still arrives (an older provider, or one sent before
    # the flag changed) is accepted, counted as filtered, and never exported.
    stray = {
        "kind": "feature",
        "contextKind": "user",
        "userKey": "user-bob",
        "creationDate": int(time.time()),
        "key": "audit-mode",
        "variation": "on",
        "value": "audit",
        "default": False,
        "version": "3",
        "source": "INPROCESS",
    }
    answer = httpx.post(
        f"{relay.url}/v1/data/collector",
        json={"meta": EXPORTER_METADATA, "events": [stray]},
        headers={"X-API-Key": KEY},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["ingestedContentCount"] == 1
    assert answer.json()["filteredContentCount"] == 1
    assert relay.metric("flagsink_relay_events_filtered_total") == 1
    assert relay.metric("flagsink_relay_events_accepted_total") == len(expected)

    before = time.time()
    assert relay.stop() == 0, relay.stderr()
    assert "every accepted event was delivered" in relay.stderr()

    keys, records = read_bucket(moto_server)
    assert keys, "no object was written"
    assert all(key.startswith("flag-events/") for key in keys), keys
    assert all(key.endswith(".json") for key in keys), keys
    assert Counter(as_row(record) for record in records) == Counter(expected)
    assert all(record["kind"] == "feature" for record in records)
    assert all(record["default"] is False for record in records)
    assert all(before - 120 <= record["creationDate"] <= before for record in records)
    metadata = {**EXPORTER_METADATA, "provider": "python", "openfeature": True}
    assert all(record["metadata"] == metadata for record in records), records[0]
    assert "audit-mode" not in {record["key"] for record in records}
