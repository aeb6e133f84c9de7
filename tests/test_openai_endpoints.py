"""Several OpenAI-compatible engine endpoints (``engine.base_url`` as a list): least outstanding
requests, a failing server out of rotation and back after its back-off, an error only when every
server failed, one persistent httpx client per event loop.

The servers are small real HTTP servers on 127.0.0.1 (``http.server``) that answer
``/v1/chat/completions`` like vLLM; nothing of httpx is mocked. Fast: no model, no broker.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rsafe.models.config import EngineConfig, GenerationConfig
from rsafe.models.engines import EngineError, OpenAIBackend, endpoint_urls, make_backend
from rsafe.stream.config import ConfigError, load_config

GEN = GenerationConfig(max_tokens=32, structured=False, top_logprobs=0)
ANSWER = "<think>fine</think>\n\\boxed{safe}"


class FakeServer:
    """An OpenAI-compatible chat server on a free 127.0.0.1 port.

    ``mode``: ``ok`` answers, ``fail`` answers 500 to everything. A user turn containing ``SLOW``
    is answered after ``slow_s``; one containing ``REJECT`` gets a 400 (a bad request, not a bad
    server). ``hits`` counts chat requests, ``peers`` the client ports seen (connections)."""

    def __init__(self, name: str, mode: str = "ok", slow_s: float = 0.5, delay_s: float = 0.0):
        self.name, self.mode, self.slow_s, self.delay_s = name, mode, slow_s, delay_s
        self.hits = 0
        self.peers: set[int] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the client's pool reuses connections

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "guard", "max_model_len": 2048}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": "not found"})
                    return
                with server._lock:
                    server.hits += 1
                    server.peers.add(self.client_address[1])
                turn = body["messages"][0]["content"]
                if server.mode == "fail":
                    self._send(500, {"error": f"{server.name} is broken"})
                    return
                if "REJECT" in turn:
                    self._send(400, {"error": "bad request"})
                    return
                time.sleep(server.slow_s if "SLOW" in turn else server.delay_s)
                self._send(200, {
                    "choices": [{"message": {"role": "assistant", "content": f"{ANSWER} {server.name}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[FakeServer] = []

    def make(*args, **kw) -> FakeServer:
        made.append(FakeServer(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _dead_url() -> str:
    """A 127.0.0.1 port where nothing listens (connection refused)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _backend(urls, **kw) -> OpenAIBackend:
    backend = make_backend(EngineConfig(backend="openai", model="guard", base_url=urls, request_timeout_s=5, **kw))
    assert isinstance(backend, OpenAIBackend)
    return backend


def _served_by(completions) -> list[str]:
    return [c.text.rsplit(" ", 1)[-1] for c in completions]


# --------------------------------------------------------------------------- configuration


def test_base_url_accepts_a_string_a_list_and_commas():
    one = EngineConfig(backend="openai", model="m", base_url="http://a:8000/v1")
    assert one.base_url == "http://a:8000/v1" and endpoint_urls(one.base_url) == ["http://a:8000/v1"]
    many = EngineConfig(backend="openai", model="m", base_url=["http://a:8000/v1", " http://b:8000/v1/ "])
    assert many.base_url == ["http://a:8000/v1", "http://b:8000/v1/"]
    assert endpoint_urls(many.base_url) == ["http://a:8000/v1", "http://b:8000/v1"]
    commas = EngineConfig(backend="openai", model="m", base_url="http://a:8000/v1,http://b:8000/v1")
    assert commas.base_url == ["http://a:8000/v1", "http://b:8000/v1"]


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    (["a:8000/v1"], "expected http"),
    (["http://a/v1", "http://a/v1/"], "listed twice"),
    (42, "a URL or a list"),
])
def test_base_url_errors_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(backend="openai", model="m", base_url=bad)


def test_openai_backend_still_needs_a_base_url():
    with pytest.raises(ValueError, match="needs base_url"):
        EngineConfig(backend="openai", model="m", base_url="")


def test_base_url_list_from_the_environment(tmp_path):
    cfg_file = tmp_path / "w.yaml"
    cfg_file.write_text("inputs: [{topic: chat.in, policy: rsafe-default}]\n"
                        "engine: {backend: openai, model: guard, base_url: http://x:8000/v1}\n")
    cfg = load_config(cfg_file, env={"RSAFE_ENGINE__BASE_URL": "[http://a:8000/v1, http://b:8000/v1]"})
    assert cfg.engine.base_url == ["http://a:8000/v1", "http://b:8000/v1"]
    cfg = load_config(cfg_file, env={"RSAFE_ENGINE__BASE_URL": "http://a:8000/v1,http://b:8000/v1"})
    assert cfg.engine.base_url == ["http://a:8000/v1", "http://b:8000/v1"]
    with pytest.raises(ConfigError, match="engine.base_url"):
        load_config(cfg_file, env={"RSAFE_ENGINE__BASE_URL": "[ftp://a/v1]"})


# --------------------------------------------------------------------------- routing


def test_requests_spread_over_the_servers(servers):
    a, b = servers("a", delay_s=0.05), servers("b", delay_s=0.05)
    backend = _backend([a.url, b.url])
    try:
        out = backend.generate([f"hello {i}" for i in range(40)], GEN, [None] * 40)
    finally:
        backend.close()
    assert all(c.error is None and c.text.startswith(ANSWER) for c in out)
    assert a.hits + b.hits == 40
    assert 12 <= a.hits <= 28, (a.hits, b.hits)  # balanced, not all on one server


