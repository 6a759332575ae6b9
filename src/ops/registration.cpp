// Every schema of the unswag op namespace, declared once. Implementations are
// registered per dispatch key next to their code: the CPU/CUDA kernels in
// activations.cpp and mlp_cores.cpp, the autograd functions under Autograd in
// activations.cpp and fused_mlp.cpp.
#include <torch/library.h>

TORCH_LIBRARY(unswag, m) {
  // Compressed activations (differentiable; save only packed codes).
  m.def("relu_1bit(Tensor x) -> Tensor");
  m.def("silu_fewbit(Tensor x, int bits=2) -> Tensor");
  m.def("gelu_fewbit(Tensor x, int bits=2) -> Tensor");
  m.def("silu_2bit(Tensor x) -> Tensor");
  m.def("gelu_2bit(Tensor x) -> Tensor");
  // Their halves. Codes: int32 [ceil(numel / 32) * bits] bit planes.
  m.def("relu_1bit_forward(Tensor x) -> (Tensor y, Tensor mask)");
  m.def("relu_1bit_backward(Tensor grad_y, Tensor mask) -> Tensor");
  m.def("fewbit_forward(Tensor x, str activation, int bits) -> (Tensor y, Tensor codes)");
  m.def("fewbit_backward(Tensor grad_y, Tensor codes, str activation, int bits) -> Tensor");
  m.def("fewbit_table(str activation, int bits) -> (Tensor boundaries, Tensor values)");
  // Elementwise cores of the fused MLP blocks and int8 storage (int8 groups of 64 values, fp32 scales).
  m.def(
      "gated_forward(Tensor gate, Tensor up, str activation, bool store_int8) -> "
      "(Tensor h, Tensor gate_q, Tensor gate_scale, Tensor up_q, Tensor up_scale)");
  m.def(
      "gated_backward(Tensor grad_h, Tensor? gate, Tensor? up, Tensor? gate_q, Tensor? gate_scale, Tensor? up_q, "
      "Tensor? up_scale, str activation, bool want_h) -> (Tensor h, Tensor grad_gate, Tensor grad_up)");
  m.def("quantize_int8(Tensor x) -> (Tensor q, Tensor scale)");
  m.def("dequantize_int8(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  // The fused MLP block (differentiable), see include/unswag/ops.h.
  m.def(
      "fused_mlp(Tensor x, Tensor w_up, Tensor w_down, Tensor? w_gate, str activation, str policy=\"compressed\", "
      "int storage_bits=16, int derivative_bits=2) -> Tensor");
  // Packet-Switched Attention's sequence primitives (include/unswag/nn/psa_ops.h).
  m.def("causal_depthwise_conv1d(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("linear_scan(Tensor a, Tensor x, Tensor? h0=None) -> Tensor");
  m.def("gated_ema_scan(Tensor v, Tensor z, Tensor rate, Tensor? h0=None) -> (Tensor h, Tensor last)");
  m.def("psa_combine(Tensor sig, Tensor gate, Tensor? win, Tensor local, Tensor lambda_local, Tensor summary, "
        "Tensor lambda_summary) -> Tensor");
  m.def("psa_combine_packed(Tensor sig, Tensor sig_rows, Tensor pack_rows, Tensor gate, Tensor? win, Tensor local, "
        "Tensor lambda_local, Tensor summary, Tensor lambda_summary) -> Tensor");
  m.def("gather_rows(Tensor src, Tensor index, Tensor inverse) -> Tensor");
  m.def("pad_head_dim(Tensor x, int pad, Tensor? first=None) -> Tensor");
  m.def("gate_tokens(Tensor x, Tensor g) -> Tensor");
  m.def("unpad_head_dim(Tensor(a) x, int pad) -> Tensor(a)");
  m.def("psa_route(Tensor logits, Tensor bias, Tensor gumbel, Tensor target, float temperature, "
        "float load_weight=0., float z_weight=0., float entropy_weight=0.) -> "
        "(Tensor route, Tensor gates, Tensor losses, Tensor stats, Tensor signal_max)");
}
