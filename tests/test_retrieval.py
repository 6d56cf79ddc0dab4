"""The gallery index and the command-line tools, on a tiny random model and generated files."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from c2f import save_for_pipeline
from c2f.cli import index_main, search_main
from c2f.modeling_c2f import C2FSpeechImageModel
from c2f.presets import tiny_config
from c2f.retrieval import SpeechImageIndex


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "audio").mkdir()
    for number in range(12):
        folder = tmp_path / "images" / ("sub" if number % 2 else "")
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"img{number:02d}.png")
    for number in range(6):
        soundfile.write(tmp_path / "audio" / f"q{number}.wav", rng.standard_normal(4000 + 500 * number).astype(np.float32) * 0.1, 16000)
    (tmp_path / "audio" / "q0.txt").write_text("a big red circle")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_index_round_trip_search_add_remove(tmp_path, folders, model, processor):
    model.eval()
    index = SpeechImageIndex.build(model, processor, folders / "images", "image", batch_size=5, progress=False)
    assert len(index) == 12
    index.save(tmp_path / "index")
    files = sorted((tmp_path / "index").iterdir())
    named = json.loads((tmp_path / "index" / "index.json").read_text())["embeddings_file"]
    assert [f.name for f in files] == [named, "index.json"] and named.startswith("embeddings-")
    assert files[0].stat().st_mode == files[1].stat().st_mode  # both as the umask allows, not 0600
    loaded = SpeechImageIndex.load(tmp_path / "index")
    assert torch.equal(loaded.embeddings, index.embeddings) and loaded.records == index.records

    query = str(folders / "audio" / "q1.wav")
    coarse = loaded.search(model, processor, query, top_k=12, rerank_k=0)[0]
    with torch.no_grad():
        inputs = processor(audio=[query])
        speech = model.get_speech_features(inputs["input_values"], inputs["attention_mask"])
        images = model.get_image_features(processor(images=[r["path"] for r in index.records])["pixel_values"])
    assert torch.allclose(loaded.embeddings, images, atol=1e-5)
    brute = (speech @ images.t())[0].argsort(descending=True).tolist()
    assert [r["index"] for r in coarse] == brute
    fine = loaded.search(model, processor, [query, str(folders / "audio" / "q2.wav")], top_k=5, rerank_k=4)
    assert len(fine) == 2 and all("match_score" in r for r in fine[0][:4]) and "match_score" not in fine[0][4]
    assert {r["index"] for r in fine[0][:4]} == {r["index"] for r in coarse[:4]}

    new = folders / "new.png"
    Image.new("RGB", (30, 30), "green").save(new)
    loaded.add(model, processor, [str(new)], ids=["green"])
    assert len(loaded) == 13 and loaded.records[-1] == {"id": "green", "path": str(new)}
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(model, processor, [str(new)], ids=["green"])
    assert loaded.remove(["green", index.records[0]["id"]]) == 2 and len(loaded) == 11
    with pytest.raises(KeyError, match="not in the index"):
        loaded.remove(["nope"])
    loaded.save(tmp_path / "index")
    assert [r["id"] for r in SpeechImageIndex.load(tmp_path / "index").records] == [r["id"] for r in index.records[1:]]

    metadata = json.loads((tmp_path / "index" / "index.json").read_text())
    (tmp_path / "index" / "index.json").write_text(json.dumps({**metadata, "format": 1}))
    with pytest.raises(ValueError, match="index.json: index format 1.*rebuild"):
        SpeechImageIndex.load(tmp_path / "index")


def test_an_image_array_is_one_query_for_an_audio_index(folders, model, processor):
    index = SpeechImageIndex.build(model, processor, folders / "audio", "audio", progress=False)
    image = np.asarray(Image.open(folders / "images" / "img00.png"))  # [H, W, 3]: one image, not H queries
    results = index.search(model, processor, image, top_k=3, rerank_k=2)
    assert len(results) == 1 and len(results[0]) == 3
    assert len(index.search(model, processor, [image, image], top_k=3, rerank_k=0)) == 2


def test_index_refuses_another_model_and_empty_folders(folders, model, processor):
    index = SpeechImageIndex.build(model, processor, folders / "images", "image", progress=False)
    other = C2FSpeechImageModel(tiny_config())
    with pytest.raises(ValueError, match="built with another model"):
        index.search(other, processor, str(folders / "audio" / "q0.wav"))
    with pytest.raises(ValueError, match="holds no image files"):
        SpeechImageIndex.build(model, processor, folders / "empty", "image")


def test_faiss_backend_gives_the_same_top_k(folders, model, processor):
    pytest.importorskip("faiss", reason="faiss is an optional extra")
    index = SpeechImageIndex.build(model, processor, folders / "images", "image", progress=False)
    queries = torch.nn.functional.normalize(torch.randn(3, index.embeddings.shape[1]), dim=1)
    default = index.search_embeddings(queries, 5)
    index.use_faiss()
    with_faiss = index.search_embeddings(queries, 5)
    assert torch.equal(default[1], with_faiss[1]) and torch.allclose(default[0], with_faiss[0], atol=1e-3)


def _clustered_index(dim: int = 32) -> tuple[SpeechImageIndex, torch.Tensor, torch.Tensor]:
    """3,000 rows in 60 groups of 50, 20 queries near them, and the exact top 10 of each."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(60, dim, generator=generator), dim=1)
    rows = torch.nn.functional.normalize(centres.repeat_interleave(50, dim=0) + 0.7 * torch.randn(3000, dim, generator=generator) / dim**0.5, dim=1)
    index = SpeechImageIndex(rows, [{"id": str(i), "path": ""} for i in range(3000)], "image", "test")
    queries = torch.nn.functional.normalize(rows[torch.randint(3000, (20,), generator=generator)] + 0.1 * torch.randn(20, dim, generator=generator), dim=1)
    return index, queries, index.search_embeddings(queries, 10)[1]


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel()


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_faiss_approximate_modes_keep_recall_on_clustered_rows(method):
    pytest.importorskip("faiss", reason="faiss is an optional extra")
    index, queries, exact = _clustered_index()
    # Five shards; IVF scans 4 of 54 cells.
    index.use_faiss(approximate=method, rows_per_shard=700, probes=4, progress=False)
    assert index.faiss_index.ntotal == 3000
    assert type(index.faiss_index).__name__ == {"hnsw": "IndexHNSWFlat", "ivf": "IndexIVFScalarQuantizer"}[method]
    assert _recall(index.search_embeddings(queries, 10)[1], exact) >= 0.95


