// Torch glue for the CUDA batch-norm + activation passes (bn_act_kernels.cu): checks, device guard,
// current stream, dtype dispatch. Parameters (mean, invstd, gamma, beta) travel as float32 whatever the
// data's dtype, so half/bf16 data are normalised with float statistics.
#include "pnnh_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bn_act_kernels.h"

namespace pnnh {
namespace cuda {
namespace {

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be viewed as [outer, channels, inner], got ", t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 on CUDA, got ", dtype);
}

at::Tensor param(const at::Tensor& p, int64_t n, const at::Tensor& like, const char* name) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == n, name, " must be a vector of ", n, " channels");
  TORCH_CHECK(p.device() == like.device(), name, " must be on the data's device");
  return p.to(at::kFloat).contiguous();
}

MapDims dims_of(const at::Tensor& t, int64_t c0, int64_t cn) {
  return {t.size(0), t.size(1), t.size(2), c0, cn};
}

ActParams act_of(bool use_act, double slope, double scale) {
  return {use_act, float(slope), float(scale)};
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Calls fn with the kernel's element type for t's dtype (at::Half -> __half, at::BFloat16 -> __nv_bfloat16).
template <typename Fn>
void dispatch(const at::Tensor& t, Fn&& fn) {
  switch (t.scalar_type()) {
    case at::kFloat:
      fn(static_cast<float*>(nullptr));
      break;
    case at::kHalf:
      fn(static_cast<__half*>(nullptr));
      break;
    case at::kBFloat16:
      fn(static_cast<__nv_bfloat16*>(nullptr));
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mut_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace

at::Tensor channel_sums_torch(const at::Tensor& z, int64_t c0, int64_t cn) {
  check_map(z, "z");
  TORCH_CHECK(c0 >= 0 && cn >= 0 && c0 + cn <= z.size(1), "channel range out of bounds");
  const c10::cuda::CUDAGuard guard(z.device());
  const MapDims dims = dims_of(z, c0, cn);
  auto out = at::empty({channel_sums_splits(dims), 2, cn}, z.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(channel_sums<T>(ptr<T>(z), dims, out.data_ptr<double>(), stream), "channel_sums");
  });
  return out;
}

void bn_finalize_torch(const at::Tensor& sums, double count, double eps, const at::Tensor& stats, int64_t c0) {
  TORCH_CHECK(sums.is_cuda() && (sums.dim() == 2 || sums.dim() == 3) && sums.size(-2) == 2 && sums.is_contiguous(),
              "sums must be a contiguous [2, channels] or [splits, 2, channels] CUDA tensor");
  TORCH_CHECK(sums.scalar_type() == at::kDouble || sums.scalar_type() == at::kFloat, "sums must be float64 or float32");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.is_contiguous() && stats.scalar_type() == at::kFloat &&
                  stats.device() == sums.device(),
              "stats must be a contiguous [3, total] float32 tensor on the sums' device");
  const int64_t splits = sums.dim() == 3 ? sums.size(0) : 1, cn = sums.size(-1), total = stats.size(1);
  TORCH_CHECK(c0 >= 0 && c0 + cn <= total, "channel range out of bounds");
  TORCH_CHECK(count > 0, "finalising statistics over no values");
  const c10::cuda::CUDAGuard guard(sums.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  float* out = stats.data_ptr<float>();
  if (sums.scalar_type() == at::kDouble) {
    check(bn_finalize<double>(sums.data_ptr<double>(), splits, cn, count, eps, out, total, c0, stream), "bn_finalize");
  } else {
    check(bn_finalize<float>(sums.data_ptr<float>(), splits, cn, count, eps, out, total, c0, stream), "bn_finalize");
  }
}

void bn_act_apply_torch(const at::Tensor& z, int64_t c0, const at::Tensor& out, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta, bool use_act,
                        double slope, double scale) {
  check_map(z, "z");
  check_map(out, "out");
  const int64_t cn = out.size(1);
  TORCH_CHECK(out.scalar_type() == z.scalar_type(), "out must have z's dtype");
  TORCH_CHECK(out.size(0) == z.size(0) && out.size(2) == z.size(2) && c0 >= 0 && c0 + cn <= z.size(1),
              "shape mismatch");
  const c10::cuda::CUDAGuard guard(z.device());
  auto m = param(mean, cn, z, "mean"), is = param(invstd, cn, z, "invstd");
  auto g = param(gamma, cn, z, "gamma"), b = param(beta, cn, z, "beta");
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(bn_act_apply<T>(ptr<T>(z), dims_of(z, c0, cn), mut_ptr<T>(out), m.data_ptr<float>(), is.data_ptr<float>(),
                          g.data_ptr<float>(), b.data_ptr<float>(), act_of(use_act, slope, scale), stream),
          "bn_act_apply");
  });
}

