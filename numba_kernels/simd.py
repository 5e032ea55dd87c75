"""Explicit SIMD building blocks for the quantized GEMV kernels, written as Numba ``@intrinsic``s.

Why intrinsics
--------------
Numba auto-vectorizes plain loops, but not the int8 block dot products that make quantized GEMV fast
(split nibbles -> u8 x i8 multiply -> pairwise widening adds -> int32 lanes).  A Numba ``@intrinsic``
hands us the ``llvmlite.ir.IRBuilder`` of the *calling* function, so we can emit LLVM vector IR
(``<32 x i8>`` loads, ``shufflevector``, ``zext``/``sext``, calls to target intrinsics such as
``llvm.x86.avx2.pmadd.ub.sw``) straight into the jitted kernel.  The emitted IR is inlined at the call
site; LLVM then schedules and register-allocates it together with the surrounding loop.

The other half of the trick is a Numba type, ``SimdVector`` (``f32x8``, ``i32x8``; 16 lanes for zmm), whose data model *is*
an LLVM vector (``<8 x float>`` / ``<8 x i32>``).  A Numba variable of that type lives in a ymm
register, so a kernel can keep a vector accumulator across all blocks of a row (as llama.cpp does)
and reduce it horizontally only once per row::

    a0 = vzero(path); a1 = vzero(path)                  # <8 x float> zeroinitializer
    for k in range(nb // 2):                            # two blocks per 32 "paired" nibble bytes
        p0, p1 = dot_q4x2(path, qs, qoff + 32 * k, xq, 64 * k)  # 2 x <8 x i32>, lane j = elems 4j..4j+3
        a0 = vfma(path, a0, p0, vscale(path, d16[2 * k], xd[2 * k]))  # a0 += sitofp(p0) * splat(d*xd)
        a1 = vfma(path, a1, p1, vscale(path, d16[2 * k + 1], xd[2 * k + 1]))
    y = vsum(path, vadd(path, a0, a1))                  # shufflevector/fadd tree, once per row

Per block the AVX2 code is then: 32-byte load (two blocks) + and / shift, vpmaddubsw (x from memory),
vpmaddwd with ones, vcvtdq2ps, vpbroadcastw + vcvtph2ps + vmulps (scale), vfmadd.

Implementations ("paths") of every building block
-------------------------------------------------------
* ``avx2``    - x86 target intrinsics: ``pmaddubsw`` (``llvm.x86.avx2.pmadd.ub.sw``: u8 x i8 -> pairwise
  i16 sums) followed by ``pmaddwd`` against a vector of ones (``llvm.x86.avx2.pmadd.wd``: pairwise i16 ->
  i32 sums), ``psign.b`` for the signed x signed (Q8_0) case, and ``fpext <8 x half>`` (vcvtph2ps, F16C)
  for the fp16 scales.  Only offered when the CPU Numba compiles for has AVX2.
* ``vnni``    - the avx2 path with ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.256``; AVX-VNNI or AVX512-VNNI+VL)
  in place of pmaddubsw + pmaddwd: one instruction, same lane grouping, same results (no intermediate
  i16 saturation, which never occurs with our operand ranges anyway).  ~10 % faster on Q4/Q5 where the
  kernel is compute-bound.  Offered when the CPU has it.
* ``generic`` - target-independent LLVM vector IR only (no ``llvm.x86.*``): widen with zext/sext, ``mul``,
  then even/odd ``shufflevector`` + ``add`` to pairwise-sum into the *same* lane grouping as the AVX2
  path (lane k = elements 4k..4k+3).  LLVM lowers this on any target (on x86: vpmaddwd + vphaddd; ~55-65 %
  of the AVX2 path's speed).  fp16 scales use ``fpext half`` where the hardware converts natively (F16C,
  AArch64), else an integer bit trick (no libcalls).
* ``scalar``  - plain Numba loops: the reference.  Here the "vectors" are plain scalars (``vzero`` returns
  a float32 0, ``dot_*`` return int32s, ``vfma`` is a scalar multiply-add), so the same kernel source
  works for all three paths.

All paths compute bit-identical int32 block dot products; only the float accumulation order
differs.

Selecting a path
----------------
Kernels take a *path token* as their first argument and the overloads below specialise on its Numba
type.  Tokens are small int tuples of distinct lengths (avx2 ``(1,)``, generic ``(2, 2)``, scalar
``(3, 3, 3)``, vnni ``(4, 4, 4, 4)``): the
dispatcher types tuples through its fast C path (~0.2 us/call) whereas a custom Python object costs
~1.4 us per call, and tuples keep ``cache=True`` working.  ``token(name)`` returns the token for a path
name; ``get_path()``/``set_path()`` hold the process-wide default, initialised from the environment
variable ``SPARSE_GGUF_SIMD=vnni|avx2|generic|scalar`` (read at import; default: the best available,
i.e. the first of ``AVAILABLE_PATHS``).

Caching caveat: Numba's on-disk cache of a kernel (cache=True) is keyed on the kernel's own source file
only.  After editing this file, delete numba_kernels/__pycache__ (or touch qgemv.py), otherwise cached
kernels keep the previous intrinsics.

Memory-safety: the intrinsics do no bounds checking (the offsets are flat element offsets into
C-contiguous arrays); callers validate shapes.
"""

from __future__ import annotations

import os
import platform as _platform
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
    "HAS_VNNI",
    "F16_NATIVE",
    "token",
    "get_path",
    "set_path",
    "path_name",
    "vzero",
    "vfma",
    "vfma2",
    "vadd",
    "vsum",
    "hsum_i32",
    "dot_q4",
    "dot_q5",
    "dot_q6",
    "dot_q8",
    "dot_q4x2",
    "dot_q5x2",
    "dot_q4k_sb",
    "dot_q5k_sb",
    "dot_q6k_sb",
    "dot8_q4",
    "dot8_q5",
    "dot8_q8",
    "vfma8",
    "vfma8_off",
    "iadd",
    "q4k_min_fma",
    "dot_q4_i32",
    "dot_q5_i32",
    "dot_q8_i32",
    "f16_to_f32",
    "prefetch",
    "prefetch_l2",
    "q6_pair_block",
    "widen_scaled_i16",
    "vscale",
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
# AVX-VNNI (VEX) or AVX512-VNNI+VL: vpdpbusd does pmaddubsw + pmaddwd (u8 x i8, groups of 4 -> i32) in one
# instruction, with the same lane grouping and, for our operand ranges, the same results: path "vnni".
HAS_VNNI: bool = HAS_AVX2 and ("avxvnni" in _FEATURES or {"avx512vnni", "avx512vl"} <= _FEATURES)
# `fpext half -> float` is generic IR, but on targets without hardware fp16 conversion LLVM lowers it to a
# compiler-rt libcall that Numba's JIT may not resolve; use it only where the hardware converts natively
# (x86 F16C, AArch64), else the integer bit trick of _f16_soft.
F16_NATIVE: bool = HAS_F16C or _platform.machine().lower() in ("aarch64", "arm64")

PATHS = ("vnni", "avx2", "generic", "scalar")  # best first
AVAILABLE_PATHS = tuple(p for p in PATHS if (p != "avx2" or HAS_AVX2) and (p != "vnni" or HAS_VNNI))

# path name -> token (tuple length encodes the path, see module docstring)
_TOKENS = {"avx2": (1,), "generic": (2, 2), "scalar": (3, 3, 3), "vnni": (4, 4, 4, 4)}
_KIND_BY_LEN = {1: "avx2", 2: "generic", 3: "scalar", 4: "vnni"}


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


def path_kind(path) -> str | None:
    """Path name for a token's Numba type, for overloads in other modules that pick an implementation."""
    return _kind(path)


def _kind(path) -> str | None:
    """Path name for a token's Numba type (UniTuple(int64, n)), None if it is not a token."""
    if isinstance(path, types.UniTuple) and path.count in _KIND_BY_LEN:
        return _KIND_BY_LEN[path.count]
    return None


# --------------------------------------------------------------------------------------------------
# Vector value types: a Numba variable of these types is an LLVM vector (lives in a SIMD register)
# --------------------------------------------------------------------------------------------------


_I1 = ir.IntType(1)
_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F32 = ir.FloatType()
_V4I8 = ir.VectorType(_I8, 4)
_V16I8 = ir.VectorType(_I8, 16)
_V32I8 = ir.VectorType(_I8, 32)
_V8I16 = ir.VectorType(_I16, 8)
_V16I16 = ir.VectorType(_I16, 16)
_V32I16 = ir.VectorType(_I16, 32)
_V16I32 = ir.VectorType(_I32, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(_F32, 8)


class SimdVector(types.Type):
    """A Numba type whose data model is an LLVM vector of `lanes` float32 or int32 (a variable of it lives in a
    SIMD register): f32x8 / i32x8 (ymm) and f32x16 / i32x16 (zmm, the prefill row tiles)."""

    def __init__(self, elem: str, lanes: int):
        self.elem, self.lanes = elem, lanes
        super().__init__(name=f"{elem}x{lanes}")


@register_model(SimdVector)
class _SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32 if fe_type.elem == "f32" else _I32, fe_type.lanes))


f32x8 = SimdVector("f32", 8)
i32x8 = SimdVector("i32", 8)


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


def _madd_avx2(builder, u, s, vnni=False):
    """AVX2: <32 x u8> x <32 x i8> -> <8 x i32>, lane k = sum_{j=4k}^{4k+3} u_j * s_j.

    pmaddubsw multiplies unsigned bytes of its 1st operand by signed bytes of its 2nd and adds adjacent
    pairs into saturating i16 (our operands never saturate: |u| <= 128 on the Q8 path with |s| <= 127,
    |u| <= 63 elsewhere); pmaddwd against ones adds adjacent i16 pairs into i32."""
    if vnni:  # one vpdpbusd (accumulating into zero): u8 x i8 products summed in groups of 4 -> i32
        dpbusd = _x86_fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
        return builder.call(dpbusd, [ir.Constant(_V8I32, None), builder.bitcast(u, _V8I32), builder.bitcast(s, _V8I32)])
    maddubs = _x86_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
    maddwd = _x86_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    p16 = builder.call(maddubs, [u, s])
    return builder.call(maddwd, [p16, _vconst(_V16I16, 1)])


def _madd_generic(builder, u, s, u_signed: bool):
    """Portable equivalent of _madd_avx2 (same lane grouping) in plain LLVM vector IR.

    Widen both operands to i32 (zext for the unsigned operand, sext for the signed one; via i16), multiply,
    add even and odd lanes (shufflevector 0,2,4.. / 1,3,5..), then once more even+odd -> 8 lanes.  LLVM's
    x86 backend turns the first level into vpmaddwd (i16 x i16 -> pairwise i32) and the second into
    phaddd; other targets get their own widening multiply-add sequences (smull/saddlp on AArch64).
    (Tried: an i32 clamp + trunc to i16 - pmaddubsw's exact semantics - but LLVM proves the clamp
    redundant, drops it and emits pmullw/pmovwb sequences: 1.2-1.6x slower than this form.)"""
    a = builder.sext(u, _V32I16) if u_signed else builder.zext(u, _V32I16)
    b = builder.sext(s, _V32I16)
    a = builder.sext(a, ir.VectorType(_I32, 32))
    b = builder.sext(b, ir.VectorType(_I32, 32))
    p = builder.mul(a, b)
    s16 = builder.add(_shuffle(builder, p, None, range(0, 32, 2)), _shuffle(builder, p, None, range(1, 32, 2)))
    return builder.add(_shuffle(builder, s16, None, range(0, 16, 2)), _shuffle(builder, s16, None, range(1, 16, 2)))


