"""The project's logger ("ma_sbir"): stderr and the run's train.log, and wandb when asked for."""

import logging
import os
import sys

log = logging.getLogger("ma_sbir")


def setup_logging(log_file=None):
    """Log to stderr and, when given, to a file (the run's train.log)."""
    log.disabled = False  # Hydra's logging set-up may disable loggers created before it
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


def init_wandb(cfg, run_dir, run_id):
    """wandb as configured; never fails a run for lack of network or login (falls back)."""
    from omegaconf import OmegaConf

    mode = cfg.logger.wandb.mode
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to train.log only.")
        return None
    kwargs = dict(
        project=cfg.logger.wandb.project,
        name=cfg.logger.wandb.name,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    for try_mode in dict.fromkeys([mode, "offline"]):
        try:
            return wandb.init(mode=try_mode, settings=wandb.Settings(init_timeout=60), **kwargs)
        except Exception as e:  # no network, no API key, service start failure
            log.warning(
                f"wandb mode={try_mode} failed ({type(e).__name__}: {e}); "
                f"{'trying offline' if try_mode != 'offline' else 'logging to train.log only'}."
            )
    return None
