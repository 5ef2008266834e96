"""Built-in data with ground truth, and two small models trained on it, for the offline demo.

``shapes`` is a procedurally generated classification task: one shape (circle, square,
triangle, cross or ring) of random position, size, rotation and colour on a textured, noisy
background. Every image comes with the **object mask**, the pixels that hold the evidence for
its class, so an explanation can be scored against ground truth
(:func:`relevance_mass_accuracy`, :func:`relevance_rank_accuracy`; Arras et al. 2022).

>>> data = make_shapes(16, seed=0)                   # images in [0, 1], labels, masks
>>> model, info = load_model("vgg")                 # trained on first use, then cached
>>> low, high = zbox_bounds()                       # for epsilon_gamma_box(low, high)
>>> model(normalize(data.images)).argmax(1)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["CLASSES", "MEAN", "STD", "Shapes", "make_shapes", "shapes_split", "normalize", "denormalize",
           "zbox_bounds", "ShapesVGG", "ShapesResNet", "MODELS", "TrainConfig", "train_model", "load_model",
           "cache_dir", "accuracy", "num_threads"]

CLASSES = ("circle", "square", "triangle", "cross", "ring")
#: per-channel normalisation of the models' input: ``(pixel - MEAN) / STD``
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
#: first seed of each split; splits never share a seed
SPLIT_SEEDS = {"train": 0, "test": 1_000_000}
_VERSION = 1  # bump when the data or the models change, so stale cached weights are not used


@dataclass(frozen=True)
class Shapes:
    """A batch of the shapes task.

    Attributes
    ----------
    images
        ``(N, 3, H, W)`` float32 pixels in ``[0, 1]``.
    labels
        ``(N,)`` int64 class indices into :data:`CLASSES`.
    masks
        ``(N, 1, H, W)`` bool, ``True`` on the object's pixels.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index) -> Shapes:
        return Shapes(self.images[index], self.labels[index], self.masks[index])


def make_shapes(n: int, *, seed: int = 0, size: int = 64) -> Shapes:
    """Generate ``n`` images of the shapes task, the same for the same ``n``, ``seed`` and ``size``.

    Parameters
    ----------
    n
        Number of images; the classes take turns (``label = i % 5`` before shuffling), so
        they are balanced.
    seed
        Seed of a private :class:`torch.Generator`; the global RNG is not touched.
    size
        Side of the square images (at least 32).

    Returns
    -------
    Shapes
        Images, labels and object masks.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int of at least 32, got {size!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n)[torch.randperm(n, generator=g)] % len(CLASSES)
    masks = _object_masks(labels, size, g)
    background = _background(n, size, g)
    colour = _object_colour(background, g)
    shading = 1 + 0.15 * (torch.rand(n, 1, size, size, generator=g) - 0.5)
    images = torch.where(masks, (colour * shading).clamp(0, 1), background)
    images = (images + 0.03 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return Shapes(images.float(), labels, masks)


def shapes_split(split: str, n: int, *, size: int = 64) -> Shapes:
    """The ``"train"`` or ``"test"`` split of the task (disjoint seeds)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    return make_shapes(n, seed=SPLIT_SEEDS[split], size=size)


def _object_masks(labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``(N, 1, size, size)`` bool masks of the shapes, with random radius, centre and angle."""
    n = labels.numel()
    radius = size * (0.12 + 0.13 * torch.rand(n, generator=g))
    margin = radius + 2
    centre = margin[:, None] + (size - 2 * margin)[:, None] * torch.rand(n, 2, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    u, v = (cos * dx + sin * dy) / radius.view(-1, 1, 1), (cos * dy - sin * dx) / radius.view(-1, 1, 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(len(CLASSES)):
        pick = labels == k
        masks[pick] = _shape(k, u[pick], v[pick])
    return masks.unsqueeze(1)


def _shape(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test of shape ``kind`` in coordinates scaled by the radius (circumradius 1)."""
    r2 = u**2 + v**2
    if kind == 0:  # circle
        return r2 <= 0.9**2
    if kind == 1:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if kind == 2:  # equilateral triangle, inradius 0.55
        edges = [u * math.cos(a) + v * math.sin(a) <= 0.55 for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return edges[0] & edges[1] & edges[2]
    if kind == 3:  # cross of two bars
        return ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))
    return (r2 <= 1) & (r2 >= 0.55**2)  # ring


