// One-row matmuls for batch-1 decode whose weights arrive before their input does (Hopper).
//
// Each block owns a contiguous run of weight rows (32-96 KB for Qwen3-0.6B's projections,
// one block an SM) and, as its first act, asks the copy engine (cp.async.bulk, the TMA's 1-D
// form) for all of them at once, in pieces of ~16 KB each signalled by an mbarrier. Only then
// does it wait for the kernel before (griddepcontrol.wait) and read the input row. Launched as
// programmatic dependents, consecutive matmuls therefore overlap: the next one's weights stream
// in while this one finishes, and the attention kernels between two matmuls run while o_proj's
// weights land. The operation before the matmul (RMSNorm with the residual add, or SiLU·mul) is
// computed in every block from the input row, rounded to the model dtype where PyTorch's unfused
// ops round; products are summed in float32 and rounded once.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int kMaxPieces = 16;
constexpr int kHeader = kMaxPieces * 8;  // the mbarriers, at the start of shared memory

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// the value rounded to the model dtype, back in float32
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void wait_piece(uint32_t bar) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
        : "=r"(done) : "r"(bar) : "memory");
  }
}

template <int kWarps>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < kWarps; ++i) s += scratch[i];
  return s;
}

// cp.async.wait_group takes its count as an immediate
__device__ __forceinline__ void wait_groups_left(int n) {
  switch (n) {
#define BRAID_WAIT(N) case N: asm volatile("cp.async.wait_group " #N ";" ::: "memory"); break;
    BRAID_WAIT(0) BRAID_WAIT(1) BRAID_WAIT(2) BRAID_WAIT(3) BRAID_WAIT(4) BRAID_WAIT(5) BRAID_WAIT(6)
    BRAID_WAIT(7) BRAID_WAIT(8) BRAID_WAIT(9) BRAID_WAIT(10) BRAID_WAIT(11) BRAID_WAIT(12) BRAID_WAIT(13)
    BRAID_WAIT(14)
#undef BRAID_WAIT
    default: asm volatile("cp.async.wait_all;" ::: "memory");
  }
}

template <typename T>
__device__ __forceinline__ void row_dot(const T* wsm, const float* act, int r, int k, int row0, const T* bias,
                                        T* y) {
  constexpr int kVec = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  const uint4* wrow = reinterpret_cast<const uint4*>(wsm + static_cast<size_t>(r) * k);
  float acc = 0.f;
  for (int v = lane; v < k / kVec; v += 32) {
    const uint4 raw = wrow[v];
    const T* e = reinterpret_cast<const T*>(&raw);
    const float* a = act + v * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += to_float(e[j]) * a[j];
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if (bias != nullptr) acc += to_float(bias[row0 + r]);
    y[row0 + r] = from_float<T>(acc);
  }
}

