"""A searchable gallery of images (or recordings) for a c2f model: exact coarse search over stored embeddings, then
SIM re-rank of the top candidates.

On disk an index is a folder: `embeddings-<version>.safetensors` (the gallery as two int8 planes plus per-row scales,
read memory-mapped, see `quantized_gallery` for why not float16; and the PQ mode's codes when it is on) and
`index.json` (the format, the modality, a
fingerprint of the model that built it, the name of its embeddings file, and one record per item: id, absolute path,
extra fields). `index.json` is replaced last and atomically, so it is the commit point of every save. No pickle, and
nothing in the folder is ever executed.

The SIM head needs the candidates' token sequences, not just their pooled embeddings. Storing them would cost
`(1 + patches) x vision_hidden` floats per image (257 x 1408 for BLIP-2's ViT-g: 700 KB in float16, 700 GB per
million images), so the index stores paths and re-encodes the `rerank_k` candidates of each query from their files.
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .fingerprint import weights_fingerprint
from .int8_scan import best_first
from .pipeline_c2f import is_query_batch
from .pq_scan import ProductQuantizedRows
from .quantized_gallery import QuantizedEmbeddings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
EMBEDDINGS_FILE, METADATA_FILE = "embeddings.safetensors", "index.json"
INDEX_FORMAT = 2


def model_fingerprint(model) -> str:
    """Identifies the embedding space by the weights that end each tower. An index built with one model is useless
    with another, and fails loudly rather than returning noise. (Not the config: it records the path the model was
    loaded from, so the same model loaded by a relative and by an absolute path would differ.)"""
    ends = {"image_projection": model.image_projection, "speech_projection": model.speech_projection,
            "speech_encoder.final_norm": model.speech_encoder.final_norm,
            "vision_model.post_layernorm": model.vision_model.post_layernorm}
    tensors = [(f"{prefix}.{name}", tensor) for prefix, module in ends.items() for name, tensor in module.state_dict().items()]
    return weights_fingerprint(tensors, {"embed_dim": model.config.embed_dim})


def list_media(folder: str | os.PathLike, modality: str) -> list[str]:
    """Sorted media files under `folder` (recursively) for `modality` "image" or "audio"."""
    suffixes = IMAGE_SUFFIXES if modality == "image" else AUDIO_SUFFIXES
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    files = sorted(str(path) for path in folder.rglob("*") if path.suffix.lower() in suffixes and path.is_file())
    if not files:
        raise ValueError(f"{folder} holds no {modality} files (looked for {', '.join(suffixes)})")
    return files


def _embeddings_file_of(folder: Path, metadata: dict | None = None) -> Path | None:
    """The embeddings file `index.json` names (indexes written before versioned files: the fixed name)."""
    if metadata is None:
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return folder / metadata.get("embeddings_file", EMBEDDINGS_FILE)


@contextmanager
def index_lock(folder: str | os.PathLike):
    """Serialises edits of one index folder across processes (an advisory `fcntl` lock on `FOLDER.lock`): two
    `c2f-index add` at once each load, add and save in turn, so neither addition is lost."""
    import fcntl

    lock_path = Path(f"{os.fspath(folder).rstrip(os.sep)}.lock")
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _candidate_count(value, what: str) -> int:
    """`value` as the PQ mode's re-scoring depth: an integer >= 1 (not a bool), else an error naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


