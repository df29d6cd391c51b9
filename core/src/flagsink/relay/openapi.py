"""The relay's OpenAPI 3.1 document, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from flagsink.relay.idempotency import HEADER, KEY_PATTERN, MAX_KEY_LENGTH, REPLAYED_HEADER

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ERROR}},
    }
    if headers:
        response["headers"] = headers
    return response


def openapi_document(version: str, *, secured: bool) -> dict[str, Any]:
    """The document; ``secured`` adds the API-key requirement to protected operations."""
    security: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}] if secured else []
    unauthorized = {"401": _error("Missing or wrong API key.")} if secured else {}
    string_or_null = {"type": ["string", "null"]}
    object_or_null = {"type": ["object", "null"]}
    event = {
        "type": "object",
        "description": "A GO Feature Flag FeatureEvent, or a TrackingEvent when kind is "
        "`tracking`. Events without `key` are rejected individually.",
        "properties": {
            "kind": string_or_null,
            "contextKind": string_or_null,
            "userKey": string_or_null,
            "creationDate": {"type": ["number", "null"], "description": "Seconds or ms."},
            "key": string_or_null,
            "variation": string_or_null,
            "value": {},
            "default": {"type": ["boolean", "null"]},
            "version": {"type": ["string", "number", "null"]},
            "source": string_or_null,
            "metadata": object_or_null,
            "evaluationContext": object_or_null,
            "trackingEventDetails": object_or_null,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "flagsink relay",
            "version": version,
            "description": "Collects feature-flag evaluation events (GO Feature Flag's "
            "collector protocol) and routes them to the configured exporters.",
        },
        "paths": {
            "/v1/data/collector": {
                "post": {
                    "operationId": "collectEvents",
                    "summary": "Ingest a batch of evaluation and tracking events.",
                    "security": security,
                    "parameters": [
                        {
                            "name": HEADER,
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_KEY_LENGTH,
                                "pattern": KEY_PATTERN,
                            },
                            "description": "A key unique to this request (e.g. a UUID), sent "
                            "again with each retry of it: a retry with the same key and body "
                            "within idempotencyTtl (600 s by default) gets the first 2xx "
                            "answer again and ingests nothing. Printable ASCII, 1-255 "
                            "characters, no space first or last.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/CollectorRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Events accepted (malformed ones listed).",
                            "headers": {
                                REPLAYED_HEADER: {
                                    "description": "`true` when this is the stored answer "
                                    f"of an earlier request with the same {HEADER}: "
                                    "nothing was ingested this time.",
                                    "schema": {"type": "string", "enum": ["true"]},
                                }
                            },
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/CollectorResponse"}
                                }
                            },
                        },
                        "400": _error(
                            f"Body is not JSON or has no `events` list, or {HEADER} is malformed."
                        ),
                        **unauthorized,
                        "409": _error(
                            f"A request with the same {HEADER} is still being processed; "
                            "nothing was ingested: retry shortly.",
                            {"Retry-After": {"schema": {"type": "string"}}},
                        ),
                        "413": _error("Body larger than maxBodyBytes."),
                        "422": _error(
                            f"The {HEADER} was already used with a different body; nothing "
                            "was ingested: use a new key for a new request."
                        ),
                        "503": _error(
                            "Exporter buffers are full; retry later.",
                            {"Retry-After": {"schema": {"type": "string"}}},
                        ),
                    },
                }
            },
            "/v1/flag/configuration": {
                "post": {
                    "operationId": "flagConfiguration",
                    "summary": "Flag configuration for in-process providers (GO Feature "
                    "Flag compatible), read from the configured store.",
                    "security": security,
                    "parameters": [
                        {
                            "name": "If-None-Match",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "The ETag of a previous answer: 304 if unchanged.",
                        }
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/FlagConfigRequest"}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "The flags asked for (all when none are named).",
                            "headers": {"ETag": {"schema": {"type": "string"}}},
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/FlagConfigResponse"}
                                }
                            },
                        },
                        "304": {"description": "Not modified since the ETag given."},
                        "400": _error("Body is not JSON or `flags` is not a list of strings."),
                        **unauthorized,
                        "404": _error("No `store:` is configured."),
                        "413": _error("Body larger than maxBodyBytes."),
                        "503": _error(
                            "The store cannot be read; retry later.",
                            {"Retry-After": {"schema": {"type": "string"}}},
                        ),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness.",
                    "responses": {
                        "200": {
                            "description": "Alive.",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"status": {"type": "string"}},
                                        "required": ["status"],
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/info": {
                "get": {
                    "operationId": "info",
                    "summary": "Version and installed kinds.",
                    "responses": {
                        "200": {
                            "description": "Relay information.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Info"}
                                }
                            },
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics.",
                    "security": security,
                    "responses": {
                        "200": {
                            "description": "Prometheus text format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **unauthorized,
                    },
                }
            },
            "/v1/status": {
                "get": {
                    "operationId": "status",
                    "summary": "Every exporter's accounting: accepted = delivered + dropped "
                    "+ pending, with the spool's and the relay's figures (this process).",
                    "security": security,
                    "responses": {
                        "200": {
                            "description": "The figures, one consistent snapshot per exporter.",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Status"}
                                }
                            },
                        },
                        **unauthorized,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Event": event,
                "CollectorRequest": {
                    "type": "object",
                    "required": ["events"],
                    "properties": {
                        "meta": object_or_null,
                        "events": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Event"},
                        },
                    },
                },
                "FlagConfigRequest": {
                    "type": "object",
                    "properties": {
                        "flags": {
                            "type": ["array", "null"],
                            "items": {"type": "string"},
                            "description": "Flag keys wanted; empty or absent = all.",
                        }
                    },
                },
                "FlagConfigResponse": {
                    "type": "object",
                    "required": ["flags", "evaluationContextEnrichment"],
                    "properties": {
                        "flags": {
                            "type": "object",
                            "additionalProperties": {"type": "object"},
                            "description": "Flag definitions by key, as in flag files.",
                        },
                        "evaluationContextEnrichment": {"type": "object"},
                    },
                },
                "CollectorResponse": {
                    "type": "object",
                    "required": ["ingestedContentCount", "rejectedContentCount", "rejected"],
                    "properties": {
                        "ingestedContentCount": {"type": "integer", "minimum": 0},
                        "rejectedContentCount": {"type": "integer", "minimum": 0},
                        "filteredContentCount": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Accepted events not exported: their flag has "
                            "`trackEvents: false` (included in ingestedContentCount).",
                        },
                        "rejected": {
                            "type": "array",
                            "description": "The first 100 rejected events.",
                            "items": {
                                "type": "object",
                                "required": ["index", "reason"],
                                "properties": {
                                    "index": {"type": "integer"},
                                    "reason": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "Info": {
                    "type": "object",
                    "required": ["version", "kinds", "exporters"],
                    "properties": {
                        "version": {"type": "string"},
                        "kinds": {"type": "array", "items": {"type": "string"}},
                        "exporters": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Status": _status_schema(),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            },
        },
    }


def _status_schema() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    counts = {"type": "object", "additionalProperties": count}
    exporter = {
        "type": "object",
        "description": "accepted == delivered + sum(dropped) + pending.",
        "required": ["name", "accepted", "delivered", "dropped", "pending", "balanced"],
        "properties": {
            "name": {"type": "string"},
            "accepted": {"type": "integer"},
            "delivered": {"type": "integer"},
            "dropped": {**counts, "description": "Events given up, by reason."},
            "pending": {"type": "integer", "description": "Waiting or being sent."},
            "buffered": {"type": "integer"},
            "inFlight": {"type": "integer"},
            "retried": {"type": "integer"},
            "failedAttempts": {"type": "integer"},
            "deadLettered": {"type": "integer"},
            "redelivered": {
                "type": "integer",
                "description": "With a spool: events sent again after a crash (possible "
                "duplicates).",
            },
            "lastError": {"type": ["string", "null"]},
            "lastErrorTime": {"type": ["number", "null"]},
            "spooled": {"type": "boolean"},
            "balanced": {
                "type": "boolean",
                "description": "The identity holds and no figure is negative.",
            },
        },
    }
    spool = {
        "type": ["object", "null"],
        "required": ["directory", "bytes", "maxBytes", "waiting", "commits", "refused", "damaged"],
        "properties": {
            "directory": {"type": "string"},
            "bytes": count,
            "maxBytes": count,
            "whenFull": {"type": "string", "enum": ["block", "dropOldest"]},
            "full": {"type": "boolean"},
            "waiting": {**count, "description": "Waiting for the next group commit."},
            "committed": {**counts, "description": "Last sequence number, by event type."},
            "commits": count,
            "refused": count,
            "damaged": count,
        },
    }
    relay = {
        "type": ["object", "null"],
        "description": "received == accepted + filtered + sum(rejected) + inProgress.",
        "properties": {
            "received": count,
            "accepted": count,
            "filtered": count,
            "rejected": counts,
            "inProgress": count,
        },
    }
    return {
        "type": "object",
        "required": ["version", "balanced", "exporters", "spool", "relay"],
        "properties": {
            "version": {"type": "string"},
            "balanced": {"type": "boolean", "description": "True when every exporter is."},
            "exporters": {"type": "array", "items": exporter},
            "spool": spool,
            "relay": relay,
        },
    }
