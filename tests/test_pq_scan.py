"""The product-quantised first pass: every kernel finds the rows with the best table sums, whatever the CPU."""

import numpy as np
import pytest
import torch

from c2f import int8_scan, pq_scan
from c2f.pq_scan import ProductQuantizedRows


def _gallery(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, ProductQuantizedRows, np.ndarray]:
    """Random unit rows, their PQ codes, and the codes unpacked (`[rows, pieces]`), to sum tables by hand."""
    vectors = torch.nn.functional.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)
    codebooks = pq_scan.train_codebooks(vectors[:2_000])
    codes = np.zeros((-(-rows // 64) * 64, dim // 8), np.uint8)
    codes[:rows] = pq_scan.encode(vectors, codebooks)
    return vectors, ProductQuantizedRows(codebooks, pq_scan.pack(codes), rows), codes[:rows]


def _table_sums(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`[Q, rows]`: each row's sum of its pieces' entries, from portable (int32 `[Q, pieces, 16]`) tables."""
    return np.stack([table[np.arange(codes.shape[1]), codes.astype(np.int64)].sum(1) for table in tables])


@pytest.mark.parametrize("kernel", pq_scan.available_pq_kernels())
@pytest.mark.parametrize("rows, count", [(5_000, 40), (3_001, 700), (70, 100)])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_kernel_returns_the_rows_with_the_best_table_sums(kernel, rows, count, batch):
    """Against sums done by hand: rows not a multiple of 64 (the padded last block's rows must never come back), a
    buffer that fills and halves many times (40 of 5,000), one that is most of the gallery, and more asked than rows;
    one query (codes taken apart as they are read) and a batch (each block's codes taken apart once)."""
    _, pq, codes = _gallery(rows, 64, seed=rows)
    queries = torch.nn.functional.normalize(torch.randn(batch, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    sums = _table_sums(pq_scan.lookup_tables(queries, pq.codebooks, "portable"), codes)
    found = pq.candidates(queries, count, kernel)
    count = min(count, rows)
    assert found.shape == (batch, count)
    for query in range(batch):
        assert len(set(found[query].tolist())) == count and found[query].max() < rows
        got = sums[query, found[query]]
        assert np.all(got[:-1] >= got[1:])  # best first
        assert np.array_equal(got, np.sort(sums[query])[::-1][:count])  # the best sums (ties may pick either row)


@pytest.mark.parametrize("kernel", pq_scan.available_pq_kernels())
def test_rows_tied_at_the_cut_fill_half_the_buffer(kernel):
    """Runs of 1,600 copies of one row, then 1,600 of a better one, twice (so each thread's part sees both): each
    query's buffer fills with equal sums, and a compaction must keep exactly half of it; keeping every tie would leave
    no room for the better rows that come after. The rows returned are distinct, with the best sums."""
    worse, better = torch.nn.functional.normalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(4)), dim=1)
    rows = torch.cat([worse.expand(1_600, 64), better.expand(1_600, 64)]).repeat(2, 1)
    codebooks = pq_scan.train_codebooks(rows + 0.01 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(5)))
    codes = pq_scan.encode(rows, codebooks)
    pq = ProductQuantizedRows(codebooks, pq_scan.pack(codes), len(rows))
    queries = torch.stack([better, better + worse])
    sums = _table_sums(pq_scan.lookup_tables(queries, codebooks, "portable"), codes)
    assert sums[0, 0] < sums[0, 1_600]  # the better row scores higher
    found = pq.candidates(queries, 40, kernel)
    for query in range(2):
        assert len(set(found[query].tolist())) == 40
        assert np.array_equal(sums[query, found[query]], np.sort(sums[query])[::-1][:40])


@pytest.mark.parametrize("parts", [2, 3])
def test_the_scan_numbers_rows_across_its_parts(parts):
    """Each thread scans its own contiguous part; a row a later part finds must come back as its gallery row."""
    vectors, pq, _ = _gallery(4_000, 32, seed=2)
    picked = np.array([5, 1_999, 2_000, 3_999])
    found = pq.candidates(vectors[picked], 32, parts=parts)
    assert all(row in found[i] for i, row in enumerate(picked))


def test_tables_use_the_byte_range_the_kernels_add_in():
    """Entries reach TABLE_TOP (the widest piece is stretched to it) and never pass it: two are added in a byte."""
    codebooks = torch.randn(4, 16, 8)
    tables = pq_scan.lookup_tables(torch.randn(5, 32), codebooks, "portable")
    assert tables.shape == (5, 4, 16)
    assert tables.min() == 0 and tables.max() == pq_scan.TABLE_TOP
    assert np.all(tables.max(axis=(1, 2)) == pq_scan.TABLE_TOP) and np.all(tables.min(axis=2) == 0)
    for kernel, shape in [("avx2", (5, 4, 4, 16)), ("avx512bw", (5, 4, 64))]:  # each lane of the shuffle its own copy
        lanes = pq_scan.lookup_tables(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), codebooks, kernel)
        assert lanes.shape == shape
        assert np.array_equal(lanes.reshape(5, 4, 4, 16), np.repeat(lanes.reshape(5, 4, 4, 16)[:, :, :1], 4, axis=2))


def test_codes_are_each_pieces_nearest_centroid_and_pack_in_pairs():
    rows = torch.randn(128, 32)
    codebooks = pq_scan.train_codebooks(torch.randn(500, 32))
    codes = pq_scan.encode(rows, codebooks)
    distances = ((rows.reshape(128, 4, 1, 8) - codebooks[None]) ** 2).sum(-1)
    assert np.array_equal(codes, distances.argmin(-1).numpy())
    packed = pq_scan.pack(codes)
    assert packed.shape == (2, 2 * 64)
    # Block 1, pieces 2 and 3 of row 64 + 5: the second pair's byte 5, low and high 4 bits.
    assert packed[1, 64 + 5] == codes[69, 2] | (codes[69, 3] << 4)


def test_training_refuses_rows_it_cannot_cut_or_fit():
    with pytest.raises(ValueError, match=r"multiple of 16 dimensions\); these have 24"):
        pq_scan.train_codebooks(torch.randn(100, 24))
    with pytest.raises(ValueError, match="at least 16 rows"):
        pq_scan.train_codebooks(torch.randn(10, 32))


def test_a_cpu_without_avx512_scans_with_avx2_and_refuses_the_rest(monkeypatch):
    _, pq, _ = _gallery(300, 32, seed=3)
    monkeypatch.setattr(int8_scan, "_HOST_FEATURES", {"avx2": True})
    assert pq_scan.available_pq_kernels() == ["portable", "avx2"] and pq_scan.pq_kernel() == "avx2"
    with pytest.raises(ValueError, match=r"'avx512bw' cannot run here; this CPU runs \['portable', 'avx2'\]"):
        pq.candidates(torch.randn(1, 32), 5, "avx512bw")
    monkeypatch.setattr(int8_scan, "_HOST_FEATURES", {})
    assert pq_scan.pq_kernel() == "portable"
    monkeypatch.setenv("C2F_PQ_SCAN", "avx2")  # named, but this CPU cannot: the fastest it can
    assert pq_scan.pq_kernel() == "portable"


def test_the_screen_sums_follow_the_lookup_sums_by_its_line():
    """A row's screen sum (signed bytes, `SCREEN_UNITS` per deviation of a row's sum) lies on the line `screen_tables`
    gives through its lookup sum, off it only by the two tables' rounding: a spread under a quarter of
    `SCREEN_MARGIN`, and no row of 5,000 off by the margin, so the screen does not drop a row the exact sums admit.
    Its sums spread by about `SCREEN_UNITS`."""
    _, pq, codes = _gallery(5_000, 128, seed=6)
    queries = torch.nn.functional.normalize(torch.randn(4, 128, generator=torch.Generator().manual_seed(7)), dim=1)
    sums = _table_sums(pq_scan.lookup_tables(queries, pq.codebooks, "portable"), codes)
    screen, lines = pq_scan.screen_tables(queries, pq.codebooks, "avx512bw")
    assert screen.dtype == np.int8 and screen.shape == (4, 16, 64)
    screen_sums = pq_scan.SCREEN_START + _table_sums(screen[..., :16].astype(np.int64), codes)
    off_the_line = screen_sums - (lines[:, :1] * sums + lines[:, 1:])
    assert np.abs(off_the_line).max() < pq_scan.SCREEN_MARGIN and off_the_line.std() < pq_scan.SCREEN_MARGIN / 4
    assert np.all(np.abs(screen_sums.std(axis=1) / pq_scan.SCREEN_UNITS - 1) < 0.15)


@pytest.mark.parametrize("kernel", pq_scan.available_pq_kernels())
def test_rows_far_above_the_rest_pass_the_screen_at_its_top(kernel):
    """Every tenth of 3,000 rows is close to the first query: its threshold soon lies among them, where screen sums
    have long stopped at +127, so the screen's limit must stay below 127 for them to reach the exact sums."""
    near = torch.nn.functional.normalize(torch.randn(256, generator=torch.Generator().manual_seed(8)), dim=0)
    rows = torch.nn.functional.normalize(torch.randn(3_000, 256, generator=torch.Generator().manual_seed(9)), dim=1)
    codebooks = pq_scan.train_codebooks(rows)  # before the near rows: trained on them, they would share one code
    rows[::10] = torch.nn.functional.normalize(near + 0.5 * rows[::10], dim=1)
    codes = pq_scan.encode(rows, codebooks)
    padded = np.zeros((-(-len(rows) // 64) * 64, codes.shape[1]), np.uint8)
    padded[: len(rows)] = codes
    pq = ProductQuantizedRows(codebooks, pq_scan.pack(padded), len(rows))
    queries = torch.stack([near, rows[1]])
    sums = _table_sums(pq_scan.lookup_tables(queries, codebooks, "portable"), codes)
    screen, lines = pq_scan.screen_tables(queries, codebooks, "avx512bw")
    screen_sums = pq_scan.SCREEN_START + _table_sums(screen[..., :16].astype(np.int64), codes)
    assert np.sort(screen_sums[0])[-60] > 127 + pq_scan.SCREEN_MARGIN  # the first query's best 60 all saturate
    found = pq.candidates(queries, 30, kernel)
    for query in range(2):
        assert np.array_equal(sums[query, found[query]], np.sort(sums[query])[::-1][:30])
