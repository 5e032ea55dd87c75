"""The quant-type registry (numba_kernels.qtypes) against gguf-py, and its entries' kernels."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from numba_kernels import dequant, qgemv, simd
from numba_kernels.actquant import BF16, F16, F32, Q8_0, Q8_1, Q8_K
from numba_kernels.qtypes import SUPPORTED, all_qtypes, by_code, kernel_for, qtype_info
from numerics import assert_same_sums

ENTRIES = all_qtypes()
EXPECTED = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


def test_entries_match_gguf():
    assert {t.name for t in ENTRIES} == EXPECTED
    assert SUPPORTED == {int(QT[name]) for name in EXPECTED} == dequant.SUPPORTED_TYPES
    for t in ENTRIES:
        assert t.code == int(QT[t.name])
        assert (t.block_size, t.type_size) == tuple(GGML_QUANT_SIZES[t.ggml]), t.name
        assert qtype_info(t.code) is qtype_info(t.ggml) is qtype_info(np.int64(t.code))
        assert t.row_bytes(4 * 256) == 4 * 256 // t.block_size * t.type_size
        assert by_code("block_size")[t.code] == t.block_size and by_code("type_size")[t.code] == t.type_size


def test_activation_kinds_are_ggmls_vec_dot_types():
    """ggml-cpu's type traits: Q4_0/Q5_0/Q8_0 -> Q8_0, Q4_1/Q5_1 -> Q8_1, K-quants -> Q8_K, floats as they are."""
    expected = {"Q4_0": Q8_0, "Q5_0": Q8_0, "Q8_0": Q8_0, "Q4_1": Q8_1, "Q5_1": Q8_1, "Q4_K": Q8_K, "Q5_K": Q8_K,
                "Q6_K": Q8_K, "F32": F32, "F16": F16, "BF16": BF16}
    assert {t.name: t.act for t in ENTRIES} == expected


def test_every_capability_has_its_kernels():
    for t in ENTRIES:
        assert t.dequantize is not None, t.name
        assert (t.pack is None) == (t.gemv is None) == (t.span is None), t.name    # a fast GEMV is all three
        assert t.gemm is None or t.pack is not None, t.name                          # prefill tiles need the packing
        if t.fused_gate_up:               # the fused FFN kernels run qgemv's spans on x86 Q8_0/Q8_1 (Q4_K: Q8_K)
            assert t.span is not None and (t.act in (Q8_0, Q8_1) or t.name == "Q4_K"), t.name
        if t.column_bundle:               # bundle_q4 regroups 32-element blocks, bundle_q4k / bundle_q6k superblocks
            assert (t.block_size == 32 and t.act in (Q8_0, Q8_1)) or t.name in ("Q4_K", "Q6_K"), t.name
    assert {t.name for t in ENTRIES if t.pack is not None} == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    assert {t.name for t in ENTRIES if t.gemm is not None} == {t.name for t in ENTRIES if t.pack is not None}


@pytest.mark.parametrize("t", [t for t in ENTRIES if t.pack is not None], ids=lambda t: t.name)
def test_pack_and_kernels_of_an_entry_compute_the_product(t):
    """Each fast entry's pack + span/gemv, called through the entry, agree with its dequantize kernel."""
    rng = np.random.default_rng(t.code)
    n_rows, n_cols = 8, 512
    raw = rng.integers(0, 256, (n_rows, t.row_bytes(n_cols)), dtype=np.uint8)
    blocks = raw.reshape(n_rows, n_cols // t.block_size, t.type_size)
    d_off = 208 if t.ggml == QT.Q6_K else 0                               # keep the fp16 scales finite and small
    n_f16 = 2 if t.ggml in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K) else 1
    for off in range(d_off, d_off + 2 * n_f16, 2):
        blocks[..., off:off + 2] = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype(np.float16)[..., None].view(np.uint8)
    w = np.empty((n_rows, n_cols), np.float32)
    for r in range(n_rows):
        t.dequantize(raw[r], w[r])
    pm = qgemv.pack(raw, t.code, n_cols)
    x = rng.standard_normal(n_cols).astype(np.float32)
    xq = qgemv.quantize_for(t.code, x, qgemv.new_q8(n_cols))
    x_rounded = np.repeat(xq.d, 32) * xq.q                                # the activation the kernels see
    ref = w.astype(np.float64) @ x_rounded
    out = np.empty(n_rows, np.float32)
    t.span(simd.token(None), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, np.empty(0, np.int32), out, 0, n_rows)
    # float32 accumulation (and Q8_1's fp16 block sums) only: far below the error of using the unrounded x
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    out2 = np.empty(n_rows, np.float32)
    t.gemv(simd.token(None), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, np.empty(0, np.int32), out2)
    assert_same_sums(out2, out)


def test_unsupported_types_raise():
    for bad in (QT.Q2_K, int(QT.IQ4_NL), 999, -1):
        with pytest.raises(ValueError, match="not supported"):
            qtype_info(bad)
    with pytest.raises(ValueError, match="Q2_K"):
        qtype_info(QT.Q2_K)
    with pytest.raises(ValueError, match="no fast GEMV"):
        qgemv.pack(np.zeros((4, 20), np.uint8), QT.F16)


def test_kernel_registration_is_checked():
    with pytest.raises(ValueError, match="already has"):
        kernel_for(QT.Q4_0, "span")(lambda *a: None)
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_for(QT.Q4_0, "matmul")
    with pytest.raises(ValueError, match="not supported"):
        kernel_for(QT.Q2_K, "span")(lambda *a: None)
    assert qtype_info(QT.Q4_0).span is qgemv._span_q4_0                   # unchanged by the failed attempts
