/* DeBERTa's whole self-attention of a layer in bfloat16 (rerankd.modeling.fused_attention), its products on
 * AMX tiles or, on CPUs with AVX512-BF16 but no AMX, by AVX-512's bfloat16 dot products:
 *
 *   context[i] = sum_j softmax_j(q_i . k_j + q_i . Kr[slot(i - j)] + k_j . Qr[slot(i - j)]) v_j
 *
 * for each (head, pair), over the pair's own tokens: no padding is computed, and nothing of size L x L
 * leaves a thread's cache. The eager path's five steps (the scores' matmul, the two banded relative
 * products, the fused softmax of attention_softmax.c, the context's matmul) each wrote and read tensors of
 * (heads, batch, L, L); here one block of 16 queries at a time is scored, biased, normalized and multiplied
 * by the values while its rows are in L1.
 *
 * Two engines run the same steps on the same layouts (AMX's operand layouts): ENGINE_AMX multiplies in
 * tiles; ENGINE_AVX512_BF16 computes each 16 x 16 product in 16 zmm accumulators, a `vdpbf16ps` per row and
 * pair of depths, the row's pair broadcast against a row of the B operand. The rest (packing, the relative
 * terms' gathers, softmax) is AVX-512 in both.
 *
 * The relative terms: slot(d) never falls as the distance d rises, so the distances a block of 16 queries
 * meets (i0 - keys + 1 .. i0 + 15) fall on one run of table rows, and the block is multiplied against that
 * run alone (at most keys + 45 rows). Its c2p term for (i, j) is then read back from the product at column
 * slot(i - j): by a gather, or, near the diagonal where 16 keys fall on 16 slots of their own, by one load
 * reversed. The p2c terms: for each group of 16 keys, the run of table rows its distances to every query
 * fall on times the group's keys, (run, 16), kept per thread for the whole pair, so that a block of queries
 * gathers its terms from a few KB of each group's.
 *
 * Inputs (all contiguous):
 *   qkv          (tokens, 3 x heads x 64) bfloat16: the fused projection's output over the batch's packed
 *                tokens; pair b's tokens, each a query and a key, are rows offsets[b] .. offsets[b] +
 *                lengths[b]
 *   key_table    (heads, slots / 16, 2, 16, 32) bfloat16: the relative table through the key projection
 *                (c2p), each 16 rows laid out as AMX's B operand
 *   query_table  (heads, slots, 64) bfloat16: the relative table through the query projection (p2c), as rows
 *                (AMX's A operand, against the keys); slots a multiple of 16 in both
 *   slots        int32, slots[k] = slot(-k) for |k| <= the batch's longest pair + 16: passed at k = 0
 *   context      (tokens, heads x 64) bfloat16, written at each pair's rows
 * The attention scale is in the query projection and in the p2c table already. */
#include <stddef.h>
#include <stdint.h>

/* The tile intrinsics came with GCC 11 and clang 12; elsewhere (another architecture, an older compiler) the
 * library builds without this kernel, and says so (packed_attention_ready() is 0). */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#include <immintrin.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* kernels/threads.c */
void run_workers(void (*work)(void *), void *workers, size_t worker_bytes, int count);

enum {
    HEAD_SIZE = 64,       /* AMX here takes heads of 64: two 32-deep steps */
    ROWS = 16,            /* a tile's rows: queries in a block, keys in a group */
    STEP = 32,            /* keys per step of probabilities x values */
    RUN_SLACK = 48,       /* a run of table rows is at most keys + 45 long, in whole tiles */
    MAX_THREADS = 256,
    ARCH_REQ_XCOMP_PERM = 0x1023,
    XFEATURE_XTILEDATA = 18,
    ENGINE_AMX = 1,
    ENGINE_AVX512_BF16 = 2,
};

/* GCC's tile intrinsics are asm statements that name no memory: this barrier keeps plain C's stores to a
 * buffer before a tile reads it, and its reads after a tile writes it. */
#define MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

#define AVX512_BF16_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma"
#define AMX_TARGET AVX512_BF16_TARGET ",amx-tile,amx-bf16"

