"""Fixtures of the dynamodb plugin's tests: fake AWS credentials and a moto server.

The helpers live in dynamodb_moto_server.py (a unique module name: several plugin test
folders have a conftest.py, so `from conftest import ...` would be ambiguous).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from dynamodb_moto_server import ACCESS_KEY, SECRET_KEY, MotoServer


@pytest.fixture(scope="module", autouse=True)
def aws_environment() -> Iterator[None]:
    """Fake credentials for boto3's default chain; nothing read from the user's
    ~/.aws, and no instance-metadata lookups leaving this machine. Module-scoped, so the
    environment is restored before other folders' tests run."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield


@pytest.fixture(scope="session")
def dynamodb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto-dynamodb") / "moto.log")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot start the moto DynamoDB server: {exc}")
        pytest.skip(f"cannot start the moto DynamoDB server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def table(dynamodb_server: MotoServer) -> str:
    """A new table in LaunchDarkly's layout, for this test alone."""
    return dynamodb_server.new_table()
