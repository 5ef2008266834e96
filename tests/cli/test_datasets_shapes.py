"""The built-in shapes task: determinism, masks, ground-truth scores, models and the weight cache."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lrpx
from lrpx import datasets as ds
from lrpx.eval import relevance_mass_accuracy, relevance_rank_accuracy
from lrpx.layers import Add

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits
ALLOWED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Flatten, nn.Dropout,
           nn.Identity)
TINY = ds.TrainConfig(epochs=1, train_size=64, test_size=32, batch_size=32)


@pytest.fixture(scope="module")
def data() -> ds.Shapes:
    return ds.make_shapes(100, seed=3)


def test_same_seed_same_data_and_global_rng_untouched(data):
    state = torch.random.get_rng_state()
    again = ds.make_shapes(100, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)
    assert torch.equal(again.masks, data.masks)
    other = ds.make_shapes(100, seed=4)
    assert not torch.equal(other.images, data.images)


def test_types_ranges_and_balance(data):
    assert data.images.shape == (100, 3, 64, 64) and data.images.dtype == torch.float32
    assert data.masks.shape == (100, 1, 64, 64) and data.masks.dtype == torch.bool
    assert 0 <= data.images.min() and data.images.max() <= 1
    assert torch.bincount(data.labels, minlength=5).tolist() == [20] * 5
    assert len(data) == 100 and len(data[:7]) == 7


def test_splits_are_disjoint():
    train, test = ds.shapes_split("train", 50), ds.shapes_split("test", 50)
    distance = (train.images.flatten(1)[:, None] - test.images.flatten(1)[None]).abs().amax(2)
    assert distance.min() > 0.1
    with pytest.raises(ValueError, match="split"):
        ds.shapes_split("val", 3)


def test_masks_are_whole_objects_inside_the_image(data):
    masks = data.masks[:, 0]
    area = masks.flatten(1).sum(1).double() / 64**2
    assert (area > 0.01).all() and (area < 0.25).all()
    border = torch.cat([masks[:, 0], masks[:, -1], masks[:, :, 0], masks[:, :, -1]], 1)
    assert not border.any(), "objects are placed with a margin"


def test_mask_marks_the_object_colour(data):
    """Inside the mask the colour is the object's; just outside it is the background's."""
    masks = data.masks.float()
    ring = (nn.functional.max_pool2d(masks, 7, stride=1, padding=3) - masks).bool()
    inside = (data.images * masks).sum((2, 3)) / masks.sum((2, 3))
    outside = (data.images * ring).sum((2, 3)) / ring.sum((2, 3))
    contrast = (inside - outside).abs().amax(1)
    assert (contrast > 0.12).float().mean() >= 0.95
    spread = ((data.images - inside[..., None, None]).abs() * masks).sum((2, 3)) / masks.sum((2, 3))
    assert spread.amax(1).median() < 0.06, "the object is one colour up to shading and noise"


def test_shape_geometry(data):
    """Rings have an empty centre, the other shapes cover theirs; circles fill 0.81 pi r^2."""
    masks = data.masks[:, 0]
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for mask, label in zip(masks, data.labels):
        weight = mask.double()
        cy, cx = (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()
        centre = bool(mask[int(cy.round()), int(cx.round())])
        assert centre == (ds.CLASSES[label] != "ring"), ds.CLASSES[label]
    circles = masks[data.labels == 0]
    radius = torch.stack([((m.double() * (ys - ys[m].mean()) ** 2).sum() / m.sum()) for m in circles])
    # a disc of radius a has E[(y - cy)^2] = a^2 / 4 and area pi a^2
    area = circles.flatten(1).sum(1).double()
    torch.testing.assert_close(area, math.pi * 4 * radius, rtol=0.08, atol=0)


def test_normalisation_and_zbox_bounds():
    low, high = ds.zbox_bounds()
    torch.testing.assert_close(low, torch.full((1, 3, 1, 1), -2.0))
    torch.testing.assert_close(high, torch.full((1, 3, 1, 1), 2.0))
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(ds.denormalize(ds.normalize(x)), x)


def test_relevance_mass_and_rank_accuracy_by_hand():
    relevance = torch.tensor([[[[3.0, -1.0], [1.0, 0.0]]]])  # (1, 1, 2, 2)
    top_left = torch.tensor([[[[True, False], [False, False]]]])
    anti = torch.tensor([[[[False, True], [True, False]]]])
    # positive mass 3 + 1 = 4; on the top-left pixel 3
    assert relevance_mass_accuracy(relevance, top_left).item() == pytest.approx(0.75)
    assert relevance_rank_accuracy(relevance, top_left).item() == pytest.approx(1.0)
    # mass on the anti-diagonal: 1 of 4; the 2 most relevant pixels are 3 (out) and 1 (in)
    assert relevance_mass_accuracy(relevance, anti).item() == pytest.approx(0.25)
    assert relevance_rank_accuracy(relevance, anti).item() == pytest.approx(0.5)


def test_ground_truth_scores_sum_channels_and_handle_edge_cases():
    relevance = torch.zeros(3, 3, 2, 2)
    relevance[0, :, 0, 0] = torch.tensor([1.0, 1.0, -1.5])  # channel sum 0.5 (only positive pixel)
    relevance[0, :, 1, 1] = torch.tensor([-1.0, -1.0, 0.0])
    relevance[1] = -1.0  # no positive relevance at all
    masks = torch.zeros(3, 1, 2, 2, dtype=torch.bool)
    masks[:2, 0, 0, 0] = True  # sample 2 has an empty mask
    rma = relevance_mass_accuracy(relevance, masks)
    rra = relevance_rank_accuracy(relevance, masks)
    assert rma.tolist() == [1.0, 0.0, 0.0] and rma.dtype == torch.float64
    assert rra.tolist() == [1.0, 1.0, 0.0]  # ties go to the first pixel in raster order
    with pytest.raises(ValueError, match="does not match"):
        relevance_mass_accuracy(relevance, masks[:, :, :1])


@pytest.mark.parametrize("name", list(ds.MODELS))
def test_models_use_standard_layers_and_convert(name):
    torch.manual_seed(0)
    model = ds.MODELS[name]().eval()
    leaves = [m for m in model.modules() if not list(m.children())]
    assert all(isinstance(m, ALLOWED) for m in leaves), {type(m).__name__ for m in leaves}
    x = torch.randn(2, 3, 64, 64)
    low, high = ds.zbox_bounds()
    lrp_model = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low, high))
    torch.testing.assert_close(lrp_model(x), model(x), rtol=1e-4, atol=1e-4)
    adds = [m for m in lrp_model.modules() if isinstance(m, Add)]
    assert len(adds) == (3 if name == "resnet" else 0), "residual sums become LRP-aware additions"
    relevance, out = lrpx.explain(lrp_model, x, torch.tensor([0, 1]))
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LRPX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert ds.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LRPX_CACHE")
    assert ds.cache_dir() == tmp_path / "b" / "lrpx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ds.cache_dir() == tmp_path / "home" / ".cache" / "lrpx"


def test_cache_key_depends_on_every_setting():
    keys = {ds.TrainConfig().key("vgg"), ds.TrainConfig().key("resnet"), ds.TrainConfig(epochs=2).key("vgg"),
            ds.TrainConfig(seed=1).key("vgg"), ds.TrainConfig(lr=1e-3).key("vgg")}
    assert len(keys) == 5


def test_load_model_trains_once_then_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("LRPX_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    with pytest.raises(FileNotFoundError, match="no cached weights"):
        ds.load_model("vgg", TINY, train=False)
    model, info = ds.load_model("vgg", TINY, progress=False)
    assert torch.get_num_threads() == threads
    assert not info["cached"] and 0 <= info["accuracy"] <= 1 and info["train_seconds"] >= 0
    assert (tmp_path / TINY.key("vgg")).is_file() and not model.training
    again, info2 = ds.load_model("vgg", TINY, progress=False)
    assert info2["cached"] and info2["accuracy"] == info["accuracy"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown model 'alexnet'; valid: vgg, resnet"):
        ds.load_model("alexnet", TINY)


def test_damaged_cache_file_is_retrained(monkeypatch, tmp_path):
    monkeypatch.setenv("LRPX_CACHE", str(tmp_path))
    (tmp_path / TINY.key("resnet")).write_bytes(b"not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = ds.load_model("resnet", TINY, progress=False)
    assert not info["cached"]
    assert any("ignoring unreadable cached weights" in str(w.message) for w in caught)
    _, info = ds.load_model("resnet", TINY, progress=False)
    assert info["cached"]


def test_training_is_deterministic():
    first, _ = ds.train_model("vgg", TINY, progress=False)
    second, _ = ds.train_model("vgg", TINY, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b)
