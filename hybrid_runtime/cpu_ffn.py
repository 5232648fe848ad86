"""Cold-neuron FFN on the CPU: Numba kernels over the predicted-active rows of one layer.

A layer's cold neurons are kept neuron-major, like the GPU's hot block: `gate`, `up` and `down`
are (n_cold, d), one row per neuron (down is HF's `down_proj.weight` transposed). For one token

    g_i = gate_i . x        a_i = act(g_i) * (up_i . x)        y = sum_i a_i * down_i

over the active neurons i only. A neuron whose activated gate is zero (the predictor's set is
a superset of the true one) costs its gate row only: its up and down rows are never read.

Storage at rest is 16-bit or 8-bit, never an fp32 copy (a 7B model's cold half must fit a
consumer PC's RAM); accumulation is fp32.
- "bf16": bf16 bit patterns in uint16 arrays. Numba has no half type: bf16 -> fp32 is the
  16-bit pattern shifted left by 16 and reinterpreted (an LLVM bitcast intrinsic below).
- "fp16": fp16 bit patterns in uint16 arrays, widened by integer bit manipulation (normals,
  subnormals, inf and nan all exact), which LLVM vectorises like the bf16 shift.
- "int8": symmetric per-row quantisation, w ~= q * scale, q in [-127, 127], one fp32 scale per
  row (`quantize_rows_int8`).

Kernels (`cold_ffn_decode_kernel`, `cold_ffn_batch_kernel`) are module-level
`@njit(parallel=True, nogil=True, cache=True, fastmath=True)` drivers on plain arrays; the
per-row work is in plain `@njit` helpers. They release the GIL, so the runtime can run them in
a Python thread while the GPU computes the hot neurons.

Threads: the drivers use `numba.get_num_threads()` threads, which `numba.set_num_threads(n)`
sets *per calling thread* (Numba's setting is thread-local): a runtime that calls the kernels
from a worker thread must call `numba.set_num_threads` in that worker. Only one thread at a
time may run Numba parallel kernels under the default `workqueue` threading layer (the one
worker thread of the runtime does; tbb/omp lift that restriction).

Entry points:
- `cold_ffn(cold, x, active, act, threshold)` / `cold_ffn_batch(...)`: validate everything,
  allocate the output; for tests and one-off calls.
- `ColdFFN(cold, act, threshold)`: validated once at construction; `.decode(x, active, out)` and
  `.batch(x, active, out)` call the kernels unchecked (the decode hot path).
- `cold_ffn_ref` / `cold_ffn_batch_ref`: numpy references the tests compare the kernels to.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

from hybrid_runtime.errors import UserError

# storage formats (the `fmt` argument of the kernels)
FMT_BF16, FMT_FP16, FMT_INT8 = 0, 1, 2
FORMATS = {"bf16": FMT_BF16, "fp16": FMT_FP16, "int8": FMT_INT8}

# activation kinds (the `act` argument of the kernels); silu has no exact zeros: not sparse
ACT_RELU, ACT_FATRELU, ACT_RELU2, ACT_DRELU = 0, 1, 2, 3
ACTS = {"relu": ACT_RELU, "fatrelu": ACT_FATRELU, "relu2": ACT_RELU2, "drelu": ACT_DRELU}

_INT8_QMAX = 127.0
_QUANT_CHUNK_ROWS = 1024  # rows converted at a time: bounds the transient fp32 memory


def act_code(act: str) -> int:
    """Kernel code of an activation name; UserError for activations without exact zeros."""
    if act not in ACTS:
        raise UserError(f"activation {act!r} cannot run on the sparse CPU path "
                        f"(supported: {', '.join(ACTS)}; silu has no exact zeros)")
    return ACTS[act]


# ----------------------------------------------------------------------------- bit conversions

@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (LLVM bitcast, no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        if v.type.width > 32:
            v = builder.trunc(v, i32)
        elif v.type.width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _bits_from_f32(typingctx, value):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@njit(inline="always")
def _bf16_to_f32(h):
    return _f32_from_bits(np.uint32(h) << np.uint32(16))


@njit(inline="always")
def _fp16_to_f32(h):
    """IEEE half bits -> float32, exact for normals, subnormals, +-0, inf and nan (payload kept).

    Integer-only except for subnormals (m * 2^-24 is exact in fp32), so `fastmath` cannot change
    the result; branches become selects and the loops using this vectorise.
    """
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    em = h & np.uint32(0x7FFF)                       # exponent and mantissa
    if em >= np.uint32(0x7C00):                      # inf / nan: exponent all ones
        bits = sign | np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13))
    elif em >= np.uint32(0x0400):                    # normal: rebias the exponent 15 -> 127
        bits = sign | ((em << np.uint32(13)) + np.uint32(0x38000000))
    else:                                            # subnormal or zero: m * 2^-24
        bits = sign | _bits_from_f32(np.float32(em) * np.float32(5.9604644775390625e-08))
    return _f32_from_bits(bits)


# ----------------------------------------------------------------------------- per-row helpers

@njit(inline="always")
def _row_scale(scales, r, fmt):
    if fmt == FMT_INT8:
        return scales[r]
    return np.float32(1.0)


@njit
def _dot_row(w, fmt, x):
    """w . x for one stored row w (d,) (unscaled for int8); fp32 accumulation."""
    acc = np.float32(0.0)
    if fmt == FMT_BF16:
        for j in range(x.shape[0]):
            acc += _bf16_to_f32(w[j]) * x[j]
    elif fmt == FMT_FP16:
        for j in range(x.shape[0]):
            acc += _fp16_to_f32(w[j]) * x[j]
    else:
        for j in range(x.shape[0]):
            acc += np.float32(w[j]) * x[j]
    return acc


@njit
def _axpy_row(a, w, fmt, out):
    """out += a * w for one stored row w (a already includes the int8 scale)."""
    if fmt == FMT_BF16:
        for j in range(out.shape[0]):
            out[j] += a * _bf16_to_f32(w[j])
    elif fmt == FMT_FP16:
        for j in range(out.shape[0]):
            out[j] += a * _fp16_to_f32(w[j])
    else:
        for j in range(out.shape[0]):
            out[j] += a * np.float32(w[j])


@njit
def _decode_row(w, fmt, scale, out):
    """out = w as fp32 (times scale: 1 for the 16-bit formats)."""
    if fmt == FMT_BF16:
        for j in range(out.shape[0]):
            out[j] = _bf16_to_f32(w[j])
    elif fmt == FMT_FP16:
        for j in range(out.shape[0]):
            out[j] = _fp16_to_f32(w[j])
    else:
        for j in range(out.shape[0]):
            out[j] = np.float32(w[j]) * scale


@njit(inline="always")
def _gate_act(g, act, threshold):
    """Activated gate value; zero means the neuron does not fire (its up/down rows are skipped)."""
    if act == ACT_FATRELU:
        return g if g >= threshold else np.float32(0.0)
    if act == ACT_RELU2:
        return g * g if g > 0 else np.float32(0.0)
    return g if g > 0 else np.float32(0.0)        # relu, and drelu's gate half


@njit(inline="always")
def _combine(ga, u, act):
    """a = act(g) * u from the activated gate ga != 0 and the up value u (dReLU: relu on u too)."""
    if act == ACT_DRELU and u <= 0:
        return np.float32(0.0)
    return ga * u


@njit
def _neuron_act(gate_row, up_row, gate_scale, up_scale, fmt, x, act, threshold):
    """One neuron's activation a for token x; reads the up row only if the gate fires."""
    ga = _gate_act(_dot_row(gate_row, fmt, x) * gate_scale, act, threshold)
    if ga == 0:
        return np.float32(0.0)
    return _combine(ga, _dot_row(up_row, fmt, x) * up_scale, act)


