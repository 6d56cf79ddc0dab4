"""Coarse search speed, recall and memory of SpeechImageIndex against faiss IndexFlatIP and a bare fp32 mm + topk,
over galleries of random normalised 256-d embeddings (isotropic, and clustered as trained embeddings are), at 1, 8
and 64 queries, with each of the index's two scan kernels forced beside the one it measured fastest on this machine;
plus the SIM re-rank cost per query with the demo model.

    python benchmarks/search_bench.py [--sizes 10000 100000 1000000] [--model outputs/c2f-demo]

Everything is measured in this one run, on this machine; ratios are against faiss measured alongside.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from c2f.quantized_gallery import KERNELS, best_kernel
from c2f.retrieval import SpeechImageIndex

DIM = 256


def timed(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def recall_at_10(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel()


def make_gallery(size: int, clustered: bool, generator: torch.Generator) -> torch.Tensor:
    """Random unit rows; `clustered`: groups of 50 around random centres at cosine about 0.7, as trained embeddings
    cluster (isotropic rows are the easy case for a bound-based exact search)."""
    if not clustered:
        return torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=1)
    centres = torch.nn.functional.normalize(torch.randn(-(-size // 50), DIM, generator=generator), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=1)
    return torch.nn.functional.normalize(0.7 * centres.repeat_interleave(50, dim=0)[:size] + 0.714 * noise, dim=1)


def queries_near(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` unit queries near randomly picked `rows` (a random unit offset of 0.3), as real queries sit near the
    data in a clustered gallery."""
    picks = rows[torch.randint(len(rows), (count,), generator=generator)]
    offsets = torch.nn.functional.normalize(torch.randn(count, rows.shape[1], generator=generator), dim=1)
    return torch.nn.functional.normalize(picks + 0.3 * offsets, dim=1)


def faiss_peers(gallery: torch.Tensor, hnsw: bool) -> dict:
    """faiss's other answers to the same search: fp16 scalar quantisation (the index's memory), 8-bit scalar
    quantisation re-ranked by the float rows, and HNSW (approximate; building it is slow, so only when asked)."""
    import faiss

    data = gallery.numpy()
    sq16 = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    sq16.train(data)
    sq16.add(data)
    sq8 = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    refine = faiss.IndexRefineFlat(sq8)
    refine.train(data)
    refine.add(data)
    refine.k_factor = 4
    peers = {"faiss SQfp16": sq16, "faiss SQ8+refine": refine}
    if hnsw:
        graph = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efSearch = 64
        graph.add(data)
        peers["faiss HNSW32"] = graph
    return peers


def bench_size(size: int, repeats: int, clustered: bool = False, hnsw: bool = False) -> list[dict]:
    """Per batch size: the index (the kernel it measured fastest here), each kernel forced, faiss IndexFlatIP and a
    bare fp32 mm + topk, with recall@10 against fp32 brute force."""
    import faiss

    generator = torch.Generator().manual_seed(size)
    gallery = make_gallery(size, clustered, generator)
    index = SpeechImageIndex(gallery, [{"id": str(i), "path": ""} for i in range(size)], "image", "bench")
    flat = faiss.IndexFlatIP(DIM)
    flat.add(gallery.numpy())
    peers = faiss_peers(gallery, hnsw)
    rows = []
    for batch in (1, 8, 64):
        queries = (queries_near(gallery, batch, generator) if clustered
                   else torch.nn.functional.normalize(torch.randn(batch, DIM, generator=generator), dim=1))
        row = {"size": size, "kind": "clustered" if clustered else "isotropic", "batch": batch,
               "kernel": best_kernel(batch, DIM)}
        row["index"] = timed(lambda: index.search_embeddings(queries, 10), repeats)
        if batch == 1:
            row["index_in_turns"], row["floor_in_turns"] = against_the_floor(
                lambda: index.search_embeddings(queries, 10), index.gallery.codes, 3 * repeats)
        for kernel in KERNELS:
            row[kernel] = timed(lambda: index.gallery.top_k(queries, 10, kernel=kernel), repeats)
        row["faiss"] = timed(lambda: flat.search(queries.numpy(), 10), repeats)
        for name, peer in peers.items():  # faiss's compressed and approximate indexes, with their recall
            row[name] = timed(lambda: peer.search(queries.numpy(), 10), repeats)
            row[f"{name}_recall"] = recall_at_10(torch.from_numpy(peer.search(queries.numpy(), 10)[1]),
                                                 (queries @ gallery.t()).topk(10, dim=1).indices)
        row["torch"] = timed(lambda: (queries @ gallery.t()).topk(10, dim=1), repeats)
        exact = (queries @ gallery.t()).topk(10, dim=1).indices
        row["recall"] = recall_at_10(index.search_embeddings(queries, 10)[1], exact)
        rows.append(row)
    return rows


