"""torchvision classifiers for the command line: their weights (downloaded or a local state-dict
file, checked and repaired) and how images are preprocessed for them."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .common import UsageError, check_choice, first_line

__all__ = ["Preprocessing", "classification_models", "segmentation_models", "load_classifier", "load_segmenter",
           "read_state_dict"]


@dataclass(frozen=True)
class Preprocessing:
    """How images go into a torchvision model, and the names of its classes."""

    transform: object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...]

    def bounds(self) -> tuple[Tensor, Tensor]:
        """ZBox bounds: pixels 0 and 1 after the normalisation, ``(1, 3, 1, 1)`` each."""
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return (0 - mean) / std, (1 - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model input back to pixels in ``[0, 1]``."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return (x * std + mean).clamp(0, 1)


#: the built-in models trained on the shapes data (``lrpx.datasets``), by command-line name
BUILTIN = {"shapes_vgg": "vgg", "shapes_resnet": "resnet"}


def classification_models() -> list[str]:
    """Names of torchvision's classification models, then the built-in shapes models."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models) + list(BUILTIN)


def segmentation_models() -> list[str]:
    """Names of torchvision's segmentation models."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.segmentation)


def load_task_model(kind: str, name: str, weights: str, choices: list[str], build):
    """A torchvision model of ``kind`` ("segmentation model", "detection model") and its default
    weights entry: downloaded for ``weights="DEFAULT"``, else built by ``build(state) -> (model,
    state)`` from the state dict in the file ``weights`` (so that the file decides the heads)
    and loaded from it after the usual checks. Never downloads backbone weights for a file."""
    import torchvision

    check_choice(kind, [name], choices)
    default = torchvision.models.get_model_weights(name).DEFAULT
    if weights == "DEFAULT":
        return _download(name), default
    path = Path(weights)
    model, state = build(read_state_dict(path))
    _check_state(model, state, path, name)
    model.load_state_dict(state)
    return model, default


def load_segmenter(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    """A torchvision segmentation model in eval mode with ``weights`` ("DEFAULT" or a state-dict
    path; a fine-tuned head with another number of classes, and an auxiliary head, are detected
    from the file). Never downloads backbone weights for a local file."""
    import torchvision

    def build(state):
        kwargs = {"weights": None, "weights_backbone": None}
        if not name.startswith("lraspp"):
            kwargs["aux_loss"] = any(k.startswith("aux_classifier.") for k in state)
        model = torchvision.models.get_model(name, **kwargs)
        own = model.state_dict()
        heads = [k for k in own if k in state and own[k].shape != state[k].shape and own[k].dim() == 4]
        if heads:  # a head fine-tuned to other classes
            model = torchvision.models.get_model(name, num_classes=state[heads[-1]].shape[0], **kwargs)
        return model, state

    model, default = load_task_model("segmentation model", name, weights, segmentation_models(), build)
    transform = default.transforms()
    categories = tuple(default.meta.get("categories") or ())
    return model.eval(), Preprocessing(transform, tuple(transform.mean), tuple(transform.std), categories)


def load_classifier(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    """A torchvision classifier in eval mode with ``weights`` ("DEFAULT" or a state-dict path).

    Raises
    ------
    UsageError
        Unknown model, weights that cannot be downloaded or read, that hold NaN or inf, or
        that do not fit the model.
    """
    import torchvision

    check_choice("model", [name], classification_models())
    if name in BUILTIN:
        return _builtin(name, weights)
    default = torchvision.models.get_model_weights(name).DEFAULT
    model = _download(name) if weights == "DEFAULT" else _from_file(name, Path(weights))
    return model.eval(), _preprocessing(default)


def _builtin(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    """A built-in shapes model: DEFAULT trains it on first use (then cached), PATH loads a state dict."""
    import torchvision.transforms as T

    from .. import datasets as ds

    if weights == "DEFAULT":
        model = ds.load_model(BUILTIN[name], progress=False)[0]
    else:
        path = Path(weights)
        state = read_state_dict(path)
        model = ds.MODELS[BUILTIN[name]]()
        _check_state(model, state, path, name)
        model.load_state_dict(state)
    transform = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize(ds.MEAN, ds.STD)])
    return model.eval(), Preprocessing(transform, tuple(ds.MEAN), tuple(ds.STD), tuple(ds.CLASSES))


def _download(name: str) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
        raise UsageError(f"could not get the DEFAULT weights of '{name}' ({first_line(error)}); offline, pass "
                         "--weights PATH to a local state-dict file") from None


def _from_file(name: str, path: Path) -> nn.Module:
    import torchvision

    state = read_state_dict(path)
    model = torchvision.models.get_model(name, weights=None)
    classes = _classifier_rows(model, state)
    if classes is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    _check_state(model, state, path, name)
    model.load_state_dict(state)
    return model


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path`` (also under a ``state_dict`` key, or saved from
    ``DataParallel``), with finite values only."""
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy files before it fails on them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        hint = ("it holds pickled objects besides tensors (a whole model?); save model.state_dict() instead"
                if "Unsupported global" in str(error) else f"not a PyTorch state-dict file ({type(error).__name__})")
        raise UsageError(f"cannot read weights file {path}: {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(f"weights file {path} holds NaN or inf in {len(bad)} tensor(s) (e.g. '{bad[0]}'): the "
                         "model would compute NaN; check how the weights were trained or saved")
    return state


def _classifier_rows(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """Classes of a fine-tuned head: rows of the last Linear's weight in ``state``, if they differ."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or f"{linears[-1]}.weight" not in state:
        return None
    rows = state[f"{linears[-1]}.weight"].shape[0]
    return rows if rows != model.get_submodule(linears[-1]).out_features else None


def _check_state(model: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensors of another shape (e.g. '{k}': {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in the model)")
    if problems:
        raise UsageError(f"weights file {path} does not match model '{name}': {'; '.join(problems)}")


def _preprocessing(default) -> Preprocessing:
    transform = default.transforms()
    categories = tuple(default.meta.get("categories") or ())
    return Preprocessing(transform, tuple(transform.mean), tuple(transform.std), categories)