typedef struct {
    const uint16_t *qkv;
    uint16_t *context;
    const int32_t *offsets, *lengths;
    const uint16_t *key_table, *query_table;
    const int32_t *slots;
    uint8_t *workspace;
    size_t workspace_bytes; /* per thread */
    int heads, pairs, table_groups, max_length, threads;
    int next_unit;
} Job;

typedef struct {
    Job *job;
    int index;
} Worker;

/* One thread's buffers, for pairs of at most `max_length` tokens. */
typedef struct {
    uint16_t *keys;      /* (groups of 16, 2, 16, 32): K as B operands of the scores */
    uint16_t *values;    /* (steps of 32, 4, 16, 32): V as B operands of probabilities x values */
    float *p2c;          /* (group of 16 keys, run, 16): the group's products with its run of table rows */
    int32_t *p2c_at;     /* key j's term of slot s is p2c[p2c_at[j] + 16 s] */
    float *c2p;          /* (16, run) */
    float *scores;       /* (16, padded L) */
    uint16_t *probabilities; /* (16, padded L) */
    float *out;          /* (16, 64) */
    uint16_t *rows;      /* (16, 64): a block's last rows, padded with zeros */
    int run, padded;     /* row strides in floats: `p2c`, `c2p`; `scores`, `probabilities` */
} Buffers;

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

static size_t buffers_for(int max_length, Buffers *buffers, uint8_t *base) {
    const int padded = round_up(max_length, STEP), run = round_up(max_length + RUN_SLACK, ROWS);
    const size_t sizes[] = {
        (size_t)padded * HEAD_SIZE * 2, (size_t)padded * HEAD_SIZE * 2, (size_t)padded * run * 4,
        (size_t)padded * 4,             (size_t)ROWS * run * 4,          (size_t)ROWS * padded * 4,
        (size_t)ROWS * padded * 2,      (size_t)ROWS * HEAD_SIZE * 4,    (size_t)ROWS * HEAD_SIZE * 2,
    };
    void **slots[] = {
        (void **)&buffers->keys,   (void **)&buffers->values, (void **)&buffers->p2c,
        (void **)&buffers->p2c_at, (void **)&buffers->c2p,    (void **)&buffers->scores,
        (void **)&buffers->probabilities, (void **)&buffers->out, (void **)&buffers->rows,
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        if (base != NULL) *slots[i] = base + total;
        total += aligned(sizes[i]);
    }
    buffers->padded = padded;
    buffers->run = run;
    return total;
}

/* The bytes of workspace each thread needs for pairs of at most `max_length` tokens. */
size_t packed_attention_workspace(int max_length) {
    Buffers buffers;
    return buffers_for(max_length, &buffers, NULL);
}

/* 16 rows of 64 values from `first` on (a row every `stride` elements), as a tile reads them: in place where
 * all 16 are the pair's, else copied with zeros past the `available` ones (the rows after a pair's last
 * token belong to the next pair, or lie past the tensor). */
static const uint16_t *block_rows(const uint16_t *first, size_t stride, int available, uint16_t *copy,
                                  size_t *row_bytes) {
    if (available >= ROWS) {
        *row_bytes = stride * 2;
        return first;
    }
    memset(copy, 0, ROWS * HEAD_SIZE * 2);
    for (int r = 0; r < available; r++) memcpy(copy + r * HEAD_SIZE, first + r * stride, HEAD_SIZE * 2);
    *row_bytes = HEAD_SIZE * 2;
    return copy;
}

/* 16 rows of 64 (`rows`, a row every `row_bytes`) times each group of 16 columns of `groups` B operands
 * (2 x 16 x 32 each), stored at `out` + 16 x group: the rows in tiles 0 and 1 (both 32-deep halves), each
 * group multiplied into tile 2 or 5 in turn. */
