"""Training the built-in models on the ``shapes`` data, and the cache of trained weights."""
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

from .models import MODELS
from .shapes import Shapes, normalize, shapes_split

__all__ = ["TrainConfig", "train_model", "load_model", "cache_dir", "accuracy", "num_threads"]

_VERSION = 1  # bump when the data or the models change, so stale cached weights are not used


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
