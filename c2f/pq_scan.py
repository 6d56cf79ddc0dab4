"""A product-quantised first pass for galleries too large for one exact pass per query (`SpeechImageIndex.use_pq`).

Each row is cut into 8-dimension pieces and each piece stored as which of 16 centroids it is nearest to: 4 bits per
piece, 16 bytes a 256-d row, an eighth of the int8 plane. A query's inner product with every centroid of every piece,
rounded to bytes, is a table of 16 entries a piece; a row's approximate score is the sum of its pieces' entries. With
the table in a register, one byte shuffle (vpshufb) looks up a piece for 64 rows at once (16 per 128-bit lane), so the
scan reads the codes at close to the memory's speed (below), and a batch of queries shares each read. The best
`candidates` rows by that sum go to the exact re-scoring, so only a row ranked below them can be missed.

faiss's fast-scan PQ (the index's approximate mode before this one) does the same. Over 10M rows on this 2-core
machine, one query with the same codes and re-scoring was 8.2-10.3x faster than the exact search with faiss's scan,
10.6-15.1x with this one, in turns over six runs; this one reads the codes in 1.3-1.5x a plain read of them (README,
docs/search_measurements.md).

A batch is compute-bound where one query waits on the memory, so a batch first screens each block in saturating
signed bytes (two shuffles and two additions a pair of pieces, the query's tables held in registers across 8 blocks),
and computes exact 16-bit sums only for the few blocks with a row near the query's threshold (`SCREEN_UNITS`): 64
queries over 10M rows in 0.67-0.71 of the time, 8 in 0.85-0.90, with the same candidates (A/B, alternating).

Layout: rows in blocks of 64; a block holds, for each pair of pieces `2p, 2p + 1`, 64 bytes, byte `r` being row `r`'s
code of piece `2p` in its low 4 bits and of piece `2p + 1` in its high 4 bits. A block is 16 bytes a row, contiguous,
so the scan reads the gallery front to back.
"""

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .int8_scan import KERNEL_LOCK, _llvm_function, _prefetch_ahead, chosen_kernel, cpu_has, merge_parts

PIECE_DIM = 8
CENTROIDS = 16
BLOCK_ROWS = 64
# The largest table entry: two pieces' entries are added in a byte before they are widened, a third fewer operations
# a pair than widening each. Over 10M clustered rows 8-bit tables gave the same recall@10 as 7-bit (0.980 / 0.995
# against 0.982 / 0.994 at 256 / 512 candidates), and so did 6- and 5-bit ones: the codes' error, not the tables'
# rounding, decides which rows come back. Adding 8 pieces in a byte (5-bit tables) made a batch at most 5% faster
# (A/B, alternating), so the simpler pairs stayed (docs/search_measurements.md).
TABLE_TOP = 127
# A batch's blocks are taken apart TILE_BLOCKS at a time (2 KB each, so a tile stays in a core's L1 cache), and each
# query screens the whole tile with its tables held in registers (`_simd_tile_screen`, unrolled over the tile).
TILE_BLOCKS = 8
# The screen (batches, SIMD kernels): signed bytes, a query's entries centred on each piece's mean and scaled to
# SCREEN_UNITS per standard deviation of a row's sum, added with saturation from SCREEN_START. A block goes on to the
# exact 16-bit sums only if one of its rows' bytes passes the query's threshold mapped into these units, less
# SCREEN_MARGIN. The two tables' rounding puts a row's screen sum off that line by 1.65 units (standard deviation,
# 8 queries over 640,000 of the benchmark's 256-d rows; about 20 at the very worst), so the margin is about five of
# them: a row the exact sums would admit is all but never screened out, and 2.5% of blocks go on once the threshold
# has settled. A sum past +127 stays there and always goes on; starting SCREEN_START below the mean leaves 5.4
# deviations above it before that happens, past the 3.4 where a 5M-row part's best thousand begin. A sum held at -128
# only comes out higher than it is.
SCREEN_UNITS = 40
SCREEN_START = -88
SCREEN_MARGIN = 8
# The SIMD kernels: the CPU features each needs and the bytes a shuffle covers (64 rows' codes in 64 // step steps).
PQ_KERNELS = {"avx512bw": (("avx512bw",), 64), "avx2": (("avx2",), 32)}


