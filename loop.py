"""``rsafe loop demo`` (``make loop-demo``): the whole loop on the demo model, live, on one machine.

Embedded broker → a worker (vLLM, the demo model, adapter ``guard``) judging a medical platform's
traffic under ``medical-platform`` → the guard flags risky-medical-advice messages although that
platform allows them (the drift) → reviewers' labels arrive as feedback → the worker's feedback
join publishes disagreements → ``train dataset`` from the topic → GRPO → the promotion gate →
a control record → the *same* worker hot-swaps the adapter and judges held-out drift messages
correctly. Prints before/after accuracy, the versions and the time of each step.

Like the CLI, this module wires stream, training and the demo together (the one other place that may).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoopSettings:
    model: str
    work_dir: str = ".cache/loop"
    n_drift: int = 80
    """Drift-family messages streamed (training templates) and corrected by reviewers."""
    n_general: int = 40
    n_heldout: int = 60
    """Held-out drift messages (held-out templates) judged before and after."""
    grpo_steps: int = 60
    n_kept: int = 2
    """Replay: messages of every other harmful family under both policies (``DriftScenario.n_kept``)."""
    pair_by_message: bool = True
    """A reviewed message and its contrast row (and each kept message's two rows) in one GRPO step."""
    grpo_overrides: dict[str, Any] = field(default_factory=dict)
    """Over the demo-cpu preset (e.g. ``{"beta": 0.04}``: a KL term to the base model)."""
    lora_rank: int = 16
    timeout_s: float = 1800.0


class Steps:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.times: list[tuple[str, float]] = []
        self._start = time.monotonic()
        self._name = ""

    def begin(self, name: str) -> None:
        self._name, self._start = name, time.monotonic()
        print(f"\n▶ {name}", flush=True)

    def end(self, detail: str = "") -> None:
        dt = time.monotonic() - self._start
        self.times.append((self._name, dt))
        print(f"  done in {dt:.0f} s{(' — ' + detail) if detail else ''} (total {time.monotonic() - self.t0:.0f} s)",
              flush=True)


def say(msg: str) -> None:
    print(f"  {msg}", flush=True)


async def _wait(pred, timeout_s: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(pred):
            return
        await asyncio.sleep(interval)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


async def run_loop(s: LoopSettings) -> int:
    from rsafe.demo import drift
    from rsafe.demo.build import DEMO_MODEL_DIR, build_demo_lora, check_demo_model, read_manifest
    from rsafe.demo.corpus import family_examples, synthetic_examples
    from rsafe.demo.drift import demo_promotion_set
    from rsafe.policies import PolicyRegistry
    from rsafe.schemas.feedback import FeedbackEvent, FeedbackSource
    from rsafe.stream.broker import EmbeddedBroker, ensure_topics
    from rsafe.stream.clients import Message, produce, read_all
    from rsafe.stream.config import load_config
    from rsafe.stream.worker import GuardWorker, topic_specs
    from rsafe.training import dataset as ds
    from rsafe.training import grpo
    from rsafe.training.lora_extract import extract_lora
    from rsafe.training.promote import publish_control
    from rsafe.training.registry import Registry

    steps = Steps()
    work = Path(s.work_dir)
    run_id = uuid.uuid4().hex[:6]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    registry = Registry(work / "registry")
    policies = PolicyRegistry.from_dirs()
    platform = policies.get("medical-platform")

    steps.begin("1. the demo model and the adapter the worker serves first (guard v0)")
    model = Path(s.model)
    problem = check_demo_model(model) if model.resolve() == DEMO_MODEL_DIR else None
    if read_manifest(model) is None or problem:
        say(problem or f"no demo model build at {model}; the repository carries it in demo/model/")
        return 1
    v0_dir = build_demo_lora(model, Path(".cache") / "demo-lora")
    v0 = registry.register(v0_dir, "guard", kind="lora", base_model=str(Path(model).resolve()))
    registry.set_current(v0, "loop-demo")
    steps.end(f"guard@{v0.version}")

    broker = EmbeddedBroker(work / "broker", port=0)
    await asyncio.to_thread(broker.start)
    worker_task = None
    try:
        steps.begin("2. broker + worker (vLLM engine on the demo model; feedback join on)")
        cfg = load_config(data={
            "broker": broker.bootstrap, "group_id": f"loop-{run_id}", "static_membership": False,
            "inputs": [{"topic": "chat.medical", "policy": "medical-platform", "adapter": "guard", "partitions": 2},
                       {"topic": "chat.general", "policy": "rsafe-default", "adapter": "guard", "partitions": 2}],
            "outputs": {"partitions": 2}, "audit": {"content": "full"},
            "batch": {"size": 16, "linger_ms": 50, "max_inflight": 2},
            "engine": {"backend": "vllm", "model": str(model), "model_id": "rsafe-demo", "enable_lora": True,
                       "max_lora_rank": max(16, s.lora_rank), "generation": {"max_tokens": 128},
                       "limits": {"max_window_tokens": 128}},
            "feedback": {"enabled": True, "expiry_interval_s": 5},
            "http": {"port": 0}, "policy_reload": {"watch": False},
        }, env={})
        await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg))
        control = lambda rec: publish_control(cfg.bootstrap, cfg.models.control_topic, rec)  # noqa: E731
        control(_record(registry, v0, "loop-demo"))
        worker = GuardWorker(cfg)
        worker_task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), s.timeout_s)
        steps.end(f"serving guard@{worker.models.versions.get('guard')}")

        steps.begin("3. traffic: the medical platform's drift family + general messages; held-out drift before")
        drift_msgs = family_examples("medical", platform, s.n_drift, seed=4242)
        general = [e for e in synthetic_examples(4 * s.n_general, seed=4343) if e.policy == "rsafe-default"][: s.n_general]
        heldout = family_examples("medical", platform, s.n_heldout, seed=991, split="heldout")
        events = [("chat.medical", f"drift-{i}", e.prompt) for i, e in enumerate(drift_msgs)]
        events += [("chat.general", f"general-{i}", e.prompt) for i, e in enumerate(general)]
        events += [("chat.medical", f"before-{i}", e.prompt) for i, e in enumerate(heldout)]
        await asyncio.to_thread(produce, cfg.bootstrap, [Message(t, i.encode(), json.dumps({"id": i, "prompt": p}).encode())
                                                         for t, i, p in events])
        verdicts = await _collect(cfg, {i for _, i, _ in events}, s.timeout_s)
        before = _accuracy(verdicts, "before-", "safe")
        flagged = sum(verdicts[f"drift-{i}"]["label"] == "unsafe" for i in range(len(drift_msgs)))
        steps.end(f"{flagged}/{len(drift_msgs)} drift messages flagged unsafe; held-out drift accuracy {before:.0%}")

        steps.begin("4. reviewers' labels → feedback → disagreements")
        feedback = [FeedbackEvent(event_id=f"drift-{i}", feedback_id=f"rev-{run_id}-{i}", label="safe",
                                  source=FeedbackSource.REVIEWER, reviewer="medical-reviewer")
                    for i in range(len(drift_msgs))]
        feedback += [FeedbackEvent(event_id=f"general-{i}", feedback_id=f"rev-{run_id}-g{i}", label=e.label,  # type: ignore[arg-type]
                                   source=FeedbackSource.REVIEWER, reviewer="general-reviewer")
                     for i, e in enumerate(general)]
        await asyncio.to_thread(produce, cfg.bootstrap, [
            Message(cfg.feedback.trusted_topic, f.event_id.encode(), f.model_dump_json().encode()) for f in feedback])
        topic = cfg.feedback.disagreements_topic
        await _wait(lambda: len(read_all(cfg.bootstrap, [topic], idle_timeout_s=0.5)) >= flagged, 300,
                    "the disagreements")
        n_dis = len(read_all(cfg.bootstrap, [topic], idle_timeout_s=0.5))
        steps.end(f"{n_dis} disagreement records on {topic}")

        steps.begin("5. the training set from the disagreements topic (its own consumer group) + replay")
        source = await asyncio.to_thread(ds.read_topic, cfg.bootstrap, topic, group_id=f"loop-train-{run_id}")
        dropped = ds.Dropped()
        records = list(ds.parse_records(source.lines, dropped))
        scenario = drift.DriftScenario(n_feedback=len(records), n_kept=s.n_kept)
        settings = ds.BuildSettings(replay_ratio=3.0, pair_by_message=s.pair_by_message)
        built = ds.build(records, replay=drift.replay_examples(scenario), settings=settings, dropped=dropped,
                         exclude_hashes=sorted(demo_promotion_set(n_slice=s.n_heldout).hashes()))
        dataset_dir = work / "dataset"
        ds.save(built, dataset_dir, sources=[{"topic": topic, "group": f"loop-train-{run_id}"}], settings=settings)
        source.commit()
        steps.end(f"{len(built.rows)} rows")

        steps.begin(f"6. GRPO ({s.grpo_steps} steps, TRL GRPOTrainer, the RSafe rule reward; its own process)")
        run_dir = work / "grpo"
        # GRPO and the gate run as the CLI commands an operator uses, each in a process of its own
        # (in this one their Python-heavy generation loops share the GIL with the worker: 21 s per
        # GRPO step in-process, 18 s in a child, 6-8 s alone — the rest is the idle worker polling
        # the embedded broker, docs/RELIABILITY.md). The worker keeps serving meanwhile.
        grpo_args = ["train", "grpo", "--model", str(model), "--dataset", str(dataset_dir), "--output", str(run_dir),
                     "--preset", "demo-cpu", "--max-steps", str(s.grpo_steps)]
        if s.grpo_overrides:
            overrides = work / "grpo-overrides.yaml"  # JSON is YAML
            overrides.write_text(json.dumps(s.grpo_overrides))
            grpo_args += ["--config", str(overrides)]
        await _cli(grpo_args)
        summary = json.loads((run_dir / grpo.SUMMARY).read_text())
        candidate = run_dir
        if summary.get("kind") == "full":  # workers hot-swap adapters: take the low-rank part of the change
            candidate = work / "candidate"
            report = extract_lora(model, run_dir, candidate, rank=s.lora_rank)
            extracted = {**summary, "kind": "lora", "extracted_from": str(run_dir), "extraction": report}
            (candidate / grpo.SUMMARY).write_text(json.dumps(extracted, indent=1, default=str) + "\n")
            say(f"LoRA r{s.lora_rank} extracted from the full fine-tune (energy kept {report['mean_energy_kept']:.0%})")
        steps.end(f"reward {summary['reward']['first']} → {summary['reward']['last']}")

        steps.begin("7. the promotion gate (rsafe train promote, vLLM engine, structured decoding off), "
                    "then the control record")
        result = await _cli(["train", "promote", str(candidate), "--model", str(model), "--engine", "vllm",
                             "--model-id", "rsafe-demo", "--max-tokens", "96", "--max-window-tokens", "128",
                             "--max-lora-rank", str(max(16, s.lora_rank)), "--name", "guard",
                             "--registry", str(work / "registry"), "--broker", broker.bootstrap,
                             "--control-topic", cfg.models.control_topic, "--approver", "loop-demo"],
                            ok=(0, 3), capture=True)
        decision = json.loads(result)
        card = registry.resolve(decision["ref"])
        for reason in decision.get("reasons", []):
            say(reason)
        steps.end(f"guard@{card.version}: {'PROMOTED' if card.status == 'promoted' else card.status.upper()}")

        steps.begin("8. the same worker, the held-out drift messages again")
        if card.status == "promoted":
            await _wait(lambda: worker.models.versions.get("guard") == card.version, 120, "the hot swap")
        more = [("chat.medical", f"after-{i}", e.prompt) for i, e in enumerate(heldout)]
        await asyncio.to_thread(produce, cfg.bootstrap, [Message(t, i.encode(), json.dumps({"id": i, "prompt": p}).encode())
                                                         for t, i, p in more])
        after_v = await _collect(cfg, {i for _, i, _ in more}, s.timeout_s)
        after = _accuracy(after_v, "after-", "safe")
        versions = {v["adapter_version"] for v in after_v.values()}
        steps.end(f"held-out drift accuracy {before:.0%} → {after:.0%} (adapter versions {sorted(versions)})")
        worker.request_stop()
        await worker_task
        worker_task = None
    finally:
        if worker_task is not None:
            worker.request_stop()
            await asyncio.wait({worker_task}, timeout=120)
        await asyncio.to_thread(broker.stop)
    print("\nsummary")
    for name, dt in steps.times:
        print(f"  {dt:6.0f} s  {name}")
    print(f"  {time.monotonic() - steps.t0:6.0f} s  total")
    print(f"  held-out drift accuracy: {before:.0%} (guard@{v0.version}) → {after:.0%} (guard@{card.version}); "
          f"gate: {'accepted' if card.gate and card.gate.accepted else 'rejected'}")
    closed = card.status == "promoted" and after > before
    (work / "summary.json").write_text(json.dumps({
        "closed": closed, "settings": asdict(s),
        "steps_s": {name: round(dt, 1) for name, dt in steps.times}, "total_s": round(time.monotonic() - steps.t0, 1),
        "heldout_drift_accuracy": {"before": before, "after": after}, "versions": {"before": v0.version,
                                                                                   "candidate": card.version},
        "adapter_versions_after": sorted(versions), "gate": card.gate.model_dump(mode="json") if card.gate else None,
        "dataset": built.counts,
    }, indent=1, default=str) + "\n")
    return 0 if closed else 1


