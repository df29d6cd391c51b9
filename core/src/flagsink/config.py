"""Loading flagsink (and GO Feature Flag relay) configuration files.

A config is YAML or JSON with an ``exporter:`` section or an ``exporters:`` list, exactly
as in GO Feature Flag's ``goff-proxy.yaml``. Strings may use ``${VAR}`` or
``${VAR:-default}`` (``$${`` for a literal ``${``). Every error names the file, the line
when known, the path (``exporters[1].bucket``) and what is expected, and never echoes
the value given, which may be a secret.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from flagsink.exporter import Exporter, ExporterSettings, SettingsError
from flagsink.plugins import PluginError, Registry, default_registry
from flagsink.spool import SpoolSettings
from flagsink.store import StoreBackend, StoreError, StoreSettings
from flagsink.store_cache import CachedStore

__all__ = [
    "Config",
    "ConfigError",
    "ExporterConfig",
    "SchedulingSettings",
    "StoreConfig",
    "load_config",
    "parse_config",
]

logger = logging.getLogger("flagsink.config")

# Top-level keys of flagsink itself (some used by the relay).
FLAGSINK_KEYS = frozenset(
    {
        "exporter",
        "exporters",
        "listen",
        "host",
        "authorizedKeys",
        "apiKeys",
        "maxBodyBytes",
        "logLevel",
        "logFormat",
        "store",
        "evaluationContextEnrichment",
        "spool",
        "shutdownTimeout",
        "idempotencyTtl",
    }
)
# GO Feature Flag relay keys that flagsink accepts and ignores, so its files work unchanged.
GOFF_IGNORED_KEYS = frozenset(
    {
        "retriever",
        "retrievers",
        "notifier",
        "notifiers",
        "pollingInterval",
        "fileFormat",
        "startWithRetrieverError",
        "enablePollingJitter",
        "enableBulkMetricFlagNames",
        "disableNotifierOnInit",
        "debug",
        "hideBanner",
        "enableSwagger",
        "persistentFlagConfigurationFile",
        "openTelemetryOtlpEndpoint",
        "otel",
        "version",
        "enableMaintenanceMode",
        "restApiTimeout",
        "monitoringPort",
        "envVariablePrefix",
        "server",
    }
)
_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists each as one line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SchedulingSettings(BaseModel):
    """Keys common to every exporter section: which exporter, and how events are batched."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    kind: str = Field(description="Exporter kind, e.g. `file`, `log`, `s3`.")
    flush_interval: int = Field(
        60_000, gt=0, description="Milliseconds between flushes of a bulk exporter."
    )
    max_event_in_memory: int = Field(
        100_000, ge=1, description="Flush a bulk exporter when this many events wait."
    )
    event_type: Literal["feature", "tracking"] = Field(
        "feature", description="Which events this exporter receives: `feature` or `tracking`."
    )
    max_buffered_events: int | None = Field(
        None,
        ge=1,
        description="Cap on waiting events (default 5 x maxEventInMemory); past it the "
        "oldest are dropped and counted.",
    )
    retry_initial_interval: int = Field(
        1_000, gt=0, description="Milliseconds before the first retry of a failed export."
    )
    retry_max_interval: int = Field(
        60_000, gt=0, description="Longest wait between retries, in milliseconds."
    )
    name: str | None = Field(None, description="Label in logs and metrics (default: kind).")
    dead_letter_file: str | None = Field(
        None,
        description="JSON lines file (created if missing) that keeps every event the sink "
        "refuses for good, with the reason; `flagsink replay` sends them again. With a "
        "`spool`, the default is `<spool.dir>/deadletter/<name>.jsonl`.",
    )

    @model_validator(mode="after")
    def _cap_holds_a_batch(self) -> SchedulingSettings:
        cap = self.max_buffered_events
        if cap is not None and cap < self.max_event_in_memory:
            raise ValueError(
                f"maxBufferedEvents: must be at least maxEventInMemory ({self.max_event_in_memory})"
            )
        return self


def _no_empty_keys(keys: list[SecretStr]) -> list[SecretStr]:
    for index, key in enumerate(keys):
        if not key.get_secret_value().strip():
            raise ValueError(
                f"key {index} is empty (an unset variable?): an empty key would switch "
                "authentication off; remove it or give it a value"
            )
    return keys


