"""A restricted unpickler for data files (the IEMOCAP feature pickles).

``pickle.load`` runs whatever callable a file names, so loading a downloaded pickle is
running downloaded code. Data files need only containers, numbers, strings and numpy
arrays; :class:`RestrictedUnpickler` resolves exactly the globals those need and refuses
every other one *before* anything is called. Contents of object-dtype arrays are pickled
inline as ordinary objects, so they pass through the same check.

Refusing code is not enough: a few bytes of pickle can also ask for any amount of memory (a
memo index of 2**31 makes the C unpickler allocate a 16 GiB memo table, ``bytearray(10**11)``
or ``list(range(10**10))`` allocate on call, an array constructor can claim any shape) or time
(dict keys made to share one hash). So the opcode stream is scanned first
(``pickletools.genops``: every length must fit in the file, every memo index must be one the
stream could have made, and no dict or set may receive more than a few thousand keys whose
hash the file could choose), the allowed callables that could allocate by argument are
replaced by checked versions (an array built from a shape may not exceed the file), the file
must fit the memory budget (:mod:`mmkernels.memory`), and a ``MemoryError`` becomes the same
clear ``ValueError``. A path must name a regular file (a FIFO would block forever).

Python 2 era files (protocol <= 2) are supported: their module names (``__builtin__``,
``copy_reg``) are mapped to Python 3 ones before the check, and byte strings are decoded
with ``encoding="latin1"`` by default, which numpy needs to rebuild arrays from them.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import pickletools
import sys
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from mmkernels.memory import MemoryBudgetError, check_memory

from .files import open_regular_file

_HASH_MODULUS = sys.hash_info.modulus  # ints are hashed modulo this prime

# (module, name) pairs a data pickle may reference; everything else is refused.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # numpy arrays, dtypes and scalars (numpy 1.x and 2.x module paths)
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # bytes pickled by Python 3 at protocol <= 2 come back through _codecs.encode
        ("_codecs", "encode"),
        # containers and plain value types
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "range"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "str"),
        ("builtins", "bytes"),
        ("builtins", "bool"),
    }
)


class RefusedGlobalError(pickle.UnpicklingError, ValueError):
    """A pickle referenced a global outside :data:`ALLOWED_GLOBALS` (nothing was run)."""


class RefusedCallError(pickle.UnpicklingError, ValueError):
    """A pickle called an allowed callable with arguments no data file needs (memory its
    bytes do not contain, a codec other than latin1); nothing was allocated."""


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 location of a (module, name) that a Python 2 pickle may use."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that only resolves :data:`ALLOWED_GLOBALS`.

    Args:
        file: a binary file object.
        source: a name for error messages (usually the file path).
        encoding: how to decode Python 2 ``str`` objects; "latin1" keeps numpy arrays
            intact.
        size: the pickle's length in bytes, which sets how much its constructors may build
            (0: only a fixed floor, and no array from a shape). :func:`safe_load` passes it.
    """

    def __init__(self, file: IO[bytes], *, source: str = "<pickle>", encoding: str = "latin1",
                 size: int = 0):
        super().__init__(file, encoding=encoding)
        self.source = source
        self.allowance = _Allowance(source, size)

    def find_class(self, module: str, name: str) -> Any:
        py3 = _py3_name(module, name)
        if py3 not in ALLOWED_GLOBALS:
            raise RefusedGlobalError(
                f"refusing to load {py3[0]}.{py3[1]} from {self.source}: only containers, "
                "numbers, strings and numpy arrays are allowed"
            )
        found = super().find_class(module, name)
        return _checked(py3, found, self.source, self.allowance)


# Longest range a pickle may build: far more than any data file's index needs, far less than
# what would exhaust memory once a list() or set() walks it.
_MAX_RANGE = 1 << 24
# Deepest nesting of containers a data file may have; CPython's C code recurses without a
# guard on some of them (hashing a tuple nested 300,000 deep crashes the interpreter).
_MAX_DEPTH = 200
# Elements or bytes the allowed constructors may produce per byte of pickle (plus a floor):
# a memoised object can be fed to list(), bytes(), ... again for a few bytes each time.
_COPIES_PER_BYTE, _COPIES_FLOOR = 16, 1 << 22


