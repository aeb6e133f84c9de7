"""JSON Lines files — record files, inputs and per-step logs — read and appended one way everywhere."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterable, Iterator


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """``(line number, row)`` for each non-blank line of a ``.jsonl`` (or ``.jsonl.gz``) file. A line
    that is not a JSON object comes as a ``str`` saying why (``line 3: not valid JSON: ...``), so the
    caller decides: raise, skip a torn last line, or answer it with an error record."""
    path = Path(path)
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield n, f"line {n}: not valid JSON: {err.msg}"
                continue
            yield n, row if isinstance(row, dict) else f"line {n}: expected a JSON object, got {type(row).__name__}"


def append_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows``, one JSON object per line (UTF-8, non-ASCII kept as is)."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
