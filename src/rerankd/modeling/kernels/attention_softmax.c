/* DeBERTa's attention probabilities in one pass over each block of queries (rerankd.modeling.fused_attention):
 *
 *   probabilities[h, b, i, :] = softmax(scores[h, b, i, :] + c2p(h, b, i, :) + p2c(h, b, :, i) + mask[b, :])
 *
 * The scores (query . key, scaled) come from a batched matmul, the c2p and p2c terms from the banded products
 * of rerankd.modeling.relative (each block of T queries or keys against its window of relative-table rows).
 * A p2c term's row runs along queries, so for one query its terms lie a row apart: read through 8 x 8
 * tiles transposed in registers, never element by element (8 wide, not 16: as fast in the AVX-512 copy, and
 * the AVX2 copy cannot shuffle 16-wide vectors cheaply). Each thread keeps one block's rows in float32
 * (T x L, in its L2), sums the three terms and the mask there, and writes the probabilities over the scores.
 * Rows of padding queries (mask != 0) are written as zeros: nothing reads them.
 *
 * Layouts (all contiguous, element type float32 or bfloat16, `bf16` says which):
 *   scores  (heads, batch, L, L), overwritten with the probabilities
 *   c2p     (heads, blocks, batch, T, c2p_width):  c2p(h, b, i, j) at [h, i / T, b, i % T, T - 1 - i % T + j]
 *   p2c     (heads, blocks, batch, T, p2c_width):  p2c(h, b, i, j) at [h, j / T, b, j % T, T - 1 - j % T + i]
 *   mask    (batch, L) float32: 0 for a token, a large negative number for padding
 * Built with -ffast-math for vectorized exp and sums: no infinities or NaNs flow through it. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* kernels/threads.c */
void run_workers(void (*work)(void *), void *workers, size_t worker_bytes, int count);

enum { TILE = 8, ROW_PADDING = 16, MAX_THREADS = 256 };

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

typedef struct {
    void *scores;
    const void *c2p, *p2c;
    const float *mask;
    float *workspace;
    int heads, batch, length, block, blocks, c2p_width, p2c_width, threads, bf16;
} Job;

typedef struct {
    const Job *job;
    int first;
} Worker;

