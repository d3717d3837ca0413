// The losses on (sample, draw) rows for CPU: advantage-weighted matching (the same math as
// kernels/fastgrpo_kernels/matching_loss.py and fastgrpo.ops.reference.matching_loss) and negative-aware fine-tuning
// (nft_loss: kernels/fastgrpo_kernels/nft_loss.py, fastgrpo.ops.reference.nft_loss; its formulas are in
// fastgrpo/ops/nft.py).
//
// Forward: per row i, with guided = u + g (c - u) (c alone without uncond) over its N elements,
//   se_i = sum((guided - target)^2) / N,  kl_i = sum((guided - ref)^2) / N,  surrogate_i = -se_i,
//   ratio_i = exp(surrogate_i - old_i) (1 without old), term_i = max(-A_i ratio_i, -A_i clamp(ratio_i, 1 - lo, 1 + hi)),
//   loss = mean(term) + kl_coef mean(kl), coef_i = d loss / d surrogate_i = -A_i ratio_i / B where the unclipped
//   term is the larger (0 where the clip is active).
// Backward: d loss / d guided = grad_loss * (coef_i * (-2 / N) (guided - target) + kl_coef / B * (2 / N) (guided - ref)),
//   then d/d cond = g d_guided (d_guided without CFG), d/d uncond = (1 - g) d_guided.
// Rows are split into fixed chunks summed with SIMD lanes in T and added in double in chunk order, so results do not
// depend on the thread count.

#include "matching_cpu.h"
#include "chunks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace {

using fastgrpo_cpu::CHUNK;
using fastgrpo_cpu::for_each_chunk;

// Sums of (guided - target)^2 and (guided - ref)^2 over [begin, end).
template <typename T, bool HAS_UNCOND, bool HAS_REF>
void chunk_sums(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ t, const T* __restrict__ r,
                int64_t begin, int64_t end, T g, double* se, double* kl) {
  T acc = 0, acc_ref = 0;
#pragma omp simd reduction(+ : acc, acc_ref)
  for (int64_t i = begin; i < end; ++i) {
    T guided = c[i];
    if constexpr (HAS_UNCOND) guided = u[i] + g * (c[i] - u[i]);
    const T diff = guided - t[i];
    acc += diff * diff;
    if constexpr (HAS_REF) {
      const T drift = guided - r[i];
      acc_ref += drift * drift;
    }
  }
  *se = static_cast<double>(acc);
  *kl = static_cast<double>(acc_ref);
}

// d loss / d guided = d at element i, stored as d/d cond = g d and d/d uncond = (1 - g) d (d/d cond = d without CFG).
template <typename T, bool HAS_UNCOND>
inline void store_guided(T* __restrict__ gc, T* __restrict__ gu, int64_t i, T g, T d) {
  if constexpr (HAS_UNCOND) {
    if (gc) gc[i] = g * d;
    if (gu) gu[i] = (T(1) - g) * d;
  } else {
    gc[i] = d;
  }
}

template <typename T, bool HAS_UNCOND, bool HAS_REF>
void chunk_grads(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ t, const T* __restrict__ r,
                 T* __restrict__ gc, T* __restrict__ gu, int64_t begin, int64_t end, T g, T f_target, T f_ref) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T guided = c[i];
    if constexpr (HAS_UNCOND) guided = u[i] + g * (c[i] - u[i]);
    T d = f_target * (guided - t[i]);
    if constexpr (HAS_REF) d += f_ref * (guided - r[i]);
    store_guided<T, HAS_UNCOND>(gc, gu, i, g, d);
  }
}

// NFT: sums over [begin, end) of e+^2, |e+|, e-^2, |e-|, (guided - old)^2, (guided - ref)^2, with
// e+ = beta guided + (1 - beta) old - target and e- = (1 + beta) old - beta guided - target.
template <typename T, bool HAS_UNCOND, bool HAS_REF>
void nft_chunk_sums(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ t,
                    const T* __restrict__ o, const T* __restrict__ r, int64_t begin, int64_t end, T g, T beta,
                    double* sums) {
  T sq_pos = 0, abs_pos = 0, sq_neg = 0, abs_neg = 0, dev = 0, drift_sq = 0;
#pragma omp simd reduction(+ : sq_pos, abs_pos, sq_neg, abs_neg, dev, drift_sq)
  for (int64_t i = begin; i < end; ++i) {
    T guided = c[i];
    if constexpr (HAS_UNCOND) guided = u[i] + g * (c[i] - u[i]);
    const T step = guided - o[i];
    const T base = o[i] - t[i];
    const T pos = base + beta * step;
    const T neg = base - beta * step;
    sq_pos += pos * pos;
    abs_pos += std::abs(pos);
    sq_neg += neg * neg;
    abs_neg += std::abs(neg);
    dev += step * step;
    if constexpr (HAS_REF) {
      const T drift = guided - r[i];
      drift_sq += drift * drift;
    }
  }
  const T values[6] = {sq_pos, abs_pos, sq_neg, abs_neg, dev, drift_sq};
  for (int k = 0; k < 6; ++k) sums[k] = static_cast<double>(values[k]);
}

