"""Plugin discovery through entry points, tested with fake distributions made at test time.

Each test writes ``<name>-<version>.dist-info`` directories (METADATA, entry_points.txt)
and plugin modules into its own directory on ``sys.path``; ``importlib.metadata`` finds
them exactly as it finds installed packages, so nothing is installed.
"""

from __future__ import annotations

import importlib
import itertools
import json
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flagsink import plugins
from flagsink.config import ConfigError, load_config, parse_config
from flagsink.event import new_feature_event, new_tracking_event
from flagsink.exporters.file import FileExporter
from flagsink.exporters.log import LogExporter
from flagsink.pipeline import from_config
from flagsink.plugins import (
    DISABLE_ENV,
    DuplicateKindError,
    PluginLoadError,
    Registry,
    UnknownKindError,
    core_version,
    installed_plugins,
)

_counter = itertools.count()

EXPORTER_MODULE = """
    import flagsink
    from pydantic import Field
    from flagsink.exporter import Exporter, ExporterSettings

    class MemorySettings(ExporterSettings):
        bucket_name: str = Field(description="Where the events go.")

    class MemoryExporter(Exporter[MemorySettings]):
        kind = {kind!r}
        bulk = True
        settings_model = MemorySettings
        batches = []

        def export(self, events):
            MemoryExporter.batches.append((self.settings.bucket_name, list(events)))

    @flagsink.hookimpl
    def flagsink_register_exporters(register):
        register(MemoryExporter)
"""


@dataclass
class Site:
    """A directory on ``sys.path`` holding fake distributions and plugin modules."""

    root: Path
    modules: list[str] = field(default_factory=list)

    def unique(self, prefix: str) -> str:
        """A name no other test uses (modules stay in sys.modules across tests)."""
        return f"{prefix}{next(_counter)}_{self.root.parent.name[-6:].replace('-', '_')}"

    def module(self, name: str, source: str) -> str:
        (self.root / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        self.modules.append(name)
        return name

    def distribution(
        self,
        name: str,
        version: str,
        entry_points: dict[str, str],
        modes: dict[str, str] | None = None,
    ) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
        )
        text = "[flagsink]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        if modes:
            text += "\n[flagsink.modes]\n" + "".join(f"{k} = {v}\n" for k, v in modes.items())
        (info / "entry_points.txt").write_text(text, encoding="utf-8")
        importlib.invalidate_caches()

    def exporter_plugin(self, dist: str, version: str = "1.2.3", mode: str | None = None) -> str:
        """A distribution with one working exporter; returns its kind (= module name)."""
        kind = self.unique("mem")
        self.module(kind, EXPORTER_MODULE.format(kind=kind))
        self.distribution(dist, version, {kind: kind}, {kind: mode} if mode else None)
        return kind


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    root = tmp_path / "site-packages"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    importlib.invalidate_caches()
    made = Site(root)
    yield made
    for name in made.modules:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


@pytest.fixture
def fresh_default_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """File settings look formats up in the process-wide registry: give it a clean start."""
    monkeypatch.setattr(plugins, "_default", None)


def feature(user: str = "u1", flag: str = "flag-a") -> object:
    return new_feature_event(user, flag, True, "on", creation_date=1_700_000_000)


# -- built-ins ---------------------------------------------------------------------------


def test_builtins_are_listed_with_distribution_version_and_mode() -> None:
    listed = {p.name: p for p in installed_plugins() if p.distribution == "flagsink"}
    assert {"file", "log", "json", "csv", "parquet"} <= set(listed)
    assert listed["file"].mode == "bulk"
    assert listed["log"].mode == "queue"
    for name in ("json", "csv", "parquet"):
        assert listed[name].mode is None
    assert listed["file"].module == "flagsink.exporters.file"
    assert listed["csv"].module == "flagsink.formats.csv"
    assert all(p.version == core_version() for p in listed.values())
    assert not any(p.disabled for p in listed.values())


def test_builtins_load_through_entry_points() -> None:
    registry = Registry()
    assert registry.exporter("file") is FileExporter
    assert registry.exporter("log") is LogExporter
    assert registry.format("json").name == "json"
    assert registry.format("csv").extension == "csv"


def test_core_version_is_the_installed_distribution_version() -> None:
    from importlib import metadata

    assert core_version() == metadata.version("flagsink")


# -- a third-party exporter -----------------------------------------------------------------


