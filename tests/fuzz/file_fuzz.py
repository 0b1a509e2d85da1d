"""Mutation fuzzing of the file loaders, one child process per batch of cases.

``python file_fuzz.py KIND SEED COUNT WORKDIR`` mutates a valid file of KIND (``npz``,
``npz-compressed``, ``pickle-conversations``, ``pickle-splits``) COUNT times (flipped bytes,
cuts, inserted and repeated spans), loads each mutant and classifies it: "loaded", "refused"
(a ValueError or FileNotFoundError whose message names the file) or "bad" (anything else).
Before each load it writes the case number to WORKDIR/current, so when the child dies from a
signal the parent knows which case killed it. It prints one JSON summary line.

The child runs under an address-space limit, so a loader that tries to allocate what a file
does not contain fails there, visibly, instead of exhausting the machine.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
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
    if kind.startswith("npz"):
        from mmkernels.experiments.data import MultiModalDataset

        return MultiModalDataset.load(path)
    from mmkernels.experiments.data import load_iemocap

    return load_iemocap(path)


# Pickles of a few bytes that ask for gigabytes: (bytes, what the refusal must say).
HOSTILE_PICKLES = {
    "memo index 2**31": (b"\x80\x02Nr\xff\xff\xff\x7f.", "memo index 2147483647"),
    "bytearray(2**36)": (b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\x00\x10"
                         b"\x85R.", "zero-filled buffer of 68719476736 bytes"),
    "list(range(2**36))": (b"\x80\x02c__builtin__\nlist\nc__builtin__\nxrange\n"
                           b"\x8a\x05\x00\x00\x00\x00\x10\x85R\x85R.",
                           "a range of 68719476736 elements"),
    "ndarray((2**36,))": (b"\x80\x02cnumpy\nndarray\n\x8a\x05\x00\x00\x00\x00\x10\x85R.",
                          "needs 512.0 GiB"),
    "_reconstruct(ndarray, (2**36,), 'b')": (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"\x8a\x05\x00\x00\x00\x00\x10\x85C\x01b\x87R.", "needs 64.0 GiB"),
    "bytes8 of 2**48 bytes": (b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\x00\x00.",
                              "only 1 remain"),
    "tuple nested 300,000 deep": (b"\x80\x02}" + b")" + b"\x85" * 300000 + b"K\x00s.",
                                  "nested deeper than 200"),
    "list(range(2**24)) 100 times from one memo": (
        b"\x80\x02(c__builtin__\nxrange\nJ\x00\x00\x00\x01\x85Rq\x010"
        + b"c__builtin__\nlist\nh\x01\x85R" * 100 + b"l.", "constructors would build"),
    "encode with another codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00"
                                  b"\x00\x00utf_7\x86R.", "encoding 'utf_7'"),
}


def hostile(workdir: Path) -> dict:
    """Load every HOSTILE_PICKLES entry; the error each raised (type and message)."""
    from mmkernels.experiments.data.safe_pickle import safe_load

    out = {}
    for name, (data, _) in HOSTILE_PICKLES.items():
        path = workdir / "hostile.pkl"
        path.write_bytes(data)
        (workdir / "current").write_text(name)
        try:
            out[name] = f"loaded {type(safe_load(path)).__name__}"
        except Exception as e:  # noqa: BLE001 - the parent checks type and message
            out[name] = f"{type(e).__name__}: {e}"
    return out


def main(kind: str, seed: int, count: int, workdir: Path) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    if kind == "hostile":
        return hostile(workdir)
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
