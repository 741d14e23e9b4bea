// inferops._C: the only pybind11 module.
//
// Tensors cross as DLPack capsules (torch.utils.dlpack.to_dlpack), the CUDA
// stream as an integer handle. Capsules are *borrowed*: this module never
// renames or frees them, so the producer's capsule destructor still owns the
// memory and a capsule may be passed to several calls. Keeping libtorch out
// of the module means one wheel serves every torch version.
//
// C++ exceptions become Python exceptions:
//   inferops::TypeError -> TypeError, inferops::ValueError -> ValueError,
//   inferops::Error and other std::exception -> RuntimeError.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attention/merge_states.h"
#include "attention/paged_kv.h"
#include "attention/prefix_plan.h"
#include "linear_attention/linear_attention.h"
#include "moe/moe.h"
#include "quant/quant_w4a16.h"
#include "tp/tp.h"
#include "quant/quant.h"
#include "common/check.h"
#include "common/tensor_view.h"

#ifdef INFEROPS_WITH_CUDA
#include <cuda_runtime.h>

#include "common/launch.h"
#endif

// inferops._C (nvcc build) or inferops._simt (the CPU SIMT executor build, csrc/simt/):
// the same bindings, launchers and kernel sources.
#ifndef INFEROPS_MODULE_NAME
#define INFEROPS_MODULE_NAME _C
#endif
#ifndef INFEROPS_VERSION
#define INFEROPS_VERSION "0.0.0"
#endif
#ifndef INFEROPS_CUDA_ARCHS
#define INFEROPS_CUDA_ARCHS ""
#endif

#ifdef INFEROPS_SIMT_RACECHECK
#include "simt/metrics.h"
#endif

#ifdef INFEROPS_SIMT
// The executor's own checks (csrc/simt/selftest.cpp).
namespace inferops::simt_selftest {
std::vector<std::string> names();
std::vector<float> run(const std::string& name, const std::vector<float>& input);
}  // namespace inferops::simt_selftest
#endif

namespace py = pybind11;
using inferops::TensorView;

