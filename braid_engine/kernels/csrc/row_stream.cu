// One-row matmuls for batch-1 decode whose weights arrive before their input does (Hopper).
//
// Each block owns a contiguous run of weight rows (32-96 KB for Qwen3-0.6B's projections, one
// block an SM) and, as its first act, asks the copy engine (cp.async.bulk, the TMA's 1-D form)
// for all of them at once, in pieces of ~16 KB each signalled by an mbarrier. Only then does it
// wait for the kernel before (griddepcontrol.wait) and read the input row. Launched as
// programmatic dependents, consecutive matmuls overlap: the next one's weights stream in while
// this one computes, and o_proj's land while the attention kernels run.
//
// What follows the wait is on the step's critical path, so it is kept short: every warp reads
// the input row's columns its lanes own (KV 16-byte vectors a lane) straight into registers,
// computes the operation before the matmul there — RMSNorm (its sum over the row by warp
// shuffles, no block barrier; the norm weight read before the wait) or SiLU·mul — and then
// takes its rows' dot products from shared memory. Every elementwise step rounds to the model
// dtype where PyTorch's unfused ops round; products are summed in float32 and rounded once.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int kMaxPieces = 16;
constexpr int kHeader = kMaxPieces * 8;  // the mbarriers, at the start of shared memory
constexpr int kVec = 8;                  // 16-bit elements in a 16-byte vector

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// the value rounded to the model dtype, back in float32
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

template <typename T> __device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(e[j]);
}

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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// PROLOGUE: 0 plain, 1 (residual add →) RMSNorm, 2 SiLU(gate)·up. K = KV · 32 · 8: lane l owns
// the columns of vectors l, l + 32, …, l + 32 (KV - 1).
template <typename T, int PROLOGUE, int KV, int kThreads>
__global__ void __launch_bounds__(kThreads) row_stream_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ norm_weight,
    const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h, int n,
    int rows_per_block, int rows_per_piece, float eps, int only_load) {
  constexpr int K = KV * 32 * kVec;
  constexpr int kWarps = kThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  T* wsm = reinterpret_cast<T*>(smem + kHeader);
  const int row0 = blockIdx.x * rows_per_block;
  const int rows = min(rows_per_block, n - row0);
  const int pieces = (rows + rows_per_piece - 1) / rows_per_piece;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) {
    for (int p = 0; p < pieces; ++p)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(smem + 8 * p)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    for (int p = 0; p < pieces; ++p) {
      const int first = p * rows_per_piece;
      const uint32_t bytes = static_cast<uint32_t>(min(rows_per_piece, rows - first)) * K * sizeof(T);
      const uint32_t bar = smem_addr(smem + 8 * p);
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
      asm volatile(
          "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
              smem_addr(wsm + static_cast<size_t>(first) * K)),
          "l"(w + static_cast<size_t>(row0 + first) * K), "r"(bytes), "r"(bar)
          : "memory");
    }
  }
  // no kernel of the forward writes the norm weight: read it before the wait too
  float nw[PROLOGUE == 1 ? KV * kVec : 1];
  if constexpr (PROLOGUE == 1) {
#pragma unroll
    for (int j = 0; j < KV; ++j)
      unpack<T>(reinterpret_cast<const uint4*>(norm_weight)[lane + 32 * j], nw + j * kVec);
  }
  __syncthreads();  // the mbarriers' initialisation, seen by every warp
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  // the weights never depend on the kernel before; its output, the input row, does
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (only_load) {  // a measurement: the copies alone, each piece waited for, nothing computed
    if (threadIdx.x < pieces) wait_piece(smem_addr(smem + 8 * threadIdx.x));
    return;
  }

  float a[KV * kVec];
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  if constexpr (PROLOGUE == 1) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < KV; ++j) {
      unpack<T>(x4[lane + 32 * j], a + j * kVec);
      if (residual != nullptr) {
        float r[kVec];
        unpack<T>(reinterpret_cast<const uint4*>(residual)[lane + 32 * j], r);
        uint4 packed;
        T* pe = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          pe[e] = from_float<T>(a[j * kVec + e] + r[e]);
          a[j * kVec + e] = to_float(pe[e]);
        }
        if (blockIdx.x == 0 && warp == 0) reinterpret_cast<uint4*>(h)[lane + 32 * j] = packed;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) ss += a[j * kVec + e] * a[j * kVec + e];
    }
    const float rstd = rsqrtf(warp_sum(ss) / K + eps);
#pragma unroll
    for (int i = 0; i < KV * kVec; ++i) a[i] = round_to<T>(nw[i] * round_to<T>(a[i] * rstd));
  } else if constexpr (PROLOGUE == 2) {
#pragma unroll
    for (int j = 0; j < KV; ++j) {
      float u[kVec];
      unpack<T>(x4[lane + 32 * j], a + j * kVec);
      unpack<T>(x4[K / kVec + lane + 32 * j], u);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float g = a[j * kVec + e];
        a[j * kVec + e] = round_to<T>(round_to<T>(g / (1.f + expf(-g))) * u[e]);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < KV; ++j) unpack<T>(x4[lane + 32 * j], a + j * kVec);
  }

  for (int r = warp; r < rows; r += kWarps) {
    wait_piece(smem_addr(smem + 8 * (r / rows_per_piece)));
    const uint4* wrow = reinterpret_cast<const uint4*>(wsm + static_cast<size_t>(r) * K);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < KV; ++j) {
      float wv[kVec];
      unpack<T>(wrow[lane + 32 * j], wv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc += wv[e] * a[j * kVec + e];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += to_float(bias[row0 + r]);
      y[row0 + r] = from_float<T>(acc);
    }
  }
}

