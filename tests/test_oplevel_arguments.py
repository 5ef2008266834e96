"""The run-time rules look for values that carry relevance in the arguments of every call: the
quick scan sees exactly the tensors a pytree flattening sees."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

from lrpx.oplevel import OpRules

Pair = namedtuple("Pair", "a b")


def _cases():
    x = torch.ones(2, requires_grad=True)
    c = torch.ones(2)
    p = nn.Parameter(torch.ones(2))
    return [((c, 1, "a"), False), ((c, x), True), ((p,), False), (([c, [c, (x,)]],), True),
            ((c, {"k": [c, {"j": x}]}), True), ((Pair(c, x),), True), ((OrderedDict(a=x),), True),
            ((Pair(c, p), [None, 2.0]), False), ((), False), ((torch.Size([2, 3]),), False)]


@pytest.mark.parametrize("index", range(10))
def test_scan_matches_pytree(index):
    args, expected = _cases()[index]
    mode = OpRules({})
    flat = any(mode._carries(t) for t in torch.utils._pytree.tree_leaves(args))
    assert mode._any_carries(args) is flat is expected


def test_constants_are_not_carried():
    mode = OpRules({})
    table = nn.Parameter(torch.ones(3))
    with mode:
        derived = table * 2  # computed from a parameter alone: no relevance of the input
    assert derived.requires_grad and not mode._any_carries(([derived],))


def test_activation_called_with_inplace_false_by_name_takes_its_rule():
    """``nn.ReLU`` calls ``F.relu(x, inplace=False)``: the keyword is no reason to give up the rule."""
    import warnings

    import torch.nn.functional as F

    import lrpx
    from lrpx.rules import Pass

    x = torch.tensor([[-1.0, 2.0, 3.0]], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        with OpRules({"elementwise": Pass()}):
            y = F.relu(x * 1.0, inplace=False)
    assert type(y.grad_fn).__name__ == "LRPFunctionBackward"
    # Pass gives the output's relevance to the input as it is; the plain gradient would mask it
    assert torch.autograd.grad(y, x, torch.ones_like(y))[0].tolist() == [[1.0, 1.0, 1.0]]
