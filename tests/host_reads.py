"""A trap for tensor-to-host reads made by flexrank's own code, usable on a CPU-only machine.

On a GPU, reading a tensor's value on the host (`.item()`, `float(t)`, `bool(t)` / `if t:`, `.tolist()`, `.cpu()`,
`.numpy()`, `torch.equal`, boolean-mask indexing, `nonzero`, ...) waits until the device has computed it: the host
stops queueing work and the GPU idles once the queue drains. On a CPU the same calls cost nothing, so they have to be
found by what they are, not by what they cost.

`HostReadTrap` is a TorchFunctionMode (sees Python-level calls: `Tensor.item`, `.tolist`, `.cpu`, `__bool__`, ...)
together with a TorchDispatchMode (sees the aten operators that force a read whoever calls them, e.g.
`aten._local_scalar_dense` behind every scalar conversion, `aten.nonzero` behind boolean-mask indexing). While
`armed`, a trapped call is a violation when the innermost Python frame outside torch (and outside the standard
library) is in the flexrank package: reads made by transformers, accelerate or peft (the Trainer's own per-step
`isnan(loss)` check, for one, which stock runs have too) are not flexrank's to remove and are let through; a read
written anywhere in flexrank (a controller hook, an optimizer hook, the rank layer's forward or backward, a
callback) is caught whatever tensor it reads. A violation is recorded and raised (HostRead), naming the file and
line.

Not caught: device-to-device `.to(...)` and host-to-device copies (`torch.tensor(x, device="cuda")`), which look
like no-ops when everything is on the CPU; `.to("cpu")` is caught when the device is given as the string "cpu".
Inside the backward of an autograd Function the function mode is not active: a read there is caught by the aten
operator it runs (every scalar conversion, `if t:`, boolean masks, nonzero), not `.cpu()` / `.tolist()`, which run
none on a CPU tensor.
"""

import os
import sys
import sysconfig

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import flexrank

_FLEXRANK = os.path.dirname(os.path.abspath(flexrank.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_HERE = os.path.abspath(__file__)

# Python-level calls that hand a tensor's value to the host.
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__",
         "__array__", "__format__", "equal", "allclose", "nonzero", "argwhere", "masked_select", "unique",
         "unique_consecutive"}
# aten operators that force a read (whatever Python call led to them).
ATEN_READS = {"_local_scalar_dense", "nonzero", "equal", "allclose", "masked_select", "_unique2", "unique_dim",
              "unique_consecutive", "repeat_interleave"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # a read when an index is a boolean mask


class HostRead(RuntimeError):
    pass


def _culprit():
    """The innermost frame of the running code that is not torch, the standard library or this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        inside = name.startswith(_TORCH) or name == _HERE or (name.startswith(_STDLIB) and "site-packages" not in name)
        if not inside:
            return frame
        frame = frame.f_back
    return None


def _to_cpu(args, kwargs) -> bool:
    return any(isinstance(a, str) and a == "cpu" for a in (*args, kwargs.get("device")))


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class HostReadTrap:
    """`with HostReadTrap() as trap:` installs the modes; set `trap.armed` where no read may happen."""

    def __init__(self):
        self.armed = False
        self.violations: list[str] = []
        self.operators = 0  # aten operators seen while armed: proof that the modes were live
        self.others: dict[str, int] = {}  # reads let through (not flexrank's): "what at file:line" -> count
        trap = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if trap.armed and (name in READS or (name == "to" and _to_cpu(args[1:], kwargs))):
                    trap._check(name)
                return func(*args, **kwargs)

        class _Operators(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                trap.operators += trap.armed
                if trap.armed and (name in ATEN_READS or (name in _INDEXING and _bool_index(args))):
                    trap._check(f"aten.{name}" + (" (boolean-mask index)" if name in _INDEXING else ""))
                return func(*args, **(kwargs or {}))

        self._modes = (_Functions(), _Operators())

    def _check(self, what: str) -> None:
        frame = _culprit()
        if frame is None or not os.path.abspath(frame.f_code.co_filename).startswith(_FLEXRANK):
            where = "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"
            self.others[f"{what} at {where}"] = self.others.get(f"{what} at {where}", 0) + 1
            return
        root = os.path.dirname(_FLEXRANK.rstrip(os.sep))
        where = f"{os.path.relpath(frame.f_code.co_filename, root)}:{frame.f_lineno}"
        self.violations.append(f"{what} at {where} ({frame.f_code.co_name})")
        raise HostRead(f"host read in flexrank's per-step path: {self.violations[-1]}")

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
