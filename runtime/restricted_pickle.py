"""torch.load for checkpoints that hold more than weights (an optimiser, a scheduler object),
without
running anything they hold: only tensors, storages and plain containers are built; every other
pickled global becomes an inert `Dropped` placeholder that is never called."""

import pickle
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch


class Dropped:
    """Stands in for an object of a class or function this loader does not build."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return Dropped()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def __repr__(self):
        return f"<dropped {self.origin}>"


def _dropped_class(module, name):
    return type("Dropped", (Dropped,), {"origin": f"{module}.{name}"})


def _tensor(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """torch's own tensor rebuild, without the pickled hooks or metadata."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor without a storage ({type(storage).__name__})")
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, False, OrderedDict()
    )


def _parameter_data(data, *args):
    """An nn.Parameter comes back as its plain tensor."""
    return data


def _plain_dict(*args, **kwargs):
    return {}


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter_data,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter_data,
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _plain_dict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
for _builtins in ("builtins", "__builtin__"):
    ALLOWED.update({(_builtins, c.__name__): c for c in (dict, list, tuple, set, frozenset)})


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _dropped_class(module, name)


def _load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


restricted_pickle_module = types.SimpleNamespace(
    __name__="restricted_pickle", Unpickler=RestrictedUnpickler, load=_load
)


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())


def restricted_load(path):
    """torch.load of `path` building only tensors and containers; objects come back as `Dropped`.
    TorchScript archives are refused (torch.load would hand them to torch.jit.load)."""
    path = Path(path)
    if is_torchscript(path):
        raise pickle.UnpicklingError("a TorchScript archive, not a pickled checkpoint")
    return torch.load(
        path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module
    )
