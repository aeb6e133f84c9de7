"""Reading and writing the wire records (``rsafe.schemas.records``) on the worker's hot path:
input bytes → ``ChatEvent`` or ``Rejected`` (→ DLQ), and records → UTF-8 JSON.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import Enum
from typing import Any

import msgspec
from pydantic import BaseModel, ValidationError

from rsafe.schemas.records import ChatEvent, DLQReason

# --------------------------------------------------------------------------- decoding


class Rejected(Exception):
    """An input message that cannot be moderated (→ DLQ)."""

    def __init__(self, reason: DLQReason, detail: str, event_id: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.event_id = reason, detail, event_id


def _schema_detail(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in err.errors())


def decode_event(value: bytes | None, *, max_bytes: int) -> ChatEvent:
    """Bytes from an input topic → ``ChatEvent``, or ``Rejected`` saying why not."""
    if value is None or not value.strip():
        raise Rejected(DLQReason.EMPTY, "empty message (null or blank value)")
    if len(value) > max_bytes:
        raise Rejected(DLQReason.TOO_LARGE, f"message is {len(value)} bytes, over the limit of {max_bytes}")
    try:
        data = _DECODER.decode(value)
    except msgspec.DecodeError:  # what json accepts and msgspec does not (lone surrogates, NaN) stays valid
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise Rejected(DLQReason.NOT_JSON, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise Rejected(DLQReason.SCHEMA, f"expected a JSON object, got {type(data).__name__}")
    raw_id = data.get("id")
    event_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    try:
        return ChatEvent.model_validate(data)
    except ValidationError as err:
        raise Rejected(DLQReason.SCHEMA, f"schema violation: {_schema_detail(err)}", event_id) from None


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


def encode(fields: dict[str, Any]) -> bytes:
    """A record built as a plain dict (the hot path) → UTF-8 JSON, as ``dumps`` writes it: datetimes
    in ISO 8601 with ``Z``; text with lone surrogates \\u-escaped."""
    try:
        return _ENCODER.encode(fields)
    except UnicodeEncodeError:
        return json.dumps(fields, ensure_ascii=True, default=_json_default).encode("ascii")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(record: BaseModel) -> bytes:
    """UTF-8 JSON. Text with lone surrogates (legal in JSON input) is written \\u-escaped."""
    try:
        return record.model_dump_json().encode("utf-8")
    except (ValueError, UnicodeError):
        return json.dumps(record.model_dump(mode="json"), ensure_ascii=True).encode("ascii")
