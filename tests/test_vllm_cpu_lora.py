"""The vLLM CPU LoRA ops (``rsafe.models.vllm_cpu_lora``) against vLLM's reference ops, and the
plugin that installs them."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from rsafe.models import vllm_cpu_lora as ops  # noqa: E402

TOKENS, IN, OUT, RANK, LORAS = 37, 24, 40, 8, 3


def _case(seed: int, indices: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(indices) if indices is not None else torch.randint(-1, LORAS, (TOKENS,), generator=g)
    return g, idx


@pytest.mark.parametrize("indices", [None, [1] * TOKENS, [-1] * TOKENS, [0] * 20 + [2] * 17])
@pytest.mark.parametrize("four_d", [True, False])
def test_bgmv_ops_equal_the_reference(indices, four_d) -> None:
    g, idx = _case(0, indices)
    x = torch.randn(TOKENS, IN, generator=g)
    a = torch.randn(LORAS, 1, RANK, IN, generator=g) if four_d else torch.randn(LORAS, RANK, IN, generator=g)
    b = torch.randn(LORAS, 1, OUT, RANK, generator=g) if four_d else torch.randn(LORAS, OUT, RANK, generator=g)
    y = torch.randn(TOKENS, RANK, generator=g)
    base = torch.randn(TOKENS, OUT + 6, generator=g)

    got, want = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    ops.bgmv_shrink(x, a, got, idx, 0.5)
    torch_ops.bgmv_shrink(x, a, want, idx, 0.5)
    assert torch.allclose(got, want, atol=1e-5)
    for add in (True, False):
        got, want = base.clone(), base.clone()
        ops.bgmv_expand(y, b, got, idx, add)
        torch_ops.bgmv_expand(y, b, want, idx, add)
        assert torch.allclose(got, want, atol=1e-5)
        got, want = base.clone(), base.clone()
        ops.bgmv_expand_slice(y, b, got, idx, 3, OUT, add)
        torch_ops.bgmv_expand_slice(y, b, want, idx, 3, OUT, add)
        assert torch.allclose(got, want, atol=1e-5)


def test_sgmv_ops_equal_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    seq_lens = torch.tensor([5, 1, 20, 11])
    lora_per_seq = torch.tensor([2, -1, 0, 2])
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    meta = (starts, seq_lens, lora_per_seq, 4, int(seq_lens.max()), TOKENS)
    x = torch.randn(TOKENS, IN, generator=g)
    a = torch.randn(LORAS, 1, RANK, IN, generator=g)
    b = torch.randn(LORAS, 1, OUT, RANK, generator=g)
    y = torch.randn(TOKENS, RANK, generator=g)
    got, want = torch.zeros(TOKENS, RANK), torch.zeros(TOKENS, RANK)
    ops.sgmv_shrink(x, a, got, *meta, 2.0)
    torch_ops.sgmv_shrink(x, a, want, *meta, 2.0)
    assert torch.allclose(got, want, atol=1e-5)
    base = torch.randn(TOKENS, 2 * OUT, generator=g)
    got, want = base.clone(), base.clone()
    ops.sgmv_expand(y, b, got, *meta, True)
    torch_ops.sgmv_expand(y, b, want, *meta, True)
    assert torch.allclose(got, want, atol=1e-5)
    got, want = base.clone(), base.clone()
    ops.sgmv_expand_slice(y, b, got, *meta, OUT, OUT, True)
    torch_ops.sgmv_expand_slice(y, b, want, *meta, OUT, OUT, True)
    assert torch.allclose(got, want, atol=1e-5)


def test_the_plugin_is_registered_and_installs_on_cpu(monkeypatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("rsafe_cpu_lora") == "rsafe.models.vllm_cpu_lora:register"
    for name in ops.OPS:  # as vLLM ships it
        monkeypatch.setattr(punica_cpu, name, getattr(torch_ops, name))
    monkeypatch.setenv("RSAFE_VLLM_CPU_LORA", "reference")
    assert not ops.install() and punica_cpu.bgmv_shrink is torch_ops.bgmv_shrink
    monkeypatch.delenv("RSAFE_VLLM_CPU_LORA")
    assert ops.install()
    assert all(getattr(punica_cpu, name) is getattr(ops, name) for name in ops.OPS)
