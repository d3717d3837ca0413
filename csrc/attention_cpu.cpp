// Scaled dot-product attention for CPU, forward and backward, for the small head dims (up to a few dozen) where
// PyTorch's CPU kernels spend their time in GEMM calls of inner size D rather than in the softmax.
//
// Layout: q (B, Lq, H, D), k and v (B, Lk, H, D), contiguous: exactly the (B, L, H * D) output of a linear
// projection viewed per head, so no transpose copies are made on the way in or out. out has q's layout; lse (B, H,
// Lq) holds each query row's log-sum-exp of its scaled scores, which the backward uses to recompute the
// probabilities instead of storing them.
//
// Each (batch, head) pair is one task. A task copies its keys (pre-multiplied by the scale) and values into
// D x Lk buffers, so every inner loop runs over the key index j with unit stride and vectorises however small D
// is. Results are computed in one fixed order per task, so they do not depend on the thread count.

#include "attention_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 in float: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, and a degree-6 polynomial
// for exp(r) (the Cephes expf coefficients, about 1 ulp), scaled by 2^n through the exponent bits. Branch-free
// arithmetic only (n is rounded by adding 1.5 * 2^23), so `omp simd` loops vectorise it (with -fno-trapping-math,
// which setup.py passes, the clamp becomes a select). Inputs below -87 give
// exp(-87) = 1.6e-38, which is lost against the row's largest term, exp(0) = 1.
inline float exp_nonpositive(float x) {
  constexpr float round_shift = 12582912.0f;  // 1.5 * 2^23
  const float clamped = x < -87.0f ? -87.0f : x;
  const float shifted = clamped * 1.44269504088896341f + round_shift;
  const float n = shifted - round_shift;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // shifted's low mantissa bits hold n (two's complement, offset by the shift's own 2^22 bit)
  const int32_t exponent = (std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(round_shift) + 127) << 23;
  return p * std::bit_cast<float>(exponent);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// Per-task scratch: keys (scaled) and values transposed to D x Lk, and one row of scores.
template <typename T>
struct Scratch {
  std::vector<T> keys, values, scores, extra;
  Scratch(int64_t d, int64_t lk, bool backward)
      : keys(d * lk), values(d * lk), scores(lk), extra(backward ? lk : 0) {}
};

// Copies head h of batch b from (B, L, H, D) into a D x L buffer, times `factor`.
template <typename T>
void gather_transposed(const T* src, T* dst, int64_t b, int64_t h, int64_t length, int64_t heads, int64_t d,
                       T factor) {
  const T* base = src + b * length * heads * d + h * d;
  for (int64_t j = 0; j < length; ++j) {
    const T* row = base + j * heads * d;
    for (int64_t c = 0; c < d; ++c) dst[c * length + j] = row[c] * factor;
  }
}

// scores[j] = sum_c query[c] * keys[c][j]: the scaled scores of one query row.
template <typename T>
void row_scores(const T* __restrict__ query, const T* __restrict__ keys, T* __restrict__ scores, int64_t lk,
                int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < lk; ++j) scores[j] = query[0] * keys[j];
  for (int64_t c = 1; c < d; ++c) {
    const T qc = query[c];
    const T* __restrict__ key = keys + c * lk;
#pragma omp simd
    for (int64_t j = 0; j < lk; ++j) scores[j] += qc * key[j];
  }
}

struct Shape {
  int64_t batch, heads, lq, lk, d;
};

template <typename T>
void forward_impl(const T* q, const T* k, const T* v, T* out, T* lse, Shape s, T scale) {
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t lo, int64_t hi) {
    Scratch<T> buf(s.d, s.lk, false);
    T* __restrict__ scores = buf.scores.data();
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      gather_transposed(k, buf.keys.data(), b, h, s.lk, s.heads, s.d, scale);
      gather_transposed(v, buf.values.data(), b, h, s.lk, s.heads, s.d, T(1));
      for (int64_t i = 0; i < s.lq; ++i) {
        const int64_t row = ((b * s.lq + i) * s.heads + h) * s.d;
        row_scores(q + row, buf.keys.data(), scores, s.lk, s.d);
        T top = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < s.lk; ++j) top = std::max(top, scores[j]);
#pragma omp simd
        for (int64_t j = 0; j < s.lk; ++j) scores[j] = exp_nonpositive(scores[j] - top);
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < s.lk; ++j) total += scores[j];
        const T inverse = T(1) / total;
        for (int64_t c = 0; c < s.d; ++c) {
          const T* __restrict__ value = buf.values.data() + c * s.lk;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < s.lk; ++j) acc += scores[j] * value[j];
          out[row + c] = acc * inverse;
        }
        lse[task * s.lq + i] = top + std::log(total);
      }
    }
  });
}

