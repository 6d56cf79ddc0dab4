"""The int8 gallery: storage precision, exact top-k against brute force (including when the int8 scan cannot tell the
best rows apart), and clear errors for broken files."""

import json

import pytest
import torch

import c2f.quantized_gallery as quantized_gallery
from c2f.quantized_gallery import QuantizedEmbeddings


def brute_force(queries, gallery: QuantizedEmbeddings, top_k):
    return (queries @ gallery.dequantize().t()).topk(top_k, dim=1)


def count_scans(monkeypatch) -> list:
    """Queries per pass over the gallery, as `("first", Q)` for the short list and `("bound", Q)` for the rows the
    bound could not rule out."""
    scans = []
    first, chunks = QuantizedEmbeddings._shortlist, QuantizedEmbeddings._approximate_chunks
    in_first = []

    def counted_first(self, queries, *args):
        scans.append(("first", len(queries)))
        in_first.append(True)
        try:
            return first(self, queries, *args)
        finally:
            in_first.pop()

    def counted_chunks(self, queries, *args):
        if not in_first:
            scans.append(("bound", len(queries)))
        return chunks(self, queries, *args)

    monkeypatch.setattr(QuantizedEmbeddings, "_shortlist", counted_first)
    monkeypatch.setattr(QuantizedEmbeddings, "_approximate_chunks", counted_chunks)
    return scans


