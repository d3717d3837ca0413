// C++ CPU kernels for fastgrpo.ops: DDIM-step log-prob (CFG folded in), group advantages, clipped-ratio loss.
//
// The same math as kernels/fastgrpo_kernels (see the docstrings there). Inputs arrive contiguous in the compute
// type T (float, or double for fp64 callers); fastgrpo.ops converts other dtypes first.
// Rows are split into fixed chunks of CHUNK elements processed in parallel; each chunk sums with SIMD lanes in T
// and the chunk partials are added in double in chunk order, so results do not depend on the thread count.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 8192;

// Sum of squared (prev - mean) over one chunk; writes prev (sampling variant) when prev_out is set.
template <typename T>
double chunk_sum_squares(const T* cond, const T* uncond, const T* sample, const T* target, T* prev_out,
                         int64_t begin, int64_t end, T cx, T ce, T sd, T g) {
  T acc = 0;
  const bool has_uncond = uncond != nullptr;
  const bool has_noise = prev_out != nullptr;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const T guided = has_uncond ? uncond[i] + g * (cond[i] - uncond[i]) : cond[i];
    const T mean = cx * sample[i] + ce * guided;
    T prev = target[i];
    if (has_noise) {
      prev = mean + sd * target[i];
      prev_out[i] = prev;
    }
    const T diff = prev - mean;
    acc += diff * diff;
  }
  return static_cast<double>(acc);
}

template <typename T>
void logprob_forward_impl(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond, const at::Tensor& sample,
                          const at::Tensor& target, at::Tensor& prev_out, bool has_noise, const at::Tensor& coef_x,
                          const at::Tensor& coef_e, const at::Tensor& stdv, const at::Tensor& offset, double g,
                          double scale, at::Tensor& out) {
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / std::max<int64_t>(batch, 1);
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  std::vector<double> partial(batch * chunks, 0.0);
  const T* c = cond.data_ptr<T>();
  const T* u = uncond.has_value() ? uncond->data_ptr<T>() : nullptr;
  const T* x = sample.data_ptr<T>();
  const T* t = target.data_ptr<T>();
  T* p = has_noise ? prev_out.data_ptr<T>() : nullptr;
  const T* cx = coef_x.data_ptr<T>();
  const T* ce = coef_e.data_ptr<T>();
  const T* sd = stdv.data_ptr<T>();
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t row = job / chunks;
      const int64_t begin = row * n + (job % chunks) * CHUNK;
      const int64_t end = std::min(begin + CHUNK, (row + 1) * n);
      partial[job] = chunk_sum_squares<T>(c, u, x, t, p, begin, end, cx[row], ce[row], sd[row], static_cast<T>(g));
    }
  });
  T* o = out.data_ptr<T>();
  const T* off = offset.data_ptr<T>();
  for (int64_t row = 0; row < batch; ++row) {
    double total = 0.0;
    for (int64_t k = 0; k < chunks; ++k) total += partial[row * chunks + k];
    const double s = static_cast<double>(sd[row]);
    o[row] = static_cast<T>(-scale * total / (2.0 * s * s) + static_cast<double>(off[row]));
  }
}

