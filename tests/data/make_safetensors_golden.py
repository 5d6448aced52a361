"""Writes the golden safetensors files that tests/core/safetensors_test.cc
reads, using Python's reference implementation (pip install safetensors numpy):

  golden.safetensors       F32, F64, I64, U8 tensors (incl. a scalar and an
                           empty tensor) and metadata, via
                           safetensors.numpy.save_file.
  golden_bf16.safetensors  one BF16 tensor; numpy has no bfloat16, so this file
                           is written by hand in the same layout and checked
                           by loading its header with safetensors.safe_open.

Run from the repository root: python3 tests/data/make_safetensors_golden.py
"""
import json
import os
import struct

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))

TENSORS = {
    "f32": np.array([[0.5, -1.25, 3.0], [1e-3, -0.0, 65504.0]], dtype=np.float32),
    "f64": np.array([1.0 / 3.0, -2.5, 1e300], dtype=np.float64),
    "i64": np.array([[-(2**40), -1], [0, 2**62]], dtype=np.int64),
    "u8": np.array([0, 1, 128, 255], dtype=np.uint8),
    "scalar": np.array(7.0, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
}
METADATA = {"format": "pt", "note": "golden \"file\" \u00e9"}

# bfloat16 bit patterns: 1.0, -3.0, 0.333984375 (0x3EAB), -inf.
BF16_BITS = [0x3F80, 0xC040, 0x3EAB, 0xFF80]


def write_bf16(path):
    data = struct.pack("<4H", *BF16_BITS)
    header = json.dumps(
        {"bf16": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, len(data)]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)


def main():
    path = os.path.join(HERE, "golden.safetensors")
    save_file(TENSORS, path, metadata=METADATA)
    loaded = load_file(path)
    for name, value in TENSORS.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)

    bf16_path = os.path.join(HERE, "golden_bf16.safetensors")
    write_bf16(bf16_path)
    with safe_open(bf16_path, framework="numpy") as f:
        assert list(f.keys()) == ["bf16"]
        assert f.get_slice("bf16").get_dtype() == "BF16"
        assert f.get_slice("bf16").get_shape() == [2, 2]


if __name__ == "__main__":
    main()