def test_two_planes_store_unit_rows_finer_than_float16():
    rows = torch.nn.functional.normalize(torch.randn(500, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    rows[3] = 0
    gallery = QuantizedEmbeddings.quantize(rows)
    error = (gallery.dequantize() - rows).abs().max()
    assert error < (rows.half().float() - rows).abs().max() / 4
    assert error <= gallery.scales.max() / (2 * quantized_gallery.RESIDUAL_LEVELS) + 1e-7
    assert torch.equal(gallery.dequantize()[3], torch.zeros(64))
    codes_only = gallery.scales[:, None] * gallery.codes.float()
    assert torch.allclose(gallery.code_norms, codes_only.norm(dim=1))
    assert torch.allclose(gallery.residual_norms, (gallery.dequantize() - codes_only).norm(dim=1), atol=1e-7)


@pytest.mark.parametrize("kernel", quantized_gallery.KERNELS)
def test_top_k_is_brute_force_in_chunks(monkeypatch, kernel):
    generator = torch.Generator().manual_seed(1)
    gallery = QuantizedEmbeddings.quantize(torch.nn.functional.normalize(torch.randn(3000, 32, generator=generator), dim=1))
    queries = torch.nn.functional.normalize(torch.randn(9, 32, generator=generator), dim=1)
    scans = count_scans(monkeypatch)
    for batch in (queries[:1], queries):
        scores, rows = gallery.top_k(batch, 7, chunk_scores=4000, kernel=kernel)
        exact = brute_force(batch, gallery, 7)
        assert torch.equal(rows, exact.indices) and torch.allclose(scores, exact.values, atol=1e-6)
    assert scans == [("first", 1), ("first", 9)]  # one scan each: the short list was enough
    assert gallery.top_k(queries[:0], 7)[1].shape == (0, 7)
    scores, rows = gallery.top_k(queries[:2], 5000, kernel=kernel)
    assert rows.shape == (2, 3000) and torch.equal(rows, brute_force(queries[:2], gallery, 3000).indices)


@pytest.mark.parametrize("kernel", quantized_gallery.KERNELS)
def test_rows_the_int8_scan_cannot_separate_are_rescored(monkeypatch, kernel):
    generator = torch.Generator().manual_seed(2)
    center = torch.nn.functional.normalize(torch.randn(1, 48, generator=generator), dim=1)
    # 600 rows within 1e-4 of each other (finer than the int8 step) beside 400 unrelated ones: the scan's order among
    # them is noise, and the exact best five are almost never all in its short list of 128.
    near = center + 1e-4 * torch.randn(600, 48, generator=generator)
    rows = torch.cat([torch.nn.functional.normalize(torch.randn(400, 48, generator=generator), dim=1), near])
    gallery = QuantizedEmbeddings.quantize(rows)
    query = center + 0.01 * torch.randn(1, 48, generator=generator)
    scans = count_scans(monkeypatch)
    monkeypatch.setattr(quantized_gallery, "RESCORE_ROWS", 50)  # re-score the doubtful rows in several pieces
    scores, found = gallery.top_k(query, 5, chunk_scores=256, kernel=kernel)
    exact = brute_force(query, gallery, 5)
    assert torch.equal(found, exact.indices) and torch.allclose(scores, exact.values, atol=1e-6)
    assert scans == [("first", 1), ("bound", 1)]  # the bound asked for the second scan


def test_the_kernel_is_measured_once_per_machine_and_batch_size_then_read_back(tmp_path, monkeypatch):
    measured = []

    def fake_measure(num_queries, dim):
        measured.append(num_queries)
        return {"int8": 5.0, "float32": 9.0} if num_queries == 1 else {"int8": 9.0, "float32": 5.0}

    monkeypatch.setattr(quantized_gallery, "measure_kernels", fake_measure)
    monkeypatch.setattr(quantized_gallery, "KERNEL_CHOICES", tmp_path / "kernels.json")
    monkeypatch.setattr(quantized_gallery, "_kernel_choices", None)
    assert quantized_gallery.best_kernel(1, 32) == "int8" and quantized_gallery.best_kernel(40, 32) == "float32"
    assert quantized_gallery.best_kernel(64, 32) == "float32" and measured == [1, 64]  # 40 and 64 share a bucket
    monkeypatch.setattr(quantized_gallery, "_kernel_choices", None)  # a new process reads the choices back
    assert quantized_gallery.best_kernel(1, 32) == "int8" and measured == [1, 64]
    assert set(json.loads((tmp_path / "kernels.json").read_text()).values()) == {"int8", "float32"}
    gallery = QuantizedEmbeddings.quantize(torch.nn.functional.normalize(torch.randn(50, 32), dim=1))
    with pytest.raises(ValueError, match="kernel must be one of"):
        gallery.top_k(torch.randn(1, 32), 3, kernel="float16")


def test_broken_index_tensors_name_the_file_and_the_tensor():
    tensors = QuantizedEmbeddings.quantize(torch.randn(4, 8)).tensors()
    with pytest.raises(ValueError, match=r"idx/e\.safetensors: tensor 'scales' is missing"):
        QuantizedEmbeddings.from_tensors({k: v for k, v in tensors.items() if k != "scales"}, "idx/e.safetensors")
    with pytest.raises(ValueError, match="tensor 'codes' is torch.float32, expected torch.int8"):
        QuantizedEmbeddings.from_tensors({**tensors, "codes": tensors["codes"].float()}, "f")
    with pytest.raises(ValueError, match="disagree on the number of items"):
        QuantizedEmbeddings.from_tensors({**tensors, "scales": tensors["scales"][:3]}, "f")
    with pytest.raises(ValueError, match="NaN or inf"):
        QuantizedEmbeddings.quantize(torch.tensor([[0.5, float("nan")]]))


@pytest.mark.parametrize("dim, rows", [(64, 301), (256, 301), (256, 3)])
def test_both_scan_kernels_give_the_exact_integer_products(dim, rows):
    """Every row's own product, in its own place, by every kernel this machine can run: the SIMD kernels score rows in
    steps of several, and 301 rows end in a short step (as do 3, fewer than one step)."""
    import numpy as np

    from c2f.int8_scan import available_kernels, int8_scores, scan_kernel

    rng = np.random.default_rng(dim + rows)
    codes = rng.integers(-127, 128, (rows, dim), dtype=np.int8)
    codes[0], codes[1] = 127, -127  # the extremes: |pair sums| reach 2 * 127 * 127, just inside int16
    queries = rng.integers(-127, 128, (3, dim), dtype=np.int8)
    queries[0] = -127
    scales, query_scales = rng.random(rows).astype(np.float32), rng.random(3).astype(np.float32)
    products = queries.astype(np.int64) @ codes.astype(np.int64).T
    kernels = available_kernels(dim)
    assert scan_kernel(dim) == kernels[-1]
    for kernel in kernels:
        out = np.empty((3, rows), np.float32)
        int8_scores(codes, scales, queries, query_scales, out, kernel=kernel)
        # the kernels' own order of operations: the integer product, times the row's scale, times the query's
        np.testing.assert_array_equal(out, products.astype(np.float32) * scales * query_scales[:, None])
    for kernel, step in (("avx2", 32), ("avx512vnni", 64)):
        with pytest.raises(ValueError, match=f"the {kernel} kernel reads rows {step} bytes at a time; these are 48 wide"):
            int8_scores(codes[:, :48], scales, queries[:, :48], query_scales, np.empty((3, rows), np.float32), kernel=kernel)
    with pytest.raises(ValueError, match="kernel 'avx' cannot run here"):
        int8_scores(codes, scales, queries, query_scales, np.empty((3, rows), np.float32), kernel="avx")


def test_a_cpu_without_the_simd_instructions_runs_the_portable_kernel_and_refuses_the_others(monkeypatch):
    import numpy as np

    from c2f import int8_scan

    monkeypatch.setattr(int8_scan, "_HOST_FEATURES", {"avx2": True})  # AVX2, no AVX-512
    assert int8_scan.available_kernels(256) == ["portable", "avx2"] and int8_scan.scan_kernel(256) == "avx2"
    monkeypatch.setenv("C2F_INT8_SCAN", "avx512vnni")  # asked for, but not there: the fastest that is
    assert int8_scan.scan_kernel(256) == "avx2"
    monkeypatch.setattr(int8_scan, "_HOST_FEATURES", {})
    assert int8_scan.scan_kernel(256) == "portable"
    codes, queries = np.ones((4, 256), np.int8), np.ones((1, 256), np.int8)
    with pytest.raises(ValueError, match=r"kernel 'avx2' cannot run here; this CPU runs \['portable'\]"):
        int8_scan.int8_scores(codes, np.ones(4, np.float32), queries, np.ones(1, np.float32), np.empty((1, 4), np.float32),
                              kernel="avx2")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("queries, rows, k, pattern", [(1, 10_003, 50, "one block"), (2, 4_000, 7, "one block"),
                                                      (1, 100, 20, "one block"), (3, 64 * 40, 30, "ascending"),
                                                      (4, 64 * 40 + 17, 300, "ascending"), (1, 70, 100, "ascending")])
def test_the_scans_own_best_rows_are_the_full_scans_topk(queries, rows, k, pattern, threads):
    """The one-pass short list (each thread's heap of its best rows, merged) ranks as the full scan would, best first:
    with the best rows crowded into one thread's part, with scores rising row after row (every row enters the heap),
    and with more wanted than a part holds, or than there are rows."""
    import numba
    import numpy as np

    from c2f.int8_scan import int8_best, int8_scores

    generator = torch.Generator().manual_seed(rows)
    query = torch.nn.functional.normalize(torch.randn(queries, 32, generator=generator), dim=1)
    weight = torch.zeros(rows)
    if pattern == "one block":  # one block holds many of the best
        weight[5 * 64 : 6 * 64] = 2
    else:
        weight = torch.linspace(0, 3, rows)
    rows_ = weight[:, None] * query.sum(0) + torch.nn.functional.normalize(torch.randn(rows, 32, generator=generator), dim=1)
    gallery = QuantizedEmbeddings.quantize(torch.nn.functional.normalize(rows_, dim=1))
    query_codes, query_scales = (tensor.numpy() for tensor in quantized_gallery._int8_rows(query))
    codes, scales = gallery.codes.numpy(), gallery.scales.numpy()
    scores = np.empty((queries, rows), np.float32)
    int8_scores(codes, scales, query_codes, query_scales, scores)
    default_threads = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        best, found = int8_best(codes, scales, query_codes, query_scales, k)
    finally:
        numba.set_num_threads(default_threads)
    expected = torch.from_numpy(scores).topk(min(k, rows), dim=1)
    assert best.shape == found.shape == (queries, min(k, rows))
    np.testing.assert_array_equal(np.sort(best, axis=1), np.sort(expected.values.numpy(), axis=1))
    np.testing.assert_array_equal(np.take_along_axis(scores, found, axis=1), best)
    np.testing.assert_array_equal(best, -np.sort(-best, axis=1))  # best first: the caller's bound reads the last
    np.testing.assert_array_equal(np.sort(found, axis=1), np.sort(expected.indices.numpy(), axis=1))


@pytest.mark.parametrize("kernel", quantized_gallery.KERNELS)
def test_a_batch_top_k_is_exact(kernel):
    """A batch of queries, still the exact top k: by the float32 kernel over many small chunks, the last one partial,
    whose every score torch ranks; by the int8 scan keeping each query's best rows itself."""
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.nn.functional.normalize(torch.randn(20_011, 32, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(8, 32, generator=generator), dim=1)
    # The first query's best rows straddle row 1,000, where a chunk of 8,000 / 8 scores ends.
    embeddings[995:1_005] = torch.nn.functional.normalize(queries[0] + 0.1 * torch.randn(10, 32, generator=generator), dim=1)
    gallery = QuantizedEmbeddings.quantize(embeddings)
    best, rows = gallery.top_k(queries, 10, chunk_scores=1_000 * len(queries), kernel=kernel)
    expected = (queries @ gallery.dequantize().t()).topk(10, dim=1)
    assert torch.equal(rows, expected.indices)
    torch.testing.assert_close(best, expected.values)


@pytest.mark.parametrize("dim", [40, 256])
def test_exact_scores_are_the_dot_products_of_the_stored_rows(dim):
    """Each query against its own rows, as the dequantised rows give them (a width that is not a multiple of the
    partial sums' 16 lanes too); rows named twice or out of order, and no rows at all."""
    generator = torch.Generator().manual_seed(dim)
    gallery = QuantizedEmbeddings.quantize(torch.randn(500, dim, generator=generator))
    queries = torch.randn(3, dim, generator=generator)
    rows = torch.randint(500, (3, 70), generator=generator)
    rows[:, 1] = rows[:, 0]
    expected = torch.einsum("qd,qrd->qr", queries, gallery.dequantize(rows))
    assert torch.allclose(gallery.exact_scores(queries, rows), expected, atol=1e-5, rtol=1e-6)
    assert gallery.exact_scores(queries, rows[:, :0]).shape == (3, 0)
