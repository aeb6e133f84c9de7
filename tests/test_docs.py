"""The docs say what the code accepts: every YAML snippet in README.md and docs/ loads, every
worker-config snippet validates with ``load_config``, and every inline ``key: value`` names a field
that exists.

A worker-config snippet is a fenced block whose top-level keys are worker settings. One with
``inputs`` is a whole config and must validate as it is; one without is deliberately partial and
must say so on its first line (``# partial``): it is validated on top of a minimal config.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from rsafe.stream.config import StreamConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MINIMAL = {"broker": "127.0.0.1:9092", "inputs": [{"topic": "chat.general", "policy": "rsafe-default"}]}


def fenced(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, body) of each fenced code block."""
    text = path.read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def worker_snippets() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for line, lang, body in fenced(path):
            if lang in ("json", "bash", "python"):
                continue
            try:
                data = yaml.safe_load(body)
            except yaml.YAMLError:
                continue
            if isinstance(data, dict) and set(data) & set(StreamConfig.model_fields):
                out.append((f"{path.relative_to(ROOT)}:{line}", body))
    return out


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_yaml_block_loads(path):
    for line, lang, body in fenced(path):
        if lang == "yaml":
            yaml.safe_load(body)  # raises with the line on a bad block


SNIPPETS = worker_snippets()


def test_the_docs_have_worker_config_snippets():
    assert len(SNIPPETS) >= 2  # docs/STREAM.md: the reference config and the telemetry section


@pytest.mark.parametrize("where,body", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_every_worker_config_snippet_validates(where, body):
    data = yaml.safe_load(body)
    if "inputs" not in data:
        assert body.lstrip().startswith("# partial"), \
            f"{where}: a worker-config snippet without inputs must be marked '# partial' on its first line"
        data = {**MINIMAL, **data}
    # secrets the snippets say come from the environment (never written in a config file)
    load_config(data=data, env={"RSAFE_SECURITY__SASL_PASSWORD": "from-the-environment"})  # names a bad key


def _field_names() -> set[str]:
    """Every field name of the project's settings and records (and TRL's GRPOConfig, which
    ``RSafeGRPOConfig`` extends): the vocabulary of an inline ``key: value``."""
    from rsafe.models.config import EngineConfig, GenerationConfig
    from rsafe.models.verdict import Verdict
    from rsafe.policies.policy import Policy
    from rsafe.schemas import feedback, models, records
    from rsafe.training.grpo import RSafeGRPOConfig

    names: set[str] = set()
    seen: set[type] = set()

    def walk(t: object) -> None:
        for arg in typing.get_args(t):
            walk(arg)
        if not isinstance(t, type) or t in seen:
            return
        seen.add(t)
        if issubclass(t, BaseModel):
            for name, f in t.model_fields.items():
                names.add(name)
                walk(f.annotation)
        elif dataclasses.is_dataclass(t):
            names.update(f.name for f in dataclasses.fields(t))

    modules = (records, feedback, models)
    for t in (StreamConfig, EngineConfig, GenerationConfig, Verdict, Policy, RSafeGRPOConfig,
              *(v for m in modules for v in vars(m).values() if isinstance(v, type))):
        walk(t)
    return names


def test_inline_settings_name_fields_that_exist():
    names = _field_names()
    wrong = []
    for path in DOCS:
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for m in re.finditer(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): ([^`]+)`", text):
            unknown = [k for k in m.group(1).split(".") if k not in names]
            if unknown:
                wrong.append(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0)} "
                             f"({', '.join(unknown)} is no setting or record field)")
    assert not wrong, "\n".join(wrong)
