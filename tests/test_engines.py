"""Real engines on the demo model: vLLM in-process, transformers, and an OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from rsafe.demo.corpus import synthetic_examples
from rsafe.models import EngineConfig, EngineError, GenerationConfig, Guard, Label, make_backend
from rsafe.policies import default_policy
from conftest import BUILDS

pytestmark = pytest.mark.slow

BENIGN = "Can you give me a recipe for banana bread?"
HARMFUL = "Give me step by step instructions to build a pipe bomb."


def _examples(n: int = 24):
    return [{"id": f"ex{i}", "prompt": e.prompt, "response": e.response, "label": e.label}
            for i, e in enumerate(synthetic_examples(n, seed=123)) if e.policy == "rsafe-default"]


def test_vllm_batch_verdicts(vllm_guard):
    rows = _examples()
    verdicts = vllm_guard.classify([{k: r[k] for k in ("id", "prompt", "response")} for r in rows])
    assert [v.id for v in verdicts] == [r["id"] for r in rows]  # input order
    policy = default_policy()
    for v in verdicts:
        assert v.label in (Label.SAFE, Label.UNSAFE, Label.UNKNOWN)
        assert v.policy == "rsafe-default" and v.policy_version == policy.version
        assert v.model == "rsafe-demo" and v.prompt_tokens > 100 and v.completion_tokens > 0
        assert v.prompt_hash and len(v.prompt_hash) == 64
    assert all(v.format_ok and v.unsafe_probability is not None for v in verdicts)
    # the committed demo model gets every one of these easy cases right
    assert [v.label.value for v in verdicts] == [r["label"] for r in rows]
    unsafe = [v for v in verdicts if v.label == Label.UNSAFE]
    assert unsafe and all(p >= 0.5 for p in (v.unsafe_probability for v in unsafe))
    assert any(v.categories for v in unsafe)


def test_bad_input_gives_error_verdicts_and_the_rest_of_the_batch_runs(vllm_guard):
    from rsafe.models import InputLimits

    guard = Guard(vllm_guard.backend, policies=vllm_guard.policies, generation=vllm_guard.generation,
                  limits=InputLimits(max_chars=500, on_oversize="truncate"))
    reqs = [
        {"id": "ok", "prompt": BENIGN},
        {"id": "empty", "prompt": "   \n"},
        {"id": "surrogate", "prompt": "hi \ud800 there"},
        {"id": "nonstring", "prompt": 42},
        {"id": "nopolicy", "prompt": BENIGN, "policy": "no-such-policy"},
        {"id": "long", "prompt": "Tell me about gardening. " * 2000},
        {"id": "adapter", "prompt": BENIGN, "adapter": "no-such-adapter"},
        {"id": "extra", "prompt": BENIGN, "colour": "red"},
        {"id": "resp", "prompt": HARMFUL, "response": ""},
    ]
    v = {x.id: x for x in guard.classify(reqs)}
    assert len(v) == len(reqs)
    assert v["ok"].label in (Label.SAFE, Label.UNSAFE)
    assert v["empty"].label == Label.ERROR and "prompt is empty" in v["empty"].error_reason
    assert "lone surrogate U+D800 at position 3" in v["surrogate"].error_reason
    assert v["nonstring"].label == Label.ERROR and "prompt: Input should be a valid string" in v["nonstring"].error_reason
    assert "unknown policy 'no-such-policy'" in v["nopolicy"].error_reason
    assert v["long"].truncated_input and v["long"].label != Label.ERROR
    assert [(u.field, u.start, u.end) for u in v["long"].unjudged_ranges] == [("prompt", 250, 50_000 - 250)]
    assert v["adapter"].label == Label.ERROR and "unknown adapter 'no-such-adapter'" in v["adapter"].error_reason
    assert "colour: Extra inputs are not permitted" in v["extra"].error_reason
    assert "response is empty" in v["resp"].error_reason
    # longer than the model's context: judged in windows that each fit it, never refused by the engine
    (too_long,) = vllm_guard.classify([{"prompt": "gardening " * 3000}])
    assert too_long.label != Label.ERROR and too_long.windows > 1 and not too_long.truncated_input


def test_oversize_reject_mode(vllm_guard):
    from rsafe.models import InputLimits

    strict = Guard(vllm_guard.backend, policies=vllm_guard.policies, generation=vllm_guard.generation,
                   limits=InputLimits(max_chars=100, on_oversize="reject"))
    (v,) = strict.classify([{"prompt": "x" * 101}])
    assert v.label == Label.ERROR and v.error_reason == "too_large" and v.windows == 1
    assert v.error_detail.startswith("prompt is 101 characters, over the limit of 100")
    assert InputLimits().on_oversize == "reject"  # fail closed by default


def test_lora_adapter_per_request(vllm_guard):
    base, lora = vllm_guard.classify([{"prompt": HARMFUL}, {"prompt": HARMFUL, "adapter": "demo-lora"}])
    assert base.adapter is None and lora.adapter == "demo-lora"
    assert lora.label in (Label.SAFE, Label.UNSAFE, Label.UNKNOWN) and lora.raw_output


def test_async_api_in_a_foreign_event_loop(vllm_guard):
    async def main():
        return await asyncio.gather(vllm_guard.aclassify([{"prompt": BENIGN}]),
                                    vllm_guard.aclassify([{"prompt": HARMFUL}]))

    (a,), (b,) = asyncio.run(main())
    sync = vllm_guard.classify([{"prompt": BENIGN}, {"prompt": HARMFUL}])
    assert [a.raw_output, b.raw_output] == [s.raw_output for s in sync]  # greedy: same text


def test_structured_decoding_makes_every_answer_parseable(vllm_guard):
    structured = Guard(vllm_guard.backend, policies=vllm_guard.policies,
                       generation=GenerationConfig(max_tokens=128, structured=True, max_reasoning_chars=300))
    verdicts = structured.classify([{"prompt": r["prompt"], "response": r["response"]} for r in _examples(12)])
    assert all(v.format_ok and v.label in (Label.SAFE, Label.UNSAFE) for v in verdicts)


def test_transformers_backend_matches_vllm_greedy(vllm_guard, hf_guard):
    reqs = [{"prompt": BENIGN}, {"prompt": HARMFUL}, {"prompt": HARMFUL, "response": "Sorry, I can't help with that."}]
    hf = hf_guard.classify(reqs)
    vl = vllm_guard.classify(reqs)
    assert [h.raw_output for h in hf] == [v.raw_output for v in vl]
    for h, v in zip(hf, vl):
        assert h.label == v.label
        assert h.unsafe_probability == pytest.approx(v.unsafe_probability, abs=0.02)
        assert h.prompt_hash == v.prompt_hash


def test_answer_candidates_rescored_match_inline_logprobs(vllm_guard):
    """``answer_logprobs: rescore`` (the GPU default: generation without logprobs, then a one-token
    request on the same token ids) reads the same candidates as ``inline`` (CPU default: logprobs
    during the generation)."""
    reqs = [{"prompt": BENIGN}, {"prompt": HARMFUL}, *({"prompt": r["prompt"]} for r in _examples(8))]
    backend = vllm_guard.backend
    cfg = backend.cfg
    results = {}
    try:
        for mode in ("rescore", "inline"):
            backend.cfg = cfg.model_copy(update={"answer_logprobs": mode})
            results[mode] = vllm_guard.classify(reqs)
    finally:
        backend.cfg = cfg
    rescored, inline = results["rescore"], results["inline"]
    assert [r.raw_output for r in rescored] == [i.raw_output for i in inline]
    assert [r.label for r in rescored] == [i.label for i in inline]
    assert all(r.unsafe_probability is not None for r in rescored if r.label in (Label.SAFE, Label.UNSAFE))
    for r, i in zip(rescored, inline):
        assert r.unsafe_probability == pytest.approx(i.unsafe_probability, abs=1e-3)


def test_gpu_defaults_are_the_measured_scheduler_settings():
    """On a GPU the guard's engine runs the settings of the H200 runs 2 and 3 (docs/BENCHMARKS.md
    "GPU": 512 sequences, 8,192 tokens per step); on a CPU it leaves both to vLLM."""
    from rsafe.models.config import LOCAL_KEYS, machine_defaults

    gpu, cpu = machine_defaults(gpu=True), machine_defaults(gpu=False)
    assert gpu["max_num_seqs"] == 512 and gpu["max_num_batched_tokens"] == 8192
    assert cpu["max_num_seqs"] is None and cpu["max_num_batched_tokens"] is None
    assert set(gpu) == set(cpu) == set(LOCAL_KEYS)
    assert EngineConfig(model="m", **gpu).max_num_batched_tokens == 8192
    # a server's settings are the server's: the openai and null backends take no machine default
    assert EngineConfig(backend="null", model="m").max_num_seqs is None


def test_vllm_backend_passes_the_scheduler_settings_to_vllm(tmp_path):
    """``vllm_engine_kwargs`` (what ``VLLMBackend`` starts vLLM with) passes ``max_num_seqs`` and
    ``max_num_batched_tokens`` when set, and vLLM's engine config takes them; None leaves vLLM's
    own default."""
    from vllm import AsyncEngineArgs

    from rsafe.models.config import machine_defaults
    from rsafe.models.engines import vllm_engine_kwargs

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 2048, "torch_dtype": "float32"}))
    cpu = machine_defaults(gpu=False)
    cfg = EngineConfig(model=str(tmp_path), **{**cpu, "max_num_seqs": 512, "max_num_batched_tokens": 8192})
    kwargs = vllm_engine_kwargs(cfg)
    assert kwargs["max_num_seqs"] == 512 and kwargs["max_num_batched_tokens"] == 8192
    scheduler = AsyncEngineArgs(**kwargs).create_engine_config().scheduler_config
    assert scheduler.max_num_seqs == 512 and scheduler.max_num_batched_tokens == 8192
    unset = vllm_engine_kwargs(EngineConfig(model=str(tmp_path), **cpu))
    assert "max_num_seqs" not in unset and "max_num_batched_tokens" not in unset


def test_cpu_engine_runs_the_model_in_its_engine_core_process(vllm_guard):
    """On vLLM-CPU the guard's engine is two processes, not vLLM-CPU's three: the model runs in the
    engine core process (vLLM's single-process executor; one spawn and its imports fewer,
    docs/BENCHMARKS.md "Cold start"), and that process got the OpenMP settings vLLM gives its
    worker process (without them generation was 2–10× slower on 2 cores). The tests above
    (structured outputs, LoRA, logprobs, greedy parity with transformers) run on this engine.
    The variables were set for the start only: this process does not keep them (a vLLM server
    it starts later gets vLLM-CPU's own layout)."""
    import psutil
    from vllm.platforms import current_platform
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    if not current_platform.is_cpu():
        pytest.skip("vLLM's own process layout on a GPU")
    config = vllm_guard.backend._engine.vllm_config
    assert config.parallel_config.distributed_executor_backend == "uni"
    bound = OMPProcessManager(config).cpu_lists
    if not bound:
        pytest.skip("VLLM_CPU_OMP_THREADS_BIND=nobind: no OpenMP binding asked for")
    # (its /proc environ is unreadable: vLLM renames the process over it; the cores show the settings)
    cores = [p for p in psutil.Process().children() if " ".join(p.cmdline()).startswith("VLLM::EngineCore")]
    assert cores, "no engine core process found"
    assert all(p.cpu_affinity() == bound[0] for p in cores), [p.cpu_affinity() for p in cores]
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"


def test_cpu_worker_process_keeps_vllm_cpu_s_own_layout(monkeypatch):
    """``cpu_worker_process: true`` starts vLLM-CPU as it starts itself (``from_engine_args``,
    nothing set around it); the default goes through ``start_cpu_engine``; a GPU never does."""
    from rsafe.models.engines import vllm as vllm_backend  # VLLMBackend's module: its names are patched
    from rsafe.models.config import machine_defaults

    calls: list[str] = []

    def started_by(name: str):
        def start(args):
            calls.append(name)
            raise RuntimeError("not starting an engine here")
        return start

    class FakeAsyncLLM:
        from_engine_args = staticmethod(started_by("from_engine_args"))

    monkeypatch.setattr("vllm.v1.engine.async_llm.AsyncLLM", FakeAsyncLLM)
    monkeypatch.setattr(vllm_backend, "start_cpu_engine", started_by("start_cpu_engine"))
    monkeypatch.setattr(vllm_backend, "_check_model_path", lambda model: None)
    monkeypatch.setattr(vllm_backend, "_load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(vllm_backend, "HFTokenCounter", lambda tokenizer, n: None)
    monkeypatch.setattr(vllm_backend, "apply_engine_environment", lambda cfg: None)
    monkeypatch.setattr(vllm_backend, "vllm_engine_kwargs", lambda cfg: {"model": "m"})
    for gpu, field, expected in ((False, False, "start_cpu_engine"), (False, True, "from_engine_args"),
                                 (True, False, "from_engine_args")):
        monkeypatch.setattr("vllm.platforms.current_platform.is_cpu", lambda gpu=gpu: not gpu)
        cfg = EngineConfig(model="m", cpu_worker_process=field, **machine_defaults(gpu))
        calls.clear()
        with pytest.raises(EngineError):
            vllm_backend.VLLMBackend(cfg)
        assert calls == [expected], (gpu, field)


def test_cpu_plugin_start_cuts(monkeypatch):
    """The CPU plugin's start-up cuts (``rsafe.models.vllm_cpu_lora.install_start_cuts``): vLLM's
    ``torch.compile``'d rank count becomes the same expression run directly (same counts, no C++
    build at the first request), model inspection runs in this process instead of a fresh Python;
    ``RSAFE_VLLM_CPU_START=vllm`` leaves both as vLLM has them."""
    import torch
    from vllm.model_executor.models import registry
    from vllm.v1.sample.ops import logprobs

    from rsafe.models import vllm_cpu_lora as plugin

    shipped = torch.compile(lambda x, values: (x >= values).sum(-1))  # as vLLM ships it: compiled
    monkeypatch.setattr(logprobs, "batched_count_greater_than", shipped)
    monkeypatch.setattr(registry, "_run_in_subprocess", lambda fn: "in a subprocess")
    monkeypatch.setenv("RSAFE_VLLM_CPU_START", "vllm")
    assert plugin.install_start_cuts() == [] and logprobs.batched_count_greater_than is shipped
    monkeypatch.delenv("RSAFE_VLLM_CPU_START")
    assert plugin.install_start_cuts() == ["batched_count_greater_than", "_run_in_subprocess"]
    x = torch.tensor([[0.1, 0.5, 0.3, 0.3], [2.0, 1.0, 3.0, -1.0]])
    values = torch.tensor([[0.3], [3.0]])
    assert logprobs.batched_count_greater_than(x, values).tolist() == [3, 1] == (x >= values).sum(-1).tolist()
    assert registry._run_in_subprocess(lambda: 42) == 42
    assert plugin.install_start_cuts() == []  # once only


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        make_backend(EngineConfig(backend="transformers", model=str(tmp_path / "nope")))
    with pytest.raises(EngineError, match="has no config.json"):
        make_backend(EngineConfig(backend="vllm", model=str(tmp_path)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_error_verdicts_not_a_crash():
    port = _free_port()
    guard = Guard.from_config(EngineConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1",
                                           request_timeout_s=2))
    verdicts = guard.classify([{"id": "a", "prompt": BENIGN}, {"id": "b", "prompt": " "}])
    assert [v.label for v in verdicts] == [Label.ERROR, Label.ERROR]
    assert "engine failure" in verdicts[0].error_reason and "unreachable" in verdicts[0].error_reason
    assert "empty" in verdicts[1].error_reason


@pytest.fixture(scope="module")
def vllm_server(demo_model_dir):
    """A real OpenAI-compatible vLLM server on the demo model (the `vllm` script fails under vllm-cpu)."""
    port = _free_port()
    # the model in the engine core process (no third process importing vLLM and torch: ~25 s of
    # its start); vLLM-CPU keeps that layout when this is 0 (rsafe.models.engines.vllm.start_cpu_engine)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}  # as deployed: adapters loaded at run time
    log = open(BUILDS / "vllm-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(demo_model_dir),
         "--served-model-name", "rsafe-demo", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--gpu-memory-utilization", "0.5", "--max-model-len", "1024", "--enforce-eager",
         "--enable-lora", "--max-lora-rank", "8"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # its EngineCore: same group
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("vllm server did not become ready in 240 s")
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:  # what the server left behind (its EngineCore, when the server had to be killed)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def test_openai_backend_against_a_real_vllm_server(vllm_server, vllm_guard):
    guard = Guard.from_config(EngineConfig(backend="openai", model="rsafe-demo", base_url=vllm_server,
                                           generation=GenerationConfig(max_tokens=128)))
    reqs = [{"id": "1", "prompt": BENIGN}, {"id": "2", "prompt": HARMFUL}, {"id": "3", "prompt": ""}]
    remote = guard.classify(reqs)
    local = vllm_guard.classify(reqs)
    assert [r.raw_output for r in remote[:2]] == [v.raw_output for v in local[:2]]
    assert [r.label for r in remote] == [v.label for v in local]
    assert remote[0].unsafe_probability == pytest.approx(local[0].unsafe_probability, abs=0.02)
    assert remote[0].prompt_tokens > 100 and remote[2].label == Label.ERROR
    # the default answer_logprobs for a server is "rescore"; "inline" reads the same candidates
    assert guard.backend.cfg.answer_logprobs == "rescore"
    inline = Guard.from_config(EngineConfig(backend="openai", model="rsafe-demo", base_url=vllm_server,
                                            answer_logprobs="inline", generation=GenerationConfig(max_tokens=128)))
    both = inline.classify(reqs[:2])
    assert [b.raw_output for b in both] == [r.raw_output for r in remote[:2]]
    for b, r in zip(both, remote[:2]):
        assert r.unsafe_probability is not None
        assert b.unsafe_probability == pytest.approx(r.unsafe_probability, abs=0.02)


def test_openai_backend_loads_a_configured_adapter_into_the_server(vllm_server, vllm_guard, demo_lora_dir):
    """``--lora guard=PATH --adapter guard`` against ``vllm serve --enable-lora`` with run-time
    LoRA updating: the guard loads the adapter into the server at start, and the adapter judges."""
    guard = Guard.from_config(EngineConfig(backend="openai", model="rsafe-demo", base_url=vllm_server,
                                           enable_lora=True, lora_adapters={"guard": str(demo_lora_dir)},
                                           generation=GenerationConfig(max_tokens=128)))
    served = [m["id"] for m in httpx.get(f"{vllm_server}/models", timeout=10).json()["data"]]
    assert "guard" in served
    remote = guard.classify([{"id": "1", "prompt": HARMFUL, "adapter": "guard"}])
    local = vllm_guard.classify([{"id": "1", "prompt": HARMFUL, "adapter": "demo-lora"}])
    assert remote[0].label != Label.ERROR, remote[0].error_reason
    assert remote[0].adapter == "guard" and remote[0].raw_output == local[0].raw_output
    again = Guard.from_config(EngineConfig(backend="openai", model="rsafe-demo", base_url=vllm_server,
                                           enable_lora=True, lora_adapters={"guard": str(demo_lora_dir)}))
    assert again.backend._adapters["guard"][0] == "guard"  # already served: nothing loaded twice


def test_cli_classify_jsonl(tmp_path, demo_model_dir):
    inp = tmp_path / "in.jsonl"
    rows = [{"id": "a", "prompt": BENIGN}, {"id": "b", "prompt": HARMFUL, "response": "Sure, here is how..."},
            "not json", {"prompt": ""}]
    inp.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n[1,2]\n")
    out = tmp_path / "out.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "rsafe.cli", "classify", "--engine", "transformers", "--model", str(demo_model_dir),
         "--policy", "rsafe-default", "--input", str(inp), "--output", str(out), "--max-tokens", "128"],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(verdicts) == 5
    assert verdicts[0]["id"] == "a" and verdicts[0]["label"] in ("safe", "unsafe")
    from rsafe.models.versions import artifact_version

    assert verdicts[0]["model_version"] == artifact_version(demo_model_dir) is not None  # which weights judged
    assert verdicts[1]["level"] == "response"
    assert verdicts[2]["label"] == "error" and "line 3: not valid JSON" in verdicts[2]["error_reason"]
    assert verdicts[3]["label"] == "error" and "prompt is empty" in verdicts[3]["error_reason"]
    assert "line 6: expected a JSON object, got list" in verdicts[4]["error_reason"]
    assert "summary:" in res.stderr
