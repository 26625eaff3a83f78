"""Runtime utilities: typed config and its checks, run folders, atomic file io, restricted
loading, logging and signals, torch.distributed and cluster set-up."""