def test_third_party_exporter_found_by_kind_and_usable_end_to_end(site: Site) -> None:
    kind = site.exporter_plugin("flagsink-memory", "2.0.1", mode="bulk")
    registry = Registry()
    cls = registry.exporter(kind)
    assert cls.kind == kind
    assert cls.__module__ == kind

    config = parse_config(
        {"exporters": [{"kind": kind, "bucketName": "bkt", "flushInterval": 60_000}]},
        source="inline",
        registry=registry,
    )
    assert config.exporters[0].exporter_class is cls
    pipeline = from_config(config)
    try:
        events = [feature(f"user-{i}") for i in range(5)]
        for event in events:
            pipeline.add_event(event)
        pipeline.add_event(new_tracking_event("u", "checkout"))  # feature exporter only
        assert pipeline.flush(10)
    finally:
        assert pipeline.close(10)
    delivered = [e for bucket, batch in cls.batches for e in batch if bucket == "bkt"]
    assert delivered == events


def test_third_party_settings_are_validated_with_paths(site: Site) -> None:
    kind = site.exporter_plugin("flagsink-memory")
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"exporters": [{"kind": kind, "bucketname": "x"}]},
            source="inline.yaml",
            registry=Registry(),
        )
    text = str(info.value)
    assert "exporters[0].bucketName: required" in text
    assert "exporters[0].bucketname: unknown key" in text
    assert "did you mean 'bucketName'" in text


def test_only_the_named_entry_point_is_imported(site: Site) -> None:
    good = site.unique("good")
    broken = site.unique("broken")
    site.module(good, EXPORTER_MODULE.format(kind=good))
    site.module(broken, "raise RuntimeError('this plugin must never be imported')\n")
    site.distribution("flagsink-pair", "0.3.0", {broken: broken, good: good})

    registry = Registry()
    assert registry.exporter(good).kind == good
    assert good in sys.modules
    assert broken not in sys.modules
    # and the same through a config naming only the good one
    config = parse_config({"exporter": {"kind": good, "bucketName": "b"}}, registry=Registry())
    assert config.exporters[0].scheduling.kind == good
    assert broken not in sys.modules


def test_import_failure_names_distribution_versions_and_cause(site: Site) -> None:
    kind = site.unique("boom")
    site.module(kind, "import flagsink\nraise ImportError('needs libfoo >= 9')\n")
    site.distribution("flagsink-boom", "4.5.6", {kind: kind})

    with pytest.raises(PluginLoadError) as info:
        Registry().exporter(kind)
    message = str(info.value)
    assert "flagsink-boom" in message
    assert "4.5.6" in message
    assert f"flagsink {core_version()}" in message
    assert "needs libfoo >= 9" in message
    assert f"{DISABLE_ENV}={kind}" in message


