"""Independent construction of the 8-bit dynamic maps, for tests/optim/test_adamw.cpp.

The C++ library walks the decades and writes the midpoints; this script instead
decodes each of the 256 bit patterns: [sign bit (signed map only)] then the
exponent as a run of z zero bits closed by an indicator 1 bit, then f fraction
bits k, value 10^-z * (0.1 + 0.9 * (k + 0.5) / 2^f). The pattern with nothing
after the sign bit (signed: "-0") and the unsigned pattern 00000001 (z = 7, no
fraction bits) are spent on the code 1.0. Prints the ascending float32 codes,
one per line, as "signed <value>" and "unsigned <value>" (Python repr).
"""
import numpy as np


def decode(pattern: int, signed: bool) -> float:
    magnitude_bits = 7 if signed else 8
    negative = signed and (pattern >> 7) & 1 == 1
    magnitude = pattern & ((1 << magnitude_bits) - 1)
    if magnitude == 0:
        return 1.0 if negative else 0.0
    zeros = magnitude_bits - magnitude.bit_length()
    fraction_bits = magnitude_bits - 1 - zeros
    if zeros == 7:  # unsigned only: no fraction bits left, spent on 1.0
        return 1.0
    fraction = magnitude & ((1 << fraction_bits) - 1)
    value = 10.0 ** (-zeros) * (0.1 + 0.9 * (fraction + 0.5) / 2 ** fraction_bits)
    return -value if negative else value


def dynamic_map(signed: bool) -> np.ndarray:
    return np.sort(np.array([decode(p, signed) for p in range(256)], dtype=np.float64).astype(np.float32))


if __name__ == "__main__":
    for name, signed in (("signed", True), ("unsigned", False)):
        for value in dynamic_map(signed):
            print(name, repr(float(value)))
