"""Gallery embeddings stored as two int8 planes, and exact top-k inner-product search over them.

Why not float16: on a CPU without half-precision arithmetic (AVX2, like our 2-core test machine) a float16
matrix-vector product is compute-bound, 36 ms over 1M x 256, and a float32 one reads twice the bytes. An int8 x int8
-> int32 dot product over the same gallery takes 11 ms, 1.1x the time the memory needs to deliver its 256 MB
(`c2f/int8_scan.py`; measured by `benchmarks/search_bench.py`). So the scan runs on int8 codes, and a short list is
then re-scored exactly.

Each row `x` is stored as `x = s * (codes + residuals / 254)` with `s = max|x| / 127`: `codes` is `x` rounded to 255
levels, `residuals` the rounding error rounded to 255 more. The two planes (2 bytes a value, as float16) hold about 15
significant bits, more than float16's 11; the scan reads only the first plane.

The result is exact, not approximate: the scan ranks by `q~ . (s * codes)`, with the query rounded to int8 too, and the
gap to the exact `q . x` is at most `|q| |x - s codes| + |q - q~| |s codes|` (both row norms are stored). After the short
list is re-scored, every row that the bound lets reach the k-th exact score is re-scored as well, so the top-k is that
of a brute-force float32 search over the stored embeddings.

Which first pass is fastest depends on the machine and the batch: besides the int8 scan there is a float32 GEMM of
the (unrounded) queries against the codes converted a chunk at a time, which BLAS runs well at large batches on some
CPUs. `best_kernel` measures the two once per machine and batch size and keeps the answer; the bound holds for both.
"""

import functools
import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .int8_scan import SCAN_REVISION, exact_dots, int8_best, int8_scores, scan_kernel

RESIDUAL_LEVELS = 254
# Rows re-scored exactly at first. On 1M random 256-d rows, 64 left the bound unsure for 3 queries in 256 (each costs
# a second scan); 128 for none.
SHORTLIST_MIN, SHORTLIST_PER_RESULT = 128, 4
# Approximate scores held at once: bounds the scan's buffer to 16 MB whatever the batch and gallery size (the
# buffer is kept per thread, see `_score_buffer`).
CHUNK_SCORES = 4 * 2**20
# Rows dequantised at once when the bound asks for more than the short list (float32: 64 MB at 256-d).
RESCORE_ROWS = 65_536
TENSOR_DTYPES = {"codes": torch.int8, "residuals": torch.int8, "scales": torch.float32,
                 "code_norms": torch.float32, "residual_norms": torch.float32}
# Rows the float32 kernel converts from int8 at once (32 MB of float32 at 256-d).
GEMM_ROWS = 32_768
KERNELS = ("int8", "float32")
_reused = threading.local()
# Where the measured kernel choice is kept, beside numba's cache of the int8 kernel.
KERNEL_CHOICES = Path(__file__).with_name("__pycache__") / "c2f_search_kernels.json"
_kernel_choices: dict[str, str] | None = None


