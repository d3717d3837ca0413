// C++ CPU kernels for fastgrpo.ops: sampler-step log-prob (DDIM, flow-matching SDE; CFG folded in), group
// advantages, clipped-ratio loss; and the bindings of the small-head attention (attention_cpu.cpp) and the
// advantage-weighted matching and negative-aware fine-tuning losses (matching_cpu.cpp).
//
// The same math as kernels/fastgrpo_kernels (see the docstrings there). Inputs arrive contiguous in the compute
// type T (float, or double for fp64 callers); fastgrpo.ops converts other dtypes first. The per-sample step
// coefficients arrive as a (B, 5) double table (coef_x, coef_e, noise_std, precision, log_norm) that
// fastgrpo.ops.reference computes: the samplers' formulas are written only there.
// Rows are split into fixed chunks of CHUNK elements processed in parallel; each chunk sums with SIMD lanes in T
// and the chunk partials are added in double in chunk order, so results do not depend on the thread count.

#include <torch/extension.h>
#include "attention_cpu.h"
#include "matching_cpu.h"
#include "chunks.h"
#include <torch/csrc/autograd/functions/utils.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using fastgrpo_cpu::CHUNK;
using fastgrpo_cpu::for_each_chunk;

// One sample's step: mean = cx * x_t + ce * guided; prev = mean + std * noise;
// log p = -scale * precision * sum((prev - mean)^2) + offset, offset = log_norm * (N for sum, 1 for mean).
struct Row {
  double cx, ce, std, precision, offset;
};

std::vector<Row> all_rows(const at::Tensor& table, int64_t batch, double count) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kDouble && table.dim() == 2 &&
                  table.size(0) == batch && table.size(1) == 5,
              "fastgrpo cpu: the step table must be a (B, 5) float64 CPU tensor");
  const auto contiguous = table.contiguous();
  const double* t = contiguous.data_ptr<double>();
  std::vector<Row> rows(batch);
  for (int64_t b = 0; b < batch; ++b) {
    rows[b] = Row{t[5 * b], t[5 * b + 1], t[5 * b + 2], t[5 * b + 3], t[5 * b + 4] * count};
  }
  return rows;
}

// Calls fn(std::integral_constant<bool, a>, std::integral_constant<bool, b>, ...) with the run-time flags as
// compile-time constants, so each combination gets its own vectorised loop.
template <typename Fn>
void with_flags(const Fn& fn) {
  fn();
}
template <typename Fn, typename... Rest>
void with_flags(const Fn& fn, bool flag, Rest... rest) {
  if (flag) {
    with_flags([&](auto... tail) { fn(std::true_type{}, tail...); }, rest...);
  } else {
    with_flags([&](auto... tail) { fn(std::false_type{}, tail...); }, rest...);
  }
}

// Sum of squared (prev - mean) over [begin, end). The sampling variant also writes prev = mean + std * noise; with
// SAVE_RESIDUAL the residual prev - mean is stored for the backward.
template <typename T, bool HAS_UNCOND, bool HAS_NOISE, bool SAVE_RESIDUAL>
double chunk_sum_squares(const T* __restrict__ cond, const T* __restrict__ uncond, const T* __restrict__ sample,
                         const T* __restrict__ target, T* __restrict__ prev_out, T* __restrict__ residual,
                         int64_t begin, int64_t end, T cx, T ce, T sd, T g) {
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
    if constexpr (SAVE_RESIDUAL) residual[i] = diff;
    acc += diff * diff;
  }
  return static_cast<double>(acc);
}

template <typename T, bool HAS_UNCOND, bool HAS_NOISE, bool SAVE_RESIDUAL>
void logprob_forward_impl(const T* c, const T* u, const T* x, const T* t, T* p, T* res, const std::vector<Row>& rows,
                          int64_t batch, int64_t n, double g, double scale, T* out) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(batch * chunks, 0.0);
  for_each_chunk(batch, n, [&](int64_t job, int64_t row, int64_t begin, int64_t end) {
    const Row& r = rows[row];
    partial[job] = chunk_sum_squares<T, HAS_UNCOND, HAS_NOISE, SAVE_RESIDUAL>(c, u, x, t, p, res, begin, end, T(r.cx),
                                                                             T(r.ce), T(r.std), T(g));
  });
  for (int64_t row = 0; row < batch; ++row) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[row * chunks + k];
    out[row] = static_cast<T>(-scale * rows[row].precision * total + rows[row].offset);
  }
}

