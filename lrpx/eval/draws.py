"""Random draws for the evaluation: from one generator for the whole batch, or from one
generator per sample, so that a sample's draws do not depend on the rest of its batch (what a
data set split over processes needs to give the same results however it is split)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["Generators", "rand", "check_generators"]

#: ``None`` (torch's global generator), one ``torch.Generator``, or one per sample
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def rand(shape: Sequence[int], generator: Generators, *, device, dtype=torch.float32,
         normal: bool = False) -> Tensor:
    """Uniform draws in ``[0, 1)`` (standard normal ones with ``normal``) of ``shape``; with
    a sequence of generators, row ``b`` (``shape[0]`` rows) is drawn from ``generator[b]``."""
    draw = torch.randn if normal else torch.rand
    if generator is None or isinstance(generator, torch.Generator):
        return draw(tuple(shape), generator=generator, device=device, dtype=dtype)
    return torch.stack([draw(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])


def check_generators(generator: Generators, batch: int, device: torch.device) -> None:
    """A generator (or one per sample) on the device type of the data."""
    if generator is None:
        return
    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    if not isinstance(generator, torch.Generator) and len(generators) != batch:
        raise ValueError(f"generator must be one torch.Generator or one per sample ({batch}), "
                         f"got {len(generators)}")
    for g in generators:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a sequence of them, got {type(g).__name__}")
        if g.device.type != device.type:
            raise ValueError(f"generator is on {g.device}, but x is on {device}")
