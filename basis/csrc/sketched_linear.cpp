/* basis::sketched_linear: basis_linear's fp32 CPU path (basis/functional.py, _BasisLinearFn) as
 * one PyTorch operator with a C++ autograd node.
 *
 * Why it exists: at the paper's size (64 rows, 64 -> 256 features) a sketched call does a few µs of
 * arithmetic, and the Python autograd.Function around it cost ~100 µs a call inside a training
 * step (forward and backward), against ~30 µs for F.linear, whose node is C++. This file is the
 * same algorithm, step for step, with the same kernel (count_sketch.c, included below) and the
 * same GEMMs (MKL, or oneDNN where basis/gemm.py picks it: `onednn_*`), so its results equal the
 * Python path's; tests/test_native.py checks that. The Python
 * path stays the reference and serves everything else (CUDA, other dtypes, the Gaussian peer, a
 * given h and s, torch.compile). Built and loaded by basis/native.py.
 *
 * The seed and the salt of the sign stream (rng.SIGN_SALT) arrive as int64 carrying the bits of
 * basis/rng.py's uint64 values; the signs are drawn from seed ^ sign_salt, as there.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#define restrict __restrict__
extern "C" {
#include "count_sketch.c"
}
#undef restrict

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Sketched {
    at::Tensor out;     // S rows (R_eff x K), times mult * gamma if mult != 0
    double gamma;       // ||rows|| / (||S rows|| + eps), or 1 without invariant scalars
    at::Tensor colsum;  // column sums of rows, if asked for
};

/* The sketch S rows with h and s drawn from the seeds, its invariant scalar and (optionally) the
 * column sums of rows, in one pass of the kernel. */
Sketched sketch_rows(at::Tensor rows, int64_t r_eff, bool balanced, int64_t seed,
                     int64_t sign_seed, bool invariant, double eps, double mult, bool colsum) {
    if (rows.stride(1) != 1 && rows.size(1) > 1) rows = rows.contiguous();
    const int64_t k = rows.size(1);
    at::Tensor out = at::empty({r_eff, k}, rows.options());
    at::Tensor sums = colsum ? at::empty({k}, rows.options()) : at::Tensor();
    double sq[2];
    const int status = basis_count_sketch_seeded_f32(
        rows.data_ptr<float>(), rows.size(0), k, rows.stride(0), (uint64_t)seed,
        (uint64_t)sign_seed, r_eff, balanced, out.data_ptr<float>(), sq,
        colsum ? sums.data_ptr<float>() : nullptr, mult, invariant, eps, at::get_num_threads());
    TORCH_CHECK(status == 0, "BASIS count sketch failed (status ", status, ")");
    const double gamma = invariant ? sqrt(sq[0]) / (sqrt(sq[1]) + eps) : 1.0;
    return {out, gamma, sums};
}

/* x W^T (+ b) through oneDNN's linear, PyTorch's private mkldnn::_linear_pointwise, the route
 * basis/gemm.py takes for large CPU products (checked there at first use); called boxed, so a
 * change of its C++ signature cannot miscompile a call. */
at::Tensor onednn_linear(const at::Tensor &x, const at::Tensor &w,
                         const std::optional<at::Tensor> &b) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    std::vector<c10::IValue> stack{x, w, b ? c10::IValue(*b) : c10::IValue(), std::string("none"),
                                   c10::List<std::optional<at::Scalar>>(), std::string("")};
    op.callBoxed(&stack);
    return stack[0].toTensor();
}

/* The two products of a linear layer by the library basis/gemm.py chose for this shape. */
at::Tensor linear(const at::Tensor &x, const at::Tensor &w, const std::optional<at::Tensor> &b,
                  bool onednn) {
    return onednn ? onednn_linear(x, w, b) : at::linear(x, w, b);
}

at::Tensor input_grad(const at::Tensor &dy, const at::Tensor &w, bool onednn) {
    return onednn ? onednn_linear(dy, w.t(), std::nullopt) : at::matmul(dy, w);
}

