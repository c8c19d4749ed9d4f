/* The count sketch of BASIS on CPU in one pass: out = S x and the two squared Frobenius norms the
 * invariant scalar needs, ||x||^2 and ||S x||^2 (spec section 1, forward steps 5-6).
 *
 * S is R x B with one nonzero per column, S[h[i], i] = s[i], so row i of x is added, signed, into
 * row h[i] of out. x is walked in blocks of columns: a block of out (R x BLOCK floats) stays in
 * cache while every row of x adds into it, its norm is taken while it is still there, and x is
 * read once. Blocks are shared among OpenMP threads (the OpenMP runtime PyTorch already loaded);
 * each block's squared norms go to its own slot and are summed in block order afterwards, so the
 * result does not depend on the thread count or the schedule (bit-identical reruns and resumes).
 *
 * Built and loaded by basis/native.py; without a C compiler PyTorch ops compute the same values.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512
#define FLUSH 64

/* Adds acc[0..n) up in double and zeroes it. */
static double flush(float *restrict acc, int64_t n) {
    double total = 0.0;
    for (int64_t c = 0; c < n; ++c) {
        total += acc[c];
        acc[c] = 0.0f;
    }
    return total;
}

/* Returns 0, or -1 if h holds a bin outside [0, rank), or -2 if out of memory. */
int basis_count_sketch_f32(const float *restrict x, int64_t rows, int64_t k, int64_t ldx,
                           const int64_t *restrict h, const float *restrict s, int64_t rank,
                           float *restrict out, double *restrict sq, int nthreads) {
    for (int64_t i = 0; i < rows; ++i)
        if (h[i] < 0 || h[i] >= rank) return -1;
    /* Narrower blocks when k is small, so that every thread gets a few: at least 64 columns. */
    int64_t width = k / (4 * (int64_t)(nthreads > 0 ? nthreads : 1));
    width = width < 64 ? 64 : width > BLOCK ? BLOCK : width & ~(int64_t)15;
    const int64_t nblocks = (k + width - 1) / width;
    const int parallel = nthreads > 1 && nblocks > 1 && rows * k >= (1 << 15);
    double *part = malloc(2 * (size_t)(nblocks > 0 ? nblocks : 1) * sizeof(double));
    if (!part) return -2;

#pragma omp parallel for schedule(static) num_threads(nthreads) if (parallel)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t c0 = b * width;
        const int64_t n = k - c0 < width ? k - c0 : width;
        /* squares are summed in float per column over at most FLUSH rows, then in double */
        float sum_x[BLOCK], sum_out[BLOCK];
        double bx = 0.0, bo = 0.0;
        for (int64_t c = 0; c < n; ++c) sum_x[c] = sum_out[c] = 0.0f;
        for (int64_t r = 0; r < rank; ++r) memset(out + r * k + c0, 0, (size_t)n * sizeof(float));
        for (int64_t i = 0; i < rows; ++i) {
            const float *restrict xi = x + i * ldx + c0;
            float *restrict o = out + h[i] * k + c0;
            const float si = s[i];
            for (int64_t c = 0; c < n; ++c) {
                o[c] += si * xi[c];
                sum_x[c] += xi[c] * xi[c];
            }
            if ((i + 1) % FLUSH == 0 || i + 1 == rows) bx += flush(sum_x, n);
        }
        for (int64_t r = 0; r < rank; ++r) {
            const float *restrict o = out + r * k + c0;
            for (int64_t c = 0; c < n; ++c) sum_out[c] += o[c] * o[c];
            if ((r + 1) % FLUSH == 0 || r + 1 == rank) bo += flush(sum_out, n);
        }
        part[2 * b] = bx;
        part[2 * b + 1] = bo;
    }

    double sx = 0.0, so = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) {
        sx += part[2 * b];
        so += part[2 * b + 1];
    }
    free(part);
    sq[0] = sx;
    sq[1] = so;
    return 0;
}