def _madd(builder, kind, u, s, u_signed=False):
    if kind in ("avx2", "vnni"):
        if u_signed:
            # sign trick: |u| * (s * sign(u)) == u * s, and |u| fits an unsigned byte.
            psign = _x86_fn(builder, "llvm.x86.avx2.psign.b", _V32I8, [_V32I8, _V32I8])
            s = builder.call(psign, [s, u])
            u = builder.call(psign, [u, u])
        return _madd_avx2(builder, u, s, vnni=kind == "vnni")
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
    """acc + sitofp(p) * s (s: a float, splatted, or an f32x8 from vscale); fmul/fadd carry 'contract'
    so LLVM emits vfmadd where it exists."""
    if not (acc == f32x8 and p == i32x8 and (isinstance(s, types.Float) or s == f32x8)):
        return None
    vec_s = s == f32x8

    def codegen(context, builder, sig, args):
        a, pv, sv = args
        if not vec_s:
            sv = _splat(builder, context.cast(builder, sv, sig.args[2], types.float32), _V8F32)
        pf = builder.sitofp(pv, _V8F32)
        prod = builder.fmul(pf, sv, flags=("contract",))
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
def _vadd(typingctx, a, b):
    if not (a == f32x8 and b == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x8(a, b), codegen


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


def _make_dot_q4x2(kind):
    @intrinsic
    def _dot(typingctx, w, woff, x, xoff):
        """Two blocks from 32 "paired" nibble bytes: low nibbles = block A (x[xoff:+32]), high nibbles =
        block B (x[xoff+32:+32]).  One 32-byte load + and/shift feeds two blocks."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V32I8)
            x0 = _load_vec(context, builder, sig.args[2], xa, xo, sig.args[3], _V32I8)
            xo1 = builder.add(context.cast(builder, xo, sig.args[3], types.intp), ir.Constant(_I64, 32))
            x1 = _load_vec(context, builder, sig.args[2], xa, xo1, types.intp, _V32I8)
            lo = builder.and_(q, _vconst(_V32I8, 0x0F))
            hi = builder.lshr(q, _vconst(_V32I8, 4))
            p0 = _madd(builder, kind, lo, x0)
            p1 = _madd(builder, kind, hi, x1)
            return context.make_tuple(builder, sig.return_type, [p0, p1])

        return types.UniTuple(i32x8, 2)(w, woff, x, xoff), codegen

    return _dot


def _make_dot_q5x2(kind):
    @intrinsic
    def _dot(typingctx, w, woff, qh0, qh1, x, xoff):
        """dot_q4x2 with 5-bit values: 5th bits of block A in qh0, of block B in qh1."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                and isinstance(qh0, types.Integer) and isinstance(qh1, types.Integer)
                and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, h0, h1, xa, xo = args
            q = _load_vec(context, builder, sig.args[0], wa, wo, sig.args[1], _V32I8)
            x0 = _load_vec(context, builder, sig.args[4], xa, xo, sig.args[5], _V32I8)
            xo1 = builder.add(context.cast(builder, xo, sig.args[5], types.intp), ir.Constant(_I64, 32))
            x1 = _load_vec(context, builder, sig.args[4], xa, xo1, types.intp, _V32I8)
            h0 = context.cast(builder, h0, sig.args[2], types.uint32)
            h1 = context.cast(builder, h1, sig.args[3], types.uint32)
            lo = builder.or_(builder.and_(q, _vconst(_V32I8, 0x0F)), _high_bits_32(builder, h0, 0x10))
            hi = builder.or_(builder.lshr(q, _vconst(_V32I8, 4)), _high_bits_32(builder, h1, 0x10))
            p0 = _madd(builder, kind, lo, x0)
            p1 = _madd(builder, kind, hi, x1)
            return context.make_tuple(builder, sig.return_type, [p0, p1])

        return types.UniTuple(i32x8, 2)(w, woff, qh0, qh1, x, xoff), codegen

    return _dot


def _maddubs_i16(builder, kind, u, s):
    """<32 x u8> x <32 x i8> -> <16 x i16>, lane k = u_2k * s_2k + u_2k+1 * s_2k+1 (no saturation with our
    operand ranges: |u| <= 63, |s| <= 127). avx2/vnni: vpmaddubsw; generic: widen, multiply, add pairs."""
    if kind in ("avx2", "vnni"):
        return builder.call(_x86_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8]), [u, s])
    p = builder.mul(builder.zext(u, _V32I16), builder.sext(s, _V32I16))
    return builder.add(_shuffle(builder, p, None, range(0, 32, 2)), _shuffle(builder, p, None, range(1, 32, 2)))


def _madd_i16(builder, kind, a, b):
    """<16 x i16> x <16 x i16> -> <8 x i32>, lane k = a_2k * b_2k + a_2k+1 * b_2k+1 (vpmaddwd)."""
    if kind in ("avx2", "vnni"):
        return builder.call(_x86_fn(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16]), [a, b])
    v16i32 = ir.VectorType(_I32, 16)
    p = builder.mul(builder.sext(a, v16i32), builder.sext(b, v16i32))
    return builder.add(_shuffle(builder, p, None, range(0, 16, 2)), _shuffle(builder, p, None, range(1, 16, 2)))


def _dpwssd(builder, kind, acc, a, b):
    """acc + _madd_i16(a, b): one vpdpwssd on the vnni path (AVX-VNNI / AVX512-VNNI), else vpmaddwd + add."""
    if kind == "vnni":
        fn = _x86_fn(builder, "llvm.x86.avx512.vpdpwssd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
        return builder.call(fn, [acc, builder.bitcast(a, _V8I32), builder.bitcast(b, _V8I32)])
    return builder.add(acc, _madd_i16(builder, kind, a, b))


def _kquant_sb_ir(context, builder, kind, sig, args, w_i, sc_i, x_i, h_i=None):
    """IR of one Q4_K / Q5_K superblock's integer sum (see _make_dot_q4k_sb / _make_dot_q5k_sb)."""
    arg = lambda i: (args[i], sig.args[i])  # noqa: E731
    wa, wt = arg(w_i)
    xa, xt = arg(x_i)
    wo = context.cast(builder, args[w_i + 1], sig.args[w_i + 1], types.intp)
    xo = context.cast(builder, args[x_i + 1], sig.args[x_i + 1], types.intp)
    scv = _load_vec(context, builder, sig.args[sc_i], args[sc_i], args[sc_i + 1], sig.args[sc_i + 1], _V8I16)
    scv = builder.and_(scv, _vconst(_V8I16, 0xFF))                  # the 8 sub-block scales
    hb = None if h_i is None else _load_vec(context, builder, sig.args[h_i], args[h_i], args[h_i + 1],
                                            sig.args[h_i + 1], _V32I8)
    acc = ir.Constant(_V8I32, None)
    for i in range(4):
        q = _load_vec(context, builder, wt, wa, builder.add(wo, ir.Constant(_I64, 32 * i)), types.intp, _V32I8)
        for half, u in enumerate((builder.and_(q, _vconst(_V32I8, 0x0F)), builder.lshr(q, _vconst(_V32I8, 4)))):
            j = 2 * i + half
            if hb is not None:                    # Q5_K: bit j of qh byte l is element l's 5th bit
                bit = builder.and_(builder.lshr(hb, _vconst(_V32I8, j)), _vconst(_V32I8, 1))
                u = builder.or_(u, builder.shl(bit, _vconst(_V32I8, 4)))
            y = _load_vec(context, builder, xt, xa, builder.add(xo, ir.Constant(_I64, 32 * j)), types.intp, _V32I8)
            p = _maddubs_i16(builder, kind, u, y)
            acc = _dpwssd(builder, kind, acc, p, _shuffle(builder, scv, None, [j] * 16))
    return acc


def _make_dot_q4k_sb(kind):
    @intrinsic
    def _dot(typingctx, w, woff, sc, soff, x, xoff):
        """One Q4_K superblock (256 elements) as integers: sum_j sc_j * (q_j . x_j) over its 8 sub-blocks j,
        as <8 x i32> partial sums. w[woff:+128]: paired nibbles (sub-block 2i low, 2i+1 high nibbles of the
        32 bytes at 32i); sc[soff:+8] (uint16): sc_j | m_j << 8 (6-bit scale and min); x[xoff:+256] int8.
        As llama.cpp: u8 x i8 pair sums (vpmaddubsw) times the sub-block scale in i16 (vpmaddwd), so the
        whole superblock needs one float multiply-add afterwards instead of one per sub-block."""
        if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(sc, types.Array) and sc.dtype == types.uint16
                and all(isinstance(t, types.Integer) for t in (woff, soff, xoff))):
            return None

        def codegen(context, builder, sig, args):
            return _kquant_sb_ir(context, builder, kind, sig, args, w_i=0, sc_i=2, x_i=4)

        return i32x8(w, woff, sc, soff, x, xoff), codegen

    return _dot


def _make_dot_q5k_sb(kind):
    @intrinsic
    def _dot(typingctx, w, woff, h, hoff, sc, soff, x, xoff):
        """One Q5_K superblock: as dot_q4k_sb with 5-bit values, the 5th bit of sub-block j's element l being
        bit j of h[hoff + l] (llama.cpp's 32 qh bytes per superblock)."""
        if not (_is_byte_array(w) and _is_byte_array(h) and _is_byte_array(x) and isinstance(sc, types.Array)
                and sc.dtype == types.uint16 and all(isinstance(t, types.Integer) for t in (woff, hoff, soff, xoff))):
            return None

        def codegen(context, builder, sig, args):
            return _kquant_sb_ir(context, builder, kind, sig, args, w_i=0, sc_i=4, x_i=6, h_i=2)

        return i32x8(w, woff, h, hoff, sc, soff, x, xoff), codegen

    return _dot


def _make_dot_q6k_sb(kind):
    @intrinsic
    def _dot(typingctx, w, woff, h, hoff, sc, soff, x, xoff):
        """One Q6_K superblock (256 elements) as integers: sum_k s_k * ((q - 32) . x) over its 16 groups of 16,
        as <8 x i32> partial sums. w[woff:+128]: nibbles, 16 bytes per 32-element block (lanes 0..15 low);
        h[hoff:+64]: llama.cpp's qh bytes (block b's high bits in byte l of h[32*(b//4):] at bits 2*(b%4));
        sc[soff:+8] (uint16): s_2b | s_2b+1 << 8 (int8 scales of block b's two halves); x[xoff:+256] int8."""
        if not (_is_byte_array(w) and _is_byte_array(h) and _is_byte_array(x) and isinstance(sc, types.Array)
                and sc.dtype == types.uint16 and all(isinstance(t, types.Integer) for t in (woff, hoff, soff, xoff))):
            return None

        def codegen(context, builder, sig, args):
            wa, wo, ha, ho, sa, so, xa, xo = args
            wo = context.cast(builder, wo, sig.args[1], types.intp)
            ho = context.cast(builder, ho, sig.args[3], types.intp)
            xo = context.cast(builder, xo, sig.args[7], types.intp)
            s8 = builder.bitcast(_load_vec(context, builder, sig.args[4], sa, so, sig.args[5], _V8I16), _V16I8)
            s16 = builder.sext(s8, _V16I16)                                   # lane 2b, 2b+1: block b's scales
            acc = ir.Constant(_V8I32, None)
            hb = [_load_vec(context, builder, sig.args[2], ha, builder.add(ho, ir.Constant(_I64, 32 * i)),
                            types.intp, _V32I8) for i in range(2)]
            for b in range(8):
                if b % 2 == 0:   # one 32-byte load: blocks b (bytes 0..15) and b+1; low / high nibbles of each
                    q2 = _load_vec(context, builder, sig.args[0], wa, builder.add(wo, ir.Constant(_I64, 16 * b)),
                                   types.intp, _V32I8)
                    lo = builder.and_(q2, _vconst(_V32I8, 0x0F))
                    hi4 = builder.and_(builder.lshr(q2, _vconst(_V32I8, 4)), _vconst(_V32I8, 0x0F))
                half = 16 * (b % 2)
                codes = _shuffle(builder, lo, hi4, list(range(half, half + 16)) + list(range(32 + half, 48 + half)))
                y = _load_vec(context, builder, sig.args[6], xa, builder.add(xo, ir.Constant(_I64, 32 * b)),
                              types.intp, _V32I8)
                sh = 2 * (b % 4)                      # bits sh, sh+1 of the qh byte -> bits 4, 5
                h = hb[b // 4]
                if sh < 4:
                    h = builder.shl(h, _vconst(_V32I8, 4 - sh))
                elif sh > 4:
                    h = builder.lshr(h, _vconst(_V32I8, sh - 4))
                u = builder.or_(codes, builder.and_(h, _vconst(_V32I8, 0x30)))    # 0..63
                p = builder.sub(_maddubs_i16(builder, kind, u, y), _maddubs_i16(builder, kind, _vconst(_V32I8, 32), y))
                scale = _shuffle(builder, s16, None, [2 * b] * 8 + [2 * b + 1] * 8)
                acc = _dpwssd(builder, kind, acc, p, scale)
            return acc

        return i32x8(w, woff, h, hoff, sc, soff, x, xoff), codegen

    return _dot


@intrinsic
def _q4k_min_fma(typingctx, acc, sc, soff, xs, xoff, dm):
    """acc + dm * m_j * xs[xoff + j] lane-wise (j < 8), m_j = sc[soff + j] >> 8 (Q4_K's 6-bit mins)."""
    if not (acc == f32x8 and isinstance(sc, types.Array) and sc.dtype == types.uint16 and isinstance(xs, types.Array)
            and xs.dtype == types.float32 and isinstance(soff, types.Integer) and isinstance(xoff, types.Integer)
            and isinstance(dm, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        a, sa, so, xa, xo, d = args
        m = builder.lshr(_load_vec(context, builder, sig.args[1], sa, so, sig.args[2], _V8I16), _vconst(_V8I16, 8))
        mf = builder.uitofp(m, _V8F32)
        xv = _load_vec(context, builder, sig.args[3], xa, xo, sig.args[4], _V8F32)
        dv = _splat(builder, context.cast(builder, d, sig.args[5], types.float32), _V8F32)
        return builder.fadd(a, builder.fmul(builder.fmul(mf, dv), xv, flags=("contract",)), flags=("contract",))

    return f32x8(acc, sc, soff, xs, xoff, dm), codegen


@njit(cache=True)
def _q4k_min_fma_scalar(acc, sc, soff, xs, xoff, dm):
    sc = sc.reshape(sc.size)
    m = np.float32(0.0)
    for j in range(8):
        m += np.float32(sc[soff + j] >> 8) * xs[xoff + j]
    return acc + dm * m


def _hsum8_i32_ir(builder, vs):
    """8 <8 x i32> -> <8 x i32> whose lane r is the sum of vs[r]'s lanes (the _hsum8 tree, integer adds)."""
    def hadd(x, y):
        return builder.add(_shuffle(builder, x, y, (0, 2, 8, 10, 4, 6, 12, 14)),
                           _shuffle(builder, x, y, (1, 3, 9, 11, 5, 7, 13, 15)))

    b = [hadd(vs[2 * i], vs[2 * i + 1]) for i in range(4)]
    c0, c1 = hadd(b[0], b[1]), hadd(b[2], b[3])
    return builder.add(_shuffle(builder, c0, c1, (0, 1, 2, 3, 8, 9, 10, 11)),
                       _shuffle(builder, c0, c1, (4, 5, 6, 7, 12, 13, 14, 15)))


def _make_dot8(kind, fmt):
    """8 consecutive 32-blocks of one row as one i32x8 whose lane b is block b's exact integer dot with x:
    the blocks' partial-sum vectors are reduced by one shuffle/add tree (7 adds for 8 blocks), so the row
    then needs one int->float conversion and one multiply-add per 8 blocks instead of per block.
    fmt 'q4': w[woff:+128] paired nibbles (blocks 2k, 2k+1 in the low / high nibbles of the 32 bytes at 32k);
    'q5': as q4 with the 5th bits from h[hoff:+8] (uint32 per block); 'q8': w[woff:+256] int8. x[xoff:+256]."""
    if fmt == "q5":
        @intrinsic
        def _dot(typingctx, w, woff, h, hoff, x, xoff):
            if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(h, types.Array) and h.dtype == types.uint32
                    and all(isinstance(t, types.Integer) for t in (woff, hoff, xoff))):
                return None

            def codegen(context, builder, sig, args):
                wa, wo, ha, ho, xa, xo = args
                hv = _load_vec(context, builder, sig.args[2], ha, ho, sig.args[3], _V8I32)
                return _dot8_ir(context, builder, kind, fmt, sig.args[0], wa, wo, sig.args[1], sig.args[4], xa, xo,
                                sig.args[5], hv)

            return i32x8(w, woff, h, hoff, x, xoff), codegen
    else:
        @intrinsic
        def _dot(typingctx, w, woff, x, xoff):
            if not (_is_byte_array(w) and _is_byte_array(x) and isinstance(woff, types.Integer)
                    and isinstance(xoff, types.Integer)):
                return None

            def codegen(context, builder, sig, args):
                wa, wo, xa, xo = args
                return _dot8_ir(context, builder, kind, fmt, sig.args[0], wa, wo, sig.args[1], sig.args[2], xa, xo,
                                sig.args[3], None)

            return i32x8(w, woff, x, xoff), codegen

    return _dot


def _dot8_ir(context, builder, kind, fmt, wt, wa, wo, wot, xt, xa, xo, xot, hv):
    wo = context.cast(builder, wo, wot, types.intp)
    xo = context.cast(builder, xo, xot, types.intp)

    def load(ty, a, base, off, vty):
        return _load_vec(context, builder, ty, a, builder.add(base, ir.Constant(_I64, off)), types.intp, vty)

    parts = []
    for k in range(4):
        x0 = load(xt, xa, xo, 64 * k, _V32I8)
        x1 = load(xt, xa, xo, 64 * k + 32, _V32I8)
        if fmt == "q8":
            w0 = load(wt, wa, wo, 64 * k, _V32I8)
            w1 = load(wt, wa, wo, 64 * k + 32, _V32I8)
            parts += [_madd(builder, kind, w0, x0, u_signed=True), _madd(builder, kind, w1, x1, u_signed=True)]
            continue
        q = load(wt, wa, wo, 32 * k, _V32I8)
        lo = builder.and_(q, _vconst(_V32I8, 0x0F))
        hi = builder.lshr(q, _vconst(_V32I8, 4))
        if fmt == "q5":
            h0 = builder.extract_element(hv, ir.Constant(_I32, 2 * k))
            h1 = builder.extract_element(hv, ir.Constant(_I32, 2 * k + 1))
            lo = builder.or_(lo, _high_bits_32(builder, h0, 0x10))
            hi = builder.or_(hi, _high_bits_32(builder, h1, 0x10))
        parts += [_madd(builder, kind, lo, x0), _madd(builder, kind, hi, x1)]
    return _hsum8_i32_ir(builder, parts)


# Rows of 4 Q8_0 blocks (128 values: a predictor's B, n_ff rows of its rank) two at a time. A row-at-a-time dot
# spends more on its horizontal sum than on its 4 blocks; here one 8-block dot covers two rows (blocks 0-3 of
# row A, 4-7 of row B, the same 128 activation bytes for both), and rows8_f32 sums the block products of 8 rows
# with one shuffle tree. Every row's float sum is (b0 + b1) + (b2 + b3) of its products b_k = q_k * (d_k xd_k),
# whichever lanes it took.

def _make_dot8_rows2(kind):
    @intrinsic
    def _dot(typingctx, w, off0, off1, x, xoff):
        """See dot8_q8_rows2."""
        if not (_is_byte_array(w) and _is_byte_array(x)
                and all(isinstance(t, types.Integer) for t in (off0, off1, xoff))):
            return None

        def codegen(context, builder, sig, args):
            wa, xa = args[0], args[3]
            o0, o1, xo = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 4))

            def load(ty, a, base, off, vty):
                return _load_vec(context, builder, ty, a, builder.add(base, ir.Constant(_I64, off)), types.intp, vty)

            parts = []
            for k in range(4):               # 64 bytes (two blocks) a step: row A's blocks, then row B's
                base = o0 if k < 2 else o1
                h = 64 * (k % 2)
                for b in (0, 32):
                    parts.append(_madd(builder, kind, load(sig.args[0], wa, base, h + b, _V32I8),
                                       load(sig.args[3], xa, xo, h + b, _V32I8), u_signed=True))
            return _hsum8_i32_ir(builder, parts)

        return i32x8(w, off0, off1, x, xoff), codegen

    return _dot