def test_least_outstanding_requests_wins(servers):
    a, b = servers("a", slow_s=1.0), servers("b", slow_s=1.0)
    backend = _backend([a.url, b.url])

    async def scenario():
        slow = asyncio.create_task(backend.agenerate(["SLOW"], GEN, [None]))
        await asyncio.sleep(0.2)  # the slow request is outstanding on one server
        fast = [await backend.agenerate([f"quick {i}"], GEN, [None]) for i in range(6)]
        return await slow, fast

    try:
        slow, fast = asyncio.run(scenario())
    finally:
        backend.close()
    busy = _served_by(slow)[0]
    assert {_served_by(f)[0] for f in fast} == ({"a", "b"} - {busy})


def test_a_failing_server_is_taken_out_and_the_call_still_succeeds(servers):
    good, bad = servers("good"), servers("bad", mode="fail")
    dead = _dead_url()
    backend = _backend([bad.url, dead, good.url])

    async def scenario():
        first = await backend.agenerate([f"m{i}" for i in range(12)], GEN, [None] * 12)
        bad_hits = bad.hits
        second = await backend.agenerate([f"n{i}" for i in range(12)], GEN, [None] * 12)
        return first, bad_hits, second

    try:
        first, bad_hits, second = asyncio.run(scenario())
        status = {s["base_url"]: s for s in backend.endpoint_status()}
    finally:
        backend.close()
    assert all(c.error is None for c in first + second)
    assert set(_served_by(first + second)) == {"good"}
    assert bad_hits >= 1 and bad.hits == bad_hits  # out of rotation: the second call did not try it
    assert not status[bad.url]["healthy"] and "server error 500" in status[bad.url]["last_error"]
    assert not status[dead]["healthy"] and "unreachable" in status[dead]["last_error"]
    assert status[good.url]["healthy"] and status[good.url]["outstanding"] == 0


def test_a_server_comes_back_after_its_backoff(servers):
    a, b = servers("a", mode="fail"), servers("b")
    backend = _backend([a.url, b.url])
    backend.pool.backoff_s = backend.pool.max_backoff_s = 0.3

    async def scenario():
        await backend.agenerate([f"x{i}" for i in range(4)], GEN, [None] * 4)
        assert not backend.endpoint_status()[0]["healthy"]
        a.mode = "ok"  # repaired
        await asyncio.sleep(0.4)  # past the back-off
        return await backend.agenerate([f"y{i}" for i in range(20)], GEN, [None] * 20)

    try:
        out = asyncio.run(scenario())
    finally:
        backend.close()
    assert "a" in _served_by(out) and all(c.error is None for c in out)
    assert backend.endpoint_status()[0]["healthy"] and backend.endpoint_status()[0]["failures"] == 0


def test_the_call_fails_only_when_every_server_failed(servers):
    bad = servers("bad", mode="fail")
    dead = _dead_url()
    backend = _backend([bad.url, dead])
    try:
        with pytest.raises(EngineError) as err:
            backend.generate(["hello"], GEN, [None])
    finally:
        backend.close()
    text = str(err.value)
    assert "all 2 OpenAI-compatible servers failed" in text
    assert "server error 500" in text and "unreachable" in text and dead in text


def test_a_rejected_request_does_not_take_the_server_out(servers):
    a = servers("a")
    backend = _backend([a.url])
    try:
        out = backend.generate(["REJECT this", "fine"], GEN, [None, None])
    finally:
        backend.close()
    assert "server rejected request (400)" in out[0].error and out[1].error is None
    assert backend.endpoint_status()[0]["healthy"] and backend.endpoint_status()[0]["failures"] == 0


def test_one_persistent_client_per_loop_reuses_connections(servers):
    a = servers("a")
    backend = _backend(a.url)  # a plain string still works

    async def scenario():
        first = backend._client()
        for i in range(5):  # one request at a time: one kept-alive connection serves them all
            await backend.agenerate([f"seq {i}"], GEN, [None])
        return first is backend._client()

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario())
        assert a.hits == 5 and len(a.peers) == 1
        assert len(backend._clients) == 1
        # close() from another thread while the loop runs closes the client on its own loop
        runner = threading.Thread(target=loop.run_forever, daemon=True)
        runner.start()
        client = next(iter(backend._clients.values()))
        backend.close()
        assert client.is_closed and not backend._clients
    finally:
        loop.call_soon_threadsafe(loop.stop)
        time.sleep(0.1)
        loop.close()


def test_sync_generate_leaves_no_client_behind(servers):
    a = servers("a")
    backend = _backend([a.url])
    out = backend.generate(["one", "two"], GEN, [None, None])
    assert [c.error for c in out] == [None, None]
    assert len(backend._clients) == 0  # asyncio.run's loop is gone; so is its client


def test_server_context_length_and_token_counts_fail_over(servers):
    a = servers("a")
    backend = _backend([_dead_url(), a.url])
    assert backend._server_max_model_len() == 2048


# --------------------------------------------------------------------------- adapters


def test_a_configured_adapter_the_server_cannot_serve_fails_at_start_with_what_to_do(servers, tmp_path):
    """``--lora NAME=PATH`` with ``--engine openai``: a server that neither lists the adapter nor
    loads it at run time (this one answers 404 to ``/v1/load_lora_adapter``) stops the engine before
    the first request, instead of an error verdict ("model does not exist") for every message."""
    a = servers("a")
    with pytest.raises(EngineError, match=r"adapter 'mine' is not served and could not be loaded \(the server does "
                                          r"not allow loading adapters at run time\).*--lora-modules mine=/srv/mine"):
        _backend([a.url], enable_lora=True, lora_adapters={"mine": "/srv/mine"})
    backend = _backend([a.url], enable_lora=True, lora_adapters={"guard": "/srv/guard"})  # listed: served as it is
    assert backend._adapters["guard"][0] == "guard"
    with pytest.raises(EngineError, match="cannot list its models"):
        _backend([_dead_url()], enable_lora=True, lora_adapters={"guard": "/srv/guard"})
