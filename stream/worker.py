"""The streaming worker: broker → engine → Faust app, until SIGTERM/SIGINT; SIGHUP reloads policies.

Start order: broker (the embedded one when none is configured or reachable), topics, engine (the
slow part, before joining the consumer group so no partition waits on it), Faust app.

Stop (SIGTERM/SIGINT): Faust stops fetching and clears its buffers, the batches already taken
finish and publish, their offsets are committed, then the engine and the embedded broker stop;
exit status 0. An engine failure during shutdown leaves its batch unacked (it is redelivered)
instead of producing ``on_error`` verdicts: a Ctrl-C in a terminal reaches vLLM's engine
processes too (same process group), and they exit at once.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

from rsafe.stream.broker import BrokerError, EmbeddedBroker, ensure_topics, reachable
from rsafe.stream.compat import internals
from rsafe.stream.config import StreamConfig
from rsafe.stream.context import changelog_specs as context_changelog_specs
from rsafe.stream.exit_codes import EXIT_CRASHED, EXIT_ENGINE_DEAD, EXIT_FAILED, EXIT_OK
from rsafe.stream.feedback import topic_specs as feedback_topic_specs
from rsafe.stream.moderate import Moderator, Outcome
from rsafe.stream.pipeline import LeftForRedelivery
from rsafe.stream.redaction import HashKeyError, content_hasher
from rsafe.stream.telemetry import Telemetry

log = logging.getLogger("rsafe.stream.worker")



class WorkerError(RuntimeError):
    """The worker cannot start (config, broker, engine); the message says why."""


class _StoppingModerator(Moderator):
    """Moderator that, once the worker is stopping, lets an engine failure leave the batch unacked
    (a terminal Ctrl-C also reaches vLLM's engine processes, which then exit)."""

    stopping = False

    async def judge(self, routed, attempts=None):  # type: ignore[override]
        verdicts, attempts, error = await super().judge(routed, attempts)
        if verdicts is None and self.stopping:
            raise LeftForRedelivery(f"the engine failed during shutdown ({error})")
        return verdicts, attempts, error


def topic_specs(cfg: StreamConfig) -> list[tuple[str, int, dict[str, str]]]:
    out = cfg.outputs
    specs = [(t.topic, t.partitions, {}) for t in cfg.inputs]
    specs += [(v, out.partitions, {}) for v in cfg.verdict_topics().values()]
    specs += [(out.audit_topic, out.partitions, {"cleanup.policy": "compact"}),
              (out.dlq_topic, out.partitions, {}),
              (out.policies_topic, 1, {"cleanup.policy": "compact"})]
    if cfg.models.follow:
        specs.append((cfg.models.control_topic, 1, {"cleanup.policy": "compact"}))
    specs += context_changelog_specs(cfg)
    feedback = feedback_topic_specs(cfg)
    if cfg.feedback.review_topic not in {t for t, _, _ in feedback}:  # written without the feedback loop too
        specs.append((cfg.feedback.review_topic, out.partitions, {}))
    return specs + feedback


def _start_backend(engine_cfg: Any) -> Any:
    from rsafe.models.engines import make_backend

    return make_backend(engine_cfg)


class GuardWorker:
    """One worker process's moderation service. ``run()`` returns the exit status."""

    def __init__(self, cfg: StreamConfig, *, backend: Any = None,
                 on_published: Callable[[Sequence[Outcome]], object] | None = None, providers: Any = None):
        self.cfg = cfg
        self.worker_id = cfg.resolved_worker_id
        self.providers = providers or _providers(cfg, self.worker_id, backend)
        """OpenTelemetry providers (``telemetry:``); a test may pass its own with in-memory exporters."""
        self.telemetry = Telemetry(self.worker_id, self.providers, group_id=cfg.group_id)
        self._backend = backend
        self._owns_backend = backend is None
        self._on_published = on_published
        self._stop = asyncio.Event()
        self._reload_requested = False
        self.ready = asyncio.Event()
        self.broker: EmbeddedBroker | None = None
        self.guard: Any = None
        self.app: Any = None
        self.pipeline: Any = None
        self.watcher: Any = None
        self.publisher: Any = None
        self.fencing: Any = None
        self.http: Any = None
        self.feedback: Any = None
        self.models: Any = None
        self._tasks: list[asyncio.Task] = []
        self.restart_required: str | None = None
        """Set when the worker must be restarted to apply a change (a full-weights model promotion)."""
        self.metrics: Any = self.providers.metrics_text if cfg.telemetry.prometheus else None
        """Prometheus exposition for /metrics (``telemetry.prometheus``)."""
        self.moderator: Any = None
        self._datadir: str | None = None
        self._gc_before: tuple[int, int, int] | None = None
        self.exit_code = EXIT_OK

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("already stopping (waiting for in-flight batches)")
        self._stop.set()

    def _restart_required(self, why: str) -> None:
        self.restart_required = why

    def _use_promoted_model(self, current: dict) -> None:
        """Start the engine on the promoted full-weights version of ``models.model_name``, if any."""
        from rsafe.models.artifacts import local_copy

        name = self.cfg.models.model_name
        rec = current.get(name) if name else None
        if rec is None or rec.kind != "full" or self.cfg.engine is None:
            return
        if self._backend is not None:
            log.warning("model %s@%s is promoted, but this worker was given its engine; serving that", name, rec.version)
            return
        path = local_copy(rec.uri, f"{self.cfg.models.cache_dir}/{name}", rec.version)
        log.info("serving the promoted model %s@%s from %s", name, rec.version, path)
        engine = self.cfg.engine.model_copy(update={"model": str(path)})
        self.cfg = self.cfg.model_copy(update={"engine": engine})

    def _engine_dead(self, why: str) -> None:
        self.exit_code = EXIT_ENGINE_DEAD
        self.request_stop()

    def request_reload(self) -> None:
        if self.watcher is not None:
            self.watcher.request_reload()
        else:
            self._reload_requested = True

    # ------------------------------------------------------------------ start

    def _resolve_broker(self) -> None:
        cfg = self.cfg
        if cfg.broker is not None:
            return
        if reachable(cfg.bootstrap):
            log.info("using the broker at %s", ",".join(cfg.bootstrap))
            return
        if not cfg.embedded_broker.enabled:
            raise WorkerError(f"no broker configured and none reachable at {cfg.bootstrap[0]}; set "
                              "broker (or RSAFE_BROKER) or enable embedded_broker")
        emb = cfg.embedded_broker
        self.broker = EmbeddedBroker(emb.data_dir, port=emb.port).start()
        self.cfg = cfg.model_copy(update={"broker": [self.broker.bootstrap]})
        log.info("no broker configured or reachable: started the embedded broker on %s", self.broker.url)

    def _engine_backend(self) -> Any:
        if self._backend is not None:
            return self._backend
        if self.cfg.engine is None:
            raise WorkerError("no engine configured: set engine.model in the config (or --model)")
        try:
            return _start_backend(self.cfg.engine)
        except Exception as err:  # noqa: BLE001 - EngineError or a vLLM start failure
            raise WorkerError(f"engine failed to start: {err}") from err

    def _build_guard(self, backend: Any, registry: Any) -> Any:
        from rsafe.models.config import GenerationConfig, InputLimits
        from rsafe.models.guard import Guard

        engine_cfg = self.cfg.engine or getattr(backend, "cfg", None)
        generation = engine_cfg.generation if engine_cfg is not None else GenerationConfig()
        limits = engine_cfg.limits if engine_cfg is not None else InputLimits()
        if any(self.cfg.faults.model_dump().values()):
            from rsafe.stream.faults import FaultyBackend

            log.warning("fault injection on: %s", self.cfg.faults.model_dump(exclude_none=True))
            backend = FaultyBackend(backend, self.cfg.faults)
        return Guard(backend, policies=registry, default_policy=self.cfg.default_policy,
                     generation=generation, limits=limits)

    def _check_adapters(self, backend: Any, promoted: set[str] = frozenset()) -> None:
        """Every topic's adapter is configured (``engine.lora_adapters``) or promoted (control topic)."""
        engine_cfg = self.cfg.engine or getattr(backend, "cfg", None)
        known = (set(engine_cfg.lora_adapters) if engine_cfg is not None else set()) | set(promoted)
        for t in self.cfg.inputs:
            if t.adapter and t.adapter not in known:
                raise WorkerError(f"inputs[{t.topic}].adapter {t.adapter!r} is neither in engine.lora_adapters nor "
                                  f"promoted on {self.cfg.models.control_topic} ({', '.join(sorted(known)) or 'none'})")

    async def _start(self) -> None:
        """Start in phases; each returns early (nothing half-started is left running) when a stop
        arrives while it waits — a SIGTERM during the engine's start, say."""
        registry = self._check_setup()
        await self._start_http()
        await self._prepare_broker(registry)
        if self._stop.is_set():
            return
        current_models, control_ends = await self._read_promoted_models()
        backend = await self._start_engine(current_models)
        if self._stop.is_set():  # SIGTERM while the engine was starting
            return
        await self._build_moderator(backend, registry, current_models)
        self._build_app()
        await self._join_group(control_ends)

    def _check_setup(self) -> Any:
        """The libraries the worker patches, the policies, the audit hash key: what must hold before
        anything starts. Returns the policy registry."""
        from rsafe.policies import PolicyError
        from rsafe.stream import compat
        from rsafe.stream.compat import long_poll
        from rsafe.stream.policy_watch import load_registry

        try:
            compat.check()
        except compat.UnsupportedVersion as err:
            raise WorkerError(str(err)) from None
        long_poll.install()  # a drained consumer must not spin on a broker without long polling
        try:
            registry = load_registry(self.cfg)
        except PolicyError as err:
            raise WorkerError(str(err)) from None
        try:  # audit.content: hash needs its key before anything is judged
            content_hasher(self.cfg.audit.content)
        except HashKeyError as err:
            raise WorkerError(str(err)) from None
        return registry

    async def _start_http(self) -> None:
        http = self.cfg.http
        if not http.enabled:
            return
        from rsafe.stream.http import HttpServer

        self.http = HttpServer(http.host, http.port, self.readiness, self.metrics)
        try:
            await self.http.start()
        except OSError as err:
            self.http = None
            raise WorkerError(f"http: cannot listen on {http.host}:{http.port}: {err} "
                              "(set http.port, or 0 for any free port)") from None

    async def _prepare_broker(self, registry: Any) -> None:
        """The broker (the embedded one when none is reachable), the topics, and the policy store
        holding every version before anything is judged with it."""
        from rsafe.stream.policy_store import PolicyPublisher

        await asyncio.to_thread(self._resolve_broker)
        cfg = self.cfg
        if cfg.create_topics:
            try:
                created = await asyncio.to_thread(ensure_topics, cfg.bootstrap, topic_specs(cfg),
                                                  cfg.security.client_kwargs())
            except BrokerError as err:
                raise WorkerError(str(err)) from None
            if created:
                log.info("created topics: %s", ", ".join(created))
        self.publisher = PolicyPublisher(cfg.bootstrap, cfg.outputs.policies_topic, self.worker_id,
                                         cfg.security.client_kwargs())
        try:
            stored = await asyncio.to_thread(self.publisher.publish, registry)
        except Exception as err:  # noqa: BLE001 - broker errors
            raise WorkerError(f"cannot publish the policies to {cfg.outputs.policies_topic}: {err}") from None
        if stored:
            log.info("policy store %s: published %s", cfg.outputs.policies_topic, ", ".join(stored))

    async def _read_promoted_models(self) -> tuple[dict, dict[int, int]]:
        """The model control topic's current records (``models.follow``) and its end offsets; a
        promoted full-weights model replaces ``engine.model``."""
        models = self.cfg.models
        if not models.follow:
            return {}, {}
        from rsafe.stream.models_watch import read_current

        try:
            current, ends = await asyncio.to_thread(read_current, self.cfg.bootstrap, models.control_topic,
                                                    self.cfg.security.client_kwargs())
        except Exception as err:  # noqa: BLE001
            raise WorkerError(f"cannot read the model control topic {models.control_topic}: {err}") from None
        await asyncio.to_thread(self._use_promoted_model, current)
        return current, ends

    async def _start_engine(self, current_models: dict) -> Any:
        started = time.perf_counter()
        backend = await asyncio.to_thread(self._engine_backend)
        self._backend = backend
        if not self._stop.is_set():
            self._check_adapters(backend, {n for n, r in current_models.items() if r.kind == "lora"})
            log.info("engine ready in %.1f s (%s)", time.perf_counter() - started, backend.model_id)
        return backend

    async def _build_moderator(self, backend: Any, registry: Any, current_models: dict) -> None:
        """The guard, the versions it serves (promoted adapters applied) and the moderator."""
        from rsafe.models.versions import artifact_version

        cfg = self.cfg
        self.guard = self._build_guard(backend, registry)
        engine_cfg = cfg.engine or getattr(backend, "cfg", None)
        model_version = artifact_version(engine_cfg.model) if engine_cfg is not None else None
        adapters = {n: artifact_version(p) for n, p in (engine_cfg.lora_adapters.items() if engine_cfg else [])}
        if cfg.models.follow:
            from rsafe.stream.models_watch import ModelWatcher

            self.models = ModelWatcher(cfg.models, backend, {t.adapter for t in cfg.inputs if t.adapter},
                                       self._restart_required, model_version, bootstrap=cfg.bootstrap,
                                       client_kwargs=cfg.security.client_kwargs())
            for rec in current_models.values():
                await self.models.apply(rec)
            adapters.update(self.models.versions)
        self.moderator = _StoppingModerator(cfg, self.guard, worker_id=self.worker_id, telemetry=self.telemetry,
                                            model_version=model_version, adapter_versions=adapters)

    def _build_app(self) -> None:
        """The Faust app, the pipeline and its sink, the context tables, the agents, the policy watcher."""
        from rsafe.stream.app import FaustSink, acker, build_app, context_tables, wire
        from rsafe.stream.compat.internals import in_partition
        from rsafe.stream.context import ConversationContext
        from rsafe.stream.pipeline import BatchPipeline
        from rsafe.stream.policy_watch import PolicyWatcher

        cfg = self.cfg
        self._datadir = tempfile.mkdtemp(prefix="rsafe-faust-")  # Faust's state dir; removed at exit
        app = self.app = build_app(cfg, datadir=self._datadir)
        eos = cfg.processing_guarantee == "exactly_once"

        async def commit() -> None:  # exactly_once: close the batch's transaction now
            if not await app.consumer.commit():
                await app.consumer.commit()

        self.pipeline = BatchPipeline(self.moderator, FaustSink(app, transactional=eos), acker(app),
                                      max_inflight=cfg.batch.max_inflight, telemetry=self.telemetry,
                                      commit=commit if eos else None, on_published=self._on_published,
                                      on_engine_dead=self._engine_dead, consumer_group=cfg.group_id)
        self.telemetry.lag_source = self._lag
        pipeline = self.pipeline

        async def reassigned(sender: Any, assigned: Any, **_: Any) -> None:  # redelivered from commits
            pipeline.partitions_reassigned((tp.topic, tp.partition) for tp in assigned)

        app.on_partitions_assigned.connect(reassigned)
        tables = context_tables(app, cfg)
        if tables:
            self.moderator.context = ConversationContext(cfg, {t: table.data for t, table in tables.items()},
                                                         in_partition=in_partition)
        wire(app, [t.topic for t in cfg.inputs], self.pipeline, cfg.batch,
             crash_marker=cfg.faults.consumer_crash_marker)
        if cfg.feedback.enabled:
            from rsafe.stream.feedback_agent import FeedbackWiring

            self.feedback = FeedbackWiring(app, cfg, self.worker_id, transactional=eos, telemetry=self.telemetry)
        self.watcher = PolicyWatcher(cfg, self.guard, on_reload=self._count_reload,
                                     before_use=self._publish_policies)
        if self._reload_requested:
            self.watcher.request_reload()

    async def _join_group(self, control_ends: dict[int, int]) -> None:
        """Static membership's guards, then the app joins the group and the background tasks start."""
        from rsafe.stream.membership import FencingWatch, live_duplicate

        cfg, app = self.cfg, self.app
        instance = cfg.resolved_group_instance_id
        if instance is not None:
            try:
                other = await asyncio.to_thread(live_duplicate, cfg.bootstrap, cfg.group_id, instance,
                                                cfg.security.client_kwargs())
            except Exception as err:  # noqa: BLE001 - the check must not stop a worker on a quirky broker
                log.warning("could not check the group's members for a duplicate instance id: %s", err)
                other = None
            if other is not None:
                raise WorkerError(f"another worker of group {cfg.group_id!r} with group_instance_id "
                                  f"{instance!r} is running: {other}. Two workers of one group on one host "
                                  "need distinct ids: set group_instance_id (RSAFE_GROUP_INSTANCE_ID)")
            self.fencing = FencingWatch(cfg.group_id, instance).install()
        await app.start()
        if self.feedback is not None:
            self._tasks.append(asyncio.create_task(self.feedback.tick_forever(), name="rsafe-feedback-ticks"))
        if self.models is not None:
            self._tasks.append(asyncio.create_task(self.models.follow(control_ends), name="rsafe-models-watch"))
        await app.producer.maybe_start()
        self._gc_before = tune_gc(cfg.gc)
        log.info("worker %s consuming %s as group %s%s (%s, batch %d / %.0f ms, %d in flight)",
                 self.worker_id, ", ".join(t.topic for t in cfg.inputs), cfg.group_id,
                 f", static member {instance}" if instance else "", cfg.processing_guarantee, cfg.batch.size,
                 cfg.batch.linger_ms, cfg.batch.max_inflight)

    async def _publish_policies(self, registry: Any) -> None:
        stored = await asyncio.to_thread(self.publisher.publish, registry)
        if stored:
            log.info("policy store %s: published %s", self.cfg.outputs.policies_topic, ", ".join(stored))

    def _count_reload(self, changed: dict[str, str]) -> None:
        self.telemetry.policy_reload()

    def _lag(self) -> list[tuple[str, int, int]]:
        """(topic, partition, records not yet read) of the assigned input partitions."""
        consumer = self.app.consumer
        inputs = {t.topic for t in self.cfg.inputs}
        out = []
        for tp in consumer.assignment():
            if tp.topic not in inputs:
                continue
            high = consumer.highwater(tp)
            read = internals.read_offset(consumer, tp)
            if high is None:
                continue
            out.append((tp.topic, tp.partition, max(0, high - (read + 1 if read is not None else 0))))
        return out

    def stats(self) -> dict[str, Any]:
        """Telemetry counters plus how often delivery paused because the agent's buffer was full."""
        out = self.telemetry.snapshot()
        intake = getattr(self.app, "intake", None) if self.app is not None else None
        out["fetch_pauses"] = ((internals.buffer_full_count(self.app) if self.app is not None else 0)
                               + (intake.full_waits if intake is not None else 0))
        return out

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        watch_task = None
        try:
            try:
                started = await self._start_unless_stopped()
            except WorkerError as err:
                log.error("%s", err)
                return EXIT_FAILED
            if not started or self.app is None:  # stopped while starting
                log.info("stopped while starting")
                return EXIT_OK
            watch_task = asyncio.create_task(self.watcher.run(), name="rsafe-policy-watch")
            self.ready.set()
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                if self.app.crashed:
                    log.error("the Faust app crashed: %r; stopping", self.app.crash_reason)
                    self.exit_code = EXIT_CRASHED
                    break
                if self.fencing is not None and not self.fencing.armed and self.assigned:
                    self.fencing.armed = True
            await self._shutdown()
            return self.exit_code
        finally:
            if watch_task is not None:
                watch_task.cancel()
            await self._close()

    def readiness(self) -> dict[str, bool | str]:
        """What ``/readyz`` reports: each check True, or why not."""
        return {
            "engine": True if self.guard is not None else "the engine is starting",
            "partitions": True if self.assigned else "no partitions assigned yet",
            "stopping": True if not self._stop.is_set() else "the worker is stopping",
            "restart": True if self.restart_required is None else f"restart required: {self.restart_required}",
        }

    @property
    def assigned(self) -> bool:
        """The consumer holds at least one partition."""
        try:
            return bool(self.app is not None and self.app.consumer.assignment())
        except Exception:  # noqa: BLE001 - consumer not started yet
            return False

    async def _start_unless_stopped(self) -> bool:
        """``_start``, abandoned at once when a stop is requested meanwhile (a start can wait on a
        broker or a group that never answers); False when it was."""
        start = asyncio.create_task(self._start(), name="rsafe-start")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if start.done():
            start.result()  # WorkerError propagates
            return not self._stop.is_set() or self.app is not None
        start.cancel()
        await asyncio.wait({start}, timeout=10)
        if self.app is not None:
            try:
                await asyncio.wait_for(self.app.stop(), timeout=5)
            except Exception:  # noqa: BLE001 - stopping a half-started app: best effort
                pass
        return False

    async def _shutdown(self) -> None:
        """Stop taking batches, let the in-flight ones publish and ack, commit, stop Faust.

        Messages that were taken but not started, and batches left unacked on purpose (engine dead
        or failing during the stop), are not committed: they are redelivered."""
        cfg = self.cfg
        if self.fencing is not None:
            self.fencing.armed = False  # leaving the group now is not a fencing
        log.info("stopping: no more fetching; finishing %d in-flight batch(es)", self.pipeline.inflight)
        self.moderator.stopping = True
        self.pipeline.stopping = True  # no new batch; a publish that keeps failing gives up (→ redelivered)
        started = time.perf_counter()
        drain = asyncio.ensure_future(self.pipeline.drain())
        done, _ = await asyncio.wait({drain}, timeout=cfg.shutdown_timeout_s)
        if not done:
            drain.cancel()
            log.error("in-flight batches did not finish within %.0f s; exiting with them unacked (they "
                      "will be redelivered)", cfg.shutdown_timeout_s)
            self.exit_code = self.exit_code or EXIT_FAILED
        if self.assigned:
            try:
                await asyncio.wait_for(self.app.consumer.commit(), timeout=10)
            except Exception as err:  # noqa: BLE001 - the next owner then redoes the uncommitted tail
                log.warning("final commit failed: %s", err)
        # Faust: stop agents, consumer, producer. Bounded: a consumer still waiting on a group join
        # that never completes must not hold the stop (run_worker exits past its thread).
        stop = asyncio.ensure_future(self.app.stop())
        done, _ = await asyncio.wait({stop}, timeout=15 if self.assigned else 5)
        if not done:
            log.warning("the Kafka client did not stop in time (nothing of ours was in flight)")
        log.info("stopped in %.1f s; stats %s", time.perf_counter() - started, json.dumps(self.stats()))

    async def _close(self) -> None:
        if self._gc_before is not None:
            untune_gc(self._gc_before)
            self._gc_before = None
        for task in self._tasks:
            task.cancel()
        if self.feedback is not None:
            await self.feedback.reader.close()
        if self.fencing is not None:
            self.fencing.remove()
        if self.http is not None:
            await self.http.stop()
        if self._datadir is not None:
            shutil.rmtree(self._datadir, ignore_errors=True)
        if self._owns_backend and self._backend is not None:
            backend, self._backend = self._backend, None
            await asyncio.to_thread(backend.close)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None
        await asyncio.to_thread(self.providers.shutdown)


def tune_gc(cfg: Any) -> tuple[int, int, int]:
    """Apply ``gc:`` (``StreamConfig.gc``) to this process: a higher young-generation threshold,
    then the start-up heap collected once and frozen. Returns the thresholds before (for
    ``untune_gc``)."""
    before = gc.get_threshold()
    if cfg.gen0_threshold:
        gc.set_threshold(cfg.gen0_threshold, before[1], before[2])
    if cfg.freeze:
        gc.collect()
        gc.freeze()
    log.debug("gc: thresholds %s, %d objects frozen", gc.get_threshold(), gc.get_freeze_count())
    return before


def untune_gc(before: tuple[int, int, int]) -> None:
    """Undo ``tune_gc`` when the worker stops (a process that runs more — tests, benchmarks — gets
    its collector back as it was, and objects frozen at start can be collected again)."""
    gc.unfreeze()
    gc.set_threshold(*before)


def _providers(cfg: StreamConfig, worker_id: str, backend: Any) -> Any:
    from rsafe.models.versions import artifact_version
    from rsafe.stream.telemetry import providers

    engine = cfg.engine or getattr(backend, "cfg", None)
    attrs = {"service.instance.id": worker_id, "rsafe.worker.id": worker_id, "rsafe.consumer.group": cfg.group_id}
    if engine is not None:
        attrs["rsafe.model"] = engine.display_id
        version = artifact_version(engine.model)
        if version:
            attrs["rsafe.model.version"] = version
    return providers(cfg.telemetry, attrs)


async def serve(cfg: StreamConfig, *, backend: Any = None, install_signals: bool = True,
                on_ready: Callable[[GuardWorker], object] | None = None) -> int:
    """Run a worker in the current event loop until SIGTERM/SIGINT (or ``request_stop``)."""
    worker = GuardWorker(cfg, backend=backend)
    loop = asyncio.get_running_loop()
    if install_signals:
        loop.add_signal_handler(signal.SIGTERM, worker.request_stop)
        loop.add_signal_handler(signal.SIGINT, worker.request_stop)
        loop.add_signal_handler(signal.SIGHUP, worker.request_reload)
    ready_task = None
    if on_ready is not None:
        async def _ready() -> None:
            await worker.ready.wait()
            on_ready(worker)
        ready_task = asyncio.create_task(_ready())
    try:
        return await worker.run()
    finally:
        if ready_task is not None:
            ready_task.cancel()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids (``telemetry.json_logs``)."""

    def format(self, record: logging.LogRecord) -> str:
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if ctx.is_valid:
            out["trace_id"] = f"{ctx.trace_id:032x}"
            out["span_id"] = f"{ctx.span_id:016x}"
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", json_logs: bool = False) -> None:
    """Log to stderr (plain lines, or JSON with trace ids). Message content is never logged at
    INFO or above: records name events by topic, partition, offset and id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    quiet = logging.WARNING if level.upper() != "DEBUG" else logging.DEBUG
    for name in ("faust", "mode", "aiokafka", "kafka", "vllm", "transformers", "opentelemetry"):
        logging.getLogger(name).setLevel(quiet)


def run_worker(cfg: StreamConfig) -> int:
    """``rsafe worker``: blocking entry point; returns the exit status.

    A worker stopped while its Kafka client still waits on the broker (e.g. a group join that
    never completes) leaves that client's thread behind; the process then exits without waiting
    for it, so a stop is always prompt."""
    code = asyncio.run(serve(cfg))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _lingering_threads():
        time.sleep(0.1)
    if _lingering_threads():
        log.warning("exiting with %d Kafka client thread(s) still waiting on the broker", len(_lingering_threads()))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _lingering_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]

