"""Policy-ablation pairs (rsafe.demo.lookup): what the demo build's lookup stages train on."""

from __future__ import annotations

import random

import pytest

from rsafe.demo import build, sft
from rsafe.demo.corpus import synthetic_examples
from rsafe.demo.lookup import KEPT, Ablations, LookupStage, ablation_pair, encode_batch, stage_batches
from rsafe.demo.tokenizer import train_tokenizer
from rsafe.models.prompt import build_user_turn


@pytest.fixture(scope="module")
def ablations() -> Ablations:
    return Ablations()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(synthetic_examples(300, seed=0))


def test_a_pair_differs_only_in_the_missing_line(ablations):
    rng = random.Random(5)
    for _ in range(50):
        safe, unsafe = ablation_pair(rng, ablations, fewest=0, most=15)
        assert (safe.label, unsafe.label) == ("safe", "unsafe") and safe.prompt == unsafe.prompt
        code = unsafe.category
        p_safe, p_unsafe = ablations.get(safe.policy), ablations.get(unsafe.policy)
        assert p_safe.category(code) is None and p_unsafe.category(code) is not None
        assert p_safe.category(KEPT) is not None and p_unsafe.category(KEPT) is not None
        # the two policies have the same number of lines: one missing each, and they differ in it
        safe_codes = {c.code for c in p_safe.categories}
        unsafe_codes = {c.code for c in p_unsafe.categories}
        assert len(safe_codes) == len(unsafe_codes) and len(safe_codes ^ unsafe_codes) == 2
        # the rendered prompts say so (model_copy recomputes the rendering)
        line = next(x for x in ablations.base.render_categories().splitlines() if x.split()[0] == code)
        assert line in ablations.turn(unsafe) and line not in ablations.turn(safe)
        assert f"({code}) is in this policy" in unsafe.answer() and "is not in this policy" in safe.answer()
        assert p_safe.version != p_unsafe.version != ablations.base.version


def test_policy_lengths_follow_the_stage(ablations):
    rng = random.Random(1)
    n = len(ablations.codes)
    for fewest, most in ((0, 0), (2, 15), (15, 15)):
        for _ in range(20):
            safe, _unsafe = ablation_pair(rng, ablations, fewest, most)
            kept = len(ablations.get(safe.policy).categories)  # without the pair's category
            assert fewest + 2 <= kept <= most + 2 <= n - 1


def test_stage_batches_are_deterministic_and_mix_ordinary_rows(ablations):
    stage = LookupStage(steps_per_sft_step=1.0, fewest=0, most=7, pairs=3, ordinary=2)
    ordinary = build.split(0, 50, 4)[0]
    a = list(stage_batches(stage, 4, ablations, ordinary, random.Random("x")))
    b = list(stage_batches(stage, 4, ablations, ordinary, random.Random("x")))
    assert a == b and len(a) == 4 and all(len(rows) == 8 for rows in a)
    assert all(rows[6] in ordinary and rows[7] in ordinary for rows in a)


def test_encode_batch_loss_equals_full_sequence_loss(ablations, tokenizer):
    import torch

    rows = next(stage_batches(LookupStage(1.0, 0, 15, pairs=3, ordinary=2), 1, ablations,
                              build.split(0, 50, 4)[0], random.Random(0)))
    model = sft.make_qwen2_model(build.MODEL_SHAPE, tokenizer, 0)
    prefix, ids, labels = encode_batch(tokenizer, ablations, rows)
    assert prefix.shape[1] > 20  # the template's shared opening runs once
    shared = sft.loss_on_answers(model, prefix, ids, labels)
    x = torch.cat([prefix.expand(ids.shape[0], -1), ids], 1)
    y = torch.cat([torch.full_like(prefix.expand(ids.shape[0], -1), -100), labels], 1)
    assert torch.allclose(shared, model(input_ids=x, labels=y).loss, atol=1e-5)
    # each row is its own (ablated) prompt + answer
    first = sft.encode_turn(tokenizer, build_user_turn(ablations.get(rows[0].policy), rows[0].prompt), rows[0].answer())
    assert x[0, : len(first[0])].tolist() == first[0]


def test_training_messages_cover_the_lookup_stages(ablations):
    seen = build.training_messages(0)
    stage, n, batches = next(build.lookup_batches(0, build.SFT.steps, Ablations(), build.split(0, build.N_TRAIN, build.N_EVAL)[0]))
    assert stage == build.LOOKUP_STAGES[0] and n == int(build.SFT.steps * stage.steps_per_sft_step)
    rows = next(batches)
    # a pair's message counts as trained on under its own policy and under rsafe-default
    assert all((e.policy, e.prompt, e.response) in seen and ("rsafe-default", e.prompt, e.response) in seen
               for e in rows)
