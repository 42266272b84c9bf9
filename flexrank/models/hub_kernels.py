"""No kernel is fetched from the Hugging Face Hub unless the user asks (USE_HUB_KERNELS=YES).

transformers 5.x kernelises every model it loads by default: on CUDA it swaps RMSNorm, RoPE, activations, ... for
kernels downloaded from Hub repositories (`kernels-community/*`) through the `kernels` package. And bitsandbytes,
when imported on a CPU with AVX512-BF16 (peft imports it), calls `kernels.get_kernel(...)` for its CPU 4-bit
matmul. Both happen silently, fail without a network, and run code the recipe never named. flexrank decides
instead: `install()` (run when flexrank is imported, before transformers, peft or bitsandbytes) defaults
transformers' own switch USE_HUB_KERNELS to NO and makes `kernels.get_kernel` refuse while it says no, recording
what was asked for; model loading passes `use_kernels` explicitly and logs the decision (`decision()`).
Stdlib only: flexrank's import must stay light."""

import importlib.abc
import importlib.util
import os
import sys

ENV = "USE_HUB_KERNELS"
_TRUE = ("1", "true", "y", "yes", "on")  # transformers' is_env_variable_true
refused: list[str] = []  # Hub kernels asked for and not fetched, in order


class HubKernelsOff(RuntimeError):
    pass


def allowed() -> bool:
    return os.environ.get(ENV, "NO").lower() in _TRUE


def decision() -> str:
    """The log line's words."""
    if allowed():
        return f"on ({ENV}={os.environ[ENV]}): transformers may replace layers with kernels fetched from the Hub"
    seen = f"; not fetched: {', '.join(dict.fromkeys(refused))}" if refused else ""
    return f"off (set {ENV}=YES to let transformers / bitsandbytes fetch kernels from the Hub){seen}"


def _guarded(get_kernel):
    def get_kernel_unless_off(repo_id, *args, **kwargs):
        if not allowed():
            refused.append(str(repo_id))
            raise HubKernelsOff(f"flexrank: Hub kernels are off, {repo_id} not fetched (set {ENV}=YES to allow)")
        return get_kernel_unless_off.__wrapped__(repo_id, *args, **kwargs)

    get_kernel_unless_off.__wrapped__ = get_kernel
    get_kernel_unless_off._flexrank_guard = True
    return get_kernel_unless_off


def guard(module) -> None:
    """Wrap `module.get_kernel` (the `kernels` package) once; `from kernels import get_kernel` then gets the guard."""
    current = getattr(module, "get_kernel", None)
    if current is not None and not getattr(current, "_flexrank_guard", False):
        module.get_kernel = _guarded(current)


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Guards `kernels` as it is imported, whoever imports it, without importing it here (0.4 s)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "kernels":
            return None
        sys.meta_path.remove(self)  # the real finder locates it; once imported, `kernels` is in sys.modules
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _GuardingLoader(spec.loader)
        return spec


class _GuardingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        guard(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


def install() -> None:
    """Idempotent. USE_HUB_KERNELS keeps any value the user set."""
    os.environ.setdefault(ENV, "NO")
    if "kernels" in sys.modules:
        guard(sys.modules["kernels"])
    elif not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())