def _int8_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes and scales; an all-zero row gets scale 1 and zero codes."""
    scales = values.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(values / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


@dataclass
class QuantizedEmbeddings:
    codes: torch.Tensor  # int8 [N, D]
    residuals: torch.Tensor  # int8 [N, D]
    scales: torch.Tensor  # float32 [N]
    code_norms: torch.Tensor  # float32 [N]: |s * codes|
    residual_norms: torch.Tensor  # float32 [N]: |x - s * codes|

    @classmethod
    def quantize(cls, embeddings: torch.Tensor, rows_per_block: int = 8_192) -> "QuantizedEmbeddings":
        """Blocks of rows keep the float temporaries small: 1M x 256 took 2.3 s in blocks of 8,192 rows, 8.5 s in one pass."""
        embeddings = embeddings.detach().cpu()
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [items, dim], got shape {tuple(embeddings.shape)}")
        blocks = [cls._quantize_block(embeddings[start : start + rows_per_block].float())
                  for start in range(0, len(embeddings), rows_per_block)]
        if not blocks:
            return cls._quantize_block(embeddings.float())
        return cls(**{name: torch.cat([getattr(block, name) for block in blocks]) for name in TENSOR_DTYPES})

    @classmethod
    def _quantize_block(cls, embeddings: torch.Tensor) -> "QuantizedEmbeddings":
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings hold NaN or inf values; the model produced broken features")
        codes, scales = _int8_rows(embeddings)
        coarse = scales[:, None] * codes.float()
        residuals = torch.round((embeddings - coarse) * (RESIDUAL_LEVELS / scales[:, None])).clamp_(-127, 127).to(torch.int8)
        fine = scales[:, None] * residuals.float() / RESIDUAL_LEVELS
        return cls(codes, residuals, scales, coarse.norm(dim=1), fine.norm(dim=1))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], source: str) -> "QuantizedEmbeddings":
        """From the tensors of a saved index; `source` names the file in errors."""
        for name, dtype in TENSOR_DTYPES.items():
            if name not in tensors:
                raise ValueError(f"{source}: tensor {name!r} is missing (this index was written by another c2f version; rebuild it)")
            if tensors[name].dtype != dtype:
                raise ValueError(f"{source}: tensor {name!r} is {tensors[name].dtype}, expected {dtype}")
        gallery = cls(**{name: tensors[name] for name in TENSOR_DTYPES})
        rows = {name: len(tensor) for name, tensor in gallery.tensors().items()}
        if len(set(rows.values())) != 1 or gallery.codes.shape != gallery.residuals.shape:
            raise ValueError(f"{source}: tensors disagree on the number of items: {rows}")
        return gallery

    @functools.cached_property
    def _largest_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(max code norm, max residual norm)`, for every search's bound: two passes over 4 MB a query at 1M rows
        otherwise. The planes are never changed in place (`concat` and `select` make new galleries)."""
        return self.code_norms.max(), self.residual_norms.max()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_DTYPES}

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def dim(self) -> int:
        return self.codes.shape[1]

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 embeddings of `rows` (all by default), in their shape plus the embedding dimension.

        In numpy, on the calling thread. torch starts its thread pool for a search's few hundred rows, and on this
        2-core machine its threads then spin for milliseconds: the next faiss PQ scan of 10M rows took 14.5 ms instead
        of 9.9. numpy is 1.5x slower on 100,000 rows (60 ms against 39), which only index builds ask for; the values
        are the same to the bit."""
        flat = slice(None) if rows is None else rows.reshape(-1).numpy()
        values = self.residuals.numpy()[flat].astype(np.float32)
        values /= np.float32(RESIDUAL_LEVELS)
        values += self.codes.numpy()[flat]
        values *= self.scales.numpy()[flat][:, None]
        shape = (len(self),) if rows is None else tuple(rows.shape)
        return torch.from_numpy(values).reshape(*shape, self.dim)

    def select(self, rows: torch.Tensor) -> "QuantizedEmbeddings":
        return QuantizedEmbeddings(**{name: tensor.index_select(0, rows) for name, tensor in self.tensors().items()})

    def concat(self, other: "QuantizedEmbeddings") -> "QuantizedEmbeddings":
        if other.dim != self.dim:
            raise ValueError(f"cannot add {other.dim}-d embeddings to a {self.dim}-d gallery")
        return QuantizedEmbeddings(**{name: torch.cat([tensor, getattr(other, name)]) for name, tensor in self.tensors().items()})

    # ------------------------------------------------------------------ search

    def _approximate_chunks(self, queries: torch.Tensor, query_codes: torch.Tensor, query_scales: torch.Tensor,
                            chunk_scores: int, kernel: str = "int8"):
        """Yields `(first_row, scores [Q, rows])` of the approximate scan over the first plane, chunk by chunk; `scores`
        is overwritten by the next chunk (one buffer for all chunks, rather than a fresh 64 MB one that page-faults in
        every chunk).

        `int8`: the int8 query against the int8 codes (numba); `float32`: the float query against the codes converted
        a chunk at a time, through BLAS (the faster one for large batches on some machines). Both are within the
        stored bound of the exact score, since the float kernel leaves out the query's rounding term."""
        rows_per_chunk = min(len(self), max(1, min(chunk_scores, CHUNK_SCORES) // len(query_codes)))
        if kernel == "float32":
            rows_per_chunk = min(rows_per_chunk, GEMM_ROWS)
        buffer = _score_buffer(len(query_codes), rows_per_chunk)
        for start in range(0, len(self), rows_per_chunk):
            end = min(start + rows_per_chunk, len(self))
            out = buffer if end - start == rows_per_chunk else torch.empty(len(query_codes), end - start)
            if kernel == "float32":
                torch.mm(queries, self.codes[start:end].float().t(), out=out)
                out.mul_(self.scales[start:end])
            else:
                int8_scores(self.codes[start:end].numpy(), self.scales[start:end].numpy(), query_codes.numpy(),
                            query_scales.numpy(), out.numpy())
            yield start, out

    def _shortlist(self, queries: torch.Tensor, query_codes: torch.Tensor, query_scales: torch.Tensor, shortlist: int,
                   chunk_scores: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The first pass: the `shortlist` best approximate scores of each query and their rows, best first."""
        if kernel == "int8":
            # One pass that keeps each thread's best rows and writes no scores (`int8_best`). Ranking every score of a
            # chunk with torch instead took 1.3-2x as long at 8 to 256 queries over 1M rows (382-441 ms against
            # 249-312 at 64), once the scan itself was fast.
            return tuple(torch.from_numpy(array) for array in int8_best(
                self.codes.numpy(), self.scales.numpy(), query_codes.numpy(), query_scales.numpy(), shortlist))
        # The float32 GEMM writes every score of a chunk; torch ranks them.
        kept_scores, kept_rows = None, None
        for start, scores in self._approximate_chunks(queries, query_codes, query_scales, chunk_scores, kernel):
            scores, rows = scores.topk(min(shortlist, scores.shape[1]), dim=1)
            rows += start
            if kept_scores is not None:
                scores, order = torch.cat([kept_scores, scores], dim=1).topk(shortlist, dim=1)
                rows = torch.cat([kept_rows, rows], dim=1).gather(1, order)
            kept_scores, kept_rows = scores, rows
        return kept_scores, kept_rows

    def exact_scores(self, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Exact float32 scores of `queries [Q, D]` against their own stored `rows [Q, R]` (both planes) -> `[Q, R]`:
        how a short list from any first pass is re-scored (`int8_scan.exact_dots`; no torch, as in `dequantize`)."""
        return torch.from_numpy(exact_dots(queries.detach().float().numpy(), rows.numpy(), self.codes.numpy(),
                                           self.residuals.numpy(), self.scales.numpy(), RESIDUAL_LEVELS))

    def top_k(self, queries: torch.Tensor, top_k: int, chunk_scores: int = CHUNK_SCORES,
              kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k inner products of `queries [Q, D]`: `(scores [Q, k] float32, rows [Q, k])`, best first.

        `kernel` (`int8` or `float32`) picks the approximate scan; by default the one measured fastest on this machine
        for this many queries (`best_kernel`). Either gives the same result."""
        queries = queries.detach().cpu().float().reshape(-1, self.dim)
        top_k = min(top_k, len(self))
        if top_k == 0 or len(queries) == 0:
            return torch.empty(len(queries), top_k), torch.empty(len(queries), top_k, dtype=torch.long)
        kernel = kernel or best_kernel(len(queries), self.dim)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        shortlist = min(len(self), max(SHORTLIST_MIN, SHORTLIST_PER_RESULT * top_k))
        query_codes, query_scales = _int8_rows(queries)
        rounding = (queries - query_scales[:, None] * query_codes.float()).norm(dim=1)
        slack = queries.norm(dim=1) * self._largest_norms[1] + rounding * self._largest_norms[0]
        slack = slack * (1 + 1e-4) + 1e-6  # float32 rounding in the scan and the re-scoring

        kept_scores, kept_rows = self._shortlist(queries, query_codes, query_scales, shortlist, chunk_scores, kernel)
        best, order = self.exact_scores(queries, kept_rows).topk(top_k, dim=1)
        best_rows = kept_rows.gather(1, order)
        if shortlist == len(self):
            return best, best_rows
        # A row left out scanned at most kept_scores[:, -1]; if that plus the slack reaches the k-th exact score, the
        # row might belong in the top-k: re-score every row the bound cannot rule out (all of them, at worst, when
        # the gallery's rows are closer together than the int8 step), a bounded piece at a time.
        for query in (kept_scores[:, -1] + slack >= best[:, -1]).nonzero().flatten().tolist():
            threshold = best[query, -1] - slack[query]
            vector = queries[query : query + 1]
            found_scores, found_rows = torch.empty(0), torch.empty(0, dtype=torch.long)
            for start, scores in self._approximate_chunks(vector, query_codes[query : query + 1], query_scales[query : query + 1],
                                                          chunk_scores, kernel):
                candidates = (scores[0] >= threshold).nonzero().flatten() + start
                for piece in candidates.split(RESCORE_ROWS):
                    found_scores = torch.cat([found_scores, self.exact_scores(vector, piece[None])[0]])
                    found_rows = torch.cat([found_rows, piece])
                    found_scores, order = found_scores.topk(min(top_k, len(found_scores)))
                    found_rows = found_rows[order]
            best[query], best_rows[query] = found_scores, found_rows
        return best, best_rows


def _score_buffer(queries: int, rows: int) -> torch.Tensor:
    """A `[queries, rows]` float32 buffer for a scan's scores (CHUNK_SCORES, or more for a batch of more queries
    than that), kept per thread and reused by the next search: a fresh 4 MB buffer page-faults in at every touch,
    1.8 ms of a 15 ms one-query search over 1M rows when one query still wrote its scores (now the float32 kernel
    and the bound's second pass do)."""
    kept = getattr(_reused, "scores", None)
    if kept is None or kept.numel() < queries * rows:
        kept = _reused.scores = torch.empty(max(CHUNK_SCORES, queries * rows))
    return kept[: queries * rows].view(queries, rows)


def _bucket(num_queries: int) -> int:
    """Batch sizes measured: powers of two up to 64 (a larger batch behaves like 64)."""
    return min(64, 1 << max(0, (num_queries - 1).bit_length()))


def measure_kernels(num_queries: int, dim: int, rows: int = 262_144, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per search of `rows` random rows with each kernel as its first pass, for `num_queries` queries: a
    sample big enough (64 MB of int8 at 256-d) to leave the caches, as a real gallery does."""
    generator = torch.Generator().manual_seed(0)
    sample = QuantizedEmbeddings.quantize(torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1))
    queries = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=generator), dim=1)
    timings = {}
    for kernel in KERNELS:
        search = lambda: sample.top_k(queries, 10, kernel=kernel)
        search()  # warm-up (and numba's compilation or cache load)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            search()
            samples.append(time.perf_counter() - start)
        timings[kernel] = 1000 * sorted(samples)[len(samples) // 2]
    return timings


@functools.cache
def _machine() -> str:
    """What a kernel choice is kept for, asked once a process: `os.cpu_count()` alone took 0.1 ms a search here."""
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{os.cpu_count()}cpu"


def best_kernel(num_queries: int, dim: int) -> str:
    """The faster approximate scan for this batch size on this machine, measured once (about a second) and then kept
    in `KERNEL_CHOICES` (keyed by machine, threads, torch version and the scan's revision), so later processes only read it. Which one wins
    depends on the machine: int8 scans read a quarter of the bytes, BLAS GEMMs use the vector units better at large
    batches."""
    global _kernel_choices
    if _kernel_choices is None:
        try:
            _kernel_choices = json.loads(KERNEL_CHOICES.read_text())
        except (OSError, ValueError):
            _kernel_choices = {}
    key = (f"{_machine()}-{torch.get_num_threads()}threads-torch{torch.__version__}-{scan_kernel(dim)}scan{SCAN_REVISION}-"
           f"{dim}d-{_bucket(num_queries)}q")
    if key not in _kernel_choices:
        timings = measure_kernels(_bucket(num_queries), dim)
        _kernel_choices[key] = min(timings, key=timings.get)
        try:
            KERNEL_CHOICES.parent.mkdir(exist_ok=True)
            temporary = KERNEL_CHOICES.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(_kernel_choices, indent=1))
            os.replace(temporary, KERNEL_CHOICES)
        except OSError:  # a read-only install: measure again in the next process
            pass
    return _kernel_choices[key]
