"""c2f: coarse-to-fine speech-image retrieval as a Hugging Face model package.

Importing `c2f` registers the model with the Auto classes (so `AutoModel.from_pretrained(dir)` works without
`trust_remote_code` when c2f is installed) and marks the three Hub classes for `save_pretrained` to copy their code.
"""

import os
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_c2f import C2FConfig
from .modeling_c2f import C2FImageOutput, C2FOutput, C2FRerankOutput, C2FSpeechImageModel, C2FSpeechOutput
from .pipeline_c2f import TASK, SpeechImageRetrievalPipeline
from .processing_c2f import C2FProcessor

__version__ = "0.1.0"

AutoConfig.register(C2FConfig.model_type, C2FConfig, exist_ok=True)
AutoModel.register(C2FConfig, C2FSpeechImageModel, exist_ok=True)
AutoProcessor.register(C2FConfig, C2FProcessor, exist_ok=True)
C2FConfig.register_for_auto_class()
C2FSpeechImageModel.register_for_auto_class("AutoModel")
C2FProcessor.register_for_auto_class()
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=SpeechImageRetrievalPipeline, pt_model=AutoModel, type="multimodal")


def save_for_pipeline(model, processor, save_directory) -> None:
    """Save model, processor and the pipeline code so that `pipeline("speech-image-retrieval", model=dir,
    trust_remote_code=True)` works anywhere. (A pipeline's own save does not write the processor.)"""
    SpeechImageRetrievalPipeline(model=model, processor=processor).save_pretrained(save_directory)
    processor.save_pretrained(save_directory)
    _honour_umask(save_directory)


def _honour_umask(folder) -> None:
    """transformers writes weights through a private temporary file (mode 0600); a saved model is meant to be shared,
    so its files get the permissions the user's umask gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)

__all__ = [
    "C2FConfig",
    "C2FImageOutput",
    "C2FOutput",
    "C2FRerankOutput",
    "C2FProcessor",
    "C2FSpeechImageModel",
    "C2FSpeechOutput",
    "SpeechImageRetrievalPipeline",
    "save_for_pipeline",
]
