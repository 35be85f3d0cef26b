// One-row matmuls for batch-1 decode whose weights arrive before their input does (Hopper).
//
// Each block owns a contiguous run of weight rows (one block an SM for Qwen3-0.6B's projections)
// and, as its first act, asks the copy engine (cp.async.bulk, the TMA's 1-D form) for all of
// them at once into shared memory, in pieces signalled by an mbarrier each. Everything else that
// does not depend on the kernel before (the norm weights) is read into registers too; only then
// does the block wait for the kernel before (griddepcontrol.wait). What follows the wait is kept
// to one round trip to memory: every thread issues all its loads of the input row at once, then
// the operation before the matmul (RMSNorm with the residual add, or SiLU·mul), rounded to the
// model dtype where PyTorch's unfused ops round, goes to shared memory as float32, and each warp
// takes a row of dot products from the weights already there (float32 sums, rounded once).

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int kMaxPieces = 16;
constexpr int kHeader = kMaxPieces * 8;  // the mbarriers, at the start of shared memory

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
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
#pragma unroll
  for (int i = 0; i < kWarps; ++i) s += scratch[i];
  return s;
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
    const float4 a0 = reinterpret_cast<const float4*>(act)[2 * v];
    const float4 a1 = reinterpret_cast<const float4*>(act)[2 * v + 1];
    acc += to_float(e[0]) * a0.x;
    acc += to_float(e[1]) * a0.y;
    acc += to_float(e[2]) * a0.z;
    acc += to_float(e[3]) * a0.w;
    acc += to_float(e[4]) * a1.x;
    acc += to_float(e[5]) * a1.y;
    acc += to_float(e[6]) * a1.z;
    acc += to_float(e[7]) * a1.w;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if (bias != nullptr) acc += to_float(bias[row0 + r]);
    y[row0 + r] = from_float<T>(acc);
  }
}

// PROLOGUE: 0 plain, 1 (residual add →) RMSNorm, 2 SiLU(gate)·up. EPT: input elements a thread
// holds (K ≤ EPT · kThreads). Two blocks an SM at least, so the next kernel's block can start its
// copies beside this one's.
template <typename T, int PROLOGUE, int kThreads, int EPT>
__global__ void __launch_bounds__(kThreads, 2) row_stream_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ norm_weight,
    const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, int n, int k,
    int rows_per_block, int rows_per_piece, float eps, int only_load) {
  static_assert(sizeof(T) == 2, "16-bit weights (8 to a 16-byte vector)");
  constexpr int kWarps = kThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float scratch[kWarps];
  float* act = reinterpret_cast<float*>(smem + kHeader);
  T* wsm = reinterpret_cast<T*>(smem + kHeader + ((k * 4 + 127) / 128) * 128);
  const int row0 = blockIdx.x * rows_per_block;
  const int rows = min(rows_per_block, n - row0);
  const int pieces = (rows + rows_per_piece - 1) / rows_per_piece;
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
  // the norm weights do not depend on the kernel before either
  float nw[EPT];
  if constexpr (PROLOGUE == 1) {
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      nw[j] = i < k ? to_float(norm_weight[i]) : 0.f;
    }
  }
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (only_load) {  // a measurement: the copies alone, each piece waited for, nothing computed
    __syncthreads();  // the mbarriers' initialisation
    if (threadIdx.x < pieces) wait_piece(smem_addr(smem + 8 * threadIdx.x));
    return;
  }

  // the input row: every load issued before any is used
  if constexpr (PROLOGUE == 1) {
    T xv[EPT], rv[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      xv[j] = i < k ? x[i] : from_float<T>(0.f);
      rv[j] = (residual != nullptr && i < k) ? residual[i] : from_float<T>(0.f);
    }
    float v[EPT];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      v[j] = to_float(xv[j]);
      if (residual != nullptr) {
        const T s = from_float<T>(v[j] + to_float(rv[j]));
        if (blockIdx.x == 0 && i < k) h[i] = s;
        v[j] = to_float(s);
      }
      ss += v[j] * v[j];
    }
    const float rstd = rsqrtf(block_sum<kWarps>(ss, scratch) / k + eps);
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < k) act[i] = round_to<T>(nw[j] * round_to<T>(v[j] * rstd));
    }
  } else if constexpr (PROLOGUE == 2) {
    T gv[EPT], uv[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      gv[j] = i < k ? x[i] : from_float<T>(0.f);
      uv[j] = i < k ? x[k + i] : from_float<T>(0.f);
    }
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const float g = to_float(gv[j]);
      const float s = round_to<T>(g / (1.f + expf(-g)));
      if (i < k) act[i] = round_to<T>(s * to_float(uv[j]));
    }
  } else {
    T xv[EPT];
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      xv[j] = i < k ? x[i] : from_float<T>(0.f);
    }
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < k) act[i] = to_float(xv[j]);
    }
  }
  __syncthreads();  // the activation, and the mbarriers' initialisation, seen by every warp

  for (int r = threadIdx.x >> 5; r < rows; r += kWarps) {
    wait_piece(smem_addr(smem + 8 * (r / rows_per_piece)));
    row_dot(wsm, act, r, k, row0, bias, y);
  }
}

