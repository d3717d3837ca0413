// C++ CPU kernels for fastgrpo.ops: DDIM-step log-prob (CFG folded in), group advantages, clipped-ratio loss.
//
// The same math as kernels/fastgrpo_kernels (see the docstrings there). Inputs arrive contiguous in the compute
// type T (float, or double for fp64 callers); fastgrpo.ops converts other dtypes first. The per-sample DDIM
// coefficients are computed here from alpha_prod_t / alpha_prod_t_prev, in double.
// Rows are split into fixed chunks of CHUNK elements processed in parallel; each chunk sums with SIMD lanes in T
// and the chunk partials are added in double in chunk order, so results do not depend on the thread count.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 8192;
constexpr double LOG_SQRT_2PI = 0.91893853320467274178;

// Per-sample DDIM algebra: mean = cx * x_t + ce * guided; log p = -scale * sum((prev - mean)^2) / (2 std^2) + offset.
struct Row {
  double cx, ce, std, offset;
};

Row row_coefficients(double alpha_t, double alpha_prev, double eta, bool v_prediction, double count) {
  const double beta_t = 1.0 - alpha_t;
  const double std = eta * std::sqrt((1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev));
  const double direction = std::sqrt(1.0 - alpha_prev - std * std);
  const double sa = std::sqrt(alpha_t), sp = std::sqrt(alpha_prev), sb = std::sqrt(beta_t);
  Row row;
  row.cx = v_prediction ? sp * sa + direction * sb : sp / sa;
  row.ce = v_prediction ? direction * sa - sp * sb : direction - sp * sb / sa;
  row.std = std;
  row.offset = -(std::log(std) + LOG_SQRT_2PI) * count;
  return row;
}

// Runs fn(job, row, begin, end) for each fixed chunk of each row, in parallel; jobs are row-major.
template <typename Fn>
void for_each_chunk(int64_t batch, int64_t n, const Fn& fn) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t row = job / chunks;
      const int64_t begin = row * n + (job % chunks) * CHUNK;
      fn(job, row, begin, std::min(begin + CHUNK, (row + 1) * n));
    }
  });
}

template <typename T>
std::vector<Row> all_rows(const at::Tensor& alpha_t, const at::Tensor& alpha_prev, double eta, bool v_prediction,
                          double count) {
  const T* a = alpha_t.data_ptr<T>();
  const T* ap = alpha_prev.data_ptr<T>();
  std::vector<Row> rows(alpha_t.numel());
  for (int64_t b = 0; b < alpha_t.numel(); ++b) rows[b] = row_coefficients(a[b], ap[b], eta, v_prediction, count);
  return rows;
}

// Sum of squared (prev - mean) over [begin, end); the sampling variant also writes prev = mean + std * noise.
template <typename T, bool HAS_UNCOND, bool HAS_NOISE>
double chunk_sum_squares(const T* __restrict__ cond, const T* __restrict__ uncond, const T* __restrict__ sample,
                         const T* __restrict__ target, T* __restrict__ prev_out, int64_t begin, int64_t end, T cx,
                         T ce, T sd, T g) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    T guided = cond[i];
    if constexpr (HAS_UNCOND) guided = uncond[i] + g * (cond[i] - uncond[i]);
    const T mean = cx * sample[i] + ce * guided;
    T prev = target[i];
    if constexpr (HAS_NOISE) {
      prev = mean + sd * target[i];
      prev_out[i] = prev;
    }
    const T diff = prev - mean;
    acc += diff * diff;
  }
  return static_cast<double>(acc);
}

template <typename T, bool HAS_UNCOND, bool HAS_NOISE>
void logprob_forward_impl(const T* c, const T* u, const T* x, const T* t, T* p, const std::vector<Row>& rows,
                          int64_t batch, int64_t n, double g, double scale, T* out) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(batch * chunks, 0.0);
  for_each_chunk(batch, n, [&](int64_t job, int64_t row, int64_t begin, int64_t end) {
    const Row& r = rows[row];
    partial[job] = chunk_sum_squares<T, HAS_UNCOND, HAS_NOISE>(c, u, x, t, p, begin, end, T(r.cx), T(r.ce),
                                                               T(r.std), T(g));
  });
  for (int64_t row = 0; row < batch; ++row) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[row * chunks + k];
    out[row] = static_cast<T>(-scale * total / (2.0 * rows[row].std * rows[row].std) + rows[row].offset);
  }
}