template <typename T>
void logprob_backward_impl(const at::Tensor& grad_out, const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                           const at::Tensor& sample, const at::Tensor& prev, const at::Tensor& coef_x,
                           const at::Tensor& coef_e, const at::Tensor& stdv, double g, double scale,
                           std::vector<at::Tensor>& grads) {
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / std::max<int64_t>(batch, 1);
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  const T* c = cond.data_ptr<T>();
  const T* u = uncond.has_value() ? uncond->data_ptr<T>() : nullptr;
  const T* x = sample.data_ptr<T>();
  const T* pv = prev.data_ptr<T>();
  const T* go = grad_out.data_ptr<T>();
  const T* cx = coef_x.data_ptr<T>();
  const T* ce = coef_e.data_ptr<T>();
  const T* sd = stdv.data_ptr<T>();
  T* g_cond = grads[0].data_ptr<T>();
  T* g_uncond = grads[1].numel() ? grads[1].data_ptr<T>() : nullptr;
  T* g_sample = grads[2].numel() ? grads[2].data_ptr<T>() : nullptr;
  T* g_prev = grads[3].numel() ? grads[3].data_ptr<T>() : nullptr;
  const T gt = static_cast<T>(g);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t job = lo; job < hi; ++job) {
      const int64_t row = job / chunks;
      const int64_t begin = row * n + (job % chunks) * CHUNK;
      const int64_t end = std::min(begin + CHUNK, (row + 1) * n);
      const T factor = static_cast<T>(static_cast<double>(go[row]) * scale /
                                      (static_cast<double>(sd[row]) * static_cast<double>(sd[row])));
      const T rx = cx[row], re = ce[row];
      const T cond_scale = u ? gt : T(1);
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const T guided = u ? u[i] + gt * (c[i] - u[i]) : c[i];
        const T d_mean = factor * (pv[i] - (rx * x[i] + re * guided));
        const T d_guided = d_mean * re;
        g_cond[i] = cond_scale * d_guided;
        if (g_uncond) g_uncond[i] = (T(1) - gt) * d_guided;
        if (g_sample) g_sample[i] = d_mean * rx;
        if (g_prev) g_prev[i] = -d_mean;
      }
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

// Returns {log_prob (B,), prev_sample (B, ...) or an empty tensor}.
std::vector<at::Tensor> ddim_logprob_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                             const at::Tensor& sample, const at::Tensor& target,
                                             const at::Tensor& coef_x, const at::Tensor& coef_e,
                                             const at::Tensor& stdv, const at::Tensor& offset, double guidance,
                                             double scale, bool has_noise) {
  check_inputs(cond, {sample, target, coef_x, coef_e, stdv, offset});
  if (uncond.has_value()) check_inputs(cond, {*uncond});
  auto out = at::empty({cond.size(0)}, cond.options());
  auto prev_out = has_noise ? at::empty_like(cond) : at::empty({0}, cond.options());
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "ddim_logprob_forward", [&] {
    logprob_forward_impl<scalar_t>(cond, uncond, sample, target, prev_out, has_noise, coef_x, coef_e, stdv, offset,
                                   guidance, scale, out);
  });
  return {out, prev_out};
}

// Returns {grad_cond, grad_uncond, grad_sample, grad_prev}; an unrequested gradient is an empty tensor.
std::vector<at::Tensor> ddim_logprob_backward(const at::Tensor& grad_out, const at::Tensor& cond,
                                              const c10::optional<at::Tensor>& uncond, const at::Tensor& sample,
                                              const at::Tensor& prev, const at::Tensor& coef_x,
                                              const at::Tensor& coef_e, const at::Tensor& stdv, double guidance,
                                              double scale, bool need_uncond, bool need_sample, bool need_prev) {
  check_inputs(cond, {grad_out, sample, prev, coef_x, coef_e, stdv});
  if (uncond.has_value()) check_inputs(cond, {*uncond});
  auto none = at::empty({0}, cond.options());
  std::vector<at::Tensor> grads = {at::empty_like(cond),
                                   need_uncond && uncond.has_value() ? at::empty_like(cond) : none,
                                   need_sample ? at::empty_like(cond) : none, need_prev ? at::empty_like(cond) : none};
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "ddim_logprob_backward", [&] {
    logprob_backward_impl<scalar_t>(grad_out, cond, uncond, sample, prev, coef_x, coef_e, stdv, guidance, scale,
                                    grads);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastgrpo C++ CPU kernels";
  m.def("ddim_logprob_forward", &ddim_logprob_forward);
  m.def("ddim_logprob_backward", &ddim_logprob_backward);
  m.def("group_advantages", &group_advantages);
  m.def("grpo_loss_forward", &grpo_loss_forward);
  m.def("grpo_loss_backward", &grpo_loss_backward);
}
