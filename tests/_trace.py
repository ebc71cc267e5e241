"""Test helper: the largest tensor any op allocates while a block runs (forward and backward)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestTensor(TorchDispatchMode):
    """``with LargestTensor() as mode: ...`` then ``mode.largest`` is the most elements of any
    tensor an op returned in new memory. Views and in-place results share an input's storage
    and allocate nothing (an ``as_strided`` view of overlapping spans can have many more
    elements than its storage), so they are not counted."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out