class SpeechImageIndex:
    """Embeddings + records of a gallery of one modality ("image" or "audio")."""

    def __init__(self, embeddings: torch.Tensor | QuantizedEmbeddings, records: list[dict], modality: str, fingerprint: str,
                 model_path: str | None = None):
        if modality not in ("image", "audio"):
            raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")
        if len(embeddings) != len(records):
            raise ValueError(f"{len(embeddings)} embeddings but {len(records)} records")
        self.gallery = embeddings if isinstance(embeddings, QuantizedEmbeddings) else QuantizedEmbeddings.quantize(embeddings)
        self.records = records
        self.modality = modality
        self.fingerprint = fingerprint
        self.model_path = model_path  # where the model that built it lives, so the CLI can find it again
        self.faiss_index = self.pq_rows = None
        self.pq_candidates = 512

    def __len__(self) -> int:
        return len(self.records)

    @property
    def embeddings(self) -> torch.Tensor:
        """The stored embeddings as a float32 `[items, dim]` copy: each value within max|x| / 64,516 of what was added
        (at most 5.5e-6 over 1M random unit rows)."""
        return self.gallery.dequantize()

    # ------------------------------------------------------------------ building

    @staticmethod
    @torch.no_grad()
    def encode(model, processor, paths: Sequence[str], modality: str, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        device = next(model.parameters()).device
        chunks = []
        for start in tqdm(range(0, len(paths), batch_size), desc=f"embedding {modality}s", disable=not progress):
            batch = paths[start : start + batch_size]
            if modality == "image":
                inputs = processor(images=batch)
                chunks.append(model.get_image_features(inputs["pixel_values"].to(device)).cpu())
            else:
                inputs = processor(audio=batch)
                chunks.append(model.get_speech_features(inputs["input_values"].to(device), inputs["attention_mask"].to(device)).cpu())
        return torch.cat(chunks)

    @classmethod
    def build(cls, model, processor, items: str | os.PathLike | Iterable, modality: str = "image",
              ids: Sequence[str] | None = None, batch_size: int = 32, progress: bool = True) -> "SpeechImageIndex":
        """From a folder, a list of paths, or a `datasets` dataset with a column named after the modality."""
        paths = cls._paths_of(items, modality)
        model.eval()
        embeddings = cls.encode(model, processor, paths, modality, batch_size, progress)
        return cls(embeddings, cls._records(paths, ids), modality, model_fingerprint(model))

    @staticmethod
    def _paths_of(items, modality) -> list[str]:
        if isinstance(items, (str, os.PathLike)):
            return list_media(items, modality)
        if hasattr(items, "column_names"):  # a datasets.Dataset
            paths = []
            for row, value in enumerate(items[modality]):
                path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None) or value
                if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
                    raise ValueError(
                        f"dataset row {row}: the index needs the {modality} file's path (re-ranking re-reads it); "
                        f"cast the column with decode=False or pass a list of paths"
                    )
                paths.append(os.fspath(path))
            return paths
        paths = [os.fspath(item) for item in items]
        if not paths:
            raise ValueError(f"no {modality} files given")
        return paths

    @staticmethod
    def _records(paths: Sequence[str], ids: Sequence[str] | None) -> list[dict]:
        ids = [str(i) for i in ids] if ids is not None else [str(p) for p in paths]
        if len(ids) != len(paths) or len(set(ids)) != len(ids):
            raise ValueError("ids must be unique and one per item")
        # Absolute paths: re-ranking re-reads the files, and a search run from another folder must find the same ones.
        return [{"id": item_id, "path": str(Path(path).resolve())} for item_id, path in zip(ids, paths)]

    def add(self, model, processor, items, ids: Sequence[str] | None = None, batch_size: int = 32) -> None:
        """Embed and append new items; ids must not be in the index yet."""
        self.check_model(model)
        paths = self._paths_of(items, self.modality)
        records = self._records(paths, ids)
        taken = {record["id"] for record in self.records} & {record["id"] for record in records}
        if taken:
            raise ValueError(f"{len(taken)} id(s) are already in the index, e.g. {sorted(taken)[:3]}")
        model.eval()
        new = self.encode(model, processor, paths, self.modality, batch_size, progress=False)
        self.gallery = self.gallery.concat(QuantizedEmbeddings.quantize(new))
        self.records = self.records + records
        self.faiss_index = self.pq_rows = None

    def remove(self, ids: Iterable[str]) -> int:
        """Drop items by id; returns how many were removed. Unknown ids are an error."""
        ids = {str(i) for i in ids}
        unknown = ids - {record["id"] for record in self.records}
        if unknown:
            raise KeyError(f"not in the index: {sorted(unknown)[:5]}")
        keep = [row for row, record in enumerate(self.records) if record["id"] not in ids]
        self.gallery = self.gallery.select(torch.tensor(keep, dtype=torch.long))
        self.records = [self.records[row] for row in keep]
        self.faiss_index = self.pq_rows = None
        return len(ids)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | os.PathLike) -> None:
        """One atomic step: the embeddings go to a new file, then `index.json`, which names that file, replaces the old
        one. A crash at any point leaves the old index or the new one, never a mix; the old embeddings file is removed
        only once nothing names it. Concurrent writers should hold `index_lock(folder)` (the CLI does)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        previous = _embeddings_file_of(folder)
        token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        embeddings_name = f"embeddings-{token}.safetensors"
        metadata = {"format": INDEX_FORMAT, "modality": self.modality, "model_fingerprint": self.fingerprint,
                    "embed_dim": self.gallery.dim, "model_path": self.model_path, "embeddings_file": embeddings_name,
                    "records": self.records}
        tensors = self.gallery.tensors()
        if self.pq_rows is not None:  # the PQ mode's codes go with the planes they encode (minutes to rebuild at 10M)
            tensors = {**tensors, **self.pq_rows.tensors()}
            metadata["pq_candidates"] = self.pq_candidates
        metadata_tmp = folder / f"{METADATA_FILE}.{token}.tmp"
        metadata_tmp.write_text(json.dumps(metadata))
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / embeddings_name))
        shutil.copymode(metadata_tmp, folder / embeddings_name)  # safetensors creates files 0600; an index is shared
        os.replace(metadata_tmp, folder / METADATA_FILE)  # the commit point
        if previous is not None and previous.name != embeddings_name and previous.exists():
            previous.unlink()

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SpeechImageIndex":
        """Reads data only: nothing in an index folder is ever executed or imported."""
        folder = Path(folder)
        if not (folder / METADATA_FILE).is_file():
            raise ValueError(f"{folder} is not a c2f index: {METADATA_FILE} is missing")
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / METADATA_FILE} is not valid JSON ({error}); rebuild the index") from error
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder / METADATA_FILE}: index format {metadata.get('format')!r}, this c2f reads format "
                             f"{INDEX_FORMAT}; rebuild the index with `c2f-index build`")
        embeddings = _embeddings_file_of(folder, metadata)
        if not embeddings.is_file():
            raise ValueError(f"{folder} is not a c2f index: {embeddings.name}, named by {METADATA_FILE}, is missing")
        try:
            with safe_open(str(embeddings), framework="pt") as handle:  # memory-mapped, not read
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error type for a cut or overwritten file
            raise ValueError(f"{embeddings} is not a readable safetensors file ({error}); rebuild the index") from error
        gallery = QuantizedEmbeddings.from_tensors(tensors, source=str(embeddings))
        if len(gallery) != len(metadata["records"]):
            raise ValueError(f"{folder}: {len(gallery)} embeddings but {len(metadata['records'])} records")
        index = cls(gallery, metadata["records"], metadata["modality"], metadata["model_fingerprint"], metadata.get("model_path"))
        if "pq_codes" in tensors or "pq_codebooks" in tensors:  # saved in the PQ mode (`use_pq`): it loads in it
            candidates = _candidate_count(metadata.get("pq_candidates"),
                                          f"{folder / METADATA_FILE}: pq_candidates (beside the PQ codes of {embeddings.name})")
            index.pq_rows = ProductQuantizedRows.from_tensors(tensors, len(gallery), gallery.dim, str(embeddings))
            index.pq_candidates = candidates
        return index

    def check_model(self, model) -> None:
        fingerprint = model_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"this index was built with another model (fingerprint {self.fingerprint}, this model {fingerprint}); "
                "rebuild it with `c2f-index build` for this model"
            )

    # ------------------------------------------------------------------ search

    def use_pq(self, candidates: int = 512, progress: bool = True) -> None:
        """Search by c2f's product-quantised scan (`pq_scan`) first, for galleries too large for one exact pass per
        query: 16 bytes a 256-d row (an eighth of the int8 plane); one query takes 1.3-1.5x a plain read of those
        bytes, and a batch shares each read and screens each block in bytes first. Its `candidates` best rows a query
        are re-scored exactly from the stored planes, so the scores returned are exact and only a row the scan ranks
        below them can be missed.

        The default, 512, is the middle of the depths measured over 10M clustered rows on 2 cores (README, in turns
        with the exact search): recall@10 0.977 at 12-13x faster than the exact search for one query, 9.1-9.4x for 8
        and 10.2-10.8x for 64; 256 rows gave 0.958 at 14-15x / 9.9-10.3x / 12.8-13.0x, 1,024 gave 0.991 at 12x / 7-8x
        / 8-9x.

        Built in memory from the stored rows (k-means on 65,536 of them, then every row encoded a shard at a time:
        44-47 s at 10M rows); `save` stores the codes beside the planes, and `load` comes back in this mode, the codes
        memory-mapped. `add`, `remove` and `use_faiss` drop it, `search_embeddings` uses it while it is set."""
        _candidate_count(candidates, "use_pq: candidates")
        bar = (lambda starts: tqdm(starts, desc="encoding rows", unit="shard")) if progress else None
        self.faiss_index = None
        self.pq_rows = ProductQuantizedRows.build(self._training_sample(65_536), len(self),
                                                  lambda start, end: self.gallery.dequantize(torch.arange(start, end)), bar)
        self.pq_candidates = candidates

    def use_faiss(self, approximate: bool | str = False, neighbours: int = 32, ef_search: int = 128,
                  lists: int | None = None, probes: int = 32, candidates: int = 512, rows_per_shard: int = 100_000,
                  progress: bool = True) -> None:
        """Search with faiss (`pip install c2f[faiss]`) instead of the int8 kernel.

        - `approximate=False`: exact (`IndexFlatIP`, the same results).
        - `approximate="hnsw"` (or True): an HNSW graph, `neighbours` links a node, `ef_search` candidates a query.
          Fast to search, slow to build and as large as the float rows: up to a few million rows.
        - `approximate="ivf"`: an inverted file, rows grouped into `lists` k-means cells (default: sqrt(rows)), stored as
          fp16; a query scans its `probes` nearest cells. Built in minutes at 10M rows, half the float size.
        - `approximate="pq"`: `use_pq(candidates)`, c2f's own product-quantised scan (no faiss needed). Until the
          nineteenth session this was faiss's fast-scan PQ, which took 1.1-1.4x as long for one query over 10M rows
          at the same code size and 1.3-2.0x as long for 8 or 64 queries (in turns, README).

        Approximate modes trade recall for speed, and their recall depends on the gallery. HNSW and IVF follow its
        structure at scales above the nearest neighbours, and a gallery without it (10M rows in 200,000 unrelated
        groups of 50, in `benchmarks/search_10m.py`) leaves both below recall@10 0.5; the PQ scan reads every row and
        keeps it. Measure on your own rows.
        Rows are dequantised and added a shard at a time, so memory holds one float32 shard beside the index.
        """
        method = "hnsw" if approximate is True else approximate
        if method == "pq":
            self.use_pq(candidates, progress)
            return
        try:
            import faiss
        except ImportError as error:
            raise ImportError("faiss is not installed: pip install 'c2f[faiss]'") from error
        dim = self.gallery.dim
        self.pq_rows = None
        if method == "hnsw":
            index = faiss.IndexHNSWFlat(dim, neighbours, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        elif method == "ivf":
            lists = lists or max(1, int(len(self) ** 0.5))
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT)
            index.cp.spherical = True  # unit centroids: with inner products, long ones would draw most rows to them
            # k-means on 40 rows a cell (faiss's own lower bound), drawn once with a fixed seed: a rebuilt index is the same.
            index.train(self._training_sample(40 * lists).numpy())
            index.nprobe = min(probes, lists)
        elif method is False or method is None:
            index = faiss.IndexFlatIP(dim)
        else:
            raise ValueError(f"use_faiss: approximate must be False, True, 'hnsw', 'ivf' or 'pq', got {approximate!r}")
        self._add_rows(index, 0, len(self), rows_per_shard, progress)
        self.faiss_index = index

    def _training_sample(self, rows: int) -> torch.Tensor:
        """Up to `rows` float rows drawn once with a fixed seed, so a rebuilt approximate index is the same."""
        sample = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:rows].sort().values
        return self.gallery.dequantize(sample)

    def _add_rows(self, index, start: int, end: int, rows_per_shard: int, progress: bool) -> None:
        starts = range(start, end, rows_per_shard)
        for first in tqdm(starts, desc="adding to faiss", unit="shard", disable=not progress or len(starts) < 2):
            index.add(self.gallery.dequantize(torch.arange(first, min(first + rows_per_shard, end))).numpy())

    def search_embeddings(self, queries: torch.Tensor, top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse search: `(scores [Q, k], indices [Q, k])` for normalised query embeddings `[Q, D]`; exact unless
        an approximate mode is on (`use_pq()`, `use_faiss(approximate=...)`)."""
        queries = queries.reshape(-1, self.gallery.dim).detach().cpu().float()
        if self.pq_rows is not None:
            rows = self.pq_rows.candidates(queries, max(top_k, self.pq_candidates))
            scores, rows = best_first(self.gallery.exact_scores(queries, torch.from_numpy(rows)).numpy(), rows,
                                      min(top_k, len(self)))
            return torch.from_numpy(scores), torch.from_numpy(rows)
        if self.faiss_index is not None:
            scores, index = self.faiss_index.search(queries.numpy(), min(top_k, len(self)))
            return torch.from_numpy(scores), torch.from_numpy(index)
        return self.gallery.top_k(queries, top_k)

    @torch.no_grad()
    def search(self, model, processor, queries, top_k: int = 5, rerank_k: int | None = None, sampling_rate: int | None = None) -> list[list[dict]]:
        """Queries of the other modality (audio for an image index, images for an audio index) -> for each query a
        ranked list of `{"score", "coarse_score", "match_score"?, "id", "path", "index"}`."""
        if not isinstance(top_k, int) or top_k < 1 or (rerank_k is not None and (not isinstance(rerank_k, int) or rerank_k < 0)):
            raise ValueError(f"top_k must be an integer >= 1 and rerank_k >= 0, got top_k={top_k!r}, rerank_k={rerank_k!r}")
        self.check_model(model)
        model.eval()
        device = next(model.parameters()).device
        queries = list(queries) if is_query_batch(queries) else [queries]
        rerank_k = model.config.k_test if rerank_k is None else rerank_k
        speech_queries = self.modality == "image"
        if speech_queries:
            inputs = processor(audio=queries, sampling_rate=sampling_rate)
            query_output = model.encode_speech(inputs["input_values"].to(device), inputs["attention_mask"].to(device))
            query_embeds = query_output.speech_embeds
        else:
            inputs = processor(images=queries)
            query_output = model.encode_image(inputs["pixel_values"].to(device))
            query_embeds = query_output.image_embeds
        depth = max(top_k, rerank_k)
        coarse, candidates = self.search_embeddings(query_embeds, depth)
        results = []
        for row in range(len(queries)):
            tokens = self._candidate_tokens(model, processor, query_output, row, candidates[row, :rerank_k], speech_queries, device)
            # Candidates come in coarse order, so the re-ranking reads the tokens of the first rerank_k alone.
            ranked = model.rerank(coarse[row : row + 1].to(device), *tokens, rerank_k, queries_are_speech=speech_queries)
            # Record fields first: a record's own "score" or "index" key must not hide the ranking's.
            results.append([
                {**self.records[int(candidates[row, result["index"]])], **result, "index": int(candidates[row, result["index"]])}
                for result in ranked.results(0, top_k)
            ])
        return results

    def _candidate_tokens(self, model, processor, query_output, row, candidates, speech_queries, device):
        """`(speech tokens, speech mask, image tokens)` for query `row` and its `candidates`, re-encoded from their
        files (the index stores embeddings, not tokens) and indexed the way `rerank` reads them."""
        if len(candidates) == 0:
            return None, None, None  # coarse only: rerank reads no tokens
        paths = [self.records[i]["path"] for i in candidates.tolist()]
        if speech_queries:
            images = model.encode_image(processor(images=paths)["pixel_values"].to(device))
            return query_output.speech_tokens[row : row + 1], query_output.speech_token_mask[row : row + 1], images.image_tokens
        audio = processor(audio=paths)
        speech = model.encode_speech(audio["input_values"].to(device), audio["attention_mask"].to(device))
        return speech.speech_tokens, speech.speech_token_mask, query_output.image_tokens[row : row + 1]
