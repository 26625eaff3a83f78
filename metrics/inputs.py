"""retrieval_metrics' inputs checked and made uniform: float32 [n, dim] embeddings, finite values,
and labels of any kind as int64 codes shared by the queries and the gallery."""

import numpy as np
import torch


def embeddings(x, name):
    """float32 [n, dim], detached; numpy views of any layout (negative strides too) and float
    types."""
    x = (
        x.detach().float()
        if torch.is_tensor(x)
        else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    )
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {tuple(x.shape)}.")
    return x


def finite(x):
    """No NaN or infinity in x (two reductions: far cheaper than isfinite(x).all())."""
    return not x.numel() or bool(torch.isfinite(x.amax()) and torch.isfinite(x.amin()))


def label_codes(q_labels, g_labels, n_q, n_g):
    """Labels of any kind (ints, strings, fractions) as int64 codes shared by queries and photos."""
    q, g = (np.asarray(lab.cpu() if torch.is_tensor(lab) else lab) for lab in (q_labels, g_labels))
    for labels, n, what in ((q, n_q, "queries"), (g, n_g, "gallery photos")):
        if labels.shape != (n,):
            raise ValueError(
                f"{n} {what} but labels of shape {labels.shape}: give one label per row."
            )
        if labels.dtype.kind == "f" and np.isnan(labels).any():
            raise ValueError(f"the {what}' labels contain NaN; give each a class label.")
    given = [lab for lab in (q, g) if lab.size]
    kinds = {_kind(lab) for lab in given}
    if "mixed" in kinds or len(kinds) > 1:
        raise ValueError(
            f"labels of mixed kinds (the queries' {_kind(q)}, the gallery photos' {_kind(g)}): "
            f"1 and '1' would never match; give labels of one kind (e.g. class ids)."
        )
    codes = (
        np.unique(np.concatenate(given), return_inverse=True)[1].reshape(-1)
        if given
        else np.zeros(0)
    )
    codes = torch.from_numpy(codes.astype(np.int64))
    return codes[:n_q], codes[n_q:]


def _kind(labels):
    """'numbers', 'text', or 'mixed' (an object array holding both, or None)."""
    if labels.dtype.kind in "biuf":
        return "numbers"
    if labels.dtype.kind in "US":
        return "text"
    types = {
        "numbers"
        if isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
        else "text"
        if isinstance(x, str)
        else "mixed"
        for x in labels.tolist()
    }
    return types.pop() if len(types) == 1 else "mixed"