def _background(n: int, size: int, g: torch.Generator) -> Tensor:
    """Smooth coloured noise plus stripes of random direction and frequency, ``(N, 3, H, W)``."""
    base = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    coarse = F.interpolate(torch.rand(n, 3, 6, 6, generator=g) - 0.5, size=(size, size), mode="bicubic",
                           align_corners=False)
    angle = math.pi * torch.rand(n, 1, 1, 1, generator=g)
    freq = 2 * math.pi * (2 + 4 * torch.rand(n, 1, 1, 1, generator=g)) / size
    grid = torch.arange(size, dtype=torch.float32)
    phase = freq * (angle.cos() * grid.view(1, 1, 1, -1) + angle.sin() * grid.view(1, 1, -1, 1))
    stripes = 0.08 * torch.rand(n, 1, 1, 1, generator=g) * torch.sin(phase)
    return (base + 0.3 * coarse + stripes).clamp(0, 1)


def _object_colour(background: Tensor, g: torch.Generator, candidates: int = 8) -> Tensor:
    """A random colour per image that stands out from the background's mean colour."""
    n = background.shape[0]
    colours = torch.rand(n, candidates, 3, generator=g)
    mean = background.mean(dim=(2, 3)).unsqueeze(1)
    contrast = (colours - mean).abs().amax(dim=2)
    good = contrast >= 0.3
    pick = torch.where(good.any(1), good.float().argmax(1), contrast.argmax(1))
    return colours[torch.arange(n), pick].view(n, 3, 1, 1)


