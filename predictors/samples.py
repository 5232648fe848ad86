"""Chunked on-disk store of (FFN input x, active mask) samples, one stream per layer.

Layout of a store directory:
  manifest.json                      the committed chunks (the only source of truth, see below)
  layer_{i:03d}/chunk_{k:06d}.npz    uncompressed npz with
        `x`    (n, d)          float16, or uint16 holding bfloat16 bits (manifest `x_dtype`)
        `mask` (n, ceil(f/8))  uint8, `np.packbits(active, axis=1)` (big bit order; pad bits are 0)

manifest.json:
  {"format": "hybrid-samples", "version": 1, "n_layers": L, "dim": d, "ffn_dim": f,
   "x_dtype": "bfloat16" | "float16", "x_kind": "residual" | "ffn_norm",
   "layers": [{"rows": total, "chunks": [{"file": "layer_000/chunk_000000.npz", "rows": n}, ...]}, ...]}

Commit protocol: a chunk is written to `*.tmp` and renamed into place, then the manifest is rewritten
(also temp + rename). A crash leaves at most unreferenced files, which a resuming writer deletes.
Writer memory is bounded by `chunk_rows` rows per layer; readers stream one chunk at a time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hybrid_runtime.errors import UserError

FORMAT_NAME = "hybrid-samples"
FORMAT_VERSION = 1
X_DTYPES = ("bfloat16", "float16")
X_KINDS = ("residual", "ffn_norm")
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- mask packing

def pack_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool (n, f) -> uint8 (n, ceil(f/8)), big bit order (numpy's default)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().to("cpu", torch.bool).numpy()
    return np.packbits(np.asarray(mask, dtype=bool), axis=1)


def unpack_mask_np(packed: np.ndarray, ffn_dim: int) -> np.ndarray:
    return np.unpackbits(packed, axis=1, count=ffn_dim).astype(bool)


_SHIFTS = {}


def unpack_mask(packed: torch.Tensor, ffn_dim: int) -> torch.Tensor:
    """uint8 (n, nb) -> bool (n, ffn_dim) on packed's device (for unpacking batches on the GPU)."""
    key = packed.device
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> _SHIFTS[key]) & 1  # (n, nb, 8)
    return bits.reshape(packed.shape[0], -1)[:, :ffn_dim].bool()


# ---------------------------------------------------------------- x storage dtype

def x_to_storage(x: torch.Tensor, x_dtype: str) -> np.ndarray:
    x = x.detach()
    if x_dtype == "float16":
        return x.to("cpu", torch.float16).numpy()
    return x.to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def x_from_storage(arr: np.ndarray, x_dtype: str) -> torch.Tensor:
    if x_dtype == "float16":
        return torch.from_numpy(np.ascontiguousarray(arr))
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: sample manifest not found (is {root} a sample store?)")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if man.get("format") != FORMAT_NAME or man.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} manifest")
    for k in ("n_layers", "dim", "ffn_dim", "x_dtype", "x_kind", "layers"):
        if k not in man:
            raise UserError(f"{path}: missing field {k!r}")
    if len(man["layers"]) != man["n_layers"]:
        raise UserError(f"{path}: 'layers' has {len(man['layers'])} entries, n_layers is {man['n_layers']}")
    return man


