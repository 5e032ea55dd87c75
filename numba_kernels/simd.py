"""Explicit SIMD building blocks for the quantized GEMV kernels, written as Numba ``@intrinsic``s.

Why intrinsics
--------------
Numba auto-vectorizes plain loops, but not the int8 block dot products that make quantized GEMV fast
(split nibbles -> u8 x i8 multiply -> pairwise widening adds -> int32 lanes).  A Numba ``@intrinsic``
hands us the ``llvmlite.ir.IRBuilder`` of the *calling* function, so we can emit LLVM vector IR
(``<32 x i8>`` loads, ``shufflevector``, ``zext``/``sext``, calls to target intrinsics such as
``llvm.x86.avx2.pmadd.ub.sw``) straight into the jitted kernel.  The emitted IR is inlined at the call
site; LLVM then schedules and register-allocates it together with the surrounding loop.

The other half of the trick is a pair of Numba types, ``f32x8`` and ``i32x8``, whose data model *is*
an LLVM vector (``<8 x float>`` / ``<8 x i32>``).  A Numba variable of that type lives in a ymm
register, so a kernel can keep a vector accumulator across all blocks of a row (as llama.cpp does)
and reduce it horizontally only once per row::

    acc = vzero(path)                                   # <8 x float> zeroinitializer
    for b in range(nb):
        p = dot_q4(path, qs, qoff + 16 * b, xq, 32 * b) # <8 x i32>: lane k = sum of elements 4k..4k+3
        acc = vfma(path, acc, p, d_w * d_x)             # acc += sitofp(p) * splat(scale)  -> vfmadd
    y = vsum(path, acc)                                 # shufflevector/fadd tree

Three implementations ("paths") of every building block
-------------------------------------------------------
* ``avx2``    - x86 target intrinsics: ``pmaddubsw`` (``llvm.x86.avx2.pmadd.ub.sw``: u8 x i8 -> pairwise
  i16 sums) followed by ``pmaddwd`` against a vector of ones (``llvm.x86.avx2.pmadd.wd``: pairwise i16 ->
  i32 sums), ``psign.b`` for the signed x signed (Q8_0) case, and ``fpext half`` (vcvtph2ps, F16C) for the
  fp16 scales.  Only offered when the host (as Numba compiles for it) has AVX2.
* ``generic`` - target-independent LLVM vector IR only (no ``llvm.x86.*``): widen with zext/sext, ``mul``,
  then even/odd ``shufflevector`` + ``add`` to pairwise-sum into the *same* lane grouping as the AVX2
  path (lane k = elements 4k..4k+3).  LLVM lowers this on any target (SSE2, NEON, AVX-512, ...).
* ``scalar``  - plain Numba loops: the reference.  Here the "vectors" are plain scalars (``vzero`` returns
  a float32 0, ``dot_*`` return one int32, ``vfma`` is a scalar multiply-add), so the same kernel source
  works for all three paths.

All three paths compute bit-identical int32 block dot products; only the float accumulation order
differs.

Selecting a path
----------------
Kernels take a *path token* as their first argument and the overloads below specialise on its Numba
type.  Tokens are small int tuples of distinct lengths (``(1,)``, ``(2, 2)``, ``(3, 3, 3)``): the
dispatcher types tuples through its fast C path (~0.2 us/call) whereas a custom Python object costs
~1.4 us per call, and tuples keep ``cache=True`` working.  ``token(name)`` returns the token for a path
name; ``get_path()``/``set_path()`` hold the process-wide default, initialised from the environment
variable ``SPARSE_GGUF_SIMD=avx2|generic|scalar`` (read at import; default: best available).

Memory-safety: the intrinsics do no bounds checking (the offsets are flat element offsets into
C-contiguous arrays); callers validate shapes.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, overload, register_model

__all__ = [
    "PATHS",
    "AVAILABLE_PATHS",
    "HAS_AVX2",
    "HAS_F16C",
    "token",
    "get_path",
    "set_path",
    "path_name",
    "vzero",
    "vfma",
    "vfma2",
    "vsum",
    "hsum_i32",
    "dot_q4",
    "dot_q5",
    "dot_q6",
    "dot_q8",
    "dot_q4_i32",
    "dot_q5_i32",
    "dot_q8_i32",
    "f16_to_f32",
    "f32x8",
    "i32x8",
]

# --------------------------------------------------------------------------------------------------
# CPU feature detection (what Numba will actually compile for)
# --------------------------------------------------------------------------------------------------


def _target_features() -> set[str]:
    """Features of the CPU Numba generates code for: NUMBA_CPU_FEATURES if set, else the host's."""
    if config.CPU_FEATURES:  # user override (e.g. for portable caches)
        feats = config.CPU_FEATURES
    elif config.CPU_NAME and config.CPU_NAME not in ("host", "native"):
        # Compiling for a named CPU without explicit features: we cannot know what it has.
        return set()
    else:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features().flatten()
    return {f[1:] for f in feats.split(",") if f.startswith("+")}