@njit(fastmath=True, cache=True)
def decode_rows(w, fmt, scales):
    """Stored rows (n, d) -> fp32 (n, d), with the kernels' own conversion code (tests use it)."""
    out = np.empty(w.shape, np.float32)
    for r in range(w.shape[0]):
        _decode_row(w[r], fmt, _row_scale(scales, r, fmt), out[r])
    return out


# ----------------------------------------------------------------------------- drivers

@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def cold_ffn_decode_kernel(gate, up, down, gate_scale, up_scale, down_scale, fmt,
                           x, active, act, threshold, partial, y):
    """y = sum over active cold rows r of a_r * down_r, for one token.

    gate/up/down (n_cold, d) stored rows; *_scale (n_cold,) fp32 for int8, unused (size 0) else;
    x (d,) fp32; active (n_active,) int32 local row indices, each in [0, n_cold) (unchecked);
    partial (n_chunks, d) fp32 workspace: chunk c of the active list accumulates into partial[c]
    (one chunk per thread: n_chunks = numba.get_num_threads() balances best), merged after the
    parallel loop; y (d,) fp32 is overwritten.
    """
    d = x.shape[0]
    n_active = active.shape[0]
    n_chunks = partial.shape[0]
    rows_per_chunk = (n_active + n_chunks - 1) // n_chunks
    n_used = (n_active + rows_per_chunk - 1) // rows_per_chunk if n_active > 0 else 0
    for c in prange(n_used):
        buf = partial[c]
        buf[:] = 0.0
        for i in range(c * rows_per_chunk, min(n_active, (c + 1) * rows_per_chunk)):
            r = active[i]
            a = _neuron_act(gate[r], up[r], _row_scale(gate_scale, r, fmt),
                            _row_scale(up_scale, r, fmt), fmt, x, act, threshold)
            if a != 0:
                _axpy_row(a * _row_scale(down_scale, r, fmt), down[r], fmt, buf)
    # merge the per-chunk partial sums, parallel over column blocks of y
    block = 256
    for b in prange((d + block - 1) // block):
        for j in range(b * block, min(d, (b + 1) * block)):
            s = np.float32(0.0)
            for c in range(n_used):
                s += partial[c, j]
            y[j] = s


_GROUP = 8  # rows decoded to fp32 together in the batch kernel: each token is read once per group


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def cold_ffn_batch_kernel(gate, up, down, gate_scale, up_scale, down_scale, fmt,
                          x, active, act, threshold, n_threads, y):
    """Prefill: y[t] = sum over the union set `active` of a_{t,r} * down_r, for T tokens.

    x (T, d) fp32; a_{t,r} is zero where token t's gate does not fire; y (T, d) overwritten;
    n_threads: numba.get_num_threads() of the caller (phase 1 splits the active rows in as many chunks).
    Phase 1, parallel over chunks of active rows: decode a group of gate rows to fp32, dot them
    with every token, then the up rows of the neurons that fire for some token. Phase 2, parallel
    over column blocks of y (no per-thread buffers needed: each block is owned by one thread):
    decode the down rows' block and accumulate the non-zero activations.
    """
    T, d = x.shape
    n_active = active.shape[0]
    acts = np.zeros((n_active, T), np.float32)     # a_{t,r}, row-major per neuron
    fires = np.zeros(n_active, np.uint8)           # neuron fires for at least one token
    n_chunks = min(n_active, n_threads)
    rows_per_chunk = (n_active + n_chunks - 1) // n_chunks if n_chunks > 0 else 0
    for c in prange(n_chunks):
        rows = np.empty((_GROUP, d), np.float32)
        stop = min(n_active, (c + 1) * rows_per_chunk)
        for i0 in range(c * rows_per_chunk, stop, _GROUP):
            n = min(_GROUP, stop - i0)
            for k in range(n):
                r = active[i0 + k]
                _decode_row(gate[r], fmt, _row_scale(gate_scale, r, fmt), rows[k])
            for t in range(T):
                xt = x[t]
                for k in range(n):
                    ga = _gate_act(_dot_f32(rows[k], xt), act, threshold)
                    acts[i0 + k, t] = ga
                    if ga != 0:
                        fires[i0 + k] = 1
            for k in range(n):
                if fires[i0 + k]:
                    r = active[i0 + k]
                    _decode_row(up[r], fmt, _row_scale(up_scale, r, fmt), rows[k])
            for t in range(T):
                xt = x[t]
                for k in range(n):
                    ga = acts[i0 + k, t]
                    if ga != 0:
                        acts[i0 + k, t] = _combine(ga, _dot_f32(rows[k], xt), act)
    block = 256
    for b in prange((d + block - 1) // block):
        j0 = b * block
        j1 = min(d, j0 + block)
        seg = np.empty(j1 - j0, np.float32)
        for t in range(T):
            y[t, j0:j1] = 0.0
        for i in range(n_active):
            if not fires[i]:
                continue
            r = active[i]
            _decode_row(down[r, j0:j1], fmt, _row_scale(down_scale, r, fmt), seg)
            for t in range(T):
                a = acts[i, t]
                if a != 0:
                    yt = y[t]
                    for j in range(j1 - j0):
                        yt[j0 + j] += a * seg[j]


@njit(inline="always")
def _dot_f32(a, b):
    acc = np.float32(0.0)
    for j in range(a.shape[0]):
        acc += a[j] * b[j]
    return acc


# ----------------------------------------------------------------------------- storage

def _half_bits(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A CPU tensor as contiguous `dtype` bit patterns in a uint16 numpy array (no copy if already so)."""
    t = t.detach().to("cpu")
    if t.dtype != dtype:
        if dtype == torch.float16:
            _check_fits_fp16(t)
        t = t.to(dtype)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def _check_fits_fp16(t: torch.Tensor) -> None:
    for i in range(0, t.shape[0], _QUANT_CHUNK_ROWS):
        chunk = t[i:i + _QUANT_CHUNK_ROWS]
        if not torch.isfinite(chunk).all():
            raise UserError("cold FFN weights contain inf/nan; refusing to store them")
        if chunk.abs().amax() > 65504.0:
            raise UserError("cold FFN weights exceed the fp16 range (65504): store them as bf16 or int8")


def quantize_rows_int8(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: w (n, d) -> q (n, d) int8 in [-127, 127], scale (n,) fp32, w ~= q * scale.

    Rows are converted in chunks, so only a chunk ever exists in fp32. An all-zero row gets scale 0.
    """
    if w.dim() != 2:
        raise UserError(f"quantize_rows_int8: expected a 2-D (rows, d) tensor, got shape {tuple(w.shape)}")
    w = w.detach().to("cpu")
    n, d = w.shape
    q = np.empty((n, d), np.int8)
    scale = np.empty(n, np.float32)
    for i in range(0, n, _QUANT_CHUNK_ROWS):
        chunk = w[i:i + _QUANT_CHUNK_ROWS].float()                 # (c, d)
        if not torch.isfinite(chunk).all():
            raise UserError("cold FFN weights contain inf/nan; refusing to quantize them")
        s = chunk.abs().amax(dim=1) / _INT8_QMAX                   # (c,)
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        q[i:i + len(chunk)] = torch.round(chunk * inv[:, None]).clamp_(-127, 127).to(torch.int8).numpy()
        scale[i:i + len(chunk)] = s.numpy()
    return q, scale


@dataclass
class ColdRows:
    """One layer's cold neurons as the CPU kernels read them: neuron-major stored rows.

    gate, up, down: (n_cold, d) uint16 (fmt "bf16"/"fp16": bit patterns) or int8 (fmt "int8");
    gate_scale, up_scale, down_scale: (n_cold,) fp32 per-row scales for int8, empty (0,) otherwise.
    """
    fmt: str
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    gate_scale: np.ndarray
    up_scale: np.ndarray
    down_scale: np.ndarray

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise UserError(f"cold row format {self.fmt!r} unknown (supported: {', '.join(FORMATS)})")
        want = np.int8 if self.fmt == "int8" else np.uint16
        n_scale = self.gate.shape[0] if self.fmt == "int8" else 0
        shape = self.gate.shape
        for name in ("gate", "up", "down"):
            a = getattr(self, name)
            if a.dtype != want or a.ndim != 2 or a.shape != shape or not a.flags.c_contiguous:
                raise UserError(f"cold rows {name}: expected C-contiguous {np.dtype(want).name} {shape}, "
                                f"got {a.dtype} {a.shape}")
        for name in ("gate_scale", "up_scale", "down_scale"):
            a = getattr(self, name)
            if a.dtype != np.float32 or a.shape != (n_scale,) or not a.flags.c_contiguous:
                raise UserError(f"cold rows {name}: expected float32 ({n_scale},), got {a.dtype} {a.shape}")

    @classmethod
    def from_torch(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   fmt: str | None = None) -> "ColdRows":
        """Build from (n_cold, d) tensors (fp32/fp16/bf16; `down` already neuron-major).

        fmt None keeps a bf16/fp16 source as is (bf16 for fp32). When the tensors already have the
        chosen 16-bit dtype and are contiguous the arrays share their memory (no copy).
        """
        if not (gate.shape == up.shape == down.shape and gate.dim() == 2):
            raise UserError(f"cold rows: gate/up/down must be equal (n_cold, d) shapes, got "
                            f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
        if fmt is None:
            fmt = {torch.float16: "fp16"}.get(gate.dtype, "bf16")
        if fmt not in FORMATS:
            raise UserError(f"cold row format {fmt!r} unknown (supported: {', '.join(FORMATS)})")
        if fmt == "int8":
            (g, gs), (u, us), (dn, ds) = (quantize_rows_int8(t) for t in (gate, up, down))
            return cls(fmt, g, u, dn, gs, us, ds)
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float16
        empty = np.zeros(0, np.float32)
        return cls(fmt, _half_bits(gate, dtype), _half_bits(up, dtype), _half_bits(down, dtype),
                   empty, empty.copy(), empty.copy())

    @property
    def n_rows(self) -> int:
        return self.gate.shape[0]

    @property
    def dim(self) -> int:
        return self.gate.shape[1]

    @property
    def fmt_code(self) -> int:
        return FORMATS[self.fmt]

    @property
    def row_bytes(self) -> int:
        """Bytes of one neuron's gate (or up, or down) row, scale included."""
        return self.dim * self.gate.itemsize + (4 if self.fmt == "int8" else 0)

    @property
    def nbytes(self) -> int:
        return 3 * self.n_rows * self.row_bytes

    def dequantize(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gate, up, down) of the given rows (all if None) as fp32 numpy, decoded with plain numpy."""
        idx = np.arange(self.n_rows) if rows is None else np.asarray(rows)
        out = []
        for w, s in ((self.gate, self.gate_scale), (self.up, self.up_scale), (self.down, self.down_scale)):
            w = w[idx]
            if self.fmt == "bf16":
                out.append((w.astype(np.uint32) << 16).view(np.float32))
            elif self.fmt == "fp16":
                out.append(w.view(np.float16).astype(np.float32))
            else:
                out.append(w.astype(np.float32) * s[idx, None])
        return out[0], out[1], out[2]


# ----------------------------------------------------------------------------- references

def act_ref(g: np.ndarray, u: np.ndarray, act: str, threshold: float = 0.0) -> np.ndarray:
    """a = act(g) * u in numpy (dReLU: relu(g) * relu(u))."""
    if act == "relu":
        return np.maximum(g, 0) * u
    if act == "fatrelu":
        return np.where(g >= threshold, g, 0) * u
    if act == "relu2":
        return np.maximum(g, 0) ** 2 * u
    if act == "drelu":
        return np.maximum(g, 0) * np.maximum(u, 0)
    raise UserError(f"activation {act!r} not supported on the sparse CPU path")


def cold_ffn_batch_ref(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str,
                       threshold: float = 0.0) -> np.ndarray:
    """Dense numpy reference over the active rows: x (T, d) -> y (T, d) fp32 (fp64 math)."""
    gate, up, down = (w.astype(np.float64) for w in cold.dequantize(np.asarray(active, np.int64)))
    x = np.asarray(x, np.float64)
    a = act_ref(x @ gate.T, x @ up.T, act, threshold)                 # (T, n_active)
    return (a @ down).astype(np.float32)


def cold_ffn_ref(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str,
                 threshold: float = 0.0) -> np.ndarray:
    """Dense numpy reference for one token: x (d,) -> y (d,) fp32."""
    return cold_ffn_batch_ref(cold, np.asarray(x)[None], active, act, threshold)[0]


# ----------------------------------------------------------------------------- entry points

def _check_active(active: np.ndarray, n_rows: int) -> None:
    if not (isinstance(active, np.ndarray) and active.dtype == np.int32 and active.ndim == 1
            and active.flags.c_contiguous):
        raise UserError(f"active: expected a contiguous 1-D int32 array, got "
                        f"{getattr(active, 'dtype', type(active).__name__)} {getattr(active, 'shape', '')}")
    if active.size and (active.min() < 0 or active.max() >= n_rows):
        raise UserError(f"active: row indices must lie in [0, {n_rows}), got [{active.min()}, {active.max()}]")


def _check_f32(name: str, a: np.ndarray, shape: tuple) -> None:
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == shape
            and a.flags.c_contiguous):
        raise UserError(f"{name}: expected a contiguous float32 array of shape {shape}, got "
                        f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")


class ColdFFN:
    """One layer's cold FFN bound to its rows and activation: checked once, then unchecked calls.

    `decode(x, active, out)` / `batch(x, active, out)` pass straight to the kernels: the caller
    guarantees x (d,) / (T, d) float32 contiguous, active int32 with indices in [0, n_rows), and
    out of x's shape (overwritten). Out-of-range indices are not caught here (memory corruption).
    """

    def __init__(self, cold: ColdRows, act: str, threshold: float = 0.0):
        if threshold < 0:
            raise UserError(f"activation threshold must be >= 0, got {threshold}")
        self.cold = cold
        self.act = act
        self.threshold = float(threshold)
        self._args = (cold.gate, cold.up, cold.down, cold.gate_scale, cold.up_scale, cold.down_scale,
                      cold.fmt_code)
        self._act = act_code(act)
        self._threshold = np.float32(threshold)
        self._partial = np.empty((numba.get_num_threads(), cold.dim), np.float32)

    def decode(self, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> np.ndarray:
        n_threads = numba.get_num_threads()   # thread-local in Numba: follow the calling thread's setting
        if self._partial.shape[0] != n_threads:
            self._partial = np.empty((n_threads, self.cold.dim), np.float32)
        cold_ffn_decode_kernel(*self._args, x, active, self._act, self._threshold, self._partial, out)
        return out

    def batch(self, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> np.ndarray:
        cold_ffn_batch_kernel(*self._args, x, active, self._act, self._threshold,
                              numba.get_num_threads(), out)
        return out


def cold_ffn(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str, threshold: float = 0.0,
             out: np.ndarray | None = None) -> np.ndarray:
    """Checked one-token cold FFN: x (d,) fp32, active (n,) int32 -> y (d,) fp32."""
    _check_f32("x", x, (cold.dim,))
    _check_active(active, cold.n_rows)
    out = np.empty(cold.dim, np.float32) if out is None else out
    _check_f32("out", out, (cold.dim,))
    return ColdFFN(cold, act, threshold).decode(x, active, out)


def cold_ffn_batch(cold: ColdRows, x: np.ndarray, active: np.ndarray, act: str, threshold: float = 0.0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Checked prefill cold FFN over the union set: x (T, d) fp32, active (n,) int32 -> y (T, d) fp32."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2):
        raise UserError(f"x: expected a (T, {cold.dim}) float32 array, got {getattr(x, 'shape', type(x).__name__)}")
    _check_f32("x", x, (x.shape[0], cold.dim))
    _check_active(active, cold.n_rows)
    out = np.empty(x.shape, np.float32) if out is None else out
    _check_f32("out", out, x.shape)
    return ColdFFN(cold, act, threshold).batch(x, active, out)
