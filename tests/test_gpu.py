"""GPU paths (skipped without CUDA): the metric engine on the GPU, a bf16 training step."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from model.backbone import build_model, loss_ratios
from retrieval.metrics import retrieval_metrics
from utils.runtime import autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_metric_engine_on_gpu_equals_cpu():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((300, 32), dtype=np.float32), rng.standard_normal((2000, 32), dtype=np.float32)
    ql, gl = rng.integers(0, 7, 300), rng.integers(0, 7, 2000)
    cpu, top_cpu = retrieval_metrics(q, g, ql, gl, chunk_size=64, progress=False)
    gpu, top_gpu = retrieval_metrics(q, g, ql, gl, chunk_size=64, device="cuda", progress=False)
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], atol=1e-6, equal_nan=True)
    assert (top_cpu == top_gpu).mean() > 0.99  # matmul rounding may swap near-ties


def test_bf16_training_step_on_gpu():
    mcfg = OmegaConf.create(dict(backbone="ma-tiny", pretrained=None, n_mode=4, temperature=2.6592,
                                 clip_loss_ratio=1.0, sem_loss_ratio=0.1, disc_loss_ratio=0.1,
                                 rec_loss_ratio=0.02, orth_loss_ratio=0.0))
    model = build_model(mcfg)[0].cuda()
    device = torch.device("cuda")
    images = torch.randn(8, 3, 64, 64, device=device)
    tokens = torch.randint(1, 400, (2, 16), device=device)
    with autocast(device, "bf16"):
        total, _ = model(images, tokens, torch.tensor([0, 1] * 4, device=device),
                         torch.tensor([0, 1] * 4, device=device), torch.full((8,), 3, device=device),
                         loss_ratios(mcfg))
    total.backward()
    assert torch.isfinite(total) and model.modes.weight.grad is not None
