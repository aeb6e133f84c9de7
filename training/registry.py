"""The model registry: every model or adapter version with its model card (a directory or any
fsspec URL — a shared volume or an object store in production).

Layout::

    <registry>/<name>/versions/<version>/artifact/   the adapter (adapter_config.json + weights)
                                                     or the full model (config.json + weights)
    <registry>/<name>/versions/<version>/card.json   the model card (``ModelCard``)
    <registry>/<name>/current.json                   the promoted version, and its history

``version`` is the artifact's content version (``rsafe.models.versions.artifact_version``): the
same weights register once. Nothing is ever deleted: a rejected candidate stays, marked.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rsafe.models.artifacts import local_copy
from rsafe.models.versions import artifact_version
from rsafe.schemas.common import utcnow

Status = Literal["candidate", "promoted", "rejected", "retired"]


class GateResult(BaseModel):
    """The promotion gate's decision and everything it was based on."""

    model_config = ConfigDict(extra="forbid")

    accepted: bool
    reasons: list[str]
    """Why (each criterion, passed or failed)."""
    against: str | None = None
    """``name@version`` (or ``base``) the candidate was compared with."""
    candidate_metrics: dict[str, Any] = {}
    current_metrics: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    decided_at: datetime = Field(default_factory=utcnow)


class ModelCard(BaseModel):
    """What a registered version is, where it came from, how it was measured."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str
    kind: Literal["lora", "full"]
    base_model: str | None = None
    """The backbone a LoRA adapter applies to (path or hub id)."""
    base_version: str | None = None
    parent_version: str | None = None
    """The version this one was trained from (None: trained from the base)."""
    training: dict[str, Any] = {}
    """Dataset manifest hash and size, the training config and summary."""
    gate: GateResult | None = None
    status: Status = "candidate"
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None
    promoted_by: str | None = None
    history: list[dict[str, Any]] = []
    """Events: registered, gated, promoted, rolled back, retired (with who and when)."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


class Registry:
    """Model and adapter versions under one root (local path or fsspec URL)."""

    def __init__(self, root: str | Path):
        import fsspec

        from fsspec.implementations.local import LocalFileSystem

        self.url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)

    # ------------------------------------------------------------------ paths

    def _dir(self, name: str, version: str | None = None) -> str:
        base = f"{self.root.rstrip('/')}/{name}"
        return base if version is None else f"{base}/versions/{version}"

    def artifact_uri(self, name: str, version: str) -> str:
        """Where workers load the artifact from (a local path, or the fsspec URL)."""
        path = f"{self._dir(name, version)}/artifact"
        return path if self.local else self.fs.unstrip_protocol(path)

    # ------------------------------------------------------------------ writes

    def register(self, artifact: str | Path, name: str, *, kind: Literal["lora", "full"], base_model: str | None = None,
                 parent_version: str | None = None, training: dict[str, Any] | None = None) -> ModelCard:
        """Copy ``artifact`` into the registry as a candidate version of ``name`` (idempotent)."""
        artifact = Path(artifact)
        marker = "adapter_config.json" if kind == "lora" else "config.json"
        if not (artifact / marker).is_file():
            raise RegistryError(f"{artifact}: not a {kind} artifact (no {marker})")
        version = artifact_version(artifact)
        if version is None:
            raise RegistryError(f"{artifact}: cannot compute its content version")
        if self.exists(name, version):
            return self.card(name, version)
        card = ModelCard(name=name, version=version, kind=kind, base_model=base_model,
                         base_version=artifact_version(base_model) if base_model else None,
                         parent_version=parent_version, training=training or {},
                         history=[{"event": "registered", "at": utcnow().isoformat(), "from": str(artifact)}])
        target = self._dir(name, version)
        self.fs.makedirs(f"{target}/artifact", exist_ok=True)
        for f in sorted(artifact.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                self.fs.put_file(str(f), f"{target}/artifact/{f.name}")
        self.save(card)
        return card

    def save(self, card: ModelCard) -> None:
        self._write(f"{self._dir(card.name, card.version)}/card.json", card.model_dump_json(indent=2))

    def _write(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, path)

    def set_current(self, card: ModelCard, by: str | None, *, rollback: bool = False) -> None:
        """Make ``card`` the promoted version of its name (the history keeps the previous ones)."""
        now = utcnow()
        previous = self.current_version(card.name)
        if previous and previous != card.version:
            old = self.card(card.name, previous)
            old.status = "retired"
            old.history.append({"event": "retired", "at": now.isoformat(), "by": by, "replaced_by": card.version})
            self.save(old)
        card.status, card.promoted_at, card.promoted_by = "promoted", now, by
        card.history.append({"event": "rolled back to" if rollback else "promoted", "at": now.isoformat(), "by": by})
        self.save(card)
        state = self._current(card.name)
        state["version"] = card.version
        state.setdefault("history", []).append({"version": card.version, "at": now.isoformat(), "by": by,
                                                "rollback": rollback})
        self._write(f"{self._dir(card.name)}/current.json", json.dumps(state, indent=2))

    # ------------------------------------------------------------------ reads

    def exists(self, name: str, version: str) -> bool:
        return self.fs.exists(f"{self._dir(name, version)}/card.json")

    def card(self, name: str, version: str) -> ModelCard:
        path = f"{self._dir(name, version)}/card.json"
        if not self.fs.exists(path):
            known = ", ".join(c.version for c in self.cards(name)) or "none"
            raise RegistryError(f"no version {version!r} of {name!r} in {self.url} (known: {known})")
        with self.fs.open(path) as f:
            return ModelCard.model_validate_json(f.read())

    def _current(self, name: str) -> dict[str, Any]:
        path = f"{self._dir(name)}/current.json"
        if not self.fs.exists(path):
            return {}
        with self.fs.open(path) as f:
            return json.loads(f.read())

    def current_version(self, name: str) -> str | None:
        return self._current(name).get("version")

    def names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self.root, detail=False)
                      if self.fs.isdir(p) and self.fs.exists(f"{p}/versions"))

    def cards(self, name: str) -> list[ModelCard]:
        base = f"{self._dir(name)}/versions"
        if not self.fs.exists(base):
            return []
        out = []
        for p in self.fs.ls(base, detail=False):
            if self.fs.exists(f"{p}/card.json"):
                with self.fs.open(f"{p}/card.json") as f:
                    out.append(ModelCard.model_validate_json(f.read()))
        return sorted(out, key=lambda c: c.created_at)

    def resolve(self, ref: str) -> ModelCard:
        """``name@version``, ``name@current`` or ``name`` (the current version)."""
        name, _, version = ref.partition("@")
        if not version or version == "current":
            version = self.current_version(name) or ""
            if not version:
                raise RegistryError(f"{name!r} has no promoted version in {self.url}")
        return self.card(name, version)

    def local_artifact(self, name: str, version: str, cache_dir: str | Path = ".cache/registry") -> Path:
        """A local directory holding the artifact (downloaded from a remote registry once)."""
        return local_copy(self.artifact_uri(name, version), Path(cache_dir) / name, version)
