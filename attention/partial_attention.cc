#include "attention/partial_attention.h"

#include <Eigen/Dense>
#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LC_ATTENTION_AVX2_EXP 1
#endif

#include "core/philox.h"
#include "core/status.h"

namespace lc {

template <typename T>
using RowMatrix =
    Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct AttentionScratch {
  // Tile buffers, reused across tiles: [Tq, Tk] scores or probabilities,
  // [Tq, head_dim] partial outputs, the soft-cap slope.
  RowMatrix<float> f[4];
  RowMatrix<double> d[4];
  // Per query row of a tile: the row maximum and the row sum.
  std::vector<float> f_rows[2];
  std::vector<double> d_rows[2];
};

AttentionScratch* NewAttentionScratch() { return new AttentionScratch(); }
void DeleteAttentionScratch(AttentionScratch* scratch) { delete scratch; }

namespace {

template <typename T>
using ConstRows = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <typename T>
using Rows = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

// Scratch buffer i of dtype T, resized to [rows, cols].
template <typename T>
RowMatrix<T>& Buffer(AttentionScratch* s, int i, int64_t rows, int64_t cols) {
  RowMatrix<T>* buffers;
  if constexpr (std::is_same_v<T, float>) {
    buffers = s->f;
  } else {
    buffers = s->d;
  }
  buffers[i].resize(rows, cols);
  return buffers[i];
}

// Per-row buffer i of dtype T with at least `rows` elements.
template <typename T>
T* RowBuffer(AttentionScratch* s, int i, int64_t rows) {
  std::vector<T>* buffers;
  if constexpr (std::is_same_v<T, float>) {
    buffers = s->f_rows;
  } else {
    buffers = s->d_rows;
  }
  if (static_cast<int64_t>(buffers[i].size()) < rows) buffers[i].resize(rows);
  return buffers[i].data();
}

template <typename T>
ConstRows<T> Map(const RowSet<const T>& rows, int64_t d) {
  return ConstRows<T>(rows.data, rows.count, d,
                      Eigen::OuterStride<>(rows.row_stride));
}

#ifdef LC_ATTENTION_AVX2_EXP
// exp of 8 floats with AVX2 and FMA: Eigen's pexp_float (Cephes: clamp,
// 2^m * exp(r) with a degree-6 polynomial for exp(r)) with fused
// multiply-adds (what Eigen computes when built for AVX2), with results
// below the smallest normal float flushed to 0, as in ExpShifted. Within 1 ulp
// of Eigen's SSE2 result and of the correctly rounded exp.
__attribute__((target("avx2,fma"))) inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-88.723f);
  // min/max return their second operand for a NaN: NaN stays NaN.
  const __m256 xc =
      _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.723f), x));
  const __m256 m = _mm256_floor_ps(_mm256_fmadd_ps(
      xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fmadd_ps(m, _mm256_set1_ps(-0.693359375f), xc);
  r = _mm256_fmadd_ps(m, _mm256_set1_ps(2.12194440e-4f), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 r3 = _mm256_mul_ps(r2, r);
  __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500E-4f), r,
                             _mm256_set1_ps(1.3981999507E-3f));
  __m256 y1 = _mm256_fmadd_ps(_mm256_set1_ps(4.1665795894E-2f), r,
                              _mm256_set1_ps(1.6666665459E-1f));
  const __m256 y2 = _mm256_add_ps(r, _mm256_set1_ps(1.0f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
  y1 = _mm256_fmadd_ps(y1, r, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, r3, y1);
  y = _mm256_fmadd_ps(y, r2, y2);
  // 2^m = 2^e1 * 2^e2 with e1 = m >> 1, e2 = m - e1, both in [-64, 64].
  const __m256i mi = _mm256_cvtps_epi32(m);
  const __m256i e1 = _mm256_srai_epi32(mi, 1);
  const __m256i e2 = _mm256_sub_epi32(mi, e1);
  const __m256i bias = _mm256_set1_epi32(127);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(
                           _mm256_slli_epi32(_mm256_add_epi32(e1, bias), 23)));
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(
                           _mm256_slli_epi32(_mm256_add_epi32(e2, bias), 23)));
  // Flush to 0 below the smallest normal float (a NaN y fails the compare),
  // then max with x: +inf and NaN come back as themselves.
  y = _mm256_and_ps(y, _mm256_cmp_ps(y, _mm256_set1_ps(FLT_MIN), _CMP_GE_OQ));
  return _mm256_max_ps(y, x);
}

