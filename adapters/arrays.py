"""Turn framework tensors into numpy arrays the core writer takes, without importing any framework."""

from __future__ import annotations

import numpy as np


def to_numpy(values, *, dtype=np.float32) -> np.ndarray:
    """Return ``values`` as a numpy array of ``dtype`` (``None`` keeps the dtype).

    Torch tensors are detached and moved to the CPU; bfloat16 and float16 tensors are widened to
    float32 first because numpy has no bfloat16 (or straight to float16 when ``dtype`` asks for it). Torch is never imported here: a tensor is
    recognised by its type's module, so numpy-only callers do not pay for it.

    Examples
    --------
    >>> to_numpy([[0.25, 0.75]]).dtype
    dtype('float32')
    >>> import torch
    >>> to_numpy(torch.ones(2, dtype=torch.bfloat16)).tolist()
    [1.0, 1.0]
    """
    if type(values).__module__.startswith("torch"):
        tensor = values.detach()
        if tensor.is_floating_point() and dtype is not None and np.dtype(dtype) == np.float16:
            tensor = tensor.half()  # torch narrows many times faster than numpy does
        elif tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        values = tensor.cpu().numpy()
    array = np.asarray(values)
    return array if dtype is None else array.astype(dtype, copy=False)
