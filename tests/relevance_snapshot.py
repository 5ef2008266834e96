"""Fingerprints of the relevance every preset gives every torchvision family, stored so that
a change of the engine that should not change any value can be checked against them.

    python tests/relevance_snapshot.py            # compare with the stored fingerprints
    python tests/relevance_snapshot.py --write    # store new ones (only after a deliberate change)
    python tests/relevance_snapshot.py --add a b  # store those of new families, keep the others

A fingerprint of a relevance map ``R`` (float64) is, per sample, its sum, its L1 norm and its
projections on eight fixed vectors ``v_k[i] = cos(1.618 k i + k)`` (formula, not a random
generator, so that it is the same on every machine and torch version). A change of any
entry by ``d`` moves some projection by about ``d``; ``tests/test_coverage.py`` compares with
a tolerance of ``1e-10`` times the sample's L1 norm: float64 rounding differs between machines
(their matrix-product kernels), by up to 2e-11 measured (the alpha-beta presets amplify it), and
a change of a rule moves the fingerprints by far more.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lrpx  # noqa: E402
from zoo import FAMILIES, randomized  # noqa: E402

STORE = Path(__file__).parent / "snapshots" / "relevance_fingerprints.json"
PROJECTIONS = 8
#: the presets, called as the coverage tests call them
PRESETS = {
    "epsilon_gamma_box": lambda: lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0),
    "epsilon_plus": lambda: lrpx.composites.epsilon_plus(),
    "epsilon_plus_flat": lambda: lrpx.composites.epsilon_plus_flat(),
    "epsilon_alpha2_beta1": lambda: lrpx.composites.epsilon_alpha2_beta1(),
    "epsilon_alpha2_beta1_flat": lambda: lrpx.composites.epsilon_alpha2_beta1_flat(),
    "tutorial": lambda: lrpx.composites.tutorial(low=-3.0, high=3.0),
}


def family_input(name: str) -> torch.Tensor:
    size = FAMILIES[name][0]
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, size, size, generator=g, dtype=torch.float64).clamp(-3, 3)


def family_model(name: str) -> torch.nn.Module:
    return randomized(name, num_classes=10, **FAMILIES[name][1])


def fingerprint(relevance: torch.Tensor) -> list[list[float]]:
    """Per sample: ``[sum, L1 norm, projection 1, ..., projection 8]``."""
    flat = relevance.detach().double().flatten(1)
    i = torch.arange(flat.shape[1], dtype=torch.float64)
    vectors = torch.stack([torch.cos(1.618 * k * i + k) for k in range(1, PROJECTIONS + 1)])
    rows = torch.cat([flat.sum(1, keepdim=True), flat.abs().sum(1, keepdim=True), flat @ vectors.T], 1)
    return rows.tolist()


def relevance_of(model: torch.nn.Module, x: torch.Tensor, preset: str) -> torch.Tensor:
    lrp = lrpx.convert(model, PRESETS[preset]())
    with torch.no_grad():
        target = model(x).argmax(1)
    return lrpx.explain(lrp, x, target).relevance


def compute(names=None) -> dict[str, dict[str, list[list[float]]]]:
    out = {}
    for name in names or FAMILIES:
        model, x = family_model(name), family_input(name)
        out[name] = {preset: fingerprint(relevance_of(model, x, preset)) for preset in PRESETS}
    return out


def differences(stored: dict, fresh: dict) -> list[str]:
    """Entries that differ by more than 1e-10 of the sample's L1 norm."""
    bad = []
    for name, presets in fresh.items():
        for preset, rows in presets.items():
            for sample, (new, old) in enumerate(zip(rows, stored[name][preset])):
                scale = max(old[1], 1e-300)
                worst = max(abs(a - b) for a, b in zip(new, old)) / scale
                if not worst <= 1e-10 or not all(math.isfinite(v) for v in new):
                    bad.append(f"{name} {preset} sample {sample}: {worst:.2e}")
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the fingerprints")
    parser.add_argument("--add", nargs="+", metavar="FAMILY", help="store those of these families only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.add:
        stored = json.loads(STORE.read_text())
        stored["fingerprints"].update(compute(args.add))
        STORE.write_text(json.dumps(stored, indent=0) + "\n")
        print(f"added {', '.join(args.add)} to {STORE}")
        return 0
    fresh = compute()
    if args.write:
        STORE.write_text(json.dumps({"torch": torch.__version__, "fingerprints": fresh}, indent=0) + "\n")
        print(f"wrote {STORE}")
        return 0
    bad = differences(json.loads(STORE.read_text())["fingerprints"], fresh)
    print("\n".join(bad) or "all fingerprints equal")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