template <typename T, int PROLOGUE, int kThreads, int EPT>
void launch(const torch::Tensor& x, const T* residual, const T* norm_weight, const torch::Tensor& w,
            const T* bias, torch::Tensor& y, T* h, int rows_per_block, int rows_per_piece, double eps, bool pdl,
            int only_load) {
  const int n = w.size(0), k = w.size(1);
  const size_t smem = kHeader + ((k * 4 + 127) / 128) * 128 + static_cast<size_t>(rows_per_block) * k * sizeof(T);
  auto kernel = row_stream_kernel<T, PROLOGUE, kThreads, EPT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  // every one of these kernels asks for the same split of L1 and shared memory, the most shared:
  // an SM whose split changes between kernels drains first
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
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

template <typename T, int P, int kThreads>
void by_width(const torch::Tensor& x, const T* r, const T* nw, const torch::Tensor& w, const T* b, torch::Tensor& y,
              T* hp, int rows, int piece, double eps, bool pdl, int only_load) {
  const int ept = (static_cast<int>(w.size(1)) + kThreads - 1) / kThreads;
  if (ept <= 1) launch<T, P, kThreads, 1>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
  else if (ept <= 2) launch<T, P, kThreads, 2>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
  else if (ept <= 4) launch<T, P, kThreads, 4>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
  else if (ept <= 8) launch<T, P, kThreads, 8>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
  else TORCH_CHECK(false, "row_stream: input width ", w.size(1), " exceeds 8 elements a thread");
}

template <typename T>
void dispatch(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
              const c10::optional<torch::Tensor>& norm_weight, const torch::Tensor& w,
              const c10::optional<torch::Tensor>& bias, torch::Tensor& y, const c10::optional<torch::Tensor>& h,
              int64_t prologue, double eps, int64_t rows, int64_t piece, bool pdl, int64_t threads,
              int64_t only_load) {
  const T* r = opt_ptr<T>(residual);
  const T* nw = opt_ptr<T>(norm_weight);
  const T* b = opt_ptr<T>(bias);
  T* hp = h.has_value() ? reinterpret_cast<T*>(h->data_ptr()) : nullptr;
  const auto go = [&](auto prologue_c) {
    constexpr int P = decltype(prologue_c)::value;
    if (threads == 1024) by_width<T, P, 1024>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
    else by_width<T, P, 512>(x, r, nw, w, b, y, hp, rows, piece, eps, pdl, only_load);
  };
  if (prologue == 0) go(std::integral_constant<int, 0>{});
  else if (prologue == 1) go(std::integral_constant<int, 1>{});
  else go(std::integral_constant<int, 2>{});
}

}  // namespace

// y [1, N] = prologue(x) · w [N, K]ᵀ (+ bias); h (NORM with a residual) gets x + residual.
// The Python side checks shapes, contiguity and alignment, and picks the block sizes.
void row_stream(torch::Tensor x, c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> norm_weight,
                torch::Tensor w, c10::optional<torch::Tensor> bias, torch::Tensor y, c10::optional<torch::Tensor> h,
                int64_t prologue, double eps, int64_t rows_per_block, int64_t rows_per_piece, bool pdl,
                int64_t threads, int64_t only_load) {
  TORCH_CHECK(prologue >= 0 && prologue <= 2, "prologue must be 0, 1 or 2");
  TORCH_CHECK(threads == 512 || threads == 1024, "512 or 1024 threads a block");
  TORCH_CHECK(w.size(1) % 8 == 0, "rows of whole 16-byte vectors");
  TORCH_CHECK(rows_per_block >= 1 && rows_per_piece >= 1 &&
                  (rows_per_block + rows_per_piece - 1) / rows_per_piece <= kMaxPieces,
              "at most ", kMaxPieces, " pieces a block");
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::ScalarType::BFloat16: dispatch<__nv_bfloat16>(x, residual, norm_weight, w, bias, y, h, prologue, eps,
                                                           rows_per_block, rows_per_piece, pdl, threads, only_load); break;
    case at::ScalarType::Half: dispatch<__half>(x, residual, norm_weight, w, bias, y, h, prologue, eps,
                                                rows_per_block, rows_per_piece, pdl, threads, only_load); break;
    default: TORCH_CHECK(false, "row_stream takes float16 or bfloat16, not ", x.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_stream", &row_stream, "one-row matmul, weights streamed ahead"); }
