"""A restricted unpickler for data files (the IEMOCAP feature pickles).

``pickle.load`` runs whatever callable a file names, so loading a downloaded pickle is
running downloaded code. Data files need only containers, numbers, strings and numpy
arrays; :class:`RestrictedUnpickler` resolves exactly the globals those need and refuses
every other one *before* anything is called. Contents of object-dtype arrays are pickled
inline as ordinary objects, so they pass through the same check.

Refusing code is not enough: a few bytes of pickle can also ask for any amount of memory (a
memo index of 2**31 makes the C unpickler allocate a 16 GiB memo table, ``bytearray(10**11)``
or ``list(range(10**10))`` allocate on call, an array header can claim any shape). So the
opcode stream is scanned first (``pickletools.genops``: every length must fit in the file and
every memo index must be one the stream could have made), the allowed callables that could
allocate by argument are replaced by checked versions, the file must fit the memory budget
(:mod:`mmkernels.memory`), and a ``MemoryError`` becomes the same clear ``ValueError``.

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
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from mmkernels.memory import MemoryBudgetError, check_memory

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
            (0: only a fixed floor). :func:`safe_load` passes it.
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
        return _checked_array(fn, label, source)
    return fn


def _checked_array(fn: Callable[..., Any], label: str, source: str) -> Callable[..., Any]:
    """ndarray(shape, dtype) and numpy's _reconstruct(cls, shape, dtype) allocate the shape's
    bytes before any data arrives; numpy's own pickles pass shape (0,). (The data that
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
        check_memory(f"{source}: {label}{dims}", nbytes)
        return fn(*args, **kw)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


_MEMO_PUT = ("PUT", "BINPUT", "LONG_BINPUT")
_MUTATORS = ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")
_MEMO_GET = ("GET", "BINGET", "LONG_BINGET")


def _scan(data: bytes) -> None:
    """Walk the opcodes without building anything, tracking how deep each stack item nests:
    a length beyond the end of the data, a memo index the stream could not have made, or
    nesting deeper than _MAX_DEPTH means corrupt or hostile bytes."""
    mark = -1  # a MARK on the simulated stack; other entries are nesting depths
    stack: list[int] = []
    memo: dict[int, int] = {}
    for ops, (op, arg, _) in enumerate(pickletools.genops(data), start=1):
        if op.name in _MEMO_PUT or op.name in _MEMO_GET:
            if not isinstance(arg, int) or arg < 0 or arg > ops:
                raise ValueError(f"memo index {arg} after {ops} opcodes (corrupt or hostile)")
        if op.name in _MEMO_PUT or op.name == "MEMOIZE":
            memo[arg if op.name != "MEMOIZE" else len(memo)] = stack[-1] if stack else 0
            continue
        if op.name in _MEMO_GET:
            stack.append(memo.get(arg, 0))
            continue
        if op.name == "DUP":
            stack.append(stack[-1] if stack else 0)
            continue
        before, popped = list(op.stack_before), []
        if pickletools.markobject in before:
            while stack and stack[-1] != mark:
                popped.append(stack.pop())
            if stack:
                stack.pop()
            before = before[:before.index(pickletools.markobject)]
        for _ in before:
            if stack:
                popped.append(stack.pop())
        popped = [d for d in popped if d != mark]
        if op.name in _MUTATORS and popped:  # the container (popped last) gains its items
            depth = max(popped[-1], max(popped[:-1], default=-1) + 1)
        else:  # a new object holding what it consumed
            depth = max(popped, default=-1) + 1
        if depth > _MAX_DEPTH:
            raise ValueError(f"containers nested deeper than {_MAX_DEPTH} (corrupt or hostile)")
        for item in op.stack_after:
            stack.append(mark if item is pickletools.markobject else depth)


def safe_load(file: str | os.PathLike[str] | IO[bytes], *, encoding: str = "latin1") -> Any:
    """Unpickle one object from a path or binary file with :class:`RestrictedUnpickler`.

    Raises:
        FileNotFoundError: the path does not exist.
        RefusedGlobalError: (a ValueError) the pickle names a global outside the allowlist.
        ValueError: the data is truncated or corrupt; the message names the file.
    """
    if isinstance(file, (str, os.PathLike)):
        source = os.fspath(file)
        with open(source, "rb") as f:
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
