"""The `speech-image-retrieval` pipeline: rank candidate images for a spoken query, or candidate recordings for an
image, coarse (SIC) then fine (SIM re-rank of the top `rerank_k`).

This file is copied to a Hub repository by the pipeline's `save_pretrained`, so
`pipeline("speech-image-retrieval", model=repo, trust_remote_code=True)` works without c2f installed. It imports only
torch, transformers and the files beside it.
"""

import os

from transformers import Pipeline

TASK = "speech-image-retrieval"


def is_query_batch(inputs) -> bool:
    """A list/tuple of queries, as opposed to one query (a path, array, tensor, dict or image)."""
    return isinstance(inputs, (list, tuple))


class SpeechImageRetrievalPipeline(Pipeline):
    """Zero-shot speech-image retrieval with a c2f model.

    ```python
    pipe = pipeline("speech-image-retrieval", model="path/to/c2f", trust_remote_code=True)
    pipe("query.wav", candidate_images=["a.jpg", "b.jpg", "c.jpg"], top_k=2)
    # [{"index": 2, "coarse_score": 0.62, "score": 3.1, "match_score": 0.97, "image": "c.jpg"}, ...]
    pipe(image, candidate_audios=["x.wav", "y.flac"])  # the reverse direction
    ```

    Audio may be a path, a numpy array / tensor (16 kHz unless `sampling_rate` is given) or a
    `{"array", "sampling_rate"}` dict; images a path, PIL image or array (no URLs are fetched). `rerank_k` (default:
    the model's `k_test`) candidates are re-scored by the SIM head; `rerank_k=0` ranks by SIC similarity only.
    Results come best first. `coarse_score` is the SIC cosine; for the re-scored candidates, `match_score` is the SIM
    match probability and `score` the fine score they are ordered by (SIM logit margin + cosine / temperature);
    candidates past `rerank_k` follow them in cosine order, with `score` equal to their cosine.
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, candidate_images=None, candidate_audios=None, top_k=None, rerank_k=None,
                             sampling_rate=None, **kwargs):
        preprocess = {}
        if candidate_images is not None:
            preprocess["candidate_images"] = candidate_images
        if candidate_audios is not None:
            preprocess["candidate_audios"] = candidate_audios
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        forward = {} if rerank_k is None else {"rerank_k": rerank_k}
        postprocess = {} if top_k is None else {"top_k": top_k}
        return preprocess, forward, postprocess

    def __call__(self, inputs, **kwargs):
        """One query -> a ranked list of dicts; a list of queries -> a list of such lists."""
        if is_query_batch(inputs):
            return [super(SpeechImageRetrievalPipeline, self).__call__(query, **kwargs) for query in inputs]
        return super().__call__(inputs, **kwargs)

    def preprocess(self, inputs, candidate_images=None, candidate_audios=None, sampling_rate=None):
        if (candidate_images is None) == (candidate_audios is None):
            raise ValueError("give exactly one of candidate_images= (for a spoken query) or candidate_audios= (for an image)")
        candidates = list(candidate_images if candidate_images is not None else candidate_audios)
        if not candidates:
            raise ValueError("the candidate list is empty")
        if candidate_images is not None:
            query = self.processor(audio=[inputs], sampling_rate=sampling_rate)
            gallery = self.processor(images=candidates)
        else:
            query = self.processor(images=[inputs])
            gallery = self.processor(audio=candidates, sampling_rate=sampling_rate)
        return {"query": dict(query), "gallery": dict(gallery), "speech_query": candidate_images is not None,
                "candidates": candidates}

    def _forward(self, model_inputs, rerank_k=None):
        speech_inputs, image_inputs = (
            (model_inputs["query"], model_inputs["gallery"]) if model_inputs["speech_query"]
            else (model_inputs["gallery"], model_inputs["query"])
        )
        speech = self.model.encode_speech(speech_inputs["input_values"], speech_inputs.get("attention_mask"))
        images = self.model.encode_image(image_inputs["pixel_values"])
        coarse = speech.speech_embeds @ images.image_embeds.t()  # [speech, images]
        if not model_inputs["speech_query"]:
            coarse = coarse.t()
        k = self.model.config.k_test if rerank_k is None else rerank_k
        ranked = self.model.rerank(coarse, speech.speech_tokens, speech.speech_token_mask, images.image_tokens, k,
                                   queries_are_speech=model_inputs["speech_query"])
        # Plain dicts: Pipeline rebuilds tensor outputs as bare ModelOutputs on their way to postprocess.
        return {"results": ranked.results(0, len(model_inputs["candidates"])), "candidates": model_inputs["candidates"],
                "speech_query": model_inputs["speech_query"]}

    def postprocess(self, model_outputs, top_k=5):
        key = "image" if model_outputs["speech_query"] else "audio"
        results = model_outputs["results"][:top_k]
        for result in results:
            candidate = model_outputs["candidates"][result["index"]]
            if isinstance(candidate, (str, os.PathLike)):
                result[key] = os.fspath(candidate)
        return results


__all__ = ["SpeechImageRetrievalPipeline", "TASK", "is_query_batch"]
