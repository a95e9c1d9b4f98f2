// Every schema of torch.ops.qops, in one place (docs/ARCHITECTURE.md, "The op layer").
// Kernels register against these names in csrc/cpu/*.cpp and csrc/cuda/*_binding.cpp; the
// fake (meta) and autograd registrations live in qops/*.py.
#include <Python.h>
#include <torch/library.h>

#include "qops/cpu_dispatch.h"

TORCH_LIBRARY(qops, m) {
  // Fake quantization with learnable scale/zero point (LSQ); equals
  // torch._fake_quantize_learnable_per_{tensor,channel}_affine. axis = -1: per tensor.
  m.def(
      "fake_quant(Tensor x, Tensor scale, Tensor zero_point, int axis, int quant_min, int quant_max, "
      "float grad_factor=1.0) -> Tensor");
  // One fused pass over x: (grad_x, grad_scale, grad_zero_point).
  m.def(
      "fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int axis, "
      "int quant_min, int quant_max, float grad_factor=1.0) -> (Tensor, Tensor, Tensor)");
  // y = x + delta * eps / 2, delta = (max - min) / (2^bits - 1), eps from Philox keyed by (seed, index).
  // Seeds are SymInt so that a compiled graph can draw them per step (a traced .item()) without a break.
  m.def("quant_noise(Tensor x, int bits, SymInt seed, int axis=-1, str dist=\"gaussian\") -> Tensor");
  // int8 codes [Cout, Cin, kh, kw] -> opaque uint8 bit-plane buffer (csrc/include/qops/packed_layout.h).
  m.def("pack_weight(Tensor w_codes, int bits) -> Tensor");
  // Exact int32 convolution of activation codes with packed weight codes, zero padding, bits 1..8.
  m.def(
      "packed_conv2d(Tensor x_codes, Tensor w_packed, int[] w_shape, int w_bits, int a_bits, bool a_signed, "
      "int[2] stride, int[2] padding) -> Tensor");
  // Float out: quantize x (float32; CPU also takes the codes themselves, int8 if a_signed else uint8), integer
  // convolution, out = acc * (w_scale[c] * a_scale) + bias[c] (float32 bias).
  m.def(
      "quantized_conv2d(Tensor x, Tensor w_packed, int[] w_shape, Tensor w_scale, float a_scale, int w_bits, "
      "int a_bits, bool a_signed, Tensor? bias, int[2] stride, int[2] padding) -> Tensor");
  // Codes out (requantization epilogue): x and the convolution as quantized_conv2d, bias int32 at the step
  // w_scale[c] * a_scale, y = acc * step[c] + bias[c] * step[c]; out = clamp(round(relu?(y) / out_scale)) at
  // out_bits (int8 if out_signed else uint8): the next layer's activation codes, pixel-shuffled by the
  // factor pixel_shuffle (1: none).
  m.def(
      "requantized_conv2d(Tensor x, Tensor w_packed, int[] w_shape, Tensor w_scale, float a_scale, int w_bits, "
      "int a_bits, bool a_signed, Tensor? bias, int[2] stride, int[2] padding, float out_scale, int out_bits, "
      "bool out_signed, bool relu=False, int pixel_shuffle=1) -> Tensor");
  // Codes of x at step `scale` (clamp(round(x / scale)) at `bits`, int8 if signed else uint8); x is float32, or
  // codes (int8/uint8) standing for x * x_scale.
  m.def("requantize(Tensor x, float scale, int bits, bool signed, float? x_scale=None) -> Tensor");
  // Quantized skip connection on codes: z = clamp(round((x * x_scale + y * y_scale) / out_scale)) at out_bits.
  m.def(
      "quantized_add(Tensor x, float x_scale, Tensor y, float y_scale, float out_scale, int out_bits, "
      "bool out_signed) -> Tensor");
  // The QuantNAS supernet layer: y = sum_{o,i,j} probs[o,i,j] * conv_o(FQa_j(x), FQw_i(weights[o])) + bias,
  // computed as one (or a few) convolutions of all activation variants with merged weights.
  m.def(
      "mixed_quant_conv(Tensor x, Tensor[] weights, Tensor probs, int[] w_bits, int[] a_bits, Tensor w_scales, "
      "Tensor a_scales, bool a_signed, int[] groups, int[] dilations, int stride=1, Tensor? bias=None, "
      "str mode=\"quant\", SymInt seed=0) -> Tensor");
  // Every gradient of mixed_quant_conv: (grad_x, grad_weights, grad_probs, grad_w_scales, grad_a_scales,
  // grad_bias); output_mask says which are wanted (in that order), the others come back empty.
  m.def(
      "mixed_quant_conv_backward(Tensor grad, Tensor x, Tensor[] weights, Tensor probs, int[] w_bits, "
      "int[] a_bits, Tensor w_scales, Tensor a_scales, bool a_signed, int[] groups, int[] dilations, int stride, "
      "bool has_bias, str mode, SymInt seed, bool[6] output_mask) -> (Tensor, Tensor[], Tensor, Tensor, Tensor, Tensor)");
}

// The Python module qops._C: loading it registers the ops above; it also reports the build.
namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(qops::cpu::isa_name(qops::cpu::isa()));
}

PyObject* py_max_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(qops::cpu::isa_name(qops::cpu::max_isa()));
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  qops::cpu::Isa want;
  if (!qops::cpu::parse_isa(name, &want)) {
    PyErr_Format(PyExc_ValueError, "isa: unknown CPU ISA '%s' (expected DEFAULT, AVX2 or AVX512)", name);
    return nullptr;
  }
  if (!qops::cpu::set_isa(want)) {
    PyErr_Format(PyExc_ValueError, "isa: '%s' is not supported by this CPU or not compiled in (best: %s)", name,
                 qops::cpu::isa_name(qops::cpu::max_isa()));
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_cpu_features(PyObject*, PyObject*) {
  const auto& f = qops::cpu::cpu_features();
  return Py_BuildValue(
      "{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O}", "avx2", f.avx2 ? Py_True : Py_False, "fma",
      f.fma ? Py_True : Py_False, "f16c", f.f16c ? Py_True : Py_False, "bmi2", f.bmi2 ? Py_True : Py_False,
      "popcnt", f.popcnt ? Py_True : Py_False, "avx512f", f.avx512f ? Py_True : Py_False, "avx512bw",
      f.avx512bw ? Py_True : Py_False, "avx512vl", f.avx512vl ? Py_True : Py_False, "avx512dq",
      f.avx512dq ? Py_True : Py_False, "avx512vnni", f.avx512vnni ? Py_True : Py_False, "avx512vpopcntdq",
      f.avx512vpopcntdq ? Py_True : Py_False, "avxvnni", f.avxvnni ? Py_True : Py_False);
}

PyObject* py_built_with_cuda(PyObject*, PyObject*) {
#if defined(QOPS_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU ISA the kernels dispatch to now."},
    {"max_cpu_isa", py_max_cpu_isa, METH_NOARGS, "The best CPU ISA this CPU and build support."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Cap the CPU ISA used by the kernels (DEFAULT, AVX2, AVX512)."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "CPU features as detected at run time."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "qops kernels (torch.ops.qops)", -1, methods};
  return PyModule_Create(&module_def);
}
