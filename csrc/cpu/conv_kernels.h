// Hot loops of the CPU factorised convolutions, written once and compiled twice by
// factorized_conv.cpp: for AVX2 + FMA and for the baseline ISA (chosen at run time). This header
// has no include guard on purpose; it is included inside a namespace per ISA.
//
// Layouts: every feature map is NHWC (channels innermost); a "tile" is a range of output rows of
// one image or a group of whole images (see TileTask in factorized_conv.cpp). The GEMMs of the
// chain are not here: they go to the BLAS torch was built with, one single-threaded call per tile.

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

// im2col of a tile for the Tucker core conv, over the tile's live taps [i0, i1) x [j0, j1) (the others
// read only padding for every pixel of the tile): col[p, ((i - i0) * (j1 - j0) + j - j0) * R_in + r] =
// in[pixel under tap (i, j) of output pixel p, r], zero outside the image. Layouts as depthwise_tile.
template <typename T>
void im2col_tile(const T* in, T* col, const ConvShape& s, const TileTask& t) {
  const int64_t R = s.R_in, rows_in = t.hi1 - t.hi0;
  const TapRange& taps = t.taps;
  T* dst = col;
  for (int64_t img = 0; img < t.g; ++img) {
    for (int64_t ho = t.ho0; ho < t.ho1; ++ho) {
      for (int64_t wo = 0; wo < s.Wo; ++wo) {
        for (int64_t i = taps.i0; i < taps.i1; ++i) {
          const int64_t hi = ho * s.sh - s.ph + i * s.dh;
          const bool row_ok = hi >= t.hi0 && hi < t.hi1;
          for (int64_t j = taps.j0; j < taps.j1; ++j, dst += R) {
            const int64_t wi = wo * s.sw - s.pw + j * s.dw;
            if (row_ok && wi >= 0 && wi < s.W) {
              std::copy_n(in + ((img * rows_in + (hi - t.hi0)) * s.W + wi) * R, R, dst);
            } else {
              std::fill(dst, dst + R, T(0));
            }
          }
        }
      }
    }
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
void im2col_tile_f32(const float* in, float* col, const ConvShape& s, const TileTask& t) { im2col_tile(in, col, s, t); }
void im2col_tile_f64(const double* in, double* col, const ConvShape& s, const TileTask& t) {
  im2col_tile(in, col, s, t);
}
