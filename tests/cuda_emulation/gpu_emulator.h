// A CPU emulation of the CUDA execution model, enough to run this project's kernels (csrc/*_kernels.cuh) and the
// host code that launches them on a machine without a GPU. The tests use it to check the CUDA code's results, its
// synchronization and its data races where no GPU is lent; it does not replace a run on a GPU.
//
// - The blocks of a grid run one after another, in an order the schedule chooses. __shared__ variables are
//   statics in a section of their own, which is per-block storage when one block runs at a time; the section is
//   filled with 0xff bytes (NaN in floats, -1 in integers) before every block, as a GPU gives no initial value.
// - A block's threads are fibers (ucontext) on the calling OS thread. The schedule picks one runnable fiber at a
//   time and runs it until it reaches __syncthreads or a warp shuffle, or exits. A warp's shuffle completes as
//   soon as its 32 lanes wait at a shuffle with the same mask and lane mask, so a warp may run ahead of the others
//   up to the next barrier, as on a GPU; the block barrier opens when every thread of the block waits at it.
//   Anything else (a thread that exits while others wait at the barrier, lanes of a warp at different primitives,
//   a partial mask) is a std::runtime_error naming the block and the threads' states: on a GPU it is undefined
//   behaviour or a hang.
// - Which fiber runs next decides what a racy read sees: a read of what another thread writes without a barrier
//   between (a missing __syncthreads) gives results that depend on the schedule. The tests run each kernel under
//   several schedules (lowest thread first, highest first, random) and compare the bits.
// - The MUFU exponential (ex2.approx.ftz.f32) is modelled at its accuracy bound, 2 ulps: exp2f moved by a
//   pseudo-random -2..2 ulps (a hash of the argument's bits, so runs repeat), subnormal results flushed to zero,
//   integer arguments exact (2^0 = 1: on the H200, a row of one logit gave a log-prob of exactly 0).
// - 16-byte vector accesses (uint4 loads and stores) must be 16-byte aligned, as on a GPU (where a misaligned one
//   is a fault): the CPU reads them anywhere, so every uint4 copy checks both addresses, and a misaligned one is a
//   std::runtime_error once the fiber that made it yields.
// What it does not model: the hardware's exact fast-exp values (only their error bound), warp-synchronous code
// without a shuffle (these kernels have none), memory outside the tensors it is given (the tests surround them
// with NaN guard bands), preemption between two synchronization points (a race between two writes there is seen
// only through its effect on later reads).
//
// Include it after the torch headers and before the kernels: it defines the CUDA keywords they use.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("amapo_emulated_shared")))
#define AMAPO_EX2_APPROX_FTZ gpu_emulator::ex2_approx_ftz

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
// Set by the scheduler before it resumes a fiber.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace gpu_emulator {
// The first misaligned vector access of the running block (a fiber cannot throw: the scheduler reports it).
inline std::string misaligned_access;

inline void check_vector_aligned(const void* address, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % 16 == 0 || !misaligned_access.empty()) return;
  std::ostringstream message;
  message << "misaligned 16-byte " << what << " at " << address << " (thread " << threadIdx.x << ")";
  misaligned_access = message.str();
}

// Copies 16 bytes, checking both addresses first. The pointers pass through integers so that the compiler cannot
// assume uint4's alignment and emit aligned SSE moves, which would fault before the check could report.
inline void copy_vector(void* to, const void* from) {
  check_vector_aligned(from, "load");
  check_vector_aligned(to, "store");
  std::memcpy(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(to)),
              reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(from)), 16);
}
}  // namespace gpu_emulator

struct alignas(16) uint4 {
  unsigned x, y, z, w;
  uint4() = default;
  uint4(const uint4& other) { gpu_emulator::copy_vector(this, &other); }
  uint4& operator=(const uint4& other) {
    gpu_emulator::copy_vector(this, &other);
    return *this;
  }
};

// The device math the kernels call unqualified, with the float overloads of the CUDA headers.
namespace amapo {
using std::exp;
using std::fabs;
using std::fmax;
using std::fmin;
using std::isnan;
using std::log;
using std::log1p;
using std::max;
using std::min;
using std::sqrt;
}  // namespace amapo

