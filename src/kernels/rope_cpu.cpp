// CPU reference of the rotary position embedding (src/kernels/rope.h).
#include "float_types.h"
#include "rope.h"

namespace unswag::kernels {
namespace {

template <typename T>
void rope_rows(const RopeParams& p, int64_t r0, int64_t r1) {
  using A = opmath_t<T>;
  const int64_t D = p.dim, h = D / 2;
  const T* x = static_cast<const T*>(p.x);
  const T* cs = static_cast<const T*>(p.cos);
  const T* sn = static_cast<const T*>(p.sin);
  T* y = static_cast<T*>(p.y);
  // Rounds a math-type value to T and back: the forward mirrors ATen's
  // per-op rounding (x * cos, rotate_half(x) * sin, their sum).
  auto round = [](A v) { return A(to_float(from_acc<T>(v))); };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t token = r / p.heads;
    const int64_t crow = p.cos_per_batch ? token : token % p.time;
    const T* xr = x + (token / p.time) * p.x_stride_b + (token % p.time) * p.x_stride_t + (r % p.heads) * p.x_stride_h;
    const T* c = cs + crow * D;
    const T* s = sn + crow * D;
    T* yr = y + r * D;
    for (int64_t d = 0; d < D; ++d) {
      if (!p.inverse) {
        const A rot = d < h ? -A(to_float(xr[d + h])) : A(to_float(xr[d - h]));
        const A a = round(A(to_float(xr[d])) * A(to_float(c[d])));
        const A b = round(rot * A(to_float(s[d])));
        yr[d] = from_acc<T>(a + b);
      } else {
        const A other = d < h ? A(to_float(xr[d + h])) * A(to_float(s[d + h]))
                              : -(A(to_float(xr[d - h])) * A(to_float(s[d - h])));
        yr[d] = from_acc<T>(A(to_float(xr[d])) * A(to_float(c[d])) + other);
      }
    }
  }
}

}  // namespace

void rope_cpu(const RopeParams& p, int64_t r0, int64_t r1) {
  dispatch_dtype(p.dtype, [&](auto tag) { rope_rows<decltype(tag)>(p, r0, r1); });
}

}  // namespace unswag::kernels