class SampleWriter:
    """Append-only writer. `append(layer, x, mask)` buffers rows; full chunks are committed atomically.

    With `resume=True` an existing store is reopened (its shape must match); `keep_chunks[l]`, if given,
    truncates layer l to its first keep_chunks[l] committed chunks (to match an outer checkpoint).
    """

    def __init__(self, root: str | Path, n_layers: int, dim: int, ffn_dim: int,
                 x_dtype: str = "bfloat16", x_kind: str = "residual", chunk_rows: int = 1024,
                 resume: bool = False, keep_chunks: list[int] | None = None):
        if x_dtype not in X_DTYPES:
            raise ValueError(f"x_dtype must be one of {X_DTYPES}, got {x_dtype!r}")
        if x_kind not in X_KINDS:
            raise ValueError(f"x_kind must be one of {X_KINDS}, got {x_kind!r}")
        if chunk_rows <= 0:
            raise ValueError("chunk_rows must be positive")
        self.root = Path(root)
        self.n_layers, self.dim, self.ffn_dim = n_layers, dim, ffn_dim
        self.x_dtype, self.x_kind, self.chunk_rows = x_dtype, x_kind, chunk_rows
        self._buf_x: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self._buf_m: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
        self._buf_rows = [0] * n_layers
        if resume and (self.root / MANIFEST).is_file():
            self.manifest = read_manifest(self.root)
            got = {k: self.manifest[k] for k in ("n_layers", "dim", "ffn_dim", "x_dtype", "x_kind")}
            want = dict(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, x_dtype=x_dtype, x_kind=x_kind)
            if got != want:
                bad = [f"{k}={got[k]} (expected {want[k]})" for k in want if got[k] != want[k]]
                raise UserError(f"{self.root}: existing sample store does not match: {', '.join(bad)}")
            if keep_chunks is not None:
                if len(keep_chunks) != n_layers:
                    raise ValueError("keep_chunks needs one entry per layer")
                for lay, keep in zip(self.manifest["layers"], keep_chunks):
                    if keep > len(lay["chunks"]):
                        raise UserError(f"{self.root}: checkpoint expects {keep} chunks but the store has "
                                        f"{len(lay['chunks'])}: samples were lost; restart with --force")
                    del lay["chunks"][keep:]
                    lay["rows"] = sum(c["rows"] for c in lay["chunks"])
                _atomic_write_json(self.root / MANIFEST, self.manifest)
            self._delete_unreferenced()
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_layers": n_layers,
                             "dim": dim, "ffn_dim": ffn_dim, "x_dtype": x_dtype, "x_kind": x_kind,
                             "layers": [{"rows": 0, "chunks": []} for _ in range(n_layers)]}
            self._delete_unreferenced()
            _atomic_write_json(self.root / MANIFEST, self.manifest)

    def _delete_unreferenced(self) -> None:
        referenced = {c["file"] for lay in self.manifest["layers"] for c in lay["chunks"]}
        for i in range(self.n_layers):
            d = self.root / f"layer_{i:03d}"
            if d.is_dir():
                for p in d.iterdir():
                    if f"{d.name}/{p.name}" not in referenced:
                        p.unlink()

    def committed_chunks(self) -> list[int]:
        return [len(lay["chunks"]) for lay in self.manifest["layers"]]

    def rows(self, layer: int) -> int:
        """Committed plus buffered rows of a layer."""
        return self.manifest["layers"][layer]["rows"] + self._buf_rows[layer]

    def append(self, layer: int, x: torch.Tensor, mask: torch.Tensor) -> None:
        """x (n, d) any float dtype/device; mask (n, f) bool."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}), got {tuple(x.shape)}")
        if mask.shape != (x.shape[0], self.ffn_dim):
            raise ValueError(f"mask must be ({x.shape[0]}, {self.ffn_dim}), got {tuple(mask.shape)}")
        if x.shape[0] == 0:
            return
        self._buf_x[layer].append(x_to_storage(x, self.x_dtype))
        self._buf_m[layer].append(pack_mask(mask))
        self._buf_rows[layer] += x.shape[0]
        while self._buf_rows[layer] >= self.chunk_rows:
            self._write_chunk(layer, self.chunk_rows)

    def _write_chunk(self, layer: int, n: int) -> None:
        xs, ms = np.concatenate(self._buf_x[layer]), np.concatenate(self._buf_m[layer])
        rest_x, rest_m = xs[n:], ms[n:]
        self._buf_x[layer] = [rest_x] if len(rest_x) else []
        self._buf_m[layer] = [rest_m] if len(rest_m) else []
        self._buf_rows[layer] = len(rest_x)
        lay = self.manifest["layers"][layer]
        rel = f"layer_{layer:03d}/chunk_{len(lay['chunks']):06d}.npz"
        path = self.root / rel
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, x=xs[:n], mask=ms[:n])
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        lay["chunks"].append({"file": rel, "rows": int(n)})
        lay["rows"] += int(n)
        _atomic_write_json(self.root / MANIFEST, self.manifest)

    def flush(self) -> None:
        """Commit every buffered row (chunks may then be shorter than chunk_rows)."""
        for layer in range(self.n_layers):
            if self._buf_rows[layer]:
                self._write_chunk(layer, self._buf_rows[layer])

    close = flush


class SampleReader:
    """Reads a store written by SampleWriter; never holds more than one chunk beyond what it returns."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.n_layers, self.dim, self.ffn_dim = m["n_layers"], m["dim"], m["ffn_dim"]
        self.x_dtype, self.x_kind = m["x_dtype"], m["x_kind"]
        if self.x_dtype not in X_DTYPES:
            raise UserError(f"{self.root / MANIFEST}: unknown x_dtype {self.x_dtype!r}")

    def n_samples(self, layer: int) -> int:
        return self.manifest["layers"][layer]["rows"]

    def iter_chunks(self, layer: int, max_rows: int | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Yield (x (n, d) bf16/fp16 tensor, packed mask uint8 (n, ceil(f/8)) array), chunk by chunk."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.n_layers})")
        left = self.n_samples(layer) if max_rows is None else max_rows
        nb = (self.ffn_dim + 7) // 8
        for c in self.manifest["layers"][layer]["chunks"]:
            if left <= 0:
                break
            path = self.root / c["file"]
            try:
                with np.load(path) as z:
                    x, m = z["x"][:left], z["mask"][:left]
            except (OSError, KeyError, ValueError) as e:
                raise UserError(f"{path}: unreadable sample chunk ({e})") from None
            if x.shape != (min(c["rows"], left), self.dim) or m.shape != (len(x), nb):
                raise UserError(f"{path}: chunk shapes x{x.shape} mask{m.shape} disagree with the manifest")
            left -= len(x)
            yield x_from_storage(x, self.x_dtype), m

    def load(self, layer: int, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to max_rows samples: (x (n, d) bf16/fp16, packed mask uint8 (n, ceil(f/8))) CPU tensors."""
        n = self.n_samples(layer) if max_rows is None else min(max_rows, self.n_samples(layer))
        x = torch.empty(n, self.dim, dtype=torch.float16 if self.x_dtype == "float16" else torch.bfloat16)
        m = torch.empty(n, (self.ffn_dim + 7) // 8, dtype=torch.uint8)
        i = 0
        for xc, mc in self.iter_chunks(layer, n):
            x[i:i + len(xc)] = xc
            m[i:i + len(xc)] = torch.from_numpy(mc)
            i += len(xc)
        return x, m