namespace gpu_emulator {

// ex2.approx.ftz.f32 of a: 2^a within 2 ulps, exact for an integer a, a subnormal result flushed to zero.
inline float ex2_approx_ftz(float a) {
  float y = std::exp2f(a);
  if (!std::isfinite(y) || y == 0.0f) return y;
  if (y < std::numeric_limits<float>::min()) return 0.0f;
  if (a == std::nearbyint(a)) return y;  // a power of two
  uint32_t a_bits, y_bits;
  std::memcpy(&a_bits, &a, sizeof a);
  std::memcpy(&y_bits, &y, sizeof y);
  const uint32_t mixed = (a_bits ^ (a_bits >> 16)) * 0x45d9f3bu;  // a cheap integer hash
  y_bits += static_cast<uint32_t>(static_cast<int32_t>((mixed ^ (mixed >> 16)) % 5) - 2);
  std::memcpy(&y, &y_bits, sizeof y);
  return y;
}

constexpr unsigned kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { Runnable, AtBarrier, AtShuffle, Exited };

struct Fiber {
  ucontext_t context;
  State state = State::Runnable;
  unsigned shuffle_mask = 0;
  int shuffle_lane_mask = 0;
  uint64_t shuffle_value = 0;  // this lane's value while it waits; its partner's when it resumes
};

// The order in which blocks start and fibers run: 0 the lowest index first, 1 the highest first, any other value
// random choices from a generator seeded with it. Each keeps running one warp while it can (a random lane of it,
// for the random ones) before it turns to another: a warp running far ahead of the others is what exposes a
// missing barrier.
class Schedule {
 public:
  explicit Schedule(uint64_t seed) : seed_(seed), generator_(seed) {}

  std::vector<unsigned> order(unsigned n) {
    std::vector<unsigned> items(n);
    std::iota(items.begin(), items.end(), 0u);
    if (seed_ == 1) std::reverse(items.begin(), items.end());
    if (seed_ > 1) std::shuffle(items.begin(), items.end(), generator_);
    return items;
  }

  // One of the (non-empty, ascending) candidate threads.
  unsigned pick(const std::vector<unsigned>& candidates, unsigned warp_size) {
    if (seed_ == 0) return candidates.front();
    if (seed_ == 1) return candidates.back();
    std::vector<unsigned> same_warp;
    for (unsigned t : candidates) {
      if (t / warp_size == warp_) same_warp.push_back(t);
    }
    const auto& pool = same_warp.empty() ? candidates : same_warp;
    const unsigned t = pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(generator_)];
    warp_ = t / warp_size;
    return t;
  }

 private:
  uint64_t seed_;
  std::mt19937_64 generator_;
  unsigned warp_ = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  unsigned current = 0;
};

// The bounds of the __shared__ variables' section, from the linker (weak: none where no kernel declares one).
extern "C" char __start_amapo_emulated_shared[] __attribute__((weak));
extern "C" char __stop_amapo_emulated_shared[] __attribute__((weak));

inline void poison_shared_memory() {
  if (__start_amapo_emulated_shared == nullptr) return;
  std::memset(__start_amapo_emulated_shared, 0xff, __stop_amapo_emulated_shared - __start_amapo_emulated_shared);
}

inline Block* running = nullptr;  // the block whose fibers are being run (one at a time: no OS threads here)

inline Fiber& current_fiber() { return running->fibers[running->current]; }

inline void suspend(State state) {
  Fiber& fiber = current_fiber();
  fiber.state = state;
  swapcontext(&fiber.context, &running->scheduler);
}

inline void fiber_entry() {
  (*running->body)();
  current_fiber().state = State::Exited;  // returning resumes uc_link, the scheduler
}

inline const char* state_name(State state) {
  switch (state) {
    case State::Runnable:
      return "runnable";
    case State::AtBarrier:
      return "at __syncthreads";
    case State::AtShuffle:
      return "at a shuffle";
    default:
      return "exited";
  }
}

[[noreturn]] inline void fail(const Block& block, const std::string& what) {
  std::ostringstream message;
  message << "emulated kernel, block " << blockIdx.x << ": " << what << "; threads:";
  for (size_t t = 0; t < block.fibers.size(); ++t) {
    if (t == 0 || block.fibers[t].state != block.fibers[t - 1].state) {
      message << " " << t << "+ " << state_name(block.fibers[t].state) << ";";
    }
  }
  throw std::runtime_error(message.str());
}

