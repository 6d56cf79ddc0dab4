"""A 10M-row gallery, memory-mapped from disk: load time, exact search, and the approximate modes against it.

    python benchmarks/search_10m.py [--rows 10000000] [--dir /tmp/c2f-10m] [--queries 100]

Builds a `SpeechImageIndex` of clustered random 256-d rows (groups of 50 at cosine about 0.7 to their centre, the
generator of `search_bench.py`) a block at a time, saves it, and loads it back (memory-mapped). Then, in this one run:
the exact search at 1 / 8 / 64 queries beside the time one pass over the int8 plane takes at the read bandwidth
measured here, and the approximate modes (`use_pq()` at a few re-scoring depths, beside faiss's fast-scan PQ of the
same code size with the same re-scoring; `use_faiss(approximate=...)` "ivf" at a few probe counts, "hnsw" at a few
search depths) with recall@10 against the exact top 10 and their build times. Each approximate search is also timed
in turns with the exact search of the same queries (this VM's speed drifts within minutes, so a ratio of medians
taken minutes apart swings by 2x). `--keep` leaves the index folder, and `--reuse` searches it again without building.
The index folder needs about 5.6 GB of disk; it is removed at the end unless --keep. At 10M rows on 2 CPU cores the
HNSW graph takes about 50 minutes to build and 22 GB of memory at its peak; `--methods pq faiss-pq ivf` leaves it out.
"""

import argparse
import gc
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_bench import DIM, bandwidth_bound_ms, in_turns, make_gallery, queries_near, recall_at_10, timed  # noqa: E402

from c2f.int8_scan import best_first  # noqa: E402
from c2f.quantized_gallery import TENSOR_DTYPES, QuantizedEmbeddings  # noqa: E402
from c2f.retrieval import SpeechImageIndex  # noqa: E402

BLOCK = 500_000  # a multiple of the 50-row groups, so blocks join into one clustered gallery


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(rows: int, folder: Path, generator: torch.Generator) -> torch.Tensor:
    """Quantise block by block into preallocated planes (the float rows never exist whole), save, and return some rows
    to draw queries near."""
    planes = {name: torch.empty((rows, DIM) if name in ("codes", "residuals") else (rows,), dtype=dtype)
              for name, dtype in TENSOR_DTYPES.items()}
    anchors = []
    for start in range(0, rows, BLOCK):
        block = make_gallery(min(BLOCK, rows - start), True, generator)
        quantized = QuantizedEmbeddings.quantize(block)
        for name, tensor in quantized.tensors().items():
            planes[name][start : start + len(block)] = tensor
        anchors.append(block[torch.randint(len(block), (8,), generator=generator)])
    index = SpeechImageIndex(QuantizedEmbeddings(**planes), [{"id": str(i), "path": ""} for i in range(rows)], "image", "bench")
    index.save(folder)
    return torch.cat(anchors)


