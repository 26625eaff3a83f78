"""torch.distributed set-up for torchrun, SLURM and submitit, and the feature gather of the
contrastive loss."""

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn

from runtime.cluster import export_cluster_env
from runtime.device import pick_device
from runtime.errors import UserError


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1

    def device(self, name):
        """This process's device for the run's device setting: under DDP on CUDA, its own GPU."""
        device = pick_device(name)
        return (
            torch.device("cuda", self.local_rank)
            if self.enabled and device.type == "cuda"
            else device
        )


def init_distributed(device="auto"):
    """Join the process group torchrun describes in the environment; a no-op without it.
    `device` is the run's device setting: NCCL with one GPU per process when it means CUDA
    (auto with a GPU present, cuda, cuda:<i>), gloo for CPU processes. SLURM and submitit
    jobs are read as torchrun's (runtime/cluster.py)."""
    export_cluster_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = pick_device(device).type == "cuda"  # also the clear error for cuda without a GPU
        if use_cuda:
            n_gpu = torch.cuda.device_count()
            if local_rank >= n_gpu:
                raise UserError(
                    f"torchrun started process LOCAL_RANK={local_rank} on this node, but only "
                    f"{n_gpu} GPU(s) "
                    f"are visible: DDP on CUDA runs one process per GPU. Use "
                    f"--nproc_per_node={n_gpu}, "
                    f"or device=cpu for CPU processes (gloo backend)."
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, local_rank, world)


class GatherFeatures:
    """All ranks' image and text features, with gradients flowing back to their owners
    (as open_clip's gather_with_grad), and where this rank's rows start among them."""

    def __init__(self, info):
        self.info = info

    def __call__(self, z_img, z_txt):
        with warnings.catch_warnings():  # its deprecation note points at a private API
            warnings.simplefilter("ignore", FutureWarning)
            all_img = torch.cat(torch.distributed.nn.all_gather(z_img), dim=0)
            all_txt = torch.cat(torch.distributed.nn.all_gather(z_txt), dim=0)
        return all_img, all_txt, self.info.rank * z_img.shape[0]


def all_gather_cat(t):
    """Concatenate a tensor of any first-dim size from all ranks, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    sizes = [
        torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())
    ]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros((top,) + t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