__attribute__((target(AMX_TARGET))) static void amx_rows_times_groups(const uint16_t *rows, size_t row_bytes,
                                                                     const uint16_t *groups, int count,
                                                                     float *out, size_t out_bytes) {
    MEMORY_BARRIER();
    _tile_loadd(0, rows, row_bytes);
    _tile_loadd(1, rows + STEP, row_bytes);
    int g = 0;
    for (; g + 1 < count; g += 2) {
        const uint16_t *b = groups + (size_t)g * 2 * ROWS * STEP;
        _tile_zero(2);
        _tile_zero(5);
        _tile_loadd(3, b, 64);
        _tile_loadd(4, b + ROWS * STEP, 64);
        _tile_loadd(6, b + 2 * ROWS * STEP, 64);
        _tile_loadd(7, b + 3 * ROWS * STEP, 64);
        _tile_dpbf16ps(2, 0, 3);
        _tile_dpbf16ps(5, 0, 6);
        _tile_dpbf16ps(2, 1, 4);
        _tile_dpbf16ps(5, 1, 7);
        _tile_stored(2, out + g * ROWS, out_bytes);
        _tile_stored(5, out + (g + 1) * ROWS, out_bytes);
    }
    if (g < count) {
        const uint16_t *b = groups + (size_t)g * 2 * ROWS * STEP;
        _tile_zero(2);
        _tile_loadd(3, b, 64);
        _tile_loadd(4, b + ROWS * STEP, 64);
        _tile_dpbf16ps(2, 0, 3);
        _tile_dpbf16ps(2, 1, 4);
        _tile_stored(2, out + g * ROWS, out_bytes);
    }
    MEMORY_BARRIER();
}

/* Table rows (16 x `groups`, 64 wide, in order) times a group of 16 keys (`keys`, their B operands): the
 * (16 x groups, 16) products into `out`, row after row, by tiles 0/1 and 6/7 (rows), 3/4 (keys), 2 and 5. */
__attribute__((target(AMX_TARGET))) static void amx_table_rows_times_keys(const uint16_t *rows, int groups,
                                                                         const uint16_t *keys, float *out) {
    MEMORY_BARRIER();
    _tile_loadd(3, keys, 64);
    _tile_loadd(4, keys + ROWS * STEP, 64);
    const size_t row_bytes = HEAD_SIZE * 2, group = (size_t)ROWS * HEAD_SIZE;
    int t = 0;
    for (; t + 1 < groups; t += 2) {
        const uint16_t *a = rows + t * group;
        _tile_zero(2);
        _tile_zero(5);
        _tile_loadd(0, a, row_bytes);
        _tile_loadd(1, a + STEP, row_bytes);
        _tile_loadd(6, a + group, row_bytes);
        _tile_loadd(7, a + group + STEP, row_bytes);
        _tile_dpbf16ps(2, 0, 3);
        _tile_dpbf16ps(5, 6, 3);
        _tile_dpbf16ps(2, 1, 4);
        _tile_dpbf16ps(5, 7, 4);
        _tile_stored(2, out + (size_t)t * ROWS * ROWS, ROWS * 4);
        _tile_stored(5, out + (size_t)(t + 1) * ROWS * ROWS, ROWS * 4);
    }
    if (t < groups) {
        const uint16_t *a = rows + t * group;
        _tile_zero(2);
        _tile_loadd(0, a, row_bytes);
        _tile_loadd(1, a + STEP, row_bytes);
        _tile_dpbf16ps(2, 0, 3);
        _tile_dpbf16ps(2, 1, 4);
        _tile_stored(2, out + (size_t)t * ROWS * ROWS, ROWS * 4);
    }
    MEMORY_BARRIER();
}

/* rows[i][k] becomes rows[k][i] for 16 x 16 32-bit values: each stage swaps one bit of the index between
 * row and column (the lane p of a stage's low half takes a[p] or b[p - d], its high half a[p + d] or b[p]). */
__attribute__((target(AVX512_BF16_TARGET))) static inline void transpose16(__m512i rows[ROWS]) {
    for (int distance = 1; distance < ROWS; distance <<= 1) {
        int32_t low_lanes[ROWS], high_lanes[ROWS];
        for (int p = 0; p < ROWS; p++) {
            low_lanes[p] = p & distance ? ROWS + p - distance : p;
            high_lanes[p] = p & distance ? ROWS + p : p + distance;
        }
        const __m512i low = _mm512_loadu_si512(low_lanes), high = _mm512_loadu_si512(high_lanes);
        for (int i = 0; i < ROWS; i++) {
            if (i & distance) continue;
            const __m512i a = rows[i], b = rows[i + distance];
            rows[i] = _mm512_permutex2var_epi32(a, low, b);
            rows[i + distance] = _mm512_permutex2var_epi32(a, high, b);
        }
    }
}