@pytest.mark.parametrize("switch", ["use_pq", "use_faiss"])
def test_pq_mode_keeps_recall_and_returns_exact_scores(switch):
    """c2f's own PQ scan (no faiss needed; `use_faiss(approximate="pq")` is the same mode under its older name):
    2 bytes a row at 32-d, 300 of 3,000 rows re-scored from the stored planes."""
    index, queries, exact = _clustered_index()
    if switch == "use_pq":
        index.use_pq(candidates=300, progress=False)
    else:
        index.use_faiss(approximate="pq", candidates=300, progress=False)
    assert index.pq_rows.packed.shape == (-(-3000 // 64), 2 * 64) and index.faiss_index is None
    scores, found = index.search_embeddings(queries, 10)
    assert _recall(found, exact) >= 0.95
    assert torch.allclose(scores, index.gallery.exact_scores(queries, found), atol=1e-6)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    index.remove(["0"])  # an edit drops the codes: they would number the rows wrongly
    assert index.pq_rows is None and len(index.search_embeddings(queries, 10)[1][0]) == 10


def test_pq_mode_refuses_a_non_positive_candidate_count():
    index, _, _ = _clustered_index()
    with pytest.raises(ValueError, match="candidates must be an integer >= 1, got 0"):
        index.use_pq(candidates=0)


def test_faiss_rejects_an_unknown_approximate_mode():
    pytest.importorskip("faiss", reason="faiss is an optional extra")
    index = SpeechImageIndex(torch.nn.functional.normalize(torch.randn(10, 8), dim=1), [{"id": str(i), "path": ""} for i in range(10)], "image", "test")
    with pytest.raises(ValueError, match="'ivf'"):
        index.use_faiss(approximate="lsh")


def test_cli_build_search_and_draw(tmp_path, folders, model, processor, capsys):
    model.eval()
    save_for_pipeline(model, processor, tmp_path / "model")
    assert index_main(["build", "--model", str(tmp_path / "model"), "--images", str(folders / "images"), "--out", str(tmp_path / "idx")]) == 0
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["model_path"].endswith("model")
    query = str(folders / "audio" / "q0.wav")
    assert search_main(["--index", str(tmp_path / "idx"), query, "--top-k", "4", "--png", str(tmp_path / "out.png")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-4:]
    assert [line.split("\t")[0] for line in printed] == ["1", "2", "3", "4"]
    with Image.open(tmp_path / "out.png") as picture:
        assert picture.width > 4 * 160 and picture.height > 160
    assert search_main(["--index", str(tmp_path / "idx"), query, "--html", str(tmp_path / "out.html")]) == 0
    page = (tmp_path / "out.html").read_text()
    assert "a big red circle" in page and page.count("<figure>") == 5 and "data:image/png;base64," in page
    assert '<audio controls src="data:audio/wav;base64,' in page  # the query, playable
    # Each result is labelled with the score it is ranked by, so the labels read in descending order.
    ranked = [float(part.split(" ")[0]) for part in page.split("score ")[1:]]
    assert len(ranked) == 5 and ranked == sorted(ranked, reverse=True)
    # add and remove find the model from the index, and keep it recorded for the next search
    Image.new("RGB", (30, 30), "green").save(tmp_path / "green.png")
    assert index_main(["add", "--index", str(tmp_path / "idx"), str(tmp_path / "green.png")]) == 0
    assert index_main(["remove", "--index", str(tmp_path / "idx"), str(tmp_path / "green.png")]) == 0
    assert search_main(["--index", str(tmp_path / "idx"), query, "--top-k", "2"]) == 0
    assert len(SpeechImageIndex.load(tmp_path / "idx")) == 12


def test_cli_errors_are_clear(tmp_path, folders, model, processor, capsys):
    save_for_pipeline(model, processor, tmp_path / "model")
    assert index_main(["build", "--model", str(tmp_path / "model"), "--images", str(folders / "empty"), "--out", str(tmp_path / "idx")]) == 2
    assert "holds no image files" in capsys.readouterr().err
    index_main(["build", "--model", str(tmp_path / "model"), "--images", str(folders / "images"), "--out", str(tmp_path / "idx")])
    save_for_pipeline(C2FSpeechImageModel(tiny_config()), processor, tmp_path / "other")
    assert search_main(["--index", str(tmp_path / "idx"), "--model", str(tmp_path / "other"), str(folders / "audio" / "q0.wav")]) == 2
    assert "built with another model" in capsys.readouterr().err
    broken = folders / "broken.wav"
    broken.write_text("not audio")
    assert search_main(["--index", str(tmp_path / "idx"), str(broken)]) == 2
    assert "could not be read as an audio file" in capsys.readouterr().err
    assert search_main(["--index", str(tmp_path / "missing"), str(broken)]) == 2
    assert "not a c2f index" in capsys.readouterr().err


def test_index_from_a_dataset_column_of_paths(folders, model, processor):
    from datasets import Dataset

    paths = sorted(str(p) for p in (folders / "images").rglob("*.png"))[:4]
    index = SpeechImageIndex.build(model, processor, Dataset.from_dict({"image": paths}), "image", progress=False)
    assert [r["path"] for r in index.records] == paths
    with pytest.raises(ValueError, match="row 0: the index needs the image file's path"):
        SpeechImageIndex.build(model, processor, Dataset.from_dict({"image": ["/nope.png"]}), "image", progress=False)


def test_fingerprint_is_stable_across_a_forward_pass_and_a_reload(tmp_path, model, batch):
    from c2f.retrieval import model_fingerprint

    model.save_pretrained(tmp_path)
    fresh = C2FSpeechImageModel.from_pretrained(tmp_path)
    before = model_fingerprint(fresh)
    with torch.no_grad():
        fresh(batch["input_values"], batch["pixel_values"], batch["attention_mask"])
    assert model_fingerprint(fresh) == before == model_fingerprint(model)


def test_an_index_saved_in_pq_mode_loads_in_it(tmp_path):
    """The codes and codebooks go into the embeddings file, the depth into index.json; the loaded index searches as
    the saved one did, with no k-means and no encoding. Saved after an edit (which drops the codes), it loads exact."""
    index, queries, _ = _clustered_index()
    index.use_pq(candidates=77, progress=False)
    before = index.search_embeddings(queries, 10)
    index.save(tmp_path / "pq")
    loaded = SpeechImageIndex.load(tmp_path / "pq")
    assert loaded.pq_candidates == 77 and np.array_equal(loaded.pq_rows.packed, index.pq_rows.packed)
    assert torch.equal(loaded.pq_rows.codebooks, index.pq_rows.codebooks)
    after = loaded.search_embeddings(queries, 10)
    assert torch.equal(after[1], before[1]) and torch.equal(after[0], before[0])
    loaded.remove(["5"])
    loaded.save(tmp_path / "pq")
    assert SpeechImageIndex.load(tmp_path / "pq").pq_rows is None


def test_pq_codes_that_do_not_fit_the_gallery_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    index, _, _ = _clustered_index()
    index.use_pq(candidates=50, progress=False)
    index.save(tmp_path / "pq")
    metadata = json.loads((tmp_path / "pq" / "index.json").read_text())
    embeddings = tmp_path / "pq" / metadata["embeddings_file"]
    tensors = load_file(embeddings)
    save_file({**tensors, "pq_codes": tensors["pq_codes"][:-1].contiguous()}, embeddings)
    with pytest.raises(ValueError, match=r"tensor 'pq_codes' is torch.uint8 \(46, 128\), expected torch.uint8 \(47, 128\) "
                                         r"for 3000 rows of 32 dimensions"):
        SpeechImageIndex.load(tmp_path / "pq")
    save_file({name: tensor for name, tensor in tensors.items() if name != "pq_codebooks"}, embeddings)
    with pytest.raises(ValueError, match="tensor 'pq_codebooks' is missing beside the other PQ tensor"):
        SpeechImageIndex.load(tmp_path / "pq")
    save_file(tensors, embeddings)
    (tmp_path / "pq" / "index.json").write_text(json.dumps({**metadata, "pq_candidates": 0}))
    with pytest.raises(ValueError, match=r"pq_candidates \(beside the PQ codes of embeddings-.*\) must be an integer >= 1, got 0"):
        SpeechImageIndex.load(tmp_path / "pq")
