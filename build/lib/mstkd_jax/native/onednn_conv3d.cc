// 3D convolutions for XLA:CPU through oneDNN, as XLA FFI handlers (see onednn.py).
//
// Layouts are JAX's channels-last ones, used by oneDNN as they are (no copies of activations):
//   x  (N, S1, S2, S3, C)    input                  oneDNN "ndhwc"
//   w  (K1, K2, K3, C, O)    kernel (Flax's DHWIO)  oneDNN "dhwio"
//   y  (N, T1, T2, T3, O)    output, T = (S + 2 p - K) / s + 1 (rounded down, as in PyTorch)
// with one stride s and one symmetric padding p for the three spatial axes. The kernel is
// reordered to whatever blocked layout oneDNN's kernel for this CPU prefers (it is small).
//
//   mstkd_conv3d_fwd           y  = conv(x, w)
//   mstkd_conv3d_bwd_data      dx = the gradient of y with respect to x, from dy and w
//   mstkd_conv3d_bwd_weights   dw = the gradient of y with respect to w, from x and dy
//
// float32 and bfloat16 (all operands of one call share a type). Each call runs on the calling
// thread's stream with its own scratch memory, so XLA may run several at once.

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  memory::data_type type;
};

// Shapes in oneDNN's logical order (N, C, D, H, W) and (O, I, D, H, W) from JAX's layouts.
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> y, ffi::DataType type, int64_t stride,
                        int64_t padding, Geometry* g) {
  if (x.size() != 5 || w.size() != 5 || y.size() != 5) {
    return ffi::Error::InvalidArgument("mstkd conv3d: operands must have rank 5");
  }
  if (type == ffi::DataType::F32) {
    g->type = memory::data_type::f32;
  } else if (type == ffi::DataType::BF16) {
    g->type = memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument("mstkd conv3d: only float32 and bfloat16");
  }
  if (x[4] != w[3] || y[4] != w[4] || x[0] != y[0]) {
    return ffi::Error::InvalidArgument("mstkd conv3d: channel or batch sizes disagree");
  }
  g->src = {x[0], x[4], x[1], x[2], x[3]};
  g->wei = {w[4], w[3], w[0], w[1], w[2]};
  g->dst = {y[0], y[4], y[1], y[2], y[3]};
  g->strides = {stride, stride, stride};
  g->pad_l = {padding, padding, padding};
  g->pad_r.resize(3);
  for (int i = 0; i < 3; ++i) {
    // The right padding that oneDNN's size rule needs for this output size.
    g->pad_r[i] = (y[i + 1] - 1) * stride + w[i] - x[i + 1] - padding;
    if (g->pad_r[i] < 0 || g->pad_r[i] > padding) {
      return ffi::Error::InvalidArgument("mstkd conv3d: output size does not match the "
                                         "input size, kernel, stride and padding");
    }
  }
  return ffi::Error::Success();
}

memory::desc Activations(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::ndhwc);
}

memory::desc UserWeights(const Geometry& g) {
  return memory::desc(g.wei, g.type, memory::format_tag::dhwio);
}

memory::desc AnyWeights(const Geometry& g) {
  return memory::desc(g.wei, g.type, memory::format_tag::any);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Activations(g.src, g.type), AnyWeights(g), Activations(g.dst, g.type), g.strides,
      g.pad_l, g.pad_r, UserScratchpad());
}

// Runs ``primitive`` with ``args`` plus a scratchpad of the size its descriptor asks for.
void Execute(const dnnl::primitive& primitive, const memory::desc& scratch_desc,
             std::unordered_map<int, memory> args) {
  dnnl::stream stream(Engine());
  memory scratch(scratch_desc, Engine());
  args.insert({DNNL_ARG_SCRATCHPAD, scratch});
  primitive.execute(stream, args);
  stream.wait();
}

// ``user`` in the layout ``wanted`` (a copy when they differ).
memory InLayout(const memory& user, const memory::desc& wanted) {
  if (user.get_desc() == wanted) return user;
  memory out(wanted, Engine());
  dnnl::stream stream(Engine());
  dnnl::reorder(user, out).execute(stream, const_cast<memory&>(user), out);
  stream.wait();
  return out;
}