/* K of one (head, pair) as B operands of q . k: group g, half s, row kk holds the 32-bit pairs
 * (k_j[32s + 2kk], k_j[32s + 2kk + 1]) for the group's 16 keys j, a 16 x 16 transpose of 32-bit values;
 * keys past the pair's are zeros. */
__attribute__((target(AVX512_BF16_TARGET))) static void pack_keys(const uint16_t *key, size_t stride, int keys,
                                                         uint16_t *out) {
    for (int j0 = 0; j0 < keys; j0 += ROWS)
        for (int half = 0; half < 2; half++) {
            __m512i rows[ROWS];
            for (int n = 0; n < ROWS; n++)
                rows[n] = j0 + n < keys ? _mm512_loadu_si512(key + (size_t)(j0 + n) * stride + half * STEP)
                                        : _mm512_setzero_si512();
            transpose16(rows);
            for (int kk = 0; kk < ROWS; kk++) _mm512_storeu_si512(out + (size_t)kk * STEP, rows[kk]);
            out += ROWS * STEP;
        }
}

/* V of one (head, pair) as B operands of probabilities x values: step t (32 keys), columns 16c .. 16c + 15,
 * row kk holds (v_{32t + 2kk}[col], v_{32t + 2kk + 1}[col]) for each column: two rows interleaved. Keys past
 * the pair's are zeros (their probabilities are zeros too, and 0 x 0 keeps the sums finite). */
__attribute__((target(AVX512_BF16_TARGET))) static void pack_values(const uint16_t *value, size_t stride, int keys,
                                                           uint16_t *out) {
    int16_t first_lanes[STEP], second_lanes[STEP];
    for (int p = 0; p < STEP; p++) {
        first_lanes[p] = (int16_t)(p / 2 + (p % 2) * STEP);
        second_lanes[p] = (int16_t)(first_lanes[p] + ROWS);
    }
    const __m512i first = _mm512_loadu_si512(first_lanes), second = _mm512_loadu_si512(second_lanes);
    const int steps = (keys + STEP - 1) / STEP;
    for (int t = 0; t < steps; t++)
        for (int kk = 0; kk < ROWS; kk++) {
            const int j = t * STEP + 2 * kk;
            __m512i even[2], odd[2];
            for (int half = 0; half < 2; half++) {
                even[half] = j < keys ? _mm512_loadu_si512(value + (size_t)j * stride + half * STEP)
                                      : _mm512_setzero_si512();
                odd[half] = j + 1 < keys ? _mm512_loadu_si512(value + (size_t)(j + 1) * stride + half * STEP)
                                         : _mm512_setzero_si512();
            }
            uint16_t *row = out + ((size_t)t * 4 * ROWS + kk) * STEP;
            for (int c = 0; c < 4; c++)
                _mm512_storeu_si512(row + (size_t)c * ROWS * STEP,
                                    _mm512_permutex2var_epi16(even[c / 2], c % 2 ? second : first, odd[c / 2]));
        }
}

/* e^x for x <= 0, within 2e-7 relatively (far inside the bfloat16 rounding the probabilities take):
 * 2^k 2^f with k = round(x log2 e) and |f| <= 1/2, 2^f by its Taylor series to the 6th power. */
