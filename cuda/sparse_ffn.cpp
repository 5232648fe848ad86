// Python binding of the sparse FFN kernels (sparse_ffn_kernels.cu).
//
// Every entry point checks its tensors (device, dtype, layout, shapes) and raises a Python
// ValueError / TypeError naming the argument, then launches on the current stream. Outputs
// are passed in by the caller (hybrid_runtime/kernels.py allocates them), so nothing here
// reads device memory or synchronises: all calls can be captured in a CUDA graph.

#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <string>

namespace sparse_ffn {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kU8 = 3 };
enum Act : int { kSilu = 0, kRelu = 1, kFatRelu = 2, kRelu2 = 3, kDRelu = 4 };

cudaError_t launch_active_indices(int dtype, const void* scores, int64_t ld, int B, int f,
                                  float threshold, bool inclusive, bool magnitude, int* idx,
                                  int* count, uint8_t* flags, cudaStream_t stream);
cudaError_t launch_gate_up(int dtype, const void* x, int64_t ldx, const void* gate, const void* up,
                           const void* g, int64_t ldg, const int* idx, const int* count, int n_max,
                           float* a, int64_t lda, int B, int d, int f, int act, float threshold,
                           int num_sms, cudaStream_t stream);
cudaError_t launch_sparse_down(int dtype, int out_dtype, const float* a, int64_t lda, const void* down,
                               const int* idx, const int* count, int n_max, void* y, int64_t ldy,
                               int B, int d, int f, cudaStream_t stream);

namespace {

constexpr int64_t kIntMax = 2147483647;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return -1;
  }
}

// Shapes in messages as plain strings: an at::IntArrayRef streamed into a TORCH_CHECK message
// crashed the process (segfault) on the H100 machine instead of raising (2026-11-23).
std::string shape_str(at::IntArrayRef dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + (dims.size() == 1 ? ",)" : ")");
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, ": on ", t.device(), " but the other inputs are on ", device);
}

// (rows, cols) with unit column stride; any row stride (views of larger buffers are fine).
void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, ": expected 2 dims, got shape ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.size(0) == rows && t.size(1) == cols, name, ": expected shape (", rows, ", ", cols,
                    "), got ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name, ": last dim must be contiguous (stride 1), got strides ",
                    shape_str(t.strides()));
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) >= cols, name, ": rows overlap (strides ", shape_str(t.strides()), ")");
}

void check_weight(const at::Tensor& w, const char* name, at::ScalarType dtype, int64_t d) {
  TORCH_CHECK_VALUE(w.dim() == 2, name, ": expected (f, d) neuron-major weights, got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(1) == d, name, ": expected d = ", d, " columns, got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.is_contiguous(), name, ": must be contiguous (f, d) rows");
  TORCH_CHECK_TYPE(w.scalar_type() == dtype, name, ": dtype ", w.scalar_type(), " differs from x's ", dtype);
  TORCH_CHECK_VALUE(w.size(0) <= kIntMax && w.size(1) <= kIntMax, name, ": too large for int32 indexing");
}

void check_half(const at::Tensor& t, const char* name) {
  const int code = dtype_code(t);
  TORCH_CHECK_TYPE(code == kF16 || code == kBF16, name, ": CUDA sparse FFN kernels take float16 or bfloat16, got ",
                   t.scalar_type());
}

// idx (capacity n_max,) int32 and count (1,) int32: the device-side index list.
int check_index_list(const at::Tensor& idx, const at::Tensor& count, const at::Device& device) {
  check_cuda(idx, "idx", device);
  check_cuda(count, "count", device);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, "idx: expected int32, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.is_contiguous(), "idx: expected a contiguous 1-D tensor, got shape ",
                    shape_str(idx.sizes()));
  TORCH_CHECK_VALUE(idx.numel() <= kIntMax, "idx: too long");
  TORCH_CHECK_TYPE(count.scalar_type() == at::kInt, "count: expected int32, got ", count.scalar_type());
  TORCH_CHECK_VALUE(count.numel() == 1, "count: expected 1 element, got shape ", shape_str(count.sizes()));
  return static_cast<int>(idx.numel());
}