_FEATURES = _target_features()
HAS_AVX2: bool = "avx2" in _FEATURES
HAS_F16C: bool = "f16c" in _FEATURES

PATHS = ("avx2", "generic", "scalar")
AVAILABLE_PATHS = tuple(p for p in PATHS if p != "avx2" or HAS_AVX2)

# path name -> token (tuple length encodes the path, see module docstring)
_TOKENS = {"avx2": (1,), "generic": (2, 2), "scalar": (3, 3, 3)}
_KIND_BY_LEN = {1: "avx2", 2: "generic", 3: "scalar"}


def token(name: str | None = None) -> tuple:
    """The path token to pass as first argument of the kernels (``None``: the current default)."""
    if name is None:
        name = _current
    if name not in _TOKENS:
        raise ValueError(f"unknown SIMD path {name!r}; expected one of {PATHS}")
    if name not in AVAILABLE_PATHS:
        raise ValueError(f"SIMD path {name!r} is not available on this CPU (available: {AVAILABLE_PATHS})")
    return _TOKENS[name]


def path_name(tok: tuple) -> str:
    return _KIND_BY_LEN[len(tok)]


def get_path() -> str:
    return _current


def set_path(name: str) -> None:
    """Set the process-wide default path (used when a kernel wrapper is given ``path=None``)."""
    global _current
    token(name)  # validates
    _current = name


def _initial_path() -> str:
    env = os.environ.get("SPARSE_GGUF_SIMD", "").strip().lower()
    if not env:
        return AVAILABLE_PATHS[0]
    if env not in PATHS:
        warnings.warn(f"SPARSE_GGUF_SIMD={env!r} is not one of {PATHS}; using {AVAILABLE_PATHS[0]!r}")
        return AVAILABLE_PATHS[0]
    if env not in AVAILABLE_PATHS:
        warnings.warn(f"SPARSE_GGUF_SIMD={env!r}: not available on this CPU; using {AVAILABLE_PATHS[0]!r}")
        return AVAILABLE_PATHS[0]
    return env


_current: str = _initial_path()


def _kind(path) -> str | None:
    """Path name for a token's Numba type (UniTuple(int64, n)), None if it is not a token."""
    if isinstance(path, types.UniTuple) and path.count in _KIND_BY_LEN:
        return _KIND_BY_LEN[path.count]
    return None


# --------------------------------------------------------------------------------------------------
# Vector value types: a Numba variable of these types is an LLVM vector (lives in a SIMD register)
# --------------------------------------------------------------------------------------------------


class F32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


class I32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="i32x8")


f32x8 = F32x8Type()
i32x8 = I32x8Type()

_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V4I8 = ir.VectorType(_I8, 4)
_V16I8 = ir.VectorType(_I8, 16)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V16I32 = ir.VectorType(_I32, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(_F32, 8)


@register_model(F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8F32)


@register_model(I32x8Type)
class _I32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I32)


# --------------------------------------------------------------------------------------------------
# IR helpers
# --------------------------------------------------------------------------------------------------