__attribute__((target(AVX512_BF16_TARGET))) static inline __m512 exp_nonpositive(__m512 x) {
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.693147181f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

static inline __mmask16 lanes_from(int j, int keys) {
    return keys - j >= 16 ? 0xFFFF : keys > j ? (__mmask16)((1u << (keys - j)) - 1) : 0;
}

/* x[j] += c2p[slot(i - j)] + p2c[p2c_at[j] + 16 slot(i - j)] for the 16 keys from `j` on (those of them
 * below `keys`). A block's rows take a group of keys in turn (`add_relative_terms`'s caller): the p2c terms
 * of 16 queries and 16 keys lie in some 31 rows of the group's products, which stay in L1 from one query to
 * the next, where a row at a time over all keys would reach every group's rows and fall out of L1. */
__attribute__((target(AVX512_BF16_TARGET))) static inline void add_relative_terms(float *x, const float *c2p,
                                                                                 const float *p2c,
                                                                                 const int32_t *p2c_at,
                                                                                 const int32_t *slot_of, int j,
                                                                                 __mmask16 lanes) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i reversed = _mm512_sub_epi32(_mm512_set1_epi32(15), lane);
    const __m512i slot = _mm512_maskz_loadu_epi32(lanes, slot_of + j);
    const __m512i at = _mm512_add_epi32(_mm512_maskz_loadu_epi32(lanes, p2c_at + j), _mm512_slli_epi32(slot, 4));
    __m512 sum = _mm512_maskz_loadu_ps(lanes, x + j);
    /* near the diagonal each distance has a slot of its own: 16 slots falling by one, one load reversed */
    const int first = _mm512_cvtsi512_si32(slot);
    const __m512i falling = _mm512_sub_epi32(_mm512_set1_epi32(first), lane);
    if (lanes == 0xFFFF && _mm512_cmpeq_epi32_mask(slot, falling) == 0xFFFF)
        sum = _mm512_add_ps(sum, _mm512_permutexvar_ps(reversed, _mm512_loadu_ps(c2p + first - 15)));
    else
        sum = _mm512_add_ps(sum, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, slot, c2p, 4));
    sum = _mm512_add_ps(sum, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, p2c, 4));
    _mm512_mask_storeu_ps(x + j, lanes, sum);
}

/* softmax of x's `keys` logits into bfloat16 probabilities, zeros past the keys up to `padded`. */
__attribute__((target(AVX512_BF16_TARGET))) static void softmax_row(float *x, int keys, int padded,
                                                                   uint16_t *probabilities) {
    __m512 top = _mm512_set1_ps(-3.0e38f);
    for (int j = 0; j < keys; j += 16) {
        const __mmask16 lanes = lanes_from(j, keys);
        top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, x + j));
    }
    const __m512 largest = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int j = 0; j < keys; j += 16) {
        const __mmask16 lanes = lanes_from(j, keys);
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + j), largest));
        _mm512_mask_storeu_ps(x + j, lanes, e);
        total = _mm512_mask_add_ps(total, lanes, total, e);
    }
    const __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int j = 0; j < padded; j += 16) {
        const __mmask16 lanes = lanes_from(j, keys);
        const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + j), scale);
        _mm256_storeu_si256((__m256i *)(probabilities + j), (__m256i)_mm512_cvtneps_pbh(p));
    }
}

/* probabilities (16 x steps x 32) x values into `out` (16 x 64 floats), by tiles 4 to 7. */
__attribute__((target(AMX_TARGET))) static void amx_weigh_values(const uint16_t *probabilities, size_t row_bytes,
                                                                const uint16_t *values, int steps, float *out) {
    MEMORY_BARRIER();
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int t = 0; t < steps; t++) {
        const uint16_t *b = values + (size_t)t * 4 * ROWS * STEP;
        _tile_loadd(0, probabilities + t * STEP, row_bytes);
        _tile_loadd(1, b, 64);
        _tile_loadd(2, b + ROWS * STEP, 64);
        _tile_loadd(3, b + 2 * ROWS * STEP, 64);
        _tile_dpbf16ps(4, 0, 1);
        _tile_dpbf16ps(5, 0, 2);
        _tile_loadd(1, b + 3 * ROWS * STEP, 64);
        _tile_dpbf16ps(6, 0, 3);
        _tile_dpbf16ps(7, 0, 1);
    }
    _tile_stored(4, out, HEAD_SIZE * 4);
    _tile_stored(5, out + ROWS, HEAD_SIZE * 4);
    _tile_stored(6, out + 2 * ROWS, HEAD_SIZE * 4);
    _tile_stored(7, out + 3 * ROWS, HEAD_SIZE * 4);
    MEMORY_BARRIER();
}

