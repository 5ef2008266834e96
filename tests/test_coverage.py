"""Every torchvision classification family converts, computes the original forward, and
its relevance is accounted for exactly: the input relevance plus what each LRP layer
absorbs (recomputed in tests/zoo.py from the rule definitions) plus what parameters used in
forward code absorb (ViT's class token and position embedding) equals the explained logit."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import lrpx
from coverage_table import BOUND, README, readme_table, table
from relevance_snapshot import PRESETS, STORE, differences, fingerprint
from zoo import FAMILIES, Recorder, randomized

pytestmark = pytest.mark.usefixtures("one_thread")

COMPOSITES = {
    "epsilon_gamma_box": lambda: lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0),
    "epsilon_plus_flat": lambda: lrpx.composites.epsilon_plus_flat(),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    name = request.param
    size, kwargs = FAMILIES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64).clamp(-3, 3)
    return name, randomized(name, num_classes=10, **kwargs), x


def _explain_and_account(lrp, x):
    """(input relevance, explained logits, relevance absorbed by layers and by parameters)."""
    rec = Recorder(lrp)
    xin = x.clone().requires_grad_()
    y = lrp(xin)
    target = y.detach().argmax(1)
    r_out = torch.zeros_like(y)
    r_out[torch.arange(len(x)), target] = y.detach()[torch.arange(len(x)), target]
    params = [p for p in lrp.parameters() if p.requires_grad]
    rel, *param_rel = torch.autograd.grad(y, [xin] + params, r_out, allow_unused=True)
    rec.remove()
    by_parameters = sum((g.sum() for g in param_rel if g is not None), torch.zeros((), dtype=x.dtype))
    absorbed = rec.total_absorbed() + by_parameters
    rec.calls.clear()  # the records hold tensors whose hooks point back at them: free them now
    return rel, r_out.sum(), absorbed


@pytest.mark.slow
@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_family_converts_and_accounts_for_relevance(family, composite, record_property):
    name, net, x = family
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lrp = lrpx.convert(net, COMPOSITES[composite]())
    with torch.no_grad():
        ref, out = net(x), lrp(x)
    assert (out - ref).abs().max() <= 1e-8 * ref.abs().max(), name

    rel, logit_sum, absorbed = _explain_and_account(lrp, x)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    error = (rel.sum() + absorbed - logit_sum).abs() / logit_sum.abs()
    record_property("accounting_error", float(error.detach()))
    assert error <= float(BOUND), f"{name}: accounting error {error:.2e}"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.slow
def test_family_float32_forward(family):
    name, net, x = family
    net32 = copy.deepcopy(net).float()
    lrp = lrpx.convert(net32, COMPOSITES["epsilon_gamma_box"]())
    with torch.no_grad():
        ref, out = net32(x.float()), lrp(x.float())
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), name


@pytest.mark.slow
def test_readme_coverage_table_is_current():
    assert readme_table(README.read_text()) == table(), \
        "README.md's coverage table is out of date: run python tests/coverage_table.py --write"


@pytest.mark.slow
def test_family_relevance_equals_stored_fingerprints(family):
    """Every preset's relevance equals the values stored before the engine's refactors
    (tests/relevance_snapshot.py), to 1e-10 of each sample's L1 norm (float64 rounding differs
    between machines by up to 2e-11)."""
    name, net, x = family
    stored = json.loads(STORE.read_text())["fingerprints"][name]
    target = net(x).argmax(1)
    fresh = {name: {p: fingerprint(lrpx.explain(lrpx.convert(net, PRESETS[p]()), x, target).relevance)
                    for p in PRESETS}}
    assert differences({name: stored}, fresh) == []
