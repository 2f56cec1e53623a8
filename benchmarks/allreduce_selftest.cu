// The NVLink all-reduce's protocol on ONE GPU: two (or more) ranks as concurrent streams of one device,
// every rank's buffers in that device's memory. It checks the kernel's flags, epochs and slots over
// long chains of calls queued back to back with changing sizes, grids and dtypes (bf16, float16,
// float32), and its sums against the host's (float32, in rank order; every rank must hold the same
// bits). NVLink itself is not exercised: benchmarks/tp_allreduce.py does that on two GPUs.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 \
//     -I$(python -c 'import jax; print(jax.ffi.include_dir())') benchmarks/allreduce_selftest.cu -o /tmp/selftest
//   /tmp/selftest [ranks=2] [calls=400] [max_blocks=64]
//
// All ranks' blocks must fit on the one GPU at once (each rank has a GPU to itself in real use): with
// 8 ranks, keep max_blocks at 16 or less.

#include "../llmjax/kernels/allreduce.cu"

#include <cstdlib>
#include <cstring>
#include <random>

namespace {

#define CHECK(call)                                                                         \
  do {                                                                                      \
    cudaError_t check_error_ = (call);                                                      \
    if (check_error_ != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(check_error_)); \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

uint16_t to_bf16(float f) {  // round to nearest even, as __floats2bfloat162_rn
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

enum class Type { kBf16, kF16, kF32 };

// A 16-bit value of `type` from a float (round to nearest even) and back.
uint16_t narrow16(Type type, float f) {
  if (type == Type::kBf16) return to_bf16(f);
  const __half h = __float2half_rn(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

float widen16(Type type, uint16_t u) {
  if (type == Type::kBf16) return from_bf16(u);
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}

struct Call {
  Type type;
  int64_t elements;
  int blocks;
  std::vector<std::vector<uint8_t>> inputs;  // per rank
  std::vector<void*> in, out;                // per rank, device
};

}  // namespace

int main(int argc, char** argv) {
  const int ranks = argc > 1 ? std::atoi(argv[1]) : 2;
  const int calls = argc > 2 ? std::atoi(argv[2]) : 400;
  const int max_blocks = argc > 3 ? std::atoi(argv[3]) : kMaxBlocks;
  const int64_t slot_bytes = 2 << 20;
  std::mt19937_64 rng(7);
  std::vector<char*> bases(ranks);
  const int64_t bytes = kHeaderBytes + 2 * ranks * slot_bytes;
  for (int r = 0; r < ranks; ++r) {
    CHECK(cudaMalloc(&bases[r], bytes));
    CHECK(cudaMemset(bases[r], 0, kHeaderBytes));
  }
  std::vector<Group> views;
  for (int r = 0; r < ranks; ++r) views.push_back(view(bases, r, slot_bytes, 5ull * 1000 * 1000 * 1000));
  std::vector<cudaStream_t> streams(ranks);
  for (auto& s : streams) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

  // Every call's inputs and outputs first, then all calls queued on every rank's stream at once.
  std::vector<Call> plan(calls);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int c = 0; c < calls; ++c) {
    Call& call = plan[c];
    call.type = static_cast<Type>(rng() % 3);
    const bool wide = call.type == Type::kF32;
    const int lanes = wide ? 4 : 8;
    const int64_t max_vecs = slot_bytes / 16;
    const int64_t vecs = (c % 5 == 0) ? 1 + rng() % max_vecs : 1 + rng() % 2048;  // mostly decode-sized
    call.elements = vecs * lanes;
    call.blocks = static_cast<int>(rng() % (max_blocks + 1));  // 0: automatic (at most 32)
    if (call.blocks == 0 && max_blocks < 32) call.blocks = max_blocks;
    call.inputs.resize(ranks);
    call.in.resize(ranks);
    call.out.resize(ranks);
    for (int r = 0; r < ranks; ++r) {
      auto& host = call.inputs[r];
      host.resize(vecs * 16);
      for (int64_t i = 0; i < call.elements; ++i) {
        const float x = normal(rng);
        if (!wide) {
          const uint16_t h = narrow16(call.type, x);
          std::memcpy(host.data() + 2 * i, &h, 2);
        } else {
          std::memcpy(host.data() + 4 * i, &x, 4);
        }
      }
      CHECK(cudaMalloc(&call.in[r], host.size()));
      CHECK(cudaMalloc(&call.out[r], host.size()));
      CHECK(cudaMemcpy(call.in[r], host.data(), host.size(), cudaMemcpyHostToDevice));
    }
  }
  CHECK(cudaDeviceSynchronize());
  for (int c = 0; c < calls; ++c) {
    const Call& call = plan[c];
    const int64_t vecs = call.inputs[0].size() / 16;
    const int grid = call.blocks ? call.blocks
                                 : static_cast<int>(std::min<int64_t>(32, (vecs + 4 * kThreads - 1) / (4 * kThreads)));
    for (int r = 0; r < ranks; ++r) {
      cudaError_t e =
          call.type == Type::kBf16  ? launch<__nv_bfloat16>(streams[r], call.in[r], call.out[r], vecs, grid, views[r])
          : call.type == Type::kF16 ? launch<__half>(streams[r], call.in[r], call.out[r], vecs, grid, views[r])
                                    : launch<float>(streams[r], call.in[r], call.out[r], vecs, grid, views[r]);
      CHECK(e);
    }
  }
  CHECK(cudaDeviceSynchronize());

  int64_t wrong = 0, differ = 0, checked = 0;
  for (int c = 0; c < calls; ++c) {
    const Call& call = plan[c];
    std::vector<std::vector<uint8_t>> outs(ranks, std::vector<uint8_t>(call.inputs[0].size()));
    for (int r = 0; r < ranks; ++r)
      CHECK(cudaMemcpy(outs[r].data(), call.out[r], outs[r].size(), cudaMemcpyDeviceToHost));
    for (int r = 1; r < ranks; ++r) differ += std::memcmp(outs[0].data(), outs[r].data(), outs[0].size()) != 0;
    for (int64_t i = 0; i < call.elements; ++i) {
      float sum = 0.f;
      for (int r = 0; r < ranks; ++r) {
        if (call.type != Type::kF32) {
          uint16_t h;
          std::memcpy(&h, call.inputs[r].data() + 2 * i, 2);
          sum += widen16(call.type, h);
        } else {
          float x;
          std::memcpy(&x, call.inputs[r].data() + 4 * i, 4);
          sum += x;
        }
      }
      bool ok;
      if (call.type != Type::kF32) {
        uint16_t got;
        std::memcpy(&got, outs[0].data() + 2 * i, 2);
        ok = got == narrow16(call.type, sum);
      } else {
        float got;
        std::memcpy(&got, outs[0].data() + 4 * i, 4);
        ok = got == sum;
      }
      wrong += !ok;
      ++checked;
    }
  }
  uint64_t epoch = 0;
  CHECK(cudaMemcpy(&epoch, bases[0], sizeof(epoch), cudaMemcpyDeviceToHost));
  std::printf("%d ranks on one GPU, %d calls queued back to back (sizes 16 B-%lld B, grids 1-%d, bf16, float16 and "
              "float32): %lld of %lld sums wrong, %lld calls where the ranks' outputs differ, epoch %llu\n",
              ranks, calls, static_cast<long long>(slot_bytes), max_blocks, static_cast<long long>(wrong),
              static_cast<long long>(checked), static_cast<long long>(differ),
              static_cast<unsigned long long>(epoch));
  return wrong || differ || epoch != static_cast<uint64_t>(calls) ? 1 : 0;
}
