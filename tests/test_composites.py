"""Composites: presets' rule tables (snapshots), matchers, and errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import lrpx
from lrpx.composites import Composite, Depth, First, Last, Position
from lrpx.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZPlus

SNAPSHOTS = Path(__file__).parent / "snapshots"
PRESET_ARGS = {"epsilon_gamma_box": {"low": -3.0, "high": 3.0}, "tutorial": {"low": -3.0, "high": 3.0}}


def table_text(model: nn.Module) -> str:
    lines = []
    for name, fn in lrpx.composites.presets().items():
        lines.append(f"# {name}")
        table = fn(**PRESET_ARGS.get(name, {})).assign(model)
        lines += [f"{layer}\t{rule!r}" for layer, rule in table.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_preset_tables_match_snapshot(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    text = table_text(model)
    path = SNAPSHOTS / f"rules_{name}.txt"
    if os.environ.get("LRPX_UPDATE_SNAPSHOTS"):
        path.write_text(text)
    assert text == path.read_text()


def test_vgg16_tutorial_split_is_the_lrp_tutorial_one():
    table = lrpx.composites.tutorial(-3.0, 3.0).assign(torchvision.models.vgg16(weights=None).eval())
    weighted = [(n, r) for n, r in table.items() if n.startswith(("features", "classifier")) and
                not isinstance(r, (Pass, Norm))]
    assert len(weighted) == 16
    kinds = [type(r).__name__ for _, r in weighted]
    assert kinds == ["ZBox"] + ["Gamma"] * 6 + ["Epsilon"] * 6 + ["Epsilon"] * 3
    assert [n for n, _ in weighted[:8]] == ["features.0", "features.2", "features.5", "features.7", "features.10",
                                           "features.12", "features.14", "features.17"]
    assert all(r.relative and r.epsilon == 0.25 for _, r in weighted[7:13])
    assert all(not r.relative and r.epsilon == 1e-6 for _, r in weighted[13:])


def mlp():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                         nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def test_matchers():
    comp = Composite([
        (First(), Flat()),
        (Last(), Epsilon(0.5)),
        ("2.*", Gamma(0.5)),          # glob: only the Linear inside gets a weighted rule
        (Position(slice(2, 3)), ZPlus()),
    ], default=Epsilon(0.01))
    table = comp.assign(mlp())
    assert table["0"] == Flat() and table["5"] == Epsilon(0.5)
    assert table["2.0"] == Gamma(0.5) and table["2.1"] == Pass()
    assert table["3"] == ZPlus()
    assert table["1"] == Pass()
    by_callable = Composite([(lambda name, m: name == "3", AlphaBeta(2, 1))], default=Epsilon(0.01)).assign(mlp())
    assert by_callable["3"] == AlphaBeta(2, 1) and by_callable["5"] == Epsilon(0.01)


def test_name_prefix_covers_a_container_and_unknown_names_fail():
    table = Composite([("2", Gamma(1.0))]).assign(mlp())
    assert table["2.0"] == Gamma(1.0) and table["0"] == Epsilon()
    with pytest.raises(ValueError, match="does not exist: 'features.*'"):
        Composite([("features.*", Gamma())]).assign(mlp())
    with pytest.raises(ValueError, match="does not exist: '7'"):
        Composite([("7", Gamma())]).assign(mlp())


def test_no_default_requires_every_layer_matched():
    with pytest.raises(ValueError, match="no composite entry matches layer '2.0'"):
        Composite([(First(), Flat()), (Last(), Flat()), ("3", Flat())], default=None).assign(mlp())


def test_depth_fractions():
    convs = nn.Sequential(*[nn.Conv2d(1, 1, 1) for _ in range(9)]).eval()
    table = Composite([(First(), Flat()), (Depth(0.0, 0.5), Gamma()), (Depth(0.5, 1.0), ZPlus())]).assign(convs)
    kinds = [type(table[str(i)]).__name__ for i in range(9)]
    assert kinds == ["Flat"] + ["Gamma"] * 4 + ["ZPlus"] * 4


def test_presets_registry_and_errors():
    reg = lrpx.composites.presets()
    reg.pop("tutorial")
    assert "tutorial" in lrpx.composites.presets()
    with pytest.raises(ValueError, match="valid: epsilon_gamma_box"):
        lrpx.composites.get_preset("gamma_box")
    with pytest.raises(ValueError, match="low <= high"):
        lrpx.composites.epsilon_gamma_box(low=1.0, high=-1.0)
    with pytest.raises(ValueError, match="alpha - beta == 1"):
        AlphaBeta(3, 1)
    with pytest.raises(TypeError, match="pair"):
        Composite([Gamma()])


def test_rules_are_immutable_values():
    rule = Gamma(0.25)
    with pytest.raises(AttributeError, match="immutable"):
        rule.gamma = 1.0
    assert Gamma(0.25) == rule and Gamma(0.5) != rule and hash(Gamma(0.25)) == hash(rule)
    assert repr(ZBox(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))) == \
        "ZBox(low=tensor(shape=(1, 3, 1, 1)), high=tensor(shape=(1, 3, 1, 1)), epsilon=1e-06)"


def test_per_channel_bounds_on_a_normalised_image():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    model = nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2, bias=False))
    comp = lrpx.composites.epsilon_gamma_box(low.double(), high.double(), epsilon=1e-12, stabilizer=1e-12)
    lrp = lrpx.convert(model.double().eval(), comp)
    x = ((torch.rand(2, 3, 4, 4) - mean) / std).double()
    rel, out = lrpx.explain(lrp, x, 0)
    torch.testing.assert_close(rel.sum((1, 2, 3)), out[:, 0], rtol=1e-8, atol=1e-12)
