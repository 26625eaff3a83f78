"""GPU paths (skipped without CUDA): the metric engine on the GPU, a bf16 training step."""

import numpy as np
import pytest
import torch

from model.backbone import build_model, loss_ratios
from model.loss import ModalityAwareLoss
from metrics.engine import retrieval_metrics
from tests.conftest import tiny_model_cfg
from runtime.device import autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_metric_engine_on_gpu_equals_cpu():
    rng = np.random.default_rng(0)
    q, g = (
        rng.standard_normal((300, 32), dtype=np.float32),
        rng.standard_normal((2000, 32), dtype=np.float32),
    )
    ql, gl = rng.integers(0, 7, 300), rng.integers(0, 7, 2000)
    cpu, top_cpu = retrieval_metrics(q, g, ql, gl, chunk_size=64, progress=False)
    gpu, top_gpu = retrieval_metrics(q, g, ql, gl, chunk_size=64, device="cuda", progress=False)
    for k in cpu:
        np.testing.assert_allclose(gpu[k], cpu[k], atol=1e-6, equal_nan=True)
    assert (top_cpu == top_gpu).mean() > 0.99  # matmul rounding may swap near-ties


def test_bf16_training_step_on_gpu():
    mcfg = tiny_model_cfg()
    model = build_model(mcfg)[0].cuda()
    device = torch.device("cuda")
    images = torch.randn(8, 3, 64, 64, device=device)
    tokens = torch.randint(1, 400, (2, 16), device=device)
    with autocast(device, "bf16"):
        total, _ = model(
            images,
            tokens,
            torch.tensor([0, 1] * 4, device=device),
            torch.tensor([0, 1] * 4, device=device),
            torch.full((8,), 3, device=device),
            ModalityAwareLoss(loss_ratios(mcfg)),
        )
    total.backward()
    assert torch.isfinite(total) and model.modes.weight.grad is not None


def test_nccl_collectives_and_ddp_step_on_gpu():
    """The NCCL code path at world size 1 (one GPU here): the gradient-carrying feature gather,
    the variable-length gather used by validation, and a DDP step equal to the plain model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tests.test_distributed import free_port
    from runtime.distributed import DistInfo, GatherFeatures, all_gather_cat

    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    try:
        t = torch.arange(5.0, device="cuda").reshape(5, 1)
        assert torch.equal(all_gather_cat(t), t)
        mcfg = tiny_model_cfg(orth_loss_ratio=0.01)
        torch.manual_seed(0)
        plain = build_model(mcfg)[0].cuda()
        torch.manual_seed(0)
        ddp = DistributedDataParallel(build_model(mcfg)[0].cuda(), device_ids=[0])
        g = torch.Generator().manual_seed(1)
        args = (
            torch.randn(8, 3, 64, 64, generator=g).cuda(),
            torch.randint(1, 400, (2, 16), generator=g).cuda(),
            torch.tensor([0, 1] * 4).cuda(),
            torch.tensor([0, 1] * 4).cuda(),
            torch.full((8,), 3).cuda(),
        )
        # deterministic cuDNN without TF32: otherwise two identical convolution backward passes
        # differ
        with torch.backends.cudnn.flags(
            enabled=True, benchmark=False, deterministic=True, allow_tf32=False
        ):
            ref, _ = plain(*args, ModalityAwareLoss(loss_ratios(mcfg)))
            ref.backward()
            got, _ = ddp(
                *args, ModalityAwareLoss(loss_ratios(mcfg), GatherFeatures(DistInfo(0, 0, 1)))
            )
            got.backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        grads = dict(plain.named_parameters())
        for name, p in ddp.module.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(
                    p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}"
                )
    finally:
        dist.destroy_process_group()