static inline float load(const void *base, size_t index, int bf16) {
    if (!bf16) return ((const float *)base)[index];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline f32x8 load8(const void *base, size_t index, int bf16) {
    f32x8 value;
    if (!bf16) {
        memcpy(&value, (const float *)base + index, sizeof value);
        return value;
    }
    u16x8 half;
    memcpy(&half, (const uint16_t *)base + index, sizeof half);
    u32x8 wide = __builtin_convertvector(half, u32x8) << 16;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* bfloat16 rounds to nearest, ties to even, as torch's conversion does (no NaNs reach here). */
static inline void store(void *base, size_t index, float value, int bf16) {
    if (!bf16) {
        ((float *)base)[index] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    ((uint16_t *)base)[index] = (uint16_t)(bits >> 16);
}

/* rows[i][k] becomes rows[k][i]: each stage swaps one bit of the index between row and column. */
static inline void transpose8(f32x8 rows[TILE]) {
    static const i32x8 low[3] = {
        {0, 8, 2, 10, 4, 12, 6, 14},
        {0, 1, 8, 9, 4, 5, 12, 13},
        {0, 1, 2, 3, 8, 9, 10, 11},
    };
    static const i32x8 high[3] = {
        {1, 9, 3, 11, 5, 13, 7, 15},
        {2, 3, 10, 11, 6, 7, 14, 15},
        {4, 5, 6, 7, 12, 13, 14, 15},
    };
    for (int stage = 0; stage < 3; stage++) {
        const int distance = 1 << stage;
        for (int i = 0; i < TILE; i++) {
            if (i & distance) continue;
            const f32x8 a = rows[i], b = rows[i + distance];
            rows[i] = __builtin_shuffle(a, b, low[stage]);
            rows[i + distance] = __builtin_shuffle(a, b, high[stage]);
        }
    }
}

/* The probabilities of one block of queries of one (head, pair); `acc` holds T rows of `stride` floats. */
static inline __attribute__((always_inline)) void query_block(const Job *job, int unit, float *acc, int stride,
                                                             int bf16) {
    const int L = job->length, T = job->block, B = job->batch, blocks = job->blocks;
    const int h = unit / (B * blocks), b = (unit / blocks) % B, query_block = unit % blocks;
    const int first = query_block * T, rows = (L - first) < T ? (L - first) : T;
    const float *mask = job->mask + (size_t)b * L;
    const size_t scores = (size_t)(h * B + b) * L * L + (size_t)first * L;

    /* scores + c2p + mask: contiguous along keys */
    for (int r = 0; r < rows; r++) {
        const size_t c2p = ((size_t)(h * blocks + query_block) * B * T + (size_t)b * T + r) * job->c2p_width + (T - 1 - r);
        float *out = acc + (size_t)r * stride;
        for (int j = 0; j < L; j++)
            out[j] = load(job->scores, scores + (size_t)r * L + j, bf16) + load(job->c2p, c2p + j, bf16) + mask[j];
    }

    /* + p2c: key j's terms for this block's queries are contiguous in its row */
    for (int key = 0; key < L; key += TILE) {
        const int keys = (L - key) < TILE ? (L - key) : TILE;
        size_t key_rows[TILE];
        for (int k = 0; k < keys; k++) {
            const int j = key + k, in_block = j % T;
            key_rows[k] = ((size_t)(h * blocks + j / T) * B * T + (size_t)b * T + in_block) * job->p2c_width + (T - 1 - in_block) + first;
        }
        int r = 0;
        if (keys == TILE) {
            for (; r + TILE <= rows; r += TILE) {
                f32x8 tile[TILE];
                for (int k = 0; k < TILE; k++) tile[k] = load8(job->p2c, key_rows[k] + r, bf16);
                transpose8(tile);
                for (int q = 0; q < TILE; q++) {
                    float *out = acc + (size_t)(r + q) * stride + key;
                    f32x8 sum;
                    memcpy(&sum, out, sizeof sum);
                    sum += tile[q];
                    memcpy(out, &sum, sizeof sum);
                }
            }
        }
        for (int k = 0; k < keys; k++)
            for (int q = r; q < rows; q++) acc[(size_t)q * stride + key + k] += load(job->p2c, key_rows[k] + q, bf16);
    }

    /* softmax along keys, written over the scores */
    for (int r = 0; r < rows; r++) {
        float *x = acc + (size_t)r * stride;
        const size_t out = scores + (size_t)r * L;
        if (mask[first + r] != 0.0f) {
            for (int j = 0; j < L; j++) store(job->scores, out + j, 0.0f, bf16);
            continue;
        }
        float top = x[0];
        for (int j = 1; j < L; j++) top = x[j] > top ? x[j] : top;
        float total = 0.0f;
        for (int j = 0; j < L; j++) {
            x[j] = expf(x[j] - top);
            total += x[j];
        }
        const float scale = 1.0f / total;
        for (int j = 0; j < L; j++) store(job->scores, out + j, x[j] * scale, bf16);
    }
}

/* Each worker's share of the (head, pair, block of queries) units, `query_block` inlined into one copy per
 * instruction set, so that one build runs at its best on any x86-64 CPU (and as plain C elsewhere). */
static inline __attribute__((always_inline)) void work(const Worker *worker) {
    const Job *job = worker->job;
    const int stride = job->length + ROW_PADDING;
    float *acc = job->workspace + (size_t)worker->first * job->block * stride;
    const int units = job->heads * job->batch * job->blocks;
    for (int unit = worker->first; unit < units; unit += job->threads) {
        if (job->bf16)
            query_block(job, unit, acc, stride, 1);
        else
            query_block(job, unit, acc, stride, 0);
    }
}

static void work_baseline(void *worker) { work(worker); }

#if defined(__x86_64__)
#define AVX2 "avx2,fma,f16c,bmi2"
#define AVX512 AVX2 ",avx512f,avx512bw,avx512dq,avx512vl"
__attribute__((target(AVX2))) static void work_avx2(void *worker) { work(worker); }
__attribute__((target(AVX512))) static void work_avx512(void *worker) { work(worker); }
#endif

typedef void (*WorkFunction)(void *);

/* The instruction sets, widest last: 0 picks the widest this CPU has; 1, 2, 3 ask for baseline, AVX2,
 * AVX-512 (where this build has them; a test runs each on a CPU that has it). */
static WorkFunction work_for(int instructions) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if ((instructions == 0 || instructions == 3) && avx512) return work_avx512;
    if ((instructions == 0 || instructions == 2) && avx2) return work_avx2;
    if (instructions == 0 || instructions == 1) return work_baseline;
    return NULL;
#else
    return instructions <= 1 ? work_baseline : NULL;
#endif
}

/* `workspace` holds threads x block x (length + 16) floats: each thread's rows, a row's stride off a power of
 * two (a column of the block then does not map to one cache set), allocated by the caller so that no thread
 * grows a heap of its own. 0 when every probability is written; nonzero, with nothing written, when this
 * CPU lacks the instruction set asked for (the caller then computes them another way). */
int attention_softmax(void *scores, const void *c2p, const void *p2c, const float *mask, float *workspace,
                      int heads, int batch, int length, int block, int blocks, int c2p_width, int p2c_width,
                      int threads, int bf16, int instructions) {
    const WorkFunction run = work_for(instructions);
    if (run == NULL) return 1;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    const Job job = {scores, c2p, p2c, mask, workspace, heads, batch, length, block, blocks, c2p_width, p2c_width, threads, bf16};
    Worker workers[MAX_THREADS];
    for (int t = 0; t < threads; t++) workers[t] = (Worker){&job, t};
    run_workers(run, workers, sizeof workers[0], threads);
    return 0;
}
