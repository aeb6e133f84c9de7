"""Prints the figures of the last ``make test-reliability`` run as the table of docs/RELIABILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / ".cache" / "reliability"
COLUMNS = ("events_in", "verdicts", "dlq", "lost", "duplicates", "flipped", "recovery_s")


def main() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    if not rows:
        print(f"no results in {RESULTS}: run make test-reliability")
        return
    print("| scenario | broker | " + " | ".join(COLUMNS) + " | other |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|")
    for r in rows:
        other = {k: v for k, v in r.items() if k not in (*COLUMNS, "scenario", "broker")}
        cells = [str(r.get(c, "–")) for c in COLUMNS]
        print(f"| {r['scenario']} | {r['broker']} | " + " | ".join(cells) + " | "
              + ", ".join(f"{k} {v}" for k, v in other.items()) + " |")


if __name__ == "__main__":
    main()
