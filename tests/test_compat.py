"""The fence around Faust's and aiokafka's insides (``rsafe.stream.compat``): the pinned versions
pass, another version or a moved private name stops the worker with an error that says which."""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata

import pytest

from rsafe.stream import compat


def test_the_installed_versions_are_the_supported_ones():
    compat.check()  # the lock's faust-streaming and aiokafka, every private name in place


def test_another_version_is_refused_unless_allowed(monkeypatch, caplog):
    real = metadata.version
    monkeypatch.setattr(compat.metadata, "version",
                        lambda dist: "0.16.0" if dist == "faust-streaming" else real(dist))
    with pytest.raises(compat.UnsupportedVersion, match=r"faust-streaming 0\.16\.0 \(supported: 0\.15\.x\).*"
                                                        r"RSAFE_ALLOW_UNTESTED_VERSIONS=1"):
        compat.check(env={})
    with caplog.at_level(logging.WARNING, logger="rsafe.stream.compat"):
        compat.check(env={compat.ALLOW_ENV: "1"})
    assert "running anyway" in caplog.text


def test_a_moved_private_name_is_refused_even_when_allowed(monkeypatch):
    class Moved:
        pass

    monkeypatch.setattr(compat, "_private_names", lambda: [("aiokafka Fetcher", Moved, "_proc_fetch_request")])
    with pytest.raises(compat.UnsupportedVersion, match=r"aiokafka Fetcher\._proc_fetch_request missing"):
        compat.check(env={compat.ALLOW_ENV: "1"})


def test_the_worker_does_not_start_on_an_unsupported_version(monkeypatch, caplog):
    from rsafe.models.config import local_engine_config
    from rsafe.models.engines import make_backend
    from rsafe.stream.config import load_config
    from rsafe.stream.exit_codes import EXIT_FAILED
    from rsafe.stream.worker import GuardWorker

    real = metadata.version
    monkeypatch.setattr(compat.metadata, "version", lambda dist: "0.13.0" if dist == "aiokafka" else real(dist))
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    cfg = load_config(data={"broker": "127.0.0.1:1", "inputs": [{"topic": "chat", "policy": "rsafe-default"}],
                            "http": {"enabled": False}}, env={})
    worker = GuardWorker(cfg, backend=make_backend(local_engine_config("null-engine", "null")))
    with caplog.at_level(logging.ERROR, logger="rsafe.stream.worker"):
        assert asyncio.run(worker.run()) == EXIT_FAILED
    assert "unsupported aiokafka 0.13.0" in caplog.text
