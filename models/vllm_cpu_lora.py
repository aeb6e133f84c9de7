"""vLLM plugin for the CPU backend: LoRA without copying a weight matrix per token, and two cuts
in the engine's first start on a fresh machine (``install_start_cuts``, below).

vLLM's CPU LoRA path (``PunicaWrapperCPU``) uses its PyTorch reference ops
(``vllm.lora.ops.torch_ops``), which gather every token's adapter matrices —
``weights[token_lora_indices]``, a ``(tokens, out, rank)`` copy per LoRA layer per step — and
multiply row by row. With the demo model that made a LoRA request ~5× the cost of a base-model
one (bench/gate.py, docs/BENCHMARKS.md "The promotion gate"). The ops here give the same results
(same indexing, negative indices included, same output updates) by grouping the tokens by adapter:
one matrix product per adapter present in the batch (usually one or two).

Loaded by vLLM in each of its processes as a general plugin (entry point
``vllm.general_plugins: rsafe_cpu_lora`` in pyproject.toml); it changes nothing on other
platforms, nor when vLLM's CPU wrapper no longer uses the reference ops (another vLLM version),
nor with ``RSAFE_VLLM_CPU_LORA=reference``. On GPUs vLLM's Triton kernels run, untouched.
Checked against the reference ops in ``tests/test_vllm_cpu_lora.py``.

The start-up cuts (CPU only; ``RSAFE_VLLM_CPU_START=vllm`` leaves vLLM's own path) remove two
costs that only a machine without vLLM's and torch's caches pays, measured in
docs/BENCHMARKS.md "Cold start":

* vLLM counts each sampled token's rank for logprobs with a ``torch.compile``'d function; on a
  CPU its first call (the guard's first request) builds C++ kernels with a compiler. The same
  expression, run directly, gives the same counts.
* vLLM learns what a model class supports (LoRA, ...) by importing it in a fresh Python process,
  "to avoid initializing CUDA" there, and caches the answer under ``VLLM_CACHE_ROOT``. On a CPU
  there is no CUDA to protect: the same inspection runs in this process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def rows_times(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """Row ``t`` of ``inputs`` times the transpose of ``weights[indices[t]]``: the reference ops'
    ``einsum("bi, boi -> bo", inputs, weights[indices])``, one product per distinct index."""
    import torch

    w = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    x = inputs.to(dtype=dtype)
    if indices.numel() != x.shape[0]:  # a broadcast the reference allows: do as it does
        return torch.einsum("bi, boi -> bo", x, w[indices].to(dtype=dtype))
    values = torch.unique(indices).tolist()
    if len(values) == 1:
        return x @ w[values[0]].to(dtype=dtype).T
    out = x.new_empty(x.shape[0], w.shape[1])
    for v in values:
        rows = (indices == v).nonzero(as_tuple=True)[0]
        out[rows] = x[rows] @ w[v].to(dtype=dtype).T
    return out


def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    outputs = rows_times(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    outputs = rows_times(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    outputs = rows_times(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def _per_token(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
    import torch

    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, b_seq_start_loc: Any, seq_len_tensor: Any,
                lora_indices_tensor: Any, batches: int, max_seq_length: int, token_nums: int,
                scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, b_seq_start_loc: Any, seq_len_tensor: Any,
                lora_indices_tensor: Any, batches: int, max_seq_length: int, token_nums: int,
                add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, b_seq_start_loc: Any,
                      seq_len_tensor: Any, lora_indices_tensor: Any, batches: int, max_seq_length: int,
                      token_nums: int, slice_offset: int, slice_size: int, add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


def install() -> bool:
    """Point vLLM's CPU LoRA wrapper at these ops; True if it did."""
    if os.environ.get("RSAFE_VLLM_CPU_LORA", "grouped") == "reference":
        return False
    try:
        from vllm.lora.ops import torch_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if not all(getattr(punica_cpu, name, None) is getattr(torch_ops, name, object()) for name in OPS):
        if not all(getattr(punica_cpu, name, None) is globals()[name] for name in OPS):
            log.warning("rsafe: vLLM's CPU LoRA wrapper does not use the reference ops here; left as it is")
        return False
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
    return True


def count_at_least(x: Any, values: Any) -> Any:
    """vLLM's ``batched_count_greater_than`` (``vllm/v1/sample/ops/logprobs.py``): per row of
    ``x``, how many entries are at least that row's value in ``values`` (the sampled token's rank),
    the same expression without ``torch.compile``."""
    return (x >= values).sum(-1)


def run_here(fn: Any) -> Any:
    """vLLM's ``registry._run_in_subprocess(fn)``, in this process (no CUDA on a CPU)."""
    return fn()


def install_start_cuts() -> list[str]:
    """Replace vLLM's compiled rank count and its model-inspection subprocess (see the module
    docstring); the names of what was replaced. Leaves whatever is not as this vLLM version has
    it (another version), and everything with ``RSAFE_VLLM_CPU_START=vllm``."""
    if os.environ.get("RSAFE_VLLM_CPU_START", "lean") == "vllm":
        return []
    import sys

    done = []
    try:
        from vllm.model_executor.models import registry
        from vllm.v1.sample.ops import logprobs
    except ImportError:
        return done
    compiled = getattr(logprobs, "batched_count_greater_than", None)
    if hasattr(compiled, "_torchdynamo_orig_callable"):  # as vLLM ships it: torch.compile'd
        logprobs.batched_count_greater_than = count_at_least
        done.append("batched_count_greater_than")
        sampler = sys.modules.get("vllm.v1.sample.sampler")  # imported before us: it holds its own reference
        if sampler is not None and getattr(sampler, "batched_count_greater_than", None) is compiled:
            sampler.batched_count_greater_than = count_at_least
    if callable(getattr(registry, "_run_in_subprocess", None)) and registry._run_in_subprocess is not run_here:
        registry._run_in_subprocess = run_here
        done.append("_run_in_subprocess")
    return done


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install on the CPU platform only."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    if current_platform.is_cpu():
        install()
        install_start_cuts()
