"""Read the public EDM / EDM2 network pickles and ECT's training snapshots without executing any code they contain.

Layout of those files (plain `pickle.dump` of a dict, protocol 2-4):
  {'ema': <Precond>, 'loss_fn': ..., 'augment_pipe' | 'encoder': ..., 'dataset_kwargs': dnnlib.EasyDict, ...}
Every network class is wrapped by `torch_utils.persistence.persistent_class`, whose `__reduce__` is
  (torch_utils.persistence._reconstruct_persistent_obj, ({'type': 'class', 'module_src': <source code>,
                                                          'class_name': ..., 'state': <the module's __dict__>},))
so loading them normally *executes the embedded source*. The state dict holds `_parameters`, `_buffers` and
`_modules` (children: more persistent objects or plain torch.nn containers). Tensors are
`torch._utils._rebuild_tensor_v2(storage, ...)` (or `_rebuild_parameter(tensor, ...)`), and every storage is
`torch.storage._load_from_bytes(<bytes in torch's legacy serialisation format>)`.

`_RestrictedUnpickler.find_class` answers every global the pickle names: a short whitelist of tensor-rebuilding
functions is replaced by our own implementations (which parse the storage bytes themselves), anything from the
EDM code base (`torch_utils`, `training`, `dnnlib`) or from `torch.nn.modules` becomes an inert stand-in that just
records its state, and everything else (os.system, builtins.eval, subprocess, ...) is refused before it can run.

ECT's training snapshots (`network-snapshot-*.pkl`) have the same layout, but their loss object holds a bound
method of itself, which pickles as `builtins.getattr(loss, 'method_name')`. The real getattr would let a pickle
reach any attribute of anything it can name (a function's `__globals__`, then `eval`), so `builtins.getattr` is
answered by `_method_ref`, which looks nothing up: it returns a `MethodRef` recording the owner's class name and
the attribute name as data, and calling a `MethodRef` is refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ectune.config import NetConfig

EdmKind = Literal["edm", "edm2", "ddpmpp"]  # "ddpmpp" is another name for "edm" (EDM's DDPM++ network)

__all__ = ["PickleRefused", "MethodRef", "EdmPickle", "read_edm_pickle", "load_edm_pickle", "map_to_ectune",
           "import_edm_pickle"]


class PickleRefused(pickle.UnpicklingError):
    """The pickle names something outside the whitelist; nothing it refers to was called."""


# --------------------------------------------------------------------------------------------- inert stand-ins


class StandIn(dict):
    """Inert replacement for a class from the EDM code base or torch.nn: records constructor args and state.

    It subclasses dict so that dict subclasses (dnnlib.EasyDict) keep their items; it accepts list-style
    appends for list subclasses. It has no behaviour: nothing from the original class ever runs.
    """

    stand_in_for = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["kwargs"] = kwargs
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never forward args to dict()
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items", []).extend(items)

    def __repr__(self) -> str:
        return f"<stand-in for {self.stand_in_for}>"


class PersistentStandIn(StandIn):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` gives here: class name + state, no code."""

    stand_in_for = "torch_utils.persistence object"

    @property
    def class_name(self) -> str:
        return str(self.__dict__["class_name"])


_stand_in_classes: dict[tuple[str, str], type[StandIn]] = {}


def _stand_in_class(module: str, name: str) -> type[StandIn]:
    key = (module, name)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(f"StandIn_{name}", (StandIn,), {"stand_in_for": f"{module}.{name}"})
    return _stand_in_classes[key]


def _reconstruct_persistent_obj(meta: Any) -> PersistentStandIn:
    """Safe replacement: keep class_name and state; ignore (never compile) meta['module_src']."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or "state" not in meta:
        raise PickleRefused("torch_utils.persistence object with unexpected metadata (expected type='class' + state)")
    obj = PersistentStandIn()
    obj.__dict__["class_name"] = str(meta.get("class_name", "?"))
    obj.__dict__["state"] = meta["state"]
    return obj


@dataclasses.dataclass(frozen=True)
class MethodRef:
    """What `builtins.getattr(obj, name)` gives here: a pickled bound method's names, as data, never looked up."""

    owner: str  # class of the method's object, e.g. 'EDMLoss' (a persistent class) or 'training.loss.X' (a stand-in)
    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a pickle that REDUCEs the reference gets no call
        raise PickleRefused(f"refusing to call {self.owner}.{self.name}: a pickled method reference is kept as data "
                            "(this pickle may try to run code; nothing was executed)")


