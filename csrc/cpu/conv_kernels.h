// Hot loops of the CPU factorised convolutions, written once and compiled twice by
// factorized_conv.cpp: for AVX2 + FMA and for the baseline ISA (chosen at run time). This header
// has no include guard on purpose; it is included inside a namespace per ISA.
//
// Layouts: every feature map is NHWC (channels innermost); a "tile" is a range of output rows of
// one image or a group of whole images (see TileTask in factorized_conv.cpp).
//
// The products with the factor matrices (both 1x1 stages, and the Tucker core conv as an indirect
// GEMM over its live taps) run on a register-blocked micro-kernel: kMR rows (pixels) times NR = two
// vectors of columns, accumulated over K in registers, on weights packed once per call into panels
// [P][taps][K][NR] (columns padded to NR with zeros). Each row's operand is reached through a
// pointer per tap, so the core conv needs no im2col copy and skips the taps that read only padding.

// C[rows, col0 : col0 + nr) = bias + sum over the block's taps t and k of a[t][row][k * ks] * B_t[k][:]
// for up to kMR rows, then max(., 0) where `relu`. `a` holds nt * kMR row pointers (rows >= mr repeat
// row 0; their results are dropped), `b` the column panel, `b_off[t]` the offset of tap t's [K][NR]
// block in it. kStrided: the k-th element of a row is at a[k * ks] (an NCHW input: a row is a pixel,
// its channels HW apart) and column j of a result row at c[j * cs] (an NCHW output); otherwise both
// are contiguous.
template <bool kStridedA, bool kStridedC, typename T>
inline __attribute__((always_inline)) void micro_kernel(int64_t mr, int64_t nt, const T* const* a,
                                                        const int64_t* b_off, int64_t K, const T* b, const T* bias,
                                                        T* const* c, int64_t col0, int64_t nr, int64_t ks,
                                                        int64_t cs, bool relu) {
  static_assert(kMR == 6, "the loop below is written out for six rows");
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T), NR = 2 * L;
  V acc[kMR][2];
  V bias0{}, bias1{};
  if (bias != nullptr) {
    __builtin_memcpy(&bias0, bias, 32);
    __builtin_memcpy(&bias1, bias + L, 32);
  }
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    acc[i][0] = bias0;
    acc[i][1] = bias1;
  }
  const int64_t step = kStridedA ? ks : 1;
  for (int64_t t = 0; t < nt; ++t) {
    const T* const* ap = a + t * kMR;
    const T *a0 = ap[0], *a1 = ap[1], *a2 = ap[2], *a3 = ap[3], *a4 = ap[4], *a5 = ap[5];
    const T* bt = b + b_off[t];
#pragma GCC unroll 4
    for (int64_t k = 0, ak = 0; k < K; ++k, bt += NR, ak += step) {
      V b0, b1;
      __builtin_memcpy(&b0, bt, 32);
      __builtin_memcpy(&b1, bt + L, 32);
      T x;
      x = a0[ak]; acc[0][0] += x * b0; acc[0][1] += x * b1;
      x = a1[ak]; acc[1][0] += x * b0; acc[1][1] += x * b1;
      x = a2[ak]; acc[2][0] += x * b0; acc[2][1] += x * b1;
      x = a3[ak]; acc[3][0] += x * b0; acc[3][1] += x * b1;
      x = a4[ak]; acc[4][0] += x * b0; acc[4][1] += x * b1;
      x = a5[ak]; acc[5][0] += x * b0; acc[5][1] += x * b1;
    }
  }
  if (relu) {
    const V zero{};
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      acc[i][0] = acc[i][0] < zero ? zero : acc[i][0];  // (NaN stays NaN, as in torch.relu)
      acc[i][1] = acc[i][1] < zero ? zero : acc[i][1];
    }
  }
  for (int64_t i = 0; i < mr; ++i) {
    if (kStridedC) {
      T* dst = c[i] + col0 * cs;
      T tmp[NR];
      __builtin_memcpy(tmp, &acc[i][0], 32);
      __builtin_memcpy(tmp + L, &acc[i][1], 32);
      for (int64_t j = 0; j < nr; ++j) dst[j * cs] = tmp[j];
    } else {
      T* dst = c[i] + col0;
      if (nr == NR) {
        __builtin_memcpy(dst, &acc[i][0], 32);
        __builtin_memcpy(dst + L, &acc[i][1], 32);
      } else {
        T tmp[NR];
        __builtin_memcpy(tmp, &acc[i][0], 32);
        __builtin_memcpy(tmp + L, &acc[i][1], 32);
        std::copy_n(tmp, nr, dst);
      }
    }
  }
}

