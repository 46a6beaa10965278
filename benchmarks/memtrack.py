"""Peak live tensor bytes on any device (CPU included), like ``torch.cuda.max_memory_allocated``.

``TensorMemoryTracker`` is a ``TorchDispatchMode``: every op's output storages are registered (by
data pointer, views deduplicated) with a weak reference; storages that died are swept out whenever
the running total would set a new peak, so the peak is exact for tensors created inside the mode
plus those registered with :meth:`track`. Memory outside tensors (Python objects, allocator caches)
is not counted; neither is a storage resized in place without a dispatched op.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.ignored: set[int] = set()
        self.current = 0
        self.peak = 0

    def track(self, *tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._register(tensor)

    def ignore(self, *tensors) -> None:
        """Leave these tensors' storages out of the count (e.g. a snapshot that would live in host memory)."""
        for tensor in tensors:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            self.ignored.add(pointer)
            entry = self.live.pop(pointer, None)
            if entry is not None:
                self.current -= entry[1]

    def _register(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != self.device_type or tensor.is_meta:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        pointer = storage.data_ptr()
        if pointer == 0 or pointer in self.ignored:
            return
        entry = self.live.get(pointer)
        if entry is not None:
            if not entry[0].expired():
                return
            self.current -= entry[1]  # the address was freed and reused
        size = storage.nbytes()
        self.live[pointer] = (StorageWeakRef(storage), size)
        self.current += size
        if self.current > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.current)

    def _sweep(self) -> None:
        dead = [pointer for pointer, (ref, _) in self.live.items() if ref.expired()]
        for pointer in dead:
            self.current -= self.live.pop(pointer)[1]

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._register(item)
        return out