def _make_scale8_rows2(hw: bool):
    @intrinsic
    def _scale(typingctx, p, sc, soff0, soff1, xd, xoff):
        """See scale8_rows2."""
        if not (p == i32x8 and isinstance(sc, types.Array) and sc.dtype == types.uint16
                and isinstance(xd, types.Array) and xd.dtype == types.float32
                and all(isinstance(t, types.Integer) for t in (soff0, soff1, xoff))):
            return None

        def codegen(context, builder, sig, args):
            pv, sa, s0, s1, xa, xo = args
            v4 = ir.VectorType(_I16, 4)
            d0 = _load_vec(context, builder, sig.args[1], sa, s0, sig.args[2], v4)
            d1 = _load_vec(context, builder, sig.args[1], sa, s1, sig.args[3], v4)
            v = _shuffle(builder, d0, d1, range(8))                               # row A's 4 scales, row B's
            d = _f16x8_ir(builder, v, hw)
            x4 = _load_vec(context, builder, sig.args[4], xa, xo, sig.args[5], ir.VectorType(_F32, 4))
            xv = _shuffle(builder, x4, x4, (0, 1, 2, 3, 0, 1, 2, 3))
            return builder.fmul(builder.sitofp(pv, _V8F32), builder.fmul(d, xv))

        return f32x8(p, sc, soff0, soff1, xd, xoff), codegen

    return _scale


@intrinsic
def rows8_f32(typingctx, v0, v1, v2, v3):
    """Four f32x8 of block products (each: row A's 4 blocks, then row B's) -> one f32x8 whose lane 2k is v_k's
    row A sum and lane 2k + 1 its row B sum, each (b0 + b1) + (b2 + b3)."""
    if not all(v == f32x8 for v in (v0, v1, v2, v3)):
        return None

    def codegen(context, builder, sig, args):
        ev, od = tuple(range(0, 16, 2)), tuple(range(1, 16, 2))

        def pairs(a, b):                     # lane i: a's (or b's) lanes 2i + 2i+1
            return builder.fadd(_shuffle(builder, a, b, ev), _shuffle(builder, a, b, od))

        a, b, c, d = args
        return pairs(pairs(a, b), pairs(c, d))

    return f32x8(v0, v1, v2, v3), codegen


