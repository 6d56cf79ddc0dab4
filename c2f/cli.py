"""Command-line tools: `c2f-index` builds and edits a gallery index, `c2f-search` queries it and draws the results.

    c2f-index build --model DIR --images FOLDER --out INDEX      (or --audios FOLDER for an index of recordings)
    c2f-index add --index INDEX FILE...        c2f-index remove --index INDEX ID...
    c2f-search --index INDEX query.wav [--top-k 5] [--rerank-k 16] [--png out.png | --html out.html]
"""

import argparse
import base64
import html
import io
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .retrieval import SpeechImageIndex, index_lock

THUMBNAIL = 160


def load_model(model_dir: str):
    """c2f's own classes from a local folder: no code from the folder (or from an index naming it) is ever run."""
    from .modeling_c2f import C2FSpeechImageModel
    from .processing_c2f import C2FProcessor

    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir} is not a local folder; pass --model with a trained c2f folder")
    try:
        model = C2FSpeechImageModel.from_pretrained(model_dir).eval()
        processor = C2FProcessor.from_pretrained(model_dir)
    except OSError as error:
        raise ValueError(f"cannot load a c2f model from {model_dir}: {error}") from error
    return model, processor


def _model_dir_of(index: SpeechImageIndex, index_dir: str, override: str | None) -> str:
    if override:
        return override
    if not index.model_path:
        raise ValueError(f"{index_dir} does not record its model; pass --model")
    return index.model_path  # a fingerprint check follows: a folder holding another model is refused