int act_code(const std::string& act, double threshold) {
  int code = -1;
  if (act == "silu") code = kSilu;
  else if (act == "relu") code = kRelu;
  else if (act == "fatrelu") code = kFatRelu;
  else if (act == "relu2") code = kRelu2;
  else if (act == "drelu") code = kDRelu;
  else TORCH_CHECK_VALUE(false, "act: expected one of silu, relu, fatrelu, relu2, drelu; got '", act, "'");
  TORCH_CHECK_VALUE(code != kFatRelu || threshold > 0.0, "threshold: fatrelu needs threshold > 0, got ", threshold);
  return code;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Multiprocessor count of the current device (host-side attribute query, cached per device).
int num_sms() {
  static int cached[64] = {0};
  int dev = 0;
  check_launch(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    cached[dev] = n > 0 ? n : 1;
  }
  return cached[dev];
}

}  // namespace

// scores (B, f) -> idx[:count] = ascending neurons whose score passes in any row.
void active_indices(const at::Tensor& scores, double threshold, bool inclusive, bool magnitude,
                    const at::Tensor& idx, const at::Tensor& count) {
  TORCH_CHECK_VALUE(scores.is_cuda(), "scores: expected a CUDA tensor, got one on ", scores.device());
  const at::Device device = scores.device();
  TORCH_CHECK_TYPE(dtype_code(scores) >= 0, "scores: expected float32, float16 or bfloat16, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores: expected (B, f), got shape ", shape_str(scores.sizes()));
  const int64_t B = scores.size(0), f = scores.size(1);
  TORCH_CHECK_VALUE(B <= kIntMax && f <= kIntMax, "scores: too large for int32 indexing");
  check_rows(scores, "scores", B, f);
  const int n_max = check_index_list(idx, count, device);
  TORCH_CHECK_VALUE(n_max >= f, "idx: capacity ", n_max, " is smaller than f = ", f);
  c10::cuda::CUDAGuard guard(device);
  at::Tensor flags;
  if (B > 2) flags = at::empty({f}, scores.options().dtype(at::kByte));
  check_launch(launch_active_indices(dtype_code(scores), scores.data_ptr(), scores.stride(0), static_cast<int>(B),
                                     static_cast<int>(f), static_cast<float>(threshold), inclusive, magnitude,
                                     idx.data_ptr<int>(), count.data_ptr<int>(),
                                     B > 2 ? flags.data_ptr<uint8_t>() : nullptr,
                                     c10::cuda::getCurrentCUDAStream()),
               "active_indices");
}

namespace {

// Shared by the three gate+up entry points. gate or g (one of them) and idx/count (or neither).
void gate_up_common(const at::Tensor& x, const at::Tensor* gate, const at::Tensor& up, const at::Tensor* g,
                    const at::Tensor* idx, const at::Tensor* count, const at::Tensor& a, const std::string& act,
                    double threshold, const char* what) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got one on ", x.device());
  const at::Device device = x.device();
  check_half(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected (B, d), got shape ", shape_str(x.sizes()));
  const int64_t B = x.size(0), d = x.size(1);
  check_rows(x, "x", B, d);
  check_cuda(up, "up", device);
  check_weight(up, "up", x.scalar_type(), d);
  const int64_t f = up.size(0);
  if (gate != nullptr) {
    check_cuda(*gate, "gate", device);
    check_weight(*gate, "gate", x.scalar_type(), d);
    TORCH_CHECK_VALUE(gate->size(0) == f, "gate: ", gate->size(0), " rows but up has ", f);
  }
  if (g != nullptr) {
    check_cuda(*g, "g", device);
    TORCH_CHECK_TYPE(g->scalar_type() == x.scalar_type(), "g: dtype ", g->scalar_type(), " differs from x's ",
                     x.scalar_type());
    check_rows(*g, "g", B, f);
  }
  int n_max = 0;
  if (idx != nullptr) n_max = check_index_list(*idx, *count, device);
  check_cuda(a, "out", device);
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "out: activations are float32, got ", a.scalar_type());
  check_rows(a, "out", B, f);
  TORCH_CHECK_VALUE(B <= kIntMax, "x: batch too large");
  const int act_id = act_code(act, threshold);
  c10::cuda::CUDAGuard guard(device);
  check_launch(launch_gate_up(dtype_code(x), x.data_ptr(), x.stride(0), gate ? gate->data_ptr() : nullptr,
                              up.data_ptr(), g ? g->data_ptr() : nullptr, g ? g->stride(0) : 0,
                              idx ? idx->data_ptr<int>() : nullptr, count ? count->data_ptr<int>() : nullptr, n_max,
                              a.data_ptr<float>(), a.stride(0), static_cast<int>(B), static_cast<int>(d),
                              static_cast<int>(f), act_id, static_cast<float>(threshold), num_sms(),
                              c10::cuda::getCurrentCUDAStream()),
               what);
}

}  // namespace