// out[i] = coef * residual[i] over [begin, end). Pointers by value and restrict-qualified so the loop vectorises.
template <typename T>
void scale_into(const T* __restrict__ residual, T* __restrict__ out, int64_t begin, int64_t end, T coef) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) out[i] = coef * residual[i];
}

// Every gradient of the log-prob is a per-sample multiple of the residual r = prev - mean:
// d logp / d mean = f r with f = grad_out * scale * 2 precision, and mean = cx x_t + ce (u + g (c - u)), so
// d/d cond = g ce f r (ce f r without CFG), d/d uncond = (1 - g) ce f r, d/d x_t = cx f r, d/d x_{t-1} = -f r.
template <typename T>
void logprob_backward_impl(const T* go, int64_t go_stride, const T* residual, const std::vector<Row>& rows,
                           int64_t batch, int64_t n, double g, double scale, bool has_uncond, T* const grads[4]) {
  for_each_chunk(batch, n, [&](int64_t, int64_t row, int64_t begin, int64_t end) {
    const Row& r = rows[row];
    const double f = static_cast<double>(go[row * go_stride]) * scale * 2.0 * r.precision;
    const double coefs[4] = {(has_uncond ? g : 1.0) * r.ce * f, (1.0 - g) * r.ce * f, r.cx * f, -f};
    for (int k = 0; k < 4; ++k) {
      if (grads[k]) scale_into<T>(residual, grads[k], begin, end, static_cast<T>(coefs[k]));
    }
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
                                                 const at::Tensor& table, double guidance, bool sum_reduction,
                                                 bool has_noise, bool save_residual) {
  check_inputs(cond, {sample, target});
  if (uncond.has_value()) check_inputs(cond, {*uncond});
  TORCH_CHECK(!(has_noise && save_residual), "fastgrpo cpu: the sampling step saves no residual");
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / std::max<int64_t>(batch, 1);
  const double scale = sum_reduction ? 1.0 : 1.0 / n;
  auto out = at::empty({batch}, cond.options());
  auto prev_out = has_noise ? at::empty_like(cond) : at::Tensor();
  auto residual = save_residual ? at::empty_like(cond) : at::Tensor();
  const auto rows = all_rows(table, batch, sum_reduction ? double(n) : 1.0);
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "step_logprob_forward", [&] {
    const scalar_t* u = uncond.has_value() ? uncond->data_ptr<scalar_t>() : nullptr;
    scalar_t* p = has_noise ? prev_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* res = save_residual ? residual.data_ptr<scalar_t>() : nullptr;
    with_flags(
        [&](auto has_uncond, auto noise, auto keep) {
          logprob_forward_impl<scalar_t, decltype(has_uncond)::value, decltype(noise)::value, decltype(keep)::value>(
              cond.data_ptr<scalar_t>(), u, sample.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), p, res, rows,
              batch, n, guidance, scale, out.data_ptr<scalar_t>());
        },
        u != nullptr, has_noise, save_residual);
  });
  return {out, prev_out, residual};
}

