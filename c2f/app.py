"""A demo page over a trained c2f folder: speak (or upload) a description and see the images it finds; pick an image
and hear the spoken captions that match it. Gradio, in the layout of a Hugging Face Space (`app.py` at the repo root
calls `launch`); `pip install "c2f[app]"`.

    c2f-app --model outputs/c2f-demo                      # galleries: the demo test split, indexed on first start
    c2f-app --model DIR --image-index IMAGES [--audio-index CAPTIONS] [--port 7860]
"""

import argparse
from pathlib import Path

from .cli import load_model, score_line
from .data import load_demo
from .retrieval import SpeechImageIndex

TOP_K = 5


def _require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise ImportError('the demo page needs Gradio: pip install "c2f[app]" (or pip install gradio)') from error
    return gradio


def demo_indexes(model, processor, model_dir: str | Path, split: str = "test") -> tuple[Path, Path, dict[str, str]]:
    """Image and caption indexes of the shipped demo split, built once into `MODEL_DIR/demo_index/` (rebuilt when the
    model changes), and `{audio path: caption}` for showing what each clip says."""
    rows = load_demo(split)
    images, audios = sorted(set(rows["image"])), list(rows["audio"])
    folders = {}
    for modality, paths in (("image", images), ("audio", audios)):
        folder = Path(model_dir) / "demo_index" / f"{split}-{modality}s"
        try:
            SpeechImageIndex.load(folder).check_model(model)
        except (OSError, ValueError):  # missing, or built with other weights
            SpeechImageIndex.build(model, processor, paths, modality=modality).save(folder)
        folders[modality] = folder
    transcripts = {str(Path(path).resolve()): caption for path, caption in zip(audios, rows["caption"])}
    return folders["image"], folders["audio"], transcripts


def build_demo(model_dir: str | Path, image_index: str | Path | None = None, audio_index: str | Path | None = None,
               transcripts: dict[str, str] | None = None):
    """The Gradio Blocks of the page; `launch()` it (with `allowed_paths=demo.c2f_folders` so gallery files are
    served)."""
    gr = _require_gradio()
    model, processor = load_model(str(model_dir))
    if image_index is None:
        image_index, default_audio, transcripts = demo_indexes(model, processor, model_dir)
        audio_index = audio_index or default_audio
    images = SpeechImageIndex.load(image_index)
    images.check_model(model)
    captions = SpeechImageIndex.load(audio_index) if audio_index else None
    if captions is not None:
        captions.check_model(model)
    transcripts = transcripts or {}

    def find_images(audio_path):
        if not audio_path:
            raise gr.Error("Record or upload a spoken description first.")
        results = images.search(model, processor, audio_path, top_k=TOP_K)[0]
        pictures = [(result["path"], f"#{rank} {Path(result['path']).name}") for rank, result in enumerate(results, 1)]
        table = "\n".join(f"- {score_line(rank, result)} · `{Path(result['path']).name}`" for rank, result in enumerate(results, 1))
        return pictures, table

    def find_captions(image_path):
        if not image_path:
            raise gr.Error("Pick or upload an image first.")
        results = captions.search(model, processor, image_path, top_k=TOP_K)[0]
        updates = []
        for rank, result in enumerate(results, 1):
            said = transcripts.get(result["path"])
            label = f"{score_line(rank, result)} · {Path(result['path']).name}" + (f' · "{said}"' if said else "")
            updates.append(gr.update(value=result["path"], label=label, visible=True))
        return updates + [gr.update(visible=False)] * (TOP_K - len(updates))

    with gr.Blocks(title="c2f: coarse-to-fine speech-image retrieval") as demo:
        gr.Markdown(f"## c2f — speech ↔ image retrieval\nModel `{Path(model_dir).name}`; {len(images)} images"
                    + (f", {len(captions)} spoken captions" if captions is not None else "")
                    + ". Ranked by SIC similarity, the top ones re-ranked by the SIM head.")
        with gr.Tab("Speech → images"):
            query = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Spoken description",
                             elem_id="speech-query")
            search = gr.Button("Find images", variant="primary", elem_id="find-images")
            gallery = gr.Gallery(label="Best images", columns=TOP_K, height=300, elem_id="image-results")
            scores = gr.Markdown(elem_id="image-scores")
            search.click(find_images, query, [gallery, scores])
        if captions is not None:
            with gr.Tab("Image → speech"):
                picked = gr.Image(type="filepath", label="Image", elem_id="image-query")
                gr.Examples([[record["path"]] for record in images.records[:8]], inputs=picked, label="Gallery images")
                listen = gr.Button("Find spoken captions", variant="primary", elem_id="find-captions")
                players = [gr.Audio(visible=False, interactive=False, elem_id=f"caption-{rank}") for rank in range(1, TOP_K + 1)]
                listen.click(find_captions, picked, players)
    # Gradio serves only files under folders it is told about: the galleries'.
    demo.c2f_folders = sorted({str(Path(record["path"]).parent) for index in (images, captions) if index is not None
                               for record in index.records})
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="c2f-app", description="A demo page over a trained c2f model.")
    parser.add_argument("--model", required=True, help="a trained c2f folder")
    parser.add_argument("--image-index", help="an image index (c2f-index build); default: the demo test split")
    parser.add_argument("--audio-index", help="an index of spoken captions, for image -> speech")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    demo = build_demo(args.model, args.image_index, args.audio_index)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=demo.c2f_folders)


if __name__ == "__main__":
    main()