struct SketchedLinear : public torch::autograd::Function<SketchedLinear> {
    static at::Tensor forward(AutogradContext *ctx, const at::Tensor &x, const at::Tensor &weight,
                              const std::optional<at::Tensor> &bias, int64_t rank, double lam,
                              double scale, double eps, bool invariant, bool balanced,
                              int64_t seed, int64_t sign_salt, int64_t scale_in_sketch_max,
                              bool onednn_forward, bool onednn_input_grad) {
        const int64_t sign_seed = (int64_t)((uint64_t)seed ^ (uint64_t)sign_salt);
        // Step 1: the forward output is the exact linear map (bias outside the sketched product).
        at::Tensor y = linear(x, weight, bias, onednn_forward);
        at::Tensor rows = x.reshape({-1, x.size(-1)});
        const int64_t r_eff = std::min(rank, rows.size(0));
        // Steps 5-6: X^ = gamma_X S X, one kernel call (draw, sum, norms, scaling).
        at::Tensor x_hat =
            sketch_rows(rows, r_eff, balanced, seed, sign_seed, invariant, eps, 1.0, false).out;
        // Step 7: keep X^ (R_eff x N), W and the seeds; nothing of X's size outlives the forward.
        ctx->save_for_backward({x_hat, weight});
        ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
        ctx->saved_data["settings"] = std::vector<double>{lam, scale, eps};
        ctx->saved_data["flags"] = std::vector<int64_t>{invariant, balanced, seed, sign_seed,
                                                        scale_in_sketch_max, onednn_input_grad};
        return y;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        at::Tensor x_hat = saved[0];
        const at::Tensor &weight = saved[1];
        const auto settings = ctx->saved_data["settings"].toDoubleVector();
        const auto flags = ctx->saved_data["flags"].toIntVector();
        const double lam = settings[0], scale = settings[1], eps = settings[2];
        const bool invariant = flags[0], balanced = flags[1];
        const at::Tensor &dy = grads[0];
        const at::Tensor dy_rows = dy.reshape({-1, dy.size(-1)});
        at::Tensor dx, dw, db;

        // Step 1: dX = dY W, exact.
        if (ctx->needs_input_grad(0)) dx = input_grad(dy, weight, flags[5]);
        const bool want_db = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
        if (ctx->needs_input_grad(1)) {
            // Steps 2-4 as in functional.py: dY^ = S dY with the forward's h and s, and the one
            // scalar scale (1-lam)^2 gamma_dY on the smaller of dY^ and X^.
            const double coef = scale * (1.0 - lam) * (1.0 - lam);
            const int64_t r_eff = x_hat.size(0);
            const bool in_sketch =
                coef != 0.0 &&
                r_eff * dy_rows.size(1) <= std::max<int64_t>(x_hat.numel(), flags[4]);
            Sketched s = sketch_rows(dy_rows, r_eff, balanced, flags[2], flags[3], invariant, eps,
                                     in_sketch ? coef : 0.0, want_db);
            if (!in_sketch) x_hat = x_hat * (s.gamma * coef);
            dw = r_eff == 1 ? at::outer(s.out[0], x_hat[0]) : s.out.t().mm(x_hat);
            db = s.colsum;
        }
        if (want_db && !db.defined()) db = dy_rows.sum(0);
        at::Tensor none;
        return {dx, dw, db, none, none, none, none, none, none, none, none, none, none, none};
    }
};

at::Tensor sketched_linear(const at::Tensor &x, const at::Tensor &weight,
                           const std::optional<at::Tensor> &bias, int64_t rank, double lam,
                           double scale, double eps, bool invariant, bool balanced, int64_t seed,
                           int64_t sign_salt, int64_t scale_in_sketch_max, bool onednn_forward,
                           bool onednn_input_grad) {
    return SketchedLinear::apply(x, weight, bias, rank, lam, scale, eps, invariant, balanced, seed,
                                 sign_salt, scale_in_sketch_max, onednn_forward,
                                 onednn_input_grad);
}

}  // namespace

TORCH_LIBRARY(basis, m) {
    m.def(
        "sketched_linear(Tensor x, Tensor weight, Tensor? bias, int rank, float lam, float scale, "
        "float eps, bool invariant_scalars, bool balanced, int seed, int sign_salt, "
        "int scale_in_sketch_max, bool onednn_forward, bool onednn_input_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(basis, CompositeImplicitAutograd, m) {
    m.impl("sketched_linear", sketched_linear);
}