at::Tensor bn_act_backward_sums_torch(const at::Tensor& dy, const at::Tensor& x, int64_t c0, const at::Tensor& mean,
                                      const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& beta,
                                      bool use_act, double slope, double scale) {
  check_map(dy, "dy");
  check_map(x, "x");
  const int64_t cn = dy.size(1);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "dy must have x's dtype");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && c0 >= 0 && c0 + cn <= x.size(1),
              "shape mismatch");
  const c10::cuda::CUDAGuard guard(x.device());
  auto m = param(mean, cn, x, "mean"), is = param(invstd, cn, x, "invstd");
  auto g = param(gamma, cn, x, "gamma"), b = param(beta, cn, x, "beta");
  auto out = at::empty({2, cn}, x.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(bn_act_backward_sums<T>(ptr<T>(dy), ptr<T>(x), dims_of(x, c0, cn), m.data_ptr<float>(), is.data_ptr<float>(),
                                  g.data_ptr<float>(), b.data_ptr<float>(), act_of(use_act, slope, scale),
                                  out.data_ptr<double>(), stream),
          "bn_act_backward_sums");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_act_backward_apply_torch(const at::Tensor& dy, const at::Tensor& x, int64_t c0,
                                                               const at::Tensor& dx, const at::Tensor& mean,
                                                               const at::Tensor& invstd, const at::Tensor& gamma,
                                                               const at::Tensor& beta, const at::Tensor& sums,
                                                               bool training, bool use_act, double slope,
                                                               double scale) {
  check_map(dy, "dy");
  check_map(x, "x");
  check_map(dx, "dx");
  const int64_t cn = dy.size(1);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dx.scalar_type() == x.scalar_type(),
              "dy and dx must have x's dtype");
  TORCH_CHECK(dx.sizes() == x.sizes(), "dx must have x's shape");
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(2) == x.size(2) && c0 >= 0 && c0 + cn <= x.size(1),
              "shape mismatch");
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == 2 && sums.size(1) == cn && sums.scalar_type() == at::kDouble &&
                  sums.is_contiguous() && sums.device() == x.device(),
              "sums must be [2, cn] float64 on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto m = param(mean, cn, x, "mean"), is = param(invstd, cn, x, "invstd");
  auto g = param(gamma, cn, x, "gamma"), b = param(beta, cn, x, "beta");
  auto dgamma = at::empty({cn}, x.options().dtype(at::kFloat)), dbeta = at::empty({cn}, x.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(bn_act_backward_apply<T>(ptr<T>(dy), ptr<T>(x), mut_ptr<T>(dx), dims_of(x, c0, cn), m.data_ptr<float>(),
                                   is.data_ptr<float>(), g.data_ptr<float>(), b.data_ptr<float>(),
                                   sums.data_ptr<double>(), training, act_of(use_act, slope, scale),
                                   dgamma.data_ptr<float>(), dbeta.data_ptr<float>(), stream),
          "bn_act_backward_apply");
  });
  return {dgamma, dbeta};
}

void bn_input_grad_torch(const at::Tensor& d_act, const at::Tensor& z, int64_t c0, const at::Tensor& dz,
                         const at::Tensor& coef_dy, const at::Tensor& coef_z, const at::Tensor& bias) {
  check_map(d_act, "d_act");
  check_map(z, "z");
  check_map(dz, "dz");
  const int64_t cn = d_act.size(1);
  TORCH_CHECK(d_act.scalar_type() == z.scalar_type() && dz.scalar_type() == z.scalar_type(),
              "d_act and dz must have z's dtype");
  TORCH_CHECK(dz.sizes() == d_act.sizes() && d_act.size(0) == z.size(0) && d_act.size(2) == z.size(2) && c0 >= 0 &&
                  c0 + cn <= z.size(1),
              "shape mismatch");
  const c10::cuda::CUDAGuard guard(z.device());
  auto a = param(coef_dy, cn, z, "coef_dy"), b = param(coef_z, cn, z, "coef_z"), e = param(bias, cn, z, "bias");
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(bn_input_grad<T>(ptr<T>(d_act), ptr<T>(z), mut_ptr<T>(dz), dims_of(z, c0, cn), a.data_ptr<float>(),
                           b.data_ptr<float>(), e.data_ptr<float>(), stream),
          "bn_input_grad");
  });
}

}  // namespace cuda
}  // namespace pnnh
