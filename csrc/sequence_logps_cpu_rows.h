// Row kernels of the CPU op (sequence_logps_cpu_rows.cpp): one pass per row for the max, one for the sum of
// exp, one for the gradient, each over a row that stays in cache, with ATen's vectorized exp (Sleef, 1 ulp).
// The source is built twice, for AVX2 + FMA + F16C (namespace avx2) and for AVX-512 F/BW/VL/DQ (namespace
// avx512). sequence_logps_cpu.cpp uses the selected set for fp32/bf16/fp16 logits, and ATen's ops on row
// blocks when none is (and for fp64).
#pragma once

#include <ATen/ATen.h>

namespace amapo::cpu_rows {

enum class Isa { aten, avx2, avx512 };

// The kernels this process uses, chosen once from AMAPO_CPU_KERNELS: "auto" (or unset) the widest set this
// build and processor have (ATen's ops where none), "avx512" or "avx2" that set, "aten" ATen's ops (so the
// tests can hold every path to the same reference). A set the build or processor lacks, or another value,
// is an error naming the variable, never a quiet fallback.
Isa selected();
const char* isa_name(Isa isa);

// token_logps [B, T'] and softmax_stats [B, T', 2] (fp32) from logits [B, T, V] (vocab dense) and the
// contiguous scored labels [B, T'], T' = T - shift.
// grad [B, T, V] (a new tensor, or the logits themselves): coef[b] * (onehot(label) - softmax(x)) on scored
// rows, exact zeros elsewhere. Each row is read before it is written, so grad may alias logits.
#define AMAPO_DECLARE_ROW_KERNELS(isa)                                                                        \
  namespace isa {                                                                                             \
  void forward(const at::Tensor& logits, const at::Tensor& used, int64_t ignore_index, at::Tensor& token_logps, \
               at::Tensor& softmax_stats);                                                                    \
  void backward(const at::Tensor& logits, const at::Tensor& used, const at::Tensor& softmax_stats,             \
                const at::Tensor& coef, int64_t ignore_index, at::Tensor& grad);                              \
  }
AMAPO_DECLARE_ROW_KERNELS(avx2)
AMAPO_DECLARE_ROW_KERNELS(avx512)
#undef AMAPO_DECLARE_ROW_KERNELS

}  // namespace amapo::cpu_rows
