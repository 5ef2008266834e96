"""Token relevance of a Llama-shaped language model against the embedding gradient, one run.

    python benchmarks/bench_text.py --layers 4 --hidden 256 --tokens 512 --threads 2
    python benchmarks/bench_text.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 --tokens 4096

The model is ``transformers``' Llama built from a config (random weights, ``sdpa`` attention,
grouped-query attention with half as many key/value heads, intermediate size 8/3 of the hidden
size, vocabulary 32000). One sequence of ``--tokens`` random ids; the explained score is the top
logit at the last position. Two methods, timed interleaved round by round (medians after a
warm-up): the plain gradient of that logit with respect to the input embeddings in the original
model (``embedding gradient``), and ``lrpx.explain_tokens`` on the converted model (its forward
and backward). Peak memory: on the GPU the allocator's peak of one call; on the CPU the peak
resident memory of one call above the resident memory before it, in a fresh process per method
(the second call, with an allocator that hands large blocks back at once).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import lrpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_explain import interleaved, median_peak, peak_memory  # noqa: E402


VOCABULARY = 32000


def build(layers: int, hidden: int, dtype: torch.dtype, device: torch.device, attention: str = "sdpa"):
    """The Llama of this benchmark, with the installed transformers: eval mode, parameters frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(hidden // 64, 2)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=VOCABULARY,
                         max_position_embeddings=65536)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(device, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def gradient_step(model, ids: torch.Tensor, **kwargs):
    """The plain gradient of the top logit at the last position with respect to the input embeddings."""
    def gradient():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, **kwargs).logits[:, -1]
        return torch.autograd.grad(logits.max(-1).values.sum(), embeds)[0]

    return gradient


def size_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's size, the sequence length, the rounds and threads of the timing, the dtype."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")


def steps(model, ids: torch.Tensor) -> dict:
    lrp = lrpx.convert(model)

    def explain():
        return lrpx.explain_tokens(lrp, ids).relevance

    return {"embedding gradient": gradient_step(model, ids), "lrpx explain_tokens": explain}


def _rss(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def cpu_peak(args: argparse.Namespace, method: str) -> float | None:
    """Peak resident memory (MiB) of one call of ``method`` in a fresh process."""
    command = [sys.executable, __file__, "--child", method, "--layers", str(args.layers), "--hidden",
               str(args.hidden), "--tokens", str(args.tokens), "--threads", str(args.threads), "--dtype", args.dtype]
    return median_peak(command, 1)


def child(args: argparse.Namespace, dtype: torch.dtype) -> None:
    model = build(args.layers, args.hidden, dtype, torch.device("cpu"))
    ids = torch.randint(0, VOCABULARY, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    fn = steps(model, ids)[args.child]
    fn()  # one-time initialisations are not the call's memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident memory
    base = _rss("VmRSS")
    fn()
    print(_rss("VmHWM") - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.child:
        return child(args, dtype)
    device = torch.device(args.device)
    model = build(args.layers, args.hidden, dtype, device)
    ids = torch.randint(0, VOCABULARY, (1, args.tokens), generator=torch.Generator().manual_seed(1), device=device)
    calls = steps(model, ids)
    times = interleaved(calls, device, args.repeat, warmup=1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device={device} ({where}) dtype={args.dtype} threads={args.threads} torch={torch.__version__} "
          f"llama layers={args.layers} hidden={args.hidden} tokens={args.tokens} repeat={args.repeat} (median)")
    print("| method | time (ms) | ratio | peak memory (MiB) | memory ratio |")
    print("|---|---|---|---|---|")
    memory = {k: peak_memory(fn, device) if device.type == "cuda" else cpu_peak(args, k) for k, fn in calls.items()}
    base_t, base_m = times["embedding gradient"], memory["embedding gradient"]
    for k, t in times.items():
        m = memory[k]
        ratio = "-" if m is None or not base_m else f"{m / base_m:.2f}"
        print(f"| {k} | {1000 * t:.1f} | {t / base_t:.2f} | {'-' if m is None else f'{m:.0f}'} | {ratio} |")


if __name__ == "__main__":
    main()