__attribute__((target("avx2,fma"))) float ExpShiftedAvx2(float* x, int64_t n,
                                                         float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {  // the last n - i < 8 elements, under a lane mask
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i keep =
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)), lane);
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_maskload_ps(x + i, keep), sh));
    _mm256_maskstore_ps(x + i, keep, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(keep)));
  }
  __m128 s4 =
      _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}
#endif

// x[i] = exp(x[i] - shift) for i < n; returns the sum of the new x[i].
// Results below the smallest normal number are flushed to 0: a masked pair's
// exp(-inf) is exactly 0 (Eigen's exp of -inf is a denormal, the exp of its
// clamp), and no denormal reaches the products that follow.
template <typename T>
T ExpShifted(T* x, int64_t n, T shift) {
#ifdef LC_ATTENTION_AVX2_EXP
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) return ExpShiftedAvx2(x, n, shift);
  }
#endif
  Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> a(x, n);
  a = (a - shift).exp();
  const T smallest_normal = std::numeric_limits<T>::min();
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = x[i] < smallest_normal ? T(0) : x[i];
    sum += x[i];
  }
  return sum;
}

// Whether some pair of the tile falls outside mask's window: the first
// query's window must reach the last key, the last query's the first key.
template <typename T>
bool WindowCuts(const RowSet<const T>& q, const RowSet<const T>& k,
                const TileMask& mask) {
  const int64_t first_q = q.PositionOf(0), last_q = q.PositionOf(q.count - 1);
  return (mask.window_left >= 0 &&
          k.PositionOf(0) < last_q - mask.window_left) ||
         (mask.window_right >= 0 &&
          k.PositionOf(k.count - 1) > first_q + mask.window_right);
}

// s = scale * q k^T (soft-capped when mask.softcap > 0) with disallowed
// pairs set to -inf. Returns false when no pair of the tile is allowed.
template <typename T>
bool Scores(const RowSet<const T>& q, const RowSet<const T>& k, int64_t d,
            T scale, const TileMask& mask, RowMatrix<T>& s) {
  // Eigen applies the scalar factor inside the product (as its alpha), so
  // the scaling costs no pass over s.
  s.noalias() = (scale * Map(q, d)) * Map(k, d).transpose();
  if (mask.softcap > 0) {
    const T cap = static_cast<T>(mask.softcap);
    s.array() = cap * (s.array() / cap).tanh();
  }
  const int64_t last_key = k.PositionOf(k.count - 1);
  // Rows are in increasing position order: when the first query already
  // sees the last key, no row of the tile has a causal cut.
  const bool causal_cut = mask.causal && last_key > q.PositionOf(0);
  const bool window_cut = WindowCuts(q, k, mask);
  if (!causal_cut && !window_cut && mask.block_mask == nullptr &&
      mask.key_padding == nullptr) {
    return true;  // every pair of the tile is allowed
  }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  bool any = false;
  for (int64_t i = 0; i < q.count; ++i) {
    const int64_t t = q.PositionOf(i);
    T* row = s.data() + i * k.count;
    // Keys are in increasing position order: the causal cut is a suffix.
    int64_t allowed_end = k.count;
    if (mask.causal && last_key > t) {
      allowed_end = t < k.position
                        ? 0
                        : std::min<int64_t>(
                              k.count, (t - k.position) / k.position_step + 1);
    }
    for (int64_t j = allowed_end; j < k.count; ++j) row[j] = neg_inf;
    if (mask.block_mask != nullptr) {
      // Keys in increasing position: one walk along the query block's
      // increasing on key blocks.
      const int64_t bs = mask.block_mask->block_size();
      const absl::Span<const int32_t> on = mask.block_mask->Row(t / bs);
      auto it = on.begin();
      for (int64_t j = 0; j < allowed_end; ++j) {
        const int64_t kb = k.PositionOf(j) / bs;
        while (it != on.end() && *it < kb) ++it;
        if (it == on.end() || *it != kb) row[j] = neg_inf;
      }
    }
    if (mask.key_padding != nullptr) {
      for (int64_t j = 0; j < allowed_end; ++j) {
        if (mask.key_padding[j * mask.key_padding_step] != 0) row[j] = neg_inf;
      }
    }
    if (window_cut) {
      for (int64_t j = 0; j < allowed_end; ++j) {
        const int64_t u = k.PositionOf(j);
        if ((mask.window_left >= 0 && u < t - mask.window_left) ||
            (mask.window_right >= 0 && u > t + mask.window_right)) {
          row[j] = neg_inf;
        }
      }
    }
    for (int64_t j = 0; j < allowed_end && !any; ++j) any = row[j] != neg_inf;
  }
  return any;
}