// PROLOGUE: 0 plain, 1 (residual add →) RMSNorm, 2 SiLU(gate)·up. LOADER: 0 the copy engine
// (cp.async.bulk from one thread, an mbarrier a piece), 1 every thread's 16-byte cp.async, a
// commit group a piece
template <typename T, int PROLOGUE, int LOADER, int kThreads>
__global__ void __launch_bounds__(kThreads) row_stream_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ norm_weight,
    const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, int n, int k,
    int rows_per_block, int rows_per_piece, float eps, int only_load) {
  constexpr int kWarps = kThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[kWarps];
  float* act = reinterpret_cast<float*>(smem + kHeader);
  T* wsm = reinterpret_cast<T*>(smem + kHeader + ((k * 4 + 127) / 128) * 128);
  const int row0 = blockIdx.x * rows_per_block;
  const int rows = min(rows_per_block, n - row0);
  const int pieces = (rows + rows_per_piece - 1) / rows_per_piece;
  if constexpr (LOADER == 0) {
    if (threadIdx.x == 0) {
      for (int p = 0; p < pieces; ++p)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(smem + 8 * p)));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      for (int p = 0; p < pieces; ++p) {
        const int first = p * rows_per_piece;
        const uint32_t bytes = static_cast<uint32_t>(min(rows_per_piece, rows - first)) * k * sizeof(T);
        const uint32_t bar = smem_addr(smem + 8 * p);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                smem_addr(wsm + static_cast<size_t>(first) * k)),
            "l"(w + static_cast<size_t>(row0 + first) * k), "r"(bytes), "r"(bar)
            : "memory");
      }
    }
  } else {
    const int row_chunks = k * static_cast<int>(sizeof(T)) / 16;
    for (int p = 0; p < pieces; ++p) {
      const int first = p * rows_per_piece;
      const int chunks = min(rows_per_piece, rows - first) * row_chunks;
      const char* src = reinterpret_cast<const char*>(w + static_cast<size_t>(row0 + first) * k);
      const uint32_t dst = smem_addr(wsm + static_cast<size_t>(first) * k);
      for (int c = threadIdx.x; c < chunks; c += kThreads)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + 16 * c),
                     "l"(src + 16 * static_cast<size_t>(c))
                     : "memory");
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
  }
  // the weights never depend on the kernel before; its output, the input row, does
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (only_load) {  // a measurement: the copies alone, each piece waited for, nothing computed
    if constexpr (LOADER == 0) {
      __syncthreads();  // the mbarriers' initialisation
      if (threadIdx.x < pieces) wait_piece(smem_addr(smem + 8 * threadIdx.x));
    } else {
      asm volatile("cp.async.wait_all;" ::: "memory");
    }
    return;
  }

  if constexpr (PROLOGUE == 1) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < k; i += kThreads) {
      float v = to_float(x[i]);
      if (residual != nullptr) {
        const T s = from_float<T>(v + to_float(residual[i]));
        if (blockIdx.x == 0) h[i] = s;
        v = to_float(s);
      }
      act[i] = v;
      ss += v * v;
    }
    const float rstd = rsqrtf(block_sum<kWarps>(ss, scratch) / k + eps);
    for (int i = threadIdx.x; i < k; i += kThreads)
      act[i] = round_to<T>(to_float(norm_weight[i]) * round_to<T>(act[i] * rstd));
  } else if constexpr (PROLOGUE == 2) {
    for (int i = threadIdx.x; i < k; i += kThreads) {
      const float g = to_float(x[i]);
      const float s = round_to<T>(g / (1.f + expf(-g)));
      act[i] = round_to<T>(s * to_float(x[k + i]));
    }
  } else {
    for (int i = threadIdx.x; i < k; i += kThreads) act[i] = to_float(x[i]);
  }
  __syncthreads();  // the activation, and the mbarriers' initialisation, seen by every warp

  if constexpr (LOADER == 0) {
    for (int r = threadIdx.x >> 5; r < rows; r += kWarps) {
      wait_piece(smem_addr(smem + 8 * (r / rows_per_piece)));
      row_dot(wsm, act, r, k, row0, bias, y);
    }
  } else {
    for (int p = 0; p < pieces; ++p) {
      wait_groups_left(pieces - 1 - p);
      __syncthreads();  // every thread's copies of this piece
      const int end = min(rows, (p + 1) * rows_per_piece);
      for (int r = p * rows_per_piece + (threadIdx.x >> 5); r < end; r += kWarps)
        row_dot(wsm, act, r, k, row0, bias, y);
    }
  }
}

template <typename T, int PROLOGUE, int LOADER, int kThreads>
void launch(const torch::Tensor& x, const T* residual, const T* norm_weight, const torch::Tensor& w,
            const T* bias, torch::Tensor& y, T* h, int rows_per_block, int rows_per_piece, double eps, bool pdl, int carveout, int only_load) {
  const int n = w.size(0), k = w.size(1);
  const size_t smem = kHeader + ((k * 4 + 127) / 128) * 128 + static_cast<size_t>(rows_per_block) * k * sizeof(T);
  auto kernel = row_stream_kernel<T, PROLOGUE, LOADER, kThreads>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // every one of these kernels asks for the same split of L1 and shared memory, the most shared:
  // an SM whose split changes between kernels drains first, and the next one's blocks cannot
  // start beside the last ones of the kernel before
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, carveout));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((n + rows_per_block - 1) / rows_per_block);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<const T*>(x.data_ptr()), residual, norm_weight,
                                    reinterpret_cast<const T*>(w.data_ptr()), bias,
                                    reinterpret_cast<T*>(y.data_ptr()), h, n, k, rows_per_block, rows_per_piece,
                                    static_cast<float>(eps), only_load));
}

