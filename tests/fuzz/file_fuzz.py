"""Mutation fuzzing of the file loaders, one child process per batch of cases.

``python file_fuzz.py KIND SEED COUNT WORKDIR`` mutates a valid file of KIND (``npz``,
``npz-compressed``, ``pickle-conversations``, ``pickle-splits``) COUNT times (flipped bytes,
cuts, inserted and repeated spans), loads each mutant and classifies it: "loaded", "refused"
(a ValueError or FileNotFoundError whose message names the file) or "bad" (anything else).
A mutant that loads must also keep the loader's promise: its features and labels, converted
to the float32 the sweep trains in, are finite (or the conversion refuses them by name).
Before each load it writes the case number to WORKDIR/current, so when the child dies from a
signal the parent knows which case killed it. It prints one JSON summary line.

KIND ``hostile`` loads the crafted pickles of HOSTILE_PICKLES (with the seconds each took);
KIND ``odd`` the crafted files of odd_files() (FIFOs, foreign dtypes, labels and shapes no
model can take), each under an alarm so that a hang kills the child visibly.

The child runs under an address-space limit, so a loader that tries to allocate what a file
does not contain fails there, visibly, instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np

ADDRESS_SPACE_LIMIT = 6 << 30  # torch and numpy map ~2 GiB of address space at import
KINDS = ("npz", "npz-compressed", "pickle-conversations", "pickle-splits")


def valid_file(kind: str, path: Path) -> None:
    """A small valid file of ``kind`` at ``path``."""
    rng = np.random.default_rng(0)
    if kind.startswith("npz"):
        from mmkernels.experiments.data import MultiModalDataset

        n = 12
        mods = {"text": rng.normal(size=(n, 3)).astype(np.float32),
                "audio": rng.normal(size=(n, 2)).astype(np.float32)}
        presence = np.ones((n, 2), dtype=bool)
        presence[0, 1] = False
        ds = MultiModalDataset(mods, np.arange(n) % 3, task="classification",
                               presence=presence, split=np.where(np.arange(n) < 8, "train",
                                                                 "test"))
        ds.save(path, compress=kind == "npz-compressed")
        return
    if kind == "pickle-conversations":
        vids = {"c1": 3, "c2": 2}
        labels = {v: [int(x) for x in rng.integers(0, 6, m)] for v, m in vids.items()}
        feats = [{v: rng.normal(size=(m, d)).astype(np.float32) for v, m in vids.items()}
                 for d in (4, 3, 5)]
        names = {v: [f"u{i}" for i in range(m)] for v, m in vids.items()}
        obj = (names, names, labels, *feats, names, ["c1"], ["c2"])
    else:
        obj = {"train": {"text": rng.normal(size=(6, 4)), "audio": rng.normal(size=(6, 3)),
                         "vision": rng.normal(size=(6, 5)), "labels": rng.integers(0, 6, 6)},
               "test": {"text": rng.normal(size=(3, 4)), "audio": rng.normal(size=(3, 3)),
                        "vision": rng.normal(size=(3, 5)), "labels": rng.integers(0, 6, 3)}}
    path.write_bytes(pickle.dumps(obj, protocol=2 if "conv" in kind else 4))


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to four random edits of ``data``."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = rng.integers(0, 5)
        at = int(rng.integers(0, max(1, len(buf))))
        if op == 0 and buf:  # flip bits of a byte
            buf[at] ^= int(rng.integers(1, 256))
        elif op == 1:  # cut the file short
            del buf[at:]
        elif op == 2:  # insert random bytes
            buf[at:at] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 3 and buf:  # delete a span
            del buf[at:at + int(rng.integers(1, 32))]
        elif op == 4 and buf:  # overwrite with a boundary integer (lengths, shapes, indices)
            value = rng.choice([0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 2**63 - 1])
            buf[at:at + 8] = int(value).to_bytes(8, "little")
    return bytes(buf)


def load(kind: str, path: Path) -> object:
    """The dataset in ``path``, converted as the sweep will use it; a conversion that finds a
    value that is not finite in float32 must refuse it (a ValueError, here given the path)."""
    import torch

    from mmkernels.experiments.data import MultiModalDataset, load_iemocap

    ds = MultiModalDataset.load(path) if kind.startswith("npz") else load_iemocap(path)
    try:
        tensors = [*ds.to_torch(), ds.torch_labels()]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{path}: loaded, but a float32 tensor is not finite")
    return ds


# Pickles of a few bytes that ask for gigabytes: (bytes, what the refusal must say).
HOSTILE_PICKLES = {
    "memo index 2**31": (b"\x80\x02Nr\xff\xff\xff\x7f.", "memo index 2147483647"),
    "bytearray(2**36)": (b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\x00\x10"
                         b"\x85R.", "zero-filled buffer of 68719476736 bytes"),
    "list(range(2**36))": (b"\x80\x02c__builtin__\nlist\nc__builtin__\nxrange\n"
                           b"\x8a\x05\x00\x00\x00\x00\x10\x85R\x85R.",
                           "a range of 68719476736 elements"),
    "ndarray((2**36,))": (b"\x80\x02cnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00\x10\x85R.",
                          "an array of 549755813888 bytes that the 27 bytes"),
    "_reconstruct(ndarray, (2**36,), 'b')": (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"\x8a\x05\x00\x00\x00\x00\x10\x85C\x01b\x87R.", "an array of 68719476736 bytes"),
    # Within any memory budget, but not what 28 bytes hold: a gigabyte of zeros.
    "ndarray((2**25, 4)) in 28 bytes": (
        b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x02K\x04\x86\x85R.",
        "an array of 1073741824 bytes that the 28 bytes of the pickle cannot hold"),
    "bytes8 of 2**48 bytes": (b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\x00\x00.",
                              "only 1 remain"),
    "tuple nested 300,000 deep": (b"\x80\x02}" + b")" + b"\x85" * 300000 + b"K\x00s.",
                                  "nested deeper than 200"),
    "list(range(2**24)) 100 times from one memo": (
        b"\x80\x02(c__builtin__\nxrange\nJ\x00\x00\x00\x01\x85Rq\x010"
        + b"c__builtin__\nlist\nh\x01\x85R" * 100 + b"l.", "constructors would build"),
    "encode with another codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00"
                                  b"\x00\x00utf_7\x86R.", "encoding 'utf_7'"),
    # Keys that share one hash (ints are hashed modulo 2^61 - 1): each insertion compares
    # with every earlier key, 33 s for 900 KB. Refused before a key is inserted.
    "dict of 50,000 colliding int keys": (
        b"\x80\x04}(" + b"".join(b"\x8a\x0b" + (k * sys.hash_info.modulus).to_bytes(
            11, "little", signed=True) + b"K\x00" for k in range(1, 50_001)) + b"u.",
        "keys whose hash could be chosen"),
    "set of 50,000 colliding int keys": (
        b"\x80\x04\x8f(" + b"".join(b"\x8a\x0b" + (k * sys.hash_info.modulus).to_bytes(
            11, "little", signed=True) for k in range(1, 50_001)) + b"\x90.",
        "keys whose hash could be chosen"),
    "set(list of 50,000 colliding ints) at protocol 2": (
        b"\x80\x02c__builtin__\nset\n(" + b"".join(b"\x8a\x0b" + (
            k * sys.hash_info.modulus).to_bytes(11, "little", signed=True)
            for k in range(1, 50_001)) + b"l\x85R.", "keys whose hash could be chosen"),
}
# The longest a crafted pickle may take to be refused (seconds; the colliding keys took 33 s).
HOSTILE_SECONDS = 5.0


def hostile(workdir: Path) -> dict:
    """Load every HOSTILE_PICKLES entry; the error each raised (type and message)."""
    from mmkernels.experiments.data.safe_pickle import safe_load

    out = {}
    for name, (data, _) in HOSTILE_PICKLES.items():
        path = workdir / "hostile.pkl"
        path.write_bytes(data)
        (workdir / "current").write_text(name)
        t0 = time.perf_counter()
        try:
            got = f"loaded {type(safe_load(path)).__name__}"
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            got = f"{type(e).__name__}: {e}"
        out[name] = {"result": got, "seconds": time.perf_counter() - t0}
    return out


def _npz(path: Path, arrays: dict, modalities: list[str] | None = None,
         task: str = "classification") -> None:
    """A dataset file written member by member, past MultiModalDataset's own checks."""
    names = modalities if modalities is not None else \
        [k.split("/", 1)[1] for k in arrays if k.startswith("modality/")]
    meta = {"format": "mmkernels.MultiModalDataset", "version": 1, "modalities": names,
            "task": task, "label_names": None, "info": {}}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def odd_files(workdir: Path) -> dict[str, tuple[str, Path, str]]:
    """name -> (loader, path, what the refusal must say besides the path): files a loader
    must refuse with a ValueError naming the file (and the key), never a hang or a crash."""
    fifo = workdir / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    n = 6
    ok = np.ones((n, 2), np.float32)
    labels = np.arange(n) % 2
    cases = {
        "npz FIFO": ("npz", fifo, "a FIFO, not a regular file"),
        "pickle FIFO": ("pickle", fifo, "a FIFO, not a regular file"),
        "npz folder": ("npz", workdir, "a folder, not a regular file"),
        "/dev/zero as pickle": ("pickle", Path("/dev/zero"), "a character device"),
        "big-endian modality": ("npz", {"modality/a": ok.astype(">f4"), "labels": labels},
                                "modality 'a': expected the machine's byte order, got >f4"),
        "longdouble modality": ("npz", {"modality/a": ok.astype(np.longdouble),
                                        "labels": labels},
                                "modality 'a': expected float16, float32 or float64"),
        "big-endian regression labels": (
            "npz-regression", {"modality/a": ok, "labels": labels.astype(">f8")},
            "labels: expected the machine's byte order, got >f8"),
        "a label of 10^9": ("npz", {"modality/a": ok, "labels": labels * 10**9},
                            "labels: class ids must be < 65536"),
        "a modality of width 0": ("npz", {"modality/a": np.ones((n, 0), np.float32),
                                          "labels": labels},
                                  "modality 'a': expected at least one feature column"),
        "float64 beyond float32": ("npz", {"modality/a": np.full((n, 2), 1e39),
                                           "labels": labels},
                                   "modality 'a': 12 values are finite in float64 but "
                                   "overflow float32"),
        "ndarray((2**25, 4)) as IEMOCAP features": ("pickle", (
            b"\x80\x02}(X\x04\x00\x00\x00text" + HOSTILE_PICKLES[
                "ndarray((2**25, 4)) in 28 bytes"][0][2:-1] + b"X\x05\x00\x00\x00audio"
            b"]X\x06\x00\x00\x00vision]X\x06\x00\x00\x00labels]u."), "cannot hold"),
    }
    out = {}
    for name, (loader, what, says) in cases.items():
        if isinstance(what, Path):
            out[name] = (loader, what, says)
            continue
        path = workdir / (name.replace(" ", "_").replace("/", "_") +
                          (".pkl" if loader == "pickle" else ".npz"))
        if isinstance(what, bytes):
            path.write_bytes(what)
        else:
            _npz(path, what, task="regression" if loader == "npz-regression" else
                 "classification")
        out[name] = ("npz" if loader.startswith("npz") else loader, path, says)
    return out


