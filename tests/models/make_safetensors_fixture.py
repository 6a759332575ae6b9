# Reference side of tests/models/test_safetensors.cpp: uses the Python
# `safetensors` library to (1) read the file the C++ writer made and report
# what it saw, (2) write it back with save_file for the C++ reader, and
# (3) write its own fresh random tensors of every dtype for the C++ reader.
# Reports are plain text, one record a line, strings hex-encoded so that any
# name or metadata value survives:  T name dtype shape data | M key value
# (shape is comma-separated dims, "-" for a scalar; data "-" when empty).
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "C64": torch.complex64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


def hexs(s):
    return s.encode("utf-8").hex()


def raw_bytes(t):
    # reshape(-1) first: a 0-dim tensor cannot change its element size by view.
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def report(path, tensors, metadata):
    with open(path, "w") as f:
        for k, v in (metadata or {}).items():
            f.write(f"M {hexs(k)} {hexs(v)}\n")
        for name, t in tensors.items():
            shape = ",".join(str(d) for d in t.shape) or "-"
            data = raw_bytes(t).hex() or "-"
            f.write(f"T {hexs(name)} {NAMES[t.dtype]} {shape} {data}\n")


def random_tensor(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.uint8).to(torch.bool)
    # Random bit patterns (NaN payloads, subnormals, -0 included) test bit-exactness.
    size = torch.empty(0, dtype=dtype).element_size()
    data = torch.frombuffer(bytearray(os.urandom(n * size)), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    return data.view(dtype).reshape(shape)


def main(out_dir):
    # (1) and (2): the C++-written file through the reference reader and writer.
    cpp_path = os.path.join(out_dir, "cpp.safetensors")
    seen = load_file(cpp_path)
    with safe_open(cpp_path, framework="pt") as f:
        metadata = f.metadata()
    report(os.path.join(out_dir, "cpp_seen.txt"), seen, metadata)
    save_file(seen, os.path.join(out_dir, "cpp_back.safetensors"), metadata=metadata)

    # (3): fresh tensors written by the reference implementation.
    tensors = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        for shape in [(), (0,), (3, 0, 2), (7,), (2, 3, 5)]:
            key = f"model.layers.{i}.{name.lower()}.{'x'.join(map(str, shape)) or 'scalar'}"
            tensors[key] = random_tensor(dtype, shape)
    tensors["ünïcödé name"] = random_tensor(torch.float32, (4,))
    metadata = {"format": "pt", "note": 'quotes " and \\ and ünïcödé', "seed": os.urandom(8).hex()}
    save_file(tensors, os.path.join(out_dir, "python.safetensors"), metadata=metadata)
    report(os.path.join(out_dir, "python.txt"), tensors, metadata)


if __name__ == "__main__":
    main(sys.argv[1])