// Completes the shuffle of thread t's warp if all its lanes wait at one.
inline void complete_shuffle(Block& block, unsigned t) {
  const unsigned first = t / kWarpSize * kWarpSize;
  const unsigned lanes = std::min<unsigned>(kWarpSize, static_cast<unsigned>(block.fibers.size()) - first);
  Fiber* warp = &block.fibers[first];
  if (!std::all_of(warp, warp + lanes, [](const Fiber& f) { return f.state == State::AtShuffle; })) return;
  const int lane_mask = warp[0].shuffle_lane_mask;
  for (unsigned lane = 0; lane < lanes; ++lane) {
    if (lanes != kWarpSize || warp[lane].shuffle_mask != 0xffffffffu || warp[lane].shuffle_lane_mask != lane_mask ||
        lane_mask < 0 || lane_mask >= int(kWarpSize)) {
      fail(block, "a warp's lanes disagree on a shuffle's mask or lane mask (or the warp is partial)");
    }
  }
  uint64_t values[kWarpSize];
  for (unsigned lane = 0; lane < lanes; ++lane) values[lane] = warp[lane].shuffle_value;
  for (unsigned lane = 0; lane < lanes; ++lane) {
    warp[lane].shuffle_value = values[lane ^ unsigned(lane_mask)];
    warp[lane].state = State::Runnable;
  }
}

// Runs one block to completion, one fiber at a time as the schedule picks them.
// The fibers' stacks, kept from launch to launch (allocating and clearing 256 of them per launch cost more than
// most kernels here).
inline char* fiber_stack(unsigned thread) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= thread) stacks.emplace_back(new char[kStackBytes]);
  return stacks[thread].get();
}

inline void run_block(Block& block, Schedule& schedule) {
  const unsigned threads = static_cast<unsigned>(block.fibers.size());
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    fiber = Fiber{};
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber_stack(t);
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  poison_shared_memory();
  running = &block;
  std::vector<unsigned> runnable;
  for (;;) {
    runnable.clear();
    for (unsigned t = 0; t < threads; ++t) {
      if (block.fibers[t].state == State::Runnable) runnable.push_back(t);
    }
    if (!runnable.empty()) {
      const unsigned t = schedule.pick(runnable, kWarpSize);
      block.current = t;
      threadIdx = dim3{t, 0, 0};
      swapcontext(&block.scheduler, &block.fibers[t].context);
      if (!misaligned_access.empty()) {
        const std::string what = std::move(misaligned_access);
        misaligned_access.clear();
        fail(block, what);
      }
      if (block.fibers[t].state == State::AtShuffle) complete_shuffle(block, t);
      continue;
    }
    const auto count = [&](State state) {
      return std::count_if(block.fibers.begin(), block.fibers.end(), [&](const Fiber& f) { return f.state == state; });
    };
    if (count(State::Exited) == threads) break;
    if (count(State::AtBarrier) != threads) {
      fail(block, "threads wait at different synchronization points, or at one that others exited without reaching");
    }
    for (Fiber& fiber : block.fibers) fiber.state = State::Runnable;
  }
  running = nullptr;
}

inline uint64_t launches = 0;  // grids run so far: the tests check that the emulation is what ran

// kernel<<<grid, threads>>>: `body` is the kernel call with its arguments bound.
inline void run_grid(unsigned grid, unsigned threads, uint64_t schedule_seed, const std::function<void()>& body) {
  if (threads == 0 || threads > 1024) throw std::runtime_error("emulated launch: threads per block must be 1..1024");
  if (running != nullptr) throw std::runtime_error("emulated launch from inside a kernel");
  ++launches;
  Schedule schedule(schedule_seed);
  Block block;
  block.fibers.resize(threads);
  block.body = &body;
  gridDim = dim3{grid, 1, 1};
  blockDim = dim3{threads, 1, 1};
  for (unsigned b : schedule.order(grid)) {
    blockIdx = dim3{b, 0, 0};
    try {
      run_block(block, schedule);
    } catch (...) {
      running = nullptr;
      throw;
    }
  }
}

}  // namespace gpu_emulator

inline void __syncthreads() { gpu_emulator::suspend(gpu_emulator::State::AtBarrier); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
  gpu_emulator::Fiber& fiber = gpu_emulator::current_fiber();
  fiber.shuffle_mask = mask;
  fiber.shuffle_lane_mask = lane_mask;
  std::memcpy(&fiber.shuffle_value, &value, sizeof(T));
  gpu_emulator::suspend(gpu_emulator::State::AtShuffle);
  T result;
  std::memcpy(&result, &fiber.shuffle_value, sizeof(T));
  return result;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}
