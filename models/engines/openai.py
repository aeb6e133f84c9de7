"""``OpenAIBackend``: any OpenAI-compatible server (e.g. ``vllm serve``), or several serving the
same model, for remote GPUs; ``EndpointPool`` picks the server per request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rsafe.models.config import EngineConfig, GenerationConfig
from rsafe.models.engines.base import (
    FORCED_ANSWER_REGEX, Completion, EngineError, adapter_versions, forced_head, needs_forced_answer,
)
from rsafe.models.tokens import HFTokenCounter, approximate_spans

#: Back-off of a failing OpenAI-compatible endpoint: out of rotation for this long after its first
#: failure, doubled per further failure up to ``ENDPOINT_MAX_BACKOFF_S``.
ENDPOINT_BACKOFF_S = 1.0
ENDPOINT_MAX_BACKOFF_S = 30.0

_openai_log = logging.getLogger("rsafe.models.openai")


def endpoint_urls(base_url: str | Sequence[str] | None) -> list[str]:
    """``engine.base_url`` (one URL, several separated by commas, or a list) as a list of base URLs
    without a trailing slash."""
    if not base_url:
        return []
    items = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    return [u.strip().rstrip("/") for u in items if u and u.strip()]


@dataclass
class Endpoint:
    """One OpenAI-compatible server and what the backend knows about it."""

    base: str
    """Its API base URL, e.g. ``http://vllm-0:8000/v1``."""
    outstanding: int = 0
    """Requests sent and not yet answered."""
    failures: int = 0
    """Consecutive failures (connection errors, 5xx); 0 when it last answered."""
    down_until: float = 0.0
    """``time.monotonic()`` before which it is out of rotation (tried only when no other is left)."""
    last_error: str | None = None

    @property
    def root(self) -> str:
        """The server root (``/tokenize`` lives there, not under ``/v1``)."""
        return self.base[:-3] if self.base.endswith("/v1") else self.base

    def healthy(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.down_until


class EndpointPool:
    """The choice of server per request: the healthy one with the fewest outstanding requests (ties
    in turn), then the ones out of rotation, earliest back first. A server that fails is out of
    rotation for a back-off that doubles per consecutive failure; its next answer puts it back.
    Pooling, timeouts and connection retries are httpx's (one ``AsyncClient`` per event loop)."""

    def __init__(self, urls: Sequence[str], backoff_s: float = ENDPOINT_BACKOFF_S,
                 max_backoff_s: float = ENDPOINT_MAX_BACKOFF_S):
        if not urls:
            raise EngineError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        self.endpoints = [Endpoint(u) for u in urls]
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._turn = itertools.count()

    def order(self) -> list[Endpoint]:
        """Every endpoint, the preferred first (one request tries them in this order)."""
        now, n = time.monotonic(), len(self.endpoints)
        start = next(self._turn) % n
        ranked = sorted(range(n), key=lambda i: (self.endpoints[i].outstanding, (i - start) % n))
        up = [self.endpoints[i] for i in ranked if self.endpoints[i].healthy(now)]
        down = sorted((e for e in self.endpoints if not e.healthy(now)), key=lambda e: e.down_until)
        return up + down

    def failed(self, ep: Endpoint, reason: str) -> None:
        ep.failures += 1
        ep.last_error = reason
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (ep.failures - 1))
        ep.down_until = time.monotonic() + wait
        if len(self.endpoints) > 1:
            _openai_log.warning("engine endpoint %s out of rotation for %.1f s (failure %d): %s",
                                ep.base, wait, ep.failures, reason)

    def succeeded(self, ep: Endpoint) -> None:
        if ep.failures and len(self.endpoints) > 1:
            _openai_log.info("engine endpoint %s back in rotation", ep.base)
        ep.failures, ep.down_until, ep.last_error = 0, 0.0, None

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"base_url": e.base, "healthy": e.healthy(now), "outstanding": e.outstanding,
                 "failures": e.failures, "last_error": e.last_error} for e in self.endpoints]


