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
from .models import MODELS, BasicBlock, ShapesResNet, ShapesVGG
from .shapes import (CLASSES, MEAN, SPLIT_SEEDS, STD, Shapes, denormalize, make_shapes, normalize, shapes_split,
                     zbox_bounds)
from .training import TrainConfig, accuracy, cache_dir, load_model, num_threads, train_model

__all__ = ["CLASSES", "MEAN", "STD", "SPLIT_SEEDS", "Shapes", "make_shapes", "shapes_split", "normalize", "denormalize",
           "zbox_bounds", "ShapesVGG", "ShapesResNet", "BasicBlock", "MODELS", "TrainConfig", "train_model",
           "load_model", "cache_dir", "accuracy", "num_threads"]
