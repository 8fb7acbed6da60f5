// cuDNN's fused convolution graphs through the cudnn-frontend graph API (header-only; PyPI
// nvidia-cudnn-frontend ships the headers, torch has loaded libcudnn, which the frontend opens at run time).
//
// One graph: y = conv(act(x * scale + bias), w) with the per-channel sum and sum of squares of y from its
// epilogue (genstats), the pattern of a PNNH block's layer 2 (layer 1's batch-norm apply + activation in the
// prologue, the output's batch-norm statistics in the epilogue); without the prologue it is layer 1's
// conv + statistics. Data NHWC (channels_last) in half or bfloat16, scale / bias / statistics float32.
// The backward graph is cuDNN's documented ResNet training pattern: dgrad -> dReLU (against the recomputed
// BN-apply of the layer's pre-norm input) -> BN backward weight, which gives the BN output's gradient, the
// BN parameters' gradients and the coefficients of the pre-norm input's gradient.
// Graphs are built once per shape, dtype, option and device and cached; cuDNN's check_support() decides at
// run time whether an engine exists, and the reason it gives is what Python's fallback reports.
#ifdef PNNH_WITH_CUDNN_FRONTEND

#include "cudnn_fused.h"

#include <c10/cuda/CUDAFunctions.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGuard.h>
#include <cudnn_frontend.h>

#include <dlfcn.h>

#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>

namespace fe = cudnn_frontend;

// NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING: the frontend resolves cuDNN's symbols through this handle, which
// the embedding program owns; it is the libcudnn torch has already loaded (cudnn_library() below).
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace pnnh {
namespace cudnn_fused {
namespace {

using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

struct FusedConvGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  TensorAttr x, w, scale, bias, y, sum, sq_sum;
  int64_t workspace = 0;
  std::string unsupported;  // empty when cuDNN built a plan
};

// dgrad -> dReLU -> BN backward weight (declare_dgrad)
struct DgradBnGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  TensorAttr dy, w, x, mean, inv_std, scale, bias, d_act, dscale, dbias, eq_scale_dy, eq_scale_x, eq_bias;
  int64_t workspace = 0;
  std::string unsupported;
};

fe::DataType_t frontend_type(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return fe::DataType_t::HALF;
    case at::kBFloat16:
      return fe::DataType_t::BFLOAT16;
    case at::kFloat:
      return fe::DataType_t::FLOAT;
    default:
      TORCH_CHECK(false, "pnnh cudnn fused conv: unsupported dtype ", type);
  }
}

// strides of an NHWC tensor given in NCHW order, as cuDNN's graph API takes dimensions
std::vector<int64_t> channels_last_strides(int64_t c, int64_t h, int64_t w) { return {c * h * w, 1, c * w, c}; }

TensorAttr add_tensor(fe::graph::Graph& graph, const char* name, std::vector<int64_t> dim,
                      std::vector<int64_t> stride, fe::DataType_t type) {
  return graph.tensor(
      fe::graph::Tensor_attributes().set_name(name).set_dim(dim).set_stride(stride).set_data_type(type));
}

TensorAttr per_channel(fe::graph::Graph& graph, const char* name, int64_t c) {
  return add_tensor(graph, name, {1, c, 1, 1}, {c, 1, c, c}, fe::DataType_t::FLOAT);
}

fe::graph::Pointwise_attributes pointwise_mode(fe::PointwiseMode_t m, double slope = 0.0) {
  auto attributes = fe::graph::Pointwise_attributes().set_mode(m).set_compute_data_type(fe::DataType_t::FLOAT);
  if (slope != 0.0) attributes.set_relu_lower_clip_slope(static_cast<float>(slope));
  return attributes;
}

TensorAttr add_prologue(fe::graph::Graph& graph, FusedConvGraph& g, int64_t c, double slope) {
  g.scale = per_channel(graph, "scale", c);
  g.bias = per_channel(graph, "bias", c);
  auto scaled = graph.pointwise(g.x, g.scale, pointwise_mode(fe::PointwiseMode_t::MUL));
  auto shifted = graph.pointwise(scaled, g.bias, pointwise_mode(fe::PointwiseMode_t::ADD));
  return graph.pointwise(shifted, pointwise_mode(fe::PointwiseMode_t::RELU_FWD, slope));
}