async def _cli(args: list[str], *, ok: tuple[int, ...] = (0,), capture: bool = False) -> str:
    """Run ``rsafe ARGS`` in a child process (its stderr — progress, the gate's log — shows live).
    ``capture``: return the last JSON line of its stdout (engine logs may come before it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rsafe.cli", *args,
        stdout=asyncio.subprocess.PIPE if capture else None)
    out, _ = await proc.communicate()
    if proc.returncode not in ok:
        raise RuntimeError(f"rsafe {' '.join(args[:2])} failed with exit status {proc.returncode}")
    if not capture:
        return ""
    lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"rsafe {' '.join(args[:2])} printed no result")
    return lines[-1]


def _record(registry: Any, card: Any, by: str) -> Any:
    from rsafe.schemas.models import ModelControlRecord

    return ModelControlRecord(name=card.name, version=card.version, kind=card.kind,
                              uri=registry.artifact_uri(card.name, card.version), base_model=card.base_model,
                              promoted_by=by)


async def _collect(cfg: Any, ids: set[str], timeout_s: float) -> dict[str, dict]:
    from rsafe.stream.clients import read_all

    topics = list(cfg.verdict_topics().values())
    got: dict[str, dict] = {}

    def poll() -> bool:
        for r in read_all(cfg.bootstrap, topics, idle_timeout_s=0.5):
            v = json.loads(r.value)
            if v["id"] in ids:
                got[v["id"]] = v
        return len(got) >= len(ids)

    await _wait(poll, timeout_s, f"{len(ids)} verdicts", interval=1.0)
    return got


def _accuracy(verdicts: dict[str, dict], prefix: str, label: str) -> float:
    mine = [v for k, v in verdicts.items() if k.startswith(prefix)]
    return sum(v["label"] == label for v in mine) / max(1, len(mine))


def main(s: LoopSettings) -> int:
    import logging

    from rsafe.stream.worker import configure_logging

    configure_logging("WARNING")
    logging.getLogger("rsafe.stream.models").setLevel(logging.INFO)
    return asyncio.run(run_loop(s))