namespace {

// Ops with a compiled CUDA kernel in this build. Keep in step with
// python/inferops/<family>/ (tests check every registered op is listed here
// in a CUDA build).
const std::vector<std::string> kCudaOps = {
#ifdef INFEROPS_WITH_CUDA
    "merge_states",
    "append_kv",
    "paged_decode",
    "prefix_shared_decode",
    "simplified_linear_attention",
    "causal_linear_attention",
    "linear_attention_step",
    "routing_layout",
    "permute",
    "unpermute",
    "w4a16_matmul",
    "int4_dequantize",
    "gemm_reduce_scatter",
    "w8a8_matmul",
    "quantize_per_token",
    "hadamard_quantize",
#endif
};

TensorView view_of(const py::handle& obj, const char* name) {
  PyObject* o = obj.ptr();
  INFEROPS_CHECK_TYPE(PyCapsule_CheckExact(o), "expected a DLPack capsule for `", name, "`, got ",
                      std::string(py::str(py::type::handle_of(obj).attr("__name__"))),
                      " (export tensors with torch.utils.dlpack.to_dlpack)");
  const char* cap_name = PyCapsule_GetName(o);
  std::string s = cap_name ? cap_name : "";
  INFEROPS_CHECK_ARG(s != inferops::dlpack::kCapsuleNameUsed &&
                         s != inferops::dlpack::kCapsuleNameUsedVersioned,
                     "DLPack capsule for `", name,
                     "` was already consumed by another library; export the tensor again");
  if (s == inferops::dlpack::kCapsuleName) {
    auto* m = static_cast<inferops::dlpack::ManagedTensor*>(PyCapsule_GetPointer(o, cap_name));
    INFEROPS_CHECK_ARG(m != nullptr, "empty DLPack capsule for `", name, "`");
    return TensorView(&m->dl_tensor, /*read_only=*/false);
  }
  if (s == inferops::dlpack::kCapsuleNameVersioned) {
    auto* m = static_cast<inferops::dlpack::ManagedTensorVersioned*>(
        PyCapsule_GetPointer(o, cap_name));
    INFEROPS_CHECK_ARG(m != nullptr, "empty DLPack capsule for `", name, "`");
    INFEROPS_CHECK_ARG(m->version.major == 1, "DLPack capsule for `", name, "` has ABI version ",
                       m->version.major, ".", m->version.minor, ", expected 1.x");
    return TensorView(&m->dl_tensor, (m->flags & inferops::dlpack::kFlagReadOnly) != 0);
  }
  INFEROPS_CHECK_TYPE(false, "expected a DLPack capsule named 'dltensor' for `", name,
                      "`, got a capsule named '", s, "'");
}

py::dict build_info() {
  py::dict d;
  d["version"] = INFEROPS_VERSION;
#ifdef INFEROPS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
#endif
  d["cuda_archs"] = std::string(INFEROPS_CUDA_ARCHS);
#ifdef INFEROPS_SIMT
  d["backend"] = "simt";  // kernels run on the CPU executor (csrc/simt/)
#ifdef INFEROPS_SIMT_SANITIZE
  d["sanitizer"] = "address,undefined";
#else
  d["sanitizer"] = py::none();
#endif
#ifdef INFEROPS_SIMT_RACECHECK
  d["racecheck"] = true;  // the shared-memory race detector (csrc/simt/race.h)
  d["metrics"] = true;    // and the memory-access metrics (csrc/simt/metrics.h)
#else
  d["racecheck"] = false;
  d["metrics"] = false;
#endif
#else
  d["backend"] = "cuda";
#endif
  d["cuda_ops"] = kCudaOps;
#if defined(__clang__)
  d["host_compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["host_compiler"] = "gcc " __VERSION__;
#else
  d["host_compiler"] = "unknown";
#endif
#ifdef NDEBUG
  d["debug"] = false;
#else
  d["debug"] = true;
#endif
  return d;
}

// What the CUDA runtime linked into this module sees right now. Never throws:
// on a machine without a driver it reports the error instead.
py::dict runtime_info() {
  py::dict d;
#ifdef INFEROPS_WITH_CUDA
  int driver = 0, count = 0;
  cudaError_t e = cudaDriverGetVersion(&driver);
  d["driver_version"] = driver;
  if (e == cudaSuccess) e = cudaGetDeviceCount(&count);
  d["device_count"] = e == cudaSuccess ? count : 0;
  d["error"] = e == cudaSuccess ? py::object(py::none())
                                : py::object(py::str(std::string(cudaGetErrorName(e)) + ": " +
                                                     cudaGetErrorString(e)));
  cudaGetLastError();  // do not leave a sticky-looking error for the next caller
#else
  d["driver_version"] = 0;
  d["device_count"] = 0;
  d["error"] = "inferops was built without CUDA";
#endif
  return d;
}

py::dict device_info(int device) {
#ifdef INFEROPS_WITH_CUDA
  const inferops::DeviceInfo& i = inferops::device_info(device);
  py::dict d;
  d["device"] = i.device;
  d["sm_count"] = i.sm_count;
  d["compute_capability"] = py::make_tuple(i.cc_major, i.cc_minor);
  d["max_threads_per_sm"] = i.max_threads_per_sm;
  d["max_smem_per_block_optin"] = i.max_smem_per_block_optin;
  d["max_smem_per_sm"] = i.max_smem_per_sm;
  d["l2_bytes"] = i.l2_bytes;
  return d;
#else
  (void)device;
  INFEROPS_CHECK(false, "inferops was built without CUDA");
#endif
}

// Debug view of a capsule, used by the binding-layer tests.
py::dict tensor_info(const py::handle& capsule) {
  TensorView t = view_of(capsule, "tensor");
  py::dict d;
  d["dtype"] = inferops::dtype_name(t.dtype());
  d["shape"] = t.sizes();
  d["strides"] = t.strides();
  d["device"] = t.device_str();
  d["read_only"] = t.read_only();
  d["contiguous"] = t.is_contiguous();
  d["data_ptr"] = reinterpret_cast<std::uintptr_t>(t.data());
  return d;
}

// An optional tensor argument: None or a capsule.
struct OptionalView {
  TensorView view;
  bool present = false;
  OptionalView(py::handle obj, const char* name) {
    if (!obj.is_none()) {
      view = view_of(obj, name);
      present = true;
    }
  }
  const TensorView* get() const { return present ? &view : nullptr; }
};

template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

py::dict build_prefix_plan(py::handle tokens_cap, py::handle offsets_cap, int page_size,
                           py::handle decode_lens_cap, int min_shared_pages) {
  using inferops::DType;
  TensorView tokens = view_of(tokens_cap, "tokens");
  TensorView offsets = view_of(offsets_cap, "offsets");
  tokens.expect_dtype("tokens", DType::kInt32);
  offsets.expect_dtype("offsets", DType::kInt64);
  tokens.expect_ndim("tokens", 1);
  offsets.expect_ndim("offsets", 1);
  for (auto [t, name] : {std::pair{&tokens, "tokens"}, {&offsets, "offsets"}}) {
    t->expect_contiguous(name);
    INFEROPS_CHECK_ARG(t->device_kind() == inferops::DeviceKind::kCPU, "expected a CPU tensor for `",
                       name, "`, got ", t->device_str());
  }
  const int64_t n = offsets.size(0) - 1;
  INFEROPS_CHECK_ARG(n >= 0, "expected `offsets` of length num_requests + 1 >= 1, got length 0");
  const int64_t* off = offsets.data_as<const int64_t>();
  INFEROPS_CHECK_ARG(off[0] == 0 && off[n] == tokens.size(0), "expected offsets[0] == 0 and offsets[-1] == ",
                     tokens.size(0), " (len(tokens)), got ", off[0], " and ", off[n]);
  for (int64_t i = 0; i < n; ++i) {
    INFEROPS_CHECK_ARG(off[i + 1] >= off[i], "expected non-decreasing `offsets`, got offsets[", i + 1,
                       "] = ", off[i + 1], " < offsets[", i, "] = ", off[i]);
  }
  const int32_t* decode = nullptr;
  if (!decode_lens_cap.is_none()) {
    TensorView d = view_of(decode_lens_cap, "decode_lens");
    d.expect_dtype("decode_lens", DType::kInt32);
    d.expect_shape("decode_lens", {n});
    d.expect_contiguous("decode_lens");
    INFEROPS_CHECK_ARG(d.device_kind() == inferops::DeviceKind::kCPU,
                       "expected a CPU tensor for `decode_lens`, got ", d.device_str());
    decode = d.data_as<const int32_t>();
  }
  inferops::attention::PrefixPlanInput in{tokens.data_as<const int32_t>(), off, n, page_size, decode,
                                          min_shared_pages};
  inferops::attention::PrefixPlanOutput out;
  {
    py::gil_scoped_release release;
    out = inferops::attention::build_prefix_plan(in);
  }
  py::dict d;
  d["order"] = to_numpy(out.order);
  d["group_indptr"] = to_numpy(out.group_indptr);
  d["group_page_indptr"] = to_numpy(out.group_page_indptr);
  d["group_pages"] = to_numpy(out.group_pages);
  d["shared_len"] = to_numpy(out.shared_len);
  d["prompt_len"] = to_numpy(out.prompt_len);
  d["page_owner"] = to_numpy(out.page_owner);
  d["page_index"] = to_numpy(out.page_index);
  d["page_refs"] = to_numpy(out.page_refs);
  d["num_tree_nodes"] = out.num_tree_nodes;
  return d;
}

}  // namespace

PYBIND11_MODULE(INFEROPS_MODULE_NAME, m) {
  m.doc() = "inferops compiled kernels (torch-independent; tensors as DLPack capsules)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const inferops::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const inferops::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("build_info", &build_info, "What this extension was built with.");
  m.def("runtime_info", &runtime_info, "CUDA driver version and device count as seen now.");
  m.def("device_info", &device_info, py::arg("device"), "SM count, shared memory and L2 of a device.");
  m.def("tensor_info", &tensor_info, py::arg("capsule"), "Debug view of a DLPack capsule.");
#ifdef INFEROPS_SIMT
  // Concurrent grids (csrc/simt/concurrent.cpp): launches between begin and end run as one
  // pool at end(true) (virtual tensor-parallel ranks, python/inferops/tp/gemm_rs.py).
  m.def("simt_concurrent_begin", &::simt::concurrent_begin, "Queue this thread's launches from now on.");
  m.def("simt_concurrent_end", &::simt::concurrent_end, py::arg("run"),
        "Run the queued launches as one pool (run=True) or drop them; the GIL is held throughout.");
#ifdef INFEROPS_SIMT_RACECHECK
  // Memory-access metrics (csrc/simt/metrics.h), in the instrumented build only.
  m.def("simt_metrics_begin", &::simt::metrics::begin, "Collect one record per launch from now on.");
  m.def("simt_metrics_end", &::simt::metrics::end, "Stop collecting; the records (JSON objects), in launch order.");
#endif
  m.def("simt_selftests", &inferops::simt_selftest::names, "Names of the executor's self-test kernels.");
  m.def("simt_selftest", &inferops::simt_selftest::run, py::arg("name"), py::arg("input"),
        "Run executor self-test kernel `name` on `input` (floats); returns its output.");
#endif

  m.def(
      "merge_states",
      [](py::handle v_a, py::handle lse_a, py::handle v_b, py::handle lse_b, py::handle v_out,
         py::handle lse_out, std::uintptr_t stream) {
        inferops::attention::merge_states(
            view_of(v_a, "v_a"), view_of(lse_a, "lse_a"), view_of(v_b, "v_b"),
            view_of(lse_b, "lse_b"), view_of(v_out, "v_out"), view_of(lse_out, "lse_out"), stream);
      },
      py::arg("v_a"), py::arg("lse_a"), py::arg("v_b"), py::arg("lse_b"), py::arg("v_out"),
      py::arg("lse_out"), py::arg("stream"),
      "LSE merge of two partial attention states into v_out/lse_out (which may alias v_a/lse_a).");

  m.def(
      "append_kv",
      [](py::handle k_cache, py::handle v_cache, py::handle k, py::handle v,
         py::handle block_tables, py::handle seq_ids, py::handle positions, std::uintptr_t stream) {
        inferops::attention::append_kv(view_of(k_cache, "k_cache"), view_of(v_cache, "v_cache"),
                                       view_of(k, "k"), view_of(v, "v"),
                                       view_of(block_tables, "block_tables"),
                                       view_of(seq_ids, "seq_ids"), view_of(positions, "positions"),
                                       stream);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("block_tables"),
      py::arg("seq_ids"), py::arg("positions"), py::arg("stream"),
      "Write new tokens' K/V into the paged cache slots named by block tables and positions.");

  m.def(
      "paged_decode",
      [](py::handle q, py::handle k_cache, py::handle v_cache, py::handle block_tables,
         py::handle seq_lens, py::handle out, py::handle lse, py::handle partial_out,
         py::handle partial_lse, int num_splits, float scale, std::uintptr_t stream) {
        auto po = num_splits > 1 ? view_of(partial_out, "partial_out") : TensorView();
        auto pl = num_splits > 1 ? view_of(partial_lse, "partial_lse") : TensorView();
        inferops::attention::paged_decode(
            view_of(q, "q"), view_of(k_cache, "k_cache"), view_of(v_cache, "v_cache"),
            view_of(block_tables, "block_tables"), view_of(seq_lens, "seq_lens"),
            view_of(out, "out"), view_of(lse, "lse"), po, pl, num_splits, scale, stream);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("seq_lens"), py::arg("out"), py::arg("lse"), py::arg("partial_out"),
      py::arg("partial_lse"), py::arg("num_splits"), py::arg("scale"), py::arg("stream"),
      "Paged decode attention (one query per sequence), split-KV over num_splits.");

  m.def("build_prefix_plan", &build_prefix_plan, py::arg("tokens"), py::arg("offsets"),
        py::arg("page_size"), py::arg("decode_lens"), py::arg("min_shared_pages"),
        "Global prefix tree of a batch flattened to one level of sharing (host side).");

  m.def(
      "prefix_shared_decode",
      [](py::handle q, py::handle k_cache, py::handle v_cache, py::handle block_tables,
         py::handle seq_lens, py::handle shared_lens, py::handle group_indptr,
         py::handle group_page_indptr, py::handle group_pages, py::handle work, py::handle out,
         py::handle lse, py::handle partial_out, py::handle partial_lse, int shared_splits,
         int suffix_splits, int suffix_tokens_per_split, float scale, std::uintptr_t stream) {
        inferops::attention::prefix_shared_decode(
            view_of(q, "q"), view_of(k_cache, "k_cache"), view_of(v_cache, "v_cache"),
            view_of(block_tables, "block_tables"), view_of(seq_lens, "seq_lens"),
            view_of(shared_lens, "shared_lens"), view_of(group_indptr, "group_indptr"),
            view_of(group_page_indptr, "group_page_indptr"), view_of(group_pages, "group_pages"),
            view_of(work, "work"), view_of(out, "out"), view_of(lse, "lse"),
            view_of(partial_out, "partial_out"), view_of(partial_lse, "partial_lse"), shared_splits,
            suffix_splits, suffix_tokens_per_split, scale, stream);
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("seq_lens"), py::arg("shared_lens"), py::arg("group_indptr"),
      py::arg("group_page_indptr"), py::arg("group_pages"), py::arg("work"), py::arg("out"),
      py::arg("lse"), py::arg("partial_out"), py::arg("partial_lse"), py::arg("shared_splits"),
      py::arg("suffix_splits"), py::arg("suffix_tokens_per_split"), py::arg("scale"),
      py::arg("stream"),
      "Decode with each group's shared prefix read once (tensor cores), suffix decode, merge.");

  namespace la = inferops::linear_attention;
  m.def(
      "simplified_linear_attention",
      [](py::handle q, py::handle k, py::handle v, py::handle dwc_weight, py::handle dwc_bias,
         py::handle out, py::handle kv_ws, py::handle ksum_ws, int h, int w, std::uintptr_t stream) {
        OptionalView bias(dwc_bias, "dwc_bias");
        la::simplified_linear_attention(view_of(q, "q"), view_of(k, "k"), view_of(v, "v"),
                                        view_of(dwc_weight, "dwc_weight"), bias.get(),
                                        view_of(out, "out"), view_of(kv_ws, "kv_workspace"),
                                        view_of(ksum_ws, "ksum_workspace"), h, w, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dwc_weight"), py::arg("dwc_bias"),
      py::arg("out"), py::arg("kv_workspace"), py::arg("ksum_workspace"), py::arg("h"), py::arg("w"),
      py::arg("stream"), "SLAB simplified linear attention with the 5x5 depthwise conv of v.");
  m.def(
      "causal_linear_attention",
      [](py::handle q, py::handle k, py::handle v, py::handle o, py::handle initial_state,
         py::handle final_state, py::handle cu_seqlens, float scale, bool normalize, bool use_relu,
         std::uintptr_t stream) {
        OptionalView s0(initial_state, "initial_state"), s1(final_state, "final_state"),
            cu(cu_seqlens, "cu_seqlens");
        la::causal_linear_attention(view_of(q, "q"), view_of(k, "k"), view_of(v, "v"), view_of(o, "o"),
                                    s0.get(), s1.get(), cu.get(), scale, normalize, use_relu, stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("initial_state"),
      py::arg("final_state"), py::arg("cu_seqlens"), py::arg("scale"), py::arg("normalize"),
      py::arg("use_relu"), py::arg("stream"), "Chunkwise causal linear attention (tensor cores).");
  m.def(
      "linear_attention_step",
      [](py::handle q, py::handle k, py::handle v, py::handle state, py::handle o, float scale,
         bool normalize, bool use_relu, std::uintptr_t stream) {
        la::linear_attention_step(view_of(q, "q"), view_of(k, "k"), view_of(v, "v"),
                                  view_of(state, "state"), view_of(o, "o"), scale, normalize, use_relu,
                                  stream);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("state"), py::arg("o"), py::arg("scale"),
      py::arg("normalize"), py::arg("use_relu"), py::arg("stream"),
      "One recurrent linear-attention step; updates `state` in place.");

  m.def(
      "routing_layout",
      [](py::handle topk_ids, py::handle placement, py::handle tokens_per_expert,
         py::handle expert_offsets, py::handle dst_index, py::handle src_index,
         py::handle tokens_per_rank, py::handle send_index, py::handle send_offsets, py::handle errors,
         int align, std::uintptr_t stream) {
        inferops::moe::routing_layout(
            view_of(topk_ids, "topk_ids"), view_of(placement, "placement"),
            view_of(tokens_per_expert, "tokens_per_expert"), view_of(expert_offsets, "expert_offsets"),
            view_of(dst_index, "dst_index"), view_of(src_index, "src_index"),
            view_of(tokens_per_rank, "tokens_per_rank"), view_of(send_index, "send_index"),
            view_of(send_offsets, "send_offsets"), view_of(errors, "errors"), align, stream);
      },
      py::arg("topk_ids"), py::arg("placement"), py::arg("tokens_per_expert"), py::arg("expert_offsets"),
      py::arg("dst_index"), py::arg("src_index"), py::arg("tokens_per_rank"), py::arg("send_index"),
      py::arg("send_offsets"), py::arg("errors"), py::arg("align"), py::arg("stream"),
      "MoE routing layout on the device (deterministic, no host sync).");
  m.def(
      "permute",
      [](py::handle x, py::handle src_index, py::handle dst_index, py::handle out, std::uintptr_t stream) {
        inferops::moe::permute(view_of(x, "x"), view_of(src_index, "src_index"), view_of(dst_index, "dst_index"),
                               view_of(out, "out"), stream);
      },
      py::arg("x"), py::arg("src_index"), py::arg("dst_index"), py::arg("out"), py::arg("stream"),
      "Scatter tokens into the expert-major buffer (each token read once; padding rows zeroed).");
  m.def(
      "unpermute",
      [](py::handle y, py::handle dst_index, py::handle weights, py::handle out, std::uintptr_t stream) {
        inferops::moe::unpermute(view_of(y, "y"), view_of(dst_index, "dst_index"),
                                 view_of(weights, "topk_weights"), view_of(out, "out"), stream);
      },
      py::arg("y"), py::arg("dst_index"), py::arg("topk_weights"), py::arg("out"), py::arg("stream"),
      "Scatter expert outputs back to tokens, top-k weighted sum in fp32.");

  namespace qt = inferops::quant;
  m.attr("INT4_LAYOUT_VERSION") = qt::kInt4LayoutVersion;
  m.def(
      "w4a16_matmul",
      [](py::handle x, py::handle qweight, py::handle scales, py::handle zeros, py::handle bias,
         py::handle out, int group_size, int splits, std::uintptr_t stream) {
        OptionalView z(zeros, "zeros"), b(bias, "bias");
        qt::w4a16_matmul(view_of(x, "x"), view_of(qweight, "qweight"), view_of(scales, "scales"), z.get(),
                         b.get(), view_of(out, "out"), group_size, splits, stream);
      },
      py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("out"),
      py::arg("group_size"), py::arg("splits"), py::arg("stream"),
      "W4A16 GEMM out = x W^T (+ bias) with int4 W in the packed fragment layout (split-K over `splits`).");
  m.def(
      "int4_dequantize",
      [](py::handle qweight, py::handle scales, py::handle zeros, py::handle out, int group_size,
         std::uintptr_t stream) {
        OptionalView z(zeros, "zeros");
        qt::int4_dequantize(view_of(qweight, "qweight"), view_of(scales, "scales"), z.get(), view_of(out, "out"),
                            group_size, stream);
      },
      py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("group_size"),
      py::arg("stream"), "Packed int4 weights -> W [N, K] in the scales' dtype.");
  namespace tp = inferops::tp;
  m.def(
      "gemm_reduce_scatter",
      [](py::handle a, py::handle b, py::handle out, py::handle peers, py::handle state, int rank,
         int world, int64_t max_m, int64_t n_max, int64_t buffer_bytes, double timeout_s, int num_blocks,
         std::uintptr_t stream) {
        tp::gemm_reduce_scatter(view_of(a, "a"), view_of(b, "b"), view_of(out, "out"), view_of(peers, "peers"),
                                view_of(state, "state"), rank, world, max_m, n_max, buffer_bytes, timeout_s,
                                num_blocks, stream);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("peers"), py::arg("state"), py::arg("rank"),
      py::arg("world"), py::arg("max_m"), py::arg("n_max"), py::arg("buffer_bytes"), py::arg("timeout_s"),
      py::arg("num_blocks"), py::arg("stream"),
      "One rank's fused GEMM + reduce-scatter: tiles of a @ b pushed to their owners' symmetric buffers.");
  m.def(
      "gemm_rs_buffer_bytes",
      [](int64_t max_m, int64_t n_max, int64_t world, int64_t elem_bytes) {
        return tp::buffer_layout(max_m, n_max, world, elem_bytes).total_bytes;
      },
      py::arg("max_m"), py::arg("n_max"), py::arg("world"), py::arg("elem_bytes"),
      "Bytes of one rank's symmetric buffer for gemm_reduce_scatter.");
  m.def(
      "w8a8_matmul",
      [](py::handle x_q, py::handle x_scale, py::handle w_q, py::handle w_scale, py::handle bias,
         py::handle out, std::uintptr_t stream, const std::string& path) {
        OptionalView b(bias, "bias");
        const qt::W8A8Path kind = qt::parse_w8a8_path(path.c_str());
        qt::w8a8_matmul(view_of(x_q, "x_q"), view_of(x_scale, "x_scale"), view_of(w_q, "w_q"),
                        view_of(w_scale, "w_scale"), b.get(), view_of(out, "out"), stream, kind);
      },
      py::arg("x_q"), py::arg("x_scale"), py::arg("w_q"), py::arg("w_scale"), py::arg("bias"),
      py::arg("out"), py::arg("stream"), py::arg("path") = "auto",
      "INT8 / FP8 GEMM x_q @ w_q^T with per-token x per-channel scales (+ bias) in the epilogue.");
  m.def(
      "quantize_per_token",
      [](py::handle x, py::handle x_q, py::handle scale, std::uintptr_t stream) {
        qt::quantize_per_token(view_of(x, "x"), view_of(x_q, "x_q"), view_of(scale, "scale"), stream);
      },
      py::arg("x"), py::arg("x_q"), py::arg("scale"), py::arg("stream"),
      "Symmetric per-row quantization to int8 / fp8 e4m3 with fp32 scales.");
  m.def(
      "hadamard_quantize",
      [](py::handle x, py::handle hm, py::handle out, py::handle scale, int m_order, std::uintptr_t stream) {
        OptionalView h(hm, "hm");
        qt::hadamard_quantize(view_of(x, "x"), h.get(), view_of(out, "out"), view_of(scale, "scale"),
                              m_order, stream);
      },
      py::arg("x"), py::arg("hm"), py::arg("out"), py::arg("scale"), py::arg("m"), py::arg("stream"),
      "Per-row x @ kron(H_m, H_p) / sqrt(n), then per-token quantization (or fp16/bf16 output).");
}