// A new graph in ``slot``: data in ``io``, intermediates and arithmetic in float32.
fe::graph::Graph& new_graph(std::shared_ptr<fe::graph::Graph>& slot, fe::DataType_t io) {
  slot = std::make_shared<fe::graph::Graph>();
  slot->set_io_data_type(io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  return *slot;
}

std::string failure(const char* step, fe::error_t status) {
  std::ostringstream out;
  out << step << ": " << status.get_message();
  return out.str();
}

// The graph's tensors and operations: [prologue ->] conv_fprop -> genstats.
void declare(const Spec& s, FusedConvGraph& g) {
  const auto io = frontend_type(s.dtype);
  auto& graph = new_graph(g.graph, io);
  g.x = add_tensor(graph, "x", {s.n, s.c, s.h, s.w}, channels_last_strides(s.c, s.h, s.w), io);
  g.w = add_tensor(graph, "w", {s.k, s.c, s.r, s.r}, channels_last_strides(s.c, s.r, s.r), io);
  TensorAttr input = s.prologue ? add_prologue(graph, g, s.c, s.slope) : g.x;
  g.y = graph.conv_fprop(input, g.w,
                         fe::graph::Conv_fprop_attributes()
                             .set_padding({s.pad, s.pad})
                             .set_stride({1, 1})
                             .set_dilation({1, 1})
                             .set_compute_data_type(fe::DataType_t::FLOAT));
  g.y->set_output(true).set_data_type(io);
  auto stats = graph.genstats(g.y, fe::graph::Genstats_attributes().set_compute_data_type(fe::DataType_t::FLOAT));
  g.sum = stats[0];
  g.sq_sum = stats[1];
  g.sum->set_output(true).set_data_type(fe::DataType_t::FLOAT);
  g.sq_sum->set_output(true).set_data_type(fe::DataType_t::FLOAT);
}

// The backward of [BN-apply + act ->] conv, from the conv's output gradient dy [n, k, h, w], its weight and
// the BN's pre-norm input x [n, c, h, w]: d_act = dgrad(dy, w) * act'(BN(x)), then BN backward weight.
void declare_dgrad(const Spec& s, DgradBnGraph& g) {
  const auto io = frontend_type(s.dtype);
  auto& graph = new_graph(g.graph, io);
  g.dy = add_tensor(graph, "dy", {s.n, s.k, s.h, s.w}, channels_last_strides(s.k, s.h, s.w), io);
  g.w = add_tensor(graph, "w", {s.k, s.c, s.r, s.r}, channels_last_strides(s.c, s.r, s.r), io);
  auto dgrad = graph.conv_dgrad(g.dy, g.w,
                                fe::graph::Conv_dgrad_attributes()
                                    .set_padding({s.pad, s.pad})
                                    .set_stride({1, 1})
                                    .set_dilation({1, 1})
                                    .set_compute_data_type(fe::DataType_t::FLOAT));
  dgrad->set_dim({s.n, s.c, s.h, s.w});
  g.x = add_tensor(graph, "x", {s.n, s.c, s.h, s.w}, channels_last_strides(s.c, s.h, s.w), io);
  g.mean = per_channel(graph, "mean", s.c);
  g.inv_std = per_channel(graph, "inv_std", s.c);
  g.scale = per_channel(graph, "scale", s.c);
  g.bias = per_channel(graph, "bias", s.c);
  auto centred = graph.pointwise(g.x, g.mean, pointwise_mode(fe::PointwiseMode_t::SUB));
  auto normalised = graph.pointwise(centred, g.inv_std, pointwise_mode(fe::PointwiseMode_t::MUL));
  auto scaled = graph.pointwise(normalised, g.scale, pointwise_mode(fe::PointwiseMode_t::MUL));
  auto bn = graph.pointwise(scaled, g.bias, pointwise_mode(fe::PointwiseMode_t::ADD));
  g.d_act = graph.pointwise(dgrad, bn, pointwise_mode(fe::PointwiseMode_t::RELU_BWD, s.slope));
  g.d_act->set_output(true).set_data_type(io);
  auto [dscale, dbias, eq_scale_dy, eq_scale_x, eq_bias] =
      graph.dbn_weight(g.d_act, g.x, g.mean, g.inv_std, g.scale, fe::graph::DBN_weight_attributes());
  g.dscale = dscale;
  g.dbias = dbias;
  g.eq_scale_dy = eq_scale_dy;
  g.eq_scale_x = eq_scale_x;
  g.eq_bias = eq_bias;
  for (const auto& t : {g.dscale, g.dbias, g.eq_scale_dy, g.eq_scale_x, g.eq_bias}) {
    t->set_output(true).set_data_type(fe::DataType_t::FLOAT);
  }
}

// Lowers a graph to an execution plan; the first step that fails names why cuDNN cannot run it.
std::string plan(fe::graph::Graph& graph, int64_t& workspace, cudnnHandle_t handle) {
  fe::error_t status = graph.validate();
  if (status.is_bad()) return failure("validate", status);
  status = graph.build_operation_graph(handle);
  if (status.is_bad()) return failure("build_operation_graph", status);
  status = graph.create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK});
  if (status.is_bad()) return failure("create_execution_plans", status);
  status = graph.check_support();
  if (status.is_bad()) return failure("check_support", status);
  status = graph.build_plans();
  if (status.is_bad()) return failure("build_plans", status);
  status = graph.get_workspace_size(workspace);
  if (status.is_bad()) return failure("get_workspace_size", status);
  return "";
}