class _Allowance:
    """What the allowed constructors of one load have produced so far, against its limit."""

    def __init__(self, source: str, size: int) -> None:
        self.source, self.size, self.used = source, size, 0
        self.limit = _COPIES_PER_BYTE * size + _COPIES_FLOOR

    def charge(self, label: str, amount: int) -> None:
        self.used += amount
        if self.used > self.limit:
            raise RefusedCallError(
                f"{self.source}: refusing {label}: the pickle's constructors would build "
                f"{self.used} elements or bytes, more than the {self.limit} allowed for "
                f"{self.size} bytes of pickle (a corrupt or hostile pickle)")


_COPYING = {("builtins", n) for n in ("list", "tuple", "set", "frozenset", "dict", "bytes",
                                      "bytearray", "str")}


def _checked(name: tuple[str, str], fn: Any, source: str, allowance: _Allowance) -> Any:
    """``fn`` itself, or a wrapper that refuses the arguments that would allocate memory the
    file does not contain."""
    label = f"{name[0]}.{name[1]}"

    def refuse(why: str) -> RefusedCallError:
        return RefusedCallError(f"{source}: refusing {label}: {why} (a corrupt or "
                                "hostile pickle)")

    if name in _COPYING:
        def copying(*args: Any, **kw: Any) -> Any:
            if args and isinstance(args[0], int) and name[1] in ("bytes", "bytearray"):
                raise refuse(f"asks for a zero-filled buffer of {args[0]} bytes")
            if args and hasattr(args[0], "__len__"):
                allowance.charge(label, len(args[0]))  # before the copy is made
            return fn(*args, **kw)
        return copying
    if name == ("builtins", "range"):
        def bounded(*args: Any) -> Any:
            r = fn(*args)
            if r.__len__() > _MAX_RANGE:
                raise refuse(f"a range of {len(r)} elements")
            return r
        return bounded
    if name == ("_codecs", "encode"):
        def latin1(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> Any:
            if encoding not in ("latin1", "latin-1"):  # what Python 3 pickles of bytes use
                raise refuse(f"encoding {encoding!r}")
            allowance.charge(label, len(obj))
            return fn(obj, encoding, errors)
        return latin1
    if name[1] in ("ndarray", "_reconstruct"):
        return _checked_array(fn, label, source, allowance)
    return fn


def _checked_array(fn: Callable[..., Any], label: str, source: str,
                   allowance: _Allowance) -> Callable[..., Any]:
    """ndarray(shape, dtype) and numpy's _reconstruct(cls, shape, dtype) allocate the shape's
    bytes before any data arrives; numpy's own pickles pass shape (0,). An array the file
    could not fill (more bytes than the whole pickle) is refused whatever the memory budget:
    115 bytes asking for ndarray((2**25, 4)) built a gigabyte of zeros. (The data that
    follows, __setstate__'s bytes, is referenced rather than copied, so a memoised buffer
    shared by many arrays costs nothing more.)"""
    reconstruct = label.endswith("_reconstruct")

    def call(*args: Any, **kw: Any) -> Any:
        if reconstruct and args and getattr(args[0], "__wrapped__", None) is np.ndarray:
            args = (np.ndarray, *args[1:])  # the class argument is our checked ndarray
        at = 1 if reconstruct else 0
        shape = args[at] if len(args) > at else kw.get("shape", ())
        dtype = args[at + 1] if len(args) > at + 1 else kw.get("dtype", float)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(int(d) for d in dims) * np.dtype(dtype).itemsize
        if nbytes > allowance.size:
            raise RefusedCallError(f"{source}: refusing {label}{dims}: an array of {nbytes} "
                                   f"bytes that the {allowance.size} bytes of the pickle "
                                   "cannot hold (a corrupt or hostile pickle)")
        check_memory(f"{source}: {label}{dims}", nbytes)
        return fn(*args, **kw)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


_MEMO_PUT = ("PUT", "BINPUT", "LONG_BINPUT")
_MUTATORS = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")
_MEMO_GET = ("GET", "BINGET", "LONG_BINGET")
_STRINGS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES",
                      "BINBYTES8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"})
