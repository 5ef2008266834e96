"""lrpx.eval.token_flipping against hand-computed curves and a one-sequence-at-a-time loop."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lrpx
from toy_lm import BagClassifier, ToyLM, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")


def hand_classifier():
    """Class-0 logit = sum of v[token] with v = (0, 2, -1, 0.5); class-1 logit = 0. Token 0 is [MASK]."""
    model = BagClassifier(vocabulary=4, hidden=4, classes=2).double().eval()
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(4))
        model.head.weight.copy_(torch.tensor([[0.0, 2.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    model.config = SimpleNamespace(mask_token_id=0, pad_token_id=0, unk_token_id=None)
    return model


def log_sigmoid(z):
    return z - math.log(math.exp(z) + 1.0)  # log p(class 0) of logits (z, 0)


@pytest.mark.parametrize("replace", ["mask", 0, "delete"])
def test_hand_classifier_curves(replace):
    model = hand_classifier()
    ids = torch.tensor([[1, 2, 3]])
    relevance = torch.tensor([[2.0, -1.0, 0.5]])
    result = lrpx.eval.token_flipping(model, ids, relevance, 0, order=("morf", "lrf"), replace=replace)
    # MoRF removes token 1 (2.0), then 3 (0.5), then 2 (-1.0): class-0 logit 1.5, -0.5, -1.0, 0.0
    morf = [log_sigmoid(z) for z in (1.5, -0.5, -1.0, 0.0)]
    # LRF removes 2, then 3, then 1: 1.5, 2.5, 2.0, 0.0
    lrf = [log_sigmoid(z) for z in (1.5, 2.5, 2.0, 0.0)]
    np.testing.assert_allclose(result.curve("morf")[0].numpy(), morf, rtol=1e-12)
    np.testing.assert_allclose(result.curve("lrf")[0].numpy(), lrf, rtol=1e-12)
    x = [0, 1 / 3, 2 / 3, 1]
    assert result.auc("morf").item() == pytest.approx(np.trapezoid(morf, x), rel=1e-12)
    assert result.srg().item() == pytest.approx(np.trapezoid(lrf, x) - np.trapezoid(morf, x), rel=1e-12)
    assert result.removed.tolist() == [[0, 1, 2, 3]]
    assert result.ranks[0, 0].tolist() == [0, 2, 1]


def test_steps_remove_floor_of_share():
    model = hand_classifier()
    ids = torch.tensor([[1, 2, 3, 1, 2], [3, 3, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    relevance = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 0, 0]])
    result = lrpx.eval.token_flipping(model, ids, relevance, 0, steps=2, attention_mask=mask)
    assert result.removed.tolist() == [[0, 2, 5], [0, 1, 3]]
    assert result.removable.tolist() == [5, 3]
    # second sequence: MoRF removes token 1 (relevance 3) first: logits 0.5 + 0.5 + 2 -> 1.0, then 0
    np.testing.assert_allclose(result.curve()[1].numpy(), [log_sigmoid(3.0), log_sigmoid(1.0), log_sigmoid(0.0)])


def loop_reference(model, ids, mask, relevance, target, position, order, replace, steps):
    """One sequence and one step at a time, without padding where tokens are deleted."""
    batch, length = len(ids), len(ids[0])
    curves = np.zeros((batch, steps + 1))
    for b in range(batch):
        real = [s for s in range(length) if mask[b][s] == 1 and s <= position[b]]
        ranked = sorted(real, key=lambda s: (-relevance[b][s], s))
        if order == "lrf":
            ranked = ranked[::-1]
        for k in range(steps + 1):
            removed = set(ranked[: (k * len(real)) // steps])
            if replace == "delete":
                kept = [s for s in range(length) if mask[b][s] == 1 and s not in removed]
                before = [s for s in kept if s <= position[b]]
                if not before:  # an empty prefix: the model at a padded position
                    seq, seq_mask, at = [0], [0], 0
                else:
                    seq, seq_mask, at = [int(ids[b][s]) for s in kept], [1] * len(kept), len(before) - 1
            else:
                seq = [replace if s in removed else int(ids[b][s]) for s in range(length)]
                seq_mask, at = [int(m) for m in mask[b]], position[b]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.tensor([seq_mask])).logits
            row = logits[0, at].double().numpy()
            curves[b, k] = row[target[b]] - np.log(np.exp(row - row.max()).sum()) - row.max()
    return curves


@pytest.mark.parametrize("replace", [16, "delete"])
@pytest.mark.parametrize("order", ["morf", "lrf"])
def test_causal_lm_matches_loop(order, replace):
    torch.manual_seed(0)
    model = ToyLM().eval()
    ids = torch.tensor([[0, 0, 3, 5, 7, 2], [4, 9, 1, 8, 6, 3], [5, 5, 2, 11, 13, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    relevance = torch.randn(3, 6)
    position = [5, 5, 3]  # the third explains position 3: tokens 4 and 5 are never removed
    result = lrpx.eval.token_flipping(model, ids, relevance, [1, 2, 3], order=order, replace=replace,
                                      attention_mask=mask, position=torch.tensor(position), steps=4, batch_size=5)
    expected = loop_reference(model, ids.tolist(), mask.tolist(), relevance.tolist(), [1, 2, 3], position, order,
                              replace, 4)
    np.testing.assert_allclose(result.curve(order).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert result.removable.tolist() == [4, 6, 4]
    assert (result.ranks[0, 2, 4:] == 6).all()


def test_default_target_and_random_order():
    torch.manual_seed(1)
    model = ToyLM().eval()
    ids = torch.randint(0, 17, (2, 5))
    relevance = torch.randn(2, 5)
    with torch.no_grad():
        top = model(input_ids=ids).logits[:, -1].argmax(-1)
    first = lrpx.eval.token_flipping(model, ids, relevance, order="random", replace=0, seed=3)
    again = lrpx.eval.token_flipping(model, ids, relevance, order="random", replace=0, seed=3)
    other = lrpx.eval.token_flipping(model, ids, relevance, order="random", replace=0, seed=4)
    assert torch.equal(first.target, top)
    assert torch.equal(first.ranks, again.ranks) and torch.equal(first.curves, again.curves)
    assert not torch.equal(first.ranks, other.ranks)
    assert sorted(first.ranks[0, 0].tolist()) == [0, 1, 2, 3, 4]


def test_calls_are_batched():
    model = hand_classifier()
    calls = []

    class Counting(torch.nn.Module):
        config = model.config

        def forward(self, **kwargs):
            calls.append(kwargs["input_ids"].shape[0])
            return model(**kwargs)

    ids = torch.tensor([[1, 2, 3, 1], [3, 2, 1, 1]])
    lrpx.eval.token_flipping(Counting().eval(), ids, torch.randn(2, 4), 0, order=("morf", "lrf"), steps=4,
                             batch_size=3)
    assert len(calls) == lrpx.eval.number_of_token_calls(2, 2, 4, 3) == 1 + math.ceil(16 / 3)
    assert sum(calls) == 2 + 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(replace="unk"), r"replace='unk' needs model.config.unk_token_id"),
    (dict(replace="blank"), "replace must be one of"),
    (dict(order="best"), "order must be one or several"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(relevance=torch.zeros(1, 2)), r"relevance must be a tensor of shape \(1, 3\)"),
    (dict(target=5), r"target 5 is outside the logits: the model has 2 classes \(valid: 0..1\)"),
    (dict(batch_size=0), "batch_size must be a positive int"),
])
def test_errors(kwargs, message):
    model = hand_classifier()
    arguments = dict(relevance=torch.zeros(1, 3), target=0) | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        lrpx.eval.token_flipping(model, torch.tensor([[1, 2, 3]]), **arguments)


def test_deleting_from_gpt2_matches_unpadded_loop():
    # GPT-2 numbers positions from the first column unless position_ids are given: the left-padded
    # sequences of "delete" must see their tokens where the unpadded ones do
    model = tiny_gpt2(6, 20, pad_token_id=0, bos_token_id=0, eos_token_id=0, initializer_range=0.5)
    ids = torch.tensor([[0, 0, 3, 5, 7, 2], [4, 9, 1, 8, 6, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    relevance = torch.randn(2, 6)
    result = lrpx.eval.token_flipping(model, ids, relevance, [1, 2], replace="delete", attention_mask=mask, steps=3)
    expected = loop_reference(model, ids.tolist(), mask.tolist(), relevance.tolist(), [1, 2], [5, 5], "morf",
                              "delete", 3)
    np.testing.assert_allclose(result.curve().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_padding_at_the_end_flips_as_the_sequence_alone():
    """Position -1 of a sequence padded at its end is its last real token (as in
    explain_tokens): its curves equal those of the sequence alone."""
    torch.manual_seed(3)
    model = ToyLM().double().eval()
    model.config = SimpleNamespace(mask_token_id=1, pad_token_id=0, unk_token_id=None)
    ids = torch.tensor([[3, 5, 7, 0, 0], [2, 2, 9, 4, 6]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    relevance = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.0], [1.0, 0.2, -0.3, 0.7, 0.1]], dtype=torch.float64)
    result = lrpx.eval.token_flipping(model, ids, relevance, 4, attention_mask=mask, replace="mask", steps=3)
    alone = lrpx.eval.token_flipping(model, ids[:1, :3], relevance[:1, :3], 4, replace="mask", steps=3)
    np.testing.assert_allclose(result.curve("morf")[0].numpy(), alone.curve("morf")[0].numpy(), rtol=1e-12)
