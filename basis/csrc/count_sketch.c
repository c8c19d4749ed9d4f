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
 * basis_draw_count_sketch draws h and s themselves from a 64-bit seed with SplitMix64, a
 * counter-based generator: element i of a stream is a function of (seed, i) alone, so
 * basis/sketch.py computes the very same h and s with PyTorch integer ops on any device.
 * basis_count_sketch_seeded_f32 does both in one call: a sketched layer's per-call cost at the
 * paper's size is mostly the calls themselves, not their arithmetic.
 *
 * Built and loaded by basis/native.py; without a C compiler PyTorch ops compute the same values.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 512
#define FLUSH 64

/* Element i of the SplitMix64 stream started at seed (Steele, Lea & Flood 2014). */
static uint64_t splitmix64(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef struct {
    uint64_t key;
    int64_t row;
} keyed_row;

/* Sorts a[0..n) by (key, row) for a[] in row order, using tmp[0..n); returns where the result is.
 * Up to 128 rows an insertion sort; above, an LSD radix sort, 8 bits a pass, each pass stable so
 * equal keys stay in row order. Both beat qsort's call per comparison on random keys. */
static keyed_row *sort_keyed_rows(keyed_row *a, keyed_row *tmp, int64_t n) {
    if (n <= 128) {
        for (int64_t i = 1; i < n; ++i) {
            const keyed_row v = a[i];
            int64_t j = i;
            for (; j > 0 && a[j - 1].key > v.key; --j) a[j] = a[j - 1];
            a[j] = v;
        }
        return a;
    }
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t start[257] = {0};
        for (int64_t i = 0; i < n; ++i) ++start[((a[i].key >> shift) & 255) + 1];
        for (int d = 0; d < 256; ++d) start[d + 1] += start[d];
        for (int64_t i = 0; i < n; ++i) tmp[start[(a[i].key >> shift) & 255]++] = a[i];
        keyed_row *t = a;
        a = tmp;
        tmp = t;
    }
    return a;
}

/* h (bins in [0, rank)) and s (+-1) for `rows` rows. Balanced: rows are ranked by a random key
 * (ties by row) and row i goes to bin rank_i mod R, i.e. h = random_permutation(arange(B) mod R);
 * uniform: h_i = key_i mod R. Keys are the top 63 bits of the stream from `seed`; signs are the
 * top bit of the stream from `sign_seed`. Returns 0, -1 for a bad size, -2 if out of memory. */
int basis_draw_count_sketch(uint64_t seed, uint64_t sign_seed, int64_t rows, int64_t rank,
                            int balanced, int64_t *restrict h, float *restrict s) {
    if (rows < 0 || rank < 1) return -1;
    for (int64_t i = 0; i < rows; ++i)
        s[i] = splitmix64(sign_seed, (uint64_t)i) >> 63 ? -1.0f : 1.0f;
    if (!balanced) {
        for (int64_t i = 0; i < rows; ++i)
            h[i] = (int64_t)((splitmix64(seed, (uint64_t)i) >> 1) % (uint64_t)rank);
        return 0;
    }
    keyed_row *buf = (keyed_row *)malloc(2 * (size_t)(rows > 0 ? rows : 1) * sizeof(keyed_row));
    if (!buf) return -2;
    for (int64_t i = 0; i < rows; ++i) {
        buf[i].key = splitmix64(seed, (uint64_t)i) >> 1;
        buf[i].row = i;
    }
    const keyed_row *order = sort_keyed_rows(buf, buf + rows, rows);
    for (int64_t j = 0; j < rows; ++j) h[order[j].row] = j % rank;
    free(buf);
    return 0;
}

/* Adds acc[0..n) up in double and zeroes it. */
static double flush(float *restrict acc, int64_t n) {
    double total = 0.0;
    for (int64_t c = 0; c < n; ++c) {
        total += acc[c];
        acc[c] = 0.0f;
    }
    return total;
}

/* Adds row xi, times si, into o (o = si * xi for a bin's first row), its squares into sum_x and,
 * if col is not NULL, its values into col. */
static void add_row(float *restrict o, const float *restrict xi, float si, int first, int64_t n,
                    float *restrict sum_x, float *restrict col) {
    if (first)
        for (int64_t c = 0; c < n; ++c) {
            o[c] = si * xi[c];
            sum_x[c] += xi[c] * xi[c];
        }
    else
        for (int64_t c = 0; c < n; ++c) {
            o[c] += si * xi[c];
            sum_x[c] += xi[c] * xi[c];
        }
    if (col)
        for (int64_t c = 0; c < n; ++c) col[c] += xi[c];
}

/* colsum, if not NULL, receives the k column sums of x (a bias gradient, read in the same pass).
 * Rows are visited bin by bin (a counting sort of h, stable), so the slice of out being summed
 * stays in L1 while its rows are added and its squares taken; in row order each row lands in a
 * different bin's slice, and at the 64 x 50,257 head that traffic was most of the kernel's time.
 * Returns 0, or -1 if h holds a bin outside [0, rank), or -2 if out of memory. */
