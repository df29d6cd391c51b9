"""The dynamodb store against a real (moto) DynamoDB server: LaunchDarkly's table layout,
conditional upserts across processes, prefixes, batched init, the cache TTLs, and the
errors a user sees."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import flagsink_dynamodb.store as store_module
import pytest
from botocore.config import Config
from dynamodb_moto_server import ACCESS_KEY, SECRET_KEY, MotoServer, race_worker
from flagsink_dynamodb import DynamoDBSettings, DynamoDBStore
from pydantic import ValidationError

from flagsink.config import parse_config
from flagsink.exporter import SettingsError
from flagsink.plugins import Registry, installed_plugins
from flagsink.store import FLAGS, SEGMENTS, StoreError
from flagsink.store_cache import CachedStore
from flagsink.testing.memory import wait_until


def flag(key: str, version: int, **extra: Any) -> dict[str, Any]:
    return {"key": key, "version": version, "variations": {"on": True, "off": False}, **extra}


@pytest.fixture
def new_store(dynamodb_server: MotoServer, table: str) -> Iterator[Callable[..., DynamoDBStore]]:
    """Stores on this test's table (options override), closed at teardown."""
    made: list[DynamoDBStore] = []

    def make(**options: Any) -> DynamoDBStore:
        options = {"table": table, "endpointUrl": dynamodb_server.endpoint, **options}
        store = DynamoDBStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