// The forward for a compile-time head dim D <= 8, with query rows in SIMD lanes: a block of LANES rows walks the
// keys once for each row's maximum score and once for exp, sum and the weighted values, keeping every running
// value in registers, so no per-row horizontal reduction is needed. Keys and values are read in place (each key's
// D entries are broadcast to all lanes). Lanes past the last row repeat it and are not stored.
template <typename T, int D>
void forward_lanes_impl(const T* q, const T* k, const T* v, T* out, T* lse, Shape s, T scale) {
  constexpr int LANES = 16;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads, stride = s.heads * D;
      const T* keys = k + b * s.lk * stride + h * D;
      const T* values = v + b * s.lk * stride + h * D;
      for (int64_t i0 = 0; i0 < s.lq; i0 += LANES) {
        T query[D][LANES], top[LANES], total[LANES], acc[D][LANES];
        for (int r = 0; r < LANES; ++r) {
          const int64_t i = std::min<int64_t>(i0 + r, s.lq - 1);
          for (int c = 0; c < D; ++c) query[c][r] = q[((b * s.lq + i) * s.heads + h) * D + c] * scale;
          top[r] = -std::numeric_limits<T>::infinity();
          total[r] = 0;
          for (int c = 0; c < D; ++c) acc[c][r] = 0;
        }
        for (int64_t j = 0; j < s.lk; ++j) {
          const T* key = keys + j * stride;
#pragma omp simd
          for (int r = 0; r < LANES; ++r) {
            T score = query[0][r] * key[0];
            for (int c = 1; c < D; ++c) score += query[c][r] * key[c];
            top[r] = std::max(top[r], score);
          }
        }
        for (int64_t j = 0; j < s.lk; ++j) {
          const T* key = keys + j * stride;
          const T* value = values + j * stride;
#pragma omp simd
          for (int r = 0; r < LANES; ++r) {
            T score = query[0][r] * key[0];
            for (int c = 1; c < D; ++c) score += query[c][r] * key[c];
            const T p = exp_nonpositive(score - top[r]);
            total[r] += p;
            for (int c = 0; c < D; ++c) acc[c][r] += p * value[c];
          }
        }
        for (int r = 0; r < LANES && i0 + r < s.lq; ++r) {
          const int64_t i = i0 + r;
          for (int c = 0; c < D; ++c) out[((b * s.lq + i) * s.heads + h) * D + c] = acc[c][r] / total[r];
          lse[task * s.lq + i] = top[r] + std::log(total[r]);
        }
      }
    }
  });
}

// forward_lanes_impl<T, D> for D = d when d <= 8, else the generic forward.
template <typename T, int D = 1>
void forward_dispatch(const T* q, const T* k, const T* v, T* out, T* lse, Shape s, T scale) {
  if constexpr (D > 8) {
    forward_impl(q, k, v, out, lse, s, scale);
  } else if (s.d == D) {
    forward_lanes_impl<T, D>(q, k, v, out, lse, s, scale);
  } else {
    forward_dispatch<T, D + 1>(q, k, v, out, lse, s, scale);
  }
}