def available_pq_kernels() -> list[str]:
    """The kernels this machine can run, `portable` first and the fastest last."""
    return ["portable"] + [kernel for kernel, (features, _) in reversed(PQ_KERNELS.items()) if cpu_has(features)]


def pq_kernel() -> str:
    """The fastest kernel this machine runs, or the one `C2F_PQ_SCAN` names (`portable`, `avx2`, `avx512bw`) where it
    can."""
    return chosen_kernel(available_pq_kernels(), "C2F_PQ_SCAN")


# ------------------------------------------------------------------ codebooks and codes


def _pieces(rows: torch.Tensor) -> torch.Tensor:
    """`[n, D]` -> `[D / 8, n, 8]`: each piece's rows side by side, for batched products against its centroids."""
    return rows.float().reshape(len(rows), -1, PIECE_DIM).transpose(0, 1)


def _nearest(pieces: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Each piece's nearest centroid (squared L2), `[pieces, n]` int64."""
    distances = torch.baddbmm((codebooks * codebooks).sum(-1)[:, None, :], pieces, codebooks.transpose(1, 2), alpha=-2)
    return distances.argmin(-1)


def train_codebooks(sample: torch.Tensor, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """k-means, 16 centroids for each 8-dimension piece of `sample` `[n, D]`: `[D / 8, 16, 8]` float32.

    Seeded from distinct sample rows, with a fixed generator, so a rebuilt index is the same; a centroid left empty is
    moved to a random row of its piece."""
    if sample.shape[1] % (2 * PIECE_DIM):
        raise ValueError(f"product quantisation cuts rows into pairs of {PIECE_DIM}-dimension pieces (a multiple of "
                         f"{2 * PIECE_DIM} dimensions); these have {sample.shape[1]}")
    if len(sample) < CENTROIDS:
        raise ValueError(f"product quantisation needs at least {CENTROIDS} rows to train on, got {len(sample)}")
    generator = torch.Generator().manual_seed(seed)
    pieces = _pieces(sample)
    count, rows = pieces.shape[0], pieces.shape[1]
    codebooks = pieces[:, torch.randperm(rows, generator=generator)[:CENTROIDS]].clone()
    for _ in range(iterations):
        assigned = _nearest(pieces, codebooks)
        sums = torch.zeros(count, CENTROIDS, PIECE_DIM).scatter_add_(1, assigned[..., None].expand(-1, -1, PIECE_DIM), pieces)
        sizes = torch.zeros(count, CENTROIDS).scatter_add_(1, assigned, torch.ones(count, rows))
        empty = sizes == 0
        codebooks = torch.where(empty[..., None], codebooks, sums / sizes.clamp(min=1)[..., None])
        if empty.any():
            piece, centroid = empty.nonzero(as_tuple=True)
            codebooks[piece, centroid] = pieces[piece, torch.randint(rows, (len(piece),), generator=generator)]
    return codebooks.contiguous()


def encode(rows: torch.Tensor, codebooks: torch.Tensor) -> np.ndarray:
    """Each row's nearest centroid a piece, `[n, D / 8]` uint8 (values 0-15)."""
    return _nearest(_pieces(rows), codebooks).T.to(torch.uint8).numpy()


def pack(codes: np.ndarray) -> np.ndarray:
    """`[n, pieces]` codes (n a multiple of 64) -> `[n / 64, pieces * 32]` uint8 blocks, the layout the scan reads
    (module docstring)."""
    blocks = codes.reshape(-1, BLOCK_ROWS, codes.shape[1])
    pairs = blocks[..., 0::2] | (blocks[..., 1::2] << 4)
    return np.ascontiguousarray(pairs.transpose(0, 2, 1)).reshape(len(blocks), -1)


def _products(queries: torch.Tensor, codebooks: torch.Tensor) -> np.ndarray:
    """Each query's inner product with each centroid of each piece, `[Q, pieces, 16]` float32."""
    pieces = queries.detach().float().numpy().reshape(len(queries), -1, PIECE_DIM)
    return np.einsum("qmd,mcd->qmc", pieces, codebooks.numpy())


def _table_scales(products: np.ndarray) -> np.ndarray:
    """Per query, the factor that stretches the widest piece's range of products to 0-`TABLE_TOP`."""
    return TABLE_TOP / np.maximum((products.max(axis=-1) - products.min(axis=-1)).max(axis=1), np.float32(1e-12))


def _kernel_layout(tables: np.ndarray, kernel: str) -> np.ndarray:
    """Byte tables `[Q, pieces, 16]` as a SIMD `kernel` reads them: repeated for each of four 128-bit lanes,
    `[Q, pieces, 4, 16]` for avx2 (which reads two lanes of them at a time), the same bytes as `[Q, pieces, 64]` for
    avx512bw; the layout picks the compiled specialisation (`_split_mask`)."""
    lanes = np.ascontiguousarray(np.tile(tables, (1, 1, 4)))
    return lanes.reshape(*tables.shape[:2], 4, CENTROIDS) if kernel == "avx2" else lanes


def lookup_tables(queries: torch.Tensor, codebooks: torch.Tensor, kernel: str) -> np.ndarray:
    """Each query's inner product with each centroid, shifted to start at 0 per piece and scaled to 0-`TABLE_TOP` by the
    widest piece's range, rounded: a row's sum of its entries ranks it as its approximate score does (per query).
    int32 `[Q, pieces, 16]` for `portable`, bytes in `_kernel_layout` for the SIMD kernels.
    In numpy, on the calling thread, like everything around the scan (`int8_scan.best_first` says why)."""
    return _lookup_tables(_products(queries, codebooks), kernel)


def _lookup_tables(products: np.ndarray, kernel: str) -> np.ndarray:
    shifted = products - products.min(axis=-1, keepdims=True)
    tables = np.rint(shifted * _table_scales(shifted)[:, None, None]).astype(np.uint8)
    return tables.astype(np.int32) if kernel == "portable" else _kernel_layout(tables, kernel)


def screen_tables(queries: torch.Tensor, codebooks: torch.Tensor, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """The screen's signed byte tables (`SCREEN_UNITS`, in `_kernel_layout`) and, per query, `(slope, offset)` float64
    `[Q, 2]`: a row whose `lookup_tables` sum exceeds `t` has a screen sum of about `slope * t + offset` or more.

    Both tables round the same products: the lookup sum is `scale * (score - sum of piece minima)` and the screen sum
    `SCREEN_START + units * (score - sum of piece means)`, so one threshold maps to the other by a line."""
    return _screen_tables(_products(queries, codebooks), kernel)


def _screen_tables(products: np.ndarray, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    scales = _table_scales(products).astype(np.float64)
    products = products.astype(np.float64)
    means = products.mean(axis=-1)
    deviation = np.sqrt(((products - means[..., None]) ** 2).mean(axis=-1).sum(axis=1))  # of a row's sum, codes uniform
    units = SCREEN_UNITS / np.maximum(deviation, 1e-12)
    tables = np.clip(np.rint((products - means[..., None]) * units[:, None, None]), -127, 127).astype(np.int8)
    offset = SCREEN_START + units * (products.min(axis=-1).sum(axis=1) - means.sum(axis=1))
    return _kernel_layout(tables, kernel), np.stack([units / scales, offset], axis=1)


# ------------------------------------------------------------------ the scan


@numba.njit(cache=True, inline="always")
def _split_codes(packed, block, indices, slot):  # pragma: no cover - compiled
    """A block's codes, one piece per row of `indices[slot]` `[pieces, 64]` (a byte per row, 0-15): done once a
    block, so the queries of a batch share it."""
    for pair in range(packed.shape[1] // BLOCK_ROWS):
        for row in range(BLOCK_ROWS):
            code = packed[block, pair * BLOCK_ROWS + row]
            indices[slot, 2 * pair, row] = code & 15
            indices[slot, 2 * pair + 1, row] = code >> 4


@intrinsic
def _lowest_bit(typingctx, mask):
    """The position of the lowest set bit of a non-zero int64."""
    signature = types.int64(types.int64)

    def codegen(context, builder, signature, arguments):
        count = _llvm_function(builder.module, "llvm.cttz.i64", ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        return builder.call(count, [arguments[0], ir.Constant(ir.IntType(1), 1)])

    return signature, codegen


def _splat(builder, value, vector_type):
    """`value` in every element of `vector_type`."""
    single = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(single, single, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count), [0] * vector_type.count))


def _load_vector(builder, start, offset, vector_type):
    """The `vector_type` at byte `offset` from the byte pointer `start`, unaligned."""
    return builder.load(builder.bitcast(builder.gep(start, [offset]), vector_type.as_pointer()), align=1)


def _simd_block_mask(step: int, split: bool):
    """An intrinsic `(codes, block, tables, query, threshold, sums) -> mask`: the 64 sums of a block's rows for query
    `query` into `sums` (int16, row order), and an int64 whose bit `r` says row `r`'s sum exceeds `threshold`; `step`
    rows a shuffle. `codes` is the packed gallery and `block` the block's number, or (`split`) blocks' codes one
    piece a row (`_split_codes`) and `block` the slot of this one.
    - Each piece's 4-bit codes index its table (vpshufb); the entries are at most `TABLE_TOP` (127), so two pieces'
      bytes are added in bytes (at most 254).
    - Those bytes are added as 16-bit words into two sums: as they are (an even row's byte plus 256 times the next odd
      row's), and shifted down a byte (the odd row's alone). The odd rows' sums are the second, the even rows' the
      first minus 256 times the second; a sum is at most 127 times the pieces (4,064 at 256-d), so neither wraps
      past what that undoes."""
    bytes_type = ir.VectorType(ir.IntType(8), step)
    words_type = ir.VectorType(ir.IntType(16), step // 2)
    shuffle_name = "llvm.x86.avx512.pshuf.b.512" if step == 64 else "llvm.x86.avx2.pshuf.b"

    @intrinsic
    def block_mask(typingctx, codes, block, tables, query, threshold, sums):
        signature = types.int64(codes, block, tables, query, threshold, sums)

        def codegen(context, builder, signature, arguments):
            codes_value, block_value, tables_value, query_value, threshold_value, sums_value = arguments
            codes_array = context.make_array(signature.args[0])(context, builder, codes_value)
            tables_array = context.make_array(signature.args[2])(context, builder, tables_value)
            sums_array = context.make_array(signature.args[5])(context, builder, sums_value)
            shape = cgutils.unpack_tuple(builder, codes_array.shape, 3 if split else 2)
            width = shape[-1]
            intp = width.type
            module = builder.module
            shuffle = _llvm_function(module, shuffle_name, bytes_type, [bytes_type, bytes_type])
            row_bytes = ir.Constant(intp, BLOCK_ROWS)
            # A piece's table is BLOCK_ROWS bytes (repeated per lane), as are its split codes; a query's tables follow.
            pieces = shape[1] if split else builder.udiv(width, ir.Constant(intp, BLOCK_ROWS // 2))
            table_start = builder.gep(tables_array.data, [builder.mul(query_value, builder.mul(pieces, row_bytes))])
            block_bytes = builder.mul(pieces, row_bytes) if split else width
            codes_start = builder.gep(codes_array.data, [builder.mul(block_value, block_bytes)])
            low_bits = ir.Constant(bytes_type, [0x0F] * step)
            four = ir.Constant(bytes_type, [4] * step)
            eight = ir.Constant(words_type, [8] * (step // 2))
            interleave = ir.Constant(ir.VectorType(ir.IntType(32), step), [i // 2 + (step // 2) * (i % 2) for i in range(step)])
            limits = _splat(builder, builder.trunc(threshold_value, ir.IntType(16)), ir.VectorType(ir.IntType(16), step))
            mask = ir.Constant(ir.IntType(64), 0)

            def load(start, offset):
                return _load_vector(builder, start, offset, bytes_type)

            for half in range(BLOCK_ROWS // step):
                both = cgutils.alloca_once_value(builder, ir.Constant(words_type, None))
                odd = cgutils.alloca_once_value(builder, ir.Constant(words_type, None))
                # `at`: the first piece of the pair's table (and split codes), 2 * BLOCK_ROWS bytes a pair.
                pair_bytes = ir.Constant(intp, 2 * BLOCK_ROWS)
                with cgutils.for_range_slice(builder, ir.Constant(intp, half * step), builder.mul(pieces, row_bytes),
                                             pair_bytes, intp) as (at, _):
                    second = builder.add(at, row_bytes)
                    if split:
                        first_codes, second_codes = load(codes_start, at), load(codes_start, second)
                    else:  # the pair's packed byte: BLOCK_ROWS bytes a pair, from the same half
                        both_codes = load(codes_start, builder.udiv(builder.add(at, ir.Constant(intp, half * step)),
                                                                    ir.Constant(intp, 2)))
                        first_codes = builder.and_(both_codes, low_bits)
                        second_codes = builder.and_(builder.lshr(both_codes, four), low_bits)
                    first_bytes = builder.call(shuffle, [load(table_start, at), first_codes])
                    second_bytes = builder.call(shuffle, [load(table_start, second), second_codes])
                    words = builder.bitcast(builder.add(first_bytes, second_bytes), words_type)
                    builder.store(builder.add(builder.load(both), words), both)
                    builder.store(builder.add(builder.load(odd), builder.lshr(words, eight)), odd)
                odd_sums = builder.load(odd)
                even_sums = builder.sub(builder.load(both), builder.shl(odd_sums, eight))
                in_rows = builder.shuffle_vector(even_sums, odd_sums, interleave)
                out = builder.gep(sums_array.data, [ir.Constant(intp, half * step)])
                builder.store(in_rows, builder.bitcast(out, in_rows.type.as_pointer()), align=1)
                above = builder.bitcast(builder.icmp_signed(">", in_rows, limits), ir.IntType(step))
                above = builder.shl(builder.zext(above, ir.IntType(64)), ir.Constant(ir.IntType(64), half * step))
                mask = builder.or_(mask, above)
            return mask

        return signature, codegen

    return block_mask


def _simd_tile_screen(step: int):
    """An intrinsic `(indices, screen, query, limit) -> flagged`: bit `b` of `flagged` says that a row of slot `b` of a
    tile's split codes (`_split_codes`, `TILE_BLOCKS` slots) has a screen sum above `limit` (-128 to 126) for query
    `query` of `screen` (`screen_tables`); `step` rows a shuffle.
    The query's two tables of a pair are loaded once and kept in registers for all the tile's blocks, each of which
    keeps its own sums in a register: per block and pair, two shuffles and two saturating byte additions, against six
    operations and two table loads in `_simd_block_mask`, which then only runs for the few blocks flagged."""
    bytes_type = ir.VectorType(ir.IntType(8), step)
    shuffle_name = "llvm.x86.avx512.pshuf.b.512" if step == 64 else "llvm.x86.avx2.pshuf.b"
    saturating_name = f"llvm.sadd.sat.v{step}i8"

    @intrinsic
    def tile_screen(typingctx, indices, screen, query, limit):
        signature = types.int64(indices, screen, query, limit)

        def codegen(context, builder, signature, arguments):
            indices_value, screen_value, query_value, limit_value = arguments
            indices_array = context.make_array(signature.args[0])(context, builder, indices_value)
            screen_array = context.make_array(signature.args[1])(context, builder, screen_value)
            pieces = cgutils.unpack_tuple(builder, indices_array.shape, 3)[1]
            intp = pieces.type
            module = builder.module
            shuffle = _llvm_function(module, shuffle_name, bytes_type, [bytes_type, bytes_type])
            add = _llvm_function(module, saturating_name, bytes_type, [bytes_type, bytes_type])
            row_bytes = ir.Constant(intp, BLOCK_ROWS)
            slot_bytes = builder.mul(pieces, row_bytes)
            table_start = builder.gep(screen_array.data, [builder.mul(query_value, slot_bytes)])
            table_start = builder.bitcast(table_start, ir.IntType(8).as_pointer())
            slot_starts = [builder.gep(indices_array.data, [builder.mul(ir.Constant(intp, slot), slot_bytes)])
                           for slot in range(TILE_BLOCKS)]
            limits = _splat(builder, builder.trunc(limit_value, ir.IntType(8)), bytes_type)
            flagged = ir.Constant(ir.IntType(64), 0)
            for half in range(BLOCK_ROWS // step):
                sums = [cgutils.alloca_once_value(builder, ir.Constant(bytes_type, [SCREEN_START] * step))
                        for _ in range(TILE_BLOCKS)]
                with cgutils.for_range_slice(builder, ir.Constant(intp, half * step), slot_bytes,
                                             ir.Constant(intp, 2 * BLOCK_ROWS), intp) as (at, _):
                    second = builder.add(at, row_bytes)
                    first_table = _load_vector(builder, table_start, at, bytes_type)
                    second_table = _load_vector(builder, table_start, second, bytes_type)
                    for slot_start, block_sums in zip(slot_starts, sums):
                        first = builder.call(shuffle, [first_table, _load_vector(builder, slot_start, at, bytes_type)])
                        second_bytes = builder.call(shuffle, [second_table, _load_vector(builder, slot_start, second, bytes_type)])
                        builder.store(builder.call(add, [builder.call(add, [builder.load(block_sums), first]), second_bytes]),
                                      block_sums)
                for slot, block_sums in enumerate(sums):
                    above = builder.bitcast(builder.icmp_signed(">", builder.load(block_sums), limits), ir.IntType(step))
                    passed = builder.zext(builder.icmp_unsigned("!=", above, ir.Constant(ir.IntType(step), 0)), ir.IntType(64))
                    flagged = builder.or_(flagged, builder.shl(passed, ir.Constant(ir.IntType(64), slot)))
            return flagged

        return signature, codegen

    return tile_screen


_SIMD_TILE_SCREENS = {step: _simd_tile_screen(step) for step in (64, 32)}


_SIMD_BLOCK_MASKS = {(step, split): _simd_block_mask(step, split) for step in (64, 32) for split in (True, False)}


@numba.njit(cache=True, inline="always")
def _split_mask_portable(indices, slot, tables, query, threshold, sums):  # pragma: no cover - compiled
    mask = 0
    for row in range(BLOCK_ROWS):
        total = 0
        for piece in range(indices.shape[1]):
            total += tables[query, piece, indices[slot, piece, row]]
        sums[row] = total
        if total > threshold:
            mask |= 1 << row
    return mask


@numba.njit(cache=True, inline="always")
def _packed_mask_portable(packed, block, tables, query, threshold, sums):  # pragma: no cover - compiled
    mask = 0
    for row in range(BLOCK_ROWS):
        total = 0
        for pair in range(packed.shape[1] // BLOCK_ROWS):
            code = packed[block, pair * BLOCK_ROWS + row]
            total += tables[query, 2 * pair, code & 15] + tables[query, 2 * pair + 1, code >> 4]
        sums[row] = total
        if total > threshold:
            mask |= 1 << row
    return mask


def _split_mask(indices, block, tables, query, threshold, sums):
    """`sums` of a block's rows for query `query` from its split codes (`_split_codes`), and the bit mask of those
    above `threshold`; compiled code only, by the kernel `tables`' layout names (`lookup_tables`): a choice by type,
    so each kernel is its own cached specialisation of `_candidates` and a SIMD one is never compiled where it cannot
    run. `_packed_mask` is the same from the packed codes of block `block`."""
    raise NotImplementedError("compiled code only")


def _packed_mask(packed, block, tables, query, threshold, sums):
    raise NotImplementedError("compiled code only")


def _overload_mask(function, split: bool, portable):
    @overload(function, inline="always")
    def by_kernel(codes, block, tables, query, threshold, sums):
        kernel = portable if tables.dtype == types.int32 else _SIMD_BLOCK_MASKS[(32 if tables.ndim == 4 else 64, split)]
        return lambda codes, block, tables, query, threshold, sums: kernel(codes, block, tables, query, threshold, sums)


_overload_mask(_split_mask, True, _split_mask_portable)
_overload_mask(_packed_mask, False, _packed_mask_portable)


def _screen_tile(indices, screen, query, limit):
    """`_simd_tile_screen` for the SIMD kernels (by `screen`'s layout, as `_split_mask`); the portable kernel screens
    nothing: every slot flagged."""
    raise NotImplementedError("compiled code only")


@overload(_screen_tile, inline="always")
def _screen_tile_by_kernel(indices, screen, query, limit):
    if screen.dtype == types.int32:
        return lambda indices, screen, query, limit: -1
    kernel = _SIMD_TILE_SCREENS[32 if screen.ndim == 4 else 64]
    return lambda indices, screen, query, limit: kernel(indices, screen, query, limit)


@numba.njit(cache=True, inline="always")
def _screen_limit(lines, query, threshold):  # pragma: no cover - compiled
    """The screen's limit for a query whose exact threshold is `threshold` (`screen_tables`), at most 126 so that a
    saturated sum always passes; -129 when every row must go on (no byte is below -128)."""
    limit = np.floor(lines[query, 0] * threshold + lines[query, 1]) - SCREEN_MARGIN
    return int(min(max(limit, -129.0), 126.0))


@numba.njit(cache=True, inline="always")
def _admit(value, row, kept, kept_rows, counts, thresholds, query):  # pragma: no cover - compiled
    """Appends a row that beats `thresholds[query]` to the query's buffer; a full buffer keeps its best half and
    raises the threshold to the smallest kept. Against a heap, O(1) a row: at 64 queries and 1,024 candidates the
    heaps' sifting took a third of the scan."""
    slot = counts[query]
    kept[query, slot], kept_rows[query, slot] = value, row
    counts[query] = slot + 1
    if slot + 1 < kept.shape[1]:
        return
    half = kept.shape[1] // 2
    cut = np.partition(kept[query].copy(), kept.shape[1] - half)[kept.shape[1] - half]
    ties = half - np.sum(kept[query] > cut)  # rows at the cut that still fit
    size = 0
    for slot in range(kept.shape[1]):  # in place, front to back: a row only ever moves toward the front
        value = kept[query, slot]
        if value > cut or (value == cut and ties > 0):
            ties -= value == cut
            kept[query, size], kept_rows[query, size] = value, kept_rows[query, slot]
            size += 1
    counts[query], thresholds[query] = size, cut


@numba.njit(cache=True, inline="always")
def _admit_mask(mask, start, rows, sums, kept, kept_rows, counts, thresholds, query):  # pragma: no cover - compiled
    """`_admit`s the rows of a block (from row `start`) whose bits are set in `mask`, lowest first."""
    while mask != 0:
        slot = _lowest_bit(mask)
        mask &= mask - 1
        if start + slot < rows and sums[slot] > thresholds[query]:  # the threshold may have risen since
            _admit(np.int32(sums[slot]), start + slot, kept, kept_rows, counts, thresholds, query)


@numba.njit(parallel=True, cache=True)
def _candidates(packed, rows, tables, screen, lines, kept, kept_rows, counts, fused):  # pragma: no cover - compiled
    """`fused`: one query, reading each pair's packed byte and taking its two codes apart in the same step. A batch
    takes `TILE_BLOCKS` blocks' codes apart at once (`_split_codes`); each query screens the tile (`_screen_tile`), and
    only its flagged blocks get the exact sums and the admission of their rows."""
    blocks, parts, queries = packed.shape[0], kept.shape[0], kept.shape[1]
    pieces = 2 * packed.shape[1] // BLOCK_ROWS
    for part in numba.prange(parts):
        sums = np.empty(BLOCK_ROWS, np.int16)
        indices = np.zeros((TILE_BLOCKS, pieces, BLOCK_ROWS), np.uint8)
        thresholds = np.full(queries, -1, np.int32)
        # The part's views made once: a view made in the loop costs reference counting a block and query.
        part_kept, part_rows, part_counts = kept[part], kept_rows[part], counts[part]
        first, last = part * blocks // parts, (part + 1) * blocks // parts
        if fused:
            for block in range(first, last):
                _prefetch_ahead(packed, block)
                mask = _packed_mask(packed, block, tables, 0, thresholds[0], sums)
                _admit_mask(mask, block * BLOCK_ROWS, rows, sums, part_kept, part_rows, part_counts, thresholds, 0)
            continue
        for tile in range(first, last, TILE_BLOCKS):
            tile_end = min(tile + TILE_BLOCKS, last)
            for block in range(tile, tile_end):
                _prefetch_ahead(packed, block)
                _split_codes(packed, block, indices, block - tile)
            in_tile = (1 << (tile_end - tile)) - 1
            for query in range(queries):
                limit = _screen_limit(lines, query, thresholds[query])
                flagged = in_tile if limit < -128 else _screen_tile(indices, screen, query, limit) & in_tile
                while flagged != 0:
                    slot = _lowest_bit(flagged)
                    flagged &= flagged - 1
                    mask = _split_mask(indices, slot, tables, query, thresholds[query], sums)
                    _admit_mask(mask, (tile + slot) * BLOCK_ROWS, rows, sums, part_kept, part_rows, part_counts,
                                thresholds, query)


class ProductQuantizedRows:
    """The 4-bit codes of a gallery's rows and the codebooks they index; `candidates` runs the scan."""

    def __init__(self, codebooks: torch.Tensor, packed: np.ndarray, rows: int):
        self.codebooks, self.packed, self.rows = codebooks, packed, rows

    def tensors(self) -> dict[str, torch.Tensor]:
        """The codebooks and packed codes, as an index file stores them beside its planes."""
        return {"pq_codebooks": self.codebooks, "pq_codes": torch.from_numpy(self.packed)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], rows: int, dim: int, source: str) -> "ProductQuantizedRows":
        """From the tensors of a saved index of `rows` `dim`-d rows; `source` names the file in errors. The codes are
        used where they lie (memory-mapped), so they are checked against the layout the scan reads first."""
        shapes = {"pq_codebooks": ((dim // PIECE_DIM, CENTROIDS, PIECE_DIM), torch.float32),
                  "pq_codes": ((-(-rows // BLOCK_ROWS), dim // PIECE_DIM * BLOCK_ROWS // 2), torch.uint8)}
        for name, (shape, dtype) in shapes.items():
            if name not in tensors:
                raise ValueError(f"{source}: tensor {name!r} is missing beside the other PQ tensor; rebuild the index or "
                                 "save it again")
            if tensors[name].dtype != dtype or tuple(tensors[name].shape) != shape:
                raise ValueError(f"{source}: tensor {name!r} is {tensors[name].dtype} {tuple(tensors[name].shape)}, "
                                 f"expected {dtype} {shape} for {rows} rows of {dim} dimensions")
        return cls(tensors["pq_codebooks"], tensors["pq_codes"].numpy(), rows)

    @classmethod
    def build(cls, sample: torch.Tensor, rows: int, shard_rows, progress_bar=None) -> "ProductQuantizedRows":
        """Trains codebooks on `sample`, then encodes the gallery shard by shard: `shard_rows(start, end)` gives the
        float rows `[start, end)`, so the float gallery never exists whole."""
        codebooks = train_codebooks(sample)
        blocks = -(-rows // BLOCK_ROWS)
        packed = np.zeros((blocks, codebooks.shape[0] * BLOCK_ROWS // 2), np.uint8)
        shard = 2_048 * BLOCK_ROWS
        starts = range(0, rows, shard)
        for start in starts if progress_bar is None else progress_bar(starts):
            end = min(start + shard, rows)
            codes = np.zeros((-(-(end - start) // BLOCK_ROWS) * BLOCK_ROWS, codebooks.shape[0]), np.uint8)
            codes[: end - start] = encode(shard_rows(start, end), codebooks)
            packed[start // BLOCK_ROWS : start // BLOCK_ROWS + len(codes) // BLOCK_ROWS] = pack(codes)
        return cls(codebooks, packed, rows)

    def candidates(self, queries: torch.Tensor, count: int, kernel: str | None = None,
                   parts: int | None = None) -> np.ndarray:
        """The `count` rows with the best approximate scores per query, `[Q, count]` int64, best first (ties in any
        order). The rows are cut into `parts` contiguous parts (default: one per numba thread), each scanned by one
        thread into a buffer of at most `2 * count` rows per query (`_admit`); the buffers are merged after."""
        kernel = kernel or pq_kernel()
        if kernel not in available_pq_kernels():
            raise ValueError(f"PQ kernel {kernel!r} cannot run here; this CPU runs {available_pq_kernels()}")
        count = min(count, self.rows)
        products = _products(queries, self.codebooks)  # once, for both tables
        tables = _lookup_tables(products, kernel)
        if kernel == "portable":  # screens nothing (`_screen_tile`)
            screen, lines = tables, np.zeros((len(queries), 2))
        elif len(queries) == 1:  # not screened: it waits on the memory, not on the arithmetic. Empty tables of the
            # screen's type keep one compiled specialisation of `_candidates` per kernel.
            screen, lines = np.zeros((0, *tables.shape[1:]), np.int8), np.zeros((1, 2))
        else:
            screen, lines = _screen_tables(products, kernel)
        parts = max(1, min(parts or numba.get_num_threads(), len(self.packed)))
        best = np.full((parts, len(queries), 2 * count), -1, np.int32)
        best_rows = np.zeros((parts, len(queries), 2 * count), np.int64)
        kept = np.zeros((parts, len(queries)), np.int64)
        with KERNEL_LOCK:
            _candidates(self.packed, self.rows, tables, screen, lines, best, best_rows, kept, len(queries) == 1)
        best[np.arange(2 * count) >= kept[..., None]] = -1  # past a buffer's count: rows moved forward, or none; below any sum
        return merge_parts(best, best_rows, count)[1]
