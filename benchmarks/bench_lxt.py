"""Token relevance of lrpx against LXT (AttnLRP's reference code) on decoder LLMs: agreement and time.

    pip install --no-deps --target /tmp/lxt-env "lxt==2.1.*"
    pip install --target /tmp/lxt-env "transformers<4.55"   # then remove any /tmp/lxt-env/torch*, nvidia*
    python benchmarks/bench_lxt.py --layers 2 --hidden 64 --tokens 32 --dtype float64 --attention eager
    python benchmarks/bench_lxt.py --layers 4 --hidden 256 --tokens 512 --threads 2
    python benchmarks/bench_lxt.py --family qwen3 --layers 2 --hidden 128 --tokens 64

``--family`` is one of the families LXT patches: llama (the default), qwen2, qwen3 and gemma3.

LXT 2.1 imports only with transformers < 4.55, so it runs in a subprocess whose ``PYTHONPATH``
starts with ``--lxt-path`` (a folder with lxt and an older transformers, not the environment's);
lrpx runs in this process with the installed transformers. The model is transformers' Llama
built from a config as in ``bench_text.py`` (random weights from a fixed seed, grouped-query
attention with half as many key/value heads, intermediate size 8/3 of the hidden size), or the
other family's model of the same sizes; its
state dict and one sequence of ``--tokens`` random ids go to the subprocess through a temporary
file, and LXT's model loads them. The explained score is the top logit at the last position:
lrpx's ``explain_tokens`` on the converted model, and LXT's efficient AttnLRP
(``lxt.efficient.monkey_patch(modeling_llama)`` or the family's module, then ``logit.backward()`` and the relevance
``(embeds * embeds.grad).sum(-1)``). Both start from the logit's value as its relevance.

Agreement of the per-token relevance (cosine similarity, Pearson correlation, largest absolute
difference over LXT's largest absolute relevance), computed in float64, for lrpx's default
rules, for lrpx with every epsilon 1e-30 (LXT's gradient x input has no stabiliser; 1e-30 changes
no sum of magnitude above 1e-22 but keeps an output of exactly 0, as a GELU of a very negative
gate gives in float32, from dividing 0 by 0) and, for scale,
for the plain gradient x input. Time: each process times its method against the plain gradient
of the logit with respect to the input embeddings in the unexplained model (LXT's patches
swapped out), interleaved round by round, medians after a warm-up; each ratio is to its own
process's gradient.

The rules are the same (AttnLRP); the relevance differs where LXT's gradient x input has no
stabiliser (lrpx's epsilon 1e-6 on linear layers, residual sums and attention's matrix products),
in LXT's epsilon 1e-10 in the identity rule of SiLU (``y / (x + 1e-10)``), and, in float64, in
transformers' casts to float32 in RMSNorm and eager softmax (both forwards, and LXT's gradient
through them, are float32 there).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_explain import interleaved  # noqa: E402
from bench_text import VOCABULARY, gradient_step, size_arguments  # noqa: E402
from bench_text import build as build_llama  # noqa: E402

#: ``{family: (config class, model class, extra config arguments given the head size)}``
FAMILIES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda head: {}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda head: {"head_dim": head}),
            "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", lambda head: {"head_dim": head,
                                                                              "query_pre_attn_scalar": head})}


def build(args: argparse.Namespace):
    """The Llama of bench_text, or the family's model of its sizes, with the installed transformers."""
    dtype = getattr(torch, args.dtype)
    if args.family == "llama":
        return build_llama(args.layers, args.hidden, dtype, torch.device("cpu"), args.attention)
    import transformers

    config_name, model_name, extra = FAMILIES[args.family]
    heads = max(args.hidden // 64, 2)
    config = getattr(transformers, config_name)(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=VOCABULARY,
        max_position_embeddings=65536, **extra(args.hidden // heads))
    config._attn_implementation = args.attention
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lxt_child(args: argparse.Namespace) -> None:
    """Run LXT on the saved model and ids (in the process with the older transformers)."""
    import importlib

    import transformers
    from lxt.efficient import monkey_patch

    modeling = importlib.import_module(f"transformers.models.{args.family}.modeling_{args.family}")
    inputs = torch.load(os.path.join(args.lxt_child, "inputs.pt"))
    model = build(args)
    model.load_state_dict(inputs["state_dict"], strict=True)
    ids = inputs["ids"]
    # what the patches replace: forward or _norm of classes, the module's attention functions
    places = [(owner, name) for owner in vars(modeling).values() if isinstance(owner, type)
              for name in ("forward", "_norm") if name in vars(owner)]
    places += [(torch.nn.Dropout, "forward"), (modeling, "eager_attention_forward"),
               (modeling, "ALL_ATTENTION_FUNCTIONS")]
    plain = [getattr(owner, name) for owner, name in places]
    monkey_patch(modeling)
    patched = [getattr(owner, name) for owner, name in places]
    if all(a is b for a, b in zip(plain, patched)):
        raise RuntimeError(f"lxt.efficient.monkey_patch changed nothing in modeling_{args.family}")

    def use(values):
        for (owner, name), value in zip(places, values):
            setattr(owner, name, value)

    gradient = gradient_step(model, ids, use_cache=False)

    def plain_gradient():
        use(plain)
        return gradient()

    def explain():
        use(patched)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        logits[0, -1].max().backward()
        return (embeds * embeds.grad).sum(-1), logits.detach()

    relevance, logits = explain()
    times = interleaved({"gradient": plain_gradient, "lxt": explain}, torch.device("cpu"), args.repeat, warmup=1)
    torch.save({"relevance": relevance.double(), "logits": logits[:, -1].double(), "times": times,
                "transformers": transformers.__version__, "lxt": version("lxt")},
               os.path.join(args.lxt_child, "result.pt"))


def run_lxt(args: argparse.Namespace, model, ids: torch.Tensor) -> dict:
    """LXT's relevance, logits, times and versions from a subprocess; raises with its error output."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"state_dict": model.state_dict(), "ids": ids}, os.path.join(folder, "inputs.pt"))
        command = [sys.executable, os.path.abspath(__file__), "--lxt-child", folder, "--layers", str(args.layers),
                   "--hidden", str(args.hidden), "--tokens", str(args.tokens), "--repeat", str(args.repeat),
                   "--threads", str(args.threads), "--dtype", args.dtype, "--attention", args.attention,
                   "--family", args.family]
        path = os.pathsep.join(p for p in (args.lxt_path, os.environ.get("PYTHONPATH")) if p)
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        return torch.load(os.path.join(folder, "result.pt"))


def agreement(r: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """Cosine similarity, Pearson correlation, max |r - reference| / max |reference|, in float64."""
    r, reference = r.double().flatten(), reference.double().flatten()
    cosine = torch.nn.functional.cosine_similarity(r, reference, dim=0).item()
    pearson = torch.corrcoef(torch.stack([r, reference]))[0, 1].item()
    return cosine, pearson, ((r - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser)
    parser.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--family", default="llama", choices=("llama", *FAMILIES))
    parser.add_argument("--lxt-path", default="/tmp/lxt-env", help="folder with lxt 2.1 and transformers < 4.55")
    parser.add_argument("--lxt-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.lxt_child:
        return lxt_child(args)

    import transformers

    import lrpx
    from lrpx.rules import Epsilon, Norm, Uniform

    model = build(args)
    ids = torch.randint(0, VOCABULARY, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    try:
        lxt, failure = run_lxt(args, model, ids), None
    except (RuntimeError, OSError) as error:
        lxt, failure = None, error

    lrp = lrpx.convert(model)
    tiny = 1e-30
    zero = lrpx.convert(model, lrpx.Composite(default=Epsilon(tiny), sum=Norm(tiny),
                                              kinds={"bilinear": Uniform(tiny), "product": Uniform(tiny)}))
    explanation = lrpx.explain_tokens(lrp, ids)
    gradient = gradient_step(model, ids)
    times = interleaved({"gradient": gradient, "lrpx": lambda: lrpx.explain_tokens(lrp, ids).relevance},
                        torch.device("cpu"), args.repeat, warmup=1)

    versions = f"transformers={transformers.__version__} (lrpx)"
    if lxt is not None:
        versions += f", {lxt['transformers']} (LXT {lxt['lxt']})"
    print(f"device=cpu ({platform.processor() or 'cpu'}) dtype={args.dtype} threads={args.threads} "
          f"torch={torch.__version__} {versions} {args.family} layers={args.layers} hidden={args.hidden} "
          f"tokens={args.tokens} attention={args.attention} repeat={args.repeat} (median)")
    if failure is not None:
        print(f"\nLXT did not run (--lxt-path {args.lxt_path}): {failure}; lrpx only.")
    print("\n| method | time (ms) | ratio to its process's embedding gradient |")
    print("|---|---|---|")
    rows = [("embedding gradient, transformers " + transformers.__version__, times["gradient"], times["gradient"]),
            ("lrpx explain_tokens", times["lrpx"], times["gradient"])]
    if lxt is not None:
        t = lxt["times"]
        rows += [("embedding gradient, transformers " + lxt["transformers"], t["gradient"], t["gradient"]),
                 ("LXT efficient AttnLRP", t["lxt"], t["gradient"])]
    for name, t, base in rows:
        print(f"| {name} | {1000 * t:.1f} | {t / base:.2f} |")
    if lxt is None:
        return

    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with torch.enable_grad():
        logits = model(inputs_embeds=embeds).logits[:, -1]
        (grad,) = torch.autograd.grad(logits.max(-1).values.sum(), embeds)
    candidates = {"lrpx (epsilon 1e-6)": explanation.relevance,
                  "lrpx, every epsilon 1e-30": lrpx.explain_tokens(zero, ids).relevance,
                  "gradient x input": (grad * embeds.detach()).sum(-1)}
    reference = lxt["relevance"]
    score = explanation.score.double()
    logit_gap = (explanation.logits[:, -1].double() - lxt["logits"]).abs().max().item()
    same = torch.equal(lxt["logits"].argmax(-1), explanation.target.cpu())
    print(f"\nexplained: top logit at the last position ({'same' if same else 'DIFFERENT'} token in both), "
          f"score {score.item():.6g}; logits of the two forwards differ by at most {logit_gap:.2e}; "
          f"LXT's relevance sums to {reference.sum().item():.6g}")
    print("\n| relevance vs LXT | cosine | Pearson | max abs diff / max abs R | sum of R |")
    print("|---|---|---|---|---|")
    for name, r in candidates.items():
        cosine, pearson, gap = agreement(r, reference)
        print(f"| {name} | {cosine:.8f} | {pearson:.8f} | {gap:.2e} | {r.sum().item():.6g} |")


if __name__ == "__main__":
    main()