_INTS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_CONSTANTS = frozenset({"FLOAT", "BINFLOAT", "NONE", "NEWTRUE", "NEWFALSE", "EMPTY_TUPLE"})
_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"})
# Most keys whose hash the file's author could choose that one dict or set may receive. Python
# hashes ints modulo 2^61 - 1 and tuples of numbers by an invertible mix, so such keys can be
# made to share one hash, and every insertion then compares with all the earlier ones: 50,000
# of them (900 KB of pickle) took 33 s. Strings and bytes are hashed with a per-process random
# key and small ints and floats by value, so they cannot be made to collide in numbers.
_MAX_CRAFTABLE_KEYS = 1 << 12


class _Item:
    """What the scan knows of one object on the unpickler's stack: how deep containers nest
    in it; whether its hash is salted (str, bytes, or a tuple holding one); whether its hash
    could be chosen (a big int, a tuple of numbers, anything built by a call); and how many
    such values it holds directly (``holds``: a list's or tuple's items, a dict's keys) or
    through one of its items (``inner``)."""

    __slots__ = ("depth", "salted", "craftable", "holds", "inner")

    def __init__(self, depth: int, salted: bool, craftable: bool, holds: int = 0,
                 inner: int = 0) -> None:
        self.depth, self.salted, self.craftable = depth, salted, craftable
        self.holds, self.inner = holds, inner


_MARK = object()  # a MARK on the simulated stack
# name -> (takes a MARK, items taken below it or without one, entries pushed)
_SHAPES = {op.name: (pickletools.markobject in op.stack_before,
                     op.stack_before.index(pickletools.markobject)
                     if pickletools.markobject in op.stack_before else len(op.stack_before),
                     tuple(op.stack_after)) for op in pickletools.opcodes}


def _check_keys(count: int) -> None:
    if count > _MAX_CRAFTABLE_KEYS:
        raise ValueError(f"a dict or set receives more than {_MAX_CRAFTABLE_KEYS} keys whose "
                         "hash could be chosen (big ints, tuples of numbers, constructed "
                         "objects): keys made to share one hash would make loading take "
                         "quadratic time (corrupt or hostile)")


