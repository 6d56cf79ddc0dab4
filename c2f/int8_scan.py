"""The gallery's first pass: int8 query codes against int8 row codes, int32 sums, scaled to float32 scores.

One compiled kernel, with two dot products that give one result (the exact integer products):
- `portable`: plain loops that LLVM vectorises on any CPU. On x86 it sign-extends both operands to int16 and
  multiplies in pairs (vpmaddwd), 16 bytes of the row per step; on a 2-core AVX2 machine it is compute-bound: over
  1M x 256, 14.5 ms for one query (the memory delivers the 256 MB in 10.2), 571 ms for 64.
- `avx2`: 32 bytes per step with the instructions int8 dot products are made of (as in llama.cpp's AVX2 paths): the
  query's signs applied to the row (vpsignb), |query| times that, unsigned by signed, in pairs to int16 (vpmaddubsw),
  pairs of those to int32 (vpmaddwd). Both operands are in [-127, 127], so a pair sums to at most 2 * 127 * 127 =
  32258 and the int16 step never saturates. Numba cannot spell these instructions, so they are emitted as LLVM IR.
  Same gallery: 11.3 ms for one query, 229 ms for 64 (a float32 GEMM through BLAS: 714).
"""

import os
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# Rows whose int32 sums are collected before they are scaled: scaling inside the dot-product loop stops LLVM
# vectorising it (83 ms instead of 15 over 1M rows), and writing the output a row at a time strides across all
# queries (twice as slow when the chunk width is a power of two, by cache-set conflicts).
ROWS_PER_BLOCK = 64
AVX2_STEP = 32
# How far ahead of the row being scored its coming bytes are asked for (a non-temporal prefetch, one per cache line).
# One query reads each row once and does little with it, so without the hint the cores wait on memory: over 1M x 256
# the avx2 scan took 1.30-1.36x the time of one plain pass over the bytes, 1.11-1.16x with it (256 B to 4 KB ahead
# measured: 1 KB was best). Issued once a row, not once a query, so batches pay nothing for it.
PREFETCH_BYTES = 1024
CACHE_LINE = 64
# Fast-math without reassociation: a score must come out with the same bits whichever copy of the scaling loop LLVM
# made (with and without the score writes, with and without the heaps, vectorised or not), so that the one-pass short
# list holds the very numbers the full scan gives. With reassociation allowed they differed in the last bit.
FASTMATH = {"nnan", "ninf", "nsz"}
# numba's default threading layer must not be entered from two Python threads at once.
KERNEL_LOCK = threading.Lock()


def _host_has_avx2() -> bool:
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("avx2", False))
    except Exception:  # no feature list on this platform: the portable kernel
        return False


def scan_kernel(dim: int) -> str:
    """`avx2` or `portable`: which kernel `int8_scores` runs for `dim`-wide rows on this machine
    (`C2F_INT8_SCAN=portable` forces the portable one)."""
    if os.environ.get("C2F_INT8_SCAN", "").lower() == "portable":
        return "portable"
    return "avx2" if dim % AVX2_STEP == 0 and _HAS_AVX2 else "portable"


_HAS_AVX2 = _host_has_avx2()


@numba.njit(fastmath=FASTMATH, cache=True, inline="always")
def _keep(value, row, best, best_rows, query):  # pragma: no cover - compiled
    """Puts a score that beats the smallest kept one (`best[query, 0]`) into that query's min-heap of the best so far."""
    size = best.shape[1]
    slot = 0
    while True:
        child = 2 * slot + 1
        if child >= size:
            break
        if child + 1 < size and best[query, child + 1] < best[query, child]:
            child += 1
        if best[query, child] >= value:
            break
        best[query, slot], best_rows[query, slot] = best[query, child], best_rows[query, child]
        slot = child
    best[query, slot], best_rows[query, slot] = value, row


@numba.njit(fastmath=FASTMATH, cache=True, inline="always")
def _scale_block(totals, start, end, scales, query_scales, out, best, best_rows, values):  # pragma: no cover - compiled
    """The int32 sums of rows `start` to `end` to scores: into `out` (unless it has no columns), and into each query's
    heap of its best scores (unless the heaps hold none). A block whose best score does not beat the smallest kept one
    is passed over in one comparison, which after the first few thousand rows is almost every block."""
    keep_scores = out.shape[1] > 0
    keep_best = best.shape[1] > 0
    for query in range(totals.shape[0]):
        top = -np.inf
        for row in range(start, end):
            value = np.float32(totals[query, row - start]) * scales[row] * query_scales[query]
            if keep_scores:
                out[query, row] = value
            if keep_best:
                values[row - start] = value
                top = max(top, value)
        if keep_best and top > best[query, 0]:
            for row in range(start, end):
                if values[row - start] > best[query, 0]:
                    _keep(values[row - start], row, best, best_rows, query)