template <typename T, bool HAS_UNCOND, bool HAS_REF>
void nft_chunk_grads(const T* __restrict__ c, const T* __restrict__ u, const T* __restrict__ t,
                     const T* __restrict__ o, const T* __restrict__ r, T* __restrict__ gc, T* __restrict__ gu,
                     int64_t begin, int64_t end, T g, T beta, T f_pos, T f_neg, T f_ref) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    T guided = c[i];
    if constexpr (HAS_UNCOND) guided = u[i] + g * (c[i] - u[i]);
    const T step = guided - o[i];
    const T base = o[i] - t[i];
    T d = f_pos * (base + beta * step) - f_neg * (base - beta * step);
    if constexpr (HAS_REF) d += f_ref * (guided - r[i]);
    store_guided<T, HAS_UNCOND>(gc, gu, i, g, d);
  }
}

template <typename Fn>
void with_two_flags(bool a, bool b, const Fn& fn) {
  if (a && b) fn(std::true_type{}, std::true_type{});
  else if (a) fn(std::true_type{}, std::false_type{});
  else if (b) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

// Every given tensor (optional ones may be absent) is a contiguous CPU tensor of the predictions' dtype.
void check(const at::Tensor& like, std::initializer_list<const at::Tensor*> tensors, const char* op = "matching_loss") {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(!t || (t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == like.scalar_type()),
                "fastgrpo cpu ", op, ": inputs must be contiguous CPU tensors of the predictions' dtype");
  }
}

const at::Tensor* maybe(const c10::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// The backward's outputs {d loss / d cond, d loss / d uncond}, undefined where not asked for. Without CFG the
// conditional prediction is the guided one, so d/d uncond does not exist.
std::pair<at::Tensor, at::Tensor> guided_grad_buffers(const at::Tensor& cond, bool has_uncond, bool needs_cond,
                                                      bool needs_uncond) {
  return {needs_cond ? at::empty_like(cond) : at::Tensor(),
          needs_uncond && has_uncond ? at::empty_like(cond) : at::Tensor()};
}

}  // namespace

std::vector<at::Tensor> matching_loss_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                              const at::Tensor& target, const c10::optional<at::Tensor>& ref,
                                              const at::Tensor& advantages, const c10::optional<at::Tensor>& old,
                                              double guidance, double clip_low, double clip_high, double kl_coef) {
  check(cond, {&cond, &target, &advantages, maybe(uncond), maybe(ref), maybe(old)});
  const int64_t batch = cond.size(0);
  TORCH_CHECK(batch > 0 && advantages.numel() == batch, "fastgrpo cpu matching_loss: advantages must be (B,)");
  const int64_t n = cond.numel() / batch;
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  auto stats = at::empty({7}, cond.options());
  auto rows = at::empty({batch, 3}, cond.options());
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "matching_loss_forward", [&] {
    using T = scalar_t;
    const T* c = cond.data_ptr<T>();
    const T* u = uncond.has_value() ? uncond->data_ptr<T>() : nullptr;
    const T* t = target.data_ptr<T>();
    const T* r = ref.has_value() ? ref->data_ptr<T>() : nullptr;
    std::vector<double> se(batch * chunks), kl(batch * chunks);
    with_two_flags(u != nullptr, r != nullptr, [&](auto has_uncond, auto has_ref) {
      for_each_chunk(batch, n, [&](int64_t job, int64_t, int64_t begin, int64_t end) {
        chunk_sums<T, decltype(has_uncond)::value, decltype(has_ref)::value>(c, u, t, r, begin, end, T(guidance),
                                                                            &se[job], &kl[job]);
      });
    });
    const T* adv = advantages.data_ptr<T>();
    const T* o = old.has_value() ? old->data_ptr<T>() : nullptr;
    T* out = rows.data_ptr<T>();
    double loss = 0, sq = 0, clipped = 0, ratio_sum = 0, kl_sum = 0;
    double ratio_min = std::numeric_limits<double>::infinity(), ratio_max = -ratio_min;
    for (int64_t i = 0; i < batch; ++i) {
      double se_i = 0, kl_i = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        se_i += se[i * chunks + k];
        kl_i += kl[i * chunks + k];
      }
      // the surrogate is rounded to T first, as the reference computes it, so an on-policy old gives ratio 1
      const T surrogate = static_cast<T>(-se_i / n);
      kl_i /= n;
      const double log_ratio = o ? static_cast<double>(surrogate) - o[i] : 0.0;
      const double ratio = std::exp(log_ratio);
      const double bounded = std::min(std::max(ratio, 1.0 - clip_low), 1.0 + clip_high);
      const double a = adv[i];
      const bool active = -a * ratio >= -a * bounded;  // the unclipped term is the max: the gradient flows
      loss += std::max(-a * ratio, -a * bounded);
      sq += log_ratio * log_ratio;
      clipped += (ratio < 1.0 - clip_low || ratio > 1.0 + clip_high) ? 1.0 : 0.0;
      ratio_sum += ratio;
      ratio_min = std::min(ratio_min, ratio);
      ratio_max = std::max(ratio_max, ratio);
      kl_sum += kl_i;
      out[3 * i] = surrogate;
      out[3 * i + 1] = static_cast<T>(active ? -a * ratio / batch : 0.0);
      out[3 * i + 2] = static_cast<T>(kl_i);
    }
    T* s = stats.data_ptr<T>();
    const double values[7] = {loss / batch + kl_coef * kl_sum / batch, 0.5 * sq / batch, clipped / batch,
                              ratio_sum / batch, ratio_min, ratio_max, kl_sum / batch};
    for (int k = 0; k < 7; ++k) s[k] = static_cast<T>(values[k]);
  });
  return {stats, rows};
}