class ServerTokenCounter:
    """Counts tokens with an OpenAI-compatible vLLM server's ``/tokenize`` endpoint (when no
    tokenizer is available locally); with several servers, the first that answers. Character spans
    are estimated (windows are verified)."""

    def __init__(self, root: str | Sequence[str], model: str, headers: dict[str, str], max_model_len: int,
                 timeout: float):
        self.roots = [root] if isinstance(root, str) else list(root)
        self.root = self.roots[0]
        self.model, self.headers = model, headers
        self.max_model_len = max_model_len
        self.timeout = timeout

    def _post(self, body: dict) -> int:
        import httpx

        errors = []
        unreachable = True
        for root in [self.root, *[r for r in self.roots if r != self.root]]:
            try:
                r = httpx.post(f"{root}/tokenize", json={"model": self.model, **body}, headers=self.headers,
                               timeout=self.timeout)
                r.raise_for_status()
                count = int(r.json()["count"])
            except (httpx.HTTPError, KeyError, ValueError) as err:
                unreachable = unreachable and isinstance(err, httpx.TransportError)
                errors.append(f"{root}/tokenize: {err}")
                continue
            self.root = root  # the next count asks the server that answered first
            return count
        what = "OpenAI-compatible server unreachable" if unreachable else "the server could not count tokens"
        raise EngineError(f"engine failure: {what} ({'; '.join(errors)}); "
                          "set engine.tokenizer to count locally")

    def count(self, user_turns: Sequence[str]) -> list[int]:
        return [self._post({"messages": [{"role": "user", "content": t}], "add_generation_prompt": True})
                for t in user_turns]

    def spans(self, text: str) -> list[tuple[int, int]]:
        return approximate_spans(text, self._post({"prompt": text, "add_special_tokens": False}))


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint, or several serving the same model; the server renders
    the model's chat template.

    An adapter name is sent as the ``model`` (vLLM serves LoRA adapters under their names). Token
    counts come from ``cfg.tokenizer`` (or a local ``cfg.model`` directory) when given, else from
    the server's ``/tokenize``; the context length from the server's model list when it says.

    Several servers (``base_url`` as a list): each request goes to the healthy one with the fewest
    outstanding requests (``EndpointPool``); a connection error or a 5xx takes that server out of
    rotation for a back-off (1 s, doubling to 30 s) and the request moves on to the next; the call
    raises ``EngineError`` only when every server failed it. A 4xx is the request's fault: that
    request gets an error completion and the server stays in rotation. One persistent
    ``httpx.AsyncClient`` per event loop keeps connections alive across calls (``close`` ends them).
    """

    connect_retries = 1
    """httpx transport retries of a failed connection attempt, per server and request."""
    max_connections = 1024
    """Connection pool bound of the client (HTTP/1.1: one request in flight per connection)."""

    def __init__(self, cfg: EngineConfig):
        import httpx

        self.cfg = cfg
        self.model_id = cfg.display_id
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.pool = EndpointPool(endpoint_urls(cfg.base_url))
        self.endpoints = self.pool.endpoints
        self._base = self.endpoints[0].base
        self._root = self.endpoints[0].root
        self._headers = headers
        self._timeout = httpx.Timeout(cfg.request_timeout_s, connect=min(10.0, cfg.request_timeout_s))
        self._sem_limit = 64
        self._counter: Any = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._clients_lock = threading.Lock()
        self._adapters: dict[str, tuple[str, str | None]] = {
            name: (name, v) for name, v in adapter_versions(cfg).items()}
        """name → (the name the server serves it under, version): static adapters are served under
        their names; an adapter loaded at run time under ``<name>-<version>`` (a new LoRA id)."""
        if cfg.lora_adapters:
            self._serve_static_adapters()

    def _serve_static_adapters(self) -> None:
        """Every configured adapter (``--lora NAME=PATH``, ``engine.lora_adapters``) is served by every
        server before the first request: a server that lists it (``--lora-modules``) is left alone;
        otherwise it is loaded under its name through ``/v1/load_lora_adapter`` (the server needs
        ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``; ``PATH`` is read by the
        server, so it must be a path the server sees). Any server that can do neither is an error
        that says what to do, not 404s ("model does not exist") on every request."""
        import httpx

        errors = []
        for ep in self.endpoints:
            try:
                r = httpx.get(f"{ep.base}/models", headers=self._headers, timeout=10.0)
                r.raise_for_status()
                served = {m.get("id") for m in r.json().get("data", [])}
            except (httpx.HTTPError, ValueError, AttributeError) as err:
                errors.append(f"{ep.base}: cannot list its models to check the adapters: {err!r}")
                continue
            for name, path in self.cfg.lora_adapters.items():
                if name in served:
                    continue
                try:
                    r = httpx.post(f"{ep.base}/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                                   headers=self._headers, timeout=self.cfg.request_timeout_s)
                except httpx.HTTPError as err:
                    errors.append(f"{ep.base}: loading adapter {name!r} failed: {err!r}")
                    continue
                if r.status_code < 400 or "already been loaded" in r.text:
                    _openai_log.info("loaded adapter %s from %s into %s", name, path, ep.base)
                    continue
                how = ("the server does not allow loading adapters at run time" if r.status_code in (404, 405)
                       else f"the server answered {r.status_code} {r.text[:200]}")
                errors.append(f"{ep.base}: adapter {name!r} is not served and could not be loaded ({how})")
        if errors:
            fix = ("start each server with --enable-lora --lora-modules "
                   + " ".join(f"{n}={p}" for n, p in self.cfg.lora_adapters.items())
                   + ", or with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=true so that the guard loads "
                   "them (the path must be readable by the server)")
            raise EngineError("; ".join(errors) + f". To serve the adapters: {fix}")

    def load_adapter(self, name: str, path: str, version: str) -> None:
        """Load the adapter into every server at run time (vLLM ``/v1/load_lora_adapter``; the server
        needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true`` and ``--enable-lora``)."""
        import httpx

        served = f"{name}-{version}"
        errors = []
        for ep in self.endpoints:
            try:
                r = httpx.post(f"{ep.base}/load_lora_adapter", json={"lora_name": served, "lora_path": str(path)},
                               headers=self._headers, timeout=self.cfg.request_timeout_s)
                if r.status_code >= 400 and "already been loaded" not in r.text:
                    errors.append(f"{ep.base}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(f"{ep.base}: {err!r}")
        if errors:
            raise EngineError(f"cannot load adapter {name}@{version} from {path}: " + "; ".join(errors))
        self._adapters[name] = (served, version)

    @property
    def token_counter(self) -> Any:
        if self._counter is None:
            max_len = self._server_max_model_len() or self.cfg.max_model_len
            local = self.cfg.tokenizer or (self.cfg.model if Path(self.cfg.model).expanduser().is_dir() else None)
            if local:
                from transformers import AutoTokenizer

                try:
                    self._counter = HFTokenCounter(AutoTokenizer.from_pretrained(local), max_len)
                except Exception as err:  # noqa: BLE001
                    raise EngineError(f"cannot load tokenizer {local!r}: {err}") from err
            else:
                self._counter = ServerTokenCounter([e.root for e in self.endpoints], self.cfg.model,
                                                   self._headers, max_len, self.cfg.request_timeout_s)
        return self._counter

    def _server_max_model_len(self) -> int | None:
        import httpx

        for ep in self.pool.order():
            try:
                r = httpx.get(f"{ep.base}/models", headers=self._headers, timeout=10.0)
                r.raise_for_status()
                for m in r.json().get("data", []):
                    if m.get("id") == self.cfg.model and m.get("max_model_len"):
                        return int(m["max_model_len"])
                return None
            except (httpx.HTTPError, ValueError, TypeError, AttributeError):
                continue
        return None

    def endpoint_status(self) -> list[dict[str, Any]]:
        """Per server: base URL, in rotation or not, outstanding requests, failures, last error."""
        return self.pool.status()

    # ------------------------------------------------------------------ HTTP client

    def _new_client(self) -> Any:
        import httpx

        transport = httpx.AsyncHTTPTransport(
            retries=self.connect_retries,
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections))
        return httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=transport)

    def _client(self) -> Any:
        """The running loop's persistent client (created on first use)."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                client = self._clients[loop] = self._new_client()
            return client

    async def _aclose_client(self) -> None:
        """Close the running loop's client (``generate`` runs each call on a loop of its own)."""
        with self._clients_lock:
            client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ requests

    def _body(self, user_turn: str, gen: GenerationConfig, adapter: str | None, head: str | None = None) -> dict:
        messages: list[dict[str, str]] = [{"role": "user", "content": user_turn}]
        body: dict[str, Any] = {
            "model": self._adapters.get(adapter, (adapter, None))[0] if adapter else self.cfg.model,
            "messages": messages,
            "max_tokens": gen.max_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
        }
        if gen.top_logprobs and (self.cfg.answer_logprobs == "inline" or head is not None):
            body.update(logprobs=True, top_logprobs=gen.top_logprobs)
        elif gen.top_logprobs:  # "rescore": the generated tokens' texts alone, to cut at a token boundary
            body.update(logprobs=True, top_logprobs=0)
        if gen.seed is not None:
            body["seed"] = gen.seed
        if gen.repetition_penalty != 1.0:
            body["repetition_penalty"] = gen.repetition_penalty
        if gen.structured:
            body["structured_outputs"] = {"regex": gen.structured_regex}
        if head is not None:  # continue the cut reasoning with a forced answer (vLLM chat API)
            messages.append({"role": "assistant", "content": head})
            body.update(max_tokens=8, temperature=0.0, continue_final_message=True, add_generation_prompt=False,
                        structured_outputs={"regex": FORCED_ANSWER_REGEX})
        return body

    def _rescore_body(self, user_turn: str, gen: GenerationConfig, adapter: str | None, head: str) -> dict:
        """One token after ``head`` (the generated text up to the token where the answer word
        starts), with its top candidates: ``answer_logprobs: rescore``. The generation then asks
        for no candidates (only each token's text), where they cost the server's front-end process
        a JSON object per candidate per token for the one position the guard reads
        (docs/BENCHMARKS.md "Front-end CPU")."""
        body = self._body(user_turn, gen, adapter, head)
        body.pop("structured_outputs", None)
        body.update(max_tokens=1, logprobs=True, top_logprobs=gen.top_logprobs)
        return body

    @staticmethod
    def _completion(user_turn: str, data: dict) -> Completion:
        choice = data["choices"][0]
        token_texts, candidates = [], None
        content_lp = (choice.get("logprobs") or {}).get("content")
        if content_lp:
            candidates = []
            for pos in content_lp:
                token_texts.append(pos.get("token", ""))
                candidates.append([(c.get("token", ""), c.get("logprob")) for c in pos.get("top_logprobs") or []])
        usage = data.get("usage") or {}
        return Completion(
            text=choice["message"].get("content") or "", token_texts=token_texts, candidates=candidates,
            prompt=user_turn, prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=usage.get("completion_tokens", 0), finish_reason=choice.get("finish_reason"),
        )

    async def _post(self, client: Any, turn: str, body: dict) -> Completion:
        """One request, server by server in the pool's order until one answers (or all failed)."""
        import httpx

        errors: list[str] = []
        for ep in self.pool.order():
            ep.outstanding += 1
            try:
                r = await client.post(f"{ep.base}/chat/completions", json=body)
            except httpx.HTTPError as err:
                reason = f"OpenAI-compatible server {ep.base} unreachable: {err!r}"
                self.pool.failed(ep, reason)
                errors.append(reason)
                continue
            finally:
                ep.outstanding -= 1
            if r.status_code >= 500:
                reason = f"server error {r.status_code} from {ep.base}: {r.text[:300]}"
                self.pool.failed(ep, reason)
                errors.append(reason)
                continue
            self.pool.succeeded(ep)
            if r.status_code >= 400:
                return Completion(prompt=turn, error=f"server rejected request ({r.status_code}): {r.text[:300]}")
            return self._completion(turn, r.json())
        if len(errors) == 1:
            raise EngineError(errors[0])
        raise EngineError(f"all {len(errors)} OpenAI-compatible servers failed: " + "; ".join(errors))

    async def agenerate(self, user_turns, gen, adapters):
        client = self._client()
        sem = asyncio.Semaphore(self._sem_limit)

        async def post(turn: str, body: dict) -> Completion:
            async with sem:
                return await self._post(client, turn, body)

        async def rescore(turn: str, adapter: str | None, c: Completion) -> None:
            """The answer's candidates from a one-token request (``answer_logprobs: rescore``)."""
            from rsafe.models.verdict import parse_output, token_at

            start = parse_output(c.text).answer_start
            if start is None:  # no answer to read a probability for
                return
            if not "".join(c.token_texts).startswith(c.text):  # (the tokens may add an end token's text)
                _openai_log.warning("answer rescoring skipped: the server's token texts do not spell its text")
                c.token_texts, c.candidates = [], None
                return
            at, cut = token_at(c.token_texts, start)  # the answer's token, and where it begins in the text
            # cut where the model's own token begins: a text cut inside it (e.g. "{" of "{safe")
            # would be a tokenization the model never produced
            r = await post(turn, self._rescore_body(turn, gen, adapter, c.text[:cut]))
            c.candidates = [[] for _ in c.token_texts]
            if r.error is None and r.candidates:
                c.candidates[at] = r.candidates[0]
            else:  # the verdict stands; its unsafe probability is unknown
                _openai_log.warning("answer rescoring got no candidates: %s", r.error or f"response {r.text!r}")

        async def one(turn: str, adapter: str | None) -> Completion:
            c = await post(turn, self._body(turn, gen, adapter))
            c.adapter_version = self._adapters.get(adapter, (None, None))[1] if adapter else None
            if c.error is None and needs_forced_answer(gen, c.text, c.finish_reason):
                head = forced_head(c.text)
                f = await post(turn, self._body(turn, gen, adapter, head))
                if f.error is None:
                    c.text = head + (f.text[len(head):] if f.text.startswith(head) else f.text)
                    c.token_texts, c.candidates = f.token_texts, f.candidates
                    c.completion_tokens += f.completion_tokens
                    c.answer_forced = True
            elif c.error is None and gen.top_logprobs and self.cfg.answer_logprobs == "rescore":
                await rescore(turn, adapter, c)
            return c

        return list(await asyncio.gather(*(one(t, a) for t, a in zip(user_turns, adapters))))

    def generate(self, user_turns, gen, adapters):
        async def run() -> list[Completion]:
            try:
                return await self.agenerate(user_turns, gen, adapters)
            finally:
                await self._aclose_client()

        return asyncio.run(run())

    def close(self) -> None:
        """Close every loop's client: on its loop (from another thread: waited for, 5 s at most)."""
        with self._clients_lock:
            clients = list(self._clients.items())
            self._clients.clear()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, client in clients:
            if client.is_closed or loop.is_closed():
                continue
            try:
                if loop is current:
                    loop.create_task(client.aclose())
                elif loop.is_running():
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
                else:
                    loop.run_until_complete(client.aclose())
            except Exception as err:  # noqa: BLE001 - closing is best effort
                _openai_log.debug("closing an engine HTTP client: %r", err)
