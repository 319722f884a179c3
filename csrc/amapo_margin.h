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
  double mean;
  double std;  // 0 means "no spread": every margin is 0
};

// Mean and unbiased std of d from (sum, sum of squares, count), all-reduced over ranks.
// A spread within the cancellation error of sumsq - sum^2/n counts as none (std = 0).
AMAPO_HOST_DEVICE BatchStats batch_stats_from_sums(double sum, double sumsq, double count) {
  BatchStats stats{count > 0 ? sum / count : 0.0, 0.0};
  if (count < 2) return stats;
  const double centered = sumsq - sum * stats.mean;
  if (centered > 2.0 * count * DBL_EPSILON * sumsq) stats.std = sqrt(centered / (count - 1));
  return stats;
}

// Detached margin of one pair with log-prob gap d = chosen - rejected (length-normalized).
AMAPO_HOST_DEVICE double adaptive_margin(double d, BatchStats stats, double beta, Variant variant,
                                         Ablation ablation) {
  if (!(stats.std > 0)) return 0.0;
  const bool paper = variant == Variant::Paper;
  // The oracle estimate (batch mean) and the gap to it, in the variant's reward units.
  const double unit = paper ? beta : 1.0;
  const double oracle = unit * stats.mean;
  const double gap = unit * (stats.mean - d);
  const double difficulty = ablation == Ablation::NoZnorm ? gap : gap / (unit * stats.std);
  const double exponent = difficulty * oracle;
  const bool gated = ablation == Ablation::NoZero || (paper ? exponent > 0 : d < stats.mean);
  if (!gated) return 0.0;
  switch (ablation) {
    case Ablation::NoExp:
      return beta * exponent;
    case Ablation::NoAdaptive:
      return beta * stats.mean;
    default:
      return beta * exp(fmin(exponent, kMaxMarginExponent));
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
