from pathlib import Path

from setuptools import find_namespace_packages, setup

setup(
    name="c2f",
    version="0.1.0",
    description="Coarse-to-fine speech-image retrieval (SIC + SIM + momentum distillation) as a Hugging Face model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Namespace discovery lists the demo-data folders as packages too, so setuptools ships their files without warnings.
    packages=find_namespace_packages(include=["c2f", "c2f.*"], exclude=["*.__pycache__"]),
    include_package_data=True,
    package_data={"c2f": ["demo_data/**/*", "metrics/*.py", "model_card.md"]},
    install_requires=[
        # Users bring their own torch build (CPU or CUDA); no exact pin.
        "torch>=2.4",
        "transformers>=5,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        # The gallery index's int8 scan (c2f/quantized_gallery.py); librosa users have it already.
        "numba>=0.60",
        "soundfile>=0.12",
        "soxr>=0.3",
        "pillow>=10",
        "tqdm>=4.60",
        # training_curves.png after every run
        "matplotlib>=3.7",
    ],
    extras_require={
        # The browser test drives Debian's chromium + chromedriver (apt), never a downloaded browser.
        "dev": ["pytest>=8", "faiss-cpu>=1.8", "gradio>=5", "selenium>=4"],
        "faiss": ["faiss-cpu>=1.8"],
        "app": ["gradio>=5"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={
        "console_scripts": [
            "c2f-index = c2f.cli:index_entry_point",
            "c2f-search = c2f.cli:search_entry_point",
            "c2f-app = c2f.app:main",
            "c2f-train = c2f.train:entry_point",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
