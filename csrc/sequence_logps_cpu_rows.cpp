// Row kernels of the CPU op, one source built for two instruction sets, as ATen builds its kernels per
// capability: here with -mavx2 -mfma -mf16c and CPU_CAPABILITY_AVX2 (namespace cpu_rows::avx2), and again
// through sequence_logps_cpu_rows_avx512.cpp with AVX-512 F/BW/VL/DQ and CPU_CAPABILITY_AVX512 (namespace
// cpu_rows::avx512), where at::vec's vectors are twice as wide. Each is called only where the processor
// runs it (cpu_rows::selected, in sequence_logps_cpu.cpp). Rows run in parallel (at::parallel_for); each
// row's arithmetic has a fixed order, so results do not depend on the thread count.
#include "sequence_logps_cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512)
#define AMAPO_ROWS_ISA avx512
#elif defined(CPU_CAPABILITY_AVX2)
#define AMAPO_ROWS_ISA avx2
#else
#error "build with CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512 (CMakeLists.txt): at::vec would be scalar code"
#endif

namespace amapo::cpu_rows::AMAPO_ROWS_ISA {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * Vec::size();  // elements per iteration: one full-width load of bf16/fp16
// The sum of exp is taken in blocks of kSumBlock elements, then over blocks: about (kSumBlock / kStep +
// V / kSumBlock) roundings per term instead of V / kStep, as accurate as ATen's cascade sum.
constexpr int64_t kSumBlock = 1024;
constexpr int64_t kRowsGrain = 1 << 15;  // elements per parallel task, at least

static_assert(at::vec::Vectorized<at::BFloat16>::size() == kStep, "a bf16 vector widens to two float vectors");

inline void load(const float* p, Vec& a, Vec& b) {
  a = Vec::loadu(p);
  b = Vec::loadu(p + Vec::size());
}
template <typename T>
inline void load(const T* p, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
}
inline void store(float* p, const Vec& a, const Vec& b) {
  a.store(p);
  b.store(p + Vec::size());
}
template <typename T>
inline void store(T* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<T>(a, b).store(p);
}

// max that propagates NaN, like at::amax (and at::vec::maximum)
inline float max_nan(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

inline float horizontal_max(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float out = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) out = max_nan(out, lanes[i]);
  return out;
}

inline float horizontal_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float out = 0.f;
  for (int i = 0; i < Vec::size(); ++i) out += lanes[i];
  return out;
}

// (max, log sum exp(x - max)) of one row, as the ATen path computes them: a NaN gives NaN, +inf gives
// (inf, NaN), an all -inf row gives NaN (x - max is NaN there).
template <typename T>
std::pair<float, float> row_stats(const T* x, int64_t vocab) {
  const int64_t body = vocab - vocab % kStep;
  Vec max0(-std::numeric_limits<float>::infinity()), max1 = max0;
  for (int64_t v = 0; v < body; v += kStep) {
    Vec a, b;
    load(x + v, a, b);
    max0 = at::vec::maximum(max0, a);
    max1 = at::vec::maximum(max1, b);
  }
  float max_x = horizontal_max(at::vec::maximum(max0, max1));
  for (int64_t v = body; v < vocab; ++v) max_x = max_nan(max_x, static_cast<float>(x[v]));
  const Vec shift(max_x);
  float sum = 0.f;
  for (int64_t block = 0; block < body; block += kSumBlock) {
    Vec sum0(0.f), sum1(0.f);
    for (int64_t v = block, end = std::min(body, block + kSumBlock); v < end; v += kStep) {
      Vec a, b;
      load(x + v, a, b);
      sum0 += (a - shift).exp();
      sum1 += (b - shift).exp();
    }
    sum += horizontal_sum(sum0 + sum1);
  }
  for (int64_t v = body; v < vocab; ++v) sum += std::exp(static_cast<float>(x[v]) - max_x);
  return {max_x, std::log(sum)};
}

