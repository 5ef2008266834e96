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
