"""Fixtures of the kinesis plugin's tests: fake AWS credentials, a moto server in a
subprocess (see moto_server.py), and a fresh 4-shard stream per test, read back with an
independent consumer (GetShardIterator TRIM_HORIZON + GetRecords on every shard)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from moto_support import MotoServer, cannot_run, fake_aws_environment

SHARDS = 4
#: Client settings for tests: one attempt per request, so outages fail fast.
FAST = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=20)


@dataclass(frozen=True)
class Record:
    shard: str
    partition_key: str
    data: bytes
    sequence: int

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Stream:
    server: MotoServer
    name: str
    arn: str = ""

    def create(self, server: MotoServer) -> None:
        kinesis = server.client("kinesis")
        kinesis.create_stream(StreamName=self.name, ShardCount=SHARDS)
        description = kinesis.describe_stream(StreamName=self.name)["StreamDescription"]
        assert description["StreamStatus"] == "ACTIVE"
        self.arn = description["StreamARN"]

    def records(self) -> list[Record]:
        """Every record on the stream, shard by shard, in each shard's order."""
        kinesis = self.server.client("kinesis")
        out: list[Record] = []
        shards = kinesis.list_shards(StreamName=self.name)["Shards"]
        for shard in shards:
            shard_id = shard["ShardId"]
            iterator = kinesis.get_shard_iterator(
                StreamName=self.name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while iterator:
                answer = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                for record in answer["Records"]:
                    out.append(
                        Record(
                            shard_id,
                            record["PartitionKey"],
                            record["Data"],
                            int(record["SequenceNumber"]),
                        )
                    )
                if not answer["Records"]:
                    break
                iterator = answer.get("NextShardIterator")
        return out

    def read(self) -> list[Any]:
        """Every record's JSON as a dict."""
        return [record.json for record in self.records()]


@pytest.fixture(scope="session", autouse=True)
def aws_environment() -> Iterator[None]:
    with fake_aws_environment():
        yield


@pytest.fixture(scope="session")
def moto(aws_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(Path(tmp_path_factory.mktemp("moto")) / "moto.log")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        cannot_run(f"cannot start the moto server (python -m moto.server): {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stream(moto: MotoServer) -> Iterator[Stream]:
    """A new 4-shard stream, made again after every server restart."""
    made = Stream(moto, f"events-{uuid.uuid4().hex[:10]}")
    moto.keep(made.create)
    yield made
    moto.forget(made.create)