def _scan(data: bytes) -> None:
    """Walk the opcodes without building anything, tracking how each stack item nests and
    what its hash could be: a length beyond the end of the data, a memo index the stream
    could not have made, nesting deeper than _MAX_DEPTH, or a dict or set given more than
    _MAX_CRAFTABLE_KEYS keys of a choosable hash means corrupt or hostile bytes. (Written
    for speed: it visits every opcode of files of hundreds of megabytes.)"""
    stack: list[Any] = []  # _Item or _MARK
    memo: dict[int, _Item] = {}
    # Leaves are never containers, so one item each serves them all (a malformed stream that
    # mutates one only makes the rest of its own scan stricter).
    leaf_str, leaf_num, leaf_big = _Item(0, True, False), _Item(0, False, False), \
        _Item(0, False, True)
    for ops, (op, arg, _) in enumerate(pickletools.genops(data), start=1):
        name = op.name
        if name in _STRINGS:
            stack.append(leaf_str)
            continue
        if name in _INTS:
            big = isinstance(arg, int) and abs(arg) >= _HASH_MODULUS
            stack.append(leaf_big if big else leaf_num)
            continue
        if name in _CONSTANTS:
            stack.append(leaf_num)
            continue
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in _MEMO_PUT or name in _MEMO_GET:
            if not isinstance(arg, int) or arg < 0 or arg > ops:
                raise ValueError(f"memo index {arg} after {ops} opcodes (corrupt or hostile)")
        if name in _MEMO_PUT or name == "MEMOIZE":
            top = stack[-1] if stack and stack[-1] is not _MARK else leaf_num
            memo[arg if name != "MEMOIZE" else len(memo)] = top
            continue
        if name in _MEMO_GET:
            stack.append(memo.get(arg, leaf_num))
            continue
        if name == "DUP":
            stack.append(stack[-1] if stack else leaf_num)
            continue
        has_mark, below, after = _SHAPES[name]
        popped: list[_Item] = []
        if has_mark:
            while stack and stack[-1] is not _MARK:
                popped.append(stack.pop())
            if stack:
                stack.pop()
        for _ in range(below):
            if stack and stack[-1] is not _MARK:
                popped.append(stack.pop())
            elif stack:
                stack.pop()
        items = popped[::-1]  # in stream order
        depth, holds, inner, salted = -1, 0, 0, False
        if name in _MUTATORS and items:  # the container (first) gains the other items
            result, items = items[0], items[1:]
            gained = items[0::2] if name in ("SETITEM", "SETITEMS") else \
                () if name == "BUILD" else items  # a dict's keys; a list's or set's items
            for c in items:
                depth, inner = max(depth, c.depth), max(inner, c.holds)
            result.depth = depth = max(result.depth, depth + 1)
            result.holds += sum(c.craftable for c in gained)
            result.inner = max(result.inner, inner)
            if name in ("SETITEM", "SETITEMS", "ADDITEMS"):
                _check_keys(result.holds)
        else:  # a new object holding what it consumed
            for c in items:
                depth, inner = max(depth, c.depth), max(inner, c.holds, c.inner)
                holds += c.craftable
                salted = salted or c.salted
            depth += 1
            if name in _TUPLES:  # a tuple's hash mixes its items' invertibly
                craftable = not salted and (len(items) > 1 or holds > 0)
                result = _Item(depth, salted, craftable, holds, inner)
            else:
                result = _Item(depth, False, True, holds, inner)
            if name == "DICT":
                _check_keys(sum(c.craftable for c in items[0::2]))
            elif name == "FROZENSET":
                _check_keys(holds)
            elif name in _CALLS:  # set(list), frozenset(list), dict(pairs), ...
                _check_keys(inner)
        if depth > _MAX_DEPTH:
            raise ValueError(f"containers nested deeper than {_MAX_DEPTH} (corrupt or hostile)")
        for entry in after:
            stack.append(_MARK if entry is pickletools.markobject else result)


def safe_load(file: str | os.PathLike[str] | IO[bytes], *, encoding: str = "latin1") -> Any:
    """Unpickle one object from a path or binary file with :class:`RestrictedUnpickler`.

    Raises:
        FileNotFoundError: the path does not exist.
        RefusedGlobalError: (a ValueError) the pickle names a global outside the allowlist.
        ValueError: the path is not a regular file (a FIFO would block forever), or the data
            is truncated or corrupt; the message names the file.
    """
    if isinstance(file, (str, os.PathLike)):
        source = os.fspath(file)
        with open_regular_file(source, "pickle file") as f:
            return _load(f, source, encoding)
    return _load(file, getattr(file, "name", "<stream>"), encoding)


def safe_loads(data: bytes, *, encoding: str = "latin1", source: str = "<bytes>") -> Any:
    """Like :func:`safe_load` for a bytes object."""
    return _load(io.BytesIO(data), source, encoding)


def _load(f: IO[bytes], source: str, encoding: str) -> Any:
    try:
        size = os.fstat(f.fileno()).st_size - f.tell()
    except (OSError, AttributeError, io.UnsupportedOperation):
        size = None
    if size is not None:
        # The bytes, then the objects built from them: about twice the file.
        check_memory(f"{source}: reading and unpickling {size} bytes", 2 * size)
    data = f.read()
    try:
        _scan(data)
        return RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding,
                                   size=len(data)).load()
    except MemoryError as e:
        raise ValueError(f"{source}: corrupt or hostile pickle: it asks for more memory "
                         "than the machine has") from e
    except (RefusedGlobalError, RefusedCallError, MemoryBudgetError):
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        OverflowError,
        LookupError,  # an unknown encoding named in the stream
        ImportError,  # numpy 2's module paths under numpy 1
        SystemError,  # CPython's C unpickler on some malformed streams (found by fuzzing)
    ) as e:
        # A cut-off download typically ends in EOFError or "pickle data was truncated";
        # garbage bytes give any of the others. None of them is the caller's bug.
        raise ValueError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
