"""The README's per-family table of Hugging Face transformers models under lrpx.convert.

    python tests/transformers_table.py                              # print the table
    python tests/transformers_table.py --write README.md            # replace the table there
    python tests/transformers_table.py --families llama gpt2        # only these (printed)

For each family and attention implementation (tiny config, float64, random weights with
non-zero biases, batch 2 of 7 tokens with the second padded at its end, or 2 images of 32 px):
whether ``lrpx.convert`` converts it (or the modules it names), the modules whose forward is
traced and rewritten and those that take their rules at run time, the forward error relative to
the original, and the accounting error |token relevance + absorbed - logit| / |logit|
(``tests/zoo_text.py``). ``tests/test_transformers.py`` runs the same settings.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lrpx  # noqa: E402
from test_transformers import FAMILIES, _inputs, _model, _output  # noqa: E402
from zoo_text import explain_pixels, explain_tokens, vlm_inputs  # noqa: E402

START, END = "<!-- transformers:start -->", "<!-- transformers:end -->"


def _classes(lrp, names) -> str:
    found = sorted({type(lrp.get_submodule(n)).__name__ for n in names})
    return ", ".join(found) if found else "—"


def row(name: str, attn: str) -> str:
    model, kind = _model(name, attn)
    try:
        lrp = lrpx.convert(model)
    except lrpx.UnsupportedModuleError as err:
        refused = ", ".join(f"`{n}` ({cls.__name__})" for n, cls in err.modules[:2])
        return f"| {name} | {attn} | refused: {refused} | | | |"
    inputs = vlm_inputs(name, model) if kind == "vlm" else _inputs(kind)
    with torch.no_grad():
        expected, out = _output(model(**inputs)), _output(lrp(**inputs))
    forward = float((out - expected).abs().max() / expected.abs().max())
    if kind == "vision":
        rel, logit, absorbed = explain_pixels(lrp, inputs["pixel_values"])
    else:
        rel, logit, absorbed = explain_tokens(lrp, position=-1 if kind == "vlm" else 4, **inputs)
    accounting = float((rel.sum() + absorbed - logit).abs() / logit.abs())
    graph = lrp.lrpx_graph
    traced = [n for n in graph.changed if n and n not in graph.oplevel]
    return (f"| {name} | {attn} | {_classes(lrp, traced)} | {_classes(lrp, graph.oplevel)} | {forward:.1e} | "
            f"{accounting:.1e} |")


def table(names: list[str]) -> str:
    lines = ["| family | attention | traced and rewritten | rules at run time | forward error | accounting error |",
             "|---|---|---|---|---|---|"]
    for name in names:
        for attn in FAMILIES[name][2]:
            lines.append(row(name, attn))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="replace the table between the markers of this file")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    text = table(args.families)
    if args.write is None:
        print(text)
        return
    doc = args.write.read_text()
    head, rest = doc.split(START)
    _, tail = rest.split(END)
    args.write.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
