"""Hugging Face Space entry point: the c2f demo page (see `c2f/app.py`).

Locally: `python app.py` after a no-argument `accelerate launch run_retrieval.py` (the model in outputs/c2f-demo,
galleries from the demo test split). In a Space, set C2F_MODEL to the model folder (and C2F_IMAGE_INDEX /
C2F_AUDIO_INDEX to indexes made with `c2f-index build`).
"""

import os

from c2f.app import build_demo

demo = build_demo(os.environ.get("C2F_MODEL", "outputs/c2f-demo"), os.environ.get("C2F_IMAGE_INDEX"),
                  os.environ.get("C2F_AUDIO_INDEX"))

if __name__ == "__main__":
    demo.launch(allowed_paths=demo.c2f_folders)
