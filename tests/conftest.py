"""Shared fixtures: the demo model (built once, cached) and real engines on it (started once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared helper modules (streamkit)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _end_the_tests_processes():
    """Every process a test started through ``streamkit`` (``start_worker``, ``own``) ends with the
    test, pass or fail: a failed wait must not leave a worker running after the suite."""
    yield
    kit = sys.modules.get("streamkit")
    if kit is not None:
        kit.end_started()


@pytest.fixture(scope="session", autouse=True)
def _demo_benchmarks() -> None:
    """The synthetic demo evaluation sets by name (``load_benchmark("demo")``): the ``rsafe`` command
    registers them, nothing does on import, so the tests do it here."""
    from rsafe.demo.benchmarks import register_demo_benchmarks

    register_demo_benchmarks()


DEMO_WINDOW_TOKENS = 128
"""The demo model judges windows of up to this many content tokens (``rsafe.demo.build.WINDOW_TOKENS``;
stream/demo.yaml sets the same)."""


BUILDS = ROOT / ".cache"
"""Where tests cache what they build (demo LoRA adapters); never next to the committed model."""


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo guard model as committed (``demo/model``; ``RSAFE_DEMO_MODEL`` names another build),
    used as it is: nothing is trained on the way (``test_demo_model.py`` checks it matches its recipe)."""
    from rsafe.demo.build import DEMO_MODEL_DIR, read_manifest

    path = Path(os.environ.get("RSAFE_DEMO_MODEL", DEMO_MODEL_DIR))
    if read_manifest(path) is None:
        pytest.fail(f"no demo model at {path}: the repository carries it in demo/model/ "
                    "(`make demo-model-rebuild` rebuilds it from its recipe)")
    return path


@pytest.fixture(scope="session")
def demo_lora_dir(demo_model_dir: Path) -> Path:
    from rsafe.demo.build import build_demo_lora

    return build_demo_lora(demo_model_dir, BUILDS / "demo-lora")


@pytest.fixture(scope="session")
def flipped_lora(demo_model_dir: Path) -> Path:
    """A deliberately bad adapter: the demo corpus with opposite labels (gate and hot-swap tests).
    40 steps at 3e-3 (19 s) flip 34 of the 55 rsafe-default prompts of test_hotswap against the
    corpus adapter; the 200 steps at 5e-4 used before (94 s) flipped 27."""
    from rsafe.demo.build import build_demo_lora

    return build_demo_lora(demo_model_dir, BUILDS / "demo-lora-flipped", variant="flipped", steps=40, lr=3e-3)


def demo_engine_config(model_dir: Path, backend: str = "vllm", **overrides):
    """Engine settings for the demo model on this machine (CPU: float32, eager, small context)."""
    from rsafe.models import GenerationConfig, InputLimits
    from rsafe.models.config import local_engine_config

    base = dict(model_id="rsafe-demo", generation=GenerationConfig(max_tokens=128),
                limits=InputLimits(max_window_tokens=DEMO_WINDOW_TOKENS))
    base.update(overrides)
    return local_engine_config(str(model_dir), backend, **base)


@pytest.fixture(scope="session")
def vllm_guard(demo_model_dir: Path, demo_lora_dir: Path):
    """One in-process vLLM engine on the demo model for the whole session (LoRA enabled)."""
    from rsafe.models import Guard

    cfg = demo_engine_config(demo_model_dir, enable_lora=True, max_lora_rank=8,
                             lora_adapters={"demo-lora": str(demo_lora_dir)})
    guard = Guard.from_config(cfg)
    yield guard
    guard.close()


@pytest.fixture(scope="session")
def hf_guard(demo_model_dir: Path):
    from rsafe.models import Guard

    guard = Guard.from_config(demo_engine_config(demo_model_dir, backend="transformers"))
    yield guard
    guard.close()
