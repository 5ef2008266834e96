"""Bad input to pixel_flipping: clear errors that name the argument."""

import pytest
import torch

from lrpx.eval import pixel_flipping


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 5, 4)).eval()
    return model, torch.rand(2, 3, 6, 5), torch.randn(2, 3, 6, 5)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(relevance=torch.randn(2, 3, 5, 6)), r"relevance must have shape .*\(2, 3, 6, 5\)"),
        (dict(relevance=torch.randn(3, 3, 6, 5)), "relevance must have shape"),
        (dict(relevance=torch.randn(2, 2, 6, 5)), "relevance must have shape"),
        (dict(x=torch.rand(3, 6, 5)), "x must be a floating-point"),
        (dict(x=torch.ones(2, 3, 6, 5, dtype=torch.long)), "x must be a floating-point"),
        (dict(patch_size=0), "patch_size must be an int between 1 and min"),
        (dict(patch_size=6), r"patch_size .* min\(H, W\) = 5"),
        (dict(patch_size=2.0), "patch_size"),
        (dict(steps=31), "steps must be between 1 and .* = 30"),
        (dict(steps=0), "steps"),
        (dict(schedule="quadratic", steps=7), r"ceil\(sqrt\(regions\)\) = 6"),
        (dict(schedule="cubic"), "schedule must be one of"),
        (dict(fill="telea"), "fill must be one of .*inpaint"),
        (dict(order="best"), r"order must be one or more of \('morf', 'lrf', 'random'\)"),
        (dict(order=("morf", "morf")), "order must not repeat"),
        (dict(order=()), "order must be one or more"),
        (dict(score="probability"), r"score must be one of \['logit', 'softmax'\]"),
        (dict(target=4), "target out of range: the model has 4 classes"),
        (dict(target=[1, 9]), "target out of range"),
        (dict(target=-1), "target must be non-negative"),
        (dict(target=[0, 1, 2]), "target must be an int or 2 ints"),
        (dict(target=1.5), "target must be an int"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(normalizer=([0.5, 0.5], [1.0, 1.0])), "normalizer mean and std need 1 or 3"),
        (dict(normalizer=([0.5], [0.0])), "normalizer std must not be 0"),
        (dict(normalizer=(0.5,)), "normalizer must be a pair"),
        (dict(pixel_range=(1.0, 0.0)), "pixel_range must be"),
        (dict(reduce="max"), "reduce must be one of"),
    ],
)
def test_bad_arguments_are_named(setup, change, match):
    model, x, relevance = setup
    arguments = dict(x=x, relevance=relevance) | change
    x, relevance = arguments.pop("x"), arguments.pop("relevance")
    with pytest.raises((ValueError, TypeError), match=match):
        pixel_flipping(model, x, relevance, **arguments)


def test_nan_relevance(setup):
    model, x, relevance = setup
    relevance = relevance.clone()
    relevance[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="relevance contains NaN"):
        pixel_flipping(model, x, relevance)


def test_training_mode_warns(setup):
    model, x, relevance = setup
    model.train()
    with pytest.warns(UserWarning, match="model is in training mode"):
        pixel_flipping(model, x, relevance, steps=2)


def test_model_output_must_be_two_dimensional(setup):
    _, x, relevance = setup
    with pytest.raises(ValueError, match=r"model output must be \(N, classes\)"):
        pixel_flipping(lambda t: t.sum((1, 2, 3)), x, relevance, steps=2, target=0)


def test_empty_batch_and_non_tensor_output_are_named(setup):
    model, x, relevance = setup
    with pytest.raises(ValueError, match=r"x is an empty batch \(0, 3, 6, 5\)"):
        pixel_flipping(model, x[:0], relevance[:0], steps=2)
    with pytest.raises(TypeError, match=r"the model returned tuple; lrpx.eval needs a tensor of shape \(N, classes\)"):
        pixel_flipping(lambda t: (model(t), None), x, relevance, steps=2)
    with pytest.raises(TypeError, match=r"the model returned dict"):
        pixel_flipping(lambda t: {"out": model(t)}, x, relevance, steps=2, target=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_another_device(setup):
    model, x, relevance = setup
    with pytest.raises(ValueError, match="generator is on"):
        pixel_flipping(model, x, relevance, generator=torch.Generator("cuda"))
