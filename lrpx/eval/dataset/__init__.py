"""Evaluation at data-set scale: images streamed from a folder or a list, explained and scored
batch by batch, split over the processes of a ``torch.distributed`` run, written as Parquet
parts that survive a killed run, and summarised with confidence intervals and paired tests.

>>> from lrpx.eval.dataset import ImageFiles, MetricSettings, evaluate_dataset, image_records
>>> root, records, classes = image_records("val/")
>>> evaluate_dataset(model, ImageFiles(root, records, transform), ["epsilon_plus", "gradient"],
...                  ["pixel_flipping", "insertion"], out="run/")
"""
from .engine import DistributedContext, Method, distributed_context, evaluate_dataset
from .metrics import BETTER, METRICS, MetricSettings
from .report import summarize, write_report
from .sources import IMAGE_EXTENSIONS, ImageFiles, Record, collate, image_records
from .stats import bootstrap_ci, paired_comparison
from .store import COLUMNS, RunMismatch, RunStore, read_results

__all__ = ["evaluate_dataset", "MetricSettings", "METRICS", "BETTER", "ImageFiles", "Record", "image_records",
           "collate", "IMAGE_EXTENSIONS", "write_report", "summarize", "bootstrap_ci", "paired_comparison",
           "COLUMNS", "RunStore", "RunMismatch", "read_results", "distributed_context", "DistributedContext",
           "Method"]
