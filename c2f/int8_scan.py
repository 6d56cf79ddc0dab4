"""The gallery's first pass: int8 query codes against int8 row codes, int32 sums, scaled to float32 scores.

One compiled kernel, with three dot products that give one result (the exact integer products); the index runs the
fastest one the CPU has (`scan_kernel`):
- `portable`: plain loops that LLVM vectorises on any CPU. On x86 it sign-extends both operands to int16 and
  multiplies in pairs (vpmaddwd), 16 bytes of the row per step; on a 2-core AVX2 machine it is compute-bound: over
  1M x 256, 14.5 ms for one query (the memory delivers the 256 MB in 10.2), 571 ms for 64.
- `avx2`: 32 bytes per step with the instructions int8 dot products are made of (as in llama.cpp's AVX2 paths): the
  query's signs applied to the row (vpsignb), |query| times that, unsigned by signed, in pairs to int16 (vpmaddubsw),
  pairs of those to int32 (vpmaddwd). Both operands are in [-127, 127], so a pair sums to at most 2 * 127 * 127 =
  32258 and the int16 step never saturates.
- `avx512vnni`: 64 bytes per step, one instruction (vpdpbusd) multiplying unsigned by signed bytes and adding them in
  fours to int32 sums, with no int16 step to saturate; the row is made unsigned by adding 128, and 128 times the
  query's sum is taken off after. At 64 queries, where the scan is compute-bound, it takes about two thirds of the
  avx2 kernel's time.
Numba cannot spell these instructions, so the SIMD kernels are emitted as LLVM IR. They score four rows side by side
(`ROWS_PER_STEP`), and the rows 4 KB ahead are prefetched into the caches: the one-query scan then reads the gallery
about as fast as a plain pass over its bytes does.
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
# Rows the avx2 kernel scores at once (a divisor of ROWS_PER_BLOCK). One row's sum is a chain of additions, each waiting
# on the last; four rows' sums are four chains side by side, and they load each step's query bytes once. Over 1M x 256,
# both with the prefetch below (medians of 30, alternating): 8 queries 27-31 ms against 35 a row at a time, one query
# 12.4-13.0 against 13.0-14.0.
ROWS_PER_STEP = 4
# How far ahead of the row being scored its coming bytes are asked for (one prefetch per cache line, into every cache
# level). One query reads each row once and does little with it, so without the hint the cores wait on memory. Over
# 1M x 256, one query, against one plain pass over the same bytes (medians of 30, alternating): 1 KB ahead as a
# non-temporal prefetch, 1.5-1.9x; 2-8 KB ahead non-temporal, worse (the lines leave the small non-temporal buffer
# before they are read); 4 KB ahead into the caches, 1.1-1.2x (locality 1 to 3 the same, 8 KB the same).
# Issued once a row, not once a query, so batches pay nothing for it.
PREFETCH_BYTES = 4096
PREFETCH_LOCALITY = 3
CACHE_LINE = 64
# Fast-math without reassociation: a score must come out with the same bits whichever copy of the scaling loop LLVM
# made (with and without the score writes, with and without the heaps, vectorised or not), so that the one-pass short
# list holds the very numbers the full scan gives. With reassociation allowed they differed in the last bit.
FASTMATH = {"nnan", "ninf", "nsz"}
# Raised when a kernel changes speed, so that the index measures its choice between this scan and a float GEMM again
# (`quantized_gallery.best_kernel` keeps choices under it) rather than keep one made against an older scan.
SCAN_REVISION = 2
# numba's default threading layer must not be entered from two Python threads at once.
KERNEL_LOCK = threading.Lock()


def _host_features() -> dict:
    try:
        from llvmlite import binding

        return dict(binding.get_host_cpu_features())
    except Exception:  # no feature list on this platform: the portable kernel
        return {}


# The SIMD kernels: the CPU features each needs and the bytes of a row it reads a step (rows must be a multiple).
SIMD_KERNELS = {"avx512vnni": (("avx512vnni", "avx512bw"), 64), "avx2": (("avx2",), 32)}
_HOST_FEATURES = _host_features()


def cpu_has(features) -> bool:
    """Whether this CPU has all of `features` (LLVM's names: "avx2", "avx512bw", ...)."""
    return all(_HOST_FEATURES.get(feature, False) for feature in features)


def available_kernels(dim: int) -> list[str]:
    """The kernels this machine can run over `dim`-wide rows, `portable` first and the fastest last."""
    return ["portable"] + [kernel for kernel, (features, step) in reversed(SIMD_KERNELS.items())
                           if dim % step == 0 and cpu_has(features)]


def chosen_kernel(kernels: list[str], variable: str) -> str:
    """The kernel the environment `variable` names where it is among `kernels` (fastest last), else the fastest."""
    forced = os.environ.get(variable, "").lower()
    return forced if forced in kernels else kernels[-1]


def scan_kernel(dim: int) -> str:
    """Which kernel `int8_scores` runs for `dim`-wide rows on this machine: the fastest it can run, or the one that
    `C2F_INT8_SCAN` names (`portable`, `avx2`, `avx512vnni`) where it can."""
    return chosen_kernel(available_kernels(dim), "C2F_INT8_SCAN")


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
    count = end - start
    block_scales = scales[start:end]
    for query in range(totals.shape[0]):
        # Indices counted from 0 in views of the block: with the row numbers themselves numba's handling of negative
        # indices kept this loop scalar, a third of a 64-query scan.
        sums, query_scale, top = totals[query], query_scales[query], -np.inf
        for slot in range(count):
            value = np.float32(sums[slot]) * block_scales[slot] * query_scale
            values[slot] = value
            top = max(top, value)
        if keep_scores:
            out[query, start:end] = values[:count]
        if keep_best and top > best[query, 0]:
            for slot in range(count):
                if values[slot] > best[query, 0]:
                    _keep(values[slot], start + slot, best, best_rows, query)


def _prefetch(ahead: int):
    """An intrinsic `(codes, row)` that asks for the `dim` bytes `ahead` bytes past the start of `codes[row]`
    (C-contiguous, 2-D), one cache line at a time. A prefetch is a hint: past the end of the array it reads nothing and
    cannot fault."""

    @intrinsic
    def prefetch_row(typingctx, codes, row):
        signature = types.void(codes, row)

        def codegen(context, builder, signature, arguments):
            codes_value, row_value = arguments
            codes_array = context.make_array(signature.args[0])(context, builder, codes_value)
            dim = cgutils.unpack_tuple(builder, codes_array.shape, 2)[1]
            intp = dim.type
            bytes_pointer = ir.IntType(8).as_pointer()
            int32 = ir.IntType(32)
            prefetch = _llvm_function(builder.module, "llvm.prefetch.p0i8", ir.VoidType(), [bytes_pointer, int32, int32, int32])
            start = builder.gep(codes_array.data, [builder.add(builder.mul(row_value, dim), ir.Constant(intp, ahead))])
            with cgutils.for_range_slice(builder, ir.Constant(intp, 0), dim, ir.Constant(intp, CACHE_LINE), intp) as (index, _):
                # read (0), locality, data cache (1)
                builder.call(prefetch, [builder.gep(start, [index]), ir.Constant(int32, 0),
                                        ir.Constant(int32, PREFETCH_LOCALITY), ir.Constant(int32, 1)])
            return context.get_dummy_value()

        return signature, codegen

    return prefetch_row


# A scan asks for the bytes `PREFETCH_BYTES` ahead of the row it reads; a gather for the row it will read next.
_prefetch_ahead = _prefetch(PREFETCH_BYTES)
_prefetch_row = _prefetch(0)


def _llvm_function(module, name, returns, arguments):
    return cgutils.get_or_insert_function(module, ir.FunctionType(returns, arguments), name)


def _simd_dot_rows(kernel: str, rows: int):
    """An intrinsic `(codes, row, prepared, query_codes, query, totals, slot)` that writes
    `codes[row + r] . query_codes[query]` as int32 to `totals[query, slot + r]` for the `rows` rows from `row`, by the
    SIMD `kernel`, for C-contiguous int8 arrays as wide as a multiple of its step; `prepared` is `_prepare(kernel, ...)`.
    The rows share each step's query bytes and keep their own sums, so their steps do not wait on one another.

    - `avx2`, 32 bytes a step: the query's signs applied to the row (vpsignb), |query| times that, unsigned by signed,
      in pairs to int16 (vpmaddubsw), pairs of those to int32 (vpmaddwd).
    - `avx512vnni`, 64 bytes a step: the row made unsigned by adding 128 (flipping its top bit), then unsigned by
      signed, in fours, added to int32 sums in one instruction (vpdpbusd); 128 times the sum of the query's codes is
      taken off at the end."""
    step = SIMD_KERNELS[kernel][1]
    bytes_type = ir.VectorType(ir.IntType(8), step)
    sums_type = ir.VectorType(ir.IntType(32), step // 4)
    words_type = ir.VectorType(ir.IntType(16), step // 2)

    @intrinsic
    def dot_rows(typingctx, codes, row, prepared, query_codes, query, totals, slot):
        signature = types.void(codes, row, prepared, query_codes, query, totals, slot)

        def codegen(context, builder, signature, arguments):
            codes_value, row_value, prepared_value, query_value, query_index, totals_value, slot_value = arguments
            codes_array = context.make_array(signature.args[0])(context, builder, codes_value)
            prepared_array = context.make_array(signature.args[2])(context, builder, prepared_value)
            query_array = context.make_array(signature.args[3])(context, builder, query_value)
            totals_array = context.make_array(signature.args[5])(context, builder, totals_value)
            dim = cgutils.unpack_tuple(builder, codes_array.shape, 2)[1]
            totals_width = cgutils.unpack_tuple(builder, totals_array.shape, 2)[1]
            intp = dim.type
            module = builder.module
            add_lanes = _llvm_function(module, f"llvm.vector.reduce.add.v{step // 4}i32", ir.IntType(32), [sums_type])
            row_starts = [builder.gep(codes_array.data, [builder.mul(builder.add(row_value, ir.Constant(intp, r)), dim)])
                          for r in range(rows)]
            query_offset = builder.mul(query_index, dim)
            query_start = builder.gep(query_array.data, [query_offset])
            sums = [cgutils.alloca_once_value(builder, ir.Constant(sums_type, None)) for _ in range(rows)]
            with cgutils.for_range_slice(builder, ir.Constant(intp, 0), dim, ir.Constant(intp, step), intp) as (index, _):
                def load(start):
                    return builder.load(builder.bitcast(builder.gep(start, [index]), bytes_type.as_pointer()), align=1)

                query_bytes = load(query_start)
                if kernel == "avx2":
                    sign = _llvm_function(module, "llvm.x86.avx2.psign.b", bytes_type, [bytes_type, bytes_type])
                    multiply_bytes = _llvm_function(module, "llvm.x86.avx2.pmadd.ub.sw", words_type, [bytes_type, bytes_type])
                    multiply_words = _llvm_function(module, "llvm.x86.avx2.pmadd.wd", sums_type, [words_type, words_type])
                    magnitudes = load(builder.gep(prepared_array.data, [query_offset]))
                    ones = ir.Constant(words_type, [1] * (step // 2))
                    for row_start, total in zip(row_starts, sums):
                        pairs = builder.call(multiply_bytes, [magnitudes, builder.call(sign, [load(row_start), query_bytes])])
                        builder.store(builder.add(builder.load(total), builder.call(multiply_words, [pairs, ones])), total)
                else:
                    multiply_add = _llvm_function(module, "llvm.x86.avx512.vpdpbusd.512", sums_type, [sums_type] * 3)
                    query_words = builder.bitcast(query_bytes, sums_type)
                    top_bits = ir.Constant(bytes_type, [0x80] * step)
                    for row_start, total in zip(row_starts, sums):
                        unsigned = builder.bitcast(builder.xor(load(row_start), top_bits), sums_type)
                        builder.store(builder.call(multiply_add, [builder.load(total), unsigned, query_words]), total)
            offset = (builder.load(builder.gep(prepared_array.data, [query_index])) if kernel == "avx512vnni"
                      else ir.Constant(ir.IntType(32), 0))
            out = builder.gep(totals_array.data, [builder.add(builder.mul(query_index, totals_width), slot_value)])
            for r, total in enumerate(sums):
                value = builder.sub(builder.call(add_lanes, [builder.load(total)]), offset)
                builder.store(value, builder.gep(out, [ir.Constant(intp, r)]))
            return context.get_dummy_value()

        return signature, codegen

    return dot_rows


_dot_avx2_step = _simd_dot_rows("avx2", ROWS_PER_STEP)
_dot_avx512vnni_step = _simd_dot_rows("avx512vnni", ROWS_PER_STEP)


def _prepare(kernel: str, query_codes: np.ndarray) -> np.ndarray | None:
    """What a kernel reads besides the query codes: |codes| (`avx2`), 128 times each query's sum of codes as int32
    (`avx512vnni`), nothing (`portable`). Its type picks the kernel's compiled specialisation (`_dot_rows`)."""
    if kernel == "avx2":
        return np.abs(query_codes)
    if kernel == "avx512vnni":
        return 128 * query_codes.sum(axis=1, dtype=np.int32)
    return None


@numba.njit(cache=True, inline="always")
def _dot_rows_portable(codes, row, count, query_codes, query, totals, slot):  # pragma: no cover - compiled
    for r in range(count):
        total = np.int32(0)
        for j in range(codes.shape[1]):
            total += np.int32(codes[row + r, j]) * np.int32(query_codes[query, j])
        totals[query, slot + r] = total


def _dot_rows(codes, row, count, prepared, query_codes, query, totals, slot):
    """`totals[query, slot + r] = codes[row + r] . query_codes[query]` (int32) for `count` rows, in compiled code only,
    by the kernel that `prepared`'s type names (`_prepare`): plain loops that LLVM vectorises for None (and for a last
    step of fewer than `ROWS_PER_STEP` rows), `ROWS_PER_STEP` rows at once by the AVX2 intrinsics for an int8 matrix
    and by the AVX-512 VNNI ones for an int32 vector. A choice by argument type, so that each kernel is its own cached
    specialisation of `_scores`, and a SIMD one is never compiled where it cannot run (a function passed as an argument
    would be, and numba does not cache such kernels)."""
    raise NotImplementedError("compiled code only")


@overload(_dot_rows, inline="always")
def _dot_rows_for(codes, row, count, prepared, query_codes, query, totals, slot):
    if isinstance(prepared, types.NoneType):
        def portable(codes, row, count, prepared, query_codes, query, totals, slot):  # pragma: no cover - compiled
            _dot_rows_portable(codes, row, count, query_codes, query, totals, slot)
        return portable

    simd_step = _dot_avx2_step if prepared.ndim == 2 else _dot_avx512vnni_step

    def simd(codes, row, count, prepared, query_codes, query, totals, slot):  # pragma: no cover - compiled
        if count == ROWS_PER_STEP:
            simd_step(codes, row, prepared, query_codes, query, totals, slot)
        else:
            _dot_rows_portable(codes, row, count, query_codes, query, totals, slot)
    return simd


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _scores(codes, scales, prepared, query_codes, query_scales, out, best, best_rows):  # pragma: no cover - compiled
    rows = codes.shape[0]
    queries = query_codes.shape[0]
    blocks, parts = -(-rows // ROWS_PER_BLOCK), best.shape[0]
    for part in numba.prange(parts):
        totals = np.empty((queries, ROWS_PER_BLOCK), np.int32)
        values = np.empty(ROWS_PER_BLOCK, np.float32)
        for block in range(part * blocks // parts, (part + 1) * blocks // parts):
            start = block * ROWS_PER_BLOCK
            end = min(start + ROWS_PER_BLOCK, rows)
            for row in range(start, end, ROWS_PER_STEP):
                count = min(ROWS_PER_STEP, end - row)
                for ahead in range(row, row + count):
                    _prefetch_ahead(codes, ahead)
                for query in range(queries):
                    _dot_rows(codes, row, count, prepared, query_codes, query, totals, row - start)
            _scale_block(totals, start, end, scales, query_scales, out, best[part], best_rows[part], values)


def _scan(codes, scales, query_codes, query_scales, out, keep, kernel):
    """Runs a kernel over all rows, split into one contiguous part per numba thread; each part keeps its own heaps of
    the `keep` best scores per query. Returns them, `([parts, queries, keep], rows)`."""
    kernel = kernel or scan_kernel(codes.shape[1])
    if kernel in SIMD_KERNELS and codes.shape[1] % SIMD_KERNELS[kernel][1]:
        raise ValueError(f"the {kernel} kernel reads rows {SIMD_KERNELS[kernel][1]} bytes at a time; these are "
                         f"{codes.shape[1]} wide")
    if kernel not in available_kernels(codes.shape[1]):  # a SIMD kernel this CPU lacks would die on its first instruction
        raise ValueError(f"kernel {kernel!r} cannot run here; this CPU runs {available_kernels(codes.shape[1])}")
    codes, query_codes = np.ascontiguousarray(codes), np.ascontiguousarray(query_codes)
    if out is None:
        out = np.empty((len(query_codes), 0), np.float32)
    parts = numba.get_num_threads()
    best = np.full((parts, len(query_codes), keep), -np.inf, np.float32)
    best_rows = np.full((parts, len(query_codes), keep), -1, np.int64)
    with KERNEL_LOCK:
        _scores(codes, scales, _prepare(kernel, query_codes), query_codes, query_scales, out, best, best_rows)
    return best, best_rows


def int8_scores(codes: np.ndarray, scales: np.ndarray, query_codes: np.ndarray, query_scales: np.ndarray,
                out: np.ndarray, kernel: str | None = None) -> None:
    """`out[q, row] = scales[row] * query_scales[q] * (codes[row] . query_codes[q])`, all codes int8 in [-127, 127].
    `kernel` defaults to `scan_kernel(dim)`; all give the same numbers."""
    _scan(codes, scales, query_codes, query_scales, out, 0, kernel)


def int8_best(codes: np.ndarray, scales: np.ndarray, query_codes: np.ndarray, query_scales: np.ndarray, k: int,
              kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of the scores `int8_scores` computes, per query and best first: `(scores [Q, k], rows [Q, k])`.

    One pass that writes no scores: each thread keeps a heap of its best `k` and the heaps are merged after. The way
    before it (block maxima, then the best blocks scored again and ranked) took 1.0 ms after a 1M-row scan; one-query
    searches are 0.5-0.7 ms faster this way (of about 13)."""
    k = min(k, len(codes))
    best, best_rows = _scan(codes, scales, query_codes, query_scales, None, k, kernel)
    return merge_parts(best, best_rows, k)


# Partial sums a row's exact dot product keeps, each its own chain: the compiler may then run them in SIMD lanes
# without reassociating (the same bits whichever compiled copy runs, as `FASTMATH` keeps for the scan).
DOT_LANES = 16
# How many rows ahead `_exact_dots` asks for.
GATHER_AHEAD = 8


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _exact_dots(queries, rows, codes, residuals, scales, levels, out):  # pragma: no cover - compiled
    pairs, dim = rows.size, queries.shape[1]
    per_query = rows.shape[1]
    for pair in numba.prange(pairs):
        query, row = pair // per_query, rows[pair // per_query, pair % per_query]
        if pair + GATHER_AHEAD < pairs:  # rows are scattered: ask for a later one's bytes while this one is summed
            later = rows[(pair + GATHER_AHEAD) // per_query, (pair + GATHER_AHEAD) % per_query]
            _prefetch_row(codes, later)
            _prefetch_row(residuals, later)
        lanes = np.zeros(DOT_LANES, np.float32)
        for start in range(0, dim, DOT_LANES):
            for lane in range(min(DOT_LANES, dim - start)):
                at = start + lane
                value = (np.float32(residuals[row, at]) / levels + np.float32(codes[row, at])) * scales[row]
                lanes[lane] += queries[query, at] * value
        total = np.float32(0)
        for lane in range(DOT_LANES):
            total += lanes[lane]
        out[query, pair % per_query] = total


def exact_dots(queries: np.ndarray, rows: np.ndarray, codes: np.ndarray, residuals: np.ndarray, scales: np.ndarray,
               levels: float) -> np.ndarray:
    """`queries [Q, D]` float32 . the stored rows `rows [Q, R]` (int64) -> `[Q, R]` float32, each row's values
    dequantised as `QuantizedEmbeddings.dequantize` does (`scale * (code + residual / levels)`), on numba's threads,
    asking for each row's bytes `GATHER_AHEAD` rows early: a short list's rows are scattered over the planes, and
    numpy gathering and converting them on one thread waited on each read in turn (64 x 512 rows of 10M: 14-17 ms
    against 35-49; 8 x 512: 1.7-2.4 against 3.0-4.1)."""
    out = np.empty(rows.shape, np.float32)
    if rows.size:
        queries, rows = np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(rows, np.int64)
        with KERNEL_LOCK:
            _exact_dots(queries, rows, codes, residuals, scales, np.float32(levels), out)
    return out


def best_first(values: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest `values` of each row and their `labels` (both `[Q, n]`), best first, in numpy on the calling
    thread: a torch `topk` there wakes torch's thread pool, whose idle threads then spin for milliseconds and slow the
    next scan. A 64-query PQ search over 10M rows took 108 ms more than its scan and re-scoring together with torch's
    top-k (and torch's table arithmetic) around the scan, 5 ms more with numpy's."""
    top = np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k :]
    kept = np.take_along_axis(values, top, axis=1)
    order = np.argsort(-kept, axis=1, kind="stable")
    return np.take_along_axis(kept, order, axis=1), np.take_along_axis(np.take_along_axis(labels, top, axis=1), order, axis=1)


def merge_parts(best: np.ndarray, best_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each thread's kept `[parts, Q, n]` values and rows -> the `k` best per query, best first."""
    queries = best.shape[1]
    return best_first(best.transpose(1, 0, 2).reshape(queries, -1), best_rows.transpose(1, 0, 2).reshape(queries, -1), k)
