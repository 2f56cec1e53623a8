// llmjax's tensor-parallel all-reduce for small activations, over NVLink peer memory.
//
// A decode step at tensor=2 sums a few KiB per layer twice; through XLA's psum each costs ~20 us,
// most of it not moving bytes. This kernel is one XLA FFI custom call on the compute stream:
//
//   1. every device pushes its activation into each peer's receive area (NVLink stores),
//   2. raises one flag per (peer, block) with a system-scope release,
//   3. waits for each peer's flag with a system-scope acquire,
//   4. adds the members' values in rank order, in float32: every member computes the same sum the
//      same way, so every member holds the same bits afterwards.
//
// The receive area has two slots, alternating per call: a device can push call e's data only after
// its call e-1 saw every peer's flag for e-1, and a peer raises that flag only after it has finished
// reading call e-2's slot (its kernels run in stream order), so a slot is never overwritten while it
// is read. The call counter (the "epoch") lives in device memory, advanced by the last block of each
// call, so the handler may be captured in a CUDA graph and replayed: no host state changes per call.
//
// The argument needs each device to run its calls one at a time, in program order: XLA does so
// (one compute stream per device; Llama's all-reduces depend on each other through the residual).
//
// Buffers belong to a group (the devices of one all-reduce, in rank order) and are allocated once by
// `llmjax_allreduce_setup`, called from Python when the program is traced; the handler looks its
// group up by the device it runs on. One process drives every device of a group (single-host
// tensor parallelism); several processes keep XLA's psum.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 64;
constexpr int kThreads = 512;

// One member's view of its group: its rank and every member's buffers (peers' through peer mapping).
struct Group {
  int rank;
  int size;
  int64_t slot_bytes;
  char* recv[kMaxRanks];       // member q's receive area: [2 slots][size ranks][slot_bytes]
  uint64_t* flags[kMaxRanks];  // member q's arrival flags: [kMaxRanks senders][kMaxBlocks]
  uint64_t* epoch;             // this member's calls done (64 bits: a flag never wraps around)
  uint32_t* done;              // this member's blocks done in the current call
  uint64_t timeout_ns;         // a peer that has not arrived by then: trap, saying so
};

__device__ __forceinline__ void store_release(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint4* area(char* recv, uint64_t slot, int sender, int size, int64_t slot_bytes) {
  return reinterpret_cast<uint4*>(recv + (static_cast<int64_t>(slot) * size + sender) * slot_bytes);
}

// 16 bytes of T, widened to float and back.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int n = 4;
  __device__ static void add(float* acc, uint4 v) {
    const float* f = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int i = 0; i < n; ++i) acc[i] += f[i];
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    float* f = reinterpret_cast<float*>(&v);
#pragma unroll
    for (int i = 0; i < n; ++i) f[i] = acc[i];
    return v;
  }
};