// d logp / d mean for element i (times the per-sample factor).
template <typename T, bool HAS_UNCOND>
inline T d_mean_at(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ x,
                   const T* __restrict__ pv, int64_t i, T gt, T rx, T re, T factor) {
  T guided = c[i];
  if constexpr (HAS_UNCOND) guided = u[i] + gt * (c[i] - u[i]);
  return factor * (pv[i] - (rx * x[i] + re * guided));
}

// One chunk of the backward. A function of its own (pointers by value, not captured by reference) so the
// compiler knows the stores cannot move the input pointers, and vectorises every loop.
template <typename T, bool HAS_UNCOND, bool WRITE_UNCOND>
void backward_chunk(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ x,
                    const T* __restrict__ pv, T* __restrict__ g_cond, T* __restrict__ g_uncond,
                    T* __restrict__ g_sample, T* __restrict__ g_prev, int64_t begin, int64_t end, T gt, T rx, T re,
                    T factor) {
  const T cond_scale = HAS_UNCOND ? gt * re : re;
  const T uncond_scale = (T(1) - gt) * re;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T d_mean = d_mean_at<T, HAS_UNCOND>(c, u, x, pv, i, gt, rx, re, factor);
    g_cond[i] = cond_scale * d_mean;
    if constexpr (WRITE_UNCOND) g_uncond[i] = uncond_scale * d_mean;
  }
  if (g_sample) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) g_sample[i] = rx * d_mean_at<T, HAS_UNCOND>(c, u, x, pv, i, gt, rx, re, factor);
  }
  if (g_prev) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) g_prev[i] = -d_mean_at<T, HAS_UNCOND>(c, u, x, pv, i, gt, rx, re, factor);
  }
}

// Gradients of the model outputs (always) and, in separate passes when requested, of x_t and x_{t-1}.
template <typename T, bool HAS_UNCOND, bool WRITE_UNCOND>
void logprob_backward_impl(const T* go, const T* c, const T* u, const T* x, const T* pv, const std::vector<Row>& rows,
                           int64_t batch, int64_t n, double g, double scale, T* g_cond, T* g_uncond, T* g_sample,
                           T* g_prev) {
  for_each_chunk(batch, n, [&](int64_t, int64_t row, int64_t begin, int64_t end) {
    const Row& r = rows[row];
    const T factor = static_cast<T>(static_cast<double>(go[row]) * scale / (r.std * r.std));
    backward_chunk<T, HAS_UNCOND, WRITE_UNCOND>(c, u, x, pv, g_cond, g_uncond, g_sample, g_prev, begin, end,
                                               static_cast<T>(g), T(r.cx), T(r.ce), factor);
  });
}

void check_inputs(const at::Tensor& cond, const std::vector<at::Tensor>& others) {
  TORCH_CHECK(cond.device().is_cpu() && cond.is_contiguous(), "fastgrpo cpu: inputs must be contiguous CPU tensors");
  for (const auto& t : others) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == cond.scalar_type(),
                "fastgrpo cpu: inputs must be contiguous CPU tensors of one dtype");
  }
}

}  // namespace

// Inputs already contiguous and of one compute type (see the public wrappers below).
std::vector<at::Tensor> logprob_forward_prepared(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                             const at::Tensor& sample, const at::Tensor& target,
                                             const at::Tensor& alpha_t, const at::Tensor& alpha_prev, double eta,
                                             double guidance, bool v_prediction, bool sum_reduction, bool has_noise) {
  check_inputs(cond, {sample, target, alpha_t, alpha_prev});
  if (uncond.has_value()) check_inputs(cond, {*uncond});
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / std::max<int64_t>(batch, 1);
  const double scale = sum_reduction ? 1.0 : 1.0 / n;
  auto out = at::empty({batch}, cond.options());
  auto prev_out = has_noise ? at::empty_like(cond) : at::empty({0}, cond.options());
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "ddim_logprob_forward", [&] {
    const auto rows = all_rows<scalar_t>(alpha_t, alpha_prev, eta, v_prediction, sum_reduction ? double(n) : 1.0);
    const scalar_t* c = cond.data_ptr<scalar_t>();
    const scalar_t* u = uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr;
    const scalar_t* x = sample.data_ptr<scalar_t>();
    const scalar_t* t = target.data_ptr<scalar_t>();
    scalar_t* p = has_noise ? prev_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    if (u && has_noise) logprob_forward_impl<scalar_t, true, true>(c, u, x, t, p, rows, batch, n, guidance, scale, o);
    else if (u) logprob_forward_impl<scalar_t, true, false>(c, u, x, t, p, rows, batch, n, guidance, scale, o);
    else if (has_noise) logprob_forward_impl<scalar_t, false, true>(c, u, x, t, p, rows, batch, n, guidance, scale, o);
    else logprob_forward_impl<scalar_t, false, false>(c, u, x, t, p, rows, batch, n, guidance, scale, o);
  });
  return {out, prev_out};
}

