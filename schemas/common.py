"""What every record of the Kafka contract shares: the schema version and the clock."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel

SCHEMA_VERSION = 1
"""Version of every record's shape. Adding an optional field (with a default) keeps the version:
readers must ignore fields they do not know. Removing or changing a field bumps it."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Versioned(BaseModel):
    """A wire record: ``schema_version`` first."""

    schema_version: Literal[1] = SCHEMA_VERSION