std::vector<at::Tensor> matching_loss_backward(const at::Tensor& grad_loss, const at::Tensor& cond,
                                               const c10::optional<at::Tensor>& uncond, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& ref, const at::Tensor& rows,
                                               double guidance, double kl_coef, bool needs_cond, bool needs_uncond) {
  check(cond, {&cond, &target, &rows, &grad_loss, maybe(uncond), maybe(ref)});
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / batch;
  const bool has_uncond = uncond.has_value();
  auto [grad_cond, grad_uncond] = guided_grad_buffers(cond, has_uncond, needs_cond, needs_uncond);
  if (!grad_cond.defined() && !grad_uncond.defined()) return {grad_cond, grad_uncond};
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "matching_loss_backward", [&] {
    using T = scalar_t;
    const T* c = cond.data_ptr<T>();
    const T* u = has_uncond ? uncond->data_ptr<T>() : nullptr;
    const T* t = target.data_ptr<T>();
    const T* r = ref.has_value() ? ref->data_ptr<T>() : nullptr;
    const T* row = rows.data_ptr<T>();
    T* gc = grad_cond.defined() ? grad_cond.data_ptr<T>() : nullptr;
    T* gu = grad_uncond.defined() ? grad_uncond.data_ptr<T>() : nullptr;
    const double go = static_cast<double>(grad_loss.data_ptr<T>()[0]);
    with_two_flags(has_uncond, r != nullptr, [&](auto uncond_flag, auto ref_flag) {
      for_each_chunk(batch, n, [&](int64_t, int64_t i, int64_t begin, int64_t end) {
        const T f_target = static_cast<T>(go * static_cast<double>(row[3 * i + 1]) * -2.0 / n);
        const T f_ref = static_cast<T>(go * kl_coef / batch * 2.0 / n);
        chunk_grads<T, decltype(uncond_flag)::value, decltype(ref_flag)::value>(c, u, t, r, gc, gu, begin, end,
                                                                               T(guidance), f_target, f_ref);
      });
    });
  });
  return {grad_cond, grad_uncond};
}