template <typename T, int PROLOGUE, int KV>
void launch(const torch::Tensor& x, const T* residual, const T* norm_weight, const torch::Tensor& w,
            const T* bias, torch::Tensor& y, T* h, int rows_per_block, int rows_per_piece, double eps, bool pdl,
            int only_load) {
  // a lane holds KV · 8 inputs (and as many norm weights) in registers: past 4 vectors, 256
  // threads a block leave room for them
  constexpr int kThreads = KV <= 4 ? 512 : 256;
  const int n = w.size(0);
  const size_t smem = kHeader + static_cast<size_t>(rows_per_block) * w.size(1) * sizeof(T);
  auto kernel = row_stream_kernel<T, PROLOGUE, KV, kThreads>;
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
                                    reinterpret_cast<T*>(y.data_ptr()), h, n, rows_per_block, rows_per_piece,
                                    static_cast<float>(eps), only_load));
}

template <typename T>
const T* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T, int PROLOGUE>
void by_width(const torch::Tensor& x, const T* r, const T* nw, const torch::Tensor& w, const T* b, torch::Tensor& y,
              T* h, int64_t rows_per_block, int64_t rows_per_piece, double eps, bool pdl, int64_t only_load) {
  TORCH_CHECK(w.size(1) % (32 * kVec) == 0, "row_stream takes a multiple of ", 32 * kVec, " columns, not ", w.size(1));
  switch (w.size(1) / (32 * kVec)) {
#define BRAID_KV(KV) \
  case KV: return launch<T, PROLOGUE, KV>(x, r, nw, w, b, y, h, rows_per_block, rows_per_piece, eps, pdl, only_load);
    BRAID_KV(2) BRAID_KV(4) BRAID_KV(6) BRAID_KV(8) BRAID_KV(12) BRAID_KV(16)
#undef BRAID_KV
  }
  TORCH_CHECK(false, "row_stream has no kernel for ", w.size(1), " columns");
}

template <typename T>
void dispatch(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
              const c10::optional<torch::Tensor>& norm_weight, const torch::Tensor& w,
              const c10::optional<torch::Tensor>& bias, torch::Tensor& y, const c10::optional<torch::Tensor>& h,
              int64_t prologue, double eps, int64_t rows_per_block, int64_t rows_per_piece, bool pdl,
              int64_t only_load) {
  const T* r = opt_ptr<T>(residual);
  const T* nw = opt_ptr<T>(norm_weight);
  const T* b = opt_ptr<T>(bias);
  T* hp = h.has_value() ? reinterpret_cast<T*>(h->data_ptr()) : nullptr;
  if (prologue == 0)
    by_width<T, 0>(x, r, nw, w, b, y, hp, rows_per_block, rows_per_piece, eps, pdl, only_load);
  else if (prologue == 1)
    by_width<T, 1>(x, r, nw, w, b, y, hp, rows_per_block, rows_per_piece, eps, pdl, only_load);
  else
    by_width<T, 2>(x, r, nw, w, b, y, hp, rows_per_block, rows_per_piece, eps, pdl, only_load);
}

}  // namespace

// y [1, N] = prologue(x) · w [N, K]ᵀ (+ bias); h (NORM with a residual) gets x + residual. The
// Python side (row_stream.py) checks dtypes, shapes, contiguity and alignment, and picks the
// block sizes; here only what would otherwise read or write out of bounds is checked again.
void row_stream(torch::Tensor x, c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> norm_weight,
                torch::Tensor w, c10::optional<torch::Tensor> bias, torch::Tensor y, c10::optional<torch::Tensor> h,
                int64_t prologue, double eps, int64_t rows_per_block, int64_t rows_per_piece, bool pdl,
                int64_t only_load) {
  TORCH_CHECK(prologue >= 0 && prologue <= 2, "prologue must be 0, 1 or 2");
  TORCH_CHECK(w.dim() == 2 && x.numel() == (prologue == 2 ? 2 : 1) * w.size(1) && y.numel() == w.size(0),
              "row_stream: x, w and y do not match");
  TORCH_CHECK(rows_per_block >= 1 && rows_per_piece >= 1 &&
                  (rows_per_block + rows_per_piece - 1) / rows_per_piece <= kMaxPieces,
              "at most ", kMaxPieces, " pieces a block");
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::ScalarType::BFloat16:
      dispatch<__nv_bfloat16>(x, residual, norm_weight, w, bias, y, h, prologue, eps, rows_per_block, rows_per_piece,
                              pdl, only_load);
      break;
    case at::ScalarType::Half:
      dispatch<__half>(x, residual, norm_weight, w, bias, y, h, prologue, eps, rows_per_block, rows_per_piece, pdl,
                       only_load);
      break;
    default: TORCH_CHECK(false, "row_stream takes float16 or bfloat16, not ", x.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("row_stream", &row_stream, "one-row matmul, weights streamed ahead"); }