template <typename T>
void backward_impl(const T* q, const T* k, const T* v, const T* out, const T* lse, const T* grad_out, T* grad_q,
                   T* grad_k, T* grad_v, Shape s, T scale) {
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t lo, int64_t hi) {
    Scratch<T> buf(s.d, s.lk, true);
    std::vector<T> key_grad(s.d * s.lk), value_grad(s.d * s.lk);
    T* __restrict__ probs = buf.scores.data();
    T* __restrict__ score_grad = buf.extra.data();
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads;
      gather_transposed(k, buf.keys.data(), b, h, s.lk, s.heads, s.d, scale);
      gather_transposed(v, buf.values.data(), b, h, s.lk, s.heads, s.d, T(1));
      std::fill(key_grad.begin(), key_grad.end(), T(0));
      std::fill(value_grad.begin(), value_grad.end(), T(0));
      for (int64_t i = 0; i < s.lq; ++i) {
        const int64_t row = ((b * s.lq + i) * s.heads + h) * s.d;
        const T* query = q + row;
        const T* dout = grad_out + row;
        row_scores(query, buf.keys.data(), probs, s.lk, s.d);
        const T row_lse = lse[task * s.lq + i];
#pragma omp simd
        for (int64_t j = 0; j < s.lk; ++j) probs[j] = exp_nonpositive(probs[j] - row_lse);
        // dP_j = dout . v_j; delta = dout . out (= sum_j P_j dP_j); dS_j = P_j (dP_j - delta)
        row_scores(dout, buf.values.data(), score_grad, s.lk, s.d);
        T delta = 0;
        for (int64_t c = 0; c < s.d; ++c) delta += dout[c] * out[row + c];
#pragma omp simd
        for (int64_t j = 0; j < s.lk; ++j) score_grad[j] = probs[j] * (score_grad[j] - delta);
        for (int64_t c = 0; c < s.d; ++c) {
          const T* __restrict__ key = buf.keys.data() + c * s.lk;   // already times scale
          T* __restrict__ kg = key_grad.data() + c * s.lk;
          T* __restrict__ vg = value_grad.data() + c * s.lk;
          const T qc = query[c], dc = dout[c];
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < s.lk; ++j) {
            acc += score_grad[j] * key[j];
            kg[j] += score_grad[j] * qc;
            vg[j] += probs[j] * dc;
          }
          grad_q[row + c] = acc;
        }
      }
      const int64_t base = b * s.lk * s.heads * s.d + h * s.d;
      for (int64_t j = 0; j < s.lk; ++j) {
        for (int64_t c = 0; c < s.d; ++c) {
          grad_k[base + j * s.heads * s.d + c] = key_grad[c * s.lk + j] * scale;
          grad_v[base + j * s.heads * s.d + c] = value_grad[c * s.lk + j];
        }
      }
    }
  });
}

// The backward for a compile-time head dim D <= 8, in two passes that each recompute P = exp(S - lse):
// keys in lanes for dK = dS^T (scale Q) and dV = P^T dO, then query rows in lanes for dQ = scale dS K, with
// dS = P (dO V^T - delta), delta_i = dO_i . O_i. Every sum runs along the loop, so no lane reduction is needed.
template <typename T, int D>
void backward_lanes_impl(const T* q, const T* k, const T* v, const T* out, const T* lse, const T* grad_out,
                         T* grad_q, T* grad_k, T* grad_v, Shape s, T scale) {
  constexpr int LANES = 16;
  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> delta(s.lq);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / s.heads, h = task % s.heads, stride = s.heads * D;
      const int64_t q_base = b * s.lq * stride + h * D, k_base = b * s.lk * stride + h * D;
      const T* row_lse = lse + task * s.lq;
      for (int64_t i = 0; i < s.lq; ++i) {
        T dot = 0;
        for (int c = 0; c < D; ++c) dot += grad_out[q_base + i * stride + c] * out[q_base + i * stride + c];
        delta[i] = dot;
      }
      for (int64_t j0 = 0; j0 < s.lk; j0 += LANES) {  // keys in lanes: dK, dV
        T key[D][LANES], value[D][LANES], dk[D][LANES], dv[D][LANES];
        for (int r = 0; r < LANES; ++r) {
          const int64_t j = std::min<int64_t>(j0 + r, s.lk - 1);
          for (int c = 0; c < D; ++c) {
            key[c][r] = k[k_base + j * stride + c];
            value[c][r] = v[k_base + j * stride + c];
            dk[c][r] = dv[c][r] = 0;
          }
        }
        for (int64_t i = 0; i < s.lq; ++i) {
          T query[D], dout[D];
          for (int c = 0; c < D; ++c) {
            query[c] = q[q_base + i * stride + c] * scale;
            dout[c] = grad_out[q_base + i * stride + c];
          }
          const T li = row_lse[i], di = delta[i];
#pragma omp simd
          for (int r = 0; r < LANES; ++r) {
            T score = query[0] * key[0][r], dp = dout[0] * value[0][r];
            for (int c = 1; c < D; ++c) {
              score += query[c] * key[c][r];
              dp += dout[c] * value[c][r];
            }
            const T p = exp_nonpositive(score - li);
            const T ds = p * (dp - di);
            for (int c = 0; c < D; ++c) {
              dk[c][r] += ds * query[c];
              dv[c][r] += p * dout[c];
            }
          }
        }
        for (int r = 0; r < LANES && j0 + r < s.lk; ++r) {
          for (int c = 0; c < D; ++c) {
            grad_k[k_base + (j0 + r) * stride + c] = dk[c][r];
            grad_v[k_base + (j0 + r) * stride + c] = dv[c][r];
          }
        }
      }
      for (int64_t i0 = 0; i0 < s.lq; i0 += LANES) {  // query rows in lanes: dQ
        T query[D][LANES], dout[D][LANES], dq[D][LANES], li[LANES], di[LANES];
        for (int r = 0; r < LANES; ++r) {
          const int64_t i = std::min<int64_t>(i0 + r, s.lq - 1);
          for (int c = 0; c < D; ++c) {
            query[c][r] = q[q_base + i * stride + c] * scale;
            dout[c][r] = grad_out[q_base + i * stride + c];
            dq[c][r] = 0;
          }
          li[r] = row_lse[i];
          di[r] = delta[i];
        }
        for (int64_t j = 0; j < s.lk; ++j) {
          const T* key = k + k_base + j * stride;
          const T* value = v + k_base + j * stride;
#pragma omp simd
          for (int r = 0; r < LANES; ++r) {
            T score = query[0][r] * key[0], dp = dout[0][r] * value[0];
            for (int c = 1; c < D; ++c) {
              score += query[c][r] * key[c];
              dp += dout[c][r] * value[c];
            }
            const T ds = exp_nonpositive(score - li[r]) * (dp - di[r]);
            for (int c = 0; c < D; ++c) dq[c][r] += ds * key[c];
          }
        }
        for (int r = 0; r < LANES && i0 + r < s.lq; ++r) {
          for (int c = 0; c < D; ++c) grad_q[q_base + (i0 + r) * stride + c] = dq[c][r] * scale;
        }
      }
    }
  });
}