std::vector<at::Tensor> nft_loss_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                         const at::Tensor& target, const at::Tensor& old,
                                         const c10::optional<at::Tensor>& ref, const at::Tensor& advantages,
                                         const at::Tensor& scale, double guidance, double beta, double adv_clip_max,
                                         double kl_coef) {
  check(cond, {&cond, &target, &old, &advantages, &scale, maybe(uncond), maybe(ref)}, "nft_loss");
  const int64_t batch = cond.size(0);
  TORCH_CHECK(batch > 0 && advantages.numel() == batch && scale.numel() == batch,
              "fastgrpo cpu nft_loss: advantages and scale must be (B,)");
  const int64_t n = cond.numel() / batch;
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  auto stats = at::empty({3}, cond.options());
  auto rows = at::empty({batch, 2}, cond.options());
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "nft_loss_forward", [&] {
    using T = scalar_t;
    const T* c = cond.data_ptr<T>();
    const T* u = uncond.has_value() ? uncond->data_ptr<T>() : nullptr;
    const T* t = target.data_ptr<T>();
    const T* o = old.data_ptr<T>();
    const T* r = ref.has_value() ? ref->data_ptr<T>() : nullptr;
    std::vector<double> sums(batch * chunks * 6);
    with_two_flags(u != nullptr, r != nullptr, [&](auto has_uncond, auto has_ref) {
      for_each_chunk(batch, n, [&](int64_t job, int64_t, int64_t begin, int64_t end) {
        nft_chunk_sums<T, decltype(has_uncond)::value, decltype(has_ref)::value>(c, u, t, o, r, begin, end,
                                                                                T(guidance), T(beta), &sums[6 * job]);
      });
    });
    const T* adv = advantages.data_ptr<T>();
    const T* sc = scale.data_ptr<T>();
    T* out = rows.data_ptr<T>();
    double loss = 0, deviation = 0, kl_sum = 0;
    for (int64_t i = 0; i < batch; ++i) {
      double row[6] = {0, 0, 0, 0, 0, 0};
      for (int64_t k = 0; k < chunks; ++k)
        for (int j = 0; j < 6; ++j) row[j] += sums[6 * (i * chunks + k) + j];
      const double c_i = sc[i], a = std::min(std::max(static_cast<double>(adv[i]), -adv_clip_max), adv_clip_max);
      const double r_i = std::min(std::max(a / adv_clip_max / 2.0 + 0.5, 0.0), 1.0);
      const double w_pos = std::max(std::abs(c_i) * row[1] / n, 1e-5);
      const double w_neg = std::max(std::abs(c_i) * row[3] / n, 1e-5);
      const double err_pos = c_i * c_i * row[0] / n / w_pos, err_neg = c_i * c_i * row[2] / n / w_neg;
      loss += adv_clip_max / beta * (r_i * err_pos + (1.0 - r_i) * err_neg);
      deviation += row[4] / n;
      kl_sum += row[5] / n;
      out[2 * i] = static_cast<T>(adv_clip_max * r_i * c_i * c_i / (w_pos * batch));
      out[2 * i + 1] = static_cast<T>(adv_clip_max * (1.0 - r_i) * c_i * c_i / (w_neg * batch));
    }
    T* s = stats.data_ptr<T>();
    s[0] = static_cast<T>(loss / batch + kl_coef * kl_sum / batch);
    s[1] = static_cast<T>(deviation / batch);
    s[2] = static_cast<T>(kl_sum / batch);
  });
  return {stats, rows};
}

std::vector<at::Tensor> nft_loss_backward(const at::Tensor& grad_loss, const at::Tensor& cond,
                                          const c10::optional<at::Tensor>& uncond, const at::Tensor& target,
                                          const at::Tensor& old, const c10::optional<at::Tensor>& ref,
                                          const at::Tensor& rows, double guidance, double beta, double kl_coef,
                                          bool needs_cond, bool needs_uncond) {
  check(cond, {&cond, &target, &old, &rows, &grad_loss, maybe(uncond), maybe(ref)}, "nft_loss");
  const int64_t batch = cond.size(0);
  const int64_t n = cond.numel() / batch;
  const bool has_uncond = uncond.has_value();
  auto [grad_cond, grad_uncond] = guided_grad_buffers(cond, has_uncond, needs_cond, needs_uncond);
  if (!grad_cond.defined() && !grad_uncond.defined()) return {grad_cond, grad_uncond};
  AT_DISPATCH_FLOATING_TYPES(cond.scalar_type(), "nft_loss_backward", [&] {
    using T = scalar_t;
    const T* c = cond.data_ptr<T>();
    const T* u = has_uncond ? uncond->data_ptr<T>() : nullptr;
    const T* t = target.data_ptr<T>();
    const T* o = old.data_ptr<T>();
    const T* r = ref.has_value() ? ref->data_ptr<T>() : nullptr;
    const T* row = rows.data_ptr<T>();
    T* gc = grad_cond.defined() ? grad_cond.data_ptr<T>() : nullptr;
    T* gu = grad_uncond.defined() ? grad_uncond.data_ptr<T>() : nullptr;
    const double scale = static_cast<double>(grad_loss.data_ptr<T>()[0]) * 2.0 / n;
    with_two_flags(has_uncond, r != nullptr, [&](auto uncond_flag, auto ref_flag) {
      for_each_chunk(batch, n, [&](int64_t, int64_t i, int64_t begin, int64_t end) {
        nft_chunk_grads<T, decltype(uncond_flag)::value, decltype(ref_flag)::value>(
            c, u, t, o, r, gc, gu, begin, end, T(guidance), T(beta), static_cast<T>(scale * row[2 * i]),
            static_cast<T>(scale * row[2 * i + 1]), static_cast<T>(scale * kl_coef / batch));
      });
    });
  });
  return {grad_cond, grad_uncond};
}