def bandwidth_bound_ms(size: int, repeats: int) -> tuple[float, float]:
    """`(GB/s, ms)`: this machine's read bandwidth, measured as the fastest of a few full reads of an int8 array the
    size of the index's first plane (`size` x 256 bytes; torch sums it as int64 lanes on all its threads, so the read,
    not the arithmetic, is the limit), and the time one pass over those bytes takes at that rate: the floor for a
    one-query exact scan."""
    codes = torch.randint(-127, 128, (size, DIM), dtype=torch.int8)
    lanes = codes.view(torch.int64).reshape(-1)
    ms = min(timed(lambda: lanes.sum(), 1) for _ in range(repeats))
    gigabytes = codes.numel() / 1e9
    return gigabytes / (ms / 1000), ms


def in_turns(first, second, rounds: int) -> tuple[list[float], list[float]]:
    """ms of two calls run alternately, `rounds` each, after one warm-up each, so that both see the machine in the same
    state (this VM's speed drifts by up to 30% within minutes)."""
    first(), second()
    times = ([], [])
    for _ in range(rounds):
        for call, samples in zip((first, second), times):
            start = time.perf_counter()
            call()
            samples.append((time.perf_counter() - start) * 1000)
    return times


def against_the_floor(search, codes: torch.Tensor, rounds: int) -> tuple[float, float]:
    """`(search ms, floor ms)` for one query, measured in turns (the bound above is read minutes after the searches):
    the median search, and the fastest full read of the very bytes it scans (`codes`, summed as int64 lanes on all
    threads)."""
    lanes = codes.reshape(-1).view(torch.int64)
    reads, searches = in_turns(lanes.sum, search, rounds)
    return statistics.median(searches), min(reads)


def bench_storage(size: int) -> dict:
    generator = torch.Generator().manual_seed(size)
    index = SpeechImageIndex(make_gallery(size, False, generator), [{"id": str(i), "path": ""} for i in range(size)],
                             "image", "bench")
    stored = sum(tensor.element_size() * tensor.nelement() for tensor in index.gallery.tensors().values())
    with tempfile.TemporaryDirectory() as folder:
        index.save(folder)
        load_ms = timed(lambda: SpeechImageIndex.load(folder), 3)
    return {"mb_per_million": stored / 1e6 * (1_000_000 / size), "load_ms": load_ms}


def bench_kernels(size: int, repeats: int) -> tuple[list[str], list[tuple]]:
    """Raw scoring kernels over one gallery, per batch size, no top-k: float32 and float16 products, and each int8 scan
    this machine can run (`portable`, then `avx2` and `avx512vnni` where the CPU has them: the index uses the last)."""
    import numpy as np

    from c2f.int8_scan import available_kernels, int8_scores
    from c2f.quantized_gallery import _int8_rows

    generator = torch.Generator().manual_seed(size)
    gallery = torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=1)
    half = gallery.half()
    stored = SpeechImageIndex(gallery, [{"id": str(i), "path": ""} for i in range(size)], "image", "bench").gallery
    codes, scales = stored.codes.numpy(), stored.scales.numpy()
    scans = available_kernels(DIM)
    rows = []
    for batch in (1, 8, 64):
        queries = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=generator), dim=1)
        query_codes, query_scales = (tensor.numpy() for tensor in _int8_rows(queries))
        out = np.empty((batch, size), np.float32)
        scan_ms = [timed(lambda: int8_scores(codes, scales, query_codes, query_scales, out, kernel=scan), repeats)
                   for scan in scans]
        rows.append((batch, timed(lambda: queries @ gallery.t(), repeats), timed(lambda: queries.half() @ half.t(), repeats),
                     *scan_ms))
    return scans, rows


