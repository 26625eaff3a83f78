"""The process layout of a SLURM job (srun, or Hydra's submitit launcher) or of submitit's local
executor, written as the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) that runtime.distributed reads. Under torchrun, which sets them itself, nothing
changes."""

import os
import re

# (rank, world size, local rank, job id) variables of each launcher, in the order they are tried
LAUNCHERS = [
    (
        "SUBMITIT_LOCAL_GLOBALID",
        "SUBMITIT_LOCAL_NTASKS",
        "SUBMITIT_LOCAL_LOCALID",
        "SUBMITIT_LOCAL_JOB_ID",
    ),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"),
]


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],]+)[^\]]*\])?([^,]*)", nodelist.strip())
    if not m:
        return "127.0.0.1"
    prefix, ranges, suffix = m.groups()
    return prefix + (ranges.split("-")[0] if ranges else "") + suffix


def port_for(job_id):
    """A port that all tasks of one job agree on, different for jobs sharing a node."""
    return str(20000 + int(re.sub(r"\D", "", str(job_id)) or 0) % 20000)


def export_cluster_env(environ=os.environ):
    """Fill the torchrun variables from the launcher's own; returns the launcher's name or None."""
    if "WORLD_SIZE" in environ:  # torchrun (or a user) has set them
        return None
    for rank, world, local, job in LAUNCHERS:
        if rank in environ and int(environ.get(world, "1")) > 1:
            environ.update(
                RANK=environ[rank], WORLD_SIZE=environ[world], LOCAL_RANK=environ.get(local, "0")
            )
            nodelist = environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", ""))
            environ.setdefault(
                "MASTER_ADDR",
                first_host(nodelist) if rank.startswith("SLURM") and nodelist else "127.0.0.1",
            )
            environ.setdefault("MASTER_PORT", port_for(environ.get(job, "0")))
            return rank.split("_")[0].lower()
    return None