def _vconst(vty: ir.VectorType, values) -> ir.Constant:
    if not isinstance(values, (list, tuple)):
        values = [values] * vty.count
    return ir.Constant(vty, list(values))


def _mask(idx) -> ir.Constant:
    idx = list(idx)
    return ir.Constant(ir.VectorType(_I32, len(idx)), idx)


def _shuffle(builder, a, b, idx):
    """shufflevector a, b, <idx...>  (b may be None: shuffle within a)."""
    if b is None:
        b = ir.Constant(a.type, ir.Undefined)
    return builder.shuffle_vector(a, b, _mask(idx))


def _splat(builder, value, vty: ir.VectorType):
    """Broadcast a scalar to all lanes: insertelement into lane 0 + zero-mask shufflevector."""
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return _shuffle(builder, v, None, [0] * vty.count)


def _is_byte_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype in (types.uint8, types.int8)


def _load_vec(context, builder, aryty, ary, off, offty, vty):
    """Unaligned load of an LLVM vector from &ary.flat[off] (element offset; 1-byte elements)."""
    arr = context.make_array(aryty)(context, builder, ary)
    off = context.cast(builder, off, offty, types.intp)
    ptr = builder.gep(arr.data, [off])
    ptr = builder.bitcast(ptr, vty.as_pointer())
    return builder.load(ptr, align=1)


def _x86_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _nibbles_32(builder, q16):
    """<16 x i8> packed nibbles -> <32 x i8> values 0..15: lanes 0..15 low nibbles, 16..31 high ones."""
    lo = builder.and_(q16, _vconst(_V16I8, 0x0F))
    hi = builder.lshr(q16, _vconst(_V16I8, 4))
    return _shuffle(builder, lo, hi, range(32))