@intrinsic
def _prefetch_ahead(typingctx, codes, row):
    """Asks for the `dim` bytes `PREFETCH_BYTES` past the start of `codes[row]` (C-contiguous int8), one cache line at a
    time. A prefetch is a hint: past the end of the array it reads nothing and cannot fault."""
    signature = types.void(codes, row)

    def codegen(context, builder, signature, arguments):
        codes_value, row_value = arguments
        codes_array = context.make_array(signature.args[0])(context, builder, codes_value)
        dim = cgutils.unpack_tuple(builder, codes_array.shape, 2)[1]
        intp = dim.type
        bytes_pointer = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        prefetch = _llvm_function(builder.module, "llvm.prefetch.p0i8", ir.VoidType(), [bytes_pointer, int32, int32, int32])
        ahead = builder.gep(codes_array.data, [builder.add(builder.mul(row_value, dim), ir.Constant(intp, PREFETCH_BYTES))])
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), dim, ir.Constant(intp, CACHE_LINE), intp) as (index, _):
            # read (0), no temporal locality (0), data cache (1)
            builder.call(prefetch, [builder.gep(ahead, [index]), ir.Constant(int32, 0), ir.Constant(int32, 0), ir.Constant(int32, 1)])
        return context.get_dummy_value()

    return signature, codegen


_I8x32 = ir.VectorType(ir.IntType(8), 32)
_I16x16 = ir.VectorType(ir.IntType(16), 16)
_I32x8 = ir.VectorType(ir.IntType(32), 8)


def _llvm_function(module, name, returns, arguments):
    return cgutils.get_or_insert_function(module, ir.FunctionType(returns, arguments), name)


@intrinsic
def _dot_avx2(typingctx, codes, row, query_magnitudes, query_codes, query):
    """`codes[row] . query_codes[query]` as int32, for C-contiguous int8 arrays whose width is a multiple of 32;
    `query_magnitudes` holds |query_codes|."""
    signature = types.int32(codes, row, query_magnitudes, query_codes, query)

    def codegen(context, builder, signature, arguments):
        codes_value, row_value, magnitudes_value, query_value, query_index = arguments
        codes_array = context.make_array(signature.args[0])(context, builder, codes_value)
        magnitudes_array = context.make_array(signature.args[2])(context, builder, magnitudes_value)
        query_array = context.make_array(signature.args[3])(context, builder, query_value)
        dim = cgutils.unpack_tuple(builder, codes_array.shape, 2)[1]
        intp = dim.type
        module = builder.module
        sign = _llvm_function(module, "llvm.x86.avx2.psign.b", _I8x32, [_I8x32, _I8x32])
        multiply_bytes = _llvm_function(module, "llvm.x86.avx2.pmadd.ub.sw", _I16x16, [_I8x32, _I8x32])
        multiply_words = _llvm_function(module, "llvm.x86.avx2.pmadd.wd", _I32x8, [_I16x16, _I16x16])
        add_lanes = _llvm_function(module, "llvm.vector.reduce.add.v8i32", ir.IntType(32), [_I32x8])
        row_start = builder.gep(codes_array.data, [builder.mul(row_value, dim)])
        query_offset = builder.mul(query_index, dim)
        magnitudes_start = builder.gep(magnitudes_array.data, [query_offset])
        query_start = builder.gep(query_array.data, [query_offset])
        total = cgutils.alloca_once_value(builder, ir.Constant(_I32x8, None))
        ones = ir.Constant(_I16x16, [1] * 16)
        with cgutils.for_range_slice(builder, ir.Constant(intp, 0), dim, ir.Constant(intp, AVX2_STEP), intp) as (index, _):
            def load(start):
                return builder.load(builder.bitcast(builder.gep(start, [index]), _I8x32.as_pointer()), align=1)

            signed_codes = builder.call(sign, [load(row_start), load(query_start)])
            pairs = builder.call(multiply_bytes, [load(magnitudes_start), signed_codes])
            builder.store(builder.add(builder.load(total), builder.call(multiply_words, [pairs, ones])), total)
        return builder.call(add_lanes, [builder.load(total)])

    return signature, codegen