std::vector<at::Tensor> logprob_backward_prepared(const at::Tensor& grad_out, const at::Tensor& cond,
                                              const c10::optional<at::Tensor>& uncond, const at::Tensor& sample,
                                              const at::Tensor& prev, const at::Tensor& alpha_t,
                                              const at::Tensor& alpha_prev, double eta, double guidance,
                                              bool v_prediction, bool sum_reduction, bool need_uncond,
                                              bool need_sample, bool need_prev) {
  check_inputs(cond, {grad_out, sample, prev, alpha_t, alpha_prev});
  if (uncond.has_value()) check_inputs(cond, {*uncond});
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / std::max<int64_t>(batch, 1);
  auto none = at::empty({0}, cond.options());
  std::vector<at::Tensor> grads = {at::empty_like(cond),
                                   need_uncond && uncond.has_value() ? at::empty_like(cond) : none,
                                   need_sample ? at::empty_like(cond) : none, need_prev ? at::empty_like(cond) : none};
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "ddim_logprob_backward", [&] {
    const auto rows = all_rows<scalar_t>(alpha_t, alpha_prev, eta, v_prediction, 1.0);
    auto ptr = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    const scalar_t* u = uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr;
    const double scale = sum_reduction ? 1.0 : 1.0 / n;
    auto run = [&](auto has_uncond, auto write_uncond) {
      logprob_backward_impl<scalar_t, decltype(has_uncond)::value, decltype(write_uncond)::value>(
          grad_out.data_ptr<scalar_t>(), cond.data_ptr<scalar_t>(), u, sample.data_ptr<scalar_t>(),
          prev.data_ptr<scalar_t>(), rows, batch, n, guidance, scale, ptr(grads[0]), ptr(grads[1]), ptr(grads[2]),
          ptr(grads[3]));
    };
    if (u && grads[1].numel()) run(std::true_type{}, std::true_type{});
    else if (u) run(std::true_type{}, std::false_type{});
    else run(std::false_type{}, std::false_type{});
  });
  return grads;
}

at::ScalarType compute_type(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t && t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

at::Tensor ready(const at::Tensor& t, at::ScalarType type) { return t.to(type).contiguous(); }

c10::optional<at::Tensor> ready(const c10::optional<at::Tensor>& t, at::ScalarType type) {
  return t.has_value() ? c10::optional<at::Tensor>(ready(*t, type)) : c10::nullopt;
}

// Returns {log_prob (B,), prev_sample (B, ...) or an empty tensor}, in fp32 (fp64 when an input is fp64).
// target is prev_sample, or the noise when has_noise. Inputs of any float dtype and layout.
std::vector<at::Tensor> ddim_logprob_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                             const at::Tensor& sample, const at::Tensor& target,
                                             const at::Tensor& alpha_t, const at::Tensor& alpha_prev, double eta,
                                             double guidance, bool v_prediction, bool sum_reduction, bool has_noise) {
  const auto type = compute_type({&cond, uncond.has_value() ? &*uncond : nullptr, &sample, &target});
  return logprob_forward_prepared(ready(cond, type), ready(uncond, type), ready(sample, type), ready(target, type),
                                  ready(alpha_t, type), ready(alpha_prev, type), eta, guidance, v_prediction,
                                  sum_reduction, has_noise);
}

// Returns {grad_cond, grad_uncond, grad_sample, grad_prev}, each in its input's dtype; an unrequested gradient is
// an empty tensor.
std::vector<at::Tensor> ddim_logprob_backward(const at::Tensor& grad_out, const at::Tensor& cond,
                                              const c10::optional<at::Tensor>& uncond, const at::Tensor& sample,
                                              const at::Tensor& prev, const at::Tensor& alpha_t,
                                              const at::Tensor& alpha_prev, double eta, double guidance,
                                              bool v_prediction, bool sum_reduction, bool need_uncond,
                                              bool need_sample, bool need_prev) {
  const auto type = compute_type({&cond, uncond.has_value() ? &*uncond : nullptr, &sample, &prev});
  auto grads = logprob_backward_prepared(ready(grad_out, type), ready(cond, type), ready(uncond, type),
                                         ready(sample, type), ready(prev, type), ready(alpha_t, type),
                                         ready(alpha_prev, type), eta, guidance, v_prediction, sum_reduction,
                                         need_uncond, need_sample, need_prev);
  const at::Tensor* inputs[4] = {&cond, uncond.has_value() ? &*uncond : nullptr, &sample, &prev};
  for (int k = 0; k < 4; ++k) {
    if (inputs[k] && grads[k].numel()) grads[k] = grads[k].to(inputs[k]->scalar_type());
  }
  return grads;
}

