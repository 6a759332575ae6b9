"""Fits the polynomial of the 16-bit GELU forward (src/kernels/elementwise.cu,
gelu_16bit) and checks it in emulated fp32 arithmetic.

GELU(x) = x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2. With z = |x| / sqrt 2 and
t = 1 / (1 + z / 2), the kernel computes erfc(z) / 2 = t 2^(Q(t) - z^2 log2 e)
(one MUFU.RCP, one MUFU.EX2), where Q is this script's degree-7 polynomial,
fitted near-minimax (iteratively reweighted least squares) to
Q(t) = log2(erfc(z) / (2 t)) + z^2 log2 e on z in [0, 10]. An error e in Q is
a relative error of e ln 2 in erfc. Prints the coefficients (fp32, lowest
degree first) and the relative error of the emulated kernel against
x Phi(x) in float64 on |x| <= 3, 6 and 14.

Usage: python3 scripts/fit_gelu_erfc.py   (numpy only)
"""
import math

import numpy as np

DEGREE = 7
Z_MAX = 10.0


def fit():
    t0 = 1 / (1 + 0.5 * Z_MAX)
    t = np.linspace(t0, 1, 200001)
    z = (1 / t - 1) / 0.5
    erfc = np.vectorize(math.erfc)
    target = np.log2(erfc(z) / (2 * t)) + z * z / math.log(2)
    basis = np.vander(t, DEGREE + 1, increasing=True)
    weight = np.ones_like(t)
    best = (math.inf, None)
    for _ in range(150):
        c, *_ = np.linalg.lstsq(basis * weight[:, None], target * weight, rcond=None)
        err = np.abs(basis @ c - target)
        if err.max() < best[0]:
            best = (err.max(), c.copy())
        weight = weight * (err / err.max() + 1e-3) ** 0.5
        weight /= weight.max()
    return best


def f32(a):
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def emulate(coeffs, x):
    """The kernel's sequence of fp32 operations (each rounded to fp32)."""
    t = f32(1 / f32(np.abs(x) * float(np.float32(0.35355339059327376)) + 1))
    p = np.full_like(t, float(coeffs[-1]))
    for c in coeffs[-2::-1]:
        p = f32(p * t + float(c))
    e = f32(f32(x * float(np.float32(-0.72134752044448170))) * x + p)
    half_erfc = f32(t * np.exp2(e))
    return np.where(x < 0, x * half_erfc, x * (1 - half_erfc))


def main():
    fit_err, c = fit()
    coeffs = c.astype(np.float32)
    print(f"degree {DEGREE}: max fit error in log2 {fit_err:.3g} (relative {fit_err * math.log(2):.3g})")
    print("coefficients, lowest degree first:", ", ".join(repr(float(v)) + "f" for v in coeffs))
    x = f32(np.linspace(-14, 14, 400001))
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    y = emulate(coeffs, x)
    for limit in (3, 6, 14):
        m = (np.abs(x) <= limit) & (np.abs(exact) > 1e-37)
        print(f"|x| <= {limit}: max relative error {np.max(np.abs(y[m] - exact[m]) / np.abs(exact[m])):.3g}")


if __name__ == "__main__":
    main()