// g = coef * (onehot(label) - exp((x - max) - log_sum)); g may be x itself.
template <typename T>
void row_grad(const T* x, T* g, int64_t vocab, float max_x, float log_sum, float coef, int64_t label) {
  const float x_label = static_cast<float>(x[label]);  // read before an in-place write overwrites it
  const int64_t body = vocab - vocab % kStep;
  const Vec shift(max_x), lse(log_sum), neg_coef(-coef);
  for (int64_t v = 0; v < body; v += kStep) {
    Vec a, b;
    load(x + v, a, b);
    store(g + v, ((a - shift) - lse).exp() * neg_coef, ((b - shift) - lse).exp() * neg_coef);
  }
  for (int64_t v = body; v < vocab; ++v) {
    g[v] = static_cast<T>(-coef * std::exp((static_cast<float>(x[v]) - max_x) - log_sum));
  }
  g[label] = static_cast<T>(-coef * std::exp((x_label - max_x) - log_sum) + coef);
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, kRowsGrain / vocab); }

template <typename T>
void forward_typed(const at::Tensor& logits, const at::Tensor& used, int64_t ignore_index, at::Tensor& token_logps,
                   at::Tensor& softmax_stats) {
  const int64_t steps = used.size(1), vocab = logits.size(2);
  const int64_t stride_b = logits.stride(0), stride_t = logits.stride(1);
  const T* base = logits.const_data_ptr<T>();
  const int64_t* labels = used.const_data_ptr<int64_t>();
  float* out = token_logps.mutable_data_ptr<float>();
  float* stats = softmax_stats.mutable_data_ptr<float>();
  at::parallel_for(0, used.numel(), grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t label = labels[row];
      if (label == ignore_index) {  // not read: its log-prob is 0 and its gradient 0
        out[row] = stats[2 * row] = stats[2 * row + 1] = 0.f;
        continue;
      }
      const T* x = base + (row / steps) * stride_b + (row % steps) * stride_t;
      const auto [max_x, log_sum] = row_stats(x, vocab);
      stats[2 * row] = max_x;
      stats[2 * row + 1] = log_sum;
      // (x - max) - log(sum) keeps the precision of log_softmax; max + log(sum) would round at |max|.
      out[row] = (static_cast<float>(x[label]) - max_x) - log_sum;
    }
  });
}

template <typename T>
void backward_typed(const at::Tensor& logits, const at::Tensor& used, const at::Tensor& softmax_stats,
                    const at::Tensor& coef, int64_t ignore_index, at::Tensor& grad) {
  const int64_t steps = logits.size(1), scored = used.size(1), vocab = logits.size(2);
  const T* x_base = logits.const_data_ptr<T>();
  T* g_base = grad.mutable_data_ptr<T>();  // may be x_base: each row is read before it is written
  const int64_t* labels = used.const_data_ptr<int64_t>();
  const float* stats = softmax_stats.const_data_ptr<float>();
  const float* coefs = coef.const_data_ptr<float>();
  at::parallel_for(0, logits.size(0) * steps, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / steps, t = row % steps, scored_row = b * scored + t;
      T* g = g_base + b * grad.stride(0) + t * grad.stride(1);
      const int64_t label = t < scored ? labels[scored_row] : ignore_index;  // the last step scores nothing with shift
      if (label == ignore_index) {
        std::fill(g, g + vocab, static_cast<T>(0));  // exact zeros, even for inf or NaN logits
        continue;
      }
      row_grad(x_base + b * logits.stride(0) + t * logits.stride(1), g, vocab, stats[2 * scored_row],
               stats[2 * scored_row + 1], coefs[b], label);
    }
  });
}

template <typename Fn>
void dispatch(at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(at::BFloat16{});
    case at::kHalf: return fn(at::Half{});
    default: TORCH_CHECK(false, "amapo_kernels: the CPU row kernels take fp32, bf16 or fp16, not ", dtype);
  }
}

}  // namespace

void forward(const at::Tensor& logits, const at::Tensor& used, int64_t ignore_index, at::Tensor& token_logps,
             at::Tensor& softmax_stats) {
  dispatch(logits.scalar_type(), [&](auto tag) {
    forward_typed<decltype(tag)>(logits, used, ignore_index, token_logps, softmax_stats);
  });
}

void backward(const at::Tensor& logits, const at::Tensor& used, const at::Tensor& softmax_stats,
              const at::Tensor& coef, int64_t ignore_index, at::Tensor& grad) {
  dispatch(logits.scalar_type(), [&](auto tag) {
    backward_typed<decltype(tag)>(logits, used, softmax_stats, coef, ignore_index, grad);
  });
}

}  // namespace amapo::cpu_rows::AMAPO_ROWS_ISA
