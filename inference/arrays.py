"""Examples on the serving hot path: numpy arrays per request, one torch call per batch.

Why numpy: nearly every torch call releases the GIL and takes it back. With
dozens of RPC threads runnable, each such call can wait for the GIL, so a
handful of tiny torch calls per request (decode, check, encode) cost far more
under load than alone. numpy keeps the GIL for small arrays. So a request's
examples stay a numpy array from the wire to the batcher; a batch becomes one
tensor (``np.concatenate`` + ``torch.from_numpy``) for the model, and its
output is split back into numpy views. bfloat16, which numpy lacks, stays a
torch tensor all the way; everything here accepts either.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]

NUMPY_BY_TORCH: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16), torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16), torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64), torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_),
}
TORCH_BY_NUMPY: dict[np.dtype, torch.dtype] = {v: k for k, v in NUMPY_BY_TORCH.items()}


def torch_dtype(x: Array) -> torch.dtype | None:
    """The torch dtype of a tensor or array (None for a numpy dtype torch lacks)."""
    return x.dtype if isinstance(x, torch.Tensor) else TORCH_BY_NUMPY.get(x.dtype)


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> Array:
    """A writable array (a tensor for bfloat16) holding a copy of ``data``."""
    np_dtype = NUMPY_BY_TORCH.get(dtype)
    if np_dtype is None:
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
    return np.frombuffer(bytearray(data), dtype=np_dtype).reshape(shape)


def to_bytes(x: Array) -> bytes:
    """The raw little-endian bytes of ``x`` in row-major order."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    flat = x.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def all_finite(x: Array) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind != "f" or bool(np.isfinite(x).all())
    return not x.is_floating_point() or bool(torch.isfinite(x).all())


def to_torch(x: Array) -> torch.Tensor:
    """A tensor sharing ``x``'s memory when it is an array."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def concat(inputs: Sequence[Array]) -> torch.Tensor:
    """The requests' examples stacked along dimension 0, as one tensor."""
    if len(inputs) == 1:
        return to_torch(inputs[0])
    if all(isinstance(x, np.ndarray) for x in inputs):
        return torch.from_numpy(np.concatenate(inputs))
    return torch.cat([to_torch(x) for x in inputs])


def split(out: torch.Tensor, sizes: Sequence[int]) -> list[Array]:
    """``out`` cut into consecutive row blocks of ``sizes``: numpy views where numpy has the dtype."""
    if out.dtype in NUMPY_BY_TORCH:
        rows = out.numpy()
        return np.split(rows, np.cumsum(sizes[:-1])) if len(sizes) > 1 else [rows]
    return list(torch.split(out, list(sizes)))


def on_tensors(fn: Callable[[torch.Tensor], Any] | None) -> Callable[[Array], Any] | None:
    """``fn`` made to take arrays too: a user's stage function always receives a tensor."""
    if fn is None:
        return None

    def call(x: Array) -> Any:
        return fn(to_torch(x))

    return call
