"""AUC, AOPC, SRG and the result object against hand computations on small curves."""

import math

import pytest
import torch

from lrpx.eval import FlippingResult, aopc, auc, mean_std, unit_step_auc
from lrpx.eval.scores import as_score, logit, softmax


def make_result(curves, counts, orders):
    curves = torch.tensor(curves, dtype=torch.float64)
    return FlippingResult(
        curves=curves, counts=torch.tensor(counts), num_regions=counts[-1], orders=orders,
        target=torch.zeros(curves.shape[1], dtype=torch.long), score="logit", fill="constant",
        patch_size=1, ranks=torch.zeros(len(orders), curves.shape[1], 1, counts[-1]),
        size=(1, counts[-1]),
    )


def test_auc_is_the_trapezoid_on_the_fraction_axis():
    # equal steps: 0.5 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0.25) / 2 = 0.375 + 0.1875
    assert auc(torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.0, 0.5, 1.0])) == 0.5625
    # unequal steps: 0.25 * 1.5 / 2 + 0.75 * 0.75 / 2 = 0.1875 + 0.28125
    assert auc(torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.0, 0.25, 1.0])) == 0.46875


def test_aopc_averages_the_drop_over_all_steps_including_zero():
    # y0 = 1: drops 0, 0.5, 0.75 -> mean 1.25 / 3
    assert math.isclose(float(aopc(torch.tensor([1.0, 0.5, 0.25]))), 1.25 / 3, rel_tol=1e-15)
    assert aopc(torch.tensor([[2.0, 2.0], [1.0, 3.0]])).tolist() == [0.0, -1.0]


def test_unit_step_auc_uses_the_batch_mean_and_the_step_index():
    # mean curve [2, 1, 0.5] -> (2 + 1) / 2 + (1 + 0.5) / 2 = 2.25
    assert unit_step_auc(torch.tensor([[1.0, 0.5, 0.25], [3.0, 1.5, 0.75]])) == 2.25


def test_mean_std_is_the_population_std():
    assert mean_std(torch.tensor([1.0, 3.0])) == (2.0, 1.0)


def test_result_scores_per_sample():
    # orders x samples x steps; counts 0, 1, 4 of 4 regions -> fractions 0, 0.25, 1
    result = make_result(
        [
            [[4.0, 2.0, 0.0], [2.0, 2.0, 2.0]],  # morf
            [[4.0, 4.0, 0.0], [2.0, 3.0, 1.0]],  # lrf
            [[4.0, 3.0, 0.0], [2.0, 2.0, 0.0]],  # random
        ],
        [0, 1, 4],
        ("morf", "lrf", "random"),
    )
    assert result.fractions.tolist() == [0.0, 0.25, 1.0]
    assert result.removed_per_step.tolist() == [1, 3]
    # morf sample 0: 0.25 * 6 / 2 + 0.75 * 2 / 2 = 0.75 + 0.75
    auc_morf = [1.5, 0.25 * 4 / 2 + 0.75 * 4 / 2]
    auc_lrf = [0.25 * 8 / 2 + 0.75 * 4 / 2, 0.25 * 5 / 2 + 0.75 * 4 / 2]
    auc_random = [0.25 * 7 / 2 + 0.75 * 3 / 2, 0.25 * 4 / 2 + 0.75 * 2 / 2]
    torch.testing.assert_close(result.auc("morf"), torch.tensor(auc_morf).double())
    srg = [a - b for a, b in zip(auc_lrf, auc_morf)]
    torch.testing.assert_close(result.srg(), torch.tensor(srg).double())
    mrg = [a - b for a, b in zip(auc_random, auc_morf)]
    torch.testing.assert_close(result.mrg(), torch.tensor(mrg).double())
    lrg = [a - b for a, b in zip(auc_lrf, auc_random)]
    torch.testing.assert_close(result.lrg(), torch.tensor(lrg).double())
    torch.testing.assert_close(result.aopc("lrf"), torch.tensor([4 / 3, 0.0]).double())
    assert result.unit_step_auc("morf") == (3 + 2) / 2 + (2 + 1) / 2


def test_summary_gives_mean_and_std_of_every_score():
    result = make_result([[[1.0, 0.0], [3.0, 0.0]], [[1.0, 1.0], [3.0, 3.0]]], [0, 2],
                         ("morf", "lrf"))
    table = result.summary()
    assert table["auc_morf"] == (1.0, 0.5)  # aucs 0.5 and 1.5
    assert table["srg"] == (1.0, 0.5)  # lrf aucs 1 and 3
    assert "mrg" not in table


def test_order_must_be_named_when_several():
    result = make_result([[[1.0, 0.0]], [[1.0, 1.0]]], [0, 1], ("morf", "lrf"))
    with pytest.raises(ValueError, match="order must be given"):
        result.auc()
    with pytest.raises(ValueError, match="random"):
        result.mrg()


def test_named_scores():
    output = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([2, 0])
    assert logit(output, target).tolist() == [3.0, 0.0]
    expected = [math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)), 1 / 3]
    torch.testing.assert_close(softmax(output, target), torch.tensor(expected))
    with pytest.raises(ValueError, match="logit.*softmax"):
        as_score("probability")