at::Tensor group_advantages(const at::Tensor& rewards, int64_t group_size, bool global_std, bool unbiased,
                            c10::optional<double> clip, double eps) {
  check_inputs(rewards, {});
  auto out = at::empty_like(rewards);
  const int64_t n = rewards.numel();
  const int64_t groups = n / group_size;
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_advantages", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    scalar_t* a = out.data_ptr<scalar_t>();
    double global_scale = 0.0;
    if (global_std) {
      double mean = 0.0, squares = 0.0;
      for (int64_t i = 0; i < n; ++i) mean += r[i];
      mean /= n;
      for (int64_t i = 0; i < n; ++i) squares += (r[i] - mean) * (r[i] - mean);
      global_scale = std::sqrt(squares / std::max<int64_t>(unbiased ? n - 1 : n, 1));
    }
    at::parallel_for(0, groups, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t gi = lo; gi < hi; ++gi) {
        const scalar_t* rg = r + gi * group_size;
        double mean = 0.0, squares = 0.0;
        for (int64_t i = 0; i < group_size; ++i) mean += rg[i];
        mean /= group_size;
        for (int64_t i = 0; i < group_size; ++i) squares += (rg[i] - mean) * (rg[i] - mean);
        const double scale = global_std ? global_scale
                                        : std::sqrt(squares / std::max<int64_t>(unbiased ? group_size - 1 : group_size, 1));
        for (int64_t i = 0; i < group_size; ++i) {
          double value = (rg[i] - mean) / (scale + eps);
          if (clip.has_value()) value = std::min(std::max(value, -*clip), *clip);
          a[gi * group_size + i] = static_cast<scalar_t>(value);
        }
      }
    });
  });
  return out;
}

// Returns the (7,) stats vector [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl].
at::Tensor grpo_loss_forward(const at::Tensor& log_probs, const at::Tensor& old_log_probs,
                             const at::Tensor& advantages, const c10::optional<at::Tensor>& ref_log_probs,
                             double clip_range, double kl_coef) {
  check_inputs(log_probs, {old_log_probs, advantages});
  if (ref_log_probs.has_value()) check_inputs(log_probs, {*ref_log_probs});
  auto stats = at::empty({7}, log_probs.options());
  const int64_t n = log_probs.numel();
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "grpo_loss_forward", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    const scalar_t* old = old_log_probs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    const scalar_t* ref = ref_log_probs.has_value() ? ref_log_probs->data_ptr<scalar_t>() : nullptr;
    double loss = 0, sq = 0, clipped = 0, ratio_sum = 0, kl = 0;
    double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -ratio_min;
    for (int64_t i = 0; i < n; ++i) {
      const double log_ratio = static_cast<double>(lp[i]) - old[i];
      const double ratio = std::exp(log_ratio);
      const double bounded = std::min(std::max(ratio, 1.0 - clip_range), 1.0 + clip_range);
      loss += std::max(-adv[i] * ratio, -adv[i] * bounded);
      sq += log_ratio * log_ratio;
      clipped += std::abs(ratio - 1.0) > clip_range ? 1.0 : 0.0;
      ratio_sum += ratio;
      ratio_min = std::min(ratio_min, ratio);
      ratio_max = std::max(ratio_max, ratio);
      if (ref) {
        const double delta = static_cast<double>(ref[i]) - lp[i];
        kl += std::exp(delta) - delta - 1.0;
      }
    }
    scalar_t* s = stats.data_ptr<scalar_t>();
    const double values[7] = {loss / n + kl_coef * kl / n, 0.5 * sq / n, clipped / n, ratio_sum / n,
                              ratio_min, ratio_max, kl / n};
    for (int k = 0; k < 7; ++k) s[k] = static_cast<scalar_t>(values[k]);
  });
  return stats;
}