def _method_ref(*args: Any) -> MethodRef:
    """Safe `builtins.getattr`, for bound methods only: (obj, name) -> MethodRef, without touching `obj`."""
    if len(args) != 2 or not isinstance(args[1], str):
        raise PickleRefused("builtins.getattr is only allowed as (object, attribute name), i.e. a pickled bound method")
    obj, name = args
    if isinstance(obj, PersistentStandIn):
        owner = obj.class_name
    elif isinstance(obj, StandIn):
        owner = obj.stand_in_for
    else:
        owner = type(obj).__qualname__  # not an object of the EDM code base: named by its type, nothing read from it
    return MethodRef(owner, name)


# --------------------------------------------------------------------------------------------- tensor rebuilding

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Marker for torch.<X>Storage inside the legacy storage format (only its dtype matters)."""

    dtype: torch.dtype


def _legacy_storage_from_bytes(data: bytes) -> Tensor:
    """Parse torch's legacy (non-zip) serialisation of one storage, as `TypedStorage.__reduce__` writes it.

    Returns the storage as a 1-D tensor. Format: pickles of the magic number, protocol version and sys_info,
    the object pickle (whose persistent ids describe storages), the sorted list of storage keys, then per key an
    int64 element count followed by the raw little-endian bytes.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise PickleRefused("torch.storage._load_from_bytes expects bytes")
    f = io.BytesIO(data)
    if _RestrictedUnpickler(f).load() != 0x1950A86A20F9469CFC6C:
        raise pickle.UnpicklingError("storage bytes: bad magic number (not torch's legacy format)")
    if _RestrictedUnpickler(f).load() != 1001:
        raise pickle.UnpicklingError("storage bytes: unsupported legacy protocol version")
    sys_info = _RestrictedUnpickler(f).load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise pickle.UnpicklingError("storage bytes: only little-endian files are supported")

    storages: dict[str, tuple[torch.dtype, int]] = {}
    views: list[Any] = []

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise PickleRefused(f"storage bytes: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        storages[str(key)] = (stype.dtype, int(numel))
        view = pid[5] if len(pid) > 5 else None
        ref = ("storage", str(key), view)
        views.append(ref)
        return ref

    result = _RestrictedUnpickler(f, persistent_load).load()
    keys = _RestrictedUnpickler(f).load()
    loaded: dict[str, Tensor] = {}
    for key in keys:
        dtype, numel = storages[str(key)]
        count = int.from_bytes(f.read(8), "little", signed=True)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if dtype == torch.uint8 and count != numel:  # untyped storages count bytes
            numel = count
        if count != numel:
            raise pickle.UnpicklingError(f"storage bytes: size {count} does not match the declared {numel}")
        raw = f.read(numel * itemsize)
        if len(raw) != numel * itemsize:
            raise pickle.UnpicklingError("storage bytes: truncated data")
        loaded[str(key)] = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    if not (isinstance(result, tuple) and len(result) == 3 and result[0] == "storage"):
        raise PickleRefused("storage bytes: the object is not a single storage")
    _, key, view = result
    storage = loaded[key]
    if view is not None:  # (view_key, offset, size) of pre-1.0 storage views
        _view_key, offset, size = view
        storage = storage[int(offset):int(offset) + int(size)]
    return storage


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *_: Any) -> Tensor:
    """Safe `torch._utils._rebuild_tensor[_v2]`: a bounds-checked strided view of the storage, copied."""
    if not isinstance(storage, Tensor) or storage.ndim != 1:
        raise PickleRefused("tensor rebuild without a storage loaded by this reader")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"tensor rebuild: invalid size {size} / stride {stride} / offset {offset}")
    if math.prod(size) == 0:
        return torch.empty(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.numel():
        raise pickle.UnpicklingError(f"tensor rebuild: view {size}/{stride}+{offset} exceeds storage {storage.numel()}")
    return storage.as_strided(size, stride, offset).clone()


def _rebuild_parameter(data: Any, *_: Any) -> Tensor:
    """Safe `torch._utils._rebuild_parameter[_with_state]`: the data tensor itself (requires_grad dropped)."""
    if not isinstance(data, Tensor):
        raise PickleRefused("parameter rebuild without a tensor")
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow exactly that."""
    if not isinstance(text, str) or encoding != "latin1":
        raise PickleRefused(f"_codecs.encode only allowed as (str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np

    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes) or dtype.hasobject:
        raise PickleRefused("numpy scalar with an object dtype or no data")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _numpy_dtype(spec: Any, *args: Any) -> Any:
    import numpy as np

    if not isinstance(spec, str) or spec.startswith("O"):
        raise PickleRefused(f"numpy dtype {spec!r} not allowed")
    return np.dtype(spec)


def _safe_set(items: Any = ()) -> set:
    items = list(items)
    _check_keys(items)
    return set(items)


def _safe_frozenset(items: Any = ()) -> frozenset:
    items = list(items)
    _check_keys(items)
    return frozenset(items)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _legacy_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): _safe_set,
    ("builtins", "frozenset"): _safe_frozenset,
    ("builtins", "getattr"): _method_ref,
    ("_codecs", "encode"): _codecs_encode,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}
_ALLOWED.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})

# Code whose classes we replace by inert stand-ins: EDM/EDM2's own packages and torch.nn containers/modules.
_INERT_PACKAGES = ("torch_utils", "training", "dnnlib", "torch.nn.modules")


# --------------------------------------------------------------------------------------------- resource bounds

# A real network pickle has a few thousand objects nested a few levels deep (EDM2-XL: ~1,700 tensors).
_MAX_WALK = 1_000_000  # objects visited when walking what the pickle built, shared references counted each time
_MAX_DEPTH = 100
_MAX_KEY_NODES = 1_000  # objects in one dict key or set element (hashing walks all of them, shared ones again)


def _children(node: Any) -> list[Any] | None:
    """The objects a walk over `node` visits next; None for a leaf."""
    if isinstance(node, StandIn):  # a dict subclass: its items, and what it recorded (args, kwargs, state, items)
        return [*node.keys(), *node.values(), *node.__dict__.values()]
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return None


def _check_walkable(obj: Any, *, what: str, budget: int = _MAX_WALK) -> None:
    """Refuse a structure that contains itself, nests deeper than `_MAX_DEPTH`, or expands past `budget` objects
    when walked. Unpickling only links shared references (a few hundred bytes can reference one list from every
    level of a deep nest), but every walk (flattening, hashing, printing) visits them once per reference: a
    "billion laughs" that would hang the reader or exhaust memory."""
    seen = 0
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        seen += 1
        if seen > budget:
            raise PickleRefused(f"{what} expands to more than {budget:,} objects when walked (shared references "
                                "repeated over and over); refused before walking it")
        children = _children(node)
        if children is None:
            continue
        if id(node) in on_path:
            raise PickleRefused(f"{what} contains itself (a cyclic structure); a network pickle has none")
        if depth >= _MAX_DEPTH:
            raise PickleRefused(f"{what} is nested more than {_MAX_DEPTH} levels deep; a network pickle is not")
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children)


def _check_keys(keys: Any) -> None:
    for key in keys:
        if not isinstance(key, (str, bytes, int, float, bool, type(None))):
            _check_walkable(key, what="a dict key or set element", budget=_MAX_KEY_NODES)


class _SizeCheckedFile:
    """Read-only view of a file that refuses reads past its end: a length field larger than what is left of the
    file (an "8-exabyte string" in 14 bytes) is refused before anything that size is allocated."""

    def __init__(self, f: Any) -> None:
        self._f = f
        here = f.tell()
        self._left = f.seek(0, io.SEEK_END) - here
        f.seek(here)

    def _take(self, n: int) -> None:
        if n > self._left:
            raise pickle.UnpicklingError(f"the pickle declares an object of {n:,} bytes where only {self._left:,} "
                                         "bytes of the file are left (truncated or forged)")

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else n
        self._take(n)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buf: Any) -> int:
        self._take(len(memoryview(buf).cast("B")))
        got = self._f.readinto(buf)
        self._left -= got
        return got

    def readline(self) -> bytes:
        line = self._f.readline()
        self._left -= len(line)
        return line


def _keys_checked(load: Any, keys_on_stack: Any) -> Any:
    """An opcode handler that bounds the cost of hashing the keys it is about to insert, then runs `load`."""
    def handler(self: pickle._Unpickler) -> None:
        _check_keys(keys_on_stack(self.stack))
        load(self)
    return handler


def _load_bytearray8(self: pickle._Unpickler) -> None:
    # The base handler allocates (and zero-fills) the declared size before reading: check it against the file first.
    (n,) = struct.unpack("<Q", self.read(8))
    self.append(bytearray(self.read(n)))


class _RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that can only produce data: whitelisted rebuild functions or inert stand-ins.

    It is Python's own Unpickler in its pure-Python form, so that the opcodes which hash keys (dicts, sets) can be
    bounded; reads go through `_SizeCheckedFile`.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    _U = pickle._Unpickler
    dispatch[pickle.SETITEM[0]] = _keys_checked(_U.load_setitem, lambda stack: stack[-2:-1])
    dispatch[pickle.SETITEMS[0]] = _keys_checked(_U.load_setitems, lambda stack: stack[0::2])
    dispatch[pickle.DICT[0]] = _keys_checked(_U.load_dict, lambda stack: stack[0::2])
    dispatch[pickle.ADDITEMS[0]] = _keys_checked(_U.load_additems, lambda stack: stack)
    dispatch[pickle.FROZENSET[0]] = _keys_checked(_U.load_frozenset, lambda stack: stack)
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    del _U

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles written by Python 3 spell some modules the Python 2 way (__builtin__.set).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if any(module == p or module.startswith(p + ".") for p in _INERT_PACKAGES):
            return _stand_in_class(module, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy") and name in ("_reconstruct", "ndarray"):
            return _stand_in_class(module, name)  # arrays are not needed for the weights: keep them inert
        raise PickleRefused(
            f"refusing to load global {module}.{name}: not a tensor-rebuild function or an EDM network class "
            "(this pickle may try to run code; nothing was executed)"
        )

    def __init__(self, file: Any, persistent_handler: Any = None) -> None:
        super().__init__(_SizeCheckedFile(file))
        self._persistent_handler = persistent_handler

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_handler is None:
            raise PickleRefused(f"unexpected persistent id {pid!r:.80} (EDM network pickles have none)")
        return self._persistent_handler(pid)


# --------------------------------------------------------------------------------------------- walking the tree


def _state_of(node: Any) -> dict[str, Any]:
    state = node.__dict__.get("state") if isinstance(node, StandIn) else None
    return state if isinstance(state, dict) else {}


def _collect(node: Any, prefix: str, out: dict[str, Tensor]) -> None:
    """Flatten `_parameters`, persistent `_buffers` and `_modules` of a stand-in module tree into `out`."""
    state = _state_of(node)
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, t in (state.get("_parameters") or {}).items():
        if isinstance(t, Tensor):
            out[prefix + name] = t
    for name, t in (state.get("_buffers") or {}).items():
        if isinstance(t, Tensor) and name not in skip:
            out[prefix + name] = t
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)


def _plain(obj: Any) -> Any:
    """Stand-ins and containers as plain JSON-like Python data (for init_kwargs)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclasses.dataclass
class EdmPickle:
    """What an EDM/EDM2 network pickle holds for the exported network (`data['ema']`)."""

    class_name: str  # e.g. 'EDMPrecond' (EDM) or 'Precond' (EDM2)
    init_kwargs: dict[str, Any]  # the Precond's constructor keyword arguments, as pickled
    state: dict[str, Tensor]  # flat state_dict, keys as in the original code ('model.enc...' / 'unet.enc...')
    # EDM2's data['encoder'] as data: {"class_name", "vae_name", "raw_mean", "raw_std"} (None where not recorded);
    # None when the pickle has no encoder. Its embedded code is never run, its VAE never loaded.
    encoder: dict[str, Any] | None = None


def read_edm_pickle(path: str | Path, *, key: str = "ema") -> EdmPickle:
    """Read `data[key]` of an EDM/EDM2 network pickle, safely (see module docstring)."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            data = _RestrictedUnpickler(f).load()
        except PickleRefused as e:
            raise PickleRefused(f"{path}: {e}") from None
        except MemoryError:
            raise pickle.UnpicklingError(f"{path}: the pickle declares objects larger than the memory available") from None
    if not isinstance(data, dict) or key not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected an EDM network pickle (a dict with key {key!r}), found {found}")
    net = data[key]
    if not isinstance(net, PersistentStandIn):
        raise ValueError(f"{path}: data[{key!r}] is not a torch_utils.persistence network object")
    try:
        _check_walkable(net, what=f"data[{key!r}]")
    except PickleRefused as e:
        raise PickleRefused(f"{path}: {e}") from None
    state: dict[str, Tensor] = {}
    _collect(net, "", state)
    init_kwargs = _plain(_state_of(net).get("_init_kwargs") or {})
    encoder = data.get("encoder") if key == "ema" else None
    if isinstance(encoder, StandIn):
        try:
            _check_walkable(encoder, what="data['encoder']")
        except PickleRefused as e:
            raise PickleRefused(f"{path}: {e}") from None
    return EdmPickle(class_name=net.class_name, init_kwargs=init_kwargs, state=state, encoder=describe_encoder(encoder))


def describe_encoder(obj: Any) -> dict[str, Any] | None:
    """What an EDM2 pickle's encoder object records, as plain data: its class name, the VAE name and the raw latent
    mean/std when they were given to its constructor (EDM2's StabilityVAEEncoder; StandardRGBEncoder for pixels)."""
    if not isinstance(obj, StandIn):
        return None
    name = obj.class_name if isinstance(obj, PersistentStandIn) else obj.stand_in_for.rsplit(".", 1)[-1]
    state = _state_of(obj)
    kwargs = state.get("_init_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}

    def numbers(v: Any) -> list[float] | None:
        ok = isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        return [float(x) for x in v] if ok else None

    vae = kwargs.get("vae_name", state.get("vae_name"))
    return {"class_name": name, "vae_name": vae if isinstance(vae, str) else None,
            "raw_mean": numbers(kwargs.get("raw_mean")), "raw_std": numbers(kwargs.get("raw_std"))}


def load_edm_pickle(path: str | Path) -> dict[str, Tensor]:
    """Flat state_dict of the EMA network in an EDM/EDM2 pickle, keys with the preconditioner's prefix
    ('model.' for EDM's EDMPrecond, 'unet.' for EDM2's Precond). Executes no code from the file."""
    return read_edm_pickle(path).state


# --------------------------------------------------------------------------------------------- mapping to ectune

_PREFIX = {"edm": "model.", "edm2": "unet."}
_PRECOND_ONLY = {"edm": (), "edm2": ("logvar_fourier.", "logvar_linear.")}  # EDM2's uncertainty head: not used


def _levels(sd: dict[str, Tensor]) -> list[int]:
    res = {int(m.group(1)) for k in sd if (m := re.match(r"enc\.(\d+)x\1_", k))}
    if not res:
        raise ValueError("no encoder keys 'enc.<R>x<R>_...' found: not an EDM/EDM2 UNet state dict")
    return sorted(res, reverse=True)


def _num_blocks(sd: dict[str, Tensor], res: int) -> int:
    return len({m.group(1) for k in sd if (m := re.match(rf"enc\.{res}x{res}_block(\d+)\.", k))})


def _infer_ddpmpp(sd: dict[str, Tensor], kw: dict[str, Any]) -> NetConfig:
    for opt, allowed in (("model_type", "SongUNet"), ("encoder_type", "standard"), ("decoder_type", "standard")):
        if opt in kw and kw[opt] != allowed:
            raise ValueError(f"only DDPM++ (SongUNet, standard encoder/decoder) is supported; pickle has {opt}={kw[opt]!r}")
    if any(re.search(r"_aux_(skip|residual|up|down)\.", k) for k in sd):
        raise ValueError("skip/residual encoders or skip decoders (NCSN++) are not supported; only DDPM++ is")
    levels = _levels(sd)
    mc, img_channels = sd[f"enc.{levels[0]}x{levels[0]}_conv.weight"].shape[:2]
    emb_channels, noise_channels = sd["map_layer0.weight"].shape
    mults = [sd[f"enc.{r}x{r}_block0.conv0.weight"].shape[0] for r in levels]
    if any(c % mc for c in [*mults, emb_channels, noise_channels]):
        raise ValueError(f"channel counts {mults}, {emb_channels}, {noise_channels} are not multiples of {mc}")
    return NetConfig(
        arch="ddpmpp", img_resolution=levels[0], img_channels=int(img_channels),
        label_dim=int(sd["map_label.weight"].shape[1]) if "map_label.weight" in sd else 0,
        model_channels=int(mc), channel_mult=tuple(int(c // mc) for c in mults),
        channel_mult_emb=int(emb_channels // mc), channel_mult_noise=int(noise_channels // mc),
        num_blocks=_num_blocks(sd, levels[0]),
        attn_resolutions=tuple(r for r in levels if f"enc.{r}x{r}_block0.qkv.weight" in sd),
        dropout=float(kw.get("dropout", 0.0)),
        embedding_type="fourier" if "map_noise.freqs" in sd else "positional",
        augment_dim=int(sd["map_augment.weight"].shape[1]) if "map_augment.weight" in sd else 0,
    )


def _infer_edm2(sd: dict[str, Tensor], kw: dict[str, Any]) -> NetConfig:
    for opt, default in (("channels_per_head", 64), ("res_balance", 0.3), ("attn_balance", 0.3), ("clip_act", 256)):
        if opt in kw and kw[opt] != default:
            raise ValueError(f"EDM2 option {opt}={kw[opt]!r} is not supported (only the default {default})")
    levels = _levels(sd)
    c0, cin = sd[f"enc.{levels[0]}x{levels[0]}_conv.weight"].shape[:2]
    cblock = [int(sd[f"enc.{r}x{r}_block0.conv_res1.weight"].shape[0]) for r in levels]
    cemb, cnoise = (int(n) for n in sd["emb_noise.weight"].shape)
    mc = int(kw.get("model_channels") or math.gcd(*cblock, cemb, cnoise))
    if any(c % mc for c in [*cblock, cemb, cnoise]):
        raise ValueError(f"channel counts {cblock}, {cemb}, {cnoise} are not multiples of model_channels {mc}")
    return NetConfig(
        arch="edm2", img_resolution=levels[0], img_channels=int(cin) - 1,  # minus EDM2's constant input channel
        label_dim=int(sd["emb_label.weight"].shape[1]) if "emb_label.weight" in sd else 0,
        model_channels=mc, channel_mult=tuple(c // mc for c in cblock),
        channel_mult_emb=cemb // mc, channel_mult_noise=cnoise // mc,
        num_blocks=_num_blocks(sd, levels[0]),
        attn_resolutions=tuple(r for r in levels if f"enc.{r}x{r}_block0.attn_qkv.weight" in sd),
        dropout=float(kw.get("dropout", 0.0)),
        # EDM2's own defaults (its UNet signature) unless the pickle recorded other values.
        label_balance=float(kw.get("label_balance", 0.5)), concat_balance=float(kw.get("concat_balance", 0.5)),
    )


def map_to_ectune(state: dict[str, Tensor], kind: EdmKind, *,
                  init_kwargs: dict[str, Any] | None = None) -> tuple[NetConfig, dict[str, Tensor]]:
    """Turn an EDM ('edm': EDMPrecond + SongUNet) or EDM2 ('edm2': Precond + UNet) state into ectune's.

    `state` may carry the preconditioner prefix ('model.' / 'unet.') or not. The architecture comes from the
    tensor shapes; dropout (and EDM2's balances) from `init_kwargs` when given. Every key and shape is checked
    against `build_net(cfg)`; floating tensors are returned as contiguous float32.
    Raises ValueError listing missing, unexpected and mismatched keys.
    """
    from ectune.nets import build_net  # late import: importers must not be needed to build nets

    kind = "edm" if kind == "ddpmpp" else kind
    if kind not in _PREFIX:
        raise ValueError(f"kind must be 'edm' (or 'ddpmpp') or 'edm2', got {kind!r}")
    prefix = _PREFIX[kind]
    kw = dict(init_kwargs or {})
    has_prefix = any(k.startswith(prefix) for k in state)
    sd: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for k, v in state.items():
        if has_prefix and not k.startswith(prefix):
            if not k.startswith(_PRECOND_ONLY[kind]):
                unexpected.append(k)
            continue
        sd[k[len(prefix):] if has_prefix else k] = v

    cfg = _infer_ddpmpp(sd, kw) if kind == "edm" else _infer_edm2(sd, kw)
    with torch.device("meta"):
        ref = build_net(cfg).state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected += sorted(set(sd) - set(ref))
    mismatched = [f"{k}: {tuple(sd[k].shape)} in file vs {tuple(ref[k].shape)} expected"
                  for k in sorted(set(ref) & set(sd)) if sd[k].shape != ref[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the {kind} state does not match ectune's {cfg.arch} network inferred as {cfg}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                lines.append(f"  {title}: {shown}")
        raise ValueError("\n".join(lines))
    out = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items() if k in ref}
    return cfg, out


def import_edm_pickle(path: str | Path, kind: EdmKind | None = None) -> tuple[NetConfig, dict[str, Tensor]]:
    """read_edm_pickle + map_to_ectune, guessing `kind` from the preconditioner's child ('model' or 'unet')."""
    pkl = read_edm_pickle(path)
    if kind is None:
        if any(k.startswith("unet.") for k in pkl.state):
            kind = "edm2"
        elif any(k.startswith("model.") for k in pkl.state):
            kind = "edm"
        else:
            raise ValueError(f"{path}: cannot tell EDM from EDM2 ({pkl.class_name} has neither .model nor .unet)")
    return map_to_ectune(pkl.state, kind, init_kwargs=pkl.init_kwargs)