at::ScalarType compute_type(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    if (t && t->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// t in the compute type and contiguous; the common case (already so) makes no dispatcher call.
at::Tensor ready(const at::Tensor& t, at::ScalarType type) {
  if (t.scalar_type() == type && t.is_contiguous()) return t;
  return t.to(type).contiguous();
}

c10::optional<at::Tensor> ready(const c10::optional<at::Tensor>& t, at::ScalarType type) {
  return t.has_value() ? c10::optional<at::Tensor>(ready(*t, type)) : c10::nullopt;
}

// Returns {log_prob (B,), prev_sample or undefined (None), residual prev - mean or undefined}, in fp32 (fp64
// when an input is fp64). target is prev_sample, or the noise when has_noise (which saves no residual). Inputs of
// any float dtype and layout.
std::vector<at::Tensor> step_logprob_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                             const at::Tensor& sample, const at::Tensor& target,
                                             const at::Tensor& table, double guidance, bool sum_reduction,
                                             bool has_noise, bool save_residual) {
  const auto type = compute_type({&cond, uncond.has_value() ? &*uncond : nullptr, &sample, &target});
  return logprob_forward_prepared(ready(cond, type), ready(uncond, type), ready(sample, type), ready(target, type),
                                  table, guidance, sum_reduction, has_noise, save_residual);
}

// Gradients {cond, uncond, sample, prev} from the forward's residual, in the residual's dtype; an unrequested
// gradient is undefined (None in Python).
std::vector<at::Tensor> step_logprob_backward(const at::Tensor& grad_out, const at::Tensor& residual,
                                              const at::Tensor& table, double guidance, bool sum_reduction,
                                              bool has_uncond, std::vector<bool> needs) {
  TORCH_CHECK(needs.size() == 4, "fastgrpo cpu: needs has one flag per input (cond, uncond, sample, prev)");
  const auto type = residual.scalar_type();
  check_inputs(residual, {});
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == residual.size(0), "fastgrpo cpu: grad_out must be (B,)");
  // read with its stride: the backward of a sum passes an expanded scalar, and a copy would cost more than it saves
  const auto go = grad_out.scalar_type() == type ? grad_out : grad_out.to(type);
  const int64_t batch = residual.size(0);
  const int64_t n = residual.numel() / std::max<int64_t>(batch, 1);
  std::vector<at::Tensor> grads;
  for (int k = 0; k < 4; ++k) {
    const bool wanted = needs[k] && (k != 1 || has_uncond);
    grads.push_back(wanted ? at::empty_like(residual) : at::Tensor());
  }
  const auto rows = all_rows(table, batch, 1.0);
  AT_DISPATCH_FLOATING_TYPES(type, "step_logprob_backward", [&] {
    scalar_t* const outs[4] = {grads[0].defined() ? grads[0].data_ptr<scalar_t>() : nullptr,
                               grads[1].defined() ? grads[1].data_ptr<scalar_t>() : nullptr,
                               grads[2].defined() ? grads[2].data_ptr<scalar_t>() : nullptr,
                               grads[3].defined() ? grads[3].data_ptr<scalar_t>() : nullptr};
    logprob_backward_impl<scalar_t>(go.data_ptr<scalar_t>(), go.stride(0), residual.data_ptr<scalar_t>(), rows, batch,
                                    n, guidance, sum_reduction ? 1.0 : 1.0 / n, has_uncond, outs);
  });
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

// The loss's optional per-entry inputs: RatioNorm's bias and scale (together), and weights.
template <typename T>
struct LossExtras {
  const T* bias = nullptr;
  const T* scale = nullptr;
  const T* weight = nullptr;

  LossExtras(const at::Tensor& like, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& s,
             const c10::optional<at::Tensor>& w) {
    TORCH_CHECK(b.has_value() == s.has_value(), "fastgrpo cpu: ratio_bias and ratio_scale come together");
    if (b.has_value()) {
      check_inputs(like, {*b, *s});
      bias = b->data_ptr<T>();
      scale = s->data_ptr<T>();
    }
    if (w.has_value()) {
      check_inputs(like, {*w});
      weight = w->data_ptr<T>();
    }
  }

  // (logp - old + bias) * scale, or logp - old
  double log_ratio(double logp, double old, int64_t i) const {
    return scale ? (logp - old + bias[i]) * scale[i] : logp - old;
  }
  double weighted(double value, int64_t i) const { return weight ? value * weight[i] : value; }
};

// Returns the (7,) stats vector [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl].
// loss = mean(w * max(-A r, -A clip(r))) + kl_coef * k3 KL, r = exp((logp - old + bias) * scale).
at::Tensor grpo_loss_forward(const at::Tensor& log_probs, const at::Tensor& old_log_probs,
                             const at::Tensor& advantages, const c10::optional<at::Tensor>& ref_log_probs,
                             const c10::optional<at::Tensor>& ratio_bias,
                             const c10::optional<at::Tensor>& ratio_scale, const c10::optional<at::Tensor>& weights,
                             double clip_low, double clip_high, double kl_coef) {
  check_inputs(log_probs, {old_log_probs, advantages});
  if (ref_log_probs.has_value()) check_inputs(log_probs, {*ref_log_probs});
  auto stats = at::empty({7}, log_probs.options());
  const int64_t n = log_probs.numel();
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "grpo_loss_forward", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    const scalar_t* old = old_log_probs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    const scalar_t* ref = ref_log_probs.has_value() ? ref_log_probs->data_ptr<scalar_t>() : nullptr;
    const LossExtras<scalar_t> extras(log_probs, ratio_bias, ratio_scale, weights);
    double loss = 0, sq = 0, clipped = 0, ratio_sum = 0, kl = 0;
    double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -ratio_min;
    for (int64_t i = 0; i < n; ++i) {
      const double log_ratio = extras.log_ratio(lp[i], old[i], i);
      const double ratio = std::exp(log_ratio);
      const double bounded = std::min(std::max(ratio, 1.0 - clip_low), 1.0 + clip_high);
      loss += extras.weighted(std::max(-adv[i] * ratio, -adv[i] * bounded), i);
      sq += log_ratio * log_ratio;
      clipped += (ratio < 1.0 - clip_low || ratio > 1.0 + clip_high) ? 1.0 : 0.0;
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

// Returns {d loss / d log_probs, d loss / d ratio_bias (undefined without RatioNorm)}.
std::vector<at::Tensor> grpo_loss_backward(const at::Tensor& grad_loss, const at::Tensor& log_probs,
                                           const at::Tensor& old_log_probs, const at::Tensor& advantages,
                                           const c10::optional<at::Tensor>& ref_log_probs,
                                           const c10::optional<at::Tensor>& ratio_bias,
                                           const c10::optional<at::Tensor>& ratio_scale,
                                           const c10::optional<at::Tensor>& weights, double clip_low,
                                           double clip_high, double kl_coef) {
  check_inputs(log_probs, {old_log_probs, advantages});
  auto grad = at::empty_like(log_probs);
  auto grad_bias = ratio_scale.has_value() ? at::empty_like(log_probs) : at::Tensor();
  const int64_t n = log_probs.numel();
  AT_DISPATCH_FLOATING_TYPES(log_probs.scalar_type(), "grpo_loss_backward", [&] {
    const scalar_t* lp = log_probs.data_ptr<scalar_t>();
    const scalar_t* old = old_log_probs.data_ptr<scalar_t>();
    const scalar_t* adv = advantages.data_ptr<scalar_t>();
    const scalar_t* ref = ref_log_probs.has_value() ? ref_log_probs->data_ptr<scalar_t>() : nullptr;
    const LossExtras<scalar_t> extras(log_probs, ratio_bias, ratio_scale, weights);
    const double upstream = grad_loss.item<double>() / n;
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.defined() ? grad_bias.data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const double ratio = std::exp(extras.log_ratio(lp[i], old[i], i));
      const double bounded = std::min(std::max(ratio, 1.0 - clip_low), 1.0 + clip_high);
      const bool inside = ratio >= 1.0 - clip_low && ratio <= 1.0 + clip_high;
      const bool active = (-adv[i] * ratio > -adv[i] * bounded) || inside;
      double policy = active ? -adv[i] * ratio : 0.0;
      if (extras.scale) policy *= extras.scale[i];
      policy = extras.weighted(policy, i);
      double value = policy;
      if (ref) value += kl_coef * (1.0 - std::exp(static_cast<double>(ref[i]) - lp[i]));
      g[i] = static_cast<scalar_t>(value * upstream);
      if (gb) gb[i] = static_cast<scalar_t>(policy * upstream);
    }
  });
  return {grad, grad_bias};
}

// The log-prob's autograd node, built directly (as PyTorch's own generated nodes are) rather than through
// torch::autograd::Function, whose bookkeeping cost about 20 us of each SD-shape forward+backward (0.155 ms ->
// 0.133 ms in bench/test_bench_ops.py). The forward saves only the residual prev - mean (one tensor, in the
// compute dtype) and the step table; the backward reads the residual and writes the gradients of
// (cond, uncond, x_t, x_{t-1}) that the graph needs.
struct StepLogprobBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable residual, table;
  double guidance = 1.0;
  bool sum_reduction = false, has_uncond = false;
  at::ScalarType dtypes[4] = {at::kFloat, at::kFloat, at::kFloat, at::kFloat};

  std::string name() const override { return "StepLogprobBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    residual.reset_data();
    table.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastgrpo: the step log-prob's backward is not differentiable itself (create_graph=True); use "
                "backend='reference' for higher-order gradients");
    torch::autograd::variable_list result(4);
    std::vector<bool> needs(4);
    bool any = false;
    for (size_t k = 0; k < 4; ++k) {
      needs[k] = task_should_compute_output(k) && (k != 1 || has_uncond);
      any = any || needs[k];
    }
    if (!any || !grads[0].defined()) return result;  // nothing to do, or no gradient flowed in
    auto computed = step_logprob_backward(grads[0], residual.unpack(), table.unpack(), guidance, sum_reduction,
                                          has_uncond, needs);
    for (size_t k = 0; k < 4; ++k) {
      if (!needs[k]) continue;
      result[k] = computed[k].scalar_type() == dtypes[k] ? computed[k] : computed[k].to(dtypes[k]);
    }
    return result;
  }
};