def test_import_failure_is_reported_by_config_at_the_kind(site: Site, tmp_path: Path) -> None:
    kind = site.unique("boom")
    site.module(kind, "raise ValueError('broken on import')\n")
    site.distribution("flagsink-boom", "4.5.6", {kind: kind})
    path = tmp_path / "c.yaml"
    path.write_text(f"exporters:\n  - kind: file\n    outputDir: out\n  - kind: {kind}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=Registry())
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:4: exporters[1].kind: plugin flagsink-boom 4.5.6")


def test_failed_plugin_keeps_failing_with_the_same_error(site: Site) -> None:
    kind = site.unique("boom")
    site.module(kind, "raise RuntimeError('boom at import')\n")
    site.distribution("flagsink-boom", "1.0", {kind: kind})
    registry = Registry()
    for _ in range(2):
        with pytest.raises(PluginLoadError, match="boom at import"):
            registry.exporter(kind)


def test_two_distributions_claiming_one_kind(site: Site) -> None:
    kind = site.unique("dup")
    one, two = f"{kind}_one", f"{kind}_two"
    for module in (one, two):
        site.module(module, EXPORTER_MODULE.format(kind=kind))
    site.distribution("flagsink-dup-one", "1.0.0", {kind: one})
    site.distribution("flagsink-dup-two", "2.0.0", {kind: two})

    registry = Registry()
    with pytest.raises(DuplicateKindError) as info:
        registry.exporter(kind)
    message = str(info.value)
    assert "flagsink-dup-one" in message
    assert "flagsink-dup-two" in message
    assert repr(kind) in message
    assert DISABLE_ENV in message
    # asking again must not quietly pick one of them
    with pytest.raises(DuplicateKindError):
        registry.exporter(kind)


def test_duplicate_resolved_by_disabling_one(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    kind = site.unique("dup")
    one, two = f"{kind}_one", f"{kind}_two"
    for module in (one, two):
        site.module(module, EXPORTER_MODULE.format(kind=kind))
    site.distribution("flagsink-dup-one", "1.0.0", {kind: one})
    site.distribution("flagsink-dup-two", "2.0.0", {kind: two})
    monkeypatch.setenv(DISABLE_ENV, "flagsink-dup-one")

    cls = Registry().exporter(kind)
    assert cls.__module__ == two
    assert one not in sys.modules


@pytest.mark.parametrize("block", ["distribution", "entry point"])
def test_disabled_plugin_is_blocked_with_a_clear_message(
    site: Site, monkeypatch: pytest.MonkeyPatch, block: str
) -> None:
    kind = site.exporter_plugin("flagsink-blocked", mode="queue")
    name = "flagsink-blocked" if block == "distribution" else kind
    monkeypatch.setenv(DISABLE_ENV, f"something-else, {name}")

    with pytest.raises(UnknownKindError) as info:
        Registry().exporter(kind)
    message = str(info.value)
    assert "flagsink-blocked" in message
    assert DISABLE_ENV in message
    assert "disabled" in message
    assert kind not in sys.modules

    listed = {p.name: p for p in installed_plugins()}
    assert listed[kind].disabled
    assert not listed["file"].disabled

    with pytest.raises(ConfigError) as config_info:
        parse_config({"exporter": {"kind": kind, "bucketName": "b"}}, registry=Registry())
    assert DISABLE_ENV in str(config_info.value)


def test_installed_plugins_reads_metadata_without_importing(site: Site) -> None:
    kind = site.unique("lazy")
    fmt = site.unique("lazyfmt")
    site.module(kind, "raise RuntimeError('installed_plugins must not import me')\n")
    site.module(fmt, "raise RuntimeError('installed_plugins must not import me')\n")
    site.distribution("flagsink-lazy", "0.9.1", {kind: kind, fmt: fmt}, {kind: "queue"})

    listed = {p.name: p for p in installed_plugins()}
    assert listed[kind].distribution == "flagsink-lazy"
    assert listed[kind].version == "0.9.1"
    assert listed[kind].mode == "queue"
    assert listed[kind].module == kind
    assert listed[fmt].mode is None
    assert listed[fmt].distribution == "flagsink-lazy"
    assert kind not in sys.modules
    assert fmt not in sys.modules
    # built-ins are still there, and the listing is sorted by name
    assert {"file", "log", "json", "csv", "parquet"} <= set(listed)
    names = [p.name for p in installed_plugins()]
    assert names == sorted(names)


def test_unknown_kind_lists_installed_kinds_including_plugins(site: Site) -> None:
    kind = site.exporter_plugin("flagsink-memory", mode="bulk")
    with pytest.raises(UnknownKindError) as info:
        Registry().exporter("snowflake")
    message = str(info.value)
    assert "unknown exporter 'snowflake'" in message
    assert "file" in message
    assert "log" in message
    assert kind in message
    assert "pip install flagsink-snowflake" in message
    assert kind not in sys.modules  # listing kinds imports nothing


def test_plugin_that_registers_nothing_for_its_kind(site: Site) -> None:
    kind = site.unique("empty")
    site.module(kind, "import flagsink\n")
    site.distribution("flagsink-empty", "1.0", {kind: kind})
    with pytest.raises(UnknownKindError) as info:
        Registry().exporter(kind)
    assert "flagsink-empty" in str(info.value)
    assert "registered no exporter" in str(info.value)


def test_class_without_kind_is_a_load_error(site: Site) -> None:
    kind = site.unique("nokind")
    site.module(
        kind,
        """
        import flagsink
        from flagsink.exporter import Exporter

        class Nameless(Exporter):
            def export(self, events):
                pass

        @flagsink.hookimpl
        def flagsink_register_exporters(register):
            register(Nameless)
        """,
    )
    site.distribution("flagsink-nokind", "1.0", {kind: kind})
    with pytest.raises(PluginLoadError) as info:
        Registry().exporter(kind)
    assert "flagsink-nokind" in str(info.value)
    assert "without a 'kind'" in str(info.value)


def test_misspelt_hook_name_is_a_load_error(site: Site) -> None:
    kind = site.unique("typo")
    site.module(
        kind,
        f"""
        import flagsink
        from flagsink.exporter import Exporter

        class Typo(Exporter):
            kind = {kind!r}
            def export(self, events):
                pass

        @flagsink.hookimpl
        def flagsink_register_exporter(register):
            register(Typo)
        """,
    )
    site.distribution("flagsink-typo", "1.0", {kind: kind})
    registry = Registry()
    with pytest.raises(PluginLoadError) as info:
        registry.exporter(kind)
    assert "unknown hook 'flagsink_register_exporter'" in str(info.value)
    assert "flagsink-typo 1.0" in str(info.value)
    with pytest.raises(PluginLoadError):  # and again: it stays broken
        registry.exporter(kind)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("def flagsink_register_exporters(registrar):\n    pass\n", "registrar"),
        ("def flagsink_register_exporters(register):\n    raise KeyError('oops')\n", "oops"),
    ],
    ids=["wrong-argument-name", "hook-raises"],
)
def test_bad_hook_implementation_is_a_load_error(site: Site, body: str, expected: str) -> None:
    kind = site.unique("badhook")
    site.module(kind, "import flagsink\n\n@flagsink.hookimpl\n" + body)
    site.distribution("flagsink-badhook", "3.1", {kind: kind})
    registry = Registry()
    with pytest.raises(PluginLoadError) as info:
        registry.exporter(kind)
    assert "flagsink-badhook" in str(info.value)
    assert expected in str(info.value)
    assert registry.exporter("log") is LogExporter


