"""``rsafe train promote`` and ``rsafe models list|show`` on the demo model (transformers engine,
structured decoding off): a drift-trained adapter passes the gate and is published, an adapter
trained on flipped labels is rejected and kept, rollback returns to the earlier version."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from rsafe.training.registry import Registry
from streamkit import kafka  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def rsafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path) -> dict[str, Path]:
    from rsafe.training.demo import build_demo_lora

    return {v: build_demo_lora(demo_model_dir, demo_model_dir.parent / f"demo-lora-{v}", variant=v, steps=60)
            for v in ("drift", "flipped")}


def test_promote_gates_publishes_and_rolls_back(tmp_path, kafka, demo_model_dir, adapters):  # noqa: F811
    from rsafe.stream.clients import read_all

    reg = tmp_path / "registry"
    topic = f"models-{uuid.uuid4().hex[:6]}"
    common = ["--registry", str(reg), "--model", str(demo_model_dir), "--engine", "transformers",
              "--max-tokens", "96", "--broker", kafka, "--control-topic", topic]

    good = rsafe("train", "promote", str(adapters["drift"]), "--approver", "ann", *common)
    assert good.returncode == 0, good.stderr[-3000:]
    first = json.loads(good.stdout)
    assert first["status"] == "promoted" and first["accepted"], first
    assert any("slice" in r for r in first["reasons"])

    bad = rsafe("train", "promote", str(adapters["flipped"]), *common)
    assert bad.returncode == 3, bad.stderr[-3000:]
    second = json.loads(bad.stdout)
    assert second["status"] == "rejected" and not second["accepted"]
    assert any(r.startswith("FAIL") for r in second["reasons"]), second["reasons"]

    # the registry: both kept, one current, the rejected one marked, the gate's figures on the card
    listed = [json.loads(line) for line in rsafe("models", "list", "--registry", str(reg), "--json").stdout.splitlines()]
    by_status = {r["status"]: r for r in listed}
    assert set(by_status) == {"promoted", "rejected"} and by_status["promoted"]["current"]
    shown = json.loads(rsafe("models", "show", first["ref"], "--registry", str(reg)).stdout)
    assert shown["gate"]["accepted"] and shown["promoted_by"] == "ann" and shown["current"]
    assert shown["gate"]["candidate_metrics"]["slice_accuracy"] >= shown["gate"]["current_metrics"]["slice_accuracy"] + 10
    table = rsafe("models", "list", "--registry", str(reg)).stdout
    assert "rejected" in table and "promoted*" in table

    # a rejected version cannot be rolled back to; the promoted one can (no gate, a control record)
    no = rsafe("train", "promote", second["ref"], "--rollback", *common)
    assert no.returncode == 1 and "never promoted" in no.stderr
    back = rsafe("train", "promote", first["ref"], "--rollback", "--approver", "bob", *common)
    assert back.returncode == 0, back.stderr[-2000:]
    records = [json.loads(r.value) for r in read_all([kafka], [topic])]
    assert [(r["version"], r["rollback"]) for r in records] == [(first["ref"].split("@")[1], False),
                                                                (first["ref"].split("@")[1], True)]
    assert Registry(reg).current_version("guard") == first["ref"].split("@")[1]