def odd(workdir: Path) -> dict:
    """Load every odd_files() case under a 20 s alarm; the error each raised, and whether
    it is a ValueError."""
    out = {}
    for name, (loader, path, _) in odd_files(workdir).items():
        (workdir / "current").write_text(name)
        signal.alarm(20)  # a hang dies of SIGALRM, and the parent names the case
        try:
            load("npz" if loader == "npz" else "pickle-splits", path)
            got = {"value_error": False, "error": "loaded"}
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            got = {"value_error": isinstance(e, ValueError), "error": f"{type(e).__name__}: {e}"}
        finally:
            signal.alarm(0)
        out[name] = got
    return out


def main(kind: str, seed: int, count: int, workdir: Path) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    if kind == "hostile":
        return hostile(workdir)
    if kind == "odd":
        return odd(workdir)
    original = workdir / f"valid-{kind}"
    valid_file(kind, original)
    load(kind, original)  # the unmutated file must load
    data = original.read_bytes()
    rng = np.random.default_rng(seed)
    counts = {"loaded": 0, "refused": 0, "bad": 0}
    bad: list[dict] = []
    target = workdir / f"mutant-{kind}"
    current = workdir / "current"
    for case in range(count):
        mutant = mutate(data, rng)
        target.write_bytes(mutant)
        current.write_text(str(case))
        try:
            load(kind, target)
            outcome = "loaded"
        except (ValueError, FileNotFoundError) as e:
            outcome = "refused" if str(target) in str(e) else "bad"
            if outcome == "bad":
                bad.append({"case": case, "error": f"{type(e).__name__}: {e}"[:300]})
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            outcome = "bad"
            bad.append({"case": case, "error": f"{type(e).__name__}: {e}"[:300]})
        counts[outcome] += 1
    return {"kind": kind, "seed": seed, "count": count, **counts, "findings": bad[:10]}


if __name__ == "__main__":
    os.environ.setdefault("MMKERNELS_MEMORY_BUDGET", str(1 << 30))
    kind_, seed_, count_, workdir_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(json.dumps(main(kind_, seed_, count_, Path(workdir_))))