def normalize(images: Tensor) -> Tensor:
    """Pixels in ``[0, 1]`` to model input: ``(images - MEAN) / STD`` per channel."""
    mean, std = _stats(images)
    return (images - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """Model input back to pixels: ``x * STD + MEAN`` per channel."""
    mean, std = _stats(x)
    return x * std + mean


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    kw = {"dtype": like.dtype, "device": like.device}
    return torch.tensor(MEAN, **kw).view(1, 3, 1, 1), torch.tensor(STD, **kw).view(1, 3, 1, 1)


def zbox_bounds(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The ZBox ``(low, high)`` bounds of the model input: pixels 0 and 1 normalised, ``(1, 3, 1, 1)``."""
    zero, one = torch.zeros(1, 3, 1, 1, dtype=dtype), torch.ones(1, 3, 1, 1, dtype=dtype)
    return normalize(zero), normalize(one)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


class ShapesVGG(nn.Sequential):
    """A small VGG: four Conv-BatchNorm-ReLU stages with max pooling, global pooling, a linear classifier.

    Parameters
    ----------
    num_classes
        Outputs.
    width
        Channels of the first stage (doubled twice).
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8):
        w = width
        features = [*_conv_bn(3, w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(w, 2 * w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(2 * w, 4 * w), nn.ReLU(), nn.MaxPool2d(2),
                    *_conv_bn(4 * w, 4 * w), nn.ReLU()]
        classifier = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w, num_classes)]
        super().__init__(nn.Sequential(*features), nn.Sequential(*classifier))


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BatchNorm layers and a shortcut (a 1x1 Conv-BatchNorm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(cout, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ShapesResNet(nn.Module):
    """A small ResNet: a Conv-BatchNorm-ReLU-MaxPool stem, three residual blocks, global pooling.

    Parameters
    ----------
    num_classes
        Outputs.
    width
        Channels of the stem (doubled twice by the blocks).
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Sequential(*_conv_bn(3, w), nn.ReLU(), nn.MaxPool2d(2))
        self.blocks = nn.Sequential(BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))


MODELS: dict[str, type[nn.Module]] = {"vgg": ShapesVGG, "resnet": ShapesResNet}


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained; every field is part of its cache key.

    Attributes
    ----------
    epochs
        Passes over the training split.
    train_size, test_size
        Images in the splits.
    batch_size, lr
        Mini-batch size and peak learning rate (AdamW with a one-cycle schedule).
    seed
        Seed of the initial weights and the shuffling.
    """

    epochs: int = 6
    train_size: int = 6000
    test_size: int = 1000
    batch_size: int = 32
    lr: float = 5e-3
    seed: int = 0

    def key(self, name: str) -> str:
        """File name of the cached weights of model ``name``."""
        text = json.dumps({"version": _VERSION, "model": name, **self.__dict__}, sort_keys=True)
        return f"shapes-{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.pt"


def cache_dir() -> Path:
    """Where trained weights are kept: ``$LRPX_CACHE``, else ``$XDG_CACHE_HOME/lrpx``, else ``~/.cache/lrpx``."""
    if os.environ.get("LRPX_CACHE"):
        return Path(os.environ["LRPX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lrpx"


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(MODELS)}")


def train_model(name: str, config: TrainConfig = TrainConfig(), *, progress: bool = True, threads: int | None = 1
                ) -> tuple[nn.Module, dict]:
    """Train model ``name`` (``"vgg"`` or ``"resnet"``) on the train split.

    Parameters
    ----------
    name
        ``"vgg"`` or ``"resnet"``.
    config
        Training settings.
    progress
        Show a progress bar.
    threads
        CPU threads while training (restored afterwards); ``None`` keeps torch's setting. One
        thread is the default: these small layers gain little from a second one, and on a
        machine whose other cores are busy, waiting threads make training many times slower.

    Returns
    -------
    model : nn.Module
        The trained model, in eval mode.
    info : dict
        ``accuracy`` on the test split, ``train_seconds``, ``config``.
    """
    _check_name(name)
    with num_threads(threads):
        start = time.perf_counter()
        model = _fit(name, config, progress)
        seconds = time.perf_counter() - start
        test = shapes_split("test", config.test_size)
        info = {"accuracy": accuracy(model, test), "train_seconds": round(seconds, 1),
                "config": dict(config.__dict__)}
    return model, info


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: unchanged), then restore."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(name: str, config: TrainConfig, progress: bool) -> nn.Module:
    torch.manual_seed(config.seed)
    model = MODELS[name]().to(memory_format=torch.channels_last)  # faster convolutions on CPUs
    data = shapes_split("train", config.train_size)
    x, y = normalize(data.images).contiguous(memory_format=torch.channels_last), data.labels
    steps = config.epochs * math.ceil(len(y) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    g = torch.Generator().manual_seed(config.seed)
    model.train()
    with tqdm(total=steps, desc=f"training {name}", unit="batch", disable=not progress) as bar:
        for _ in range(config.epochs):
            for batch in torch.randperm(len(y), generator=g).split(config.batch_size):
                loss = F.cross_entropy(model(_augment(x[batch], g)), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.to(memory_format=torch.contiguous_format).eval()


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal flips (the classes are closed under them, up to rotation)."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


@torch.no_grad()
def accuracy(model: nn.Module, data: Shapes, *, batch_size: int = 256) -> float:
    """Share of ``data`` that ``model`` (in eval mode) classifies correctly."""
    device = next(model.parameters()).device
    correct = 0
    for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size)):
        correct += int((model(normalize(images.to(device))).argmax(1).cpu() == labels).sum())
    return correct / len(data)


def load_model(name: str, config: TrainConfig = TrainConfig(), *, train: bool = True, progress: bool = True,
               retrain: bool = False, threads: int | None = 1) -> tuple[nn.Module, dict]:
    """Model ``name`` trained with ``config``: from the cache, or trained now and cached.

    Parameters
    ----------
    name
        ``"vgg"`` or ``"resnet"``.
    config
        Training settings (part of the cache key).
    train
        Train when nothing is cached; ``False`` raises :class:`FileNotFoundError` instead.
    progress
        Show a progress bar while training.
    retrain
        Train even when cached weights exist (and replace them).
    threads
        CPU threads while training (see :func:`train_model`).

    Returns
    -------
    model : nn.Module
        In eval mode, on the CPU.
    info : dict
        ``accuracy``, ``train_seconds``, ``config``, ``path`` of the cached weights, ``cached``
        (whether they were loaded rather than trained now).
    """
    _check_name(name)
    path = cache_dir() / config.key(name)
    if path.exists() and not retrain:
        loaded = _load(name, path)
        if loaded is not None:
            return loaded[0], {**loaded[1], "path": str(path), "cached": True}
    if not train:
        raise FileNotFoundError(f"no cached weights for '{name}' at {path}")
    model, info = train_model(name, config, progress=progress, threads=threads)
    _save(path, model, info)
    return model, {**info, "path": str(path), "cached": False}


def _load(name: str, path: Path) -> tuple[nn.Module, dict] | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = MODELS[name]()
        model.load_state_dict(saved["state_dict"])
        return model.eval(), json.loads(saved["info"])
    except Exception as error:  # a damaged or foreign file: train again
        warnings.warn(f"ignoring unreadable cached weights {path} ({error.__class__.__name__}); training again",
                      RuntimeWarning, stacklevel=3)
        return None


def _save(path: Path, model: nn.Module, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save({"state_dict": model.state_dict(), "info": json.dumps(info)}, partial)
    os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the new one
