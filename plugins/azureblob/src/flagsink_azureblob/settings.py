"""Settings of the ``azureblob`` exporter."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from flagsink.exporters.objectstore import ObjectStoreSettings

__all__ = ["AzureBlobSettings", "connection_string_account"]

# https://learn.microsoft.com/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata
_CONTAINER = re.compile(r"^(?:\$root|\$web|[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62})$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")


class AzureBlobSettings(ObjectStoreSettings):
    """Settings of the ``azureblob`` exporter (GO Feature Flag: ``azureBlobStorage``)."""

    # Validation errors would otherwise quote the input, secrets included.
    model_config = ConfigDict(hide_input_in_errors=True)

    container: str = Field(
        description="Blob container the objects are written to; it must exist. 3-63 "
        "lowercase letters, digits and single hyphens.",
    )
    account_name: str | None = Field(
        None,
        description="Storage account name. Required unless `connectionString` is given.",
    )
    account_key: SecretStr | None = Field(
        None,
        description="Storage account access key. Without it (and without "
        "`connectionString`), `DefaultAzureCredential` is used: environment, workload or "
        "managed identity, Azure CLI... (install `flagsink-azureblob[identity]`).",
    )
    connection_string: SecretStr | None = Field(
        None,
        description="Storage connection string, instead of `accountName`/`accountKey`/"
        "`serviceUrl`; also the way to use a SAS (`BlobEndpoint=...;"
        "SharedAccessSignature=...`).",
    )
    service_url: str | None = Field(
        None,
        description="Blob service endpoint of the account (default "
        "`https://<accountName>.blob.core.windows.net`), e.g. "
        "`http://127.0.0.1:10000/devstoreaccount1` for Azurite.",
    )
    timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds to wait for a connection or a response, per request; a "
        "request that times out fails the export, which is retried.",
    )

    @field_validator("container")
    @classmethod
    def _valid_container(cls, name: str) -> str:
        if not _CONTAINER.match(name):
            raise ValueError(
                f"{name!r} is not a valid container name: use 3-63 lowercase letters, "
                "digits and single hyphens, starting and ending with a letter or digit"
            )
        return name

    @field_validator("account_name")
    @classmethod
    def _valid_account(cls, name: str | None) -> str | None:
        if name is not None and not _ACCOUNT.match(name):
            raise ValueError(
                f"{name!r} is not a valid storage account name: use 3-24 lowercase "
                "letters and digits"
            )
        return name

    @field_validator("service_url")
    @classmethod
    def _valid_service_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                "must not carry a query, credentials or fragment; give a SAS token in "
                "`connectionString` (BlobEndpoint=...;SharedAccessSignature=...)"
            )
        return url.rstrip("/")

    @field_validator("account_key", "connection_string")
    @classmethod
    def _not_blank(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and not secret.get_secret_value().strip():
            raise ValueError("must not be empty")
        return secret

    @model_validator(mode="after")
    def _one_way_to_connect(self) -> AzureBlobSettings:
        if self.connection_string is None:
            if self.account_name is None:
                raise ValueError("accountName is required (or give connectionString)")
            return self
        for key, value in (("accountKey", self.account_key), ("serviceUrl", self.service_url)):
            if value is not None:
                raise ValueError(
                    f"give either connectionString or {key}, not both: the connection "
                    "string already holds the endpoint and the credential"
                )
        named = connection_string_account(self.connection_string.get_secret_value())
        if self.account_name is not None and named is not None and named != self.account_name:
            raise ValueError(
                f"accountName {self.account_name!r} differs from the AccountName in "
                "connectionString"
            )
        return self


def connection_string_account(connection_string: str) -> str | None:
    """The ``AccountName`` a connection string states, if any (nothing else is read)."""
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == "accountname":
            return value.strip() or None
    return None
