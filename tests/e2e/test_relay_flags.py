"""POST /v1/flag/configuration and trackEvents filtering at the relay, including the real
GO Feature Flag Python provider's API client."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import urllib3
import yaml
from starlette.testclient import TestClient

from flagsink.config import Config, parse_config
from flagsink.relay.app import create_app

KEY = "secret-key"
FLAGS = {
    "banner": {
        "variations": {"on": True, "off": False},
        "defaultRule": {"variation": "on"},
        "version": "3",
    },
    "quiet": {
        "variations": {"a": "A", "b": "B"},
        "defaultRule": {"variation": "a"},
        "trackEvents": False,
    },
}


def config(tmp_path: Path, store: bool = True, **extra: Any) -> Config:
    flags = tmp_path / "flags.yaml"
    if not flags.exists():
        flags.write_text(yaml.safe_dump(FLAGS), encoding="utf-8")
    data: dict[str, Any] = {
        "exporter": {
            "kind": "file",
            "outputDir": str(tmp_path / "out"),
            "flushInterval": 3_600_000,
        },
        **extra,
    }
    if store:
        data["store"] = {"kind": "file", "path": str(flags), "pollInterval": 0.02, "cacheTTL": 0}
    return parse_config(data)


@contextmanager
def running(cfg: Config) -> Iterator[TestClient]:
    with TestClient(create_app(cfg), raise_server_exceptions=True) as client:
        yield client


def test_serves_all_flags_with_enrichment_and_etag(tmp_path: Path) -> None:
    cfg = config(tmp_path, evaluationContextEnrichment={"env": "prod"})
    with running(cfg) as client:
        response = client.post("/v1/flag/configuration", json={"flags": []})
        assert response.status_code == 200
        assert response.json() == {"flags": FLAGS, "evaluationContextEnrichment": {"env": "prod"}}
        etag = response.headers["etag"]
        assert etag.startswith('"')
        assert etag.endswith('"')
        again = client.post("/v1/flag/configuration", content=b"")
        assert again.json() == response.json()
        assert again.headers["etag"] == etag, "the ETag is stable"
        unchanged = client.post("/v1/flag/configuration", json={}, headers={"If-None-Match": etag})
        assert unchanged.status_code == 304
        assert unchanged.content == b""
        some = client.post("/v1/flag/configuration", json={"flags": ["quiet", "missing"]})
        assert some.json()["flags"] == {"quiet": FLAGS["quiet"]}
        assert some.headers["etag"] != etag
        stale = client.post(
            "/v1/flag/configuration", json={"flags": ["quiet"]}, headers={"If-None-Match": etag}
        )
        assert stale.status_code == 200


def test_a_changed_flag_changes_the_etag(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with running(cfg) as client:
        etag = client.post("/v1/flag/configuration").headers["etag"]
        changed = {**FLAGS, "banner": {**FLAGS["banner"], "version": "4", "disable": True}}
        temporary = tmp_path / "flags.tmp"
        temporary.write_text(yaml.safe_dump(changed), encoding="utf-8")
        os.replace(temporary, tmp_path / "flags.yaml")

        def fresh() -> Any:
            return client.post("/v1/flag/configuration", headers={"If-None-Match": etag})

        from flagsink.testing import wait_until

        assert wait_until(lambda: fresh().status_code == 200, 10)
        assert fresh().json()["flags"]["banner"]["disable"] is True


@pytest.mark.parametrize(
    "body",
    [b"{", b"[1]", b'{"flags": "banner"}', b'{"flags": [1]}'],
    ids=["not-json", "not-object", "not-list", "not-strings"],
)
def test_bad_bodies_are_400(tmp_path: Path, body: bytes) -> None:
    with running(config(tmp_path)) as client:
        response = client.post("/v1/flag/configuration", content=body)
    assert response.status_code == 400
    assert "flags" in response.json()["error"]


def test_without_a_store_it_is_404(tmp_path: Path) -> None:
    with running(config(tmp_path, store=False)) as client:
        response = client.post("/v1/flag/configuration", json={"flags": []})
    assert response.status_code == 404
    assert "store:" in response.json()["error"]


def test_needs_the_api_key_like_the_collector(tmp_path: Path) -> None:
    with running(config(tmp_path, apiKeys=[KEY])) as client:
        assert client.post("/v1/flag/configuration").status_code == 401
        ok = client.post("/v1/flag/configuration", headers={"X-API-Key": KEY})
        assert ok.status_code == 200
        bearer = client.post("/v1/flag/configuration", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200


def event(key: str, index: int) -> dict[str, Any]:
    return {
        "kind": "feature",
        "contextKind": "user",
        "userKey": f"user-{index}",
        "creationDate": 1_700_000_000,
        "key": key,
        "variation": "on",
        "value": True,
        "default": False,
        "version": "3",
        "source": "INPROCESS",
    }


def test_untracked_flags_are_filtered_and_counted(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    with running(cfg) as client:
        events = [event("banner", 1), event("quiet", 2), event("quiet", 3), event("banner", 4)]
        response = client.post("/v1/data/collector", json={"events": events})
        assert response.status_code == 200
        body = response.json()
        assert body["ingestedContentCount"] == 4
        assert body["filteredContentCount"] == 2
        metrics = client.get("/metrics").text
        assert "flagsink_relay_events_filtered_total 2.0" in metrics
        assert "flagsink_relay_events_accepted_total 2.0" in metrics
    records = [
        msgspec.json.decode(line)
        for path in sorted((tmp_path / "out").glob("*.json"))
        for line in path.read_bytes().splitlines()
    ]
    assert sorted(r["userKey"] for r in records) == ["user-1", "user-4"]


def test_the_go_feature_flag_provider_client_reads_the_configuration(tmp_path: Path) -> None:
    api_module = pytest.importorskip("gofeatureflag_python_provider.services.api")
    from gofeatureflag_python_provider.options import GoFeatureFlagOptions

    cfg = config(tmp_path, apiKeys=[KEY], evaluationContextEnrichment={"env": "test"})
    with running(cfg) as client:

        class Pool(urllib3.PoolManager):
            """urllib3's PoolManager.request over the ASGI test client."""

            def request(  # type: ignore[override]
                self, method: str, url: str, headers: Any, body: Any
            ) -> Any:
                path = url.split("://", 1)[1].partition("/")[2]
                answer = client.request(method, "/" + path, headers=headers, content=body)

                class Reply:
                    status = answer.status_code
                    data = answer.content
                    headers = answer.headers

                return Reply()

        options = GoFeatureFlagOptions(
            endpoint="http://relay.test", api_key=KEY, urllib3_pool_manager=Pool()
        )
        api = api_module.GoFeatureFlagApi(options)
        first = api.retrieve_flag_configuration()
        assert first is not None
        assert first.flags == FLAGS
        assert first.evaluation_context_enrichment == {"env": "test"}
        assert first.etag
        assert api.retrieve_flag_configuration(etag=first.etag) is None, "304 Not Modified"
        some = api.retrieve_flag_configuration(flags=["banner"])
        assert some is not None
        assert some.flags == {"banner": FLAGS["banner"]}
