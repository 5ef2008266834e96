"""The README's model-coverage table, generated so that it cannot drift from the code.

    python tests/coverage_table.py            # print the table
    python tests/coverage_table.py --write    # replace the table in README.md

For every torchvision family in ``zoo.FAMILIES``: what ``lrpx.convert`` makes of it with the
default preset ``epsilon_gamma_box``: the rules it assigns (with how many layers get each),
the operations rewritten from forward code, and the layers kept with their plain gradient.
``tests/test_coverage.py`` checks forward equality and the exact relevance accounting of
each family and that README.md holds this table.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import lrpx  # noqa: E402
from lrpx.layers import KEPT, Add, Interpolate, Matmul, Mean, Normalize, Product, ScaledDotProductAttention, Sum  # noqa: E402
from lrpx.layers.detection import DETECTION_KEPT  # noqa: E402
from zoo import DETECTION, FAMILIES, SEGMENTATION, SSD_SIZES, build  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
#: documented bound of |sum R_in + absorbed - R_out| / |R_out| (tests/test_coverage.py)
BOUND = "1e-8"


def _rules(model: nn.Module) -> str:
    counts = Counter(type(rule).__name__ for rule in lrpx.rule_table(model).values())
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _rewrites(original: nn.Module, model: nn.Module) -> str:
    before = {name for name, _ in original.named_modules()}
    added = Counter()
    for name, m in model.named_modules():
        if name in before:
            continue
        if isinstance(m, (Add, Mean, Product, Interpolate, Normalize, Matmul, Sum, ScaledDotProductAttention)):
            added[type(m).__name__] += 1
        elif isinstance(m, lrpx.layers.Twin):
            added[next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn")).__name__] += 1
    return ", ".join(f"{k} {n}" for k, n in sorted(added.items())) or "-"


def _kept(model: nn.Module) -> str:
    kept = sorted({type(m).__name__ for m in model.modules() if isinstance(m, KEPT + DETECTION_KEPT)
                   and not isinstance(m, Product)})
    return ", ".join(kept) or "-"


def rows() -> list[tuple[str, ...]]:
    out = []
    families = [(name, size, kwargs) for name, (size, kwargs) in FAMILIES.items()]
    families += [(name, size, {"weights_backbone": None, **kwargs}) for name, (size, kwargs) in SEGMENTATION.items()]
    for name, size, kwargs in families:
        torch.manual_seed(0)
        original = build(name, weights=None, num_classes=10, **kwargs).eval()
        model = lrpx.convert(original, lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
        out.append((name, f"{size}²", _rules(model), _rewrites(original, model), _kept(model), BOUND))
    for name, ((h, w), kwargs) in DETECTION.items():  # one detection's class logit (lrpx.targets.detection)
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=5,
                                                **kwargs).eval()
        model = lrpx.convert(original, lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
        size = f"{h}×{w}" + (f" → {SSD_SIZES[name]}²" if name in SSD_SIZES else "")
        out.append((name, size, _rules(model), _rewrites(original, model), _kept(model), BOUND))
    return out


def table() -> str:
    head = ("model", "tested at", "rules (`epsilon_gamma_box`)", "rewritten from forward code",
            "kept (plain gradient)", "accounting error ≤")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


def readme_table(text: str) -> str:
    """The table between the markers in README text."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args(argv)
    generated = table()
    if not args.write:
        print(generated)
        return
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + generated + "\n" + text[end:])


if __name__ == "__main__":
    main()