class AuthorizedKeys(BaseModel):
    """API keys as in goff-proxy.yaml's ``authorizedKeys``."""

    model_config = ConfigDict(extra="forbid")

    evaluation: list[SecretStr] = Field(
        default_factory=list, description="Keys allowed to send events and read flags."
    )
    admin: list[SecretStr] = Field(
        default_factory=list, description="Keys allowed everything, including admin calls."
    )

    _check_evaluation = field_validator("evaluation", "admin")(_no_empty_keys)


class ServiceSettings(BaseModel):
    """Top-level keys of the relay service (``flagsink serve``)."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    listen: int | str = Field(
        1031, description="Port (`1031`) or `host:port` to listen on; GO Feature Flag's key."
    )
    host: str = Field("127.0.0.1", description="Interface to bind when `listen` is a port.")
    authorized_keys: AuthorizedKeys = Field(
        default_factory=AuthorizedKeys,
        description="`{evaluation: [...], admin: [...]}`: when any key is set, every "
        "endpoint but /health and /info needs `X-API-Key` or `Authorization: Bearer`.",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Legacy list of keys (GO Feature Flag's `apiKeys`)."
    )
    max_body_bytes: int = Field(
        5 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted, in bytes (413 past it).",
    )
    log_level: Literal["debug", "info", "warn", "warning", "error"] = Field(
        "info", description="Level of the relay's own logs."
    )
    log_format: Literal["text", "logfmt", "json"] = Field(
        "text", description="Relay log lines as `text` (also `logfmt`) or `json`."
    )
    shutdown_timeout: float = Field(
        10.0, gt=0, description="Seconds allowed to flush every exporter on SIGTERM/SIGINT."
    )
    idempotency_ttl: float = Field(
        600.0,
        gt=0,
        description="Seconds a collector answer is kept for retries that send the same "
        "`Idempotency-Key` header (and body): they get that answer again, not ingested twice.",
    )

    _check_api_keys = field_validator("api_keys")(_no_empty_keys)

    @property
    def keys(self) -> list[str]:
        """Every key that may call the protected endpoints."""
        keys = [*self.authorized_keys.evaluation, *self.authorized_keys.admin, *self.api_keys]
        return [key.get_secret_value() for key in keys]

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` from ``listen`` and ``host``."""
        if isinstance(self.listen, int):
            return self.host, self.listen
        host, _, port = self.listen.rpartition(":")
        return (host or self.host), int(port)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, listen: int | str) -> int | str:
        text = str(listen)
        port = text.rpartition(":")[2]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected a port (1-65535) or host:port, e.g. 1031 or 0.0.0.0:1031")
        return int(text) if text.isdigit() else text


SERVICE_KEYS = frozenset(
    (info.alias or name) for name, info in ServiceSettings.model_fields.items()
)


COMMON_KEYS = frozenset(
    (info.alias or name) for name, info in SchedulingSettings.model_fields.items()
)


@dataclass(frozen=True)
class ExporterConfig:
    """One validated exporter section."""

    path: str
    scheduling: SchedulingSettings
    exporter_class: type[Exporter[Any]]
    settings: ExporterSettings
    place: str = "<config>"

    @property
    def label(self) -> str:
        """The name shown in logs and metrics."""
        return self.scheduling.name or self.scheduling.kind

    def build(self) -> Exporter[Any]:
        """Instantiate the exporter (may raise :class:`ConfigError` for unusable settings)."""
        try:
            return self.exporter_class(self.settings)
        except SettingsError as exc:
            raise ConfigError([f"{self.place}: {self.path}.{exc.field}: {exc.message}"]) from None


STORE_COMMON_KEYS = frozenset({"kind", "cacheTTL"})


@dataclass(frozen=True)
class StoreConfig:
    """The validated ``store:`` section: which store, its settings, and the cache TTL."""

    kind: str
    store_class: type[StoreBackend[Any]]
    settings: StoreSettings
    cache_ttl: float = 15.0
    place: str = "<config>"

    def build_backend(self) -> StoreBackend[Any]:
        """Instantiate the store backend (may raise :class:`ConfigError`)."""
        try:
            return self.store_class(self.settings)
        except (StoreError, SettingsError) as exc:
            raise ConfigError([f"{self.place}: store: {exc}"]) from None

    def build(self) -> CachedStore:
        """A :class:`~flagsink.store_cache.CachedStore` over a new backend."""
        return CachedStore(self.build_backend(), ttl=self.cache_ttl)