// Differentiable log-prob for eager callers; without a gradient to track it is the plain forward.
at::Tensor step_logprob_autograd(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                 const at::Tensor& sample, const at::Tensor& prev, const at::Tensor& table,
                                 double guidance, bool sum_reduction) {
  const at::Tensor uncond_or_undefined = uncond.has_value() ? *uncond : at::Tensor();
  const bool track = torch::autograd::compute_requires_grad(cond, uncond_or_undefined, sample, prev);
  at::Tensor out, residual;
  {
    at::AutoDispatchBelowADInplaceOrView guard;  // the kernels below are not recorded by autograd
    auto result = step_logprob_forward(cond, uncond, sample, prev, table, guidance, sum_reduction, false, track);
    out = result[0];
    residual = result[2];
  }
  if (!track) return out;
  TORCH_CHECK(!table.requires_grad(), "fastgrpo cpu: the log-prob does not differentiate the step table");
  auto node = c10::make_intrusive<StepLogprobBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(cond, uncond_or_undefined, sample, prev));
  node->residual = torch::autograd::SavedVariable(residual, false);
  node->table = torch::autograd::SavedVariable(table, false);
  node->guidance = guidance;
  node->sum_reduction = sum_reduction;
  node->has_uncond = uncond.has_value();
  const at::Tensor* inputs[4] = {&cond, &uncond_or_undefined, &sample, &prev};
  for (int k = 0; k < 4; ++k) {
    if (inputs[k]->defined()) node->dtypes[k] = inputs[k]->scalar_type();
  }
  torch::autograd::set_history(out, node);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgrpo C++ CPU kernels";
  m.def("step_logprob_autograd", &step_logprob_autograd);
  m.def("step_logprob_forward", &step_logprob_forward);
  m.def("step_logprob_backward", &step_logprob_backward);
  m.def("group_advantages", &group_advantages);
  m.def("grpo_loss_forward", &grpo_loss_forward);
  m.def("grpo_loss_backward", &grpo_loss_backward);
  m.def("matching_loss_forward", &matching_loss_forward);
  m.def("matching_loss_backward", &matching_loss_backward);
  m.def("nft_loss_forward", &nft_loss_forward);
  m.def("nft_loss_backward", &nft_loss_backward);
  m.def("attention_forward", &attention_forward);
  m.def("attention_backward", &attention_backward);
}
