"""Developer and CI sessions. `nox` runs the default set; `nox -s bench` runs benchmarks.

Every session installs into its own uv virtualenv, constrained to the versions pinned in
uv.lock, so a run on a fresh machine uses exactly what the developers tested.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "docs", "core", "plugin", "e2e"]

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PLUGINS = sorted(path.parent.name for path in ROOT.glob("plugins/*/pyproject.toml"))
CORE = "./core[parquet,testing,relay,openfeature,launchdarkly]"


def _constraints(session: nox.Session) -> list[str]:
    """`-c <file>` pinning every package to its uv.lock version."""
    target = Path(session.create_tmp()) / "constraints.txt"
    session.run_install(
        "uv",
        "export",
        "--frozen",
        "--all-packages",
        "--all-groups",
        "--all-extras",
        "--no-hashes",
        "--no-emit-workspace",
        "--no-header",
        "--quiet",
        "-o",
        str(target),
        external=True,
        silent=True,
    )
    return ["-c", str(target)]


def _install(session: nox.Session, *args: str, groups: tuple[str, ...] = ()) -> None:
    requirements = [
        req for group in groups for req in nox.project.dependency_groups(PYPROJECT, group)
    ]
    session.install(*_constraints(session), *args, *requirements)


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("pytest", *paths, *session.posargs, env={"CI": os.environ.get("CI", "")})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    _install(session, groups=("lint",))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on core and on every plugin's source."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("lint",))
    session.run("mypy", "core/src", *[f"plugins/{name}/src" for name in PLUGINS])


@nox.session
def core(session: nox.Session) -> None:
    """Core tests with no plugin installed (end-to-end tests needing plugins: `e2e`)."""
    _install(session, "-e", CORE, groups=("test",))
    _pytest(session, "tests/core", "tests/e2e", "--ignore=tests/e2e/plugins")


@nox.session
@nox.parametrize("name", PLUGINS or ["(none)"])
def plugin(session: nox.Session, name: str) -> None:
    """One plugin's tests with only core and that plugin installed (proves isolation)."""
    if name == "(none)":
        session.skip("no plugins under plugins/ yet")
    _install(session, "-e", CORE, "-e", _plugin(name), groups=("test",))
    _pytest(session, f"tests/plugins/{name}")


@nox.session
def e2e(session: nox.Session) -> None:
    """End-to-end tests across core and plugins (relay, stores, exporters, GO Feature Flag's
    provider), with core and every plugin installed."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("test",))
    _pytest(session, "tests/e2e/plugins")


@nox.session(name="all")
def all_(session: nox.Session) -> None:
    """Every test with core and every plugin installed together."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("test",))
    _pytest(session, "tests")


@nox.session
def faults(session: nox.Session) -> None:
    """The long fault-suite variants (crash trials per sink, 10-minute outage, more
    hypothesis examples), with core and every plugin installed: `nox -s faults`."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("test",))
    session.run(
        "pytest",
        "tests",
        "-m",
        "long",
        *session.posargs,
        env={"CI": os.environ.get("CI", "")},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks beside their peers (figures, not pass/fail): `nox -s bench -- --quick`."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("bench", "test"))
    for script in sorted(ROOT.glob("tests/benchmarks/bench_*.py")):
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Settings tables in sync with the models, then a strict mkdocs build."""
    _install(session, "-e", CORE, *_plugin_args(), groups=("docs",))
    session.run("python", "-m", "flagsink.docgen", "--check", *_markdown_files())
    session.run("mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", session.create_tmp())


def _plugin(name: str) -> str:
    """``./plugins/<name>`` with every optional extra it declares."""
    project = nox.project.load_toml(ROOT / "plugins" / name / "pyproject.toml")["project"]
    extras = ",".join(sorted(project.get("optional-dependencies", {})))
    return f"./plugins/{name}[{extras}]" if extras else f"./plugins/{name}"


def _plugin_args() -> list[str]:
    return [arg for name in PLUGINS for arg in ("-e", _plugin(name))]


def _markdown_files() -> list[str]:
    files = [*ROOT.glob("docs/pages/**/*.md"), *ROOT.glob("plugins/*/README.md")]
    return sorted(str(path.relative_to(ROOT)) for path in files)
