// The fastgim._C extension: schemas of the torch ops in namespace fastgim_C (CUDA implementations in the
// .cu files beside this one) and the pybind11 module that makes `import fastgim._C` load them.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(fastgim_C, m) {
  m.def("rms_norm_forward(Tensor x, Tensor? weight, float eps, bool round_normed, int stream) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, bool round_normed, bool frozen, "
      "bool want_dweight, int stream) -> (Tensor, Tensor)");
  m.def(
      "layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, int stream) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "layer_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool frozen, "
      "bool want_dweight, bool want_dbias, int stream) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgim CUDA kernels; the ops are torch.ops.fastgim_C.*";
}
