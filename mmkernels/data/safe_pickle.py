"""A restricted unpickler for data files (the IEMOCAP feature pickles).

``pickle.load`` runs whatever callable a file names, so loading a downloaded pickle is
running downloaded code. Data files need only containers, numbers, strings and numpy
arrays; :class:`RestrictedUnpickler` resolves exactly the globals those need and refuses
every other one *before* anything is called. Contents of object-dtype arrays are pickled
inline as ordinary objects, so they pass through the same check.

Python 2 era files (protocol <= 2) are supported: their module names (``__builtin__``,
``copy_reg``) are mapped to Python 3 ones before the check, and byte strings are decoded
with ``encoding="latin1"`` by default, which numpy needs to rebuild arrays from them.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
from typing import IO, Any

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
    """

    def __init__(self, file: IO[bytes], *, source: str = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        py3 = _py3_name(module, name)
        if py3 not in ALLOWED_GLOBALS:
            raise RefusedGlobalError(
                f"refusing to load {py3[0]}.{py3[1]} from {self.source}: only containers, "
                "numbers, strings and numpy arrays are allowed"
            )
        return super().find_class(module, name)


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
        return RestrictedUnpickler(f, source=source, encoding=encoding).load()
    except RefusedGlobalError:
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
    ) as e:
        # A cut-off download typically ends in EOFError or "pickle data was truncated";
        # garbage bytes give any of the others. None of them is the caller's bug.
        raise ValueError(f"{source}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