// bfloat16 and float16: 8 lanes, widened and narrowed in pairs.
__device__ __forceinline__ float2 widen(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 widen(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ void narrow(float a, float b, __nv_bfloat162* h) { *h = __floats2bfloat162_rn(a, b); }
__device__ __forceinline__ void narrow(float a, float b, __half2* h) { *h = __floats2half2_rn(a, b); }

template <typename Pair>
struct PairLanes {
  static constexpr int n = 8;
  __device__ static void add(float* acc, uint4 v) {
    const Pair* h = reinterpret_cast<const Pair*>(&v);
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float2 f = widen(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static uint4 pack(const float* acc) {
    uint4 v;
    Pair* h = reinterpret_cast<Pair*>(&v);
#pragma unroll
    for (int i = 0; i < n / 2; ++i) narrow(acc[2 * i], acc[2 * i + 1], &h[i]);
    return v;
  }
};

template <>
struct Lanes<__nv_bfloat16> : PairLanes<__nv_bfloat162> {};

template <>
struct Lanes<__half> : PairLanes<__half2> {};

template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot(const uint4* __restrict__ in, uint4* __restrict__ out,
                                                     int64_t vecs, Group g) {
  __shared__ uint64_t epoch_shared;
  const int tid = threadIdx.x;
  if (tid == 0) epoch_shared = *reinterpret_cast<volatile uint64_t*>(g.epoch) + 1;
  __syncthreads();
  const uint64_t epoch = epoch_shared;
  const uint64_t slot = epoch & 1;
  const int64_t per_block = (vecs + gridDim.x - 1) / gridDim.x;
  const int64_t lo = min(vecs, static_cast<int64_t>(blockIdx.x) * per_block);
  const int64_t hi = min(vecs, lo + per_block);

  // 1. this block's chunk into every peer's receive area, at this member's rank
  for (int64_t i = lo + tid; i < hi; i += blockDim.x) {
    const uint4 v = in[i];
    for (int q = 0; q < g.size; ++q)
      if (q != g.rank) area(g.recv[q], slot, g.rank, g.size, g.slot_bytes)[i] = v;
  }
  __syncthreads();

  // 2. and 3. thread q raises this block's flag at peer q, then waits for peer q's flag here
  // (The barrier orders the block's stores before the release, which is cumulative.)
  if (tid < g.size && tid != g.rank) {
    store_release(g.flags[tid] + g.rank * kMaxBlocks + blockIdx.x, epoch);
    const uint64_t* flag = g.flags[g.rank] + tid * kMaxBlocks + blockIdx.x;
    const uint64_t start = now_ns();
    // A peer may already be a call ahead (its flag at epoch + 1): wait for at least this epoch.
    while (load_acquire(flag) < epoch) {
      if (now_ns() - start > g.timeout_ns) {
        printf("llmjax all-reduce: rank %d waited %llu s for rank %d (call %llu, block %d): the GPUs' "
               "programs diverged or one is stalled (LLMJAX_ALLREDUCE_TIMEOUT_S)\n", g.rank,
               static_cast<unsigned long long>(g.timeout_ns / 1000000000ull), tid,
               static_cast<unsigned long long>(epoch), blockIdx.x);
        __trap();
      }
    }
  }
  __syncthreads();

  // 4. the members' values in rank order, in float32
  for (int64_t i = lo + tid; i < hi; i += blockDim.x) {
    float acc[Lanes<T>::n] = {};
    for (int q = 0; q < g.size; ++q) {
      const uint4 v = q == g.rank ? in[i] : __ldcg(area(g.recv[g.rank], slot, q, g.size, g.slot_bytes) + i);
      Lanes<T>::add(acc, v);
    }
    out[i] = Lanes<T>::pack(acc);
  }

  // 5. the last block done advances the call counter the next call reads
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(g.done, 1u) == gridDim.x - 1) {
      *g.done = 0;
      *g.epoch = epoch;
      __threadfence();
    }
  }
}

// --- groups: allocated once per set of devices, looked up by each call ---

std::mutex setup_mutex;     // one setup at a time; held across its CUDA calls
std::mutex registry_mutex;  // the map only, held for a lookup or an insertion, never across CUDA calls
std::map<std::vector<int>, std::vector<Group>> registry;  // ordinals in rank order -> each member's view
thread_local std::string last_error;  // read by the thread whose setup failed

int fail(const std::string& message) {
  last_error = message;
  cudaGetLastError();  // leave no error behind for a later launch check on this thread
  return 1;
}

std::string cuda_message(const char* what, int device, cudaError_t err) {
  return std::string(what) + " on GPU " + std::to_string(device) + ": " + cudaGetErrorString(err);
}

constexpr int64_t kHeaderBytes = 256 + kMaxRanks * kMaxBlocks * sizeof(uint64_t);  // counters, flags

// Member `rank`'s view of a group whose members' buffers start at `bases` (each kHeaderBytes of
// counters and flags, then the receive area).
Group view(const std::vector<char*>& bases, int rank, int64_t slot_bytes, uint64_t timeout_ns) {
  Group g;
  g.rank = rank;
  g.size = static_cast<int>(bases.size());
  g.slot_bytes = slot_bytes;
  g.timeout_ns = timeout_ns;
  g.epoch = reinterpret_cast<uint64_t*>(bases[rank]);
  g.done = reinterpret_cast<uint32_t*>(bases[rank] + sizeof(uint64_t));
  for (int q = 0; q < kMaxRanks; ++q) {
    g.flags[q] = q < g.size ? reinterpret_cast<uint64_t*>(bases[q] + 256) : nullptr;
    g.recv[q] = q < g.size ? bases[q] + kHeaderBytes : nullptr;
  }
  return g;
}

const Group* find(const std::vector<int>& ordinals, int device) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto found = registry.find(ordinals);
  if (found == registry.end()) return nullptr;
  for (const Group& view : found->second)  // map nodes and their vectors never move once inserted
    if (ordinals[view.rank] == device) return &view;
  return nullptr;
}

int setup(const std::vector<int>& ordinals, int64_t slot_bytes, uint64_t timeout_ns) {
  const int size = static_cast<int>(ordinals.size());
  const Group* existing = find(ordinals, ordinals.empty() ? -1 : ordinals[0]);
  if (existing != nullptr) {
    if (existing->slot_bytes >= slot_bytes) return 0;
    return fail("the all-reduce buffers of this group were set up for " + std::to_string(existing->slot_bytes) +
                " bytes per member, not " + std::to_string(slot_bytes) +
                "; set LLMJAX_ALLREDUCE_BYTES before the first call");
  }
  if (size < 2 || size > kMaxRanks) return fail("an all-reduce group has 2 to 8 members, not " + std::to_string(size));
  int previous = 0;
  cudaGetDevice(&previous);
  std::vector<char*> bases(size, nullptr);
  auto undo = [&](const std::string& message) {
    for (int r = 0; r < size; ++r) {
      if (bases[r] != nullptr) {
        cudaSetDevice(ordinals[r]);
        cudaFree(bases[r]);
      }
    }
    cudaSetDevice(previous);
    return fail(message);
  };
  const int64_t bytes = kHeaderBytes + 2 * size * slot_bytes;
  for (int r = 0; r < size; ++r) {
    const int d = ordinals[r];
    cudaError_t err = cudaSetDevice(d);
    if (err == cudaSuccess) err = cudaMalloc(&bases[r], bytes);
    cudaStream_t stream = nullptr;
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) err = cudaMemsetAsync(bases[r], 0, kHeaderBytes, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (err != cudaSuccess) return undo(cuda_message("allocating the all-reduce buffers", d, err));
    for (int q = 0; q < size; ++q) {
      if (q == r) continue;
      int can = 0;
      err = cudaDeviceCanAccessPeer(&can, d, ordinals[q]);
      if (err != cudaSuccess) return undo(cuda_message("asking for peer access", d, err));
      if (!can)
        return undo("GPU " + std::to_string(d) + " cannot access GPU " + std::to_string(ordinals[q]) +
                    "'s memory (no peer access, e.g. no NVLink or P2P)");
      err = cudaDeviceEnablePeerAccess(ordinals[q], 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // XLA enabled it already
      } else if (err != cudaSuccess) {
        return undo(cuda_message("enabling peer access", d, err));
      }
    }
  }
  cudaSetDevice(previous);
  std::vector<Group> views;
  for (int r = 0; r < size; ++r) views.push_back(view(bases, r, slot_bytes, timeout_ns));
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.emplace(ordinals, std::move(views));
  return 0;
}

template <typename T>
cudaError_t launch(cudaStream_t stream, const void* in, void* out, int64_t vecs, int blocks, const Group& g) {
  cudaGetLastError();  // an earlier call's error on this thread is not this launch's
  one_shot<T><<<blocks, kThreads, 0, stream>>>(static_cast<const uint4*>(in), static_cast<uint4*>(out), vecs, g);
  return cudaGetLastError();
}

ffi::Error all_reduce(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                      ffi::Span<const int64_t> groups, int64_t group_size, int64_t blocks) {
  if (group_size < 2 || group_size > kMaxRanks || groups.size() % group_size != 0)
    return ffi::Error::InvalidArgument("llmjax all-reduce: groups of " + std::to_string(group_size) +
                                       " in a table of " + std::to_string(groups.size()));
  if (blocks < 0 || blocks > kMaxBlocks)
    return ffi::Error::InvalidArgument("llmjax all-reduce: blocks must be 0 (automatic) to " +
                                       std::to_string(kMaxBlocks) + ", not " + std::to_string(blocks));
  // The row of `groups` (every group of the mesh, each in rank order) that holds this device.
  std::vector<int> ordinals;
  for (size_t start = 0; start < groups.size() && ordinals.empty(); start += group_size) {
    for (int64_t r = 0; r < group_size; ++r) {
      if (groups[start + r] == device) {
        ordinals.assign(groups.begin() + start, groups.begin() + start + group_size);
        break;
      }
    }
  }
  if (ordinals.empty())
    return ffi::Error::InvalidArgument("llmjax all-reduce: GPU " + std::to_string(device) + " is in no group");
  const Group* g = find(ordinals, device);
  if (g == nullptr)
    return ffi::Error::Internal("llmjax all-reduce: the group of GPU " + std::to_string(device) +
                                " was not set up (llmjax_allreduce_setup)");
  const int64_t bytes = static_cast<int64_t>(x.size_bytes());
  if (bytes % 16 != 0 || bytes > g->slot_bytes)
    return ffi::Error::InvalidArgument("llmjax all-reduce: " + std::to_string(bytes) +
                                       " bytes do not fit its slot of " + std::to_string(g->slot_bytes) +
                                       " in 16-byte pieces");
  if (reinterpret_cast<uintptr_t>(x.untyped_data()) % 16 || reinterpret_cast<uintptr_t>(y->untyped_data()) % 16)
    return ffi::Error::InvalidArgument("llmjax all-reduce: its buffers must be 16-byte aligned");
  const int64_t vecs = bytes / 16;
  if (vecs == 0) return ffi::Error::Success();
  int grid = static_cast<int>(blocks);
  if (grid == 0) grid = static_cast<int>(std::min<int64_t>(32, (vecs + 4 * kThreads - 1) / (4 * kThreads)));
  cudaError_t err;
  switch (x.element_type()) {
    case ffi::DataType::BF16:
      err = launch<__nv_bfloat16>(stream, x.untyped_data(), y->untyped_data(), vecs, grid, *g);
      break;
    case ffi::DataType::F16:
      err = launch<__half>(stream, x.untyped_data(), y->untyped_data(), vecs, grid, *g);
      break;
    case ffi::DataType::F32:
      err = launch<float>(stream, x.untyped_data(), y->untyped_data(), vecs, grid, *g);
      break;
    default:
      return ffi::Error::InvalidArgument("llmjax all-reduce: takes bfloat16, float16 or float32");
  }
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("llmjax all-reduce: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

// The handler, twice: once for XLA to launch on its own, once declared safe to capture in XLA's
// CUDA graphs (the epoch lives on the device, so a replay is a new call).
static auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Ctx<ffi::DeviceOrdinal>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("groups")
      .Attr<int64_t>("group_size")
      .Attr<int64_t>("blocks");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmjax_allreduce, all_reduce, binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(llmjax_allreduce_graph, all_reduce, binding(), {ffi::Traits::kCmdBufferCompatible});

// Allocates a group's buffers on each of its `size` GPUs (CUDA ordinals, in rank order) and lets
// each reach the others'. Returns 0, or 1 with the reason in llmjax_allreduce_error().
// A call whose peer has not arrived after `timeout_s` seconds stops its GPU with a message (a trap).
extern "C" int llmjax_allreduce_setup(const int* ordinals, int size, int64_t slot_bytes, double timeout_s) {
  std::lock_guard<std::mutex> lock(setup_mutex);
  return setup(std::vector<int>(ordinals, ordinals + size), slot_bytes,
               static_cast<uint64_t>(timeout_s * 1e9));
}

// How many CUDA GPUs this process sees (a CUDA error: its negated code).
extern "C" int llmjax_allreduce_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return -static_cast<int>(err);
  }
  return count;
}

// Why the last setup on this thread failed.
extern "C" const char* llmjax_allreduce_error() { return last_error.c_str(); }