// backward_lanes_impl<T, D> for D = d when d <= 8, else the generic backward.
template <typename T, int D = 1>
void backward_dispatch(const T* q, const T* k, const T* v, const T* out, const T* lse, const T* grad_out, T* grad_q,
                       T* grad_k, T* grad_v, Shape s, T scale) {
  if constexpr (D > 8) {
    backward_impl(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, s, scale);
  } else if (s.d == D) {
    backward_lanes_impl<T, D>(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, s, scale);
  } else {
    backward_dispatch<T, D + 1>(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, s, scale);
  }
}

Shape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastgrpo attention: q, k, v must be (B, L, H, D) tensors");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "fastgrpo attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "fastgrpo attention: q, k, v must all be float32 or all float64");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) && k.sizes() == v.sizes(),
              "fastgrpo attention: shapes do not match (q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), ")");
  TORCH_CHECK(k.size(1) > 0, "fastgrpo attention: no keys");
  return Shape{q.size(0), q.size(2), q.size(1), k.size(1), q.size(3)};
}

}  // namespace

std::vector<at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                          double scale) {
  const Shape s = check_inputs(q_in, k_in, v_in);
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({s.batch, s.heads, s.lq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastgrpo_attention_forward", [&] {
    forward_dispatch<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), s, static_cast<scalar_t>(scale));
  });
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                           const at::Tensor& out_in, const at::Tensor& lse_in,
                                           const at::Tensor& grad_out_in, double scale) {
  const Shape s = check_inputs(q_in, k_in, v_in);
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && grad_out_in.sizes() == q_in.sizes() &&
                  lse_in.dim() == 3 && lse_in.size(0) == s.batch && lse_in.size(1) == s.heads &&
                  lse_in.size(2) == s.lq,
              "fastgrpo attention backward: out, grad_out and lse do not match q");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto out = out_in.to(q.scalar_type()).contiguous(), lse = lse_in.to(q.scalar_type()).contiguous(),
             grad_out = grad_out_in.to(q.scalar_type()).contiguous();
  auto grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastgrpo_attention_backward", [&] {
    backward_dispatch<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                            grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), s,
                            static_cast<scalar_t>(scale));
  });
  return {grad_q, grad_k, grad_v};
}
