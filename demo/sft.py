"""Supervised fine-tuning on RSafe-format answers (stage 1, "guided reasoning"), in plain torch.

Loss on the answer tokens only; examples that share a prompt head (same policy and level) are
batched together and their common prefix runs once (its KV cache is repeated over the batch),
and the rows run in chunks of similar length, which makes the demo build several times faster on
a CPU than padding whole prompts. It trains on the demo corpus's examples (``DemoExample``): the
demo model's build (``rsafe.demo.build``) and its LoRA adapters are made with it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rsafe.demo.corpus import DemoExample, parse_answer
from rsafe.demo.tokenizer import user_turn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Encoded = tuple[list[int], list[int]]
Group = tuple[list[int], list[Encoded]]


@dataclass(frozen=True)
class SFTConfig:
    """Settings of one SFT run."""

    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    """Linear warm-up (at most a tenth of ``steps``), then cosine decay to 10 % of the rate."""
    weight_decay: float = 0.01
    seed: int = 0


def encode_example(tokenizer: PreTrainedTokenizerBase, example: DemoExample) -> Encoded:
    """(input ids, labels) for SFT of ``example`` under its (bundled) policy: see ``encode_turn``."""
    return encode_turn(tokenizer, user_turn(example), example.answer())


def encode_turn(tokenizer: PreTrainedTokenizerBase, turn: str, answer: str) -> Encoded:
    """(input ids, labels) for SFT: the rendered user ``turn``, then ``answer`` and ``<|im_end|>``.

    Labels are -100 on the prompt, so the loss covers the answer only. Prompt and answer are
    tokenized apart, as at inference (the engine tokenizes the prompt, the model writes the rest).
    """
    from rsafe.models.prompt import render_prompt

    prompt_ids = tokenizer.encode(render_prompt(tokenizer, turn), add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def group_by_prefix(tokenizer: PreTrainedTokenizerBase, examples: Sequence[DemoExample]) -> list[Group]:
    """Encode ``examples`` and group them by policy, level and context, which fix the prompt's head.

    Each group is (prefix ids, [(suffix ids, suffix labels)]): the prefix is the group's longest
    common prefix, cut before the last prompt token, so training on prefix + suffix is exactly
    training on the whole sequence.
    """
    groups: dict[tuple[str, str, bool], list[Encoded]] = {}
    for ex in examples:  # (a multi-turn example's task line differs: a group of its own)
        groups.setdefault((ex.policy, ex.level, bool(ex.context)), []).append(encode_example(tokenizer, ex))
    out = []
    for _, items in sorted(groups.items()):
        n = common_prefix(items)
        out.append((items[0][0][:n], [(ids[n:], labels[n:]) for ids, labels in items]))
    return out


def common_prefix(items: Sequence[Encoded]) -> int:
    """The length of the longest common prefix of the items' ids, cut before the last prompt token
    (each row keeps the token its first answer token is predicted from)."""
    first = items[0][0]
    n = min(labels.index(next(y for y in labels if y != -100)) for _, labels in items) - 1
    for ids, _ in items[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return n


def collate(items: Sequence[Encoded], pad_id: int) -> tuple[Any, Any, Any]:
    """One batch (prefix, right-padded suffixes, labels) of any encoded rows: their common prefix
    runs once (``loss_on_answers``)."""
    n = common_prefix(items)
    return pad_rows(items[0][0][:n], [(ids[n:], labels[n:]) for ids, labels in items], pad_id)


def pad_rows(prefix: list[int], rows: Sequence[Encoded], pad_id: int) -> tuple[Any, Any, Any]:
    """(prefix tensor, suffix ids right-padded with ``pad_id``, labels padded with -100)."""
    import torch

    width = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(rows):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return torch.tensor([prefix]), ids, labels


def batches(groups: Sequence[Group], pad_id: int, steps: int, batch_size: int,
            rng: random.Random) -> Iterator[tuple[Any, Any, Any]]:
    """``steps`` batches (prefix, right-padded suffixes, labels), epoch by epoch in a seeded order.

    A batch holds examples of one group, so their common prefix is computed once.
    """
    queue: list[tuple[int, list[int]]] = []
    for _ in range(steps):
        if not queue:
            for g, (_, items) in enumerate(groups):
                order = list(range(len(items)))
                rng.shuffle(order)
                queue += [(g, order[i: i + batch_size]) for i in range(0, len(order), batch_size)]
            rng.shuffle(queue)
        g, picked = queue.pop()
        prefix, items = groups[g]
        yield pad_rows(prefix, [items[i] for i in picked], pad_id)


CHUNK_OVERHEAD_TOKENS = 200
"""What one more forward chunk costs, in padded tokens (``length_chunks``): measured on 2 CPU cores
with the demo model, a lookup step is fastest between 100 and 400 (bench/sft_chunks.py times the
build's stages with it, docs/BENCHMARKS.md)."""


def length_chunks(lengths: Sequence[int], overhead: int = CHUNK_OVERHEAD_TOKENS) -> list[list[int]]:
    """Row indices in chunks of similar length: the partition of the rows, sorted by length, that
    minimises padded tokens (each chunk is cut to its own longest row) + ``overhead`` a chunk."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sizes = [lengths[i] for i in order]
    cost = [0.0] + [math.inf] * len(sizes)
    cut = [0] * (len(sizes) + 1)
    for j in range(1, len(sizes) + 1):
        for i in range(j):
            c = cost[i] + (j - i) * sizes[j - 1] + overhead
            if c < cost[j]:
                cost[j], cut[j] = c, i
    chunks, j = [], len(sizes)
    while j:
        chunks.append(order[cut[j]: j])
        j = cut[j]
    return chunks[::-1]


def row_lengths(labels: Any) -> list[int]:
    """Each right-padded row's length: up to its last labelled (answer) token; 1 for a row without."""
    return [int(row.nonzero().max()) + 1 if row.any() else 1 for row in labels != -100]


def loss_on_answers(model: Any, prefix: Any, ids: Any, labels: Any, *,
                    chunk_overhead: int = CHUNK_OVERHEAD_TOKENS) -> Any:
    """Mean next-token loss on the labelled (answer) tokens of prefix + suffix rows.

    The shared prefix runs once and its key/value cache is repeated over the rows (gradients flow
    back through it); the rows run in chunks of similar length (``length_chunks``), each cut to
    its own longest row, so little compute goes to padding (a quarter to a third of a padded batch
    in the demo corpus; ``chunk_overhead`` 10**9: one padded batch, bench/sft_chunks.py); logits
    are computed for answer positions only. The result is the same loss as one padded batch (up to
    float rounding). Right padding needs no attention mask: causal attention never looks at later
    (pad) tokens.
    """
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper
    shared: list[tuple[Any, Any]] = []
    if prefix.shape[1]:
        cache = DynamicCache()
        base.model(input_ids=prefix, past_key_values=cache, use_cache=True)
        shared = [(layer.keys, layer.values) for layer in cache.layers]
    lengths = row_lengths(labels)
    total = torch.zeros(())
    for rows in length_chunks(lengths, chunk_overhead):
        width, index = max(lengths[r] for r in rows), torch.tensor(rows)
        cache = DynamicCache([(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
                              for k, v in shared]) if shared else DynamicCache()
        hidden = base.model(input_ids=ids[index, :width], past_key_values=cache, use_cache=True).last_hidden_state
        targets = labels[index, 1:width]
        keep = targets != -100
        total = total + F.cross_entropy(base.lm_head(hidden[:, :-1][keep]), targets[keep], reduction="sum")
    return total / (labels[:, 1:] != -100).sum()


def train(model: Any, groups: Sequence[Group], pad_id: int, cfg: SFTConfig, *,
          log: Callable[[str], None], tag: str, on_step: Callable[[int], None] | None = None) -> None:
    """Plain SFT on ``groups``: AdamW, linear warm-up then cosine decay, loss on answer tokens only."""
    fit(model, batches(groups, pad_id, cfg.steps, cfg.batch_size, random.Random(cfg.seed)), cfg,
        log=log, tag=tag, on_step=on_step)


def fit(model: Any, steps_batches: Iterable[tuple[Any, Any, Any]], cfg: SFTConfig, *,
        log: Callable[[str], None], tag: str, on_step: Callable[[int], None] | None = None) -> None:
    """``cfg.steps`` optimiser steps, one per (prefix, ids, labels) batch of ``steps_batches``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    steps = cfg.steps
    warmup = min(cfg.warmup_steps, max(1, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start, running = time.monotonic(), 0.0
    for step, (prefix, ids, labels) in enumerate(steps_batches, 1):
        loss = loss_on_answers(model, prefix, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        if step % 20 == 0 or step == steps:
            log(f"[{tag}] step {step}/{steps} loss {running:.3f} ({time.monotonic() - start:.0f} s)")
        if on_step is not None:
            on_step(step)
        if step == steps:
            break
    model.eval()


def generate(model: Any, tokenizer: PreTrainedTokenizerBase, examples: Sequence[DemoExample],
             max_new_tokens: int = 64) -> list[str]:
    """Greedy answers for ``examples`` under their (bundled) policies: see ``generate_turns``."""
    return generate_turns(model, tokenizer, [user_turn(ex) for ex in examples], max_new_tokens)


def generate_turns(model: Any, tokenizer: PreTrainedTokenizerBase, turns: Sequence[str],
                   max_new_tokens: int = 64) -> list[str]:
    """Greedy answers for rendered user ``turns`` (batched, left padded)."""
    import torch
    from rsafe.models.prompt import render_prompt

    prompts = [render_prompt(tokenizer, turn) for turn in turns]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_answers(model: Any, tokenizer: PreTrainedTokenizerBase,
                     examples: Sequence[DemoExample]) -> dict[str, float]:
    """Format rate, accuracy, and how often the reasoning names the right category / is exact."""
    texts = generate(model, tokenizer, examples)
    parsed = [parse_answer(t) for t in texts]
    unsafe = [i for i, ex in enumerate(examples) if ex.label == "unsafe"]
    named = sum(f" {examples[i].category} - " in texts[i] for i in unsafe)
    return {
        "format_rate": sum(ok for ok, _ in parsed) / len(examples),
        "accuracy": sum(ok and v == ex.label for (ok, v), ex in zip(parsed, examples)) / len(examples),
        "category_rate": named / max(1, len(unsafe)),
        "exact_rate": sum(t.strip() == ex.answer() for t, ex in zip(texts, examples)) / len(examples),
    }


def make_qwen2_model(shape: dict[str, int], tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A freshly initialised Qwen2-architecture causal LM of ``shape`` (float32)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, use_sliding_window=False,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32", architectures=["Qwen2ForCausalLM"],
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    return model
