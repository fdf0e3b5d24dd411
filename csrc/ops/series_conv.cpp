// Schemas of the kernel-level series ops; device implementations live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

// `import gross_kernels._C` loads this library, which runs the registrations below; the Python
// module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(gross, m) {
  // z = sum over active terms i (g_i <= group_size) of conv2d(x, cores[i], groups = S / g_i).
  m.def(
      "series_conv_forward(Tensor x, Tensor[] cores, int[] group_sizes, int group_size, "
      "int[] stride, int[] padding, int[] dilation) -> Tensor");
  // grad_x of series_conv_forward; input_shape is x's (N, S, H, W).
  m.def(
      "series_conv_backward_input(Tensor grad_out, Tensor[] cores, int[] group_sizes, "
      "int group_size, int[] input_shape, int[] stride, int[] padding, int[] dilation) -> Tensor");
  // Gradients of the active terms only, grads[i] shaped like cores[i].
  m.def(
      "series_conv_backward_weight(Tensor grad_out, Tensor x, Tensor[] cores, int[] group_sizes, "
      "int group_size, int[] stride, int[] padding, int[] dilation) -> Tensor[]");
  // Fused 1x1 (A) -> series core -> 1x1 (C) + bias; implemented for the CUDA key only.
  m.def(
      "series_bottleneck_forward(Tensor x, Tensor A, Tensor[] cores, Tensor C, Tensor? bias, "
      "int[] group_sizes, int group_size, int[] stride, int[] padding, int[] dilation) -> Tensor");
  // A copy of a 4-D x in channels-last (channels_last=True) or NCHW layout, x dense in the other;
  // implemented for the CPU key (cpu/layout_kernel.cpp).
  m.def("relayout(Tensor x, bool channels_last) -> Tensor");
}