@dataclass(frozen=True)
class Config:
    """A validated configuration file."""

    source: str
    exporters: list[ExporterConfig]
    raw: dict[str, Any] = field(repr=False)
    service: ServiceSettings = field(default_factory=lambda: ServiceSettings.model_validate({}))
    store: StoreConfig | None = None
    spool: SpoolSettings | None = None

    @property
    def evaluation_context_enrichment(self) -> dict[str, Any]:
        """``evaluationContextEnrichment``: sent to providers with the flag configuration."""
        value = self.raw.get("evaluationContextEnrichment")
        return dict(value) if isinstance(value, dict) else {}


def load_config(path: str | os.PathLike[str], registry: Registry | None = None) -> Config:
    """Read, expand and validate the YAML or JSON file at ``path``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"]) from None
    data, lines = _parse_text(text, source)
    return parse_config(data, source=source, registry=registry, lines=lines)


def parse_config(
    data: Any,
    *,
    source: str = "<config>",
    registry: Registry | None = None,
    lines: Mapping[str, int] | None = None,
) -> Config:
    """Validate already-parsed config ``data``; errors name ``source`` and the path."""
    registry = registry or default_registry()
    where = _Locator(source, lines or {})
    if not isinstance(data, dict):
        raise ConfigError([where("", "expected a mapping with an `exporter` or `exporters` key")])
    problems: list[str] = []
    data = _expand(data, "", where, problems)
    for key in data:
        if key in FLAGSINK_KEYS:
            continue
        if key in GOFF_IGNORED_KEYS:
            logger.info("%s: ignoring GO Feature Flag key %r (not used by flagsink)", source, key)
            continue
        problems.append(where(key, "unknown key" + _suggest(key, FLAGSINK_KEYS)))
    sections = _sections(data, where, problems)
    exporters = []
    for path, section in sections:
        built = _exporter_config(path, section, registry, where, problems)
        if built is not None:
            exporters.append(built)
    if not problems and not exporters:
        problems.append(where("", "no exporter configured: add an `exporter:` or `exporters:`"))
    service = ServiceSettings.model_validate({})
    try:
        service = ServiceSettings.model_validate(
            {k: v for k, v in data.items() if k in SERVICE_KEYS}
        )
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, "", where, SERVICE_KEYS))
    store = _store_config(data.get("store"), registry, where, problems)
    spool = _spool_config(data.get("spool"), where, problems)
    enrichment = data.get("evaluationContextEnrichment")
    if enrichment is not None and not isinstance(enrichment, dict):
        problems.append(where("evaluationContextEnrichment", "expected a mapping"))
    if problems:
        raise ConfigError(problems)
    return Config(
        source=source,
        exporters=exporters,
        raw=data,
        service=service,
        store=store,
        spool=spool,
    )


SPOOL_KEYS = frozenset((info.alias or name) for name, info in SpoolSettings.model_fields.items())


def _spool_config(section: Any, where: _Locator, problems: list[str]) -> SpoolSettings | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        problems.append(where("spool", "expected a mapping with at least a `dir` key"))
        return None
    try:
        return SpoolSettings.model_validate(section)
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, "spool", where, SPOOL_KEYS))
        return None


# -- parsing ---------------------------------------------------------------------------------


def _parse_text(text: str, source: str) -> tuple[Any, dict[str, int]]:
    if source.endswith(".json"):
        try:
            return json.loads(text), {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                [f"{source}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"]
            ) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}{line}: invalid YAML: {problem}"]) from None
    lines: dict[str, int] = {}
    if node is not None:
        try:
            _record_lines(node, "", lines)
        except RecursionError:
            raise ConfigError([f"{source}: invalid YAML: an alias refers to itself"]) from None
    return data, lines


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = f"{path}.{key.value}" if path else str(key.value)
            lines[child] = key.start_mark.line + 1
            _record_lines(value, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, f"{path}[{index}]", lines)


@dataclass(frozen=True)
class _Locator:
    source: str
    lines: Mapping[str, int]

    def __call__(self, path: str, message: str) -> str:
        place = self.place(path)
        return f"{place}: {path}: {message}" if path else f"{place}: {message}"

    def place(self, path: str) -> str:
        """``file:line`` of ``path`` (or of its nearest parent with a known line)."""
        line = self._line(path)
        return f"{self.source}:{line}" if line else self.source

    def _line(self, path: str) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""


def _expand(value: Any, path: str, where: _Locator, problems: list[str]) -> Any:
    if isinstance(value, str):
        return _expand_string(value, path, where, problems)
    if isinstance(value, dict):
        return {
            k: _expand(v, f"{path}.{k}" if path else str(k), where, problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(v, f"{path}[{i}]", where, problems) for i, v in enumerate(value)]
    return value


def _expand_string(text: str, path: str, where: _Locator, problems: list[str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is not None:
                return default
            problems.append(
                where(path, f"environment variable {name} is not set (use ${{{name}:-default}})")
            )
            return ""
        return value

    return _VARIABLE.sub(substitute, text) if "$" in text else text


def _sections(data: dict[str, Any], where: _Locator, problems: list[str]) -> list[tuple[str, Any]]:
    sections: list[tuple[str, Any]] = []
    if "exporter" in data and data["exporter"] is not None:
        sections.append(("exporter", data["exporter"]))
    many = data.get("exporters")
    if many is not None:
        if not isinstance(many, list):
            problems.append(where("exporters", "expected a list of exporter sections"))
        else:
            sections.extend((f"exporters[{i}]", section) for i, section in enumerate(many))
    return sections


def _exporter_config(
    path: str, section: Any, registry: Registry, where: _Locator, problems: list[str]
) -> ExporterConfig | None:
    if not isinstance(section, dict):
        problems.append(where(path, "expected a mapping with at least a `kind` key"))
        return None
    if "kind" not in section:
        problems.append(where(f"{path}.kind", "required: the exporter kind, e.g. `file`"))
        return None
    scheduling: SchedulingSettings | None = None
    try:
        scheduling = SchedulingSettings.model_validate(section)
    except ValidationError as exc:  # still check the exporter's own keys below
        problems.extend(_validation_problems(exc, path, where, COMMON_KEYS))
    kind = section["kind"]
    if not isinstance(kind, str):
        return None
    try:
        cls: type[Exporter[Any]] = registry.exporter(kind)
    except PluginError as exc:
        problems.append(where(f"{path}.kind", str(exc)))
        return None
    own = {k: v for k, v in section.items() if k not in COMMON_KEYS}
    model = cls.settings_model
    try:
        settings = model.model_validate(own)
    except ValidationError as exc:
        keys = {(info.alias or name) for name, info in model.model_fields.items()}
        problems.extend(_validation_problems(exc, path, where, keys | COMMON_KEYS))
        return None
    if scheduling is None:
        return None
    return ExporterConfig(
        path=path,
        scheduling=scheduling,
        exporter_class=cls,
        settings=settings,
        place=where.place(path),
    )


def _store_config(
    section: Any, registry: Registry, where: _Locator, problems: list[str]
) -> StoreConfig | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        problems.append(where("store", "expected a mapping with at least a `kind` key"))
        return None
    kind = section.get("kind")
    if not isinstance(kind, str) or not kind:
        problems.append(where("store.kind", "required: the store kind, e.g. `file` or `dynamodb`"))
        return None
    ttl = section.get("cacheTTL", 15.0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        problems.append(
            where("store.cacheTTL", "expected seconds (0 = no cache, negative = forever)")
        )
        ttl = 15.0
    try:
        cls: type[StoreBackend[Any]] = registry.store(kind)
    except PluginError as exc:
        problems.append(where("store.kind", str(exc)))
        return None
    model = cls.settings_model
    own = {k: v for k, v in section.items() if k not in STORE_COMMON_KEYS}
    keys = {(info.alias or name) for name, info in model.model_fields.items()}
    if "cacheTTL" in keys:  # a store that declares cacheTTL itself gets it too
        own["cacheTTL"] = ttl
    try:
        settings = model.model_validate(own)
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, "store", where, keys | STORE_COMMON_KEYS))
        return None
    return StoreConfig(
        kind=kind,
        store_class=cls,
        settings=settings,
        cache_ttl=float(ttl),
        place=where.place("store"),
    )


def _suggest(key: str, valid: frozenset[str] | set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(sorted(valid))}"


def _validation_problems(
    exc: ValidationError, path: str, where: _Locator, valid: set[str] | frozenset[str]
) -> list[str]:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        kind = error["type"]
        if kind == "extra_forbidden":
            key = str(error["loc"][-1])
            message = "unknown key" + _suggest(key, valid)
        elif kind == "missing":
            message = "required"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
            head, _, rest = message.partition(": ")
            if head in valid and location in ("", head):  # "csvTemplate: ..." from a check
                location, message = head, rest
        full = f"{path}.{location}" if path and location else (location or path)
        problems.append(where(full, message))
    return problems