ffi::Error Guard(const char* what, const std::function<ffi::Error()>& body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("mstkd conv3d ") + what + ": oneDNN error " +
                                e.what());
  }
}

ffi::Error ConvForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       int64_t stride, int64_t padding) {
  return Guard("forward", [&]() {
    Geometry g;
    ffi::Error err = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(),
                                  x.element_type(), stride, padding, &g);
    if (err.failure()) return err;
    auto pd = ForwardDesc(g);
    memory src(Activations(g.src, g.type), Engine(), x.untyped_data());
    memory wei(UserWeights(g), Engine(), w.untyped_data());
    memory dst(Activations(g.dst, g.type), Engine(), y->untyped_data());
    Execute(dnnl::convolution_forward(pd), pd.scratchpad_desc(),
            {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, InLayout(wei, pd.weights_desc())},
             {DNNL_ARG_DST, dst}});
    return ffi::Error::Success();
  });
}

ffi::Error ConvBackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> dx, int64_t stride, int64_t padding) {
  return Guard("backward data", [&]() {
    Geometry g;
    ffi::Error err = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(),
                                  dy.element_type(), stride, padding, &g);
    if (err.failure()) return err;
    auto hint = ForwardDesc(g);
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Activations(g.src, g.type),
        AnyWeights(g), Activations(g.dst, g.type), g.strides, g.pad_l, g.pad_r, hint,
        UserScratchpad());
    memory diff_dst(Activations(g.dst, g.type), Engine(), dy.untyped_data());
    memory wei(UserWeights(g), Engine(), w.untyped_data());
    memory diff_src(Activations(g.src, g.type), Engine(), dx->untyped_data());
    Execute(dnnl::convolution_backward_data(pd), pd.scratchpad_desc(),
            {{DNNL_ARG_DIFF_DST, diff_dst},
             {DNNL_ARG_WEIGHTS, InLayout(wei, pd.weights_desc())},
             {DNNL_ARG_DIFF_SRC, diff_src}});
    return ffi::Error::Success();
  });
}

ffi::Error ConvBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                               ffi::Result<ffi::AnyBuffer> dw, int64_t stride,
                               int64_t padding) {
  return Guard("backward weights", [&]() {
    Geometry g;
    ffi::Error err = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(),
                                  x.element_type(), stride, padding, &g);
    if (err.failure()) return err;
    auto hint = ForwardDesc(g);
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Activations(g.src, g.type),
        AnyWeights(g), Activations(g.dst, g.type), g.strides, g.pad_l, g.pad_r, hint,
        UserScratchpad());
    memory src(Activations(g.src, g.type), Engine(), x.untyped_data());
    memory diff_dst(Activations(g.dst, g.type), Engine(), dy.untyped_data());
    memory user(UserWeights(g), Engine(), dw->untyped_data());
    const bool direct = pd.diff_weights_desc() == user.get_desc();
    memory diff_wei = direct ? user : memory(pd.diff_weights_desc(), Engine());
    Execute(dnnl::convolution_backward_weights(pd), pd.scratchpad_desc(),
            {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
             {DNNL_ARG_DIFF_WEIGHTS, diff_wei}});
    if (!direct) {
      dnnl::stream stream(Engine());
      dnnl::reorder(diff_wei, user).execute(stream, diff_wei, user);
      stream.wait();
    }
    return ffi::Error::Success();
  });
}

}  // namespace

// All three take two buffers and return one, with the stride and the symmetric padding.
#define MSTKD_CONV3D_BINDING                                                      \
  ffi::Ffi::Bind()                                                                \
      .Arg<ffi::AnyBuffer>()                                                      \
      .Arg<ffi::AnyBuffer>()                                                      \
      .Ret<ffi::AnyBuffer>()                                                      \
      .Attr<int64_t>("stride")                                                    \
      .Attr<int64_t>("padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MstkdConv3dForward, ConvForward, MSTKD_CONV3D_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MstkdConv3dBackwardData, ConvBackwardData, MSTKD_CONV3D_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MstkdConv3dBackwardWeights, ConvBackwardWeights,
                              MSTKD_CONV3D_BINDING);
