"""What ``lrpx evaluate`` writes: ``evaluation.json``, the printed table and the figures."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..report import markdown_table, pm, save_curves, save_schedule

__all__ = ["evaluation_report", "write_evaluation", "evaluation_table"]


def evaluation_report(args, results: dict, target, categories) -> dict:
    """Settings, per-image AUCs, summaries and mean curves of every (method, fill) result."""
    rows = {}
    for (method, fill), result in results.items():
        per_image = {f"auc_{o}": result.auc(o).tolist() for o in result.orders}
        summary = {k: {"mean": m, "std": s} for k, (m, s) in result.summary().items()}
        rows.setdefault(method, {})[fill] = {"summary": summary, "per_image": per_image,
                                             "mean_curve": {o: result.curve(o).mean(0).tolist() for o in result.orders}}
    some = next(iter(results.values()))
    return {
        "lrpx": __version__, "torch": torch.__version__, "model": args.model, "weights": str(args.weights),
        "images": [str(p) for p in args.images], "target": target.tolist(),
        "target_names": [categories[int(t)] for t in target],
        "settings": {"patch_size": args.patch_size, "schedule": args.schedule, "steps": len(some.counts) - 1,
                     "counts": some.counts.tolist(), "regions": some.num_regions, "orders": list(some.orders),
                     "score": args.score, "seed": args.seed},
        "methods": rows,
    }


def write_evaluation(out: Path, results: dict, report: dict) -> None:
    """Write the figures and ``evaluation.json``; print the table and where the files are."""
    panels = {}
    for (method, fill), result in results.items():
        panels.setdefault(f"{fill} fill", {}).update({f"{method} {o}": (result, o) for o in result.orders})
    save_curves(panels, out / "curves.png", ylabel=f"target {report['settings']['score']}")
    save_schedule(next(iter(results.values())), out / "schedule.png")
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(evaluation_table(report))
    print(f"wrote {out / 'evaluation.json'}, {out / 'curves.png'}, {out / 'schedule.png'}")


def evaluation_table(report: dict) -> str:
    """AUC per order (and SRG) per method and fill, mean ± std, as a Markdown table."""
    orders = report["settings"]["orders"]
    header = ["method", "fill", *(f"AUC {o}" for o in orders)]
    with_srg = {"morf", "lrf"} <= set(orders)
    if with_srg:
        header.append("SRG")
    rows = []
    for method, fills in report["methods"].items():
        for fill, values in fills.items():
            cells = [method, fill, *(pm(values["summary"][f"auc_{o}"]) for o in orders)]
            if with_srg:
                cells.append(pm(values["summary"]["srg"]))
            rows.append(cells)
    return "\n".join(markdown_table(header, rows)).rstrip()
