"""Task arguments and results with their Python types, without pickle (layer 1: imports errors).

The rule it keeps: decoding builds only what the fixed table below names,
and imports no module but numpy (to decode an array). msgpack carries None, bool, int, float, str,
bytes, list and dict natively; every other type in the table travels as a
msgpack extension type whose code says which::

    1 int beyond 64 bits   2 tuple      3 set        4 frozenset   5 complex
    6 bytearray            7 datetime   8 date       9 time       10 timedelta
    11 Decimal            12 UUID      13 PurePath  14 enum member 15 dataclass
    16 numpy.ndarray

Enum members and dataclass instances name their class by module and
qualified name; the decoder looks them up through a `ClassLookup` (a worker
allows its ``--app`` modules only, a client any module it has imported) and
builds dataclasses without running their ``__init__``. numpy is needed
only where arrays are: it is imported to decode one (the only import a
peer's value can cause), never otherwise. Dict keys may be
any hashable value of the table. A value of any other type fails to encode
with an error naming the type.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import pathlib
import pickle
import struct
import sys
import threading
import uuid
from typing import Any, Callable

import msgpack

from .errors import ProtocolError

ClassLookup = Callable[[str, str], "type | None"]
"""(module, qualified name) -> the class, if decoding may build instances of it here."""

PAYLOAD_CONTAINERS = 1_000_000
"""Arrays, maps and extension values one payload may hold in all."""

INT, TUPLE, SET, FROZENSET, COMPLEX, BYTEARRAY, DATETIME, DATE, TIME, TIMEDELTA, DECIMAL, UUID, PATH, ENUM, \
    DATACLASS, NDARRAY, PICKLED_ARGS, PICKLED = range(1, 19)
"""Extension codes. PICKLED_ARGS (a call's ``(args, kwargs)``) and PICKLED (a result) are pickle, decoded
only where both ends opted in: a client's ``serializer="pickle"``, a worker's ``--accept-pickle``."""

NO_PICKLE = ("pickled data refused: this end did not opt in to pickle (a worker: --accept-pickle; a client: "
             "serializer='pickle'), which is only for fabrics that trust every peer, since unpickling runs "
             "code of the sender's choosing")

_PATHS: dict[str, type[pathlib.PurePath]] = {
    "PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
    "PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}
_CONCRETE: dict[type[pathlib.PurePath], type[pathlib.PurePath]] = (
    {pathlib.PurePosixPath: pathlib.PosixPath} if sys.platform != "win32" else
    {pathlib.PureWindowsPath: pathlib.WindowsPath})
"""A concrete path comes back concrete where it can (a PosixPath on a POSIX host), else pure."""
_COMPLEX = struct.Struct("<dd")


class UnsendableValue(TypeError):
    """A value whose type is not in the table."""


def imported_classes(module: str, qualname: str) -> type | None:
    """A `ClassLookup` for callers: any class defined in a module this process has imported."""
    return _find(sys.modules.get(module), module, qualname)


def classes_of(modules: Any) -> ClassLookup:
    """A `ClassLookup` for workers: classes of these modules only (as imported here already), or of the
    modules a ``module(name) -> module or None`` callable (a worker's `Registry.module`) gives."""
    if callable(modules):
        return lambda module, qualname: _find(modules(module), module, qualname)
    allowed = frozenset(modules)

    def lookup(module: str, qualname: str) -> type | None:
        return _find(sys.modules.get(module), module, qualname) if module in allowed else None
    return lookup


def _module_name(cls: type) -> str:
    """A class's module as its peers know it: a caller's script, loaded in a worker as ``__mp_main__``, is
    ``__main__`` to the caller."""
    return "__main__" if cls.__module__ == "__mp_main__" else cls.__module__


def _find(obj: Any, module: str, qualname: str) -> type | None:
    """The class ``qualname`` defined in module ``obj`` (named ``module`` by the peer), or None. Walks
    ``vars()``, not getattr (a module's __getattr__ may import: numpy's does), skips private names, and
    refuses a class only imported there from elsewhere."""
    if obj is None or len(qualname) > 256:
        return None
    for part in qualname.split("."):
        if part.startswith("_") or not hasattr(obj, "__dict__"):
            return None
        obj = vars(obj).get(part)
    if not isinstance(obj, type) or _module_name(obj) != module:
        return None
    return obj


# ---- encoding ---------------------------------------------------------------------------------

_local = threading.local()


def _packer() -> msgpack.Packer:
    try:
        return _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=_default)
        return packer


BIG_ARRAY_BYTES = 1 << 20
"""An array this large, not nested in another extension value, makes its payload be packed again in a
Packer of its own, whose buffer becomes the payload without the copy out of the thread's Packer."""


class _BigValue(Exception):
    """Raised by `_encode_array` in the thread's Packer: pack this payload with `_pack_big` instead."""


def _pack_top(value: Any) -> bytes | memoryview:
    """Pack a payload: bytes, or a memoryview of a Packer's own buffer when it holds a big array."""
    try:
        return _packer().pack(value)
    except _BigValue:
        _local.__dict__.pop("packer", None)  # it stopped mid-value
    packer = msgpack.Packer(use_bin_type=True, strict_types=True, default=_default, autoreset=False)
    _local.big = True
    try:
        packer.pack(value)
    finally:
        _local.big = False
    return packer.getbuffer()  # the view keeps its Packer (and buffer) alive as long as it is held


def _ext_type(code: int, data: bytes) -> msgpack.ExtType:
    """An ExtType without the type checks of its constructor (ours are right by construction; 3x cheaper)."""
    return _new_tuple(msgpack.ExtType, (code, data))


_new_tuple = tuple.__new__


def _mark(value: Any) -> Any:
    """A bytearray marked as one: msgpack packs it as bytes without asking `_default`. Only values at the
    top (a result, each argument) and the items of tuples and sets are looked at: a walk of every list
    would cost as much as packing it. A bytearray deeper in a list or dict arrives as bytes."""
    return _ext_type(BYTEARRAY, bytes(value)) if type(value) is bytearray else value


class PickledArgs:
    """A call's arguments that arrived pickled (and were unpickled because this end accepts pickle)."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs


def encode_call(function: str, args: Any, kwargs: dict[str, Any], options: dict[str, Any],
                pickled: bool = False) -> bytes | memoryview:
    """Encode a task call ``[function, args, kwargs, options]``, each argument with its type (hot: one call
    per task, so it packs itself rather than through `encode_value`); with ``pickled``, the arguments travel
    as one pickle instead."""
    if pickled:
        data = pickle.dumps((tuple(args), kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        return encode_value([function, [_ext_type(PICKLED_ARGS, data)], {}, options])
    args = [_mark(a) for a in args] if bytearray in map(type, args) else list(args)
    if kwargs and bytearray in map(type, kwargs.values()):
        kwargs = {k: _mark(v) for k, v in kwargs.items()}
    try:
        return _pack_top([function, args, kwargs, options])
    except Exception as exc:
        raise _unsendable(exc) from None


def encode_value(value: Any, pickled: bool = False) -> bytes | memoryview:
    """Encode one value; raises `UnsendableValue` naming the first type outside the table. With ``pickled``,
    the value travels as a pickle (a result of a pickled call)."""
    try:
        if pickled:
            return _packer().pack(_ext_type(PICKLED, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)))
        return _pack_top(_mark(value))
    except Exception as exc:
        raise _unsendable(exc) from None


def _unsendable(exc: Exception) -> Exception:
    _local.__dict__.pop("packer", None)  # a Packer that raised mid-value may hold a partial buffer
    if isinstance(exc, UnsendableValue) or not isinstance(exc, (TypeError, ValueError, OverflowError)):
        return exc
    return UnsendableValue(str(exc))


def _pack(value: Any) -> bytes:
    """Pack a value nested in an extension value (a tuple's items, say). The thread's Packer is in the
    middle of the outer value: each depth has a Packer of its own, kept (making one costs more than most
    small values)."""
    nested: list[msgpack.Packer] | None = getattr(_local, "nested", None)
    if nested is None:
        nested = _local.nested = []
    depth = getattr(_local, "depth", 0)
    if depth == len(nested):
        nested.append(msgpack.Packer(use_bin_type=True, strict_types=True, default=_default))
    _local.depth = depth + 1
    try:
        return nested[depth].pack(value)
    except BaseException:
        del nested[depth:]  # a Packer that raised mid-value may hold a partial buffer
        raise
    finally:
        _local.depth = depth


def _default(obj: Any) -> msgpack.ExtType:
    """The extension form of every non-native type of the table (msgpack calls it for nothing else)."""
    cls = type(obj)
    if cls is tuple:
        return _ext_type(TUPLE, _pack([_mark(item) for item in obj] if bytearray in map(type, obj) else list(obj)))
    if cls is int:  # beyond 64 bits (msgpack packs the others itself)
        return _ext_type(INT, obj.to_bytes((obj.bit_length() + 8) // 8, "big", signed=True))
    if cls is set or cls is frozenset:
        return _ext_type(SET if cls is set else FROZENSET, _pack([_mark(item) for item in obj]))
    if cls is dt.datetime:
        return _ext_type(DATETIME, obj.isoformat().encode())
    if cls is dt.date:
        return _ext_type(DATE, obj.isoformat().encode())
    if cls is dt.time:
        return _ext_type(TIME, obj.isoformat().encode())
    if cls is dt.timedelta:
        return _ext_type(TIMEDELTA, _pack([obj.days, obj.seconds, obj.microseconds]))
    if cls is complex:
        return _ext_type(COMPLEX, _COMPLEX.pack(obj.real, obj.imag))
    if cls is bytearray:
        return _ext_type(BYTEARRAY, bytes(obj))
    if cls is decimal.Decimal:
        return _ext_type(DECIMAL, str(obj).encode())
    if cls is uuid.UUID:
        return _ext_type(UUID, obj.bytes)
    if isinstance(obj, pathlib.PurePath):
        return _ext_type(PATH, _pack([cls.__name__ if cls.__name__ in _PATHS else
                                            ("PureWindowsPath" if isinstance(obj, pathlib.PureWindowsPath)
                                             else "PurePosixPath"), str(obj)]))
    if isinstance(obj, enum.Enum):
        return _ext_type(ENUM, _pack([_module_name(cls), cls.__qualname__, obj.name]))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj)]
        return _ext_type(DATACLASS, _pack([_module_name(cls), cls.__qualname__, fields,
                                                 [getattr(obj, name) for name in fields]]))
    if cls.__module__ == "numpy":
        if cls.__name__ == "ndarray":
            return _encode_array(obj)
        numpy = sys.modules["numpy"]
        if isinstance(obj, numpy.generic):  # a numpy scalar (numpy.float64 ...): a 0-d array, unwrapped
            return _encode_array(numpy.asarray(obj), scalar=True)
    if isinstance(obj, (int, str, bytes, float, list, dict)):  # subclasses: the type would be lost
        raise UnsendableValue(f"{cls.__module__}.{cls.__qualname__} (a subclass of {cls.__mro__[1].__name__}) "
                              "cannot be sent with its type; convert it to the base type")
    raise UnsendableValue(f"values of type {cls.__module__}.{cls.__qualname__} cannot be sent (not in zfabric's "
                          "value table: see the README); convert it, or send a dataclass of an app module")


def _encode_array(array: Any, scalar: bool = False) -> msgpack.ExtType:
    if array.dtype.hasobject:
        raise UnsendableValue("numpy arrays of dtype object cannot be sent (their items are Python objects)")
    if array.nbytes >= BIG_ARRAY_BYTES and not getattr(_local, "big", False) and not getattr(_local, "depth", 0):
        raise _BigValue
    contiguous = array if array.flags.c_contiguous else array.copy(order="C")
    header = _pack([array.dtype.str if array.dtype.fields is None else array.dtype.descr,
                    None if scalar else list(array.shape)])
    try:  # the bytes as a view: joined straight into the value (tobytes and a concatenation cost 15x more)
        body: Any = memoryview(contiguous.reshape(-1).view(sys.modules["numpy"].uint8))
    except (TypeError, ValueError):  # an itemsize of 0
        body = contiguous.tobytes()
    return _ext_type(NDARRAY, b"".join((struct.pack("<I", len(header)), header, body)))


# ---- decoding ---------------------------------------------------------------------------------


MAX_EXT_DEPTH = 64
"""Extension values (tuples in tuples, say) nested deeper than this are refused."""
SMALL_PAYLOAD = 4096
"""A payload this small cannot expand much: it is decoded without counting its containers (the hot path)."""


class _Decoder:
    """One payload's extension hook and container budget (shared by the values nested in it)."""

    __slots__ = ("lookup", "left", "counting", "depth", "accept_pickle")

    def __init__(self, lookup: ClassLookup | None, counting: bool, accept_pickle: bool = False) -> None:
        self.lookup = lookup
        self.accept_pickle = accept_pickle
        self.left = PAYLOAD_CONTAINERS
        self.counting = counting
        self.depth = 0

    def count(self, obj: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError("too many arrays, maps and extension values in one payload")
        return obj

    def unpack(self, data: Any) -> Any:
        if self.counting:
            return msgpack.unpackb(data, strict_map_key=False, ext_hook=self.ext, list_hook=self.count,
                                   object_pairs_hook=self.pairs)
        return msgpack.unpackb(data, strict_map_key=False, ext_hook=self.ext)

    def pairs(self, items: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """A map of a large payload: built here, after `_distinct_hashes` (msgpack would build it in C)."""
        self.count(None)
        _distinct_hashes([key for key, _ in items])
        return dict(items)

    def ext(self, code: int, data: bytes) -> Any:
        if self.counting:
            self.count(None)
        if self.depth >= MAX_EXT_DEPTH:  # each level is a nested unpackb: deep enough would overflow C's stack
            raise ValueError(f"extension values nested over {MAX_EXT_DEPTH} deep")
        self.depth += 1
        try:
            return self._ext(code, data)
        finally:
            self.depth -= 1

    def _ext(self, code: int, data: bytes) -> Any:
        if code == TUPLE:
            return tuple(self._list(data))
        if code == INT:
            return int.from_bytes(data, "big", signed=True)
        if code == SET:
            return set(_distinct_hashes(self._list(data)))
        if code == FROZENSET:
            return frozenset(_distinct_hashes(self._list(data)))
        if code == DATETIME:
            return dt.datetime.fromisoformat(data.decode())
        if code == DATE:
            return dt.date.fromisoformat(data.decode())
        if code == TIME:
            return dt.time.fromisoformat(data.decode())
        if code == TIMEDELTA:
            days, seconds, micros = self._ints(data, 3)
            return dt.timedelta(days, seconds, micros)
        if code == COMPLEX:
            return complex(*_COMPLEX.unpack(data))
        if code == BYTEARRAY:
            return bytearray(data)
        if code == DECIMAL:
            return decimal.Decimal(data.decode())
        if code == UUID:
            return uuid.UUID(bytes=data)
        if code == PATH:
            kind, text = self._list(data, 2)
            base = _PATHS.get(kind) if type(kind) is str and type(text) is str else None
            if base is None:
                raise ValueError(f"unknown path kind {kind!r}")
            return _CONCRETE.get(base, base)(text) if kind in ("PosixPath", "WindowsPath") else base(text)
        if code == ENUM:
            module, qualname, name = self._list(data, 3)
            cls = self._class(module, qualname)
            if not issubclass(cls, enum.Enum) or type(name) is not str or name not in cls.__members__:
                raise ValueError(f"{module}.{qualname} has no enum member {name!r}")
            return cls[name]
        if code == DATACLASS:
            return self._dataclass(*self._list(data, 4))
        if code == NDARRAY:
            return _decode_array(data, self)
        if code in (PICKLED_ARGS, PICKLED):
            if not self.accept_pickle:
                raise ValueError(NO_PICKLE)
            value = pickle.loads(data)
            if code == PICKLED:
                return value
            if (type(value) is not tuple or len(value) != 2 or type(value[0]) is not tuple
                    or type(value[1]) is not dict):
                raise ValueError("pickled arguments are not (args, kwargs)")
            return PickledArgs(list(value[0]), value[1])
        raise ValueError(f"unknown extension type {code}")

    def _list(self, data: bytes, n: int | None = None) -> list[Any]:
        items = self.unpack(data)
        if type(items) is not list or (n is not None and len(items) != n):
            raise ValueError("malformed extension value")
        return items

    def _ints(self, data: bytes, n: int) -> list[int]:
        items = self._list(data, n)
        if not all(type(i) is int for i in items):
            raise ValueError("malformed extension value")
        return items

    def _class(self, module: Any, qualname: Any) -> type:
        found = self.lookup(module, qualname) if (self.lookup and type(module) is str
                                                  and type(qualname) is str) else None
        if found is None:
            raise ValueError(f"class {module}.{qualname} is not one this process may build "
                             "(enums and dataclasses must come from the worker's --app modules)")
        return found

    def _dataclass(self, module: Any, qualname: Any, names: Any, values: Any) -> Any:
        cls = self._class(module, qualname)
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{module}.{qualname} is not a dataclass")
        fields = [f.name for f in dataclasses.fields(cls)]
        if names != fields or type(values) is not list or len(values) != len(fields):
            raise ValueError(f"fields {names!r} do not match dataclass {module}.{qualname} {fields!r}")
        obj = object.__new__(cls)
        for name, value in zip(fields, values):
            object.__setattr__(obj, name, value)  # as it was: no __init__ or __post_init__ runs here
        return obj


def _distinct_hashes(items: list[Any]) -> list[Any]:
    """``items``, if a set or dict of them cannot take quadratic time to build. Python's int (and float,
    tuple...) hashes are not randomised: 40,000 ints of equal hash take 27 s to put in a set, 0.04 s if
    their hashes differ. Counting distinct hashes is linear (equal hashes collapse at once)."""
    if len(items) > HASH_CHECK_ITEMS and len(set(map(hash, items))) < len(items) // 2:
        raise ValueError(f"{len(items)} set items or dict keys with only a few distinct hashes (a hash "
                         "collision attack?)")
    return items


HASH_CHECK_ITEMS = 1000
"""Sets and maps up to this size are built as they come (the worst case costs milliseconds)."""


def _decode_array(data: bytes, decoder: _Decoder) -> Any:
    try:
        import numpy  # the one module decoding may import: it is in the table, and only an array needs it
    except ImportError:
        raise ValueError("a numpy array arrived, but numpy is not installed here") from None
    if len(data) < 4:
        raise ValueError("malformed array")
    (n,) = struct.unpack_from("<I", data)
    dtype_spec, shape = decoder._list(data[4:4 + n], 2)
    dtype = numpy.dtype(dtype_spec if type(dtype_spec) is str else [tuple(f) for f in dtype_spec])
    scalar = shape is None
    shape = [] if scalar else shape
    if dtype.hasobject or type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError("malformed array header")
    body = memoryview(data)[4 + n:]
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(body):
        raise ValueError(f"array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, got {len(body)}")
    array = numpy.frombuffer(body, dtype=dtype).reshape(shape)
    return array[()] if scalar else array.copy()  # writable, and not holding the whole message




def decode_value(data: Any, lookup: ClassLookup | None = imported_classes, accept_pickle: bool = False) -> Any:
    """Decode one value; raises `ProtocolError` saying what was wrong. ``lookup`` decides which enum and
    dataclass classes may be built (None: none); pickle is refused unless ``accept_pickle``."""
    try:
        if accept_pickle:
            return _Decoder(lookup, counting=len(data) > SMALL_PAYLOAD, accept_pickle=True).unpack(data)
        if len(data) > SMALL_PAYLOAD:
            return _Decoder(lookup, counting=True).unpack(data)
        hooks: dict[Any, Callable[[int, bytes], Any]] | None = getattr(_local, "hooks", None)
        if hooks is None:  # per thread: a decoder counts its nesting depth
            hooks = _local.hooks = {}
        ext = hooks.get(lookup)  # the hot path: one call into msgpack, nothing per container
        if ext is None:
            if len(hooks) > 64:
                hooks.clear()
            ext = hooks[lookup] = _Decoder(lookup, counting=False).ext
        return msgpack.unpackb(data, strict_map_key=False, ext_hook=ext)
    except Exception as exc:  # msgpack and the hooks raise many types on bad input
        text = str(exc)
        raise ProtocolError(f"undecodable value ({type(exc).__name__}: "
                            f"{text if len(text) <= 200 else text[:197] + '...'})") from None
