"""Virtual CUDA devices on a CPU-only torch: device mistakes become visible without a GPU.

Inside `VirtualCuda()`, a tensor can be "on" cuda:k while its data stays in host memory: it carries a tag, its
`.device` says cuda:k, and torch's device rules are enforced as a CUDA build enforces them:

    an op mixing tensors of two devices     RuntimeError "Expected all tensors to be on the same device"
                                            (a 0-dim CPU tensor is a scalar and mixes, as in CUDA torch;
                                            indexing and copy_ across devices are allowed, as in CUDA torch)
    .numpy() of a cuda tensor               TypeError "can't convert cuda:0 device type tensor to numpy"
    factories with device="cuda:k"          tagged results (data on the host)
    .to("cuda:k") / .cuda() / .cpu()        a tagged / untagged alias (autograd flows through it)
    results of an op                        the device of its inputs; a parameter's .grad its parameter's

`place(model, "cuda:0")` puts a model's parameters and buffers on a virtual device. Values are computed on the
CPU exactly as without the mode, so a test can check numbers too. What it cannot show: kernels that exist only
on CUDA (bitsandbytes' 4-bit GPU path, flash attention), CUDA memory, streams, nondeterminism, and code that
asks `torch.cuda` directly (tests monkeypatch that separately). docs/design.md, "Devices", says which device
mistakes the tests catch.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

TAG = "_virtual_device"
_T = torch.Tensor


def device_of(t: torch.Tensor) -> str:
    """The virtual device of `t` ("cpu" when untagged)."""
    return getattr(t, TAG, "cpu")


def _tag(t, device: str):
    if isinstance(t, torch.Tensor):
        if device == "cpu":
            if hasattr(t, TAG):
                delattr(t, TAG)
        else:
            setattr(t, TAG, device)
    return t


def _target(args, kwargs) -> str | None:
    """The device a .to(...) call asks for, or None (a dtype-only conversion)."""
    for a in list(args) + [kwargs.get("device"), kwargs.get("other")]:
        if isinstance(a, torch.Tensor):
            return device_of(a)
        if isinstance(a, (str, torch.device)):
            d = torch.device(a)
            return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"
        if isinstance(a, int) and not isinstance(a, bool):
            return f"cuda:{a}"
    return None


def _is_meta(a) -> bool:
    return isinstance(a, (str, torch.device)) and torch.device(a).type == "meta"


def _host_args(args, kwargs):
    """The same call with every CUDA device argument turned into the CPU (the meta device stays: transformers
    builds a model's skeleton there and fills non-persistent buffers such as RoPE's inv_freq later; as CPU memory
    they would keep whatever the allocator left in them)."""
    def host(a):
        return "cpu" if isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda" else a

    args = tuple(host(a) for a in args)
    kwargs = {k: host(v) if k == "device" else v for k, v in kwargs.items()}
    return args, kwargs


def _alias(t: torch.Tensor) -> torch.Tensor:
    return t.view_as(t)


MIXED_OK = {_T.__getitem__, _T.__setitem__, _T.copy_, _T.index_put_, _T.index_put,
            torch._has_compatible_shallow_copy_type}


class VirtualCuda(TorchFunctionMode):
    """The mode: `with VirtualCuda(): ...` (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _T.device.__get__:  # an untagged tensor's own device: cpu, or meta (a model's skeleton)
            return torch.device(getattr(args[0], TAG)) if hasattr(args[0], TAG) else func(*args, **kwargs)
        if func == _T.is_cuda.__get__:
            return device_of(args[0]) != "cpu"
        if func == _T.grad.__get__:
            g = func(*args, **kwargs)
            return _tag(g, device_of(args[0])) if g is not None else g
        if func == _T.data.__set__:
            func(*args, **kwargs)
            return _tag(args[0], device_of(args[1]))
        if func is _T.numpy:
            if device_of(args[0]) != "cpu":
                raise TypeError(f"can't convert {device_of(args[0])} device type tensor to numpy. Use Tensor.cpu() "
                                "to copy the tensor to host memory first.")
            return func(*args, **kwargs)
        if func in (_T.to, _T.cuda, _T.cpu):
            return self._move(func, args, kwargs)
        if _is_meta(kwargs.get("device")) or (func is _T.to and any(_is_meta(a) for a in args[1:])):
            return func(*args, **kwargs)  # the meta device is no CUDA device: untouched, untagged
        if "device" in kwargs and kwargs["device"] is not None:  # factories: torch.zeros(..., device=...)
            want = _target((), kwargs)
            out = func(*_host_args(args, kwargs)[0], **_host_args(args, kwargs)[1])
            return tree_map(lambda t: _tag(t, want), out)
        devices = self._devices(args, kwargs)
        if len(devices) > 1 and func not in MIXED_OK:
            a, b = sorted(devices)[:2]
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{b} and {a}! ({getattr(func, '__name__', func)})")
        out = func(*args, **kwargs)
        if func in MIXED_OK:
            devices = {device_of(args[0])} if isinstance(args[0], torch.Tensor) else devices
        if devices and devices != {"cpu"}:
            (d,) = devices
            tree_map(lambda t: _tag(t, d), out)
        return out

    @staticmethod
    def _devices(args, kwargs) -> set[str]:
        """Devices of the tensor arguments; a 0-dim CPU tensor (a scalar) is compatible with any device."""
        flat, _ = tree_flatten((args, kwargs))
        found = {device_of(t) for t in flat if isinstance(t, torch.Tensor)
                 and not (t.dim() == 0 and device_of(t) == "cpu")}
        return found

    @staticmethod
    def _move(func, args, kwargs):
        self_t = args[0]
        if func is _T.cuda:
            want = _target(args[1:], kwargs) or "cuda:0"
            out = _alias(self_t)
        elif func is _T.cpu:
            want, out = "cpu", _alias(self_t)
        else:
            want = _target(args[1:], kwargs)
            host_args, host_kwargs = _host_args(args[1:], kwargs)
            if (any(isinstance(a, torch.Tensor) for a in host_args)
                    or isinstance(host_kwargs.get("other"), torch.Tensor)):
                host_args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in host_args)
                if "other" in host_kwargs:
                    host_kwargs["dtype"] = host_kwargs.pop("other").dtype
            out = func(self_t, *host_args, **host_kwargs)
            if want is None:
                want = device_of(self_t)
            if out is self_t and want != device_of(self_t):
                out = _alias(self_t)
        return _tag(out, want) if out is not self_t else out


def place(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Put every parameter and buffer of `model` on the virtual `device` (in place; returns the model)."""
    for t in list(model.parameters()) + list(model.buffers()):
        _tag(t, device)
    return model