template <bool kStridedA, bool kStridedC, typename T>
void gemm_rows_impl(const RowMap<const T>& A, int64_t m, const PackedB<T>& B, const RowMap<T>& C, bool relu) {
  constexpr int64_t NR = 64 / sizeof(T);
  const int64_t zero = 0;
  const T* a[kMR];
  T* c[kMR];
  // Panels outermost: a panel ([K][NR], a few KiB) stays in L1 while every row block passes.
  for (int64_t p = 0; p * NR < B.N; ++p) {
    const T* panel = B.data + p * B.K * NR;
    const T* bias = B.bias != nullptr ? B.bias + p * NR : nullptr;
    const int64_t nr = std::min(NR, B.N - p * NR);
    int64_t img0 = 0, q0 = 0;  // row r0 = img0 * P + q0, advanced without divisions
    for (int64_t r0 = 0; r0 < m; r0 += kMR) {
      const int64_t mr = std::min(kMR, m - r0);
      int64_t img = img0, q = q0;
      for (int64_t i = 0; i < kMR; ++i) {
        if (i < mr) {
          a[i] = A.base + img * A.image + q * A.pixel;
          c[i] = C.base + img * C.image + q * C.pixel;
          if (++q == A.P) q = 0, ++img;
          if (i == kMR - 1 || i == mr - 1) img0 = img, q0 = q;
        } else {
          a[i] = a[0];
          c[i] = c[0];
        }
      }
      micro_kernel<kStridedA, kStridedC>(mr, 1, a, &zero, B.K, panel, bias, c, p * NR, nr, A.element, C.element,
                                         relu);
    }
  }
}

// C = A * B (+ bias, then max(., 0) where `relu`), B packed as one tap, rows of A and C as mapped.
template <typename T>
void gemm_rows(const RowMap<const T>& A, int64_t m, const PackedB<T>& B, const RowMap<T>& C, bool relu) {
  // (The op only pairs an NCHW input with NHWC scratch and NHWC scratch with an NCHW output.)
  if (A.element != 1 && C.element != 1) return gemm_rows_impl<true, true>(A, m, B, C, relu);
  if (A.element != 1) return gemm_rows_impl<true, false>(A, m, B, C, relu);
  if (C.element != 1) return gemm_rows_impl<false, true>(A, m, B, C, relu);
  gemm_rows_impl<false, false>(A, m, B, C, relu);
}

// The blocks of an Indirection (see factorized_conv.cpp) times B, B packed over its taps.
template <typename T>
void gemm_indirect(const Indirection<T>& ind, const PackedB<T>& B) {
  constexpr int64_t NR = 64 / sizeof(T);
  const int64_t nblocks = static_cast<int64_t>(ind.mr.size()), stride = ind.max_taps;
  for (int64_t p = 0; p * NR < B.N; ++p) {
    const T* panel = B.data + p * B.taps * B.K * NR;
    const T* bias = B.bias != nullptr ? B.bias + p * NR : nullptr;
    const int64_t nr = std::min(NR, B.N - p * NR);
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      micro_kernel<false, false>(ind.mr[blk], ind.nt[blk], ind.a.data() + blk * stride * kMR,
                                 ind.b_off.data() + blk * stride, B.K, panel, bias, ind.c.data() + blk * kMR, p * NR,
                                 nr, 1, 1, false);
    }
  }
}

// out[0:R) = sum over the n taps t of in[t][0:R) * w[t][0:R): one output pixel of a depthwise conv,
// accumulated in registers, four vectors of channels at a time.
template <typename T>
inline __attribute__((always_inline)) void depthwise_pixel(const T* const* in, const T* const* w, int n, int64_t R,
                                                           T* __restrict__ out) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);
  int64_t r = 0;
  for (; r + 4 * L <= R; r += 4 * L) {
    V acc[4] = {V{}, V{}, V{}, V{}};
    for (int t = 0; t < n; ++t) {
      for (int v = 0; v < 4; ++v) {
        V a, b;
        __builtin_memcpy(&a, in[t] + r + v * L, 32);
        __builtin_memcpy(&b, w[t] + r + v * L, 32);
        acc[v] += a * b;
      }
    }
    __builtin_memcpy(out + r, acc, sizeof(acc));
  }
  for (; r + L <= R; r += L) {
    V acc = V{};
    for (int t = 0; t < n; ++t) {
      V a, b;
      __builtin_memcpy(&a, in[t] + r, 32);
      __builtin_memcpy(&b, w[t] + r, 32);
      acc += a * b;
    }
    __builtin_memcpy(out + r, &acc, 32);
  }
  for (; r < R; ++r) {
    T acc = T(0);
    for (int t = 0; t < n; ++t) acc += in[t][r] * w[t][r];
    out[r] = acc;
  }
}

