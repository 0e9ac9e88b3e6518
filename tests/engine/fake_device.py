"""A second device for CPU tests: tensors that say they live on `meta` but hold real CPU data.

CPU CI has one device, so a step that builds a tensor on the host and mixes it with the model's tensors
(`torch.tensor(values)` without `device=`) runs fine there and fails on the first CUDA step. Under
`FakeDevice`, the model's tensors are `OnDevice` wrappers: their `.device` is `meta` (so code that derives
devices from the model or the logits creates tensors "on the device"), their values are real (so the
sampler's `.tolist()` and data-dependent branches work), and every op that mixes an `OnDevice` tensor with
a plain host tensor raises `MixedDeviceError`, as CUDA raises "Expected all tensors to be on the same
device". Like CUDA, 0-dim host tensors count as scalars and may mix. A torch.Generator made for the device
is an `OnDeviceGenerator`; a host generator driving an op on device tensors is an error too (CUDA:
"Expected a 'cuda' device type for generator"), and so is a device generator driving an op on the host.

This is a stand-in for a real accelerator, used only because CI has none: it checks *where* tensors are
created, not how kernels behave on CUDA (the `gpu`-marked tests and bench/gpu_check.sh do that).

    with FakeDevice() as dev:
        model = dev.put_module(model)       # parameters and buffers on the fake device
        logits = dev.put(torch.randn(2, 50))
        Sampler()(logits, seqs)             # raises MixedDeviceError on a host tensor in the step
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
_HOST = torch.device("cpu")
_Generator = torch.Generator  # the real class (FakeDevice swaps torch.Generator while active)


class MixedDeviceError(RuntimeError):
    """An op mixed a tensor on the (fake) model device with a host tensor."""


class HostSyncError(RuntimeError):
    """A device value was read on the host where no sync may happen (inside a CUDA graph capture)."""


# Reading a device tensor's values on the host: a device sync on CUDA, an error while a graph is captured.
_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
_no_sync = [False]


class OnDevice(torch.Tensor):
    """A CPU tensor wearing the fake device: `.device` is meta, `.inner` holds the data."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        assert not isinstance(inner, OnDevice) and inner.device == _HOST, inner.device
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=DEVICE, requires_grad=False,
        )

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return OnDevice(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrappers: dict[int, OnDevice] = {}
        unwrap = _unwrapper(str(func), wrappers)
        inner_args, inner_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type != DEVICE.type:
            return func(*inner_args, **inner_kwargs)  # .to("cpu"): a plain host tensor comes back
        return tree_map(_rewrapper(wrappers), func(*inner_args, **inner_kwargs))


def _unwrapper(name: str, wrappers: dict[int, OnDevice]):
    """The step that takes an op's arguments off the fake device: device tensors to the data behind them
    (remembered in `wrappers`), the fake device to the host; host tensors and host generators refused."""

    def unwrap(x):
        if isinstance(x, OnDevice):
            wrappers[id(x.inner)] = x
            return x.inner
        if isinstance(x, torch.Tensor) and (x.dim() > 0 or x.device != _HOST):
            raise MixedDeviceError(
                f"{name}: a {x.device} tensor of shape {tuple(x.shape)} mixed with tensors on the model's "
                f"device (create it with device=...)")
        if isinstance(x, _Generator) and not isinstance(x, OnDeviceGenerator):
            raise MixedDeviceError(f"{name}: a {x.device} generator drives an op on the model's device")
        if isinstance(x, torch.device | str) and _is_device_name(x) and torch.device(x).type == DEVICE.type:
            return _HOST
        return x

    return unwrap


def _rewrapper(wrappers: dict[int, OnDevice]):
    """The step that puts an op's results back on the fake device (an in-place op returns its argument)."""

    def wrap(x):
        if not isinstance(x, torch.Tensor) or isinstance(x, OnDevice):
            return x
        same = wrappers.get(id(x))
        return same if same is not None else OnDevice(x)

    return wrap


class OnDeviceGenerator(_Generator):
    """A host generator that says it is on the fake device (what `torch.Generator(device=meta)` makes)."""

    @property
    def device(self) -> torch.device:
        return DEVICE


def _on_device(func, args, kwargs):
    """Run `func` on the data behind the device tensors; refuse host tensors and host generators."""
    name = getattr(func, "__name__", str(func))
    to_host = func in (torch.Tensor.cpu, torch.Tensor.numpy) or (
        func is torch.Tensor.to and any(
            _is_device_name(a) and torch.device(a).type != DEVICE.type
            for a in [*args[1:], kwargs.get("device")] if a is not None))
    if _no_sync[0] and (to_host or func in _HOST_READS):
        raise HostSyncError(f"{name} reads a device value on the host (a sync)")
    wrappers: dict[int, OnDevice] = {}
    unwrap = _unwrapper(name, wrappers)
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if to_host:
        return out  # device -> host: a plain tensor comes back
    return tree_map(_rewrapper(wrappers), out)


def _is_device_name(x) -> bool:
    if isinstance(x, torch.device):
        return True
    if not isinstance(x, str):
        return False
    try:
        torch.device(x)
    except RuntimeError:
        return False
    return True


def _is_fake(device) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type == DEVICE.type


class FakeDevice(TorchFunctionMode):
    """Factory functions with device=meta make `OnDevice` tensors; `.to(meta)` moves host tensors there."""

    def __init__(self):
        super().__init__()
        self._generator = None

    def __enter__(self):
        self._generator = real = _Generator

        class Generator(real):  # a class, so annotations like `torch.Generator | None` still work
            def __new__(cls, device=None):
                if _is_fake(device):
                    return OnDeviceGenerator()
                return real(device) if device is not None else real()

        torch.Generator = Generator  # torch.Generator(device=logits.device) in the code under test
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Generator = self._generator
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # .device, .shape, .dtype...: the wrapper's own
            return func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        if any(isinstance(x, OnDevice) for x in leaves):
            return _on_device(func, args, kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            if func is torch.Tensor.cuda or _is_fake(target):  # host -> device: a copy on the device
                dtype = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
                return OnDevice(args[0].to(dtype=dtype, copy=True) if dtype else args[0].clone())
        if _is_fake(kwargs.get("device")):  # a factory function: torch.tensor, empty, zeros, arange, full...
            out = func(*args, **{**kwargs, "device": _HOST})
            return tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) else x, out)
        if any(isinstance(x, OnDeviceGenerator) for x in leaves):
            name = getattr(func, "__name__", str(func))
            raise MixedDeviceError(f"{name}: a generator on the model's device drives an op on the host (CUDA: "
                                   "\"Expected a 'cpu' device type for generator\")")
        return func(*args, **kwargs)

    @staticmethod
    @contextlib.contextmanager
    def no_host_sync():
        """Within: reading a device tensor's values on the host raises HostSyncError (as a CUDA graph
        capture fails on a sync)."""
        _no_sync[0] = True
        try:
            yield
        finally:
            _no_sync[0] = False

    # -- putting test inputs on the device ------------------------------------------------------
    @staticmethod
    def put(tensor: torch.Tensor) -> OnDevice:
        return OnDevice(tensor.detach().clone())

    def put_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Every parameter and buffer of `module` on the fake device (tied parameters stay tied)."""
        seen: dict[int, torch.nn.Parameter] = {}
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in seen:
                    seen[id(param)] = torch.nn.Parameter(self.put(param.data), requires_grad=False)
                sub._parameters[name] = seen[id(param)]
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = self.put(buf)
        return module


def host(x: torch.Tensor) -> torch.Tensor:
    """The data behind a tensor, wherever it is."""
    return x.inner if isinstance(x, OnDevice) else x
