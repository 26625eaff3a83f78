"""retrieval_metrics' inputs checked and made uniform: float32 [n, dim] embeddings, and labels of
any kind as int64 codes shared by the queries and the gallery."""
import numpy as np
import torch


def embeddings(x, name):
    """float32 [n, dim], detached; numpy views of any layout (negative strides too) and float types."""
    x = x.detach().float() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {tuple(x.shape)}.")
    return x


def label_codes(q_labels, g_labels, n_q, n_g):
    """Labels of any kind (ints, strings, fractions) as int64 codes shared by queries and photos."""
    q, g = (np.asarray(l.cpu() if torch.is_tensor(l) else l) for l in (q_labels, g_labels))
    for labels, n, what in ((q, n_q, "queries"), (g, n_g, "gallery photos")):
        if labels.shape != (n,):
            raise ValueError(f"{n} {what} but labels of shape {labels.shape}: give one label per row.")
        if labels.dtype.kind == "f" and np.isnan(labels).any():
            raise ValueError(f"the {what}' labels contain NaN; give each a class label.")
    given = [l for l in (q, g) if l.size]
    codes = np.unique(np.concatenate(given), return_inverse=True)[1].reshape(-1) if given else np.zeros(0)
    codes = torch.from_numpy(codes.astype(np.int64))
    return codes[:n_q], codes[n_q:]