/* acc[m] += rows[m] . b over `pairs` pairs of depths, rows[m] starting at `rows` + m x `stride` and b laid out
 * as AMX's B operand (a row of 16 columns' pairs per pair of depths): a B row loaded once for all 16 rows,
 * each row's pair broadcast from memory. */
__attribute__((target(AVX512_BF16_TARGET), always_inline)) static inline void dot_rows(__m512 acc[ROWS],
                                                                                    const uint16_t *rows,
                                                                                    size_t stride,
                                                                                    const uint16_t *b,
                                                                                    int pairs) {
    for (int kk = 0; kk < pairs; kk++) {
        const __m512bh column = (__m512bh)_mm512_loadu_si512(b + (size_t)kk * STEP);
#pragma GCC unroll 16
        for (int m = 0; m < ROWS; m++) {
            int32_t pair;
            memcpy(&pair, rows + m * stride + 2 * kk, sizeof pair);
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair), column);
        }
    }
}

__attribute__((target(AVX512_BF16_TARGET), always_inline)) static inline void store_rows(const __m512 acc[ROWS],
                                                                                      float *out,
                                                                                      size_t stride) {
#pragma GCC unroll 16
    for (int m = 0; m < ROWS; m++) _mm512_storeu_ps(out + m * stride, acc[m]);
}

/* amx_rows_times_groups by dot products. */
__attribute__((target(AVX512_BF16_TARGET))) static void avx512_rows_times_groups(const uint16_t *rows,
                                                                                size_t row_bytes,
                                                                                const uint16_t *groups,
                                                                                int count, float *out,
                                                                                size_t out_bytes) {
    for (int g = 0; g < count; g++) {
        __m512 acc[ROWS];
        for (int m = 0; m < ROWS; m++) acc[m] = _mm512_setzero_ps();
        dot_rows(acc, rows, row_bytes / 2, groups + (size_t)g * 2 * ROWS * STEP, HEAD_SIZE / 2);
        store_rows(acc, out + g * ROWS, out_bytes / 4);
    }
}

/* amx_table_rows_times_keys by dot products. */
__attribute__((target(AVX512_BF16_TARGET))) static void avx512_table_rows_times_keys(const uint16_t *rows,
                                                                                    int groups,
                                                                                    const uint16_t *keys,
                                                                                    float *out) {
    for (int t = 0; t < groups; t++)
        avx512_rows_times_groups(rows + (size_t)t * ROWS * HEAD_SIZE, HEAD_SIZE * 2, keys, 1,
                                 out + (size_t)t * ROWS * ROWS, ROWS * 4);
}

/* amx_weigh_values by dot products: the 64 columns 16 at a time. */
__attribute__((target(AVX512_BF16_TARGET))) static void avx512_weigh_values(const uint16_t *probabilities,
                                                                           size_t row_bytes,
                                                                           const uint16_t *values, int steps,
                                                                           float *out) {
    for (int c = 0; c < HEAD_SIZE / ROWS; c++) {
        __m512 acc[ROWS];
        for (int m = 0; m < ROWS; m++) acc[m] = _mm512_setzero_ps();
        for (int t = 0; t < steps; t++)
            dot_rows(acc, probabilities + t * STEP, row_bytes / 2, values + (size_t)(t * 4 + c) * ROWS * STEP,
                     ROWS);
        store_rows(acc, out + c * ROWS, HEAD_SIZE);
    }
}

__attribute__((target(AVX512_BF16_TARGET))) static void store_context(const float *out, int rows, uint16_t *context,
                                                             size_t stride) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < HEAD_SIZE; c += 16) {
            const __m512 value = _mm512_loadu_ps(out + r * HEAD_SIZE + c);
            _mm256_storeu_si256((__m256i *)(context + (size_t)r * stride + c), (__m256i)_mm512_cvtneps_pbh(value));
        }
}

