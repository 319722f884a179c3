// AMaPO's adaptive margin and per-pair loss, shared by the CPU and CUDA kernels.
// All arithmetic is fp64: B is small, and the gate d < mean must not flip from rounding.
// amapo_kernels/reference.py holds the same definitions, written out for readers.
#pragma once

#include <cfloat>
#include <cmath>

#include "common.h"

namespace amapo {

// Exponent cap of the exp margin: beta * e^50 ~ beta * 5.2e21 keeps loss and grads finite in fp32.
constexpr double kMaxMarginExponent = 50.0;

enum class Variant : int { Code = 0, Paper = 1 };
enum class Ablation : int { None = 0, NoZnorm = 1, NoExp = 2, NoAdaptive = 3, NoZero = 4 };

struct BatchStats {
  double count;
  double pivot;   // the mean is pivot + offset: a value near the data plus a mean deviation from it, so
  double offset;  // gaps to the mean keep full relative precision however small the spread
  double std;     // 0 means "no spread": every margin is 0
  AMAPO_HOST_DEVICE double mean() const { return pivot + offset; }
  AMAPO_HOST_DEVICE double gap(double d) const { return (pivot - d) + offset; }  // mean - d
};

// Mean and unbiased std of d from its combined moments (count, pivot, mean offset, M2 = sum of squared
// deviations), merged over ranks by Chan's formula (amapo_kernels/batch_statistics.py). M2 is 0 exactly
// when every d is equal, so "no spread" needs no tolerance. A non-finite d makes M2 NaN: the std is then NaN,
// not "no spread", and the margins follow the formula (NaN where gated), as the fp64 reference's do.
AMAPO_HOST_DEVICE BatchStats batch_stats_from_moments(double count, double pivot, double offset, double m2) {
  BatchStats stats{count, pivot, offset, 0.0};
  if (count >= 2 && m2 != 0) stats.std = sqrt(m2 / (count - 1));
  return stats;
}

// Detached margin of one pair with log-prob gap d = chosen - rejected (length-normalized).
AMAPO_HOST_DEVICE double adaptive_margin(double d, BatchStats stats, double beta, Variant variant,
                                         Ablation ablation) {
  if (stats.std == 0) return 0.0;
  const bool paper = variant == Variant::Paper;
  // The oracle estimate (batch mean) and the gap to it, in the variant's reward units.
  const double unit = paper ? beta : 1.0;
  const double mean = stats.mean();
  const double oracle = unit * mean;
  const double gap = unit * stats.gap(d);
  const double difficulty = ablation == Ablation::NoZnorm ? gap : gap / (unit * stats.std);
  double exponent = difficulty * oracle;
  // Eq. 9: gamma = max(., 0), which no_zero keeps (it removes only Eq. 10's h(0) = 0); a NaN stays NaN
  if (paper && exponent < 0) exponent = 0.0;
  // Eq. 10 gates the paper variant on gamma > 0; no_adaptive is Eq. 8, gated on r < mu_r whatever mu_r's sign
  const bool gated = ablation == Ablation::NoZero ||
                     ((paper && ablation != Ablation::NoAdaptive) ? exponent > 0 : gap > 0);
  if (!gated) return 0.0;
  switch (ablation) {
    case Ablation::NoExp:
      return beta * exponent;
    case Ablation::NoAdaptive:
      return beta * mean;
    default:
      return beta * exp(exponent > kMaxMarginExponent ? kMaxMarginExponent : exponent);  // fmin would drop a NaN
  }
}

AMAPO_HOST_DEVICE double softplus(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

AMAPO_HOST_DEVICE double sigmoid(double x) {
  return x >= 0 ? 1.0 / (1.0 + exp(-x)) : exp(x) / (1.0 + exp(x));
}

// -(1-eps) logsigmoid(x) - eps logsigmoid(-x), with x = beta * d - margin.
AMAPO_HOST_DEVICE double pair_loss(double x, double eps) {
  return (1.0 - eps) * softplus(-x) + eps * softplus(x);
}

// d pair_loss / dx, without the cancellation of sigmoid(x) - (1 - eps) when sigmoid(x) is near 1.
AMAPO_HOST_DEVICE double pair_loss_grad(double x, double eps) {
  return eps * sigmoid(x) - (1.0 - eps) * sigmoid(-x);
}

}  // namespace amapo
