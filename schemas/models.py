"""The model control record: which version of an adapter (or a full model) workers must serve.

Published by ``rsafe train promote`` on the compacted ``rsafe.models`` topic, key = the adapter
name topics use in ``inputs[].adapter`` (or the model name of full weights); read by every worker
outside its consumer group, from the start of the topic, so a new worker sees the current version.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rsafe.schemas.common import SCHEMA_VERSION, utcnow

class ModelControlRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    """The adapter name (``inputs[].adapter``) or the full model's registered name."""
    version: str
    """Content version of the artifact (``rsafe.models.versions.artifact_version``)."""
    kind: Literal["lora", "full"]
    uri: str
    """Where the artifact is: a local path or an fsspec URL of the registry."""
    base_model: str | None = None
    base_version: str | None = None
    promoted_at: datetime = Field(default_factory=utcnow)
    promoted_by: str | None = None
    rollback: bool = False
    """An earlier version promoted again."""
