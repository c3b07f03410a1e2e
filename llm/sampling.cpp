#include "llm/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/philox.h"

namespace llm {

int sample_token(const std::vector<float>& logits, double temperature, int top_k, uint64_t seed,
                 uint64_t counter) {
  const int V = static_cast<int>(logits.size());
  if (temperature <= 0.0)
    return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<int> order(V);
  std::iota(order.begin(), order.end(), 0);
  int keep = V;
  if (top_k > 0 && top_k < V) {
    keep = top_k;
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&logits](int a, int b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
  }
  double max_logit = -INFINITY;
  for (int i = 0; i < keep; ++i) max_logit = std::max(max_logit, static_cast<double>(logits[order[i]]));
  std::vector<double> weights(keep);
  double total = 0.0;
  for (int i = 0; i < keep; ++i) {
    weights[i] = std::exp((logits[order[i]] - max_logit) / temperature);
    total += weights[i];
  }
  const double u = philox_uniform(seed, counter, 0) * total;
  double cumulative = 0.0;
  for (int i = 0; i < keep; ++i) {
    cumulative += weights[i];
    if (u < cumulative) return order[i];
  }
  return order[keep - 1];
}

}  // namespace llm
