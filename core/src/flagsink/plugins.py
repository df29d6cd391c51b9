"""Finding and loading plugins: pluggy hooks behind entry points in the group ``flagsink``.

The entry-point name is the kind (or format name) users write in config. Only the entry
points a config names are imported, so one broken or heavy plugin never breaks another.
Core's own ``file``, ``log``, ``json``, ``csv`` and ``parquet`` load the same way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from flagsink import hookspecs
from flagsink.hookspecs import PROJECT

__all__ = [
    "ALIASES",
    "DISABLE_ENV",
    "DuplicateKindError",
    "InstalledPlugin",
    "PluginError",
    "PluginLoadError",
    "Registry",
    "UnknownKindError",
    "core_version",
    "default_registry",
    "installed_plugins",
]

GROUP = PROJECT
MODES_GROUP = "flagsink.modes"
DISABLE_ENV = "FLAGSINK_DISABLE_PLUGINS"
# GO Feature Flag's kind names, accepted unchanged.
ALIASES = {"googleStorage": "gcs", "azureBlobStorage": "azureblob"}

_HOOKS = {
    "exporter": "flagsink_register_exporters",
    "store": "flagsink_register_stores",
    "format": "flagsink_register_formats",
}


class PluginError(Exception):
    """A plugin problem the user can act on; the message says what to do."""


class UnknownKindError(PluginError):
    """No installed plugin provides the kind."""


class PluginLoadError(PluginError):
    """A plugin failed to import or to register."""


class DuplicateKindError(PluginError):
    """Two plugins claim one kind."""


def core_version() -> str:
    """The installed flagsink version."""
    try:
        return metadata.version("flagsink")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


@dataclass(frozen=True)
class InstalledPlugin:
    """An entry point in the ``flagsink`` group, read from metadata without importing."""

    name: str
    module: str
    distribution: str
    version: str
    mode: str | None
    disabled: bool


def _disabled() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.metadata["Name"] or "unknown", dist.version


def _is_disabled(ep: metadata.EntryPoint, blocked: set[str]) -> bool:
    return bool(blocked) and (ep.name in blocked or _dist_of(ep)[0] in blocked)


def installed_plugins() -> list[InstalledPlugin]:
    """Every entry point of the group, sorted by name; nothing is imported."""
    blocked = _disabled()
    modes = {
        (ep.name, _dist_of(ep)[0]): ep.value.strip()
        for ep in metadata.entry_points(group=MODES_GROUP)
    }
    plugins = []
    for ep in metadata.entry_points(group=GROUP):
        dist, version = _dist_of(ep)
        plugins.append(
            InstalledPlugin(
                name=ep.name,
                module=ep.value,
                distribution=dist,
                version=version,
                mode=modes.get((ep.name, dist)),
                disabled=_is_disabled(ep, blocked),
            )
        )
    return sorted(plugins, key=lambda p: (p.name, p.distribution))


@dataclass
class _Registration:
    cls: type[Any]
    source: str  # "distribution (entry point name)"


class Registry:
    """Loads entry points on demand and keeps what their hooks register."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._loaded: set[str] = set()
        self._things: dict[str, dict[str, _Registration]] = {what: {} for what in _HOOKS}

    # -- lookups --------------------------------------------------------------------------

    def exporter(self, kind: str) -> type[Any]:
        """The exporter class for ``kind`` (GO Feature Flag aliases accepted)."""
        return self._lookup("exporter", kind)

    def store(self, kind: str) -> type[Any]:
        """The store class for ``kind``."""
        return self._lookup("store", kind)

    def format(self, name: str) -> type[Any]:
        """The format class called ``name``."""
        return self._lookup("format", name)

    def register_plugin(self, plugin: object, source: str = "registered in code") -> None:
        """Register a module or object with hook implementations directly (no entry point)."""
        self.pm.register(plugin)
        self._collect(plugin, source)

    # -- loading --------------------------------------------------------------------------

    def _lookup(self, what: str, name: str) -> type[Any]:
        canonical = ALIASES.get(name, name)
        found = self._things[what].get(canonical)
        if found is None:
            self._load(canonical)
            found = self._things[what].get(canonical)
        if found is None:
            raise self._unknown(what, name, canonical)
        return found.cls

    def _load(self, name: str) -> None:
        if name in self._loaded:
            return
        # A failed load is undone, so asking again fails the same way and a broken plugin
        # leaves nothing behind that breaks, or is served instead of, another one.
        saved = {what: dict(table) for what, table in self._things.items()}
        added: list[object] = []
        try:
            self._load_entry_points(name, added)
        except Exception:
            for plugin in added:
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
            self._things.update(saved)
            raise
        self._loaded.add(name)

    def _load_entry_points(self, name: str, added: list[object]) -> None:
        blocked = _disabled()
        for ep in metadata.entry_points(group=GROUP, name=name):
            if _is_disabled(ep, blocked):
                continue
            dist, version = _dist_of(ep)
            source = f"{dist} (entry point {ep.name!r} -> {ep.value})"
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {dist} {version} failed to import {ep.value!r} with flagsink "
                    f"{core_version()}: {type(exc).__name__}: {exc}. Reinstall or upgrade it "
                    f"(pip install -U {dist}), or block it with {DISABLE_ENV}={ep.name}"
                ) from exc
            if not self.pm.is_registered(module):
                added.append(module)
                try:
                    self.pm.register(module, name=f"{dist}:{ep.name}")
                    self.pm.check_pending()
                except pluggy.PluginValidationError as exc:
                    raise PluginLoadError(
                        f"plugin {dist} {version} (entry point {ep.name!r}) is invalid with "
                        f"flagsink {core_version()}: {exc}"
                    ) from exc
                self._collect(module, source)

    def _collect(self, plugin: object, source: str) -> None:
        for what, hook_name in _HOOKS.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin is plugin:
                    try:
                        impl.function(register=self._registrar(what, source))
                    except PluginError:
                        raise
                    except Exception as exc:
                        raise PluginLoadError(
                            f"{source}: {hook_name} failed: {type(exc).__name__}: {exc}"
                        ) from exc

    def _registrar(self, what: str, source: str) -> Callable[[type[Any]], None]:
        attribute = "name" if what == "format" else "kind"
        table = self._things[what]

        def register(cls: type[Any]) -> None:
            name = getattr(cls, attribute, None)
            if not isinstance(name, str) or not name:
                raise PluginLoadError(
                    f"{source} registered {cls!r} as a {what} without a {attribute!r} "
                    f"class attribute"
                )
            names: Iterable[str] = (name, *getattr(cls, "aliases", ()))
            for key in names:
                previous = table.get(key)
                if previous is not None and previous.cls is not cls:
                    raise DuplicateKindError(
                        f"{what} {key!r} is claimed twice: by {previous.cls.__qualname__} from "
                        f"{previous.source} and by {cls.__qualname__} from {source}. "
                        f"Uninstall one, or block one with {DISABLE_ENV}"
                    )
                table[key] = _Registration(cls, source)

        return register

    def _unknown(self, what: str, name: str, canonical: str) -> PluginError:
        for ep in metadata.entry_points(group=GROUP, name=canonical):
            if _is_disabled(ep, _disabled()):
                return UnknownKindError(
                    f"{what} {name!r} is provided by {_dist_of(ep)[0]} but disabled by "
                    f"{DISABLE_ENV}; remove it from that variable to use it"
                )
        for plugin in installed_plugins():
            if plugin.name == canonical and not plugin.disabled:
                return UnknownKindError(
                    f"plugin {plugin.distribution} (entry point {canonical!r}) registered no "
                    f"{what} called {name!r}"
                )
        known = sorted(self._available(what))
        hint = ", ".join(known) if known else "none"
        return UnknownKindError(
            f"unknown {what} {name!r}. Installed: {hint}. If it is a flagsink plugin, "
            f"install it: pip install flagsink-{canonical.lower()}"
        )

    def _available(self, what: str) -> set[str]:
        names = set(self._things[what])
        enabled = [p for p in installed_plugins() if not p.disabled]
        if what == "exporter":  # exporters declare a mode in `flagsink.modes`
            names |= {p.name for p in enabled if p.mode in ("bulk", "queue")}
        elif what == "format":  # by convention, entry points of formats declare no mode
            names |= {p.name for p in enabled if p.mode is None}
        return names


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry used by config loading and the CLI."""
    global _default
    if _default is None:
        _default = Registry()
    return _default