// The libcudnn torch loaded (RTLD_NOLOAD finds it by soname), else one on the library path.
bool cudnn_library() {
  if (fe::cudnn_dlhandle == nullptr) fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
  if (fe::cudnn_dlhandle == nullptr) fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW);
  return fe::cudnn_dlhandle != nullptr;
}

std::string key_of(const Spec& s, int device) {
  std::ostringstream key;
  key << device << '/' << static_cast<int>(s.dtype) << '/' << s.n << 'x' << s.c << 'x' << s.h << 'x' << s.w << '/'
      << s.k << 'x' << s.r << '/' << s.pad << '/' << s.prologue << '/' << s.slope;
  return key.str();
}

// The graph G of this spec on the current device, built (declare, then plan) on first use.
template <typename G>
std::shared_ptr<G> cached(const Spec& s, void (*declare_graph)(const Spec&, G&)) {
  TORCH_CHECK(s.dtype == at::kHalf || s.dtype == at::kBFloat16, "pnnh cudnn fused conv: half or bfloat16 data only");
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<G>> graphs;
  const std::string key = key_of(s, c10::cuda::current_device());
  std::lock_guard<std::mutex> lock(mutex);
  auto found = graphs.find(key);
  if (found != graphs.end()) return found->second;
  auto g = std::make_shared<G>();
  if (cudnn_library()) {
    declare_graph(s, *g);
    g->unsupported = plan(*g->graph, g->workspace, at::native::getCudnnHandle());
  } else {
    g->unsupported = "libcudnn.so.9 could not be opened";
  }
  graphs.emplace(key, g);
  return g;
}

void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4, "pnnh cudnn fused conv: ", name, " must be a 4-D CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "pnnh cudnn fused conv: ", name, " must be ", dtype);
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "pnnh cudnn fused conv: ", name,
              " must be channels_last");
}

at::Tensor float_vector(const at::Tensor& t, int64_t c, const char* name) {
  auto out = t.to(at::kFloat).contiguous();
  TORCH_CHECK(out.numel() == c, "pnnh cudnn fused conv: ", name, " needs one value per channel");
  return out;
}

}  // namespace

std::string support(const Spec& spec) { return cached(spec, declare)->unsupported; }

std::string dgrad_support(const Spec& spec) { return cached(spec, declare_dgrad)->unsupported; }