void sparse_gate_up(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& idx,
                    const at::Tensor& count, const at::Tensor& out, const std::string& act, double threshold) {
  gate_up_common(x, &gate, up, nullptr, &idx, &count, out, act, threshold, "sparse_gate_up");
}

void sparse_up_given_gate(const at::Tensor& x, const at::Tensor& g, const at::Tensor& up, const at::Tensor& idx,
                          const at::Tensor& count, const at::Tensor& out, const std::string& act, double threshold) {
  gate_up_common(x, nullptr, up, &g, &idx, &count, out, act, threshold, "sparse_up_given_gate");
}

void dense_gate_sparse_up(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out,
                          const std::string& act, double threshold) {
  gate_up_common(x, &gate, up, nullptr, nullptr, nullptr, out, act, threshold, "dense_gate_sparse_up");
}

void sparse_down(const at::Tensor& a, const at::Tensor& down, const at::Tensor& idx, const at::Tensor& count,
                 const at::Tensor& out) {
  TORCH_CHECK_VALUE(a.is_cuda(), "a: expected a CUDA tensor, got one on ", a.device());
  const at::Device device = a.device();
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "a: activations are float32, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 2, "a: expected (B, f), got shape ", shape_str(a.sizes()));
  const int64_t B = a.size(0), f = a.size(1);
  check_rows(a, "a", B, f);
  check_cuda(down, "down", device);
  check_half(down, "down");
  TORCH_CHECK_VALUE(down.dim() == 2 && down.size(0) == f, "down: expected (f, d) with f = ", f,
                    " neuron-major rows (HF down_proj transposed), got shape ", shape_str(down.sizes()));
  const int64_t d = down.size(1);
  check_weight(down, "down", down.scalar_type(), d);
  const int n_max = check_index_list(idx, count, device);
  check_cuda(out, "out", device);
  TORCH_CHECK_TYPE(out.scalar_type() == down.scalar_type() || out.scalar_type() == at::kFloat,
                   "out: expected ", down.scalar_type(), " or float32, got ", out.scalar_type());
  check_rows(out, "out", B, d);
  TORCH_CHECK_VALUE(B <= kIntMax, "a: batch too large");
  c10::cuda::CUDAGuard guard(device);
  check_launch(launch_sparse_down(dtype_code(down), dtype_code(out), a.data_ptr<float>(), a.stride(0),
                                  down.data_ptr(), idx.data_ptr<int>(), count.data_ptr<int>(), n_max, out.data_ptr(),
                                  out.stride(0), static_cast<int>(B), static_cast<int>(d), static_cast<int>(f),
                                  c10::cuda::getCurrentCUDAStream()),
               "sparse_down");
}

}  // namespace sparse_ffn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels for the activation-sparse FFN (see hybrid_runtime/kernels.py for the API).";
  m.def("active_indices", &sparse_ffn::active_indices, "scores (B, f) -> idx[:count] ascending, on the device",
        py::arg("scores"), py::arg("threshold"), py::arg("inclusive"), py::arg("magnitude"), py::arg("idx"),
        py::arg("count"));
  m.def("sparse_gate_up", &sparse_ffn::sparse_gate_up, "out[:, idx[:count]] = act(x gate^T) * (x up^T)",
        py::arg("x"), py::arg("gate"), py::arg("up"), py::arg("idx"), py::arg("count"), py::arg("out"),
        py::arg("act"), py::arg("threshold"));
  m.def("sparse_up_given_gate", &sparse_ffn::sparse_up_given_gate,
        "out[:, idx[:count]] = act(g) * (x up^T) with the gate pre-activations g given", py::arg("x"), py::arg("g"),
        py::arg("up"), py::arg("idx"), py::arg("count"), py::arg("out"), py::arg("act"), py::arg("threshold"));
  m.def("dense_gate_sparse_up", &sparse_ffn::dense_gate_sparse_up,
        "out = act(x gate^T) * (x up^T), up rows read only for active neurons", py::arg("x"), py::arg("gate"),
        py::arg("up"), py::arg("out"), py::arg("act"), py::arg("threshold"));
  m.def("sparse_down", &sparse_ffn::sparse_down, "out = sum_j a[:, idx[j]] * down[idx[j], :] over j < count",
        py::arg("a"), py::arg("down"), py::arg("idx"), py::arg("count"), py::arg("out"));
}
