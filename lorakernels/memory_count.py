"""Live tensor bytes of a piece of work, counted op by op: its peak and what was live then.

``LiveBytes`` is a ``TorchDispatchMode``: every op's output storages are counted from
the op that creates them until Python frees them (a weak reference per storage), so the
peak is the most bytes of tensor storage alive at once, the number a GPU's
``max_memory_allocated`` reports before the caching allocator rounds blocks up. It
counts real tensors and fake ones (``FakeTensorMode``: shapes, dtypes and lifetimes
without storage) alike, so a step on fake weights gives the peak of the same step on
real ones::

    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as count:
        count.track_module(model)
        step()
    count.peak_bytes, count.breakdown()

Each storage has a category, kept for the breakdown at the peak: ``frozen_weights``,
``lora_params``, ``grads`` and ``optimizer_state`` (labelled by the caller through
``label``), ``activations`` (made in a forward and still alive when a backward starts:
what autograd or checkpointing keeps for backward) and ``temporaries`` (the rest).

Inside a fake step, ops whose tensor inputs are all real and which make integers or
booleans (the batch's ids, labels, conversation layouts) run for real: their values
decide shapes, so they cannot be faked. A floating-point ``.item()`` of a fake tensor
(the loss, the gradient norm for a log line) answers 0.0; any other data-dependent
value of a fake tensor is an error.

Host memory (offloaded checkpoints) is counted apart: storages of tensors on ``host_device``
(``"cpu"`` when counting a real GPU step; ``"meta"`` in a plan on fake tensors, where the
offloaded copies are made on the meta device) add to ``host_bytes`` / ``host_peak_bytes``,
never to the device's ``peak_bytes``.
"""
import contextlib
import weakref
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("frozen_weights", "lora_params", "grads", "optimizer_state", "activations",
              "temporaries")

_SCALAR = torch.ops.aten._local_scalar_dense.default


def _storages(tensors: Iterable) -> Iterable[torch.UntypedStorage]:
    for t, _ in _storages_and_devices(tensors):
        yield t


def _storages_and_devices(tensors: Iterable):
    """(storage, device type) of each strided tensor: a fake tensor's storage is always on
    meta, its device is the one it stands for; an FSDP DTensor's is its rank's shard's."""
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            yield t.untyped_storage(), t.device.type


