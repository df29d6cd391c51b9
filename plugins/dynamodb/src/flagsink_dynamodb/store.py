"""The ``dynamodb`` store: flags and segments in one DynamoDB table, in the layout of
LaunchDarkly's DynamoDB persistent store, so one table can be shared with its SDKs.

Layout (as LaunchDarkly's ``_DynamoDBFeatureStoreCore``):

- partition key ``namespace`` (S): the namespace (``flags``, ``segments``), prefixed with
  ``PREFIX:`` when a ``prefix`` is set;
- sort key ``key`` (S): the item's key;
- ``version`` (N): the item's version, compared by the conditional writes;
- ``item`` (S): the whole item as JSON text (tombstones included);
- the marker of a completed init: an item whose namespace and key are both
  ``PREFIX:$inited`` (``$inited`` without a prefix), with no other attribute.

Upserts are conditional ``PutItem`` calls: DynamoDB itself refuses to replace an item
with one of the same or a lower version, so concurrent writers in several processes can
never make a key go backwards. ``init`` writes with ``BatchWriteItem`` (25 requests a call,
unprocessed requests retried with backoff), deletes the items the new data no longer has,
then writes the marker.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from botocore import exceptions as boto  # type: ignore[import-untyped]

from flagsink.exporter import SettingsError
from flagsink.store import NAMESPACES, Item, StoreBackend, StoreError
from flagsink_dynamodb.settings import DynamoDBSettings

__all__ = [
    "INITED",
    "ITEM_ATTRIBUTE",
    "PARTITION_KEY",
    "SORT_KEY",
    "VERSION_ATTRIBUTE",
    "DynamoDBStore",
]

logger = logging.getLogger("flagsink.dynamodb")

# LaunchDarkly's attribute names and init marker; never change them.
PARTITION_KEY = "namespace"
SORT_KEY = "key"
VERSION_ATTRIBUTE = "version"
ITEM_ATTRIBUTE = "item"
INITED = "$inited"

_BATCH_SIZE = 25  # BatchWriteItem's limit of requests per call
_BATCH_ATTEMPTS = 10  # calls per chunk before unprocessed requests are an error
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
_UPSERT_ATTEMPTS = 5
_CONDITION = "attribute_not_exists(#namespace) or #version < :version"
_ACCESS_CODES = frozenset(
    {
        "AccessDeniedException",
        "ExpiredTokenException",
        "IncompleteSignatureException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
    }
)
_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "ThrottlingException",
    }
)
_INIT_HINT = "create it with `flagsink store init --config FILE` or see docs"


class DynamoDBStore(StoreBackend[DynamoDBSettings]):
    """Flags and segments in a DynamoDB table (LaunchDarkly's table layout).

    :param settings: a :class:`~flagsink_dynamodb.DynamoDBSettings`, or pass its keys as
        keyword options (``table="flags", prefix="prod"``).
    :param client: a ready boto3 DynamoDB client to use instead of building one (its
        region, endpoint, credentials and retry settings are used; do not also set
        ``region`` or ``endpointUrl``). The caller keeps ownership: :meth:`close` does not
        close it.
    :param session: a boto3 ``Session`` to build the client from (e.g. one with a profile
        or assumed-role credentials); default: a new session on boto3's standard chain.

    The table's key schema is checked once, with ``DescribeTable``, before the first
    operation; no call is made while the store is built.
    """

    kind = "dynamodb"
    settings_model = DynamoDBSettings

    def __init__(
        self,
        settings: DynamoDBSettings | None = None,
        /,
        *,
        client: Any = None,
        session: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        if client is not None and session is not None:
            raise TypeError("pass either client= or session=, not both")
        if client is not None and (self.settings.region or self.settings.endpoint_url):
            raise TypeError(
                "a ready client= carries its own region and endpoint: "
                "do not also set region or endpointUrl"
            )
        self.table = self.settings.table
        self.prefix = f"{self.settings.prefix}:" if self.settings.prefix else ""
        self._owns_client = client is None
        self.client: Any = client if client is not None else self._new_client(session)
        self._checked = threading.Event()  # the key schema was checked
        self._check_lock = threading.Lock()

    def _new_client(self, session: Any) -> Any:
        import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - keep plugin import light
        from botocore.config import Config  # type: ignore[import-untyped]  # noqa: PLC0415

        config = Config(
            connect_timeout=5,
            read_timeout=20,
            retries={"mode": "standard", "max_attempts": 5},
            user_agent_extra="flagsink-dynamodb",
        )
        if session is None:
            session = boto3.session.Session()
        try:
            return session.client(
                "dynamodb",
                region_name=self.settings.region,
                endpoint_url=self.settings.endpoint_url,
                config=config,
            )
        except boto.NoRegionError:
            raise SettingsError(
                "region",
                "no AWS region: set `region`, or AWS_REGION / AWS_DEFAULT_REGION, "
                "or a region in the AWS profile",
            ) from None
        except boto.InvalidRegionError:
            raise SettingsError(
                "region", f"{self.settings.region!r} is not a valid region name"
            ) from None
        except ValueError as exc:
            raise SettingsError("endpointUrl", str(exc)) from None

    # -- keys -----------------------------------------------------------------------------

    def partition_key(self, namespace: str) -> str:
        """The partition key of ``namespace``: ``PREFIX:namespace``, or the namespace."""
        return self.prefix + namespace

    @property
    def inited_key(self) -> str:
        """Partition and sort key of the init marker (``PREFIX:$inited``)."""
        return self.prefix + INITED

    @staticmethod
    def _keys(namespace: str, key: str) -> dict[str, Any]:
        return {PARTITION_KEY: {"S": namespace}, SORT_KEY: {"S": key}}

    def _marshal(self, namespace: str, item: Item) -> dict[str, Any]:
        key, version = _checked_item(item)
        try:
            text = json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"item {key!r} is not JSON-serializable: {exc}") from None
        encoded = self._keys(self.partition_key(namespace), key)
        encoded[VERSION_ATTRIBUTE] = {"N": str(version)}
        encoded[ITEM_ATTRIBUTE] = {"S": text}
        return encoded

    @staticmethod
    def _unmarshal(encoded: Mapping[str, Any] | None) -> Item | None:
        if not encoded:
            return None
        text = encoded.get(ITEM_ATTRIBUTE, {}).get("S")
        if text is None:
            return None
        item = json.loads(text)
        return item if isinstance(item, dict) else None

    # -- the table ------------------------------------------------------------------------

    def _ensure_table(self) -> None:
        """Check once that the table exists and has LaunchDarkly's key schema."""
        if self._checked.is_set():
            return
        with self._check_lock:
            if self._checked.is_set():
                return
            try:
                description = self.client.describe_table(TableName=self.table)["Table"]
            except boto.ClientError as exc:
                if _code(exc) == "AccessDeniedException" or _status(exc) == 403:
                    # Allowed to use the table but not to describe it (e.g. a policy
                    # written for LaunchDarkly's SDKs): go on without the check.
                    logger.warning(
                        "dynamodb: not allowed to describe table %r (dynamodb:DescribeTable), "
                        "so its key schema is not checked",
                        self.table,
                    )
                    self._checked.set()
                    return
                raise self._error(exc, "DescribeTable") from None
            except boto.BotoCoreError as exc:
                raise self._error(exc, "DescribeTable") from None
            self._check_schema(description)
            self._checked.set()

    def _check_schema(self, description: Mapping[str, Any]) -> None:
        types = {
            attribute["AttributeName"]: attribute["AttributeType"]
            for attribute in description.get("AttributeDefinitions", [])
        }
        schema = {key["KeyType"]: key["AttributeName"] for key in description.get("KeySchema", [])}
        wanted = {"HASH": PARTITION_KEY, "RANGE": SORT_KEY}
        if schema == wanted and all(types.get(name) == "S" for name in wanted.values()):
            return
        found = ", ".join(
            f"{'partition' if kind == 'HASH' else 'sort'} key `{name}` ({types.get(name, '?')})"
            for kind, name in sorted(schema.items())
        )
        raise StoreError(
            f"table {self.table!r} has the wrong key schema ({found or 'none'}): the dynamodb "
            f"store needs partition key `{PARTITION_KEY}` (S) and sort key `{SORT_KEY}` (S), "
            "LaunchDarkly's layout. Use another table, or create one with "
            "`flagsink store init --config FILE`"
        )

    def create(self, *, timeout: float = 120.0) -> str:
        """Create the table (on-demand capacity, ``PAY_PER_REQUEST``) and wait until it is
        ``ACTIVE``. Called by ``flagsink store init``; needs ``dynamodb:CreateTable`` and
        ``dynamodb:DescribeTable``. A table that already exists is left as it is, once its
        key schema is checked (:class:`StoreError` if it is not LaunchDarkly's).

        :returns: what was done, for the command's output (starts with ``table 'NAME'
            created`` or ``table 'NAME' already exists``).
        """
        try:
            self.client.create_table(
                TableName=self.table,
                KeySchema=[
                    {"AttributeName": PARTITION_KEY, "KeyType": "HASH"},
                    {"AttributeName": SORT_KEY, "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": PARTITION_KEY, "AttributeType": "S"},
                    {"AttributeName": SORT_KEY, "AttributeType": "S"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
            created = True
        except boto.ClientError as exc:
            if _code(exc) != "ResourceInUseException":
                raise self._error(exc, "CreateTable") from None
            created = False
        except boto.BotoCoreError as exc:
            raise self._error(exc, "CreateTable") from None
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                description = self.client.describe_table(TableName=self.table)["Table"]
            except (boto.ClientError, boto.BotoCoreError) as exc:
                raise self._error(exc, "DescribeTable") from None
            self._check_schema(description)
            status = description.get("TableStatus")
            if status == "ACTIVE":
                break
            if status not in ("CREATING", "UPDATING"):
                raise StoreError(f"table {self.table!r} is {status}, not ACTIVE")
            if time.monotonic() > deadline:
                raise StoreError(
                    f"table {self.table!r} is still {status} after {timeout:g}s; "
                    "try again in a moment"
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        self._checked.set()
        where = f"region {self._region()}{self._at()}"
        if not created:
            return f"table {self.table!r} already exists in {where} with the right key schema"
        logger.info("dynamodb: created table %r in %s (on-demand capacity)", self.table, where)
        return f"table {self.table!r} created in {where} (on-demand capacity)"

    # -- the contract ---------------------------------------------------------------------

    def init_items(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        """Replace every item of the namespaces in ``data`` and of ``flags`` and
        ``segments``, then write the init marker (LaunchDarkly's order: write the new
        items, delete the old ones, mark the table initialized)."""
        puts: list[dict[str, Any]] = []
        fresh: set[tuple[str, str]] = set()
        for namespace, items in data.items():
            for key, item in items.items():
                encoded = self._marshal(namespace, item)
                if encoded[SORT_KEY]["S"] != key:
                    raise ValueError(
                        f"{namespace}: item under key {key!r} has key {item.get('key')!r}"
                    )
                puts.append({"PutRequest": {"Item": encoded}})
                fresh.add((self.partition_key(namespace), key))
        self._ensure_table()
        stale = self._existing_keys({*NAMESPACES, *data}) - fresh
        deletes = [
            {"DeleteRequest": {"Key": self._keys(namespace, key)}}
            for namespace, key in sorted(stale)
        ]
        self._batch_write([*puts, *deletes])
        marker = self._keys(self.inited_key, self.inited_key)
        self._call("PutItem", self.client.put_item, TableName=self.table, Item=marker)
        logger.info(
            "dynamodb: initialized table %r%s with %d items (%d removed)",
            self.table,
            f" (prefix {self.settings.prefix!r})" if self.prefix else "",
            len(puts),
            len(deletes),
        )

    def get_item(self, namespace: str, key: str) -> Item | None:
        """The stored item (possibly a tombstone), read with strong consistency."""
        if not key:
            return None
        self._ensure_table()
        answer = self._call(
            "GetItem",
            self.client.get_item,
            TableName=self.table,
            Key=self._keys(self.partition_key(namespace), key),
            ConsistentRead=True,
        )
        return self._unmarshal(answer.get("Item"))

    def all_items(self, namespace: str) -> dict[str, Item]:
        """Every item of ``namespace`` by key (the sort key each is stored under)."""
        self._ensure_table()
        found: dict[str, Item] = {}
        for page in self._query(namespace):
            for encoded in page.get("Items", []):
                item = self._unmarshal(encoded)
                if item is not None:
                    found[encoded[SORT_KEY]["S"]] = item
        return found

    def upsert_item(self, namespace: str, item: Item) -> Item:
        """A conditional ``PutItem``: written only if the stored version is lower (or
        there is none); otherwise the stored, newer item is returned."""
        encoded = self._marshal(namespace, item)
        self._ensure_table()
        for _ in range(_UPSERT_ATTEMPTS):
            try:
                self.client.put_item(
                    TableName=self.table,
                    Item=encoded,
                    ConditionExpression=_CONDITION,
                    ExpressionAttributeNames={
                        "#namespace": PARTITION_KEY,
                        "#version": VERSION_ATTRIBUTE,
                    },
                    ExpressionAttributeValues={":version": encoded[VERSION_ATTRIBUTE]},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except boto.ClientError as exc:
                if _code(exc) != "ConditionalCheckFailedException":
                    raise self._error(exc, "PutItem") from None
                # A newer (or equal) version is stored: return it, from the error when
                # DynamoDB sent it, else read it.
                kept = self._unmarshal(exc.response.get("Item"))
                if kept is None:
                    kept = self.get_item(namespace, encoded[SORT_KEY]["S"])
                if kept is not None:
                    return kept
                # Removed meanwhile (an init by another process): try the write again.
                continue
            except boto.BotoCoreError as exc:
                raise self._error(exc, "PutItem") from None
            return item
        raise StoreError(
            f"upsert of {encoded[SORT_KEY]['S']!r} in table {self.table!r} kept conflicting "
            "with concurrent writes"
        )

    def is_initialized(self) -> bool:
        """True when the init marker (``PREFIX:$inited``) is in the table."""
        self._ensure_table()
        answer = self._call(
            "GetItem",
            self.client.get_item,
            TableName=self.table,
            Key=self._keys(self.inited_key, self.inited_key),
            ConsistentRead=True,
        )
        return bool(answer.get("Item"))

    def close(self) -> None:
        """Close the client's connections, unless the client was passed in."""
        if self._owns_client:
            close = getattr(self.client, "close", None)
            if close is not None:
                close()

    # -- requests -------------------------------------------------------------------------

    def _query(self, namespace: str, **extra: Any) -> Iterable[Mapping[str, Any]]:
        names = {"#namespace": PARTITION_KEY, **extra.pop("ExpressionAttributeNames", {})}
        pages = self.client.get_paginator("query").paginate(
            TableName=self.table,
            ConsistentRead=True,
            KeyConditionExpression="#namespace = :namespace",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={":namespace": {"S": self.partition_key(namespace)}},
            **extra,
        )
        try:
            yield from pages
        except (boto.ClientError, boto.BotoCoreError) as exc:
            raise self._error(exc, "Query") from None

    def _existing_keys(self, namespaces: Iterable[str]) -> set[tuple[str, str]]:
        keys: set[tuple[str, str]] = set()
        for namespace in sorted(namespaces):
            pages = self._query(
                namespace,
                ProjectionExpression="#namespace, #key",
                ExpressionAttributeNames={"#key": SORT_KEY},
            )
            for page in pages:
                for encoded in page.get("Items", []):
                    keys.add((encoded[PARTITION_KEY]["S"], encoded[SORT_KEY]["S"]))
        return keys

    def _batch_write(self, requests: list[dict[str, Any]]) -> None:
        for start in range(0, len(requests), _BATCH_SIZE):
            pending = requests[start : start + _BATCH_SIZE]
            for attempt in range(_BATCH_ATTEMPTS):
                answer = self._call(
                    "BatchWriteItem",
                    self.client.batch_write_item,
                    RequestItems={self.table: pending},
                )
                pending = answer.get("UnprocessedItems", {}).get(self.table, [])
                if not pending:
                    break
                # Full jitter backoff, as AWS recommends for unprocessed items.
                time.sleep(random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt)))
            else:
                raise StoreError(
                    f"init of table {self.table!r}: {len(pending)} write"
                    f"{'' if len(pending) == 1 else 's'} stayed unprocessed "
                    f"after {_BATCH_ATTEMPTS} attempts (throttled): raise the table's write "
                    "capacity or use on-demand capacity, then run init again"
                )

    def _call(self, action: str, method: Callable[..., Any], **args: Any) -> Any:
        try:
            return method(**args)
        except (boto.ClientError, boto.BotoCoreError) as exc:
            raise self._error(exc, action) from None

    # -- errors ---------------------------------------------------------------------------

    def _error(self, exc: Exception, action: str) -> StoreError:
        """A :class:`StoreError` saying what went wrong and what to do; never credentials."""
        table = self.table
        if isinstance(exc, boto.ClientError):
            code = _code(exc)
            if code == "ResourceNotFoundException":
                self._checked.clear()
                return StoreError(
                    f"table {table!r} does not exist in region {self._region()}"
                    f"{self._at()}: {_INIT_HINT}"
                )
            if code in _ACCESS_CODES or _status(exc) == 403:
                code = code if code in _ACCESS_CODES else "AccessDenied"
                return StoreError(
                    f"access to table {table!r} denied ({code}): check the AWS credentials "
                    f"and that they allow dynamodb:{action} on the table"
                )
            if code in _THROTTLE_CODES:
                return StoreError(
                    f"dynamodb:{action} on table {table!r} was throttled ({code}) after "
                    "retries: raise the table's capacity or use on-demand capacity"
                )
            message = exc.response.get("Error", {}).get("Message") or "no message"
            return StoreError(f"dynamodb:{action} on table {table!r} failed: {code}: {message}")
        if isinstance(exc, boto.NoCredentialsError | boto.PartialCredentialsError):
            return StoreError(
                f"cannot use table {table!r}: no usable AWS credentials "
                f"({type(exc).__name__}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "a profile (AWS_PROFILE), or run with an instance or task role"
            )
        if isinstance(exc, boto.EndpointConnectionError | boto.ConnectionError):
            return StoreError(
                f"cannot reach {self._endpoint()} for table {table!r} "
                f"({type(exc).__name__}): check `endpointUrl`, `region` and the network"
            )
        return StoreError(
            f"dynamodb:{action} on table {table!r} failed: {type(exc).__name__}: {exc}"
        )

    def _endpoint(self) -> str:
        url = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return str(url or self.settings.endpoint_url or "DynamoDB")

    def _at(self) -> str:
        url = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        if url and "amazonaws.com" not in str(url):
            return f" at {url}"
        return ""

    def _region(self) -> str:
        region = getattr(getattr(self.client, "meta", None), "region_name", None)
        return str(region or self.settings.region or "us-east-1")


def _checked_item(item: Mapping[str, Any]) -> tuple[str, int]:
    if not isinstance(item, Mapping):
        raise TypeError(f"an item is a JSON object (a dict), not {type(item).__name__}")
    key, version = item.get("key"), item.get("version")
    if not isinstance(key, str) or not key:
        raise ValueError(f"item has no `key` (a non-empty string): {key!r}")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"item {key!r} has no integer `version`: {version!r}")
    return key, version


def _code(exc: boto.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _status(exc: boto.ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None