std::vector<at::Tensor> conv_genstats(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                                      const at::Tensor& bias, bool prologue, double slope, int64_t pad) {
  check_operand(x, "x", x.scalar_type());
  check_operand(w, "w", x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  const Spec spec{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), pad,
                  prologue,  slope,     x.scalar_type()};
  TORCH_CHECK(w.size(1) == spec.c && w.size(2) == w.size(3), "pnnh cudnn fused conv: w must be [K, C, R, R]");
  auto g = cached(spec, declare);
  TORCH_CHECK(g->unsupported.empty(), "pnnh cudnn fused conv: cuDNN cannot run this graph (", g->unsupported, ")");

  const int64_t ho = spec.h + 2 * pad - spec.r + 1, wo = spec.w + 2 * pad - spec.r + 1;
  auto y = at::empty({spec.n, spec.k, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto stats_options = x.options().dtype(at::kFloat);
  auto sum = at::empty({1, spec.k, 1, 1}, stats_options);
  auto sq_sum = at::empty({1, spec.k, 1, 1}, stats_options);
  auto workspace = at::empty({std::max<int64_t>(g->workspace, 1)}, x.options().dtype(at::kByte));

  std::unordered_map<TensorAttr, void*> pack{{g->x, x.data_ptr()},     {g->w, w.data_ptr()},
                                             {g->y, y.data_ptr()},     {g->sum, sum.data_ptr()},
                                             {g->sq_sum, sq_sum.data_ptr()}};
  at::Tensor scale_f, bias_f;  // kept alive until execute returns
  if (prologue) {
    scale_f = float_vector(scale, spec.c, "scale");
    bias_f = float_vector(bias, spec.c, "bias");
    pack.emplace(g->scale, scale_f.data_ptr());
    pack.emplace(g->bias, bias_f.data_ptr());
  }
  auto status = g->graph->execute(at::native::getCudnnHandle(), pack, workspace.data_ptr());
  TORCH_CHECK(status.is_good(), "pnnh cudnn fused conv: execute failed: ", status.get_message());
  return {y, sum.view({spec.k}), sq_sum.view({spec.k})};
}

std::vector<at::Tensor> dgrad_drelu_dbn(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& inv_std, const at::Tensor& scale,
                                        const at::Tensor& bias, double slope, int64_t pad) {
  check_operand(dy, "dy", dy.scalar_type());
  check_operand(w, "w", dy.scalar_type());
  check_operand(x, "x", dy.scalar_type());
  c10::cuda::CUDAGuard guard(dy.device());
  const Spec spec{x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(2), pad, true, slope, dy.scalar_type()};
  TORCH_CHECK(w.size(1) == spec.c && w.size(2) == w.size(3), "pnnh cudnn fused dgrad: w must be [K, C, R, R]");
  TORCH_CHECK(dy.size(0) == spec.n && dy.size(1) == spec.k && dy.size(2) == spec.h && dy.size(3) == spec.w,
              "pnnh cudnn fused dgrad: dy must be [N, K, H, W] of x's N, H, W and w's K ('same' padding)");
  auto g = cached(spec, declare_dgrad);
  TORCH_CHECK(g->unsupported.empty(), "pnnh cudnn fused dgrad: cuDNN cannot run this graph (", g->unsupported, ")");

  auto d_act = at::empty({spec.n, spec.c, spec.h, spec.w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto vector = [&] { return at::empty({1, spec.c, 1, 1}, x.options().dtype(at::kFloat)); };
  auto dscale = vector(), dbias = vector(), eq_scale_dy = vector(), eq_scale_x = vector(), eq_bias = vector();
  auto mean_f = float_vector(mean, spec.c, "mean"), inv_std_f = float_vector(inv_std, spec.c, "inv_std");
  auto scale_f = float_vector(scale, spec.c, "scale"), bias_f = float_vector(bias, spec.c, "bias");
  auto workspace = at::empty({std::max<int64_t>(g->workspace, 1)}, x.options().dtype(at::kByte));
  std::unordered_map<TensorAttr, void*> pack{
      {g->dy, dy.data_ptr()},           {g->w, w.data_ptr()},
      {g->x, x.data_ptr()},             {g->mean, mean_f.data_ptr()},
      {g->inv_std, inv_std_f.data_ptr()}, {g->scale, scale_f.data_ptr()},
      {g->bias, bias_f.data_ptr()},     {g->d_act, d_act.data_ptr()},
      {g->dscale, dscale.data_ptr()},   {g->dbias, dbias.data_ptr()},
      {g->eq_scale_dy, eq_scale_dy.data_ptr()}, {g->eq_scale_x, eq_scale_x.data_ptr()},
      {g->eq_bias, eq_bias.data_ptr()}};
  auto status = g->graph->execute(at::native::getCudnnHandle(), pack, workspace.data_ptr());
  TORCH_CHECK(status.is_good(), "pnnh cudnn fused dgrad: execute failed: ", status.get_message());
  const std::vector<int64_t> flat{spec.c};
  return {d_act, dscale.view(flat), dbias.view(flat), eq_scale_dy.view(flat), eq_scale_x.view(flat), eq_bias.view(flat)};
}

}  // namespace cudnn_fused
}  // namespace pnnh

#endif  // PNNH_WITH_CUDNN_FRONTEND