class LiveBytes(TorchDispatchMode):
    """Counts live storage bytes; ``peak_bytes``, ``peak_op`` and ``breakdown()`` after."""

    # FlexAttention and wrapped Triton launches are higher-order ops: count their outputs too.
    supports_higher_order_operators = True

    def __init__(self, host_device: Optional[str] = None):
        super().__init__()
        self.host_device = host_device
        self.host_bytes = 0
        self.host_peak_bytes = 0
        self._host: Dict[int, int] = {}  # serial -> bytes, of live host storages
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op: Optional[str] = None
        self._serial: Dict[int, int] = {}  # id(storage) -> serial, while the storage lives
        self._live: Dict[int, int] = {}  # serial -> bytes
        self._category: Dict[int, str] = {}  # serial -> category, kept after the free
        self._forward_made: Dict[int, int] = {}  # serials made outside a backward, alive
        self._refs: Dict[int, weakref.ref] = {}
        self._snapshot: Dict[int, int] = {}
        self._at_peak = False
        self._last_op = "start"
        self._next_serial = 0
        self._in_backward = False
        self.context: Optional[str] = None  # set by the caller (e.g. "optimizer step")
        self._making: Optional[str] = None  # the category of what is made now (``making``)
        # FSDP frees and refills its all-gathered weights by resizing their storages in place,
        # which no op reports: with this set, every op first re-reads the live storages' sizes.
        self.storages_resize = False

    # ----------------------------------------------------------------- labelling

    def track(self, tensors: Iterable, category: str) -> None:
        """Count ``tensors``' storages (made before counting began, e.g. weights) as
        ``category``."""
        for storage in _storages(tensors):
            self._label(self._add(storage), category)

    def track_module(self, module: nn.Module) -> None:
        """A module's parameters: trainable ones ``lora_params``, the rest and buffers
        ``frozen_weights``."""
        params = list(module.parameters())
        self.track([p for p in params if p.requires_grad], "lora_params")
        self.track([p for p in params if not p.requires_grad], "frozen_weights")
        self.track(module.buffers(), "frozen_weights")

    def label(self, tensors: Iterable, category: str) -> None:
        """Re-label storages already counted (a gradient, an optimizer state)."""
        for storage in _storages(tensors):
            serial = self._serial.get(id(storage))
            if serial is not None:
                self._label(serial, category)

    @contextlib.contextmanager
    def making(self, category: str):
        """Everything made inside counts as ``category`` (DDP's gradient buckets, FSDP's
        shards), not as a temporary."""
        self._label_check(category)
        self._making = category
        try:
            yield self
        finally:
            self._making = None

    @staticmethod
    def _label_check(category: str) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; one of {', '.join(CATEGORIES)}")

    def _label(self, serial: int, category: str) -> None:
        self._label_check(category)
        self._category[serial] = category
        self._forward_made.pop(serial, None)

    # ----------------------------------------------------------------- counting

    def _add(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        serial = self._serial.get(key)
        if serial is not None:
            return serial
        serial = self._next_serial
        self._next_serial += 1
        nbytes = storage.nbytes()
        self._serial[key] = serial
        self._live[serial] = nbytes
        self._category[serial] = "temporaries"
        self._refs[serial] = weakref.ref(storage, lambda _, k=key, s=serial: self._free(k, s))
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op, self._at_peak = self.live_bytes, self._last_op, True
        return serial

    def _add_host(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._serial:
            return
        serial = self._next_serial
        self._next_serial += 1
        self._serial[key] = serial
        self._host[serial] = storage.nbytes()
        self.host_bytes += storage.nbytes()
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
        self._refs[serial] = weakref.ref(storage, lambda _, k=key, s=serial: self._free(k, s))

    def _free(self, key: int, serial: int) -> None:
        if serial in self._host:
            self._serial.pop(key, None)
            self._refs.pop(serial, None)
            self.host_bytes -= self._host.pop(serial)
            return
        if self._at_peak:  # the first free after a new peak: what was live then
            self._snapshot, self._at_peak = dict(self._live), False
        self._serial.pop(key, None)
        self._refs.pop(serial, None)
        self._forward_made.pop(serial, None)
        self.live_bytes -= self._live.pop(serial)

    def _reread_sizes(self) -> None:
        for serial, nbytes in list(self._live.items()):
            storage = self._refs[serial]()
            if storage is not None and storage.nbytes() != nbytes:
                self._live[serial] = storage.nbytes()
                self.live_bytes += storage.nbytes() - nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op, self._at_peak = self.live_bytes, self._last_op, True

    def _enter_phase(self) -> None:
        """A backward starts: what its forward made and still holds is saved for it."""
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and not self._in_backward:
            for serial in self._forward_made:
                if self._category[serial] == "temporaries":
                    self._category[serial] = "activations"
            self._forward_made.clear()
        self._in_backward = in_backward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._enter_phase()
        phase = self.context or ("backward" if self._in_backward else "forward")
        name = (func.name() if isinstance(func, HigherOrderOperator)
                else func.overloadpacket.__name__)
        self._last_op = f"{name} in {phase}"
        out = self._run(func, args, kwargs)
        if self.storages_resize:
            self._reread_sizes()
        for storage, device in _storages_and_devices(tree_leaves(out)):
            if device == self.host_device:
                self._add_host(storage)
                continue
            new = id(storage) not in self._serial
            serial = self._add(storage)
            if new and self._making:
                self._label(serial, self._making)
            elif new and not self._in_backward:
                self._forward_made[serial] = 1
        return out

    def _run(self, func, args, kwargs):
        if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
            return func(*args, **kwargs)  # a real step: nothing to decide
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is _SCALAR and is_fake(tensors[0]):
            if tensors[0].dtype.is_floating_point:
                return 0.0
            raise RuntimeError("a data-dependent integer of a fake tensor (.item(), int(), "
                               "bool()) was asked for: it cannot be planned")
        if any(is_fake(t) for t in tensors):
            return func(*args, **kwargs)
        if not tensors:  # a factory: ids (arange, randint) are real, the rest fake
            out = func(*args, **kwargs)
            if any(t.dtype.is_floating_point for t in tree_leaves(out)
                   if isinstance(t, torch.Tensor)):
                return out
        with unset_fake_temporarily():  # real inputs (the batch's ids): real values
            return func(*args, **kwargs)

    def __exit__(self, *exc):
        if self._at_peak:
            self._snapshot, self._at_peak = dict(self._live), False
        return super().__exit__(*exc)

    # ----------------------------------------------------------------- results

    def breakdown(self) -> Dict[str, int]:
        """Bytes per category among the storages live at the peak."""
        totals = dict.fromkeys(CATEGORIES, 0)
        snapshot = self._snapshot if not self._at_peak else self._live
        for serial, nbytes in snapshot.items():
            totals[self._category[serial]] += nbytes
        return totals