def _high_bits_32(builder, qh32, value: int):
    """u32 bit mask -> <32 x i8> with lane j = value if bit j set else 0.

    bitcast i32 -> <4 x i8>, shufflevector to replicate byte j//8 into lanes j (8 lanes per byte),
    AND with <1,2,4,...,128> per group, compare != 0, select."""
    b4 = builder.bitcast(qh32, _V4I8)
    rep = _shuffle(builder, b4, None, [j // 8 for j in range(32)])
    bits = builder.and_(rep, _vconst(_V32I8, [1 << (j % 8) for j in range(32)]))
    nz = builder.icmp_unsigned("!=", bits, _vconst(_V32I8, 0))
    return builder.select(nz, _vconst(_V32I8, value), _vconst(_V32I8, 0))


def _madd_avx2(builder, u, s):
    """AVX2: <32 x u8> x <32 x i8> -> <8 x i32>, lane k = sum_{j=4k}^{4k+3} u_j * s_j.

    pmaddubsw multiplies unsigned bytes of its 1st operand by signed bytes of its 2nd and adds adjacent
    pairs into saturating i16 (our operands never saturate: |u| <= 128 on the Q8 path with |s| <= 127,
    |u| <= 63 elsewhere); pmaddwd against ones adds adjacent i16 pairs into i32."""
    maddubs = _x86_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
    maddwd = _x86_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    p16 = builder.call(maddubs, [u, s])
    return builder.call(maddwd, [p16, _vconst(_V16I16, 1)])


def _madd_generic(builder, u, s, u_signed: bool):
    """Portable equivalent of _madd_avx2 (same lane grouping) in plain LLVM vector IR.

    Widen both operands to i16 (zext for the unsigned one, sext for the signed one), multiply (products
    fit in i16), add even and odd lanes (shufflevector 0,2,4.. / 1,3,5..) after sign-extension to i32,
    then once more even+odd -> 8 lanes.  LLVM maps this onto pmaddwd/pmaddubsw-like sequences on x86
    and smull/saddlp-like ones on ARM."""
    a = builder.sext(u, _V32I16) if u_signed else builder.zext(u, _V32I16)
    b = builder.sext(s, _V32I16)
    a = builder.sext(a, ir.VectorType(_I32, 32))
    b = builder.sext(b, ir.VectorType(_I32, 32))
    p = builder.mul(a, b)
    s16 = builder.add(_shuffle(builder, p, None, range(0, 32, 2)), _shuffle(builder, p, None, range(1, 32, 2)))
    return builder.add(_shuffle(builder, s16, None, range(0, 16, 2)), _shuffle(builder, s16, None, range(1, 16, 2)))


def _madd(builder, kind, u, s, u_signed=False):
    if kind == "avx2":
        if u_signed:
            # sign trick: |u| * (s * sign(u)) == u * s, and |u| fits an unsigned byte.
            psign = _x86_fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
            s = builder.call(psign, [s, u])
            u = builder.call(psign, [u, u])
        return _madd_avx2(builder, u, s)
    return _madd_generic(builder, u, s, u_signed)


def _hsum_v8(builder, v, add):
    """Horizontal sum of an 8-lane vector by a shufflevector tree (8 -> 4 -> 2 -> 1)."""
    v4 = add(_shuffle(builder, v, None, range(0, 4)), _shuffle(builder, v, None, range(4, 8)))
    v2 = add(_shuffle(builder, v4, None, range(0, 2)), _shuffle(builder, v4, None, range(2, 4)))
    s = add(builder.extract_element(v2, ir.Constant(_I32, 0)), builder.extract_element(v2, ir.Constant(_I32, 1)))
    return s


# --------------------------------------------------------------------------------------------------
# Intrinsics (vector paths).  Each takes a compile-time "kind" through a Python closure factory.
# --------------------------------------------------------------------------------------------------


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8F32, None)

    return f32x8(), codegen


@intrinsic
def _vfma(typingctx, acc, p, s):
    """acc + sitofp(p) * splat(s); fmul/fadd carry 'contract' so LLVM emits vfmadd where it exists."""
    if not (acc == f32x8 and p == i32x8 and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        a, pv, sv = args
        sv = context.cast(builder, sv, sig.args[2], types.float32)
        pf = builder.sitofp(pv, _V8F32)
        prod = builder.fmul(pf, _splat(builder, sv, _V8F32), flags=("contract",))
        return builder.fadd(a, prod, flags=("contract",))

    return f32x8(acc, p, s), codegen


@intrinsic
def _vfma2(typingctx, acc, p, s_lo, s_hi):
    """acc + sitofp(p) * <s_lo x4, s_hi x4> (lanes 0..3 hold elements 0..15, lanes 4..7 16..31)."""
    if not (acc == f32x8 and p == i32x8 and isinstance(s_lo, types.Float) and isinstance(s_hi, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        a, pv, lo, hi = args
        lo = context.cast(builder, lo, sig.args[2], types.float32)
        hi = context.cast(builder, hi, sig.args[3], types.float32)
        vlo = _splat(builder, lo, _V8F32)
        vhi = _splat(builder, hi, _V8F32)
        sv = _shuffle(builder, vlo, vhi, [0, 0, 0, 0, 8, 8, 8, 8])
        pf = builder.sitofp(pv, _V8F32)
        prod = builder.fmul(pf, sv, flags=("contract",))
        return builder.fadd(a, prod, flags=("contract",))

    return f32x8(acc, p, s_lo, s_hi), codegen


@intrinsic
def _vsum(typingctx, acc):
    if acc != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return _hsum_v8(builder, args[0], builder.fadd)

    return types.float32(acc), codegen


@intrinsic
def _hsum_i32(typingctx, p):
    if p != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return _hsum_v8(builder, args[0], builder.add)

    return types.int32(p), codegen


def _make_dot_q4(kind):
    @intrinsic
    def _dot(typingctx, w, woff, x, xoff):
        """<8 x i32> partial sums of the 32-element dot: unsigned nibbles w[woff:woff+16] x int8 x[xoff:+32]."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V16I8)
            y = _load_vec(context, builder, sig.args[2], xa, xo, sig.args[3], _V32I8)
            return _madd(builder, kind, _nibbles_32(builder, q), y)

        return i32x8(w, woff, x, xoff), codegen

    return _dot


def _make_dot_q5(kind):
    @intrinsic
    def _dot(typingctx, w, woff, qh, x, xoff):
        """Like dot_q4 with 5-bit values: nibble | (bit j of qh) << 4."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                and isinstance(qh, types.Integer) and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, hv, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V16I8)
            y = _load_vec(context, builder, sig.args[3], xa, xo, sig.args[4], _V32I8)
            h = context.cast(builder, hv, sig.args[2], types.uint32)
            u = builder.or_(_nibbles_32(builder, q), _high_bits_32(builder, h, 0x10))
            return _madd(builder, kind, u, y)

        return i32x8(w, woff, qh, x, xoff), codegen

    return _dot


def _make_dot_q6(kind):
    @intrinsic
    def _dot(typingctx, w, woff, h, hoff, shift, x, xoff):
        """32-element dot of Q6_K values (q - 32) with int8 x.

        w[woff:+16]: nibbles (lanes 0..15 low, 16..31 high); h[hoff:+32]: one byte per element whose
        bits (shift, shift+1) are the element's two high bits (llama.cpp's Q6_K qh layout)."""
        if not (_is_byte_array(w) and _is_byte_array(h) and _is_byte_array(x)
                and all(isinstance(t, types.Integer) for t in (woff, hoff, shift, xoff))):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, ha, ho, sh, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V16I8)
            hb = _load_vec(context, builder, sig.args[2], ha, ho, sig.args[3], _V32I8)
            y = _load_vec(context, builder, sig.args[5], xa, xo, sig.args[6], _V32I8)
            sh8 = builder.trunc(context.cast(builder, sh, sig.args[4], types.uint32), _I8)
            hb = builder.lshr(hb, _splat(builder, sh8, _V32I8))
            hb = builder.shl(builder.and_(hb, _vconst(_V32I8, 3)), _vconst(_V32I8, 4))
            u = builder.or_(_nibbles_32(builder, q), hb)  # 0..63
            p = _madd(builder, kind, u, y)
            # subtract 32 * (sum of y in each lane group): same madd with a constant 32 vector
            corr = _madd(builder, kind, _vconst(_V32I8, 32), y)
            return builder.sub(p, corr)

        return i32x8(w, woff, h, hoff, shift, x, xoff), codegen

    return _dot


def _make_dot_q8(kind):
    @intrinsic
    def _dot(typingctx, w, woff, x, xoff):
        """<8 x i32> partial sums of the 32-element int8 x int8 dot."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V32I8)
            y = _load_vec(context, builder, sig.args[2], xa, xo, sig.args[3], _V32I8)
            return _madd(builder, kind, q, y, u_signed=True)

        return i32x8(w, woff, x, xoff), codegen

    return _dot


_dot_q4_avx2, _dot_q4_gen = _make_dot_q4("avx2"), _make_dot_q4("generic")
_dot_q5_avx2, _dot_q5_gen = _make_dot_q5("avx2"), _make_dot_q5("generic")
_dot_q6_avx2, _dot_q6_gen = _make_dot_q6("avx2"), _make_dot_q6("generic")
_dot_q8_avx2, _dot_q8_gen = _make_dot_q8("avx2"), _make_dot_q8("generic")


@intrinsic
def _f16_hw(typingctx, h):
    """fp16 bits -> float32 with `fpext half` (one vcvtph2ps with F16C)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)

    return types.float32(h), codegen


@intrinsic
def _f16_soft(typingctx, h):
    """fp16 bits -> float32 without any half-precision support (no libcalls).

    Shift exponent+mantissa into float32 position ((h & 0x7fff) << 13), reinterpret as float and multiply
    by 2**112 to re-bias the exponent (15 -> 127); the multiply also normalises fp16 subnormals.  Inf/NaN
    (exponent all ones) get the float32 all-ones exponent; finally copy the sign bit."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint16)
        v = builder.zext(v, _I32)
        o = builder.shl(builder.and_(v, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
        f = builder.fmul(builder.bitcast(o, _F32), ir.Constant(_F32, 2.0**112))
        fi = builder.bitcast(f, _I32)
        infnan = builder.icmp_unsigned(">=", builder.and_(v, ir.Constant(_I32, 0x7C00)), ir.Constant(_I32, 0x7C00))
        fi = builder.select(infnan, builder.or_(o, ir.Constant(_I32, 0x7F800000)), fi)
        sign = builder.shl(builder.and_(v, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
        return builder.bitcast(builder.or_(fi, sign), _F32)

    return types.float32(h), codegen


# --------------------------------------------------------------------------------------------------
# Scalar (plain Numba) reference implementations
# --------------------------------------------------------------------------------------------------


@njit(cache=True)
def _dot_q4_scalar(w, woff, x, xoff):
    w = w.reshape(w.size)  # flat views: offsets are flat element offsets
    x = x.reshape(x.size)
    s = np.int32(0)
    for j in range(16):
        q = np.int32(w[woff + j])
        s += (q & 15) * np.int32(x[xoff + j]) + (q >> 4) * np.int32(x[xoff + 16 + j])
    return s


@njit(cache=True)
def _dot_q5_scalar(w, woff, qh, x, xoff):
    w = w.reshape(w.size)
    x = x.reshape(x.size)
    s = np.int32(0)
    h = np.uint32(qh)
    for j in range(16):
        q = np.int32(w[woff + j])
        lo = (q & 15) | (np.int32((h >> np.uint32(j)) & np.uint32(1)) << 4)
        hi = (q >> 4) | (np.int32((h >> np.uint32(j + 16)) & np.uint32(1)) << 4)
        s += lo * np.int32(x[xoff + j]) + hi * np.int32(x[xoff + 16 + j])
    return s


@njit(cache=True)
def _dot_q6_scalar(w, woff, h, hoff, shift, x, xoff):
    w = w.reshape(w.size)
    h = h.reshape(h.size)
    x = x.reshape(x.size)
    s0 = np.int32(0)
    s1 = np.int32(0)
    for j in range(16):
        q = np.int32(w[woff + j])
        h0 = (np.int32(h[hoff + j]) >> shift) & 3
        h1 = (np.int32(h[hoff + 16 + j]) >> shift) & 3
        s0 += (((q & 15) | (h0 << 4)) - 32) * np.int32(x[xoff + j])
        s1 += (((q >> 4) | (h1 << 4)) - 32) * np.int32(x[xoff + 16 + j])
    return (s0, s1)


@njit(cache=True)
def _dot_q8_scalar(w, woff, x, xoff):
    w = w.reshape(w.size)
    x = x.reshape(x.size)
    s = np.int32(0)
    for j in range(32):
        s += np.int32(w[woff + j]) * np.int32(x[xoff + j])
    return s


# --------------------------------------------------------------------------------------------------
# Public, path-dispatched building blocks (call from @njit code; `path` is a token from token())
# --------------------------------------------------------------------------------------------------


def vzero(path):
    """Zero accumulator: <8 x float> on vector paths, float32 0 on the scalar path."""


def vfma(path, acc, p, s):
    """acc + float(p) * s (p: block dot from dot_q4/dot_q5/dot_q8)."""


def vfma2(path, acc, p, s_lo, s_hi):
    """acc + float(p[elements 0..15]) * s_lo + float(p[elements 16..31]) * s_hi (p from dot_q6)."""


def vsum(path, acc):
    """Horizontal float32 sum of an accumulator."""


def hsum_i32(path, p):
    """Horizontal int32 sum of a block dot (-> the block's exact integer dot product)."""


def dot_q4(path, w, woff, x, xoff):
    """Block dot: 16 bytes of unsigned nibbles at w.flat[woff] (lanes 0..15 = low nibbles) x 32 int8 at x.flat[xoff]."""


def dot_q5(path, w, woff, qh, x, xoff):
    """Block dot: 5-bit unsigned values (nibble | bit j of uint32 qh << 4) x 32 int8."""


def dot_q6(path, w, woff, h, hoff, shift, x, xoff):
    """Block dot of signed 6-bit values (nibble | ((h[hoff+j] >> shift) & 3) << 4) - 32 x 32 int8."""


def dot_q8(path, w, woff, x, xoff):
    """Block dot: 32 int8 x 32 int8."""


def dot_q4_i32(path, w, woff, x, xoff):
    """dot_q4 reduced to one int32."""


def dot_q5_i32(path, w, woff, qh, x, xoff):
    """dot_q5 reduced to one int32."""


def dot_q8_i32(path, w, woff, x, xoff):
    """dot_q8 reduced to one int32."""


def f16_to_f32(path, h):
    """float32 value of IEEE fp16 bits h (uint16)."""


@overload(vzero, inline="always")
def _ov_vzero(path):
    k = _kind(path)
    if k == "scalar":
        return lambda path: np.float32(0.0)
    if k is not None:
        return lambda path: _vzero()


@overload(vfma, inline="always")
def _ov_vfma(path, acc, p, s):
    k = _kind(path)
    if k == "scalar":
        return lambda path, acc, p, s: acc + np.float32(p) * s
    if k is not None:
        return lambda path, acc, p, s: _vfma(acc, p, s)


@overload(vfma2, inline="always")
def _ov_vfma2(path, acc, p, s_lo, s_hi):
    k = _kind(path)
    if k == "scalar":
        return lambda path, acc, p, s_lo, s_hi: acc + np.float32(p[0]) * s_lo + np.float32(p[1]) * s_hi
    if k is not None:
        return lambda path, acc, p, s_lo, s_hi: _vfma2(acc, p, s_lo, s_hi)


@overload(vsum, inline="always")
def _ov_vsum(path, acc):
    k = _kind(path)
    if k == "scalar":
        return lambda path, acc: np.float32(acc)
    if k is not None:
        return lambda path, acc: _vsum(acc)


@overload(hsum_i32, inline="always")
def _ov_hsum_i32(path, p):
    k = _kind(path)
    if k == "scalar":
        return lambda path, p: np.int32(p)
    if k is not None:
        return lambda path, p: _hsum_i32(p)


def _pick(k, avx2, gen, scalar):
    return {"avx2": avx2, "generic": gen, "scalar": scalar}[k]


@overload(dot_q4, inline="always")
def _ov_dot_q4(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _dot_q4_avx2, _dot_q4_gen, _dot_q4_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot_q5, inline="always")
def _ov_dot_q5(path, w, woff, qh, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _dot_q5_avx2, _dot_q5_gen, _dot_q5_scalar)
        return lambda path, w, woff, qh, x, xoff: f(w, woff, qh, x, xoff)


@overload(dot_q6, inline="always")
def _ov_dot_q6(path, w, woff, h, hoff, shift, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _dot_q6_avx2, _dot_q6_gen, _dot_q6_scalar)
        return lambda path, w, woff, h, hoff, shift, x, xoff: f(w, woff, h, hoff, shift, x, xoff)


@overload(dot_q8, inline="always")
def _ov_dot_q8(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _dot_q8_avx2, _dot_q8_gen, _dot_q8_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot_q4_i32, inline="always")
def _ov_dot_q4_i32(path, w, woff, x, xoff):
    if _kind(path) is not None:
        return lambda path, w, woff, x, xoff: hsum_i32(path, dot_q4(path, w, woff, x, xoff))


@overload(dot_q5_i32, inline="always")
def _ov_dot_q5_i32(path, w, woff, qh, x, xoff):
    if _kind(path) is not None:
        return lambda path, w, woff, qh, x, xoff: hsum_i32(path, dot_q5(path, w, woff, qh, x, xoff))


@overload(dot_q8_i32, inline="always")
def _ov_dot_q8_i32(path, w, woff, x, xoff):
    if _kind(path) is not None:
        return lambda path, w, woff, x, xoff: hsum_i32(path, dot_q8(path, w, woff, x, xoff))


@overload(f16_to_f32, inline="always")
def _ov_f16(path, h):
    k = _kind(path)
    if k == "avx2" and HAS_F16C:
        return lambda path, h: _f16_hw(h)
    if k is not None:
        return lambda path, h: _f16_soft(h)
