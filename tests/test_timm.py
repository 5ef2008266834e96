"""timm architectures convert with no code of their own: random weights with non-zero biases
and random BatchNorm statistics, float64, 64² inputs; the converted forward equals the
original's, and the input relevance plus what each LRP layer absorbs (recomputed in
tests/zoo.py from the rule definitions) equals the explained logit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx
from test_coverage import _explain_and_account

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_thread")

#: architectures that convert and account for their relevance, across timm's families
PASSING = [
    "resnet18", "resnet50d", "seresnet50", "regnetx_002", "regnety_002", "efficientnet_b0",
    "mobilenetv3_small_100", "mobilenetv4_conv_small", "ghostnet_100", "convnext_atto", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "deit3_small_patch16_224", "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224",
    "repvgg_a0", "dla34", "dpn68", "cspresnet50",
    # window and grid attention, rotary embeddings, position codes, run-time rules
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "maxvit_rmlp_nano_rw_256", "coatnet_nano_rw_224",
    "eva02_tiny_patch14_224", "xcit_nano_12_p16_224", "edgenext_xx_small",
]


def _build(name: str, size: int) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, num_classes=10, img_size=size)
    except TypeError:  # convolutional: no image size
        return timm.create_model(name, pretrained=False, num_classes=10)


def randomized_at(name: str, sizes=(64, 96, 128, 224, 240, 256)) -> tuple[nn.Module, int]:
    """:func:`randomized` at the smallest of ``sizes`` whose input the model takes."""
    for size in sizes:
        try:
            model = randomized(name, size)
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size, dtype=torch.float64))
            return model, size
        except (RuntimeError, ValueError, AssertionError) as err:
            last = err
    raise last


def randomized(name: str, size: int = 64, seed: int = 0) -> nn.Module:
    """timm ``name`` (10 classes, ``size``² where the model takes an image size) with random
    weights scaled by fan-in, non-zero biases, random norm affines and BatchNorm statistics, and
    random layer scales, tokens and position embeddings (timm zero-initialises several of them)."""
    torch.manual_seed(seed)
    model = _build(name, size)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            for pname, p in m.named_parameters(recurse=False):
                if pname == "weight" and p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
                elif pname == "weight":
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                elif pname == "bias":
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g) + (0.5 if p.dim() == 1 else 0.0))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval().double()


@pytest.mark.slow
@pytest.mark.parametrize("name", PASSING)
def test_timm_architecture_converts_and_accounts_for_relevance(name):
    model = randomized(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
    with torch.no_grad():
        ref, out = model(x), lrp(x)
    assert ref.abs().max() > 0.1  # a real signal, not a zero-initialised head
    assert (out - ref).abs().max() <= 1e-8 * ref.abs().max(), name
    rel, logit_sum, absorbed = _explain_and_account(lrp, x)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert (rel.sum() + absorbed - logit_sum).abs() <= 1e-8 * logit_sum.abs(), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched


def test_timm_subclassed_layers_take_their_base_twins_or_are_traced():
    from timm.layers import LayerNorm, LayerNorm2d
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LayerNorm2d(4), nn.Flatten(2), nn.Identity()).double().eval()
    model[3] = LayerNorm(36).double()
    lrp = lrpx.convert(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=1e-12, atol=1e-12)
    norms = [m for m in lrp.modules() if isinstance(m, lrpx.layers.Twin) and isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2  # both timm norms became LayerNorm twins through their F.layer_norm calls


def test_timm_module_that_cannot_be_traced_takes_rules_at_run_time():
    model = timm.create_model("vgg11", pretrained=False, num_classes=10).eval()
    lrp = lrpx.convert(model)
    assert list(lrp.lrpx_graph.oplevel) == ["pre_logits"]  # ConvMlp branches on the input size
    assert "'pre_logits' (timm.models.vgg.ConvMlp)" in lrp.lrpx_graph.oplevel["pre_logits"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=1e-5, atol=1e-5)


def test_readme_timm_table_lists_the_architectures_and_agrees_with_the_tests():
    """The README's timm table (``python tests/timm_table.py --write``; too slow to re-run in CI)
    covers the fixed list in order, at least 90% of it converts and passes, every other entry
    names what it refuses, and the architectures this file tests pass there."""
    from timm_table import ARCHITECTURES, END, README, START

    text = README.read_text()
    lines = text[text.index(START) + len(START):text.index(END)].strip().splitlines()[2:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    assert list(rows) == ARCHITECTURES
    passing = [n for n, cells in rows.items() if cells[2] == "converts"]
    assert len(passing) >= 0.9 * len(ARCHITECTURES), f"{len(passing)} of {len(ARCHITECTURES)}"
    assert set(PASSING) & set(rows) <= set(passing)
    for name, cells in rows.items():
        assert cells[2] == "converts" or cells[2].startswith("refused: no rule for `"), (name, cells[2])
        if cells[2] == "converts":
            assert float(cells[4]) <= 1e-8 and float(cells[5]) <= 1e-8, name