// Multiplies p by the dropout mask scaled by 1 / (1 - p): pairs dropped get 0.
template <typename T>
void ApplyDropout(const RowSet<const T>& q, const RowSet<const T>& k,
                  const TileMask& mask, RowMatrix<T>& p) {
  const T keep_scale = static_cast<T>(1.0 / (1.0 - mask.dropout));
  const uint64_t n = mask.sequence_length;
  for (int64_t i = 0; i < q.count; ++i) {
    const uint64_t t = q.PositionOf(i);
    T* row = p.data() + i * k.count;
    for (int64_t j = 0; j < k.count; ++j) {
      if (row[j] == 0) continue;
      const bool keep =
          AttentionDropoutUniform(mask.dropout_seed, mask.dropout_offset,
                                  mask.dropout_stream, n, t,
                                  k.PositionOf(j)) >= mask.dropout;
      row[j] = keep ? row[j] * keep_scale : T(0);
    }
  }
}

}  // namespace

void CheckAttentionDropoutDraws(const char* op, int64_t n, int64_t streams,
                                uint64_t offset) {
  const uint64_t limit = kAttentionDropoutLimit;
  LC_REQUIRE(static_cast<uint64_t>(n) <= limit, op, ": dropout over n = ", n,
             " tokens (expected n <= ", limit, ")");
  LC_REQUIRE(
      static_cast<uint64_t>(streams) <= limit, op, ": dropout over ", streams,
      " streams (batch x heads x patterns per head; expected <= ", limit, ")");
  LC_REQUIRE(offset < limit, op, ": dropout at generator offset ", offset,
             " (expected < ", limit, ")");
}

template <typename T>
void MergeAttentionRow(T* o1, T* lse1, const T* o2, T lse2, int64_t d) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (lse2 == neg_inf) return;
  if (*lse1 == neg_inf) {
    for (int64_t c = 0; c < d; ++c) o1[c] = o2[c];
    *lse1 = lse2;
    return;
  }
  // Equal sides weigh one half each; this also keeps two +inf sides (rows
  // with a +inf score, whose o is NaN) at lse +inf, where +inf - +inf would
  // make it NaN.
  const T diff = lse2 == *lse1 ? T(0) : lse2 - *lse1;
  // sigmoid(diff) and softplus(diff) without overflow for any sign.
  const T e = std::exp(-std::abs(diff));
  const T w = diff >= 0 ? T(1) / (T(1) + e) : e / (T(1) + e);
  for (int64_t c = 0; c < d; ++c) o1[c] += w * (o2[c] - o1[c]);
  *lse1 += std::max(diff, T(0)) + std::log1p(e);
}

template <typename T>
void PartialAttentionForward(const RowSet<const T>& q, const RowSet<const T>& k,
                             const RowSet<const T>& v, int64_t head_dim,
                             T scale, const TileMask& mask, T* out,
                             int64_t out_stride, T* lse, int64_t lse_stride,
                             AttentionScratch* scratch) {
  if (q.count == 0 || k.count == 0) return;
  RowMatrix<T>& s = Buffer<T>(scratch, 0, q.count, k.count);
  if (!Scores(q, k, head_dim, scale, mask, s)) return;
  T* row_max = RowBuffer<T>(scratch, 0, q.count);
  T* row_sum = RowBuffer<T>(scratch, 1, q.count);
  const T inf = std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < q.count; ++i) {
    auto row = s.row(i).array();
    // A NaN score makes the row NaN, as in the float64 oracle (Eigen's
    // default max may skip it).
    const T m = row.template maxCoeff<Eigen::PropagateNaN>();
    row_max[i] = m;
    if (m == -inf) {  // no allowed key in this row
      row.setZero();
      row_sum[i] = 0;
      continue;
    }
    // With m = +inf (a +inf in q or k), exp(s - m) is NaN for the +inf
    // scores and 0 for the others: the row's out is NaN, as in the oracle.
    row_sum[i] = ExpShifted(s.data() + i * k.count, k.count, m);
  }
  if (mask.dropout > 0) ApplyDropout(q, k, mask, s);
  RowMatrix<T>& o = Buffer<T>(scratch, 1, q.count, head_dim);
  o.noalias() = s * Map(v, head_dim);
  for (int64_t i = 0; i < q.count; ++i) {
    if (row_sum[i] == 0) continue;
    o.row(i) /= row_sum[i];
    // The log of a +inf row's NaN sum would make its lse NaN: the oracle's
    // logsumexp is +inf.
    const T m = row_max[i];
    MergeAttentionRow(out + i * out_stride, lse + i * lse_stride,
                      o.data() + i * head_dim,
                      m == inf ? m : m + std::log(row_sum[i]), head_dim);
  }
}