template <typename T>
const T* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
void dispatch(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
              const c10::optional<torch::Tensor>& norm_weight, const torch::Tensor& w,
              const c10::optional<torch::Tensor>& bias, torch::Tensor& y, const c10::optional<torch::Tensor>& h,
              int64_t prologue, double eps, int64_t rows_per_block, int64_t rows_per_piece, bool pdl, int64_t carveout,
              int64_t loader, int64_t threads, int64_t only_load) {
  const T* r = opt_ptr<T>(residual);
  const T* nw = opt_ptr<T>(norm_weight);
  const T* b = opt_ptr<T>(bias);
  T* hp = h.has_value() ? reinterpret_cast<T*>(h->data_ptr()) : nullptr;
  const auto go = [&](auto prologue_c, auto loader_c) {
    constexpr int P = decltype(prologue_c)::value, L = decltype(loader_c)::value;
    if (threads == 1024)
      launch<T, P, L, 1024>(x, r, nw, w, b, y, hp, rows_per_block, rows_per_piece, eps, pdl, carveout, only_load);
    else
      launch<T, P, L, 256>(x, r, nw, w, b, y, hp, rows_per_block, rows_per_piece, eps, pdl, carveout, only_load);
  };
  using C0 = std::integral_constant<int, 0>;
  using C1 = std::integral_constant<int, 1>;
  using C2 = std::integral_constant<int, 2>;
  if (loader == 0) {
    if (prologue == 0) go(C0{}, C0{});
    else if (prologue == 1) go(C1{}, C0{});
    else go(C2{}, C0{});
  } else {
    if (prologue == 0) go(C0{}, C1{});
    else if (prologue == 1) go(C1{}, C1{});
    else go(C2{}, C1{});
  }
}

}  // namespace

// y [1, N] = prologue(x) · w [N, K]ᵀ (+ bias); h (NORM with a residual) gets x + residual.
// The Python side checks shapes, contiguity and alignment, and picks the block sizes.
void row_stream(torch::Tensor x, c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> norm_weight,
                torch::Tensor w, c10::optional<torch::Tensor> bias, torch::Tensor y, c10::optional<torch::Tensor> h,
                int64_t prologue, double eps, int64_t rows_per_block, int64_t rows_per_piece, bool pdl, int64_t carveout, int64_t loader,
                int64_t threads, int64_t only_load) {
  TORCH_CHECK(prologue >= 0 && prologue <= 2, "prologue must be 0, 1 or 2");
  TORCH_CHECK(rows_per_block >= 1 && rows_per_piece >= 1 &&
                  (rows_per_block + rows_per_piece - 1) / rows_per_piece <= kMaxPieces,
              "at most ", kMaxPieces, " pieces a block");
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::ScalarType::BFloat16: dispatch<__nv_bfloat16>(x, residual, norm_weight, w, bias, y, h, prologue, eps,
                                                           rows_per_block, rows_per_piece, pdl, carveout, loader, threads, only_load); break;
    case at::ScalarType::Half: dispatch<__half>(x, residual, norm_weight, w, bias, y, h, prologue, eps,
                                                rows_per_block, rows_per_piece, pdl, carveout, loader, threads, only_load); break;
    case at::ScalarType::Float: dispatch<float>(x, residual, norm_weight, w, bias, y, h, prologue, eps,
                                                rows_per_block, rows_per_piece, pdl, carveout, loader, threads, only_load); break;
    default: TORCH_CHECK(false, "row_stream takes float32, float16 or bfloat16, not ", x.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_stream", &row_stream, "one-row matmul, weights streamed ahead"); }