/* A table's run of rows from slot `low` (a multiple of 16) through `high`: its groups and their count. */
static const uint16_t *run_of(const uint16_t *table, int low, int high, int *groups) {
    *groups = high / ROWS - low / ROWS + 1;
    return table + (size_t)(low / ROWS) * 2 * ROWS * STEP;
}

/* One (head, pair)'s context; `amx` (a constant where it is inlined) picks the engine of the products. */
static inline __attribute__((always_inline)) void attend_unit(const Job *job, int unit, const Buffers *buf,
                                                              int amx) {
    const int h = unit % job->heads, b = unit / job->heads;
    const int queries = job->lengths[b], keys = queries, hidden = job->heads * HEAD_SIZE;
    const size_t stride = (size_t)3 * hidden;
    const uint16_t *query = job->qkv + (size_t)job->offsets[b] * stride + h * HEAD_SIZE;
    const uint16_t *key = query + hidden, *value = query + 2 * hidden;
    const size_t table_size = (size_t)job->table_groups * 2 * ROWS * STEP;
    const uint16_t *key_table = job->key_table + h * table_size, *query_table = job->query_table + h * table_size;
    const int32_t *slots = job->slots;
    const int key_groups = (keys + ROWS - 1) / ROWS, steps = (keys + STEP - 1) / STEP;

    pack_keys(key, stride, keys, buf->keys);
    pack_values(value, stride, keys, buf->values);

    /* p2c: the run of table rows the distances from every query to a group of 16 keys fall on, times the
     * group's keys: (run, 16) per group, so that a block of queries finds its terms in a few KB */
    for (int g = 0; g < key_groups; g++) {
        const int j0 = g * ROWS, low = slots[j0 + ROWS - 1] & ~(ROWS - 1), high = slots[j0 - queries + 1];
        float *terms = buf->p2c + (size_t)g * buf->run * ROWS;
        const uint16_t *rows = query_table + (size_t)low * HEAD_SIZE, *group = buf->keys + (size_t)g * 2 * ROWS * STEP;
        if (amx)
            amx_table_rows_times_keys(rows, high / ROWS - low / ROWS + 1, group, terms);
        else
            avx512_table_rows_times_keys(rows, high / ROWS - low / ROWS + 1, group, terms);
        for (int n = 0; n < ROWS; n++) buf->p2c_at[j0 + n] = (g * buf->run - low) * ROWS + n;
    }

    for (int i0 = 0; i0 < queries; i0 += ROWS) {
        const int rows = queries - i0 < ROWS ? queries - i0 : ROWS;
        size_t row_bytes;
        const uint16_t *block = block_rows(query + (size_t)i0 * stride, stride, rows, buf->rows, &row_bytes);
        (amx ? amx_rows_times_groups : avx512_rows_times_groups)(block, row_bytes, buf->keys, key_groups,
                                                                  buf->scores, (size_t)buf->padded * 4);
        /* c2p: the block against the run of slots of distances i0 - keys + 1 .. i0 + 15 */
        const int low = slots[keys - 1 - i0] & ~(ROWS - 1), high = slots[-(i0 + ROWS - 1)];
        int groups;
        const uint16_t *run = run_of(key_table, low, high, &groups);
        (amx ? amx_rows_times_groups : avx512_rows_times_groups)(block, row_bytes, run, groups, buf->c2p,
                                                                  (size_t)buf->run * 4);
        for (int j = 0; j < keys; j += ROWS)
            for (int r = 0; r < rows; r++)
                add_relative_terms(buf->scores + (size_t)r * buf->padded, buf->c2p + (size_t)r * buf->run - low,
                                   buf->p2c, buf->p2c_at, slots - (i0 + r), j, lanes_from(j, keys));
        for (int r = 0; r < ROWS; r++) {
            uint16_t *probabilities = buf->probabilities + (size_t)r * buf->padded;
            if (r < rows)
                softmax_row(buf->scores + (size_t)r * buf->padded, keys, steps * STEP, probabilities);
            else
                memset(probabilities, 0, (size_t)steps * STEP * 2);
        }
        (amx ? amx_weigh_values : avx512_weigh_values)(buf->probabilities, (size_t)buf->padded * 2, buf->values,
                                                        steps, buf->out);
        store_context(buf->out, rows,
                      job->context + ((size_t)job->offsets[b] + i0) * hidden + h * HEAD_SIZE, hidden);
    }
}

