// The (sample, draw) row losses for CPU (matching_cpu.cpp): advantage-weighted matching and negative-aware
// fine-tuning; bound in fastgrpo_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

// cond, uncond?, target, ref? (B, ...) and advantages, old? (B,), contiguous, one float type ->
// {stats (7,) [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl], rows (B, 3) [surrogate, d loss /
// d surrogate, kl]}.
std::vector<at::Tensor> matching_loss_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                              const at::Tensor& target, const c10::optional<at::Tensor>& ref,
                                              const at::Tensor& advantages, const c10::optional<at::Tensor>& old,
                                              double guidance, double clip_low, double clip_high, double kl_coef);
// grad_loss (1,) and the forward's rows -> {d loss / d cond, d loss / d uncond} (undefined where not needed).
std::vector<at::Tensor> matching_loss_backward(const at::Tensor& grad_loss, const at::Tensor& cond,
                                               const c10::optional<at::Tensor>& uncond, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& ref, const at::Tensor& rows,
                                               double guidance, double kl_coef, bool needs_cond, bool needs_uncond);
// cond, uncond?, target, old, ref? (B, ...) and advantages, scale (B,), contiguous, one float type ->
// {stats (3,) [loss, deviation, kl], rows (B, 2) [f_pos, f_neg]} (see fastgrpo/ops/nft.py).
std::vector<at::Tensor> nft_loss_forward(const at::Tensor& cond, const c10::optional<at::Tensor>& uncond,
                                         const at::Tensor& target, const at::Tensor& old,
                                         const c10::optional<at::Tensor>& ref, const at::Tensor& advantages,
                                         const at::Tensor& scale, double guidance, double beta, double adv_clip_max,
                                         double kl_coef);
// grad_loss (1,) and the forward's rows -> {d loss / d cond, d loss / d uncond} (undefined where not needed).
std::vector<at::Tensor> nft_loss_backward(const at::Tensor& grad_loss, const at::Tensor& cond,
                                          const c10::optional<at::Tensor>& uncond, const at::Tensor& target,
                                          const at::Tensor& old, const c10::optional<at::Tensor>& ref,
                                          const at::Tensor& rows, double guidance, double beta, double kl_coef,
                                          bool needs_cond, bool needs_uncond);
