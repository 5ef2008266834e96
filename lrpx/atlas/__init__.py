"""The concept atlas: for every channel (concept) of a layer, the images of a data set where it
is most relevant and most activated, where in those images its evidence lies, and which classes
use it.

* :func:`concept_atlas`: the data-set pass (sharded with ``torchrun``, resumable), written as
  Parquet tables and a PNG per channel; ``lrpx concepts --data ...`` on the command line.
* :func:`scan_layer`: per image, the relevance of each channel for the top class and its
  largest activation.
* :func:`crop_box`: the input region of a reference image that a channel's conditional
  heatmap covers (see :mod:`lrpx.atlas.layer` for the rule).
"""
from .layer import LayerScan, check_layer, crop_box, mass_box, position_box, scan_layer
from .run import concept_atlas
from .tables import KINDS, read_maxima, read_scan

__all__ = ["concept_atlas", "LayerScan", "scan_layer", "check_layer", "crop_box", "mass_box", "position_box",
           "KINDS", "read_maxima", "read_scan"]