def bench_rerank(model_dir: str, ks=(16, 64, 128)) -> list[tuple[int, float]]:
    from transformers import AutoProcessor

    from c2f.data import load_demo
    from c2f.modeling_c2f import C2FSpeechImageModel

    model = C2FSpeechImageModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    test = load_demo("test")
    images = sorted(set(test["image"]))
    index = SpeechImageIndex.build(model, processor, images, "image", progress=False)
    query = test[0]["audio"]
    base = timed(lambda: index.search(model, processor, query, top_k=10, rerank_k=0), 5)
    return [(k, timed(lambda: index.search(model, processor, query, top_k=10, rerank_k=k), 5) - base) for k in ks if k <= len(images)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hnsw_max", type=int, default=100_000, help="build faiss HNSW only for galleries up to this size (slow)")
    parser.add_argument("--model", default="outputs/c2f-demo", help="a trained c2f folder for the re-rank cost")
    args = parser.parse_args()
    from c2f.int8_scan import scan_kernel

    print(f"threads: {torch.get_num_threads()}; int8 scan kernel: {scan_kernel(DIM)}")
    print("| gallery | rows | queries | index (ms) | its kernel | int8 scan | float32 GEMM | faiss Flat | torch fp32 | "
          "index / fastest exact other | recall@10 | faiss SQfp16 (recall) | faiss SQ8+refine (recall) | faiss HNSW32 (recall) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    single_query = []
    for size in args.sizes:
        for clustered in (False, True):
            for r in bench_size(size, args.repeats, clustered, hnsw=size <= args.hnsw_max):
                if size == max(args.sizes) and r["batch"] == 1:
                    single_query.append(r)
                peers = " | ".join(f"{r[name]:.1f} ({r[name + '_recall']:.3f})" if name in r else "–"
                                   for name in ("faiss SQfp16", "faiss SQ8+refine", "faiss HNSW32"))
                print(f"| {r['kind']} | {size:,} | {r['batch']} | {r['index']:.1f} | {r['kernel']} | {r['int8']:.1f} | "
                      f"{r['float32']:.1f} | {r['faiss']:.1f} | {r['torch']:.1f} | "
                      f"{r['index'] / min(r['faiss'], r['torch']):.2f} | {r['recall']:.3f} | {peers} |", flush=True)
    rate, floor = bandwidth_bound_ms(max(args.sizes), args.repeats)
    print(f"\nread bandwidth: {rate:.1f} GB/s; one pass over the {max(args.sizes):,}-row first plane at that rate: "
          f"{floor:.1f} ms (the floor for one query)")
    for r in single_query:
        print(f"one {r['kind']} query on {max(args.sizes):,} rows: {r['index']:.1f} ms, {r['index'] / floor:.2f}x the floor; "
              f"in turns with a read of its own plane ({3 * args.repeats} each): {r['index_in_turns']:.1f} ms against "
              f"{r['floor_in_turns']:.1f}, {r['index_in_turns'] / r['floor_in_turns']:.2f}x")
    storage = bench_storage(max(args.sizes))
    print(f"\nstorage: {storage['mb_per_million']:.0f} MB (10^6 bytes) per 1M rows; load of {max(args.sizes):,} rows "
          f"(memory-mapped): {storage['load_ms']:.0f} ms")
    scans, kernel_rows = bench_kernels(max(args.sizes), 3)
    print(f"\n| queries | fp32 matmul (ms) | fp16 matmul | {' | '.join(f'int8 scan, {scan}' for scan in scans)} |  "
          f"({max(args.sizes):,} rows, no top-k; the index scans with the last)")
    print("|---" * (3 + len(scans)) + "|")
    for batch, *timings in kernel_rows:
        print(f"| {batch} | {' | '.join(f'{ms:.1f}' for ms in timings)} |", flush=True)
    if os.path.isdir(args.model):
        print("\n| SIM re-rank depth k | extra ms per query (demo model, 64 px images re-encoded from files) |")
        print("|---|---|")
        for k, extra in bench_rerank(args.model):
            print(f"| {k} | {extra:.0f} |")
    else:
        print(f"\n(no model at {args.model}: skipped the re-rank cost; train one with run_retrieval.py)")


if __name__ == "__main__":
    main()
