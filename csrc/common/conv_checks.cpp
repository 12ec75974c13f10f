// Argument checks and output-shape arithmetic shared by the CPU and CUDA factorised-conv kernels.
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "ops.h"

namespace tdconv {

ConvShape check_factorized_conv2d(const char* op, bool tucker, const at::Tensor& x, const at::Tensor& first,
                                  const at::Tensor& spatial, const at::Tensor& last,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const std::string name = std::string("tdconv::") + op + ": ";
  const auto dt = x.scalar_type();
  TDCONV_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
                    "x must be float32, float64, float16 or bfloat16, got ", dt);
  TDCONV_CHECK(x.dim() == 4, name, "x must be 4-D [N, C_in, H, W], got shape ", x.sizes());
  TDCONV_CHECK(first.dim() == 2, name, "first must be [R_in, C_in], got shape ", first.sizes());
  if (tucker) {
    TDCONV_CHECK(spatial.dim() == 4, name, "core must be [R_out, R_in, kh, kw], got shape ", spatial.sizes());
  } else {
    TDCONV_CHECK(spatial.dim() == 3, name, "spatial must be [R, kh, kw], got shape ", spatial.sizes());
  }
  TDCONV_CHECK(last.dim() == 2, name, "last must be [C_out, R_out], got shape ", last.sizes());
  ConvShape s{};
  s.N = x.size(0);
  s.C_in = x.size(1);
  s.H = x.size(2);
  s.W = x.size(3);
  s.R_in = first.size(0);
  s.R_out = last.size(1);
  s.C_out = last.size(0);
  s.kh = spatial.size(-2);
  s.kw = spatial.size(-1);
  TDCONV_CHECK(first.size(1) == s.C_in, name, "x has ", s.C_in, " channels but first expects ", first.size(1));
  if (tucker) {
    TDCONV_CHECK(spatial.size(0) == s.R_out && spatial.size(1) == s.R_in, name, "rank mismatch: first has ",
                 s.R_in, " rows, last ", s.R_out, " columns, but the core is ", spatial.sizes());
  } else {
    TDCONV_CHECK(spatial.size(0) == s.R_in && s.R_out == s.R_in, name, "rank mismatch: first has ", s.R_in,
                 " rows, spatial ", spatial.size(0), ", last ", s.R_out, " columns");
  }
  TDCONV_CHECK(s.R_in >= 1 && s.R_out >= 1 && s.C_out >= 1 && s.kh >= 1 && s.kw >= 1, name,
               "ranks, output channels and kernel sizes must be >= 1");
  for (const auto* t : {&first, &spatial, &last}) {
    TDCONV_CHECK_TYPE(t->scalar_type() == dt, name, "factors must have x's dtype ", dt, ", got ", t->scalar_type());
    TDCONV_CHECK_SAME_DEVICE(x, (*t), "x", "a factor");
  }
  if (bias.has_value() && bias->defined()) {
    TDCONV_CHECK(bias->dim() == 1 && bias->size(0) == s.C_out, name, "bias must be [", s.C_out, "], got shape ",
                 bias->sizes());
    TDCONV_CHECK_TYPE(bias->scalar_type() == dt, name, "bias must have x's dtype ", dt);
    TDCONV_CHECK_SAME_DEVICE(x, (*bias), "x", "bias");
  }
  TDCONV_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, name,
               "stride, padding and dilation must have 2 entries each");
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  TDCONV_CHECK(s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 && s.ph >= 0 && s.pw >= 0, name,
               "stride and dilation must be >= 1 and padding >= 0, got stride ", stride, ", padding ", padding,
               ", dilation ", dilation);
  TDCONV_CHECK(s.H + 2 * s.ph >= s.dh * (s.kh - 1) + 1 && s.W + 2 * s.pw >= s.dw * (s.kw - 1) + 1, name,
               "the padded input ", s.H + 2 * s.ph, "x", s.W + 2 * s.pw, " is smaller than the dilated kernel ",
               s.dh * (s.kh - 1) + 1, "x", s.dw * (s.kw - 1) + 1);
  s.Ho = (s.H + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.Wo = (s.W + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  return s;
}

}  // namespace tdconv