@intrinsic
def first_f32(typingctx, v):
    """Lane 0 of an f32x8."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], ir.Constant(_I32, 0))

    return types.float32(v), codegen


def _f16x8_ir(builder, v, hw: bool):
    """<8 x i16> fp16 bits -> <8 x float>: vcvtph2ps where the hardware converts (hw), else the bit trick."""
    return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), _V8F32) if hw \
        else _f16_soft_vec_ir(builder, v)


def _make_vfma8(hw: bool):
    @intrinsic
    def _vfma8(typingctx, acc, p, sc, soff, xd, xoff):
        """acc + sitofp(p) * f16(sc[soff:+8]) * xd[xoff:+8], lane-wise (p from dot8_*: lane b = block b)."""
        if not (acc == f32x8 and p == i32x8 and isinstance(sc, types.Array) and sc.dtype == types.uint16
                and isinstance(xd, types.Array) and xd.dtype == types.float32
                and isinstance(soff, types.Integer) and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            a, pv, sa, so, xa, xo = args
            v = _load_vec(context, builder, sig.args[2], sa, so, sig.args[3], _V8I16)
            d = _f16x8_ir(builder, v, hw)
            s = builder.fmul(d, _load_vec(context, builder, sig.args[4], xa, xo, sig.args[5], _V8F32))
            prod = builder.fmul(builder.sitofp(pv, _V8F32), s, flags=("contract",))
            return builder.fadd(a, prod, flags=("contract",))

        return f32x8(acc, p, sc, soff, xd, xoff), codegen

    return _vfma8


def _make_vfma8_off(hw: bool):
    @intrinsic
    def _vfma8_off(typingctx, acc, p, sc, soff, xd, xs, xoff):
        """acc + f16(sc[soff:+8]) * (sitofp(p) * xd[xoff:+8] - 8 xs[xoff:+8]), lane-wise (Q4_0's blocks with their
        -8 offset: xs = xd * the block's sum of x codes)."""
        if not (acc == f32x8 and p == i32x8 and isinstance(sc, types.Array) and sc.dtype == types.uint16
                and all(isinstance(a, types.Array) and a.dtype == types.float32 for a in (xd, xs))
                and isinstance(soff, types.Integer) and isinstance(xoff, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            a, pv, sa, so, xa, xsa, xo = args
            v = _load_vec(context, builder, sig.args[2], sa, so, sig.args[3], _V8I16)
            d = _f16x8_ir(builder, v, hw)
            xdv = _load_vec(context, builder, sig.args[4], xa, xo, sig.args[6], _V8F32)
            xsv = _load_vec(context, builder, sig.args[5], xsa, xo, sig.args[6], _V8F32)
            t = builder.fsub(builder.fmul(builder.sitofp(pv, _V8F32), xdv, flags=("contract",)),
                             builder.fmul(xsv, _vconst(_V8F32, 8.0)), flags=("contract",))
            return builder.fadd(a, builder.fmul(t, d, flags=("contract",)), flags=("contract",))

        return f32x8(acc, p, sc, soff, xd, xs, xoff), codegen

    return _vfma8_off


def _variants(factory):
    """{kind: intrinsic} for the vector paths."""
    return {k: factory(k) for k in ("vnni", "avx2", "generic")}


_DOT_Q4 = _variants(_make_dot_q4)
_DOT_Q4X2 = _variants(_make_dot_q4x2)
_DOT_Q5 = _variants(_make_dot_q5)
_DOT_Q5X2 = _variants(_make_dot_q5x2)
_DOT_Q6 = _variants(_make_dot_q6)
_DOT_Q8 = _variants(_make_dot_q8)
_DOT_Q4K_SB = _variants(_make_dot_q4k_sb)
_DOT_Q5K_SB = _variants(_make_dot_q5k_sb)
_DOT_Q6K_SB = _variants(_make_dot_q6k_sb)
_DOT8_Q4 = _variants(lambda k: _make_dot8(k, "q4"))
_DOT8_Q5 = _variants(lambda k: _make_dot8(k, "q5"))
_DOT8_Q8 = _variants(lambda k: _make_dot8(k, "q8"))
_vfma8_hw = _make_vfma8(True)
_vfma8_soft = _make_vfma8(False)
_vfma8_off_hw = _make_vfma8_off(True)
_vfma8_off_soft = _make_vfma8_off(False)


@intrinsic
def _f16_hw(typingctx, h):
    """fp16 bits -> float32 with `fpext half` (one vcvtph2ps with F16C)."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint16)
        return builder.fpext(builder.bitcast(v, ir.HalfType()), _F32)

    return types.float32(h), codegen


def _f16_soft_ir(builder, v):
    """IR of _f16_soft on an i16 value (see there)."""
    v = builder.zext(v, _I32)
    o = builder.shl(builder.and_(v, ir.Constant(_I32, 0x7FFF)), ir.Constant(_I32, 13))
    f = builder.fmul(builder.bitcast(o, _F32), ir.Constant(_F32, 2.0**112))
    fi = builder.bitcast(f, _I32)
    infnan = builder.icmp_unsigned(">=", builder.and_(v, ir.Constant(_I32, 0x7C00)), ir.Constant(_I32, 0x7C00))
    fi = builder.select(infnan, builder.or_(o, ir.Constant(_I32, 0x7F800000)), fi)
    sign = builder.shl(builder.and_(v, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 16))
    return builder.bitcast(builder.or_(fi, sign), _F32)


def _make_vscale(hw: bool):
    @intrinsic
    def _vscale(typingctx, h, s):
        """splat(fp16 h -> float) * splat(s) as an f32x8.

        With F16C the i16 is splatted first and converted as a vector (vpbroadcastw + vcvtph2ps ymm):
        converting a scalar half instead lowers to vpinsrw into an arbitrary register, a false
        dependency that chained every block's scale onto the previous block's FMA."""
        if not (isinstance(h, types.Integer) and isinstance(s, types.Float)):
            return None

        def codegen(context, builder, sig, args):
            hv = context.cast(builder, args[0], sig.args[0], types.uint16)
            sv = _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _V8F32)
            if hw:
                hs = _splat(builder, hv, ir.VectorType(_I16, 8))
                dv = builder.fpext(builder.bitcast(hs, ir.VectorType(ir.HalfType(), 8)), _V8F32)
            else:
                dv = _splat(builder, _f16_soft_ir(builder, hv), _V8F32)
            return builder.fmul(dv, sv)

        return f32x8(h, s), codegen

    return _vscale


_vscale_hw = _make_vscale(True)
_vscale_soft = _make_vscale(False)


@intrinsic
def _f16_soft(typingctx, h):
    """fp16 bits -> float32 without any half-precision support (no libcalls).

    Shift exponent+mantissa into float32 position ((h & 0x7fff) << 13), reinterpret as float and multiply
    by 2**112 to re-bias the exponent (15 -> 127); the multiply also normalises fp16 subnormals.  Inf/NaN
    (exponent all ones) get the float32 all-ones exponent; finally copy the sign bit."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _f16_soft_ir(builder, context.cast(builder, args[0], sig.args[0], types.uint16))

    return types.float32(h), codegen


def _prefetch_codegen(locality: int):
    """Codegen of `llvm.prefetch` (read, data cache) of &ary.flat[off] with the given locality (3: every cache
    level, prefetcht0; 2: L2 and beyond, prefetcht1)."""
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(arr.data, [o]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
        return context.get_dummy_value()
    return codegen


@intrinsic
def prefetch(typingctx, ary, off):
    """Hint the cache line holding &ary.flat[off] (element offset) into all cache levels (`llvm.prefetch`,
    read, locality 3): for gathers of rows at known, scattered positions, whose loads would otherwise each
    wait on DRAM in turn. No path token: it is the same on every path (a no-op where the target has none)."""
    if not (isinstance(ary, types.Array) and isinstance(off, types.Integer)):
        return None
    return types.none(ary, off), _prefetch_codegen(3)


@intrinsic
def prefetch_l2(typingctx, ary, off):
    """prefetch into L2, not L1 (locality 2, x86 prefetcht1): for whole pieces of a gather fetched well before
    their turn. On a Zen 4 EPYC, reading a random half of 1 / 2 / 4 KB pieces of a 512 MB buffer (2 threads,
    one load per line) ran at 0.54 / 0.60 / 0.68 of the rate of reading all of them; prefetching each piece
    whole 8 pieces ahead with locality 2 (or 1) lifted that to 0.51-0.66 / 0.71 / 0.83-0.88, with locality 3
    (or 0) not at all (scratch, 2026-12-06)."""
    if not (isinstance(ary, types.Array) and isinstance(off, types.Integer)):
        return None
    return types.none(ary, off), _prefetch_codegen(2)


def _q6_block_codes(context, builder, qty, qa, off, offty):
    """The 128 6-bit codes (0..63) of one 96-byte block of a Q6_K column bundle at qa.flat[off] (layout:
    sparse_ffn.bundle_q6k) as four <32 x i8>, rows 32k .. 32k + 31 of the block in vector k (in the bundle's byte
    order within each 32). Bytes 0..31 hold rows 0..31 (low nibbles) and 32..63 (high), bytes 32..63 rows 64..127
    alike, bytes 64..95 the high 2 bits of rows p, 32 + p, 64 + p, 96 + p in bits 0-1, 2-3, 4-5, 6-7 of byte p:
    shifted into bits 4-5 and masked, they need no shuffle."""
    o = context.cast(builder, off, offty, types.intp)
    load = lambda k: _load_vec(context, builder, qty, qa, builder.add(o, ir.Constant(_I64, 32 * k)),  # noqa: E731
                               types.intp, _V32I8)
    c = lambda v: _vconst(_V32I8, v)  # noqa: E731
    a, b, h = load(0), load(1), load(2)
    hs = (builder.shl(h, c(4)), builder.shl(h, c(2)), h, builder.lshr(h, c(2)))
    lows = (builder.and_(a, c(15)), builder.lshr(a, c(4)), builder.and_(b, c(15)), builder.lshr(b, c(4)))
    return [builder.or_(lo, builder.and_(hk, c(0x30))) for lo, hk in zip(lows, hs)]


@intrinsic
def q6_pair_block(typingctx, q, off0, off1, x0, x1, acc, aoff, first):
    """acc.flat[aoff:aoff + 128] (int16) = (0 if first else acc) + x0 * q0 + x1 * q1, wrapping: one 128-row block of
    two columns of a Q6_K column bundle (their blocks at q.flat[off0], q.flat[off1]; codes 0..63,
    _q6_block_codes) times the int8 values x0, x1. The two columns' bytes interleaved (vpunpck{l,h}bw, per 128-bit
    lane) into one vpmaddubsw per 16 rows: |x0 q0 + x1 q1| <= 2 * 63 * 127, no saturation; the sums wrap in int16
    (exact once the caller subtracts 32 sum(x) and the result fits, sparse_ffn._q6k_pairs). The bundle's byte order
    within each 32 rows (quarters 1 and 2 swapped) makes the interleave's lanes come out as rows in order."""
    if not (_is_byte_array(q) and isinstance(acc, types.Array) and acc.dtype == types.int16
            and all(isinstance(t, types.Integer) for t in (off0, off1, x0, x1, aoff))
            and isinstance(first, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        qa, o0, o1, a0, a1, acca, ao, fst = args
        qty = sig.args[0]
        c0 = _q6_block_codes(context, builder, qty, qa, o0, sig.args[1])
        c1 = _q6_block_codes(context, builder, qty, qa, o1, sig.args[2])
        xb0 = builder.trunc(context.cast(builder, a0, sig.args[3], types.int64), _I8)
        xb1 = builder.trunc(context.cast(builder, a1, sig.args[4], types.int64), _I8)
        xs = _shuffle(builder, _splat(builder, xb0, _V32I8), _splat(builder, xb1, _V32I8),
                      [0 if t % 2 == 0 else 32 for t in range(32)])            # x0, x1, x0, x1, ...
        base = context.cast(builder, ao, sig.args[6], types.intp)
        kind = "avx2" if HAS_AVX2 else "generic"
        for k in range(4):
            for half in (0, 8):             # vpunpck{l,h}bw: bytes half..half + 7 of each 128-bit lane, paired
                idx = []
                for lane in (0, 16):
                    for t in range(half, half + 8):
                        idx += [lane + t, 32 + lane + t]
                p = _maddubs_i16(builder, kind, _shuffle(builder, c0[k], c1[k], idx), xs)
                off = builder.add(base, ir.Constant(_I64, 32 * k + 2 * half))
                ptr = _elem_ptr(context, builder, sig.args[5], acca, off, types.intp, _V16I16)
                old = builder.select(fst, ir.Constant(_V16I16, None), builder.load(ptr, align=2))
                builder.store(builder.add(old, p), ptr, align=2)
        return context.get_dummy_value()

    return types.none(q, off0, off1, x0, x1, acc, aoff, first), codegen


@intrinsic
def widen_scaled_i16(typingctx, acc16, off, sc, soff, acc32, first, c):
    """acc32.flat[off:off + 16] (int32) = (0 if first else acc32) + sc.flat[soff:soff + 16] * (acc16.flat[off:off + 16]
    - c) (int16, wrapping, then sign-extended; sc int8): a Q6_K bundle batch's sums of x q, centred by c = 32 sum(x)
    and scaled by the rows' sub-block scales, into the group's int32 sums."""
    if not (isinstance(acc16, types.Array) and acc16.dtype == types.int16 and isinstance(acc32, types.Array)
            and acc32.dtype == types.int32 and isinstance(sc, types.Array) and sc.dtype == types.int8
            and isinstance(off, types.Integer) and isinstance(soff, types.Integer)
            and isinstance(first, types.Boolean) and isinstance(c, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a16, o, sa, so, a32, fst, cv = args
        v16 = builder.load(_elem_ptr(context, builder, sig.args[0], a16, o, sig.args[1], _V16I16), align=2)
        cs = _splat(builder, builder.trunc(context.cast(builder, cv, sig.args[6], types.int64), _I16), _V16I16)
        s8 = _load_vec(context, builder, sig.args[2], sa, so, sig.args[3], _V16I8)
        w = builder.mul(builder.sext(builder.sub(v16, cs), _iv(16)), builder.sext(s8, _iv(16)))
        ptr = _elem_ptr(context, builder, sig.args[4], a32, o, sig.args[1], _iv(16))
        old = builder.select(fst, ir.Constant(_iv(16), None), builder.load(ptr, align=4))
        builder.store(builder.add(old, w), ptr, align=4)
        return context.get_dummy_value()

    return types.none(acc16, off, sc, soff, acc32, first, c), codegen


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
def _dot_q4x2_scalar(w, woff, x, xoff):
    w = w.reshape(w.size)
    x = x.reshape(x.size)
    s0 = np.int32(0)
    s1 = np.int32(0)
    for j in range(32):
        q = np.int32(w[woff + j])
        s0 += (q & 15) * np.int32(x[xoff + j])
        s1 += (q >> 4) * np.int32(x[xoff + 32 + j])
    return (s0, s1)


@njit(cache=True)
def _dot_q5x2_scalar(w, woff, qh0, qh1, x, xoff):
    w = w.reshape(w.size)
    x = x.reshape(x.size)
    h0 = np.uint32(qh0)
    h1 = np.uint32(qh1)
    s0 = np.int32(0)
    s1 = np.int32(0)
    for j in range(32):
        q = np.int32(w[woff + j])
        v0 = (q & 15) | (np.int32((h0 >> np.uint32(j)) & np.uint32(1)) << 4)
        v1 = (q >> 4) | (np.int32((h1 >> np.uint32(j)) & np.uint32(1)) << 4)
        s0 += v0 * np.int32(x[xoff + j])
        s1 += v1 * np.int32(x[xoff + 32 + j])
    return (s0, s1)


@njit(cache=True)
def _dot_q45k_sb_scalar(w, woff, h, hoff, sc, soff, x, xoff, five):
    """Q4_K's superblock sum, or Q5_K's (five: the 5th bits from h)."""
    w = w.reshape(w.size)
    h = h.reshape(h.size)
    sc = sc.reshape(sc.size)
    x = x.reshape(x.size)
    s = np.int32(0)
    for j in range(8):
        d = np.int32(0)
        for l in range(32):
            q = np.int32(w[woff + 32 * (j >> 1) + l])
            q = (q >> 4) if j & 1 else (q & 15)
            if five:
                q |= ((np.int32(h[hoff + l]) >> j) & 1) << 4
            d += q * np.int32(x[xoff + 32 * j + l])
        s += np.int32(sc[soff + j] & 0xFF) * d
    return s


@njit(cache=True)
def _dot_q4k_sb_scalar(w, woff, sc, soff, x, xoff):
    return _dot_q45k_sb_scalar(w, woff, w, 0, sc, soff, x, xoff, False)


@njit(cache=True)
def _dot_q5k_sb_scalar(w, woff, h, hoff, sc, soff, x, xoff):
    return _dot_q45k_sb_scalar(w, woff, h, hoff, sc, soff, x, xoff, True)


@njit(cache=True)
def _dot_q6k_sb_scalar(w, woff, h, hoff, sc, soff, x, xoff):
    s = np.int32(0)
    for b in range(8):
        v = np.int32(sc.reshape(sc.size)[soff + b])
        s_lo = ((v & 0xFF) ^ 0x80) - 0x80
        s_hi = ((v >> 8) ^ 0x80) - 0x80
        p = _dot_q6_scalar(w, woff + 16 * b, h, hoff + 32 * (b >> 2), 2 * (b & 3), x, xoff + 32 * b)
        s += s_lo * p[0] + s_hi * p[1]
    return s


@njit(cache=True)
def _dot8_q4_scalar(w, woff, x, xoff):
    a0, a1 = _dot_q4x2_scalar(w, woff, x, xoff)
    a2, a3 = _dot_q4x2_scalar(w, woff + 32, x, xoff + 64)
    a4, a5 = _dot_q4x2_scalar(w, woff + 64, x, xoff + 128)
    a6, a7 = _dot_q4x2_scalar(w, woff + 96, x, xoff + 192)
    return (a0, a1, a2, a3, a4, a5, a6, a7)


@njit(cache=True)
def _dot8_q5_scalar(w, woff, h, hoff, x, xoff):
    h = h.reshape(h.size)
    a0, a1 = _dot_q5x2_scalar(w, woff, h[hoff], h[hoff + 1], x, xoff)
    a2, a3 = _dot_q5x2_scalar(w, woff + 32, h[hoff + 2], h[hoff + 3], x, xoff + 64)
    a4, a5 = _dot_q5x2_scalar(w, woff + 64, h[hoff + 4], h[hoff + 5], x, xoff + 128)
    a6, a7 = _dot_q5x2_scalar(w, woff + 96, h[hoff + 6], h[hoff + 7], x, xoff + 192)
    return (a0, a1, a2, a3, a4, a5, a6, a7)


@njit(cache=True)
def _dot8_q8_scalar(w, woff, x, xoff):
    return (_dot_q8_scalar(w, woff, x, xoff), _dot_q8_scalar(w, woff + 32, x, xoff + 32),
            _dot_q8_scalar(w, woff + 64, x, xoff + 64), _dot_q8_scalar(w, woff + 96, x, xoff + 96),
            _dot_q8_scalar(w, woff + 128, x, xoff + 128), _dot_q8_scalar(w, woff + 160, x, xoff + 160),
            _dot_q8_scalar(w, woff + 192, x, xoff + 192), _dot_q8_scalar(w, woff + 224, x, xoff + 224))


@njit(cache=True)
def _vfma8_scalar(acc, p, sc, soff, xd, xoff):
    sc = sc.reshape(sc.size)
    xd = xd.reshape(xd.size)
    for b in range(8):
        acc += np.float32(p[b]) * (_f16_soft(sc[soff + b]) * xd[xoff + b])
    return acc


@njit(cache=True)
def _vfma8_off_scalar(acc, p, sc, soff, xd, xs, xoff):
    sc = sc.reshape(sc.size)
    xd = xd.reshape(xd.size)
    xs = xs.reshape(xs.size)
    for b in range(8):
        acc += _f16_soft(sc[soff + b]) * (np.float32(p[b]) * xd[xoff + b] - np.float32(8.0) * xs[xoff + b])
    return acc


@njit(cache=True)
def _dot_q8_scalar(w, woff, x, xoff):
    w = w.reshape(w.size)
    x = x.reshape(x.size)
    s = np.int32(0)
    for j in range(32):
        s += np.int32(w[woff + j]) * np.int32(x[xoff + j])
    return s


@intrinsic
def load_i8x8(typingctx, q, qoff):
    """8 int8 at q.flat[qoff] sign-extended to an i32x8 (feed it to vfma to scale and accumulate). Generic
    LLVM vector IR: runs on every CPU (the sparse FFN's down rows use it)."""
    if not (_is_byte_array(q) and isinstance(qoff, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v = _load_vec(context, builder, sig.args[0], args[0], args[1], sig.args[1], ir.VectorType(_I8, 8))
        return builder.sext(v, _V8I32)

    return i32x8(q, qoff), codegen


@intrinsic
def store_f32x8(typingctx, out, off, v):
    """out.flat[off:off+8] = v for a float32 array out (unaligned vector store)."""
    if not (isinstance(out, types.Array) and out.dtype == types.float32 and isinstance(off, types.Integer)
            and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(arr.data, [o]), _V8F32.as_pointer())
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.none(out, off, v), codegen


@intrinsic
def nib_pair_i16(typingctx, q, off0, off1, x0, x1):
    """Column-bundle building block: the 16 code bytes at q.flat[off0] (column j0) and q.flat[off1] (column
    j1), each holding 32 4-bit codes (byte t: row t low nibble, row 16 + t high nibble), times the int8
    values x0 and x1: returns (rows 0..15, rows 16..31) of q0 * x0 + q1 * x1 as 16 int16 lanes each, carried
    bitcast in an i32x8 (|lane| <= 2 * 15 * 128, so 8 calls can be summed in int16 with add_i16). Generic
    LLVM vector IR (x86: vpmovzxbw / vpmullw / vpaddw)."""
    if not (_is_byte_array(q) and all(isinstance(t, types.Integer) for t in (off0, off1, x0, x1))):
        return None

    def codegen(context, builder, sig, args):
        qa, o0, o1, a0, a1 = args
        b0 = _load_vec(context, builder, sig.args[0], qa, o0, sig.args[1], _V16I8)
        b1 = _load_vec(context, builder, sig.args[0], qa, o1, sig.args[2], _V16I8)
        s0 = _splat(builder, builder.trunc(context.cast(builder, a0, sig.args[3], types.int64), _I16), _V16I16)
        s1 = _splat(builder, builder.trunc(context.cast(builder, a1, sig.args[4], types.int64), _I16), _V16I16)
        out = []
        for lo in (True, False):
            n0 = builder.and_(b0, _vconst(_V16I8, 0x0F)) if lo else builder.lshr(b0, _vconst(_V16I8, 4))
            n1 = builder.and_(b1, _vconst(_V16I8, 0x0F)) if lo else builder.lshr(b1, _vconst(_V16I8, 4))
            p = builder.add(builder.mul(builder.zext(n0, _V16I16), s0), builder.mul(builder.zext(n1, _V16I16), s1))
            out.append(builder.bitcast(p, _V8I32))
        return context.make_tuple(builder, sig.return_type, out)

    return types.UniTuple(i32x8, 2)(q, off0, off1, x0, x1), codegen


def _make_nib_pairs(chunks: int, x86: bool):
    nb = 16 * chunks                       # code bytes of each column: `chunks` 32-output chunks
    vb = ir.VectorType(_I8, nb)
    vw = ir.VectorType(_I16, nb)
    maddubs = "llvm.x86.avx2.pmadd.ub.sw" if chunks == 2 else "llvm.x86.avx512.pmaddubs.w.512"

    @intrinsic
    def _pairs(typingctx, q, off0, off1, x0, x1):
        """See nib_pairs_i16."""
        if not (_is_byte_array(q) and all(isinstance(t, types.Integer) for t in (off0, off1, x0, x1))):
            return None

        def codegen(context, builder, sig, args):
            qa, o0, o1, a0, a1 = args
            b0 = _load_vec(context, builder, sig.args[0], qa, o0, sig.args[1], vb)
            b1 = _load_vec(context, builder, sig.args[0], qa, o1, sig.args[2], vb)
            xb0 = builder.trunc(context.cast(builder, a0, sig.args[3], types.int64), _I8)
            xb1 = builder.trunc(context.cast(builder, a1, sig.args[4], types.int64), _I8)
            xs = _shuffle(builder, _splat(builder, xb0, vb), _splat(builder, xb1, vb),
                          [0 if t % 2 == 0 else nb for t in range(nb)])          # x0, x1, x0, x1, ...
            out = []
            for lo in (True, False):
                n0 = builder.and_(b0, _vconst(vb, 0x0F)) if lo else builder.lshr(b0, _vconst(vb, 4))
                n1 = builder.and_(b1, _vconst(vb, 0x0F)) if lo else builder.lshr(b1, _vconst(vb, 4))
                for half in (0, 8):      # vpunpck{l,h}bw per 128-bit lane (one lane = one chunk): (q0_t, q1_t)
                    idx = []
                    for lane in range(0, nb, 16):
                        for t in range(half, half + 8):
                            idx += [lane + t, nb + lane + t]
                    u = _shuffle(builder, n0, n1, idx)
                    if x86:
                        p16 = builder.call(_x86_fn(builder, maddubs, ir.VectorType(_I16, nb // 2), [vb, vb]), [u, xs])
                    else:
                        pr = builder.mul(builder.zext(u, vw), builder.sext(xs, vw))
                        p16 = builder.add(_shuffle(builder, pr, None, range(0, nb, 2)),
                                          _shuffle(builder, pr, None, range(1, nb, 2)))
                    out.append(builder.bitcast(p16, _iv(nb // 4)))
            return context.make_tuple(builder, sig.return_type, out)

        return types.UniTuple(SimdVector("i32", nb // 4), 4)(q, off0, off1, x0, x1), codegen

    return _pairs


_NIB_PAIRS = {(chunks, x86): _make_nib_pairs(chunks, x86) for chunks in (2, 4) for x86 in (True, False)}


def _bundle_chunks(kind: str) -> int:
    return 4 if _tile_rows(kind) == 16 else 2


def bundle_chunks(path):
    """C, the 32-output chunks one column-bundle step takes on this vector path (a compile-time constant): 4 where
    the row tiles are zmm (AVX512-VNNI: a whole cache line of each column), else 2."""


def nib_pairs_i16(path, q, off0, off1, x0, x1):
    """Column-bundle building block over C = bundle_chunks(path) chunks: the 16 C code bytes at q.flat[off0]
    (column j0: chunk c, c+1, ..., 16 bytes each, byte t holding row t in the low nibble and row 16 + t in the
    high one) and at q.flat[off1] (column j1), times the int8 values x0 and x1. Returns four vectors of 8 C
    int16 lanes (carried in the path's tile int32 vector: i32x8 for C = 2, i32x16 for C = 4) of q0 * x0 + q1 * x1:
    rows 0..7, 8..15, 16..23, 24..31, each 128-bit lane one chunk's 8 rows. |lane| <= 2 * 15 * 127, so 8 calls
    can be summed with add_i16. x86: byte pairs interleaved (vpunpck{l,h}bw) into one vpmaddubsw per 16 C lanes;
    generic IR elsewhere. Vector paths."""


@overload(bundle_chunks, inline="always")
def _ov_bundle_chunks(path):
    k = _vector_kind(path)
    if k is not None:
        c = _bundle_chunks(k)
        return lambda path: c


@overload(nib_pairs_i16, inline="always")
def _ov_nib_pairs_i16(path, q, off0, off1, x0, x1):
    k = _vector_kind(path)
    if k is not None:
        f = _NIB_PAIRS[(_bundle_chunks(k), k in ("avx2", "vnni"))]
        return lambda path, q, off0, off1, x0, x1: f(q, off0, off1, x0, x1)


def _int_vec(t) -> int | None:
    """The lanes of an i32x8 / i32x16 type, else None."""
    return t.lanes if isinstance(t, SimdVector) and t.elem == "i32" else None


@intrinsic
def add_i16(typingctx, a, b):
    """Lane-wise int16 sum of two i32x8 (i32x16) carrying 16 (32) int16 lanes (nib_pair_i16, nib_pairs_i16)."""
    r = _int_vec(a)
    if r is None or a != b:
        return None
    v16 = ir.VectorType(_I16, 2 * r)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.add(builder.bitcast(args[0], v16), builder.bitcast(args[1], v16)), _iv(r))

    return a(a, b), codegen


@intrinsic
def widen_i16(typingctx, a):
    """2R int16 lanes (carried in an R-lane int32 vector) -> (lanes 0..R-1, lanes R..2R-1) sign-extended."""
    r = _int_vec(a)
    if r is None:
        return None

    def codegen(context, builder, sig, args):
        w = builder.sext(builder.bitcast(args[0], ir.VectorType(_I16, 2 * r)), ir.VectorType(_I32, 2 * r))
        return context.make_tuple(builder, sig.return_type, [_shuffle(builder, w, None, range(0, r)),
                                                             _shuffle(builder, w, None, range(r, 2 * r))])

    return types.UniTuple(a, 2)(a), codegen


@intrinsic
def add_i32(typingctx, a, b):
    """Lane-wise int32 sum of two i32x8 (or two i32x16)."""
    if _int_vec(a) is None or a != b:
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def store_i32(typingctx, out, off, v):
    """out.flat[off:off+R] = v for an int32 array out and an R-lane int32 vector v (i32x8 / i32x16, or one carrying
    2R int16 lanes): integer sums kept in L1 across a loop that cannot hold them in registers."""
    r = _int_vec(v)
    if not (isinstance(out, types.Array) and out.dtype == types.int32 and isinstance(off, types.Integer)
            and r is not None):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _iv(r)),
                      align=4)
        return context.get_dummy_value()

    return types.none(out, off, v), codegen


@intrinsic
def load_i32(typingctx, a, off, like):
    """a.flat[off:off+R] of an int32 array as an R-lane int32 vector of like's type (like gives only the type)."""
    r = _int_vec(like)
    if not (isinstance(a, types.Array) and a.dtype == types.int32 and isinstance(off, types.Integer)
            and r is not None):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _iv(r)), align=4)

    return like(a, off, like), codegen


@intrinsic
def pair_halves_i32(typingctx, a, b):
    """Two i32x16 -> (a's lanes 0..7 then b's 0..7, a's lanes 8..15 then b's 8..15): a zmm bundle step's sums of
    rows 8k..8k+7 (a) and 8k+8..8k+15 (b) of two chunks as each chunk's 16 consecutive rows (one vpermt2d each)."""
    if _int_vec(a) != 16 or a != b:
        return None

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, sig.return_type,
                                  [_shuffle(builder, args[0], args[1], list(range(0, 8)) + list(range(16, 24))),
                                   _shuffle(builder, args[0], args[1], list(range(8, 16)) + list(range(24, 32)))])

    return types.UniTuple(a, 2)(a, b), codegen


def _make_finish16(has_min: bool):
    v16f = ir.VectorType(_F32, 16)
    v16h = ir.VectorType(ir.HalfType(), 16)
    v16s = ir.VectorType(_I16, 16)

    @intrinsic
    def _finish(typingctx, po, o, isum, scales, doff, moff, xdg, s):
        """See finish16_q4_0 / finish16_q4_1."""
        if not (isinstance(po, types.Array) and po.dtype == types.float32 and _int_vec(isum) == 16
                and isinstance(scales, types.Array) and scales.dtype == types.uint16
                and all(isinstance(t, types.Integer) for t in (o, doff, moff))
                and all(isinstance(t, types.Float) for t in (xdg, s))):
            return None

        def codegen(context, builder, sig, args):
            pa, oo, iv, sa, do, mo, xd, sv = args

            def f16(off, offty):
                h = builder.load(_elem_ptr(context, builder, sig.args[3], sa, off, offty, v16s), align=2)
                return builder.fpext(builder.bitcast(h, v16h), v16f)

            ptr = _elem_ptr(context, builder, sig.args[0], pa, oo, sig.args[1], v16f)
            acc = builder.load(ptr, align=4)
            x = _splat(builder, context.cast(builder, xd, sig.args[6], types.float32), v16f)
            sm = _splat(builder, context.cast(builder, sv, sig.args[7], types.float32), v16f)
            isf = builder.sitofp(iv, v16f)
            d = f16(do, sig.args[4])
            c = ("contract",)
            if has_min:      # po + d (xd isum) + m s
                acc = builder.fadd(acc, builder.fmul(d, builder.fmul(isf, x), flags=c), flags=c)
                acc = builder.fadd(acc, builder.fmul(f16(mo, sig.args[5]), sm, flags=c), flags=c)
            else:            # po + d (xd isum + s), s = -8 gsum
                t = builder.fadd(builder.fmul(isf, x, flags=c), sm, flags=c)
                acc = builder.fadd(acc, builder.fmul(d, t, flags=c), flags=c)
            builder.store(acc, ptr, align=4)
            return context.get_dummy_value()

        return types.none(po, o, isum, scales, doff, moff, xdg, s), codegen

    return _finish


# po.flat[o:o+16] += d * (xdg * isum + s) for 16 consecutive output rows of a Q4_0 column bundle (d: the 16 fp16
# scales at scales.flat[doff]; isum: an i32x16 of integer sums; s = -8 gsum, Q4_0's offset; moff unused), and for
# Q4_1 po += d * (xdg * isum) + m * s (m at scales.flat[moff], s = gsum). The zmm bundle step's finish (AVX-512,
# so F16C): 6-8 instructions per 16 rows.
finish16_q4_0 = _make_finish16(False)
finish16_q4_1 = _make_finish16(True)


@intrinsic
def finish16_q4k(typingctx, po, o, isum, dm, doff, sub, soff, xdg, s):
    """po.flat[o:o+16] += (d sc) * (xdg * isum) + (dn mn) * s for 16 consecutive output rows of one group of a
    Q4_K column bundle (sparse_ffn.bundle_q4k): d, dn = the fp16 d and -dmin at dm.flat[doff], [doff + 32]; sc,
    mn = the 6-bit scale and min bytes at sub.flat[soff], [soff + 32]; isum an i32x16 of integer sums; s = gsum.
    d sc and dn mn are exact in float32 (11 x 6 bits): the Q4_1 finish with Q4_K's per-row scales made on the fly."""
    if not (isinstance(po, types.Array) and po.dtype == types.float32 and _int_vec(isum) == 16
            and isinstance(dm, types.Array) and dm.dtype == types.uint16 and _is_byte_array(sub)
            and all(isinstance(t, types.Integer) for t in (o, doff, soff))
            and all(isinstance(t, types.Float) for t in (xdg, s))):
        return None
    v16f = ir.VectorType(_F32, 16)
    v16h = ir.VectorType(ir.HalfType(), 16)
    v16s = ir.VectorType(_I16, 16)
    v16b = ir.VectorType(_I8, 16)

    def codegen(context, builder, sig, args):
        pa, oo, iv, da, do, sa, so, xd, sv = args
        i64 = ir.IntType(64)

        def at(off, offty, k):
            return builder.add(context.cast(builder, off, offty, types.int64), ir.Constant(i64, k))

        def f16(k):
            h = builder.load(_elem_ptr(context, builder, sig.args[3], da, at(do, sig.args[4], k), types.int64, v16s),
                             align=2)
            return builder.fpext(builder.bitcast(h, v16h), v16f)

        def u8(k):
            b = builder.load(_elem_ptr(context, builder, sig.args[5], sa, at(so, sig.args[6], k), types.int64, v16b),
                             align=1)
            return builder.uitofp(b, v16f)

        c = ("contract",)
        ptr = _elem_ptr(context, builder, sig.args[0], pa, oo, sig.args[1], v16f)
        acc = builder.load(ptr, align=4)
        x = _splat(builder, context.cast(builder, xd, sig.args[7], types.float32), v16f)
        sm = _splat(builder, context.cast(builder, sv, sig.args[8], types.float32), v16f)
        d = builder.fmul(f16(0), u8(0))
        m = builder.fmul(f16(32), u8(32))
        acc = builder.fadd(acc, builder.fmul(d, builder.fmul(builder.sitofp(iv, v16f), x), flags=c), flags=c)
        acc = builder.fadd(acc, builder.fmul(m, sm, flags=c), flags=c)
        builder.store(acc, ptr, align=4)
        return context.get_dummy_value()

    return types.none(po, o, isum, dm, doff, sub, soff, xdg, s), codegen


@intrinsic
def load_f32x8(typingctx, a, off):
    """a.flat[off:off+8] of a float32 array as an f32x8 (unaligned vector load)."""
    if not (isinstance(a, types.Array) and a.dtype == types.float32 and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        o = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(arr.data, [o]), _V8F32.as_pointer())
        return builder.load(ptr, align=4)

    return f32x8(a, off), codegen


@intrinsic
def vmuladd(typingctx, acc, x, y):
    """acc + x * y for f32x8 acc and x; y an f32x8 or a float (splatted). 'contract': one vfmadd."""
    if not (acc == f32x8 and x == f32x8 and (isinstance(y, types.Float) or y == f32x8)):
        return None
    vec_y = y == f32x8

    def codegen(context, builder, sig, args):
        a, xv, yv = args
        if not vec_y:
            yv = _splat(builder, context.cast(builder, yv, sig.args[2], types.float32), _V8F32)
        return builder.fadd(a, builder.fmul(xv, yv, flags=("contract",)), flags=("contract",))

    return f32x8(acc, x, y), codegen


# --------------------------------------------------------------------------------------------------
# Public, path-dispatched building blocks (call from @njit code; `path` is a token from token())
# --------------------------------------------------------------------------------------------------


def vzero(path):
    """Zero accumulator: <8 x float> on vector paths, float32 0 on the scalar path."""


def vfma(path, acc, p, s):
    """acc + float(p) * s (p: block dot from dot_q4/dot_q5/dot_q8)."""


def vfma2(path, acc, p, s_lo, s_hi):
    """acc + float(p[elements 0..15]) * s_lo + float(p[elements 16..31]) * s_hi (p from dot_q6)."""


def vadd(path, a, b):
    """Lane-wise sum of two accumulators."""


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


def dot_q4x2(path, w, woff, x, xoff):
    """Two block dots from 32 paired-nibble bytes at w.flat[woff]: byte j = A_j | B_j << 4; A against
    x.flat[xoff:+32], B against x.flat[xoff+32:+32].  Returns (dot_A, dot_B)."""


def dot_q5x2(path, w, woff, qh0, qh1, x, xoff):
    """dot_q4x2 with 5-bit values: bit j of uint32 qh0 / qh1 is the 5th bit of A_j / B_j."""


def dot_q8(path, w, woff, x, xoff):
    """Block dot: 32 int8 x 32 int8."""


def dot_q4k_sb(path, w, woff, sc, soff, x, xoff):
    """One Q4_K superblock: sum_j sc_j * (sub-block j's nibbles . x), j < 8 (see _make_dot_q4k_sb); an i32x8 of
    partial sums on vector paths, an int32 on scalar. Add with iadd, scale once with vfma."""


def dot_q5k_sb(path, w, woff, h, hoff, sc, soff, x, xoff):
    """One Q5_K superblock: dot_q4k_sb with the 5th bits from h[hoff:+32] (see _make_dot_q5k_sb)."""


def dot_q6k_sb(path, w, woff, h, hoff, sc, soff, x, xoff):
    """One Q6_K superblock: sum_k s_k * ((q - 32) . x) over its 16 groups of 16 (see _make_dot_q6k_sb)."""


def q4k_min_fma(path, acc, sc, soff, xs, xoff, dm):
    """acc + dm * sum_j m_j * xs[xoff + j] over a Q4_K superblock's 8 mins m_j = sc[soff + j] >> 8 (lane-wise on
    vector paths: reduce acc with vsum)."""


def iadd(path, a, b):
    """Lane-wise int32 sum."""


def dot_q4_i32(path, w, woff, x, xoff):
    """dot_q4 reduced to one int32."""


def dot_q5_i32(path, w, woff, qh, x, xoff):
    """dot_q5 reduced to one int32."""


def dot_q8_i32(path, w, woff, x, xoff):
    """dot_q8 reduced to one int32."""


def vscale(path, h, s):
    """fp16 bits h (uint16) -> float, times s: an f32x8 splat on vector paths, a float32 on scalar."""


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


@overload(vadd, inline="always")
def _ov_vadd(path, a, b):
    k = _kind(path)
    if k == "scalar":
        return lambda path, a, b: a + b
    if k is not None:
        return lambda path, a, b: _vadd(a, b)


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


def _pick(k, variants, scalar):
    return scalar if k == "scalar" else variants[k]


@overload(dot_q4, inline="always")
def _ov_dot_q4(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q4, _dot_q4_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot_q5, inline="always")
def _ov_dot_q5(path, w, woff, qh, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q5, _dot_q5_scalar)
        return lambda path, w, woff, qh, x, xoff: f(w, woff, qh, x, xoff)


@overload(dot_q6, inline="always")
def _ov_dot_q6(path, w, woff, h, hoff, shift, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q6, _dot_q6_scalar)
        return lambda path, w, woff, h, hoff, shift, x, xoff: f(w, woff, h, hoff, shift, x, xoff)


@overload(dot_q4x2, inline="always")
def _ov_dot_q4x2(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q4X2, _dot_q4x2_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot_q5x2, inline="always")
def _ov_dot_q5x2(path, w, woff, qh0, qh1, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q5X2, _dot_q5x2_scalar)
        return lambda path, w, woff, qh0, qh1, x, xoff: f(w, woff, qh0, qh1, x, xoff)


@overload(dot_q8, inline="always")
def _ov_dot_q8(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q8, _dot_q8_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot_q4k_sb, inline="always")
def _ov_dot_q4k_sb(path, w, woff, sc, soff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q4K_SB, _dot_q4k_sb_scalar)
        return lambda path, w, woff, sc, soff, x, xoff: f(w, woff, sc, soff, x, xoff)


@overload(dot_q5k_sb, inline="always")
def _ov_dot_q5k_sb(path, w, woff, h, hoff, sc, soff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q5K_SB, _dot_q5k_sb_scalar)
        return lambda path, w, woff, h, hoff, sc, soff, x, xoff: f(w, woff, h, hoff, sc, soff, x, xoff)


@overload(dot_q6k_sb, inline="always")
def _ov_dot_q6k_sb(path, w, woff, h, hoff, sc, soff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT_Q6K_SB, _dot_q6k_sb_scalar)
        return lambda path, w, woff, h, hoff, sc, soff, x, xoff: f(w, woff, h, hoff, sc, soff, x, xoff)


@overload(q4k_min_fma, inline="always")
def _ov_q4k_min_fma(path, acc, sc, soff, xs, xoff, dm):
    k = _kind(path)
    if k is not None:
        f = _q4k_min_fma_scalar if k == "scalar" else _q4k_min_fma
        return lambda path, acc, sc, soff, xs, xoff, dm: f(acc, sc, soff, xs, xoff, dm)


@overload(iadd, inline="always")
def _ov_iadd(path, a, b):
    k = _kind(path)
    if k == "scalar":
        return lambda path, a, b: np.int32(a + b)
    if k is not None:
        return lambda path, a, b: add_i32(a, b)


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


@overload(vscale, inline="always")
def _ov_vscale(path, h, s):
    k = _kind(path)
    if k == "scalar":
        return lambda path, h, s: _f16_soft(h) * np.float32(s)
    if k != "scalar" and F16_NATIVE:
        return lambda path, h, s: _vscale_hw(h, s)
    if k is not None:
        return lambda path, h, s: _vscale_soft(h, s)


@overload(f16_to_f32, inline="always")
def _ov_f16(path, h):
    k = _kind(path)
    if k != "scalar" and F16_NATIVE:
        return lambda path, h: _f16_hw(h)
    if k is not None:
        return lambda path, h: _f16_soft(h)


def dot8_q4(path, w, woff, x, xoff):
    """8 paired-nibble blocks (w.flat[woff:+128]) x int8 x.flat[xoff:+256]: lane b (vector paths; element b of
    an int32 8-tuple on scalar) = block b's exact integer dot. Scale with vfma8."""


def dot8_q5(path, w, woff, h, hoff, x, xoff):
    """dot8_q4 with 5-bit values: the 5th bits of block b in the uint32 h.flat[hoff + b]."""


def dot8_q8(path, w, woff, x, xoff):
    """8 int8 blocks (w.flat[woff:+256]) x int8 x.flat[xoff:+256], per block as dot8_q4."""


def vfma8(path, acc, p, sc, soff, xd, xoff):
    """acc + sum over b < 8 of float(p_b) * f16(sc.flat[soff + b]) * xd.flat[xoff + b] (lane-wise on vector
    paths: reduce acc with vsum)."""


@overload(dot8_q4, inline="always")
def _ov_dot8_q4(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT8_Q4, _dot8_q4_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


@overload(dot8_q5, inline="always")
def _ov_dot8_q5(path, w, woff, h, hoff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT8_Q5, _dot8_q5_scalar)
        return lambda path, w, woff, h, hoff, x, xoff: f(w, woff, h, hoff, x, xoff)


@overload(dot8_q8, inline="always")
def _ov_dot8_q8(path, w, woff, x, xoff):
    k = _kind(path)
    if k is not None:
        f = _pick(k, _DOT8_Q8, _dot8_q8_scalar)
        return lambda path, w, woff, x, xoff: f(w, woff, x, xoff)


def vfma8_off(path, acc, p, sc, soff, xd, xs, xoff):
    """acc + sum over b < 8 of f16(sc.flat[soff + b]) * (float(p_b) * xd.flat[xoff + b] - 8 xs.flat[xoff + b]):
    vfma8 for Q4_0 with its -8 offset folded in (xs: the activation's xd times its block sums of codes), so a row
    needs no second pass over its scales (lane-wise on vector paths: reduce acc with vsum)."""


@overload(vfma8_off, inline="always")
def _ov_vfma8_off(path, acc, p, sc, soff, xd, xs, xoff):
    k = _kind(path)
    if k == "scalar":
        return lambda path, acc, p, sc, soff, xd, xs, xoff: _vfma8_off_scalar(acc, p, sc, soff, xd, xs, xoff)
    if k is not None:
        f = _vfma8_off_hw if F16_NATIVE else _vfma8_off_soft
        return lambda path, acc, p, sc, soff, xd, xs, xoff: f(acc, p, sc, soff, xd, xs, xoff)


def dot8_q8_rows2(path, w, off0, off1, x, xoff):
    """Two rows of 4 int8 blocks (w.flat[off0:+128], w.flat[off1:+128]) x int8 x.flat[xoff:+128]: lane b < 4 is row
    A's block b exact integer dot, lane 4 + b row B's. Vector paths."""


def scale8_rows2(path, p, sc, soff0, soff1, xd, xoff):
    """p (dot8_q8_rows2) -> f32x8 of float(p_b) * (f16(scale) * xd[xoff + b % 4]), row A's scales at sc.flat[soff0:+4],
    row B's at sc.flat[soff1:+4]. Vector paths."""


_DOT8_Q8_ROWS2 = _variants(_make_dot8_rows2)
_SCALE8_ROWS2 = _make_scale8_rows2(F16_NATIVE)


@overload(dot8_q8_rows2, inline="always")
def _ov_dot8_q8_rows2(path, w, off0, off1, x, xoff):
    k = _kind(path)
    if k is not None and k != "scalar":
        f = _DOT8_Q8_ROWS2[k]
        return lambda path, w, off0, off1, x, xoff: f(w, off0, off1, x, xoff)


@overload(scale8_rows2, inline="always")
def _ov_scale8_rows2(path, p, sc, soff0, soff1, xd, xoff):
    k = _kind(path)
    if k is not None and k != "scalar":
        return lambda path, p, sc, soff0, soff1, xd, xoff: _SCALE8_ROWS2(p, sc, soff0, soff1, xd, xoff)


@overload(vfma8, inline="always")
def _ov_vfma8(path, acc, p, sc, soff, xd, xoff):
    k = _kind(path)
    if k == "scalar":
        return lambda path, acc, p, sc, soff, xd, xoff: _vfma8_scalar(acc, p, sc, soff, xd, xoff)
    if k is not None:
        f = _vfma8_hw if F16_NATIVE else _vfma8_soft
        return lambda path, acc, p, sc, soff, xd, xoff: f(acc, p, sc, soff, xd, xoff)


# --------------------------------------------------------------------------------------------------
# 8-row tiles: one vector lane per row (vector paths only)
# --------------------------------------------------------------------------------------------------
#
# For scoring many short rows against one vector (numba_kernels.attention's 4-bit keys), the rows are
# stored interleaved by 8 so that a 32-byte load holds 4 bytes of each of 8 rows: lane j of every
# product is row j's partial dot, accumulated across the row without any horizontal reduction.
# (Row-major rows instead need a horizontal sum per row, which costs more than the row's dot itself.)

def _f16_soft_vec_ir(builder, v):
    """_f16_soft_ir lane-wise on an <8 x i16> vector -> <8 x float>."""
    c = lambda x: _vconst(_V8I32, x)  # noqa: E731
    v = builder.zext(v, _V8I32)
    o = builder.shl(builder.and_(v, c(0x7FFF)), c(13))
    f = builder.fmul(builder.bitcast(o, _V8F32), _vconst(_V8F32, 2.0**112))
    fi = builder.bitcast(f, _V8I32)
    infnan = builder.icmp_unsigned(">=", builder.and_(v, c(0x7C00)), c(0x7C00))
    fi = builder.select(infnan, builder.or_(o, c(0x7F800000)), fi)
    sign = builder.shl(builder.and_(v, c(0x8000)), c(16))
    return builder.bitcast(builder.or_(fi, sign), _V8F32)


def _elem_ptr(context, builder, aryty, ary, off, offty, ty):
    """&ary.flat[off] (element offset) as a ty*."""
    arr = context.make_array(aryty)(context, builder, ary)
    o = context.cast(builder, off, offty, types.intp)
    return builder.bitcast(builder.gep(arr.data, [o]), ty.as_pointer())


def _make_tile_dot(kind):
    @intrinsic
    def _tile_dot(typingctx, acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi):
        """Accumulate one 4-byte column of an 8-row tile of packed nibbles: w[woff:woff+32] holds bytes
        4c..4c+3 of rows 0..7 (row j in bytes 4j..4j+3). Lane j of acc_lo += its low nibbles . x[xoff_lo:+4],
        lane j of acc_hi += its high nibbles . x[xoff_hi:+4] (x int8, each 4 bytes broadcast to all lanes)."""
        if not (acc_lo == i32x8 and acc_hi == i32x8 and _is_byte_array(w) and _is_byte_array(x)
                and all(isinstance(t, types.Integer) for t in (woff, xoff_lo, xoff_hi))):
            return None

        def codegen(context, builder, sig, args):
            alo, ahi, wa, wo, xa, xl, xh = args
            q = _load_vec(context, builder, sig.args[2], wa, wo, sig.args[3], _V32I8)
            lo = builder.and_(q, _vconst(_V32I8, 0x0F))
            hi = builder.lshr(q, _vconst(_V32I8, 4))
            out = []
            for acc, xo, xt in ((alo, xl, sig.args[5]), (ahi, xh, sig.args[6])):
                x4 = builder.load(_elem_ptr(context, builder, sig.args[4], xa, xo, xt, _I32), align=1)
                xb = builder.bitcast(_splat(builder, x4, _V8I32), _V32I8)
                u = lo if acc is alo else hi
                if kind == "vnni":
                    dpbusd = _x86_fn(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
                    out.append(builder.call(dpbusd, [acc, builder.bitcast(u, _V8I32), builder.bitcast(xb, _V8I32)]))
                else:
                    out.append(builder.add(acc, _madd(builder, kind, u, xb)))
            return context.make_tuple(builder, sig.return_type, out)

        return types.UniTuple(i32x8, 2)(acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi), codegen

    return _tile_dot


_TILE_DOT = _variants(_make_tile_dot)


def _make_load_f16x8(hw: bool):
    @intrinsic
    def _load(typingctx, a, off):
        """<8 x float> from 8 fp16 bit patterns at &a.flat[off] (a: uint16 array)."""
        if not (isinstance(a, types.Array) and a.dtype == types.uint16 and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            v = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8I16), align=2)
            if hw:
                return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 8)), _V8F32)
            return _f16_soft_vec_ir(builder, v)

        return f32x8(a, off), codegen

    return _load


_load_f16x8_hw = _make_load_f16x8(True)
_load_f16x8_soft = _make_load_f16x8(False)


@intrinsic
def _izero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8I32, None)

    return i32x8(), codegen


@intrinsic
def _vscal(typingctx, v, s):
    """v * splat(s)."""
    if not (v == f32x8 and isinstance(s, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        sv = _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _V8F32)
        return builder.fmul(args[0], sv, flags=("contract",))

    return f32x8(v, s), codegen


@intrinsic
def _vmax(typingctx, a, b):
    if not (a == f32x8 and b == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def _vstore(typingctx, a, off, v):
    """&a.flat[off:off+8] = v (a: float32 array)."""
    if not (isinstance(a, types.Array) and a.dtype == types.float32 and isinstance(off, types.Integer) and v == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8F32), align=4)
        return context.get_dummy_value()

    return types.none(a, off, v), codegen


@intrinsic
def _hsum8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """f32x8 whose lane r is the sum of a_r's 8 lanes: a tree of pairwise adds (hadd: lanes x0+x1, x2+x3,
    y0+y1, y2+y3 | the same of the upper halves), 7 vector adds for 8 horizontal sums."""
    if not all(a == f32x8 for a in (a0, a1, a2, a3, a4, a5, a6, a7)):
        return None

    def codegen(context, builder, sig, args):
        def hadd(x, y):
            return builder.fadd(_shuffle(builder, x, y, (0, 2, 8, 10, 4, 6, 12, 14)),
                                _shuffle(builder, x, y, (1, 3, 9, 11, 5, 7, 13, 15)))

        b = [hadd(args[2 * i], args[2 * i + 1]) for i in range(4)]
        c0, c1 = hadd(b[0], b[1]), hadd(b[2], b[3])     # lane r < 4: a_r's lanes 0..3 (c1: a_{4+r}); 4 + r: 4..7
        return builder.fadd(_shuffle(builder, c0, c1, (0, 1, 2, 3, 8, 9, 10, 11)),
                            _shuffle(builder, c0, c1, (4, 5, 6, 7, 12, 13, 14, 15)))

    return f32x8(a0, a1, a2, a3, a4, a5, a6, a7), codegen


def tile_dot(path, acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi):
    """See _make_tile_dot: (acc_lo, acc_hi) + one 4-byte column of an 8-row nibble tile. Vector paths only."""


def load_f16x8(path, a, off):
    """8 fp16 values (uint16 bits at &a.flat[off]) as an f32x8. Vector paths only."""


def izero(path):
    """i32x8 zero. Vector paths only."""


def vscal(path, v, s):
    """f32x8 v times the float s. Vector paths only."""


def vmax(path, a, b):
    """Lane-wise max of two f32x8 (a NaN in a gives b's lane). Vector paths only."""


def vstore(path, a, off, v):
    """Store an f32x8 to float32 array a at flat element offset off. Vector paths only."""


def hsum8(path, a0, a1, a2, a3, a4, a5, a6, a7):
    """f32x8 of the horizontal sums of eight f32x8 (lane r: a_r's). Vector paths only."""


def _vector_kind(path):
    k = _kind(path)
    return k if k not in (None, "scalar") else None


@overload(tile_dot, inline="always")
def _ov_tile_dot(path, acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi):
    k = _vector_kind(path)
    if k is not None:
        f = _TILE_DOT[k]
        return lambda path, acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi: f(acc_lo, acc_hi, w, woff, x, xoff_lo, xoff_hi)


@overload(load_f16x8, inline="always")
def _ov_load_f16x8(path, a, off):
    if _vector_kind(path) is not None:
        f = _load_f16x8_hw if F16_NATIVE else _load_f16x8_soft
        return lambda path, a, off: f(a, off)


@overload(izero, inline="always")
def _ov_izero(path):
    if _kind(path) == "scalar":
        return lambda path: np.int32(0)
    if _vector_kind(path) is not None:
        return lambda path: _izero()


@overload(vscal, inline="always")
def _ov_vscal(path, v, s):
    if _vector_kind(path) is not None:
        return lambda path, v, s: _vscal(v, s)


@overload(vmax, inline="always")
def _ov_vmax(path, a, b):
    if _vector_kind(path) is not None:
        return lambda path, a, b: _vmax(a, b)


@overload(vstore, inline="always")
def _ov_vstore(path, a, off, v):
    if _vector_kind(path) is not None:
        return lambda path, a, off, v: _vstore(a, off, v)


@overload(hsum8, inline="always")
def _ov_hsum8(path, a0, a1, a2, a3, a4, a5, a6, a7):
    if _vector_kind(path) is not None:
        return lambda path, a0, a1, a2, a3, a4, a5, a6, a7: _hsum8(a0, a1, a2, a3, a4, a5, a6, a7)


# --------------------------------------------------------------------------------------------------
# Row tiles for the prefill GEMM: R rows x T tokens (vector paths only)
# --------------------------------------------------------------------------------------------------
#
# A tile holds the unpacked integer codes (one byte each) of R weight rows, interleaved by 4 bytes: the 4R
# bytes at 4R * (e // 4) hold elements e..e+3 of rows 0..R-1 (row j in bytes 4j..4j+3). A 4R-byte load times
# one token's 4 activation bytes broadcast to every lane (vpdpbusd / vpmaddubsw + vpmaddwd) adds 4 products
# to each row's lane, so lane j of an accumulator is row j's dot: no horizontal sums, and the float work
# (convert, scale, multiply-add) is done once per block for R rows. One weight load serves T tokens, each
# with its own accumulator; the accumulators travel as a tuple of T vectors (T is the tuple's length).
# The codes are unsigned (u8 operand) except for rtile_dot32s (signed int8 weights, psign trick).
#
# R (tile_rows(path)) is 16 on the vnni path where the CPU has AVX512-VNNI: the tiles live in zmm registers
# (i32x16 / f32x16) and one vpdpbusd does 64 multiply-adds, twice the ymm instruction's work at the same
# instruction rate (5.0 G/s per core on this project's Xeon for both widths), which is what bounds the GEMM.
# Elsewhere R is 8 (ymm: AVX-VNNI, AVX2, generic IR).

HAS_AVX512_VNNI: bool = HAS_VNNI and {"avx512f", "avx512bw", "avx512vnni"} <= _FEATURES


f32x16 = SimdVector("f32", 16)
i32x16 = SimdVector("i32", 16)


_INT_VEC = {8: i32x8, 16: i32x16}
_FLOAT_VEC = {8: f32x8, 16: f32x16}


def _tile_rows(kind: str) -> int:
    return 16 if kind == "vnni" and HAS_AVX512_VNNI else 8


def _lanes(t, vecs: dict) -> int | None:
    """R for a tuple of the R-lane vectors of vecs (_INT_VEC or _FLOAT_VEC), else None."""
    if isinstance(t, types.UniTuple):
        for r, vt in vecs.items():
            if t.dtype == vt:
                return r
    return None


def _int_lanes(t) -> int | None:
    return _lanes(t, _INT_VEC)


def _float_lanes(t) -> int | None:
    return _lanes(t, _FLOAT_VEC)


def _iv(r: int) -> ir.VectorType:
    return ir.VectorType(_I32, r)


def _fv(r: int) -> ir.VectorType:
    return ir.VectorType(_F32, r)


def _bcast4(context, builder, aryty, ary, off, r: int):
    """4 bytes at &ary.flat[off] (off an intp) broadcast to all r dword lanes, as <4r x i8>."""
    x4 = builder.load(_elem_ptr(context, builder, aryty, ary, off, types.intp, _I32), align=1)
    return builder.bitcast(_splat(builder, x4, _iv(r)), ir.VectorType(_I8, 4 * r))


def _make_rtile_dot(kind, nvec: int, signed: bool):
    @intrinsic
    def _rtile_dot(typingctx, acc, w, woff, x, xoff, xstride):
        """acc[t] + the dots of nvec * 4 elements of a row tile (w.flat[woff:+4R*nvec]) with token t's int8
        activations x.flat[xoff + t*xstride:+4*nvec], lane j = row j (t < len(acc))."""
        r = _int_lanes(acc)
        if not (r is not None and _is_byte_array(w) and _is_byte_array(x)
                and all(isinstance(a, types.Integer) for a in (woff, xoff, xstride))):
            return None
        if r == 16 and kind != "vnni":                         # zmm tiles: vpdpbusd only
            return None
        n_tok = acc.count
        vi = _iv(r)
        vb = ir.VectorType(_I8, 4 * r)

        def codegen(context, builder, sig, args):
            a, wa, wo, xa, xo, xsd = args
            wo = context.cast(builder, wo, sig.args[2], types.intp)
            xo = context.cast(builder, xo, sig.args[4], types.intp)
            xsd = context.cast(builder, xsd, sig.args[5], types.intp)
            ws = [_load_vec(context, builder, sig.args[1], wa, builder.add(wo, ir.Constant(_I64, 4 * r * v)),
                            types.intp, vb) for v in range(nvec)]
            dpbusd = _x86_fn(builder, f"llvm.x86.avx512.vpdpbusd.{32 * r}", vi, [vi, vi, vi])
            out = []
            for t in range(n_tok):
                xt = builder.add(xo, builder.mul(xsd, ir.Constant(_I64, t)))
                chains = [builder.extract_value(a, t), ir.Constant(vi, None)]   # two chains: latency
                for v in range(nvec):
                    xb = _bcast4(context, builder, sig.args[3], xa, builder.add(xt, ir.Constant(_I64, 4 * v)), r)
                    c = chains[v & 1]
                    if kind == "vnni" and signed and r == 16:
                        # no vpsignb on zmm: (w ^ 0x80) . x - 128 . x, both by vpdpbusd
                        k80 = ir.Constant(vb, [0x80] * (4 * r))
                        c = builder.call(dpbusd, [c, builder.bitcast(builder.xor(ws[v], k80), vi), builder.bitcast(xb, vi)])
                        c = builder.sub(c, builder.call(dpbusd, [ir.Constant(vi, None), builder.bitcast(k80, vi),
                                                                 builder.bitcast(xb, vi)]))
                    elif kind == "vnni" and not signed:
                        c = builder.call(dpbusd, [c, builder.bitcast(ws[v], vi), builder.bitcast(xb, vi)])
                    else:
                        c = builder.add(c, _madd(builder, kind, ws[v], xb, u_signed=signed))
                    chains[v & 1] = c
                out.append(builder.add(chains[0], chains[1]))
            return context.make_tuple(builder, sig.return_type, out)

        return acc(acc, w, woff, x, xoff, xstride), codegen

    return _rtile_dot


_RTILE_DOT32 = _variants(lambda k: _make_rtile_dot(k, 8, False))
_RTILE_DOT32S = _variants(lambda k: _make_rtile_dot(k, 8, True))
_RTILE_DOT16 = _variants(lambda k: _make_rtile_dot(k, 4, False))


def _madd_i16_lanes(builder, kind, a, b, r: int):
    """<2r x i16> x <2r x i16> -> <r x i32>, lane k = a_2k * b_2k + a_2k+1 * b_2k+1 (vpmaddwd, ymm or zmm)."""
    if r == 8:
        return _madd_i16(builder, kind, a, b)
    v16 = ir.VectorType(_I16, 32)
    return builder.call(_x86_fn(builder, "llvm.x86.avx512.pmaddw.d.512", _V16I32, [v16, v16]), [a, b])


def _make_rtile_madd16(kind):
    @intrinsic
    def _madd16(typingctx, acc, mp, s, off, stride):
        """acc[t] + vpmaddwd(mp, broadcast of the int16 pair s.flat[off + t*stride:+2]): lane j += mp_j.lo *
        s[0] + mp_j.hi * s[1] (mp: per row a pair of int16 carried in an i32 lane)."""
        r = _int_lanes(acc)
        if not (r is not None and mp == _INT_VEC[r] and isinstance(s, types.Array) and s.dtype == types.int16
                and isinstance(off, types.Integer) and isinstance(stride, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            a, m, sa, so, ss = args
            so = context.cast(builder, so, sig.args[3], types.intp)
            ss = context.cast(builder, ss, sig.args[4], types.intp)
            v16 = ir.VectorType(_I16, 2 * r)
            m16 = builder.bitcast(m, v16)
            out = []
            for t in range(sig.args[0].count):
                o = builder.add(so, builder.mul(ss, ir.Constant(_I64, t)))
                s2 = builder.load(_elem_ptr(context, builder, sig.args[2], sa, o, types.intp, _I32), align=2)
                sb = builder.bitcast(_splat(builder, s2, _iv(r)), v16)
                out.append(builder.add(builder.extract_value(a, t), _madd_i16_lanes(builder, kind, m16, sb, r)))
            return context.make_tuple(builder, sig.return_type, out)

        return acc(acc, mp, s, off, stride), codegen

    return _madd16


_RTILE_MADD16 = _variants(_make_rtile_madd16)


@intrinsic
def rtile_isub(typingctx, acc, s, off, stride, c):
    """acc[t] - c * s.flat[off + t*stride] in every lane (s int16: a token's block sum of codes; c: the weight
    type's offset, e.g. 8 for Q4_0)."""
    r = _int_lanes(acc)
    if not (r is not None and isinstance(s, types.Array) and s.dtype == types.int16
            and all(isinstance(a, types.Integer) for a in (off, stride, c))):
        return None

    def codegen(context, builder, sig, args):
        a, sa, so, ss, cv = args
        so = context.cast(builder, so, sig.args[2], types.intp)
        ss = context.cast(builder, ss, sig.args[3], types.intp)
        cv = builder.trunc(context.cast(builder, cv, sig.args[4], types.int64), _I32)
        out = []
        for t in range(sig.args[0].count):
            o = builder.add(so, builder.mul(ss, ir.Constant(_I64, t)))
            v = builder.sext(builder.load(_elem_ptr(context, builder, sig.args[1], sa, o, types.intp, _I16), align=2), _I32)
            out.append(builder.sub(builder.extract_value(a, t), _splat(builder, builder.mul(v, cv), _iv(r))))
        return context.make_tuple(builder, sig.return_type, out)

    return acc(acc, s, off, stride, c), codegen


@intrinsic
def rtile_fma(typingctx, acc, p, dv, xd, off, stride):
    """acc[t] + float(p[t]) * dv * xd.flat[off + t*stride] (dv: the R rows' scales; xd float32: the tokens'
    activation scales)."""
    r = _float_lanes(acc)
    if not (r is not None and _int_lanes(p) == r and acc.count == p.count and dv == _FLOAT_VEC[r]
            and isinstance(xd, types.Array) and xd.dtype == types.float32
            and isinstance(off, types.Integer) and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a, pv, d, xa, xo, xs = args
        xo = context.cast(builder, xo, sig.args[4], types.intp)
        xs = context.cast(builder, xs, sig.args[5], types.intp)
        out = []
        for t in range(sig.args[0].count):
            o = builder.add(xo, builder.mul(xs, ir.Constant(_I64, t)))
            s = builder.load(_elem_ptr(context, builder, sig.args[3], xa, o, types.intp, _F32), align=4)
            sv = builder.fmul(d, _splat(builder, s, _fv(r)))
            pf = builder.sitofp(builder.extract_value(pv, t), _fv(r))
            out.append(builder.fadd(builder.extract_value(a, t), builder.fmul(pf, sv, flags=("contract",)),
                                    flags=("contract",)))
        return context.make_tuple(builder, sig.return_type, out)

    return acc(acc, p, dv, xd, off, stride), codegen


@intrinsic
def rtile_vfma(typingctx, acc, mv, xs, off, stride):
    """acc[t] + mv * xs.flat[off + t*stride] (Q4_1/Q5_1's min term: mv the R rows' mins, xs the tokens'
    block sums)."""
    r = _float_lanes(acc)
    if not (r is not None and mv == _FLOAT_VEC[r] and isinstance(xs, types.Array) and xs.dtype == types.float32
            and isinstance(off, types.Integer) and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a, m, xa, xo, xst = args
        xo = context.cast(builder, xo, sig.args[3], types.intp)
        xst = context.cast(builder, xst, sig.args[4], types.intp)
        out = []
        for t in range(sig.args[0].count):
            o = builder.add(xo, builder.mul(xst, ir.Constant(_I64, t)))
            s = builder.load(_elem_ptr(context, builder, sig.args[2], xa, o, types.intp, _F32), align=4)
            out.append(builder.fadd(builder.extract_value(a, t), builder.fmul(m, _splat(builder, s, _fv(r)),
                                    flags=("contract",)), flags=("contract",)))
        return context.make_tuple(builder, sig.return_type, out)

    return acc(acc, mv, xs, off, stride), codegen


@intrinsic
def rtile_imul_add(typingctx, acc, p, sv):
    """acc[t] + p[t] * sv lane-wise in int32 (sv: the R rows' integer sub-block scales)."""
    r = _int_lanes(acc)
    if not (r is not None and _int_lanes(p) == r and acc.count == p.count and sv == _INT_VEC[r]):
        return None

    def codegen(context, builder, sig, args):
        a, pv, s = args
        out = [builder.add(builder.extract_value(a, t), builder.mul(builder.extract_value(pv, t), s))
               for t in range(sig.args[0].count)]
        return context.make_tuple(builder, sig.return_type, out)

    return acc(acc, p, sv), codegen


@intrinsic
def rtile_store(typingctx, out, off, stride, acc):
    """out.flat[off + t*stride:+R] = acc[t] (out float32)."""
    r = _float_lanes(acc)
    if not (isinstance(out, types.Array) and out.dtype == types.float32 and isinstance(off, types.Integer)
            and isinstance(stride, types.Integer) and r is not None):
        return None

    def codegen(context, builder, sig, args):
        oa, oo, os_, a = args
        oo = context.cast(builder, oo, sig.args[1], types.intp)
        os_ = context.cast(builder, os_, sig.args[2], types.intp)
        for t in range(sig.args[3].count):
            o = builder.add(oo, builder.mul(os_, ir.Constant(_I64, t)))
            builder.store(builder.extract_value(a, t), _elem_ptr(context, builder, sig.args[0], oa, o, types.intp, _fv(r)),
                          align=4)
        return context.get_dummy_value()

    return types.none(out, off, stride, acc), codegen


def _make_tile_load(r: int, is_float: bool):
    vt = (_FLOAT_VEC if is_float else _INT_VEC)[r]
    dt = types.float32 if is_float else types.int32
    lty = _fv(r) if is_float else _iv(r)

    @intrinsic
    def _load(typingctx, a, off):
        if not (isinstance(a, types.Array) and a.dtype == dt and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], lty), align=4)

        return vt(a, off), codegen

    return _load


def _make_tile_zero(r: int, is_float: bool):
    vt = (_FLOAT_VEC if is_float else _INT_VEC)[r]
    lty = _fv(r) if is_float else _iv(r)

    @intrinsic
    def _zero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(lty, None)

        return vt(), codegen

    return _zero


_TILE_LOADF = {r: _make_tile_load(r, True) for r in (8, 16)}
_TILE_LOADI = {r: _make_tile_load(r, False) for r in (8, 16)}
_TILE_FZERO = {r: _make_tile_zero(r, True) for r in (8, 16)}
_TILE_IZERO = {r: _make_tile_zero(r, False) for r in (8, 16)}


def tile_rows(path):
    """R, the rows of a prefill row tile on this vector path (a compile-time constant: 16 or 8)."""


def tile_loadf(path, a, off):
    """a.flat[off:off+R] of a float32 array as an R-lane vector (R = tile_rows(path))."""


def tile_loadi(path, a, off):
    """a.flat[off:off+R] of an int32 array as an R-lane vector."""


def tile_fzero(path):
    """The R-lane float zero (a row tile's float accumulator)."""


def tile_izero(path):
    """The R-lane int32 zero (a row tile's integer accumulator)."""


@overload(tile_rows, inline="always")
def _ov_tile_rows(path):
    k = _vector_kind(path)
    if k is not None:
        r = _tile_rows(k)
        return lambda path: r


def _ov_tile_load(table):
    def ov(path, a, off):
        k = _vector_kind(path)
        if k is not None:
            f = table[_tile_rows(k)]
            return lambda path, a, off: f(a, off)
    return ov


def _ov_tile_zero(table):
    def ov(path):
        k = _vector_kind(path)
        if k is not None:
            f = table[_tile_rows(k)]
            return lambda path: f()
    return ov


overload(tile_loadf, inline="always")(_ov_tile_load(_TILE_LOADF))
overload(tile_loadi, inline="always")(_ov_tile_load(_TILE_LOADI))
overload(tile_fzero, inline="always")(_ov_tile_zero(_TILE_FZERO))
overload(tile_izero, inline="always")(_ov_tile_zero(_TILE_IZERO))


def rtile_dot32(path, acc, w, woff, x, xoff, xstride):
    """acc[t] + one 32-element block of a row tile (unsigned codes) dotted with token t's activations
    (see _make_rtile_dot). Vector paths only."""


def rtile_dot32s(path, acc, w, woff, x, xoff, xstride):
    """rtile_dot32 with signed int8 weight codes (Q8_0)."""


def rtile_dot16(path, acc, w, woff, x, xoff, xstride):
    """rtile_dot32 over a 16-element group (Q6_K's scale groups)."""


def rtile_madd16(path, acc, mp, s, off, stride):
    """acc[t] + per row an int16 pair of mp times the int16 pair s.flat[off + t*stride:+2] (vpmaddwd)."""


def _ov_rtile(table):
    def ov(path, acc, w, woff, x, xoff, xstride):
        k = _vector_kind(path)
        if k is not None:
            f = table[k]
            return lambda path, acc, w, woff, x, xoff, xstride: f(acc, w, woff, x, xoff, xstride)
    return ov


overload(rtile_dot32, inline="always")(_ov_rtile(_RTILE_DOT32))
overload(rtile_dot32s, inline="always")(_ov_rtile(_RTILE_DOT32S))
overload(rtile_dot16, inline="always")(_ov_rtile(_RTILE_DOT16))


@overload(rtile_madd16, inline="always")
def _ov_rtile_madd16(path, acc, mp, s, off, stride):
    k = _vector_kind(path)
    if k is not None:
        f = _RTILE_MADD16[k]
        return lambda path, acc, mp, s, off, stride: f(acc, mp, s, off, stride)


def is_vnni(path):
    """Whether path is the vnni path (a compile-time constant: vpdpbusd multiplies u8 by s8 without the i16
    saturation of pmaddubsw, so weights up to 255 may be the unsigned operand)."""


@overload(is_vnni, inline="always")
def _ov_is_vnni(path):
    k = _kind(path)
    if k is not None:
        v = k == "vnni"
        return lambda path: v
