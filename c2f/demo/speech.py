"""Speak captions with espeak-ng and store them as reproducible Ogg/Opus files at 16 kHz."""

import io
import shutil
import subprocess

import numpy as np
import soundfile

from ..processing_c2f import resample_audio

SAMPLING_RATE = 16000


def synthesize(text: str, voice: str, words_per_minute: int, pitch: int) -> np.ndarray:
    """espeak-ng -> mono float32 at 16 kHz."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError(
            "espeak-ng is needed to generate the demo dataset (not to train on it): "
            "install the Debian/Ubuntu package 'espeak-ng' or Homebrew's 'espeak-ng'"
        )
    wav = subprocess.run(
        [binary, "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    waveform, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return resample_audio(waveform, rate, SAMPLING_RATE)


_CRC_TABLE = []
for _byte in range(256):
    _value = _byte << 24
    for _ in range(8):
        _value = ((_value << 1) ^ 0x04C11DB7) if _value & 0x80000000 else (_value << 1)
    _CRC_TABLE.append(_value & 0xFFFFFFFF)


def _ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((crc >> 24) & 0xFF) ^ byte]
    return crc


def fix_ogg_serial(data: bytes, serial: int = 0) -> bytes:
    """libsndfile gives each Ogg stream a random serial number; pin it (and fix each page's CRC) so the same audio
    always encodes to the same bytes."""
    out = bytearray(data)
    offset = 0
    while offset < len(out):
        if out[offset : offset + 4] != b"OggS":
            raise ValueError(f"not an Ogg page at byte {offset}")
        segments = out[offset + 26]
        length = 27 + segments + sum(out[offset + 27 : offset + 27 + segments])
        out[offset + 14 : offset + 18] = serial.to_bytes(4, "little")
        out[offset + 22 : offset + 26] = b"\0\0\0\0"
        out[offset + 22 : offset + 26] = _ogg_crc(bytes(out[offset : offset + length])).to_bytes(4, "little")
        offset += length
    return bytes(out)


def encode_opus(waveform: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, waveform, SAMPLING_RATE, format="OGG", subtype="OPUS", compression_level=0.95)
    return fix_ogg_serial(buffer.getvalue())
