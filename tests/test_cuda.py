"""GPU: relevance on CUDA equals relevance on the CPU (runs only where CUDA is available)."""
from __future__ import annotations

import pytest
import torch

import lrpx
from zoo import randomized

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet18"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_cuda_equals_cpu(name, dtype, tol, monkeypatch):
    # TF32 convolutions (the default on Ampere and newer) round to ~1e-3: compare true float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = randomized(name, dtype=dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(0))
    composite = lrpx.composites.epsilon_gamma_box(-3.0, 3.0)
    cpu = lrpx.explain(lrpx.convert(model, composite), x, [1, 2]).relevance
    lrp_gpu = lrpx.convert(model, composite).cuda()
    gpu = lrpx.explain(lrp_gpu, x.cuda(), [1, 2]).relevance
    assert gpu.device.type == "cuda"
    err = (gpu.cpu() - cpu).abs().max() / cpu.abs().max()
    assert err < tol
    # channels-last input gives the same relevance
    cl = lrpx.explain(lrp_gpu, x.cuda().contiguous(memory_format=torch.channels_last), [1, 2]).relevance
    assert ((cl - gpu).abs().max() / gpu.abs().max()) < tol


@cuda
def test_half_precision_on_gpu_is_finite():
    model = randomized("resnet18", dtype=torch.float16).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    rel = lrpx.explain(lrpx.convert(model, lrpx.composites.epsilon_plus()), x, 0).relevance
    assert rel.dtype == torch.float16 and torch.isfinite(rel).all()


def _logit_relevance(model, x, unit=1):
    """Forward and backward with the relevance of one logit, built without indexing by a
    device tensor (which could synchronise by itself)."""
    xin = x.detach().requires_grad_()
    out = model(xin)
    seed = torch.zeros_like(out)
    seed[:, unit] = out.detach()[:, unit]
    (rel,) = torch.autograd.grad(out, xin, seed)
    return rel


@cuda
@pytest.mark.parametrize("name", ["vgg16_bn", "resnet18", "densenet121"])
@pytest.mark.parametrize("preset", ["epsilon", "epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_no_host_synchronisation(name, preset, monkeypatch):
    """Forward and backward of a converted model never wait for the GPU (no .item(), no
    host copies, no data-dependent shapes); ZBox bounds kept on the host included."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = randomized(name, dtype=torch.float32)
    low = torch.tensor([-2.0, -2.5, -3.0]).view(1, 3, 1, 1)  # on the host, per channel
    composite = {"epsilon": None, "epsilon_gamma_box": lrpx.composites.epsilon_gamma_box(low, -low),
                 "epsilon_plus_flat": lrpx.composites.epsilon_plus_flat(),
                 "epsilon_alpha2_beta1": lrpx.composites.epsilon_alpha2_beta1()}[preset]
    lrp = (lrpx.convert(model) if composite is None else lrpx.convert(model, composite)).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    expected = _logit_relevance(lrp, x)  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rel = _logit_relevance(lrp, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the same relevance (cuDNN may pick another algorithm: float32 rounding only)
    assert (rel - expected).abs().max() <= 1e-4 * expected.abs().max()


@cuda
@pytest.mark.slow
def test_compiled_equals_eager_on_cuda(monkeypatch):
    # TF32 rounds at ~1e-3 per layer and compiled kernels round differently: compare float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = randomized("resnet18", dtype=torch.float32).cuda()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
    x = torch.randn(2, 3, 64, 64, device="cuda")
    eager = _logit_relevance(lrp, x)
    compiled = _logit_relevance(torch.compile(lrp), x)
    err = (compiled - eager).abs().max() / eager.abs().max()
    assert err < 1e-4  # measured 2.6e-6 on an H100 (torch 2.11)


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_relevance_on_cuda_equals_cpu(dtype):
    """torch's fused attention forward on the GPU and the blockwise relevance in backward (blocks
    of 64 MiB there): the relevance of float64 inputs equals the CPU's; bfloat16 inputs compute
    in float32 and stay close."""
    from lrpx.layers import ScaledDotProductAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 300, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    out_rel = torch.randn(2, 4, 300, 16, generator=g, dtype=torch.float64)

    def relevance(device, dt):
        ts = [t.to(device, dt).requires_grad_() for t in (q, k, v)]
        out = ScaledDotProductAttention()(*ts, is_causal=True, enable_gqa=True)
        return [r.double().cpu() for r in torch.autograd.grad(out, ts, out_rel.to(device, dt))]

    for got, want in zip(relevance("cuda", dtype), relevance("cpu", torch.float64)):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < (1e-10 if dtype == torch.float64 else 5e-2), err


@cuda
def test_llama_in_bfloat16_on_cuda():
    """A tiny transformers Llama in bfloat16 on the GPU: finite token relevance close to the
    float32 CPU model's."""
    pytest.importorskip("transformers")
    import zoo_text

    model = zoo_text.randomized(zoo_text.families()["llama"][0]("sdpa")).float()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    cpu = lrpx.explain_tokens(lrpx.convert(model), ids).relevance
    gpu = lrpx.explain_tokens(lrpx.convert(model).to("cuda", torch.bfloat16), ids.cuda()).relevance
    assert gpu.dtype == torch.bfloat16 and torch.isfinite(gpu).all()
    cos = torch.nn.functional.cosine_similarity(gpu.float().cpu().flatten(), cpu.flatten(), dim=0)
    assert cos > 0.98
