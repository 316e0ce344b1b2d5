// `import fastvision._C_cuda` registers the CUDA C++ kernels (static
// registration in csrc/<family>/cuda.cu). Kept apart from _C because the CUDA
// stream query it uses exists only in CUDA builds of torch: importing it on a
// CPU-only torch would fail with an undefined symbol.
#include <Python.h>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
