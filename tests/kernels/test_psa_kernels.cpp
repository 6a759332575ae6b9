// Tests of the PSA kernels' raw-pointer entry points (src/kernels/psa.h) for
// what the ops do not reach on the CPU: the conv backward's dx_addend (on
// CUDA only the layer's fused node passes one), against the op's own dx plus
// the addend in float64, over several tiles, every tap-window width and
// K past 16.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernels/psa.h"
#include "test_util.h"

namespace unswag::kernels {
namespace {

TEST(PsaKernelsCpu, ConvBackwardAddsTheAddendToDx) {
  for (int64_t K : {1, 3, 8, 13, 20}) {
    SCOPED_TRACE("K " + std::to_string(K));
    const int64_t B = 2, T = 600, C = 5;  // T > 256: several CPU tiles
    const auto opt = torch::TensorOptions().dtype(torch::kDouble);
    const torch::Tensor x = torch::randn({B, T, C}, opt), w = torch::randn({C, K}, opt);
    const torch::Tensor dy = torch::randn({B, T, C}, opt), addend = torch::randn({B, T, C}, opt);
    CausalConvParams p;
    p.dtype = DType::kFloat64;
    p.batch = B, p.time = T, p.channels = C, p.taps = K;
    p.time_tile = conv_time_tile(B, T, C, /*cuda=*/false);
    p.x = x.const_data_ptr();
    p.weight = w.const_data_ptr();
    p.dy = dy.const_data_ptr();
    torch::Tensor dx = torch::empty_like(x), dx_plain = torch::empty_like(x);
    p.dx = dx_plain.data_ptr();
    causal_conv_backward_cpu(p, 0, conv_groups(p));
    p.dx = dx.data_ptr();
    p.dx_addend = addend.const_data_ptr();
    causal_conv_backward_cpu(p, 0, conv_groups(p));
    // dx_plain against autograd of the causal conv (float64), then the addend on top.
    const torch::Tensor xl = x.clone().requires_grad_(true);
    const torch::Tensor y = at::conv1d(torch::constant_pad_nd(xl.transpose(1, 2), {K - 1, 0}), w.unsqueeze(1), {},
                                       at::IntArrayRef{1}, at::IntArrayRef{0}, at::IntArrayRef{1}, C)
                                .transpose(1, 2);
    y.backward(dy);
    EXPECT_LE(test::rel_l2(dx_plain, xl.grad()), 1e-12);
    EXPECT_LE(test::rel_l2(dx, xl.grad() + addend), 1e-12);
  }
}

}  // namespace
}  // namespace unswag::kernels
