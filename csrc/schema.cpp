// The fastexplain operator schemas (SPEC §2–3). Kernels register in filter_loss.cpp and template_mask.cpp;
// autograd and fake (meta) implementations are registered from Python (fastexplain/ops/cpu.py).
#include <torch/library.h>

TORCH_LIBRARY(fastexplain, m) {
  // −MI per filter [C] plus the statistics the backward pass reuses: lme [C, 2, HW+1] (the log-mean-exp of the
  // logits over the batch per template, as centre + log1p part) and v [C, B] (log(B·P) per image).
  m.def("filter_loss_forward(Tensor x, float beta) -> (Tensor, Tensor, Tensor)");
  m.def("filter_loss_backward(Tensor grad, Tensor x, Tensor lme, Tensor v, float beta) -> Tensor");
  // The loss and dloss_c/dx (for grad 1 per filter; compute dtype, contiguous) in one pass, for training: the backward
  // pass only scales it by the incoming gradient (filter_loss_backward_from_grad), into the input's dtype.
  m.def("filter_loss_forward_grad(Tensor x, float beta) -> (Tensor, Tensor)");
  m.def("filter_loss_backward_from_grad(Tensor grad, Tensor dloss_dx, ScalarType dtype) -> Tensor");
  // y = relu?(x)·m (·τ), clamped at 0, and the peak index per (image, filter) [B, C] (int64).
  m.def("template_mask_forward(Tensor x, float beta, str center, bool tau_scale, bool relu) -> (Tensor, Tensor)");
  m.def("template_mask_backward(Tensor grad_y, Tensor x, Tensor peaks, float beta, bool tau_scale, bool relu) -> Tensor");
  // The same mask saving only what the backward pass needs (issue 12): y (in x's memory format), the peaks and the
  // kept positions 1[relu?(x)·m > 0] as bits, [B, C, ⌈HW/16⌉] int16 (16 per word along the row-major map);
  // the backward pass reads grad_y, the peaks and the bits, not x.
  m.def("template_mask_forward_bits(Tensor x, float beta, str center, bool tau_scale, bool relu) -> (Tensor, Tensor, Tensor)");
  m.def("template_mask_backward_bits(Tensor grad_y, Tensor peaks, Tensor keep, float beta, bool tau_scale) -> Tensor");
}