def test_broken_plugin_does_not_break_the_next_one(site: Site) -> None:
    typo = site.unique("typo")
    site.module(
        typo,
        """
        import flagsink

        @flagsink.hookimpl
        def flagsink_register_exportr(register):
            pass
        """,
    )
    site.distribution("flagsink-typo", "1.0", {typo: typo})
    good = site.exporter_plugin("flagsink-good")

    registry = Registry()
    with pytest.raises(PluginLoadError):
        registry.exporter(typo)
    assert registry.exporter(good).kind == good
    assert registry.exporter("file") is FileExporter


def test_partially_registering_plugin_is_not_served_after_failing(site: Site) -> None:
    kind = site.unique("half")
    site.module(
        kind,
        textwrap.dedent(EXPORTER_MODULE.format(kind=kind))
        + textwrap.dedent(
            """
            @flagsink.hookimpl
            def flagsink_register_stors(register):
                pass
            """
        ),
    )
    site.distribution("flagsink-half", "1.0", {kind: kind})
    registry = Registry()
    for _ in range(2):
        with pytest.raises(PluginLoadError, match="flagsink_register_stors"):
            registry.exporter(kind)


def test_register_plugin_in_code() -> None:
    from flagsink.exporter import Exporter
    from flagsink.hookspecs import hookimpl

    class CodeExporter(Exporter):  # type: ignore[type-arg]
        kind = "in-code"

        def export(self, events: object) -> None:
            pass

    class Plugin:
        @hookimpl
        def flagsink_register_exporters(self, register):  # type: ignore[no-untyped-def]
            register(CodeExporter)

    registry = Registry()
    registry.register_plugin(Plugin())
    assert registry.exporter("in-code") is CodeExporter


def test_aliases_resolve_to_installed_gcs_and_azureblob(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real plugins may be installed too (the `all` session): keep them out of the way.
    monkeypatch.setenv("FLAGSINK_DISABLE_PLUGINS", "flagsink-gcs,flagsink-azureblob")
    for canonical, alias, dist in (
        ("gcs", "googleStorage", "acme-gcs"),
        ("azureblob", "azureBlobStorage", "acme-azureblob"),
    ):
        module = site.unique(canonical)
        site.module(module, EXPORTER_MODULE.format(kind=canonical))
        site.distribution(dist, "1.0.0", {canonical: module})
        registry = Registry()
        cls = registry.exporter(alias)
        assert cls.kind == canonical
        assert registry.exporter(canonical) is cls
        config = parse_config({"exporter": {"kind": alias, "bucketName": "b"}}, registry=registry)
        assert config.exporters[0].exporter_class is cls


# -- a third-party format -------------------------------------------------------------------

FORMAT_MODULE = """
    import flagsink
    from flagsink.formats.base import Format

    class PipeFormat(Format):
        name = {name!r}
        extension = "pipe"

        def write(self, events, out):
            for event in events:
                out.write(f"{{event.key}}|{{event.user_key}}\\n".encode())
            return []

    @flagsink.hookimpl
    def flagsink_register_formats(register):
        register(PipeFormat)
"""


@pytest.mark.usefixtures("fresh_default_registry")
def test_format_plugin_usable_in_a_file_exporter(site: Site, tmp_path: Path) -> None:
    name = site.unique("pipe")
    site.module(name, FORMAT_MODULE.format(name=name))
    site.distribution("flagsink-pipe", "0.1.0", {name: name})
    assert Registry().format(name).name == name

    out = tmp_path / "out"
    path = tmp_path / "flagsink.yaml"
    path.write_text(
        f"exporter:\n  kind: file\n  format: {name}\n  outputDir: {json.dumps(str(out))}\n"
    )
    pipeline = from_config(load_config(path, registry=Registry()))
    try:
        pipeline.add_event(feature("alice", "new-ui"))
        pipeline.add_event(feature("bob", "dark-mode"))
        assert pipeline.flush(10)
    finally:
        assert pipeline.close(10)
    (written,) = out.glob("*.pipe")
    assert written.read_text() == "new-ui|alice\ndark-mode|bob\n"


@pytest.mark.usefixtures("fresh_default_registry")
def test_unknown_format_is_reported_at_the_format_key(site: Site, tmp_path: Path) -> None:
    path = tmp_path / "flagsink.yaml"
    path.write_text("exporter:\n  kind: file\n  outputDir: out\n  format: xlsx\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=Registry())
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:4: exporter.format: unknown format 'xlsx'")
    assert "pip install flagsink-xlsx" in problem