def _dot(codes, row, query_magnitudes, query_codes, query):
    """`codes[row] . query_codes[query]` as int32, in compiled code only: by the AVX2 intrinsics when `query_magnitudes`
    (|query_codes|) is given, by plain loops that LLVM vectorises when it is None. A choice by argument type, so that
    each kernel is its own cached specialisation of `_scores`, and the AVX2 one is never compiled where it cannot run
    (a function passed as an argument would be, and numba does not cache such kernels)."""
    raise NotImplementedError("compiled code only")


@overload(_dot, inline="always")
def _dot_for(codes, row, query_magnitudes, query_codes, query):
    if isinstance(query_magnitudes, types.NoneType):
        def portable(codes, row, query_magnitudes, query_codes, query):  # pragma: no cover - compiled
            total = np.int32(0)
            for j in range(codes.shape[1]):
                total += np.int32(codes[row, j]) * np.int32(query_codes[query, j])
            return total
        return portable

    def avx2(codes, row, query_magnitudes, query_codes, query):  # pragma: no cover - compiled
        return _dot_avx2(codes, row, query_magnitudes, query_codes, query)
    return avx2


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores(codes, scales, query_magnitudes, query_codes, query_scales, out, best, best_rows):  # pragma: no cover - compiled
    rows = codes.shape[0]
    queries = query_codes.shape[0]
    blocks, parts = -(-rows // ROWS_PER_BLOCK), best.shape[0]
    for part in numba.prange(parts):
        totals = np.empty((queries, ROWS_PER_BLOCK), np.int32)
        values = np.empty(ROWS_PER_BLOCK, np.float32)
        for block in range(part * blocks // parts, (part + 1) * blocks // parts):
            start = block * ROWS_PER_BLOCK
            end = min(start + ROWS_PER_BLOCK, rows)
            for row in range(start, end):
                _prefetch_ahead(codes, row)
                for query in range(queries):
                    totals[query, row - start] = _dot(codes, row, query_magnitudes, query_codes, query)
            _scale_block(totals, start, end, scales, query_scales, out, best[part], best_rows[part], values)


def _scan(codes, scales, query_codes, query_scales, out, keep, kernel):
    """Runs a kernel over all rows, split into one contiguous part per numba thread; each part keeps its own heaps of
    the `keep` best scores per query. Returns them, `([parts, queries, keep], rows)`."""
    kernel = kernel or scan_kernel(codes.shape[1])
    if kernel == "avx2" and codes.shape[1] % AVX2_STEP:
        raise ValueError(f"the avx2 kernel reads rows {AVX2_STEP} bytes at a time; these are {codes.shape[1]} wide")
    codes, query_codes = np.ascontiguousarray(codes), np.ascontiguousarray(query_codes)
    if out is None:
        out = np.empty((len(query_codes), 0), np.float32)
    parts = numba.get_num_threads()
    best = np.full((parts, len(query_codes), keep), -np.inf, np.float32)
    best_rows = np.full((parts, len(query_codes), keep), -1, np.int64)
    query_magnitudes = np.abs(query_codes) if kernel == "avx2" else None
    with KERNEL_LOCK:
        _scores(codes, scales, query_magnitudes, query_codes, query_scales, out, best, best_rows)
    return best, best_rows


def int8_scores(codes: np.ndarray, scales: np.ndarray, query_codes: np.ndarray, query_scales: np.ndarray,
                out: np.ndarray, kernel: str | None = None) -> None:
    """`out[q, row] = scales[row] * query_scales[q] * (codes[row] . query_codes[q])`, all codes int8 in [-127, 127].
    `kernel` defaults to `scan_kernel(dim)`; both give the same numbers."""
    _scan(codes, scales, query_codes, query_scales, out, 0, kernel)


def int8_best(codes: np.ndarray, scales: np.ndarray, query_codes: np.ndarray, query_scales: np.ndarray, k: int,
              kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of the scores `int8_scores` computes, per query and best first: `(scores [Q, k], rows [Q, k])`.

    One pass that writes no scores: each thread keeps a heap of its best `k` and the heaps are merged after. The way
    before it (block maxima, then the best blocks scored again and ranked) took 1.0 ms after a 1M-row scan; one-query
    searches are 0.5-0.7 ms faster this way (of about 13)."""
    k = min(k, len(codes))
    best, best_rows = _scan(codes, scales, query_codes, query_scales, None, k, kernel)
    best = best.transpose(1, 0, 2).reshape(len(query_codes), -1)
    best_rows = best_rows.transpose(1, 0, 2).reshape(len(query_codes), -1)
    top = np.argpartition(best, best.shape[1] - k, axis=1)[:, best.shape[1] - k :]
    scores = np.take_along_axis(best, top, axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(np.take_along_axis(best_rows, top, axis=1), order, axis=1)
