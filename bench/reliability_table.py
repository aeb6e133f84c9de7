"""The reliability table of docs/RELIABILITY.md, from the raw results of ``make test-reliability``.

    .venv/bin/python bench/reliability_table.py       # .cache/reliability/*.json (the last run), kept as
                                                      # docs/bench-results/reliability-<date>.json
    .venv/bin/python bench/reliability_table.py --from docs/bench-results/reliability-2026-11-30-evening.json

*Lost* counts against what the producers had acknowledged (``events_in``): an acknowledged input
event with neither a verdict nor a DLQ record after recovery, whether the broker dropped it
(``events_in`` − the input records on the broker after recovery) or the worker left it unjudged on
the topic. The table splits the two. The embedded broker (noida-db) loses its last ~1–2 s of
acknowledged writes on ``kill -9`` (/work/shared/ENVIRONMENT.md, docs/RELIABILITY.md), so a broker
``kill -9`` scenario on it shows a loss that Apache Kafka does not have.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, run_metadata, write_result

RESULTS = ROOT / ".cache" / "reliability"
KEPT = ROOT / "docs" / "bench-results"
COLUMNS = ("events_in", "inputs_on_broker", "verdicts", "dlq", "lost", "lost_by_broker", "unjudged_on_broker",
           "duplicates", "flipped", "recovery_s")
HEADERS = ("acknowledged in", "inputs on the broker after", "verdicts", "dlq", "**lost** (of acknowledged)",
           "of which the broker dropped", "of which left unjudged", "duplicates", "flipped", "recovery_s")
#: What a scenario file held before the counting changed (``lost`` then meant ``unjudged_on_broker``).
OLD_LOST = "unjudged_on_broker"
KILL9_REASON = ("the embedded broker (noida-db) loses its last ~1–2 s of acknowledged writes on kill -9 "
                "(/work/shared/ENVIRONMENT.md; docs/RELIABILITY.md, \"The embedded broker is not Kafka\")")


def counted(row: dict[str, Any]) -> dict[str, Any]:
    """The scenario's figures with *lost* counted against the acknowledged input events.

    A scenario file written since the counting changed has ``inputs_on_broker`` and
    ``unjudged_on_broker``. An older one (``counting: "on the broker"``) has only the events
    left unjudged on the broker, as ``lost``; its ``inputs_on_broker`` is then the distinct input
    offsets that got a verdict (``verdicts − duplicates``) or a DLQ record, plus those left
    unjudged (exact when no offset has both a verdict and a DLQ record, which these scenarios never
    produce)."""
    r = dict(row)
    if r.get("counting") == "on the broker":
        r[OLD_LOST] = r.pop("lost")
        r["inputs_on_broker"] = r["verdicts"] - r["duplicates"] + r["dlq"] + r[OLD_LOST]
        r["inputs_on_broker_derived"] = True
    r["lost_by_broker"] = max(0, r["events_in"] - r["inputs_on_broker"])
    r["lost"] = r["lost_by_broker"] + r[OLD_LOST]
    return r


def table(rows: list[dict[str, Any]]) -> str:
    skip = {*COLUMNS, "scenario", "broker", "counting", "inputs_on_broker_derived"}
    out = ["| scenario | broker | " + " | ".join(HEADERS) + " | other |",
           "|---|---|" + "---|" * len(HEADERS) + "---|"]
    notes = []
    for r in map(counted, rows):
        cells = [str(r.get(c, "–")) for c in COLUMNS]
        if r["lost"]:
            cells[COLUMNS.index("lost")] = f"**{r['lost']}**"
        other = ", ".join(f"{k} {v}" for k, v in r.items() if k not in skip)
        out.append(f"| {r['scenario']} | {r['broker']} | " + " | ".join(cells) + f" | {other} |")
        if r["lost_by_broker"] and "noida" in r["broker"]:
            notes.append(f"{r['scenario'].split(':')[0]}: {r['lost_by_broker']} of {r['events_in']} acknowledged "
                         f"input events gone from the broker after its restart: {KILL9_REASON}.")
        if r["inputs_on_broker"] > r["events_in"]:
            notes.append(f"{r['scenario'].split(':')[0]}: the input topic holds more records than were acknowledged "
                         "(a producer retry wrote some twice): a loss among them would not show.")
    return "\n".join(out + [""] + [f"* {n}" for n in notes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None,
                    help="a kept raw result (docs/bench-results/reliability-*.json); default: .cache/reliability")
    ap.add_argument("--keep", default=None,
                    help="where to keep the results read from .cache/reliability (default "
                         "docs/bench-results/reliability-<date>.json); 'no': do not keep them")
    args = ap.parse_args()
    if args.source:
        kept = json.loads(Path(args.source).read_text())
        rows = kept["scenarios"]
    else:
        files = sorted(RESULTS.glob("*.json"))
        if not files:
            print(f"no results in {RESULTS}: run make test-reliability", file=sys.stderr)
            sys.exit(1)
        rows = [json.loads(p.read_text()) for p in files]
        if args.keep != "no":
            path = Path(args.keep or KEPT / f"reliability-{time.strftime('%Y-%m-%d')}.json")
            meta = run_metadata([sys.executable, *sys.argv])  # the machine's: the tests ran on it
            written = {p.name: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.stat().st_mtime)) for p in files}
            write_result(path, {"benchmark": "make test-reliability (tests/test_reliability_long.py)",
                                "source": str(RESULTS.relative_to(ROOT)), **meta,
                                "command": "make test-reliability", "table_command": meta["command"],
                                "files_written_utc": written, "scenarios": rows})
            print(f"kept as {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