// Depthwise conv of a tile. `in` holds input rows [t.hi0, t.hi1) of t.g images ([g, hi1 - hi0, W, R]);
// `out` receives output rows [t.ho0, t.ho1) of the same images ([g, ho1 - ho0, Wo, R]); wt is
// [kh, kw, R]. Pixels outside the image read zeros (their taps are skipped).
template <typename T>
void depthwise_tile(const T* in, const T* wt, T* out, const ConvShape& s, const TileTask& t) {
  const int64_t R = s.R_in, rows_in = t.hi1 - t.hi0, rows_out = t.ho1 - t.ho0;
  std::vector<const T*> taps_in(s.kh * s.kw), taps_w(s.kh * s.kw);
  for (int64_t img = 0; img < t.g; ++img) {
    for (int64_t ho = t.ho0; ho < t.ho1; ++ho) {
      T* orow = out + ((img * rows_out) + (ho - t.ho0)) * s.Wo * R;
      for (int64_t wo = 0; wo < s.Wo; ++wo) {
        int n = 0;
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t hi = ho * s.sh - s.ph + i * s.dh;
          if (hi < t.hi0 || hi >= t.hi1) continue;
          const T* irow = in + (img * rows_in + (hi - t.hi0)) * s.W * R;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t wi = wo * s.sw - s.pw + j * s.dw;
            if (wi < 0 || wi >= s.W) continue;
            taps_in[n] = irow + wi * R;
            taps_w[n++] = wt + (i * s.kw + j) * R;
          }
        }
        depthwise_pixel(taps_in.data(), taps_w.data(), n, R, orow + wo * R);
      }
    }
  }
}

// The 3 x 3 case, the common one: channel vectors outermost, so that the nine weight vectors of a
// vector of channels stay in registers while every output pixel of the tile is computed (nine loads
// and nine multiply-adds per pixel and vector, instead of eighteen loads).
template <typename T>
void depthwise_tile_3x3(const T* in, const T* wt, T* out, const ConvShape& s, const TileTask& t) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);
  const int64_t R = s.R_in, rows_in = t.hi1 - t.hi0, rows_out = t.ho1 - t.ho0;
  auto pixel = [&](auto load, auto store, int64_t r0, const auto* w) {
    for (int64_t img = 0; img < t.g; ++img) {
      for (int64_t ho = t.ho0; ho < t.ho1; ++ho) {
        const T* rows[3];
        bool row_ok[3];
        for (int i = 0; i < 3; ++i) {
          const int64_t hi = ho * s.sh - s.ph + i * s.dh;
          row_ok[i] = hi >= t.hi0 && hi < t.hi1;
          rows[i] = row_ok[i] ? in + (img * rows_in + (hi - t.hi0)) * s.W * R + r0 : nullptr;
        }
        T* orow = out + (img * rows_out + (ho - t.ho0)) * s.Wo * R + r0;
        for (int64_t wo = 0; wo < s.Wo; ++wo) {
          std::decay_t<decltype(w[0])> acc{};
          for (int j = 0; j < 3; ++j) {
            const int64_t wi = wo * s.sw - s.pw + j * s.dw;
            if (wi < 0 || wi >= s.W) continue;
            for (int i = 0; i < 3; ++i) {
              if (row_ok[i]) acc += load(rows[i] + wi * R) * w[i * 3 + j];
            }
          }
          store(orow + wo * R, acc);
        }
      }
    }
  };
  int64_t r0 = 0;
  for (; r0 + L <= R; r0 += L) {
    V w[9];
    for (int k = 0; k < 9; ++k) __builtin_memcpy(&w[k], wt + k * R + r0, 32);
    pixel([](const T* p) { V v; __builtin_memcpy(&v, p, 32); return v; },
          [](T* p, V v) { __builtin_memcpy(p, &v, 32); }, r0, w);
  }
  for (; r0 < R; ++r0) {
    T w[9];
    for (int k = 0; k < 9; ++k) w[k] = wt[k * R + r0];
    pixel([](const T* p) { return *p; }, [](T* p, T v) { *p = v; }, r0, w);
  }
}

// Non-template entry points, so that every template above is instantiated here, under this ISA's
// target options (an instantiation triggered outside the target region would get the baseline ISA).
void depthwise_tile_f32(const float* in, const float* wt, float* out, const ConvShape& s, const TileTask& t) {
  if (s.kh == 3 && s.kw == 3) return depthwise_tile_3x3(in, wt, out, s, t);
  depthwise_tile(in, wt, out, s, t);
}
void depthwise_tile_f64(const double* in, const double* wt, double* out, const ConvShape& s, const TileTask& t) {
  if (s.kh == 3 && s.kw == 3) return depthwise_tile_3x3(in, wt, out, s, t);
  depthwise_tile(in, wt, out, s, t);
}
void gemm_rows_f32(const RowMap<const float>& A, int64_t m, const PackedB<float>& B, const RowMap<float>& C,
                   bool relu) {
  gemm_rows(A, m, B, C, relu);
}
void gemm_rows_f64(const RowMap<const double>& A, int64_t m, const PackedB<double>& B, const RowMap<double>& C,
                   bool relu) {
  gemm_rows(A, m, B, C, relu);
}
void gemm_indirect_f32(const Indirection<float>& ind, const PackedB<float>& B) { gemm_indirect(ind, B); }
void gemm_indirect_f64(const Indirection<double>& ind, const PackedB<double>& B) { gemm_indirect(ind, B); }
