// Advantage-weighted matching loss for CPU (matching_cpu.cpp), bound in fastgrpo_cpu.cpp.
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