template <typename T>
void PartialAttentionBackward(
    const RowSet<const T>& q, const RowSet<const T>& k,
    const RowSet<const T>& v, int64_t head_dim, T scale, const TileMask& mask,
    const T* grad_out, int64_t grad_out_stride, const T* lse, const T* delta,
    const T* dlse, int64_t row_stat_stride, T* dq, int64_t dq_stride, T* dk,
    T* dv, int64_t dkv_stride, AttentionScratch* scratch) {
  if (q.count == 0 || k.count == 0) return;
  const int64_t d = head_dim;
  RowMatrix<T>& p = Buffer<T>(scratch, 0, q.count, k.count);
  if (!Scores(q, k, d, scale, mask, p)) return;
  // The soft-cap's derivative 1 - (s / cap)^2 at the capped scores s (0 for
  // disallowed pairs, whose p is 0 too).
  RowMatrix<T>* cap_slope = nullptr;
  if (mask.softcap > 0) {
    cap_slope = &Buffer<T>(scratch, 3, q.count, k.count);
    const T cap = static_cast<T>(mask.softcap);
    cap_slope->array() = (p.array() == -std::numeric_limits<T>::infinity())
                             .select(T(0), T(1) - (p.array() / cap).square());
  }
  for (int64_t i = 0; i < q.count; ++i) {
    const T l = lse[i * row_stat_stride];
    auto row = p.row(i).array();
    // Only -inf marks a row with no allowed key; a +inf lse (a +inf score)
    // gives NaN probabilities, and so NaN gradients, as in the oracle.
    if (l == -std::numeric_limits<T>::infinity()) {
      row.setZero();
    } else {
      ExpShifted(p.data() + i * k.count, k.count, l);
    }
  }
  ConstRows<T> g(grad_out, q.count, d, Eigen::OuterStride<>(grad_out_stride));
  Rows<T> dv_rows(dv, k.count, d, Eigen::OuterStride<>(dkv_stride));
  Rows<T> dk_rows(dk, k.count, d, Eigen::OuterStride<>(dkv_stride));
  Rows<T> dq_rows(dq, q.count, d, Eigen::OuterStride<>(dq_stride));
  // dp = do v^T (times the dropout mask, which also scales p for dv).
  RowMatrix<T>& dp = Buffer<T>(scratch, 1, q.count, k.count);
  dp.noalias() = g * Map(v, d).transpose();
  if (mask.dropout > 0) {
    RowMatrix<T>& p_dropped = Buffer<T>(scratch, 2, q.count, k.count);
    p_dropped = p;
    ApplyDropout(q, k, mask, p_dropped);
    dv_rows.noalias() += p_dropped.transpose() * g;
    // The mask times 1/(1-p) is p_dropped / p where p > 0.
    for (int64_t i = 0; i < p.size(); ++i) {
      dp.data()[i] = p.data()[i] > 0
                         ? dp.data()[i] * (p_dropped.data()[i] / p.data()[i])
                         : T(0);
    }
  } else {
    dv_rows.noalias() += p.transpose() * g;
  }
  // scale * ds = scale * p * (dp - delta + dlse), reusing dp's buffer.
  for (int64_t i = 0; i < q.count; ++i) {
    T shift = -delta[i * row_stat_stride];
    if (dlse != nullptr) shift += dlse[i * row_stat_stride];
    dp.row(i).array() = p.row(i).array() * (dp.row(i).array() + shift) * scale;
  }
  if (cap_slope != nullptr) dp.array() *= cap_slope->array();
  dq_rows.noalias() += dp * Map(k, d);
  dk_rows.noalias() += dp.transpose() * Map(q, d);
}

#define LC_INSTANTIATE_PARTIAL_ATTENTION(T)                                   \
  template void MergeAttentionRow<T>(T*, T*, const T*, T, int64_t);           \
  template void PartialAttentionForward<T>(                                   \
      const RowSet<const T>&, const RowSet<const T>&, const RowSet<const T>&, \
      int64_t, T, const TileMask&, T*, int64_t, T*, int64_t,                  \
      AttentionScratch*);                                                     \
  template void PartialAttentionBackward<T>(                                  \
      const RowSet<const T>&, const RowSet<const T>&, const RowSet<const T>&, \
      int64_t, T, const TileMask&, const T*, int64_t, const T*, const T*,     \
      const T*, int64_t, T*, int64_t, T*, T*, int64_t, AttentionScratch*);

LC_INSTANTIATE_PARTIAL_ATTENTION(float)
LC_INSTANTIATE_PARTIAL_ATTENTION(double)

}  // namespace lc
