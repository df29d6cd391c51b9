"""The docs cannot drift from the code: generated tables, examples and the CLI page."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field, SecretStr

from flagsink import docgen
from flagsink.cli import main as cli_main
from flagsink.config import FLAGSINK_KEYS, GOFF_IGNORED_KEYS, SchedulingSettings
from flagsink.plugins import default_registry, installed_plugins

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = DOCS / "pages"


def _markdown_files() -> list[Path]:
    files = [
        *PAGES.glob("**/*.md"),
        *ROOT.glob("README.md"),
        *ROOT.glob("core/README.md"),
        *ROOT.glob("plugins/*/README.md"),
    ]
    return sorted(files)


def _code_blocks(page: Path, language: str) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


# -- generated tables ---------------------------------------------------------------------


def test_settings_tables_in_docs_and_readmes_are_current() -> None:
    files = _markdown_files()
    assert PAGES / "configuration.md" in files
    stale = []
    # Pages of plugins not installed here are checked where they are (`nox -s docs`, `all`).
    names = {p.name for p in installed_plugins()}
    known = names | {f"store:{name}" for name in names} | {"common", "service", "spool"}
    for path in files:
        text = path.read_text(encoding="utf-8")
        named = set(re.findall(r"<!-- settings-table: (\S+) -->", text))
        if not named <= known:
            continue
        if docgen.render_markers(text, source=str(path)) != text:
            stale.append(str(path.relative_to(ROOT)))
    assert not stale, f"stale settings tables; run: python -m flagsink.docgen --write {stale}"


@pytest.mark.parametrize(
    ("page", "kind"),
    [
        ("configuration.md", "common"),
        ("configuration.md", "spool"),
        ("exporters/file.md", "file"),
        ("exporters/log.md", "log"),
    ],
)
def test_reference_pages_hold_their_generated_table(page: str, kind: str) -> None:
    text = (PAGES / page).read_text(encoding="utf-8")
    assert f"<!-- settings-table: {kind} -->\n\n{docgen.exporter_table(kind)}\n\n" in text


def _exporter_kinds() -> list[str]:
    kinds = {"file", "log"}
    kinds |= {p.name for p in installed_plugins() if p.mode in ("bulk", "queue") and not p.disabled}
    return sorted(kinds)


@pytest.mark.parametrize("kind", _exporter_kinds())
def test_every_exporter_setting_has_a_description(kind: str) -> None:
    model = default_registry().exporter(kind).settings_model
    missing = [name for name, info in model.model_fields.items() if not info.description]
    assert not missing, f"exporter {kind!r}: fields without description: {missing}"


def test_every_common_key_has_a_description() -> None:
    fields = SchedulingSettings.model_fields
    assert [name for name, info in fields.items() if not info.description] == []


class _Sample(BaseModel):
    model_config = {"alias_generator": lambda name: name.replace("_", "-")}

    required_path: str = Field(description="Where | it goes.")
    mode: Literal["fast", "safe"] = Field("safe", description="How `a|b` runs.")
    limit: int | None = Field(None, description="Optional cap.")
    token: SecretStr = Field(SecretStr("s3cret"), description="A secret.")
    tags: list[str] = Field(default_factory=lambda: ["a"], description="Tags.")
    labels: dict[str, int] = Field(default_factory=dict, description="Labels.")
    template: str = Field("x`y\n", description="Has a backtick and a newline.")
    ratio: float = Field(0.5)
    enabled: bool = Field(True)


def test_settings_table_renders_each_kind_of_field() -> None:
    lines = docgen.settings_table(_Sample).splitlines()
    assert lines[:2] == ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    assert lines[2:] == [
        "| `required-path` | string | required | Where \\| it goes. |",
        "| `mode` | `fast` or `safe` | `safe` | How <code>a&#124;b</code> runs. |",
        "| `limit` | integer | unset | Optional cap. |",
        "| `token` | string (secret) | hidden | A secret. |",
        '| `tags` | list of string | `["a"]` | Tags. |',
        "| `labels` | mapping of integer | `{}` | Labels. |",
        "| `template` | string | `` x`y\\n `` | Has a backtick and a newline. |",
        "| `ratio` | number | `0.5` |  |",
        "| `enabled` | boolean | `true` |  |",
    ]
    assert "s3cret" not in "\n".join(lines)


def test_exporter_table_lists_kind_own_keys_then_common_keys() -> None:
    keys = [
        line.split("|")[1].strip().strip("`")
        for line in docgen.exporter_table("file").splitlines()[2:]
    ]
    common = [info.alias for info in SchedulingSettings.model_fields.values()]
    model = default_registry().exporter("file").settings_model
    own = [info.alias for info in model.model_fields.values()]
    assert keys == ["kind", *own, *[key for key in common if key != "kind"]]


# -- the docgen command -------------------------------------------------------------------


def test_render_markers_fills_tables_and_leaves_code_examples_alone() -> None:
    text = (
        "# Page\n\n<!-- settings-table: log -->\nold table\n<!-- /settings-table -->\n\n"
        "```markdown\n<!-- settings-table: log -->\n<!-- /settings-table -->\n```\n"
    )
    fresh = docgen.render_markers(text)
    table = docgen.exporter_table("log")
    assert fresh == (
        f"# Page\n\n<!-- settings-table: log -->\n\n{table}\n\n<!-- /settings-table -->\n\n"
        "```markdown\n<!-- settings-table: log -->\n<!-- /settings-table -->\n```\n"
    )
    assert docgen.render_markers(fresh) == fresh


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- settings-table: log -->\n", "needs one `<!-- /settings-table -->`"),
        ("<!-- /settings-table -->\n", "needs one `<!-- /settings-table -->`"),
        ("<!-- settings-table: nosuchkind -->\n<!-- /settings-table -->", "'nosuchkind'"),
    ],
)
def test_render_markers_rejects_broken_markers(text: str, message: str) -> None:
    with pytest.raises(docgen.DocgenError, match=re.escape(message)) as caught:
        docgen.render_markers(text, source="page.md")
    assert str(caught.value).startswith("page.md: ")


def test_docgen_main_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "stale.md"
    stale.write_text("<!-- settings-table: common -->\n<!-- /settings-table -->\n")
    plain = tmp_path / "plain.md"
    plain.write_text("# nothing generated here\n")

    assert docgen.main(["--check", str(stale), str(plain)]) == 1
    out, err = capsys.readouterr()
    assert out == f"stale: {stale}\n"
    assert f"--write {stale}" in err
    assert "|---|" not in stale.read_text()

    assert docgen.main(["--write", str(stale), str(plain)]) == 0
    assert capsys.readouterr().out == f"updated: {stale}\n"
    assert docgen.settings_table(SchedulingSettings) in stale.read_text()
    assert plain.read_text() == "# nothing generated here\n"

    assert docgen.main(["--check", str(stale), str(plain)]) == 0
    assert capsys.readouterr().out == ""


def test_docgen_main_reports_bad_files_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.md"
    broken.write_text("<!-- settings-table: file -->\n")
    assert docgen.main(["--check", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {broken}: ")
    assert docgen.main(["--check", str(tmp_path / "missing.md")]) == 2


def test_docgen_runs_as_a_module(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- settings-table: common -->\n<!-- /settings-table -->\n")
    run = subprocess.run(
        [sys.executable, "-m", "flagsink.docgen", "--check", str(page)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (run.returncode, run.stdout) == (1, f"stale: {page}\n")


# -- the pages say what the code does -----------------------------------------------------


def test_configuration_page_names_every_accepted_top_level_key() -> None:
    text = (PAGES / "configuration.md").read_text(encoding="utf-8")
    keys = sorted(GOFF_IGNORED_KEYS | FLAGSINK_KEYS)
    missing = [key for key in keys if f"`{key}`" not in text and f"`{key}:`" not in text]
    assert not missing


def test_cli_page_documents_every_command_and_option() -> None:
    text = (PAGES / "cli.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^## `flagsink (\w+)", text, re.MULTILINE))
    assert documented == set(cli_main.commands)  # type: ignore[attr-defined]
    commands: list[Any] = [cli_main, *cli_main.commands.values()]  # type: ignore[attr-defined]
    for command in commands:
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if flag.startswith("-") and flag not in ("-h", "--help"):
                    assert f"`{flag}" in text, f"{command.name} {flag} is not in cli.md"


def _run_cli(args: list[str]) -> Any:
    return CliRunner().invoke(cli_main, args, catch_exceptions=False)


def test_getting_started_tour_runs_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = PAGES / "getting-started.md"
    library, pipeline = _code_blocks(page, "python")
    (config,) = _code_blocks(page, "yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flagsink.yaml").write_text(config)
    for number, code in enumerate([library, pipeline]):
        (tmp_path / f"step{number}.py").write_text(code)
        run = subprocess.run(
            [sys.executable, f"step{number}.py"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    csv_file, json_file = sorted(
        (tmp_path / "flag-events").iterdir(), key=lambda p: p.suffix, reverse=False
    )
    assert csv_file.suffix == ".csv"
    assert csv_file.read_text().split(";")[:3] == ["feature", "user", "user-42"]
    assert json_file.suffix == ".json"
    assert '"key":"new-checkout"' in json_file.read_text()
    assert 'flag="checkout-completed", value=""' in run.stderr
    assert run.stdout == "file 1 0\nlog 1 0\n"

    text = page.read_text(encoding="utf-8")
    validate = _run_cli(["validate", "flagsink.yaml"])
    assert validate.exit_code == 0
    assert f"$ flagsink validate flagsink.yaml\n{validate.stdout}" in text
    events = DOCS / "examples" / "events.jsonl"
    export = _run_cli(["export", "--config", "flagsink.yaml", "--no-progress", str(events)])
    assert export.exit_code == 0, export.stderr
    assert f"$ flagsink export --config flagsink.yaml events.jsonl\n{export.stderr}" in text


def test_cli_page_examples_match_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (PAGES / "cli.md").read_text(encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "events.jsonl"
    bad.write_text('{"kind":"feature","key":"a"}\nnot json\n{"userKey":"x"}\n')
    (tmp_path / "c.yaml").write_text(f"exporter:\n  kind: file\n  outputDir: {tmp_path}/out\n")
    result = _run_cli(["export", "--config", "c.yaml", "--no-progress", "events.jsonl"])
    assert result.exit_code == 1
    for line in result.stderr.splitlines()[:2]:
        assert line in text


def test_configuration_page_error_example_matches_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = PAGES / "configuration.md"
    text = page.read_text(encoding="utf-8")
    config = next(block for block in _code_blocks(page, "yaml") if "fromat" in block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVENTS_DIR", raising=False)
    (tmp_path / "flagsink.yaml").write_text(config)
    result = _run_cli(["validate", "flagsink.yaml"])
    assert result.exit_code == 2
    # The page shows a core-only install; plugins installed here would lengthen the list.
    shown = re.sub(r"Installed: [^.]*\.", "Installed: file, log.", result.stderr)
    assert f"```text\n{shown}```" in text


def test_cli_export_never_drops_events_for_lack_of_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cli.md: "before any exporter's buffer would pass its cap, reading pauses".
    monkeypatch.chdir(tmp_path)
    events = DOCS / "examples" / "events.jsonl"
    (tmp_path / "many.jsonl").write_bytes(events.read_bytes() * 150)
    (tmp_path / "small.yaml").write_text(
        "exporter:\n  kind: log\n  maxEventInMemory: 5\n  maxBufferedEvents: 5\n"
    )
    result = _run_cli(["export", "--config", "small.yaml", "--no-progress", "many.jsonl"])
    assert result.stderr == "3000 lines: 3000 accepted, 0 rejected; log: 3000 exported; 0 lost\n"
    assert result.exit_code == 0


# -- the site builds ----------------------------------------------------------------------


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mkdocs is not installed, and under CI=true the docs build must run")
        pytest.skip("mkdocs is not installed (it is in the `test` dependency group)")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(DOCS / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for page in ["index.html", "configuration/index.html", "exporters/file/index.html"]:
        assert (tmp_path / "site" / page).is_file()
    reference = (tmp_path / "site" / "exporters" / "file" / "index.html").read_text()
    assert "<td><code>outputDir</code></td>" in reference


def test_store_marker_renders_the_store_settings() -> None:
    table = docgen.exporter_table("store:file")
    assert table == docgen.store_table("file")
    lines = table.splitlines()
    assert lines[2] == "| `kind` | string | required | Always `file` for this store. |"
    keys = [line.split("|")[1].strip() for line in lines[2:]]
    assert keys == ["`kind`", "`path`", "`pollInterval`", "`cacheTTL`"]
    text = "x\n<!-- settings-table: store:file -->\nold\n<!-- /settings-table -->\n"
    rendered = docgen.render_markers(text)
    assert f"<!-- settings-table: store:file -->\n\n{table}\n\n<!-- /settings-table -->" in rendered
    with pytest.raises(docgen.DocgenError, match="store:nope"):
        docgen.render_markers("<!-- settings-table: store:nope -->\n<!-- /settings-table -->")


def test_every_store_setting_has_a_description() -> None:
    model = default_registry().store("file").settings_model
    assert [name for name, info in model.model_fields.items() if not info.description] == []