def index_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="c2f-index", description="Build or edit a c2f gallery index.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed every image (or recording) of a folder")
    build.add_argument("--model", required=True, help="a trained c2f folder")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images: search it with spoken queries")
    source.add_argument("--audios", help="folder of recordings: search it with images")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--batch-size", type=int, default=32)
    add = commands.add_parser("add", help="embed and append files")
    add.add_argument("--index", required=True)
    add.add_argument("--model")
    add.add_argument("files", nargs="+")
    remove = commands.add_parser("remove", help="drop items by id (their path, unless built with other ids)")
    remove.add_argument("--index", required=True)
    remove.add_argument("ids", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            model, processor = load_model(args.model)
            modality, folder = ("image", args.images) if args.images else ("audio", args.audios)
            index = SpeechImageIndex.build(model, processor, folder, modality, batch_size=args.batch_size)
            index.model_path = str(Path(args.model).resolve())
            with index_lock(args.out):
                index.save(args.out)
            print(f"indexed {len(index)} {modality}s -> {args.out}")
        elif args.command == "add":
            with index_lock(args.index):  # load, add and save as one step against other writers
                index = SpeechImageIndex.load(args.index)
                model_dir = _model_dir_of(index, args.index, args.model)
                model, processor = load_model(model_dir)
                index.add(model, processor, args.files)
                index.model_path = str(Path(model_dir).resolve())
                index.save(args.index)
            print(f"index now holds {len(index)} items")
        else:
            with index_lock(args.index):
                index = SpeechImageIndex.load(args.index)
                index.remove(args.ids)
                index.save(args.index)
            print(f"index now holds {len(index)} items")
    except (ValueError, KeyError, OSError) as error:  # OSError: a file named by the index or the user is gone
        print(f"c2f-index: error: {error}", file=sys.stderr)
        return 2
    return 0


def _transcript_of(query: str, given: str | None) -> str | None:
    if given:
        return given
    sidecar = Path(query).with_suffix(".txt")
    return sidecar.read_text().strip() if sidecar.is_file() else None


def _thumbnail(path: str) -> Image.Image:
    with Image.open(path) as image:
        thumb = image.convert("RGB")
    scale = THUMBNAIL / max(thumb.size)  # small images are scaled up too, so every cell is filled
    size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
    thumb = thumb.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
    canvas = Image.new("RGB", (THUMBNAIL, THUMBNAIL), "white")
    canvas.paste(thumb, ((THUMBNAIL - thumb.width) // 2, (THUMBNAIL - thumb.height) // 2))
    return canvas


def score_line(rank: int, result: dict, separator: str = " ") -> str:
    """The score the list is ranked by first, then its parts: a re-ranked list is not in cosine order, and showing only
    the cosine made ranks look out of order."""
    match = f", match {result['match_score']:.2f}" if "match_score" in result else ""
    return f"#{rank} score {result['score']:.2f}{separator}(cosine {result['coarse_score']:.3f}{match})"


def render_png(query: str, transcript: str | None, results: list[dict], out: str, columns: int = 5) -> None:
    """A grid of the top images with rank and scores under each, the query (and its transcript) on top."""
    rows = (len(results) + columns - 1) // columns
    header, caption = 44, 30
    width = columns * (THUMBNAIL + 8) + 8
    sheet = Image.new("RGB", (width, header + rows * (THUMBNAIL + caption + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), f"query: {Path(query).name}", fill="black")
    draw.text((8, 24), f'"{transcript}"' if transcript else "(no transcript)", fill="dimgray")
    for rank, result in enumerate(results, start=1):
        row, column = divmod(rank - 1, columns)
        x, y = 8 + column * (THUMBNAIL + 8), header + row * (THUMBNAIL + caption + 8)
        sheet.paste(_thumbnail(result["path"]), (x, y))
        draw.text((x, y + THUMBNAIL + 3), score_line(rank, result, separator="\n"), fill="black")
    sheet.save(out)


AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".opus": "audio/ogg", ".mp3": "audio/mpeg"}


def _audio_player(path: str) -> str:
    """The query itself, playable in the page (inlined, so the page stays one self-contained file)."""
    kind = AUDIO_TYPES.get(Path(path).suffix.lower())
    if kind is None:
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<audio controls src="data:{kind};base64,{data}"></audio>'


def render_html(query: str, transcript: str | None, results: list[dict], out: str) -> None:
    """A self-contained page (thumbnails inlined) of the ranked images."""
    cells = []
    for rank, result in enumerate(results, start=1):
        buffer = io.BytesIO()
        _thumbnail(result["path"]).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(result["id"])}">'
                     f"<figcaption>{html.escape(score_line(rank, result))}<br><small>{html.escape(result['id'])}</small>"
                     "</figcaption></figure>")
    said = f"<p><q>{html.escape(transcript)}</q></p>" if transcript else "<p>(no transcript)</p>"
    said = _audio_player(query) + said
    page = ("<!doctype html><meta charset='utf-8'><title>c2f search</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px;text-align:center}</style>"
            f"<h1>{html.escape(Path(query).name)}</h1>{said}{''.join(cells)}")
    Path(out).write_text(page)


def search_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="c2f-search", description="Search a c2f index with a spoken query (or an image).")
    parser.add_argument("--index", required=True)
    parser.add_argument("query", help="an audio file (image index) or an image file (audio index)")
    parser.add_argument("--model", help="the c2f folder (default: the one the index was built with)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--rerank-k", type=int, default=None, help="SIM re-rank depth (default: the model's k_test; 0: coarse only)")
    parser.add_argument("--transcript", help="what the query says, shown in the picture (default: QUERY.txt if present)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--png", help="write a grid of the top images")
    output.add_argument("--html", help="write a page of the top images")
    args = parser.parse_args(argv)
    try:
        index = SpeechImageIndex.load(args.index)
        model, processor = load_model(_model_dir_of(index, args.index, args.model))
        results = index.search(model, processor, args.query, top_k=args.top_k, rerank_k=args.rerank_k)[0]
        for rank, result in enumerate(results, start=1):
            print(f"{rank}\t{result['score']:.3f}\t{result['id']}")
        if not all(math.isfinite(result["score"]) for result in results):
            raise ValueError("the model gave non-finite scores (NaN or inf): its weights or the query are broken")
        if args.png or args.html:
            if index.modality != "image":
                raise ValueError("--png/--html draw images: use them with an image index")
            Path(args.png or args.html).parent.mkdir(parents=True, exist_ok=True)
            transcript = _transcript_of(args.query, args.transcript)
            (render_png if args.png else render_html)(args.query, transcript, results, args.png or args.html)
    except (ValueError, KeyError, OSError) as error:  # OSError: a file named by the index or the user is gone
        print(f"c2f-search: error: {error}", file=sys.stderr)
        return 2
    return 0


def _exit(main):
    def run():
        sys.exit(main())
    return run


index_entry_point = _exit(index_main)
search_entry_point = _exit(search_main)
