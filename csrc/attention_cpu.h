// Small-head scaled dot-product attention for CPU (attention_cpu.cpp), bound in fastgrpo_cpu.cpp.
#pragma once

#include <torch/extension.h>

#include <vector>

// q (B, Lq, H, D), k and v (B, Lk, H, D), float32 or float64 -> {out (B, Lq, H, D), lse (B, H, Lq)}.
std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          double scale);
// -> {grad_q, grad_k, grad_v}, from the forward's out and lse.
std::vector<at::Tensor> attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& out, const at::Tensor& lse,
                                           const at::Tensor& grad_out, double scale);
