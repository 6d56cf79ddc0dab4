"""Local `evaluate` metrics (hub metrics cannot be downloaded everywhere): load them by file path."""

from pathlib import Path

RETRIEVAL_RECALL_PATH = str(Path(__file__).with_name("retrieval_recall.py"))