int basis_count_sketch_f32(const float *restrict x, int64_t rows, int64_t k, int64_t ldx,
                           const int64_t *restrict h, const float *restrict s, int64_t rank,
                           float *restrict out, double *restrict sq, float *restrict colsum,
                           int nthreads) {
    for (int64_t i = 0; i < rows; ++i)
        if (h[i] < 0 || h[i] >= rank) return -1;
    /* Narrower blocks when k is small, so that every thread gets a few: at least 64 columns. */
    int64_t width = k / (4 * (int64_t)(nthreads > 0 ? nthreads : 1));
    width = width < 64 ? 64 : width > BLOCK ? BLOCK : width & ~(int64_t)15;
    const int64_t nblocks = (k + width - 1) / width;
    const int parallel = nthreads > 1 && nblocks > 1 && rows * k >= (1 << 15);
    double *part = (double *)malloc(2 * (size_t)(nblocks > 0 ? nblocks : 1) * sizeof(double));
    int64_t *start = (int64_t *)calloc((size_t)rank + 1, sizeof(int64_t));
    int64_t *order = (int64_t *)malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int64_t));
    if (!part || !start || !order) {
        free(part);
        free(start);
        free(order);
        return -2;
    }
    for (int64_t i = 0; i < rows; ++i) ++start[h[i] + 1];
    for (int64_t r = 0; r < rank; ++r) start[r + 1] += start[r];
    for (int64_t i = 0; i < rows; ++i) order[start[h[i]]++] = i; /* start[r] is now bin r's end */
    for (int64_t r = rank; r > 0; --r) start[r] = start[r - 1];
    start[0] = 0;

#pragma omp parallel for schedule(static) num_threads(nthreads) if (parallel)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t c0 = b * width;
        const int64_t n = k - c0 < width ? k - c0 : width;
        /* squares are summed in float per column over at most FLUSH rows, then in double */
        float sum_x[BLOCK], sum_out[BLOCK], col[BLOCK];
        double bx = 0.0, bo = 0.0, col_total[BLOCK];
        for (int64_t c = 0; c < n; ++c) sum_x[c] = sum_out[c] = col[c] = 0.0f;
        for (int64_t c = 0; c < n; ++c) col_total[c] = 0.0;
        int64_t done = 0;
        for (int64_t r = 0; r < rank; ++r) {
            float *restrict o = out + r * k + c0;
            if (start[r] == start[r + 1]) memset(o, 0, (size_t)n * sizeof(float)); /* empty bin */
            for (int64_t j = start[r]; j < start[r + 1]; ++j) {
                const int64_t i = order[j];
                add_row(o, x + i * ldx + c0, s[i], j == start[r], n, sum_x, colsum ? col : NULL);
                if (++done % FLUSH == 0 || done == rows) {
                    bx += flush(sum_x, n);
                    if (colsum)
                        for (int64_t c = 0; c < n; ++c) {
                            col_total[c] += col[c];
                            col[c] = 0.0f;
                        }
                }
            }
            for (int64_t c = 0; c < n; ++c) sum_out[c] += o[c] * o[c];
            if ((r + 1) % FLUSH == 0 || r + 1 == rank) bo += flush(sum_out, n);
        }
        if (colsum)
            for (int64_t c = 0; c < n; ++c) colsum[c0 + c] = (float)col_total[c];
        part[2 * b] = bx;
        part[2 * b + 1] = bo;
    }

    double sx = 0.0, so = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) {
        sx += part[2 * b];
        so += part[2 * b + 1];
    }
    free(part);
    free(start);
    free(order);
    sq[0] = sx;
    sq[1] = so;
    return 0;
}

/* basis_draw_count_sketch then basis_count_sketch_f32, h and s kept only for the call. If mult is
 * not 0, out is then multiplied by mult, times the invariant scalar ||x|| / (||S x|| + eps) if
 * `invariant`: a second pass over out, which is cheap only while out is small. */
int basis_count_sketch_seeded_f32(const float *restrict x, int64_t rows, int64_t k, int64_t ldx,
                                  uint64_t seed, uint64_t sign_seed, int64_t rank, int balanced,
                                  float *restrict out, double *restrict sq,
                                  float *restrict colsum, double mult, int invariant, double eps,
                                  int nthreads) {
    const size_t n = (size_t)(rows > 0 ? rows : 1);
    int64_t *h = (int64_t *)malloc(n * sizeof(int64_t));
    float *s = (float *)malloc(n * sizeof(float));
    int status = h && s ? basis_draw_count_sketch(seed, sign_seed, rows, rank, balanced, h, s) : -2;
    if (status == 0)
        status = basis_count_sketch_f32(x, rows, k, ldx, h, s, rank, out, sq, colsum, nthreads);
    free(h);
    free(s);
    if (status == 0 && mult != 0.0) {
        const float f = (float)(invariant ? mult * sqrt(sq[0]) / (sqrt(sq[1]) + eps) : mult);
        for (int64_t i = 0; i < rank * k; ++i) out[i] *= f;
    }
    return status;
}
