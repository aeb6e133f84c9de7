"""Verdict cache: an interrupted evaluation resumes without recomputing what it already judged.

One JSONL file per *run identity* — model id (and the content version of a local model
directory), adapter and its content version, policy version, generation settings and input limits — under the cache directory
(``.cache/eval/`` by default). Each line holds one verdict under its *example key*: the sha256 of
the example id and the hash of the content shown to the guard (level, prompt, response). A line
is appended (and flushed) after every batch, so a killed run loses at most the batch in flight;
a torn last line is ignored on reading. ``error`` verdicts are never cached (they are retried).

The identity also goes to ``<file>.meta.json`` for humans: ``ls .cache/eval`` shows what is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from rsafe.models.verdict import Label, Verdict
from rsafe.models.versions import artifact_version
from rsafe.schemas.jsonl import read_jsonl

DEFAULT_CACHE_DIR = Path(".cache") / "eval"


def _sha(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def example_key(example_id: str, content_hash: str) -> str:
    return _sha([example_id, content_hash])[:32]


def run_identity(guard: Any, policy: Any, adapter: str | None) -> dict[str, Any]:
    """What, besides the example, determines a verdict. The model and the adapter are keyed on
    their content version (``artifact_version``), not their names: a checkpoint or adapter rebuilt
    under the same name does not reuse stale verdicts."""
    cfg = getattr(getattr(guard, "backend", None), "cfg", None)
    generation = getattr(guard, "generation", None)
    limits = getattr(guard, "limits", None)
    adapters = getattr(cfg, "lora_adapters", {}) or {}
    return {
        "model": guard.model_id,
        "model_fingerprint": artifact_version(getattr(cfg, "model", None)),
        "backend": getattr(cfg, "backend", None),
        "adapter": adapter,
        "adapter_version": artifact_version(adapters.get(adapter)) if adapter else None,
        "policy": policy.name,
        "policy_version": policy.version,
        "generation": dataclasses.asdict(generation) if dataclasses.is_dataclass(generation) else None,
        "limits": limits.model_dump() if hasattr(limits, "model_dump") else None,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-48:] or "model"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class VerdictCache:
    """Cached verdicts of one run identity, backed by an append-only JSONL file."""

    def __init__(self, directory: str | Path, identity: dict[str, Any]):
        self.identity = identity
        self.key = _sha(identity)[:20]
        self.directory = Path(directory)
        self.path = self.directory / f"{_slug(str(identity.get('model')))}-{self.key}.jsonl"
        self._verdicts: dict[str, Verdict] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.path.is_file():
            return
        for _, row in read_jsonl(self.path):
            try:
                self._verdicts[row["key"]] = Verdict.model_validate(row["verdict"])  # type: ignore[index]
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from an interrupted write (a str here), or a foreign one

    def get(self, key: str) -> Verdict | None:
        self._load()
        return self._verdicts.get(key)

    def __len__(self) -> int:
        self._load()
        return len(self._verdicts)

    def put_many(self, items: Iterable[tuple[str, Verdict]]) -> int:
        """Store verdicts (``error`` ones are skipped); returns how many were written."""
        self._load()
        lines = []
        for key, verdict in items:
            if verdict.label == Label.ERROR:
                continue
            self._verdicts[key] = verdict
            lines.append(json.dumps({"key": key, "verdict": verdict.model_dump(mode="json")},
                                    ensure_ascii=False) + "\n")
        if not lines:
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.path.with_suffix(".meta.json")
        if not meta.exists():
            meta.write_text(json.dumps(self.identity, indent=2, default=str) + "\n", encoding="utf-8")
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(("\n" if torn else "") + "".join(lines))
            f.flush()
            os.fsync(f.fileno())
        return len(lines)
