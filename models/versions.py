"""Short content fingerprints of a local model or adapter directory (for audit records).

Hashes the small JSON files whole and each weight file by name, size and its first and last MiB,
so a 15 GB checkpoint is fingerprinted in milliseconds. A hub id (no local directory) has none.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_META = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer_config.json",
         "tokenizer.json")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_CHUNK = 1 << 20


def artifact_version(path: str | Path | None) -> str | None:
    """12 hex digits identifying the directory's contents, or None when it is not a local dir."""
    if not path:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for name in _META:
        f = root / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    weights = sorted({f for pattern in _WEIGHTS for f in root.glob(pattern) if f.is_file()})
    for f in weights:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_CHUNK))
            if size > 2 * _CHUNK:
                fh.seek(-_CHUNK, 2)
                h.update(fh.read(_CHUNK))
    return h.hexdigest()[:12]