def faiss_pq_scan(index: SpeechImageIndex):
    """The peer: faiss's fast-scan PQ at the same code size (4 bits per 8 dimensions), over contiguous parts of the
    gallery, one per thread, searched in parallel (faiss scans for one query on one thread). This was the index's
    `approximate="pq"` mode before c2f's own scan."""
    import faiss

    dim = index.gallery.dim
    trained = faiss.IndexPQFastScan(dim, dim // 8, 4, faiss.METRIC_INNER_PRODUCT)
    trained.train(index._training_sample(65_536).numpy())
    parts = torch.get_num_threads()
    shards = faiss.IndexShards(dim, True, True)  # threaded; row ids continue from part to part
    bounds = [len(index) * part // parts for part in range(parts + 1)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = faiss.clone_index(trained)
        index._add_rows(part, start, end, 100_000, False)
        shards.add_shard(part)
    return shards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dir", default="/tmp/c2f-10m")
    parser.add_argument("--queries", type=int, default=100, help="queries for recall@10")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--methods", nargs="*", default=["pq", "faiss-pq", "ivf", "hnsw"],
                        choices=["pq", "faiss-pq", "ivf", "hnsw"],
                        help="approximate modes to measure (none: the exact search only)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[256, 512, 1024],
                        help="rows the PQ scan hands to the exact re-scoring")
    parser.add_argument("--neighbours", type=int, default=16, help="HNSW links a node")
    parser.add_argument("--ef_search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--keep", action="store_true", help="keep the index folder")
    parser.add_argument("--reuse", action="store_true", help="search the index a --keep run left in --dir (queries near "
                        "rows drawn from it) instead of building one")
    args = parser.parse_args()
    folder = Path(args.dir)
    generator = torch.Generator().manual_seed(args.rows)
    print(f"threads: {torch.get_num_threads()}; rows: {args.rows:,}", flush=True)

    if not args.reuse:
        start = time.perf_counter()
        anchors = build(args.rows, folder, generator)
        print(f"built and saved in {time.perf_counter() - start:.0f} s; on disk: "
              f"{sum(f.stat().st_size for f in folder.iterdir()) / 1e9:.2f} GB; peak RSS so far {peak_rss_gb():.1f} GB",
              flush=True)
        gc.collect()

    start = time.perf_counter()
    index = SpeechImageIndex.load(folder)
    print(f"load (memory-mapped; index.json with {len(index):,} records parsed): {time.perf_counter() - start:.1f} s",
          flush=True)
    if args.reuse:
        anchors = index.gallery.dequantize(torch.randint(len(index), (8 * -(-len(index) // BLOCK),), generator=generator))

    queries = queries_near(anchors, args.queries, generator)
    start = time.perf_counter()
    index.search_embeddings(queries[:1], 10)
    print(f"first exact query after load: {(time.perf_counter() - start) * 1000:.0f} ms (page cache as the save left it)")
    exact_ms = {batch: timed(lambda: index.search_embeddings(queries[:batch], 10), args.repeats) for batch in (1, 8, 64)}
    exact = torch.cat([index.search_embeddings(queries[i : i + 64], 10)[1] for i in range(0, args.queries, 64)])
    rate, floor = bandwidth_bound_ms(args.rows, 3)
    print(f"read bandwidth {rate:.1f} GB/s: one pass over the {args.rows * DIM / 1e9:.2f} GB int8 plane takes {floor:.0f} ms")
    print("\n| search | queries | ms | x exact | in turns with exact: ms, x | recall@10 |\n|---|---|---|---|---|---|")
    for batch, ms in exact_ms.items():
        print(f"| exact (the index) | {batch} | {ms:.1f} | 1.0 | | 1.000 |", flush=True)

    def approximate_rows(label: str, search, settings: list[tuple[str, callable]]):
        for setting, apply in settings:
            apply()
            recall = recall_at_10(torch.from_numpy(search(queries.numpy())[1]), exact)
            for batch in (1, 8, 64):
                ms = timed(lambda: search(queries[:batch].numpy()), args.repeats)
                # This VM's speed drifts within minutes: both searches in the same moments (fewer rounds for 64 queries,
                # whose exact search takes seconds).
                exact_in_turns, approximate_in_turns = map(statistics.median, in_turns(
                    lambda: index.gallery.top_k(queries[:batch], 10), lambda: search(queries[:batch].numpy()),
                    (4 if batch < 64 else 1) * args.repeats))
                turns = f"{exact_in_turns:.1f} / {approximate_in_turns:.2f}, {exact_in_turns / approximate_in_turns:.1f}x"
                print(f"| {label}, {setting} | {batch} | {ms:.2f} | {exact_ms[batch] / ms:.1f}x faster | {turns} | "
                      f"{recall:.3f} |", flush=True)

    built = {}
    if "pq" in args.methods:
        start = time.perf_counter()
        index.use_pq(progress=False)
        built["pq"] = time.perf_counter() - start
        # Through the index's own search (the re-scoring included), as a user calls it.
        approximate_rows("c2f PQ scan + exact re-scoring", lambda q: (None, index.search_embeddings(torch.from_numpy(q), 10)[1].numpy()),
                         [(f"{c} candidates", lambda c=c: setattr(index, "pq_candidates", c)) for c in args.candidates])
        index.pq_rows = None
        gc.collect()
    if "faiss-pq" in args.methods:
        start = time.perf_counter()
        peer = faiss_pq_scan(index)
        built["faiss-pq"] = time.perf_counter() - start
        candidates = {}

        def faiss_then_exact(q):  # the index's re-scoring and top-k, in numpy as the index does them
            rows = peer.search(q, candidates["count"])[1]
            return best_first(index.gallery.exact_scores(torch.from_numpy(q), torch.from_numpy(rows)).numpy(), rows, 10)

        approximate_rows(f"faiss fast-scan PQ ({peer.count()} parts) + the same re-scoring", faiss_then_exact,
                         [(f"{c} candidates", lambda c=c: candidates.update(count=c)) for c in args.candidates])
        peer = None
        gc.collect()
    if "ivf" in args.methods:
        start = time.perf_counter()
        index.use_faiss(approximate="ivf", progress=False)
        built["ivf"] = time.perf_counter() - start
        ivf = index.faiss_index
        approximate_rows(f"faiss IVF{ivf.nlist} fp16", lambda q: ivf.search(q, 10),
                         [(f"{p} probes", lambda p=p: setattr(ivf, "nprobe", p)) for p in args.probes])
        index.faiss_index = ivf = None  # freed before the graph is built: both at 10M would not fit in 24 GB
        gc.collect()
    if "hnsw" in args.methods:
        start = time.perf_counter()
        index.use_faiss(approximate="hnsw", neighbours=args.neighbours, progress=True)
        built["hnsw"] = time.perf_counter() - start
        graph = index.faiss_index
        approximate_rows(f"faiss HNSW{args.neighbours}", lambda q: graph.search(q, 10),
                         [(f"efSearch {e}", lambda e=e: setattr(graph.hnsw, "efSearch", e)) for e in args.ef_search])
    for method, seconds in built.items():
        print(f"{method} build (all rows added in shards of 100,000): {seconds:.0f} s")
    print(f"peak RSS {peak_rss_gb():.1f} GB")
    if not args.keep and not args.reuse:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
