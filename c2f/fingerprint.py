"""One rule for naming weights: a short hash of a header and of tensors' raw bytes, in a fixed order.

Used by the gallery index (which embedding space it lives in) and by the frozen-backbone feature caches (which
backbone computed them); each chooses what to hash, and both hash it the same way.
"""

import hashlib
import json
from collections.abc import Iterable

import torch


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], header: dict | None = None) -> str:
    """16 hex digits over `header` (JSON, keys sorted) and each `(name, tensor)` pair's name and exact bytes."""
    digest = hashlib.sha256(json.dumps(header or {}, sort_keys=True, default=str).encode())
    for name, tensor in named_tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
