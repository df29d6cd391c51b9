"""The s3 exporter passes the core contract kit against a real (moto) S3 server."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_s3 import S3Exporter
from s3_moto_server import MotoServer

from flagsink.testing.contract import ExporterContract


def read_json_objects(server: MotoServer, bucket: str) -> list[Any]:
    """Every JSON-lines record in ``bucket``, read with boto3 and the stdlib."""
    s3 = server.client()
    records: list[Any] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            answer = s3.get_object(Bucket=bucket, Key=item["Key"])
            data = answer["Body"].read()
            if answer.get("ContentEncoding") == "gzip":
                data = gzip.decompress(data)
            records.extend(json.loads(line) for line in data.splitlines())
    return records


class TestS3Contract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, s3_server: MotoServer, bucket: str) -> Callable[..., S3Exporter]:
        def new(**overrides: Any) -> S3Exporter:
            options = {"bucket": bucket, "endpointUrl": s3_server.endpoint, **overrides}
            return S3Exporter(**options)

        return new

    @pytest.fixture
    def read_back(self, s3_server: MotoServer, bucket: str) -> Callable[[], list[Any]]:
        return lambda: read_json_objects(s3_server, bucket)

    @pytest.fixture
    def sink_outage(self, s3_server: MotoServer) -> Callable[[], AbstractContextManager[None]]:
        return s3_server.stopped

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"bucket": ""},
            {"bucket": "s3://events"},
            {"bucket": "a/b"},
            {"unknownKey": 1},
            {"path": "a/../b"},
            {"region": "eu west 1"},
            {"endpointUrl": "ftp://127.0.0.1:21"},
            {"storageClass": "COLD"},
            {"serverSideEncryption": "rot13"},
            {"sseKmsKeyId": "alias/events"},
            {"serverSideEncryption": "AES256", "sseKmsKeyId": "alias/events"},
            {"contentEncoding": "br"},
            {"format": "xml"},
        ]
