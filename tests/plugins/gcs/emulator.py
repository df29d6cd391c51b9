"""gcp-storage-emulator with GCS's ``ifGenerationMatch`` precondition on uploads.

Run as ``python emulator.py [-d DIR] start --host H --port P ...`` (the emulator's own
command line). gcp-storage-emulator 2026.7.19 accepts ``ifGenerationMatch`` and ignores
it: a create-only upload (``ifGenerationMatch=0``) silently overwrites an existing object
(``test_plain_emulator_ignores_the_create_only_precondition`` keeps checking that).

This wrapper adds GCS's documented rule, and nothing else: an upload whose
``ifGenerationMatch`` differs from the live object's generation (0: no live object) is
refused with HTTP 412 ``conditionNotMet``. It checks when the upload starts (simple,
multipart, or the start of a resumable session) and again on each chunk of a resumable
upload: GCS does not document at which of these requests it evaluates a resumable
upload's condition, so the wrapper refuses at the earliest, and a session that another
writer overtakes fails at its next chunk. The client raises the same error either way.
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator import __main__ as cli
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_PRECONDITION_FAILED = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [
            {
                "domain": "global",
                "reason": "conditionNotMet",
                "message": "At least one of the pre-conditions you specified did not hold.",
                "locationType": "header",
                "location": "If-Match",
            }
        ],
    }
}


def _upload_name(request: Any) -> str | None:
    if "name" in request.query:
        return str(request.query["name"][0])
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta", data)
        if isinstance(meta, dict) and meta.get("name"):
            return str(meta["name"])
    return None


def _condition_fails(request: Any, storage: Any, bucket: str, name: str | None) -> bool:
    wanted = request.query.get("ifGenerationMatch")
    if not wanted or name is None:
        return False
    try:
        live = str(storage.get_file_obj(bucket, name).get("generation"))
    except NotFound:
        live = "0"
    return str(wanted[0]) != live


def _refuse(request: Any, response: Any) -> None:
    _ = request.data  # read the body, so the client gets the answer, not a broken pipe
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json(_PRECONDITION_FAILED)


def insert(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    """``objects.insert`` that honours ``ifGenerationMatch``."""
    starts_upload = "upload_id" not in request.query
    bucket = request.params["bucket_name"]
    if starts_upload and _condition_fails(request, storage, bucket, _upload_name(request)):
        return _refuse(request, response)
    return objects.insert(request, response, storage, *args, **kwargs)


def upload_partial(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
    """A resumable upload's chunk, refused once the name was taken by another writer."""
    upload_id = request.query.get("upload_id", [None])[0]
    try:
        name = storage.get_resumable_file_obj(upload_id)["name"] if upload_id else None
    except NotFound:
        name = None
    if _condition_fails(request, storage, request.params["bucket_name"], name):
        return _refuse(request, response)
    return objects.upload_partial(request, response, storage, *args, **kwargs)


def install() -> None:
    """Route uploads through the checks above."""
    for _pattern, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is objects.insert:
                handlers[method] = insert
            elif handler is objects.upload_partial:
                handlers[method] = upload_partial


if __name__ == "__main__":
    install()
    cli.main(sys.argv[1:])