class Calls:
    """Counts the DynamoDB API calls a client makes (botocore's event hooks) and keeps the
    parameters of each."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        client.meta.events.register("provide-client-params.dynamodb.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        with self._lock:
            self.calls.append((model.name, dict(params)))

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.calls]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()


def by_keys(items: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(item["namespace"]["S"], item["key"]["S"]): item for item in items}


# -- the table layout: LaunchDarkly's ------------------------------------------------------


def test_items_are_stored_in_launchdarklys_layout(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    store = new_store(prefix="prod")
    body = flag("checkout", 3, description="ünï")
    store.init_items({FLAGS: {"checkout": body}, SEGMENTS: {"beta": {"key": "beta", "version": 1}}})
    store.upsert_item(FLAGS, {"key": "gone", "version": 7, "deleted": True})

    raw = by_keys(dynamodb_server.raw_items(table))
    assert set(raw) == {
        ("prod:flags", "checkout"),
        ("prod:flags", "gone"),
        ("prod:segments", "beta"),
        ("prod:$inited", "prod:$inited"),
    }
    stored = raw[("prod:flags", "checkout")]
    assert set(stored) == {"namespace", "key", "version", "item"}
    assert stored["version"] == {"N": "3"}
    assert json.loads(stored["item"]["S"]) == body
    tombstone = raw[("prod:flags", "gone")]
    assert tombstone["version"] == {"N": "7"}
    assert json.loads(tombstone["item"]["S"]) == {"key": "gone", "version": 7, "deleted": True}
    # LaunchDarkly's init marker: only its two keys, no other attribute.
    assert raw[("prod:$inited", "prod:$inited")] == {
        "namespace": {"S": "prod:$inited"},
        "key": {"S": "prod:$inited"},
    }


def test_without_prefix_namespaces_are_unprefixed(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    new_store().init_items({FLAGS: {"a": flag("a", 1)}})
    assert set(by_keys(dynamodb_server.raw_items(table))) == {
        ("flags", "a"),
        ("$inited", "$inited"),
    }
    assert new_store(prefix="").partition_key(FLAGS) == "flags", "an empty prefix is none"


def test_reads_a_table_written_by_launchdarklys_sdk(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    # What LaunchDarkly's Python SDK writes: json.dumps() with default separators.
    client = dynamodb_server.client()
    ld_flag = {"key": "ld-flag", "version": 12, "on": True, "variations": [True, False]}
    for namespace, item in [("env1:features", ld_flag), ("env1:flags", flag("f", 2))]:
        client.put_item(
            TableName=table,
            Item={
                "namespace": {"S": namespace},
                "key": {"S": item["key"]},
                "version": {"N": str(item["version"])},
                "item": {"S": json.dumps(item)},
            },
        )
    store = new_store(prefix="env1")
    assert not store.is_initialized()
    client.put_item(
        TableName=table, Item={"namespace": {"S": "env1:$inited"}, "key": {"S": "env1:$inited"}}
    )
    assert store.is_initialized()
    assert store.get_item("features", "ld-flag") == ld_flag
    assert store.all_items(FLAGS) == {"f": flag("f", 2)}
    # The conditional write compares with the version attribute LaunchDarkly wrote.
    assert store.upsert_item("features", {**ld_flag, "version": 11}) == ld_flag
    newer = {**ld_flag, "version": 13}
    assert store.upsert_item("features", newer) == newer


# -- upserts: conditional writes -------------------------------------------------------------


def test_upsert_is_one_conditional_write_never_read_then_write(
    new_store: Callable[..., DynamoDBStore],
) -> None:
    store = new_store()
    store.init_items({FLAGS: {"a": flag("a", 5)}})
    calls = Calls(store.client)

    newer = flag("a", 6)
    assert store.upsert_item(FLAGS, newer) is newer
    assert calls.names() == ["PutItem"]
    (_, params) = calls.calls[0]
    assert params["ConditionExpression"] == (
        "attribute_not_exists(#namespace) or #version < :version"
    )
    assert params["ExpressionAttributeValues"] == {":version": {"N": "6"}}

    calls.clear()
    assert store.upsert_item(FLAGS, flag("a", 2)) == newer
    # The refused write returns the stored item (ReturnValuesOnConditionCheckFailure),
    # or, from a server that does not send it, one read after the write.
    assert calls.names()[0] == "PutItem"
    assert set(calls.names()[1:]) <= {"GetItem"}


def test_refused_upsert_reads_the_stored_item_when_the_error_has_none(
    new_store: Callable[..., DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store()
    store.init_items({FLAGS: {"a": flag("a", 5)}})
    put = store.client.put_item

    def put_without_old_item(**params: Any) -> Any:
        params.pop("ReturnValuesOnConditionCheckFailure", None)
        return put(**params)

    monkeypatch.setattr(store.client, "put_item", put_without_old_item)
    calls = Calls(store.client)
    assert store.upsert_item(FLAGS, flag("a", 4)) == flag("a", 5)
    assert calls.names() == ["PutItem", "GetItem"]


def test_two_processes_racing_upserts_end_with_the_max_version(
    dynamodb_server: MotoServer, table: str
) -> None:
    keys = [f"race-{n}" for n in range(4)]
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(
            target=race_worker,
            args=(dynamodb_server.endpoint, table, keys, 60, seed, start, results),
        )
        for seed in (1, 2)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=120) for _ in workers]
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():  # pragma: no cover - only on a hung child
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0, 0]
    violations = [v for _, found in outcomes for v in found]
    assert violations == []
    store = DynamoDBStore(table=table, endpointUrl=dynamodb_server.endpoint)
    try:
        for key in keys:
            top = max(highest.get(key, 0) for highest, _ in outcomes)
            stored = store.get_item(FLAGS, key)
            assert stored is not None
            assert stored["version"] == top, key
    finally:
        store.close()


def test_items_must_have_a_key_and_an_integer_version(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    store = new_store()
    bad_items = [
        ({"version": 1}, "no `key`"),
        ({"key": "", "version": 1}, "no `key`"),
        ({"key": "a"}, "no integer `version`"),
        ({"key": "a", "version": "2"}, "no integer `version`"),
        ({"key": "a", "version": True}, "no integer `version`"),
    ]
    for bad, message in bad_items:
        with pytest.raises(ValueError, match=message):
            store.upsert_item(FLAGS, bad)
    with pytest.raises(ValueError, match="JSON"):
        store.upsert_item(FLAGS, {"key": "a", "version": 1, "when": object()})
    with pytest.raises(ValueError, match="under key 'b' has key 'a'"):
        store.init_items({FLAGS: {"b": flag("a", 1)}})
    assert dynamodb_server.raw_items(table) == [], "nothing written"
    assert store.get_item(FLAGS, "") is None


def test_an_item_over_dynamodbs_size_limit_is_a_clear_error(
    new_store: Callable[..., DynamoDBStore],
) -> None:
    store = new_store()
    with pytest.raises(StoreError, match=r"dynamodb:PutItem on table '.+' failed: Validation"):
        store.upsert_item(FLAGS, flag("huge", 1, blob="x" * 500_000))


# -- init: batched writes and deletes --------------------------------------------------------


def test_init_writes_in_batches_of_25_and_removes_stale_items(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    store = new_store()
    store.init_items(
        {
            FLAGS: {f"old-{n}": flag(f"old-{n}", 1) for n in range(40)},
            SEGMENTS: {f"s-{n}": {"key": f"s-{n}", "version": 1} for n in range(10)},
        }
    )
    calls = Calls(store.client)
    fresh = {f"new-{n}": flag(f"new-{n}", 2) for n in range(30)}
    fresh["old-0"] = flag("old-0", 9)
    store.init_items({FLAGS: fresh})

    batches = [params for name, params in calls.calls if name == "BatchWriteItem"]
    sizes = [len(params["RequestItems"][table]) for params in batches]
    assert all(size <= 25 for size in sizes)
    assert sum(sizes) == 31 + 39 + 10  # 31 puts, 39 stale flags and 10 segments deleted
    # The marker is written last, on its own, after every batch.
    assert calls.names()[-1] == "PutItem"
    assert store.all_items(FLAGS) == fresh
    assert store.all_items(SEGMENTS) == {}
    assert len(dynamodb_server.raw_items(table)) == 31 + 1


def test_init_retries_unprocessed_items_with_backoff(
    new_store: Callable[..., DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store()
    monkeypatch.setattr(store_module, "_BACKOFF_BASE", 0.001)
    write = store.client.batch_write_item
    rounds: list[int] = []

    def partial(RequestItems: dict[str, list[Any]]) -> Any:
        ((table, requests),) = RequestItems.items()
        rounds.append(len(requests))
        # The server takes at most 7 requests a call; the rest come back unprocessed.
        answer = write(RequestItems={table: requests[:7]})
        answer["UnprocessedItems"] = {table: requests[7:]} if requests[7:] else {}
        return answer

    monkeypatch.setattr(store.client, "batch_write_item", partial)
    data = {FLAGS: {f"f-{n}": flag(f"f-{n}", n) for n in range(30)}}
    store.init_items(data)
    assert rounds == [25, 18, 11, 4, 5]
    assert store.all_items(FLAGS) == data[FLAGS]
    assert store.is_initialized()


def test_init_gives_up_on_items_that_stay_unprocessed(
    new_store: Callable[..., DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store()
    monkeypatch.setattr(store_module, "_BACKOFF_BASE", 0.001)
    monkeypatch.setattr(store_module, "_BATCH_ATTEMPTS", 3)
    monkeypatch.setattr(
        store.client,
        "batch_write_item",
        lambda RequestItems: {"UnprocessedItems": RequestItems},
    )
    with pytest.raises(StoreError, match="1 write stayed unprocessed after 3 attempts"):
        store.init_items({FLAGS: {"a": flag("a", 1)}})
    assert not store.is_initialized(), "no marker without the data"


# -- prefixes ---------------------------------------------------------------------------------


def test_prefixes_isolate_environments_in_one_table(
    new_store: Callable[..., DynamoDBStore],
) -> None:
    prod, staging, bare = new_store(prefix="prod"), new_store(prefix="staging"), new_store()
    prod.init_items({FLAGS: {"a": flag("a", 1), "p": flag("p", 1)}})
    assert prod.is_initialized()
    assert not staging.is_initialized(), "the init marker is per prefix"
    assert not bare.is_initialized()

    staging.init_items({FLAGS: {"a": flag("a", 5), "s": flag("s", 1)}})
    bare.init_items({FLAGS: {"a": flag("a", 9)}})
    assert staging.is_initialized()
    assert bare.is_initialized()
    # Each init removed only its own prefix's stale items.
    assert prod.all_items(FLAGS) == {"a": flag("a", 1), "p": flag("p", 1)}
    assert staging.all_items(FLAGS) == {"a": flag("a", 5), "s": flag("s", 1)}
    assert bare.all_items(FLAGS) == {"a": flag("a", 9)}

    # Versions are compared per prefix too.
    assert prod.upsert_item(FLAGS, flag("a", 2)) == flag("a", 2)
    assert staging.get_item(FLAGS, "a") == flag("a", 5)
    assert prod.get_item(FLAGS, "s") is None
    assert new_store(prefix="prod").get_item(FLAGS, "a") == flag("a", 2)


# -- the cache TTL, counted in real DynamoDB calls --------------------------------------------


@pytest.mark.parametrize("ttl", [0.0, 0.3, -1.0])
def test_cache_ttl_decides_how_often_dynamodb_is_read(
    new_store: Callable[..., DynamoDBStore], ttl: float
) -> None:
    writer = new_store()
    writer.init_items({FLAGS: {"a": flag("a", 1)}})
    reader = new_store()
    calls = Calls(reader.client)
    cached = CachedStore(reader, ttl=ttl)

    filled = time.monotonic()  # before the read: the entry expires after filled + ttl
    assert cached.get(FLAGS, "a") == flag("a", 1)
    for _ in range(4):
        assert cached.get(FLAGS, "a") == flag("a", 1)
    reads = calls.count("GetItem")
    within_ttl = time.monotonic() - filled < ttl
    writer.upsert_item(FLAGS, flag("a", 2))
    if ttl == 0:
        assert reads == 5, "no cache: every get reads DynamoDB"
        assert cached.get(FLAGS, "a") == flag("a", 2)
    elif ttl > 0:
        if within_ttl:  # (a very slow machine may have passed the TTL already)
            assert reads == 1, "within the TTL the cache answers"
        assert wait_until(lambda: cached.get(FLAGS, "a") == flag("a", 2), 10)
        assert time.monotonic() - filled >= ttl, "the change is seen only after the TTL"
    else:
        assert reads == 1
        for _ in range(5):
            assert cached.get(FLAGS, "a") == flag("a", 1), "cached forever: stale"
        assert calls.count("GetItem") == 1
        cached.invalidate()
        assert cached.get(FLAGS, "a") == flag("a", 2)


# -- the table: missing, wrong schema, created ------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    [
        lambda s: s.get_item(FLAGS, "a"),
        lambda s: s.all_items(FLAGS),
        lambda s: s.upsert_item(FLAGS, flag("a", 1)),
        lambda s: s.init_items({FLAGS: {}}),
        lambda s: s.is_initialized(),
    ],
    ids=["get", "all", "upsert", "init", "initialized"],
)
def test_a_missing_table_is_a_clear_error(
    new_store: Callable[..., DynamoDBStore],
    dynamodb_server: MotoServer,
    operation: Callable[[DynamoDBStore], Any],
) -> None:
    store = new_store(table="no-such-table", region="us-east-1")
    with pytest.raises(StoreError) as caught:
        operation(store)
    assert str(caught.value) == (
        f"table 'no-such-table' does not exist in region us-east-1 at "
        f"{dynamodb_server.endpoint}: create it with `flagsink store init --config FILE` "
        "or see docs"
    )


def test_a_table_deleted_after_the_check_is_reported_as_missing(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer, table: str
) -> None:
    store = new_store()
    store.init_items({FLAGS: {}})
    dynamodb_server.client().delete_table(TableName=table)
    with pytest.raises(StoreError, match=f"table '{table}' does not exist in region"):
        store.get_item(FLAGS, "a")


@pytest.mark.parametrize(
    ("schema", "found"),
    [
        ([("id", "S", "HASH")], "partition key `id` (S)"),
        ([("namespace", "S", "HASH")], "partition key `namespace` (S)"),
        (
            [("namespace", "S", "HASH"), ("key", "N", "RANGE")],
            "partition key `namespace` (S), sort key `key` (N)",
        ),
        (
            [("key", "S", "HASH"), ("namespace", "S", "RANGE")],
            "partition key `key` (S), sort key `namespace` (S)",
        ),
    ],
)
def test_a_table_with_the_wrong_key_schema_is_a_clear_error(
    new_store: Callable[..., DynamoDBStore],
    dynamodb_server: MotoServer,
    schema: list[tuple[str, str, str]],
    found: str,
) -> None:
    wrong = dynamodb_server.new_table(schema)
    store = new_store(table=wrong)
    with pytest.raises(StoreError) as caught:
        store.get_item(FLAGS, "a")
    assert str(caught.value) == (
        f"table {wrong!r} has the wrong key schema ({found}): the dynamodb store needs "
        "partition key `namespace` (S) and sort key `key` (S), LaunchDarkly's layout. Use "
        "another table, or create one with `flagsink store init --config FILE`"
    )
    with pytest.raises(StoreError, match="wrong key schema"):
        store.upsert_item(FLAGS, flag("a", 1))


def test_the_key_schema_is_checked_once(
    new_store: Callable[..., DynamoDBStore],
) -> None:
    store = new_store()
    calls = Calls(store.client)
    workers = [
        threading.Thread(target=lambda n=n: store.upsert_item(FLAGS, flag(f"k{n}", 1)))
        for n in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    store.get_item(FLAGS, "k1")
    store.all_items(FLAGS)
    assert calls.count("DescribeTable") == 1
    assert calls.count("PutItem") == 8


def test_create_makes_an_on_demand_table_in_launchdarklys_layout(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer
) -> None:
    store = new_store(table="created-by-init", prefix="prod")
    assert store.create() == (
        f"table 'created-by-init' created in region us-east-1 at {dynamodb_server.endpoint} "
        "(on-demand capacity)"
    )
    described = dynamodb_server.client().describe_table(TableName="created-by-init")["Table"]
    assert described["TableStatus"] == "ACTIVE"
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert sorted((k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]) == [
        ("key", "RANGE"),
        ("namespace", "HASH"),
    ]
    assert {a["AttributeName"]: a["AttributeType"] for a in described["AttributeDefinitions"]} == {
        "namespace": "S",
        "key": "S",
    }
    store.init_items({FLAGS: {"a": flag("a", 1)}})
    assert new_store(table="created-by-init", prefix="prod").get_item(FLAGS, "a") == flag("a", 1)
    assert store.create() == (
        f"table 'created-by-init' already exists in region us-east-1 at "
        f"{dynamodb_server.endpoint} with the right key schema"
    ), "an existing table is left alone"
    assert store.get_item(FLAGS, "a") == flag("a", 1)


def test_create_refuses_an_existing_table_with_another_schema(
    new_store: Callable[..., DynamoDBStore], dynamodb_server: MotoServer
) -> None:
    wrong = dynamodb_server.new_table([("id", "S", "HASH")])
    with pytest.raises(StoreError, match="wrong key schema"):
        new_store(table=wrong).create()


def test_create_waits_until_the_table_is_active(
    new_store: Callable[..., DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(table="slow-to-create")
    describe = store.client.describe_table
    statuses = iter(["CREATING", "CREATING"])

    def creating_at_first(**params: Any) -> Any:
        answer = describe(**params)
        answer["Table"]["TableStatus"] = next(statuses, answer["Table"]["TableStatus"])
        return answer

    monkeypatch.setattr(store.client, "describe_table", creating_at_first)
    calls = Calls(store.client)
    assert store.create(timeout=30).startswith("table 'slow-to-create' created in")
    assert next(statuses, "drained") == "drained"
    assert calls.names() == ["CreateTable"] + ["DescribeTable"] * 3  # until ACTIVE

    stuck = new_store(table="never-active")
    monkeypatch.setattr(
        stuck.client,
        "describe_table",
        lambda **params: {"Table": {**describe(**params)["Table"], "TableStatus": "CREATING"}},
    )
    with pytest.raises(StoreError, match=r"'never-active' is still CREATING after 0\.5s"):
        stuck.create(timeout=0.5)


# -- credentials, access and connection errors ------------------------------------------------


def test_access_errors_name_the_permission_and_never_the_credentials(
    new_store: Callable[..., DynamoDBStore],
    dynamodb_server: MotoServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_id, secret = dynamodb_server.user_key(["dynamodb:GetItem", "dynamodb:Query"])
    with dynamodb_server.authenticating():
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret)
        store = new_store(session=session)
        with caplog.at_level(logging.WARNING, logger="flagsink.dynamodb"):
            assert store.get_item(FLAGS, "a") is None
        assert "not allowed to describe table" in caplog.text
        with pytest.raises(StoreError) as caught:
            store.upsert_item(FLAGS, flag("a", 1))
        message = str(caught.value)
        assert "allow dynamodb:PutItem on the table" in message
        assert "AccessDenied" in message
        unknown = new_store(
            session=boto3.session.Session(
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
            )
        )
        with pytest.raises(StoreError) as rejected:
            unknown.all_items(FLAGS)
    for text in (message, str(rejected.value), caplog.text):
        for secret_part in (secret, key_id, SECRET_KEY, ACCESS_KEY):
            assert secret_part not in text


def test_an_unreachable_endpoint_is_a_clear_error(
    new_store: Callable[..., DynamoDBStore],
) -> None:
    client = boto3.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:9",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    store = new_store(client=client, endpointUrl=None)
    with pytest.raises(StoreError, match=r"cannot reach http://127.0.0.1:9 for table"):
        store.is_initialized()


def test_missing_credentials_are_a_clear_error(
    new_store: Callable[..., DynamoDBStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no usable AWS credentials"):
        new_store().get_item(FLAGS, "a")


# -- building the store --------------------------------------------------------------------


def test_a_ready_client_is_used_and_left_open(
    dynamodb_server: MotoServer, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = dynamodb_server.client()
    closed: list[bool] = []
    monkeypatch.setattr(client, "close", lambda: closed.append(True))
    store = DynamoDBStore(table=table, client=client)
    store.init_items({FLAGS: {"a": flag("a", 1)}})
    assert store.client is client
    store.close()
    assert closed == []
    assert client.get_item(TableName=table, Key={"namespace": {"S": "flags"}, "key": {"S": "a"}})


def test_own_client_is_closed(new_store: Callable[..., DynamoDBStore]) -> None:
    store = new_store()
    closed: list[bool] = []
    store.client.close = lambda: closed.append(True)
    store.close()
    assert closed == [True]


def test_client_options_that_conflict_are_refused(dynamodb_server: MotoServer) -> None:
    client = dynamodb_server.client()
    with pytest.raises(TypeError, match="either client= or session="):
        DynamoDBStore(table="t-1", client=client, session=boto3.session.Session())
    with pytest.raises(TypeError, match="do not also set region or endpointUrl"):
        DynamoDBStore(table="t-1", client=client, region="eu-west-1")
    with pytest.raises(TypeError, match="settings model or keyword options"):
        DynamoDBStore(DynamoDBSettings(table="t-1"), table="t-2")


def test_no_region_anywhere_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(SettingsError, match="no AWS region") as caught:
        DynamoDBStore(table="t-1")
    assert caught.value.field == "region"


def test_settings_use_camel_case_and_reject_bad_values() -> None:
    settings = DynamoDBSettings.model_validate(
        {"table": "flags", "prefix": "prod", "region": "eu-west-1", "endpointUrl": "http://h:1"}
    )
    assert (settings.table, settings.prefix, settings.region, settings.endpoint_url) == (
        "flags",
        "prod",
        "eu-west-1",
        "http://h:1",
    )
    with pytest.raises(ValidationError, match="table"):
        DynamoDBSettings.model_validate({})
    with pytest.raises(ValidationError, match="not a valid DynamoDB table name"):
        DynamoDBSettings.model_validate({"table": "a/b"})


def test_registered_as_the_dynamodb_store_kind(dynamodb_server: MotoServer, table: str) -> None:
    assert Registry().store("dynamodb") is DynamoDBStore
    (listed,) = [p for p in installed_plugins() if p.name == "dynamodb"]
    assert (listed.distribution, listed.mode) == ("flagsink-dynamodb", "store")

    config = parse_config(
        {
            "exporter": {"kind": "log"},
            "store": {
                "kind": "dynamodb",
                "table": table,
                "prefix": "prod",
                "endpointUrl": dynamodb_server.endpoint,
                "cacheTTL": 5,
            },
        }
    )
    assert config.store is not None
    cached = config.store.build()
    try:
        assert cached.ttl == 5
        cached.init({FLAGS: {"a": flag("a", 1)}})
        assert cached.get(FLAGS, "a") == flag("a", 1)
        assert isinstance(cached.backend, DynamoDBStore)
        assert cached.backend.partition_key(FLAGS) == "prod:flags"
    finally:
        cached.close()


def test_flagsink_store_init_creates_the_table(dynamodb_server: MotoServer, tmp_path: Any) -> None:
    from click.testing import CliRunner

    from flagsink.cli import main

    config = tmp_path / "flagsink.yaml"
    config.write_text(
        "exporter:\n  kind: log\n"
        "store:\n  kind: dynamodb\n  table: made-by-cli\n  prefix: prod\n"
        f"  region: us-east-1\n  endpointUrl: {dynamodb_server.endpoint}\n"
    )
    runner = CliRunner()
    first = runner.invoke(main, ["store", "init", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert "table 'made-by-cli' created in region us-east-1" in first.output
    described = dynamodb_server.client().describe_table(TableName="made-by-cli")["Table"]
    assert described["TableStatus"] == "ACTIVE"
    again = runner.invoke(main, ["store", "init", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert "table 'made-by-cli' already exists" in again.output

    store = DynamoDBStore(table="made-by-cli", prefix="prod", endpointUrl=dynamodb_server.endpoint)
    try:
        store.init_items({FLAGS: {"a": flag("a", 3)}})
    finally:
        store.close()
    listed = runner.invoke(main, ["flags", "list", "--config", str(config), "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(row["key"], row["version"]) for row in json.loads(listed.output)] == [("a", 3)]