/* A thread's share of the (head, pair) units, taken in turn. */
static inline __attribute__((always_inline)) void work(const Worker *worker, int amx) {
    Job *job = worker->job;
    Buffers buffers;
    buffers_for(job->max_length, &buffers, job->workspace + (size_t)worker->index * job->workspace_bytes);
    const int units = job->heads * job->pairs;
    for (int unit; (unit = __atomic_fetch_add(&job->next_unit, 1, __ATOMIC_RELAXED)) < units;)
        attend_unit(job, unit, &buffers, amx);
}

__attribute__((target(AMX_TARGET))) static void work_amx(void *worker) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = ROWS;
    }
    _tile_loadconfig(&config);
    work(worker, 1);
    _tile_release();
}

__attribute__((target(AVX512_BF16_TARGET))) static void work_avx512_bf16(void *worker) { work(worker, 0); }

/* Set once Linux has granted this process the tiles' state: a tile instruction before that faults. */
static int tiles_granted;

static int avx512_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

/* 1 where `engine` runs on this CPU, else 0: the caller then attends another way. ENGINE_AMX needs AMX-BF16
 * and the tiles' state, which Linux grants a process on request (made here). */
int packed_attention_ready(int engine) {
    if (!avx512_bf16_supported()) return 0;
    if (engine == ENGINE_AVX512_BF16) return 1;
    if (engine != ENGINE_AMX || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16"))
        return 0;
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
        __atomic_store_n(&tiles_granted, 1, __ATOMIC_RELEASE);
    return __atomic_load_n(&tiles_granted, __ATOMIC_ACQUIRE);
}

/* Every (head, pair)'s context by `engine`, by `threads` workers taking units in turn. `workspace` holds
 * threads x packed_attention_workspace(max_length) bytes, allocated by the caller so that no thread grows a
 * heap of its own. 0 when every context row is written; nonzero, with nothing written, where the engine does
 * not run here (ENGINE_AMX before packed_attention_ready() has granted the tiles: a tile instruction then
 * faults; the caller then attends another way). */
int packed_attention(const void *qkv, void *context, const int32_t *offsets, const int32_t *lengths,
                     const void *key_table, const void *query_table, const int32_t *slots, void *workspace,
                     int heads, int pairs, int table_groups, int max_length, int threads, int engine) {
    void (*const work_of[])(void *) = {[ENGINE_AMX] = work_amx, [ENGINE_AVX512_BF16] = work_avx512_bf16};
    if (engine == ENGINE_AMX ? !__atomic_load_n(&tiles_granted, __ATOMIC_ACQUIRE)
                             : engine != ENGINE_AVX512_BF16 || !avx512_bf16_supported())
        return 2;
    void (*const run)(void *) = work_of[engine];
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    Job job = {qkv, context, offsets, lengths, key_table, query_table, slots, workspace,
               packed_attention_workspace(max_length), heads, pairs, table_groups, max_length, threads, 0};
    Worker workers[MAX_THREADS];
    for (int t = 0; t < threads; t++) workers[t] = (Worker){&job, t};
    run_workers(run, workers, sizeof workers[0], threads);
    return 0;
}
#else
int packed_attention_ready(int engine) {
    (void)engine;
    return 0;
}

size_t packed_attention_workspace(int max_length) {
    (void)max_length;
    return 0;
}

int packed_attention(const void *qkv, void *context, const int32_t *offsets, const int32_t *lengths,
                     const void *key_table, const void *query_table, const int32_t *slots, void *workspace,
                     int heads, int pairs, int table_groups, int max_length, int threads, int engine) {
    (void)qkv, (void)context, (void)offsets, (void)lengths, (void)key_table, (void)query_table;
    (void)slots, (void)workspace, (void)heads, (void)pairs, (void)table_groups, (void)max_length, (void)threads;
    (void)engine;
    return 1;
}
#endif
