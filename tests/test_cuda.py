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
