"""Two CPU processes (gloo) must train exactly like one process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

HELPER = Path(__file__).with_name("distributed_parity.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(out: Path, processes: int, per_device_batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HELPER.parent.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(_free_port()), str(HELPER), str(out), str(per_device_batch)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(out / "parity.safetensors")


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    single = _run(tmp_path / "one", processes=1, per_device_batch=8)
    double = _run(tmp_path / "two", processes=2, per_device_batch=4)
    # The queue holds every rank's momentum features, in rank order, identical to the single-process queue.
    assert int(double["queue.filled"]) == int(single["queue.filled"]) == 16
    assert torch.equal(double["queue.image_ids"], single["queue.image_ids"])
    assert torch.allclose(double["queue.speech"], single["queue.speech"], atol=1e-5)
    assert torch.allclose(double["queue.image"], single["queue.image"], atol=1e-5)
    # Logged loss (mean over ranks) and the trained weights agree: in-batch negatives span both ranks.
    assert torch.allclose(double["losses"], single["losses"], atol=1e-4), (double["losses"], single["losses"])
    for name, tensor in single.items():
        if name.startswith(("model.", "momentum.")):
            assert torch.allclose(double[name], tensor, atol=1e-4), name