at::Tensor grpo_loss_backward(const at::Tensor& grad_loss, const at::Tensor& log_probs,
                              const at::Tensor& old_log_probs, const at::Tensor& advantages,
                              const c10::optional<at::Tensor>& ref_log_probs, double clip_range, double kl_coef) {
  check_inputs(log_probs, {old_log_probs, advantages});
  auto grad = at::empty_like(log_probs);
  const int64_t n = log_probs.numel();
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "grpo_loss_backward", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    const scalar_t* old = old_log_probs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    const scalar_t* ref = ref_log_probs.has_value() ? ref_log_probs->data_ptr<scalar_t>() : nullptr;
    const double upstream = grad_loss.item<double>() / n;
    scalar_t* g = grad.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const double ratio = std::exp(static_cast<double>(lp[i]) - old[i]);
      const double bounded = std::min(std::max(ratio, 1.0 - clip_range), 1.0 + clip_range);
      const bool inside = ratio >= 1.0 - clip_range && ratio <= 1.0 + clip_range;
      const bool active = (-adv[i] * ratio > -adv[i] * bounded) || inside;
      double value = active ? -adv[i] * ratio : 0.0;
      if (ref) value += kl_coef * (1.0 - std::exp(static_cast<double>(ref[i]) - lp[i]));
      g[i] = static_cast<scalar_t>(value * upstream);
    }
  });
  return grad;
}

// The log-prob with its backward wired in C++: eager training calls this one function and the autograd engine
// calls the backward directly, with no Python on either path (about 0.05 ms less per step at SD shapes).
class DdimLogprobAutograd : public torch::autograd::Function<DdimLogprobAutograd> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& cond, const at::Tensor& uncond,
                            const at::Tensor& sample, const at::Tensor& prev, const at::Tensor& alpha_t,
                            const at::Tensor& alpha_prev, double eta, double guidance, bool v_prediction,
                            bool sum_reduction, bool has_uncond) {
    // without CFG the caller passes cond again in the uncond slot (undefined tensors cannot be inputs here)
    ctx->save_for_backward({cond, uncond, sample, prev, alpha_t, alpha_prev});
    ctx->saved_data["has_uncond"] = has_uncond;
    ctx->saved_data["eta"] = eta;
    ctx->saved_data["guidance"] = guidance;
    ctx->saved_data["v_prediction"] = v_prediction;
    ctx->saved_data["sum_reduction"] = sum_reduction;
    const auto optional_uncond = has_uncond ? c10::optional<at::Tensor>(uncond) : c10::nullopt;
    return ddim_logprob_forward(cond, optional_uncond, sample, prev, alpha_t, alpha_prev, eta, guidance,
                                v_prediction, sum_reduction, false)[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool has_uncond = ctx->saved_data["has_uncond"].toBool();
    const auto optional_uncond = has_uncond ? c10::optional<at::Tensor>(saved[1]) : c10::nullopt;
    const bool need_uncond = has_uncond && ctx->needs_input_grad(1);
    auto grads = ddim_logprob_backward(grad_outputs[0], saved[0], optional_uncond, saved[2], saved[3], saved[4],
                                       saved[5], ctx->saved_data["eta"].toDouble(),
                                       ctx->saved_data["guidance"].toDouble(),
                                       ctx->saved_data["v_prediction"].toBool(),
                                       ctx->saved_data["sum_reduction"].toBool(), need_uncond,
                                       ctx->needs_input_grad(2), ctx->needs_input_grad(3));
    torch::autograd::variable_list result(11);
    for (int k = 0; k < 4; ++k) {
      if (grads[k].numel() && ctx->needs_input_grad(k) && (k != 1 || has_uncond)) result[k] = grads[k];
    }
    return result;
  }
};

at::Tensor ddim_logprob_autograd(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                 const at::Tensor& sample, const at::Tensor& prev, const at::Tensor& alpha_t,
                                 const at::Tensor& alpha_prev, double eta, double guidance, bool v_prediction,
                                 bool sum_reduction) {
  return DdimLogprobAutograd::apply(cond, uncond.has_value() ? *uncond : cond, sample, prev, alpha_t, alpha_prev,
                                    eta, guidance, v_prediction, sum_reduction, uncond.has_value());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ddim_logprob_autograd", &ddim_logprob_autograd);
  m.doc() = "fastgrpo C++ CPU kernels";
  m.def("ddim_logprob_forward", &ddim_logprob_forward);
  m.def("ddim_logprob_backward", &ddim_logprob_backward);
  m.def("group_advantages", &group_advantages);
  m.def("grpo_loss_forward", &grpo_loss_forward);
  m.def("grpo_loss_backward", &grpo_loss_backward);
}
