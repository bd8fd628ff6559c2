/*
 * vectors - live SSE/AVX register state and the FP control registers.
 *
 * The state is 12 accumulators of 256 bits (four 64-bit words each). Each
 * round (a pass) runs --iters iterations of an integer mixing step over
 * all 12; with AVX2 the pass keeps the 12 accumulators in ymm0..ymm15 for
 * its whole inner loop, so a freeze at any moment most likely catches
 * live values in the upper halves of the ymm registers. Every operation
 * works within a 128-bit lane (add, xor, shifts, 32x32->64 multiply, a
 * swap of the lane's two words), so the SSE2 fallback (used when the CPU
 * lacks AVX2, or with --sse2 1) runs the same lanes as 12 xmm accumulators
 * at a time, in two halves, and gives bit-identical results.
 *
 * After each pass the program recomputes one 128-bit lane (a different one
 * each round) with plain scalar code from the previous state and compares.
 * It also keeps non-default FP control state and checks it every round:
 * MXCSR = 0xff80 (round toward zero, flush to zero, all exceptions
 * masked), where 1.0/10.0 must give 0x3fb9999999999999 (not ...9a) and
 * 1e-300*1e-10 must flush to +0; and the x87 control word 0x0e7f (53-bit
 * precision, round toward zero), where (1 + 2^-60) - 1 in long double must
 * be 0.
 *
 * The checksum covers the state after every pass; it does not depend on
 * the instruction set used. --pause-us (default 0) sleeps between passes.
 */
#include "common.h"

#include <fpu_control.h>
#include <immintrin.h>

#define ACCUMULATORS 12u
#define WORDS_PER_ACC 4u
#define STATE_WORDS (ACCUMULATORS * WORDS_PER_ACC)
#define LANES (ACCUMULATORS * 2u)          /* 128-bit lanes */

#define MXCSR_WANTED 0xff80u               /* FTZ | RC=toward zero | masks */
#define MXCSR_FLAGS 0x3fu                  /* sticky exception flags */
#define X87_CW_WANTED 0x0e7f               /* PC=53 bit, RC=toward zero */

/* State, additive constants and multipliers, laid out accumulator-major:
 * word w of accumulator a is [a * 4 + w]; 128-bit lane l is words
 * [2l, 2l+1]. */
struct vector_state {
    uint64_t words[STATE_WORDS];
};

/* ------------------------------------------------------------------ */
/* The mixing step, three ways                                         */
/* ------------------------------------------------------------------ */

/* Scalar reference for one 128-bit lane: (x0, x1) with constants k, m. */
static void lane_scalar(uint64_t *x, const uint64_t *k, const uint64_t *m,
                        uint64_t iterations)
{
    uint64_t a = x[0], b = x[1];
    for (uint64_t i = 0; i < iterations; i++) {
        a += k[0];
        b += k[1];
        a ^= a >> 29;
        b ^= b >> 29;
        a += (a & 0xffffffffULL) * (m[0] & 0xffffffffULL);
        b += (b & 0xffffffffULL) * (m[1] & 0xffffffffULL);
        uint64_t swapped_a = b, swapped_b = a;   /* swap within the lane */
        a ^= swapped_a << 17;
        b ^= swapped_b << 17;
    }
    x[0] = a;
    x[1] = b;
}

#define AVX2_STEP(x, kv, mv)                                        \
    do {                                                            \
        x = _mm256_add_epi64(x, kv);                                \
        x = _mm256_xor_si256(x, _mm256_srli_epi64(x, 29));          \
        x = _mm256_add_epi64(x, _mm256_mul_epu32(x, mv));           \
        x = _mm256_xor_si256(                                       \
            x, _mm256_slli_epi64(_mm256_shuffle_epi32(x, 0x4e), 17)); \
    } while (0)

/* One pass with all 12 accumulators live in ymm registers. The constants
 * are read from memory (L1) each iteration: 12 accumulators plus the
 * temporaries fill the 16 ymm registers. */
__attribute__((target("avx2"), noinline))
static void pass_avx2(struct vector_state *state,
                      const struct vector_state *k,
                      const struct vector_state *m, uint64_t iterations)
{
#define LOAD(i) __m256i x##i = _mm256_loadu_si256( \
        (const __m256i *)&state->words[(i) * WORDS_PER_ACC])
#define KV(i) _mm256_loadu_si256((const __m256i *)&k->words[(i) * WORDS_PER_ACC])
#define MV(i) _mm256_loadu_si256((const __m256i *)&m->words[(i) * WORDS_PER_ACC])
#define STORE(i) _mm256_storeu_si256( \
        (__m256i *)&state->words[(i) * WORDS_PER_ACC], x##i)
    LOAD(0); LOAD(1); LOAD(2); LOAD(3); LOAD(4); LOAD(5);
    LOAD(6); LOAD(7); LOAD(8); LOAD(9); LOAD(10); LOAD(11);
    for (uint64_t i = 0; i < iterations; i++) {
        AVX2_STEP(x0, KV(0), MV(0));
        AVX2_STEP(x1, KV(1), MV(1));
        AVX2_STEP(x2, KV(2), MV(2));
        AVX2_STEP(x3, KV(3), MV(3));
        AVX2_STEP(x4, KV(4), MV(4));
        AVX2_STEP(x5, KV(5), MV(5));
        AVX2_STEP(x6, KV(6), MV(6));
        AVX2_STEP(x7, KV(7), MV(7));
        AVX2_STEP(x8, KV(8), MV(8));
        AVX2_STEP(x9, KV(9), MV(9));
        AVX2_STEP(x10, KV(10), MV(10));
        AVX2_STEP(x11, KV(11), MV(11));
    }
    STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5);
    STORE(6); STORE(7); STORE(8); STORE(9); STORE(10); STORE(11);
#undef LOAD
#undef KV
#undef MV
#undef STORE
}

#define SSE2_STEP(x, kv, mv)                                        \
    do {                                                            \
        x = _mm_add_epi64(x, kv);                                   \
        x = _mm_xor_si128(x, _mm_srli_epi64(x, 29));                \
        x = _mm_add_epi64(x, _mm_mul_epu32(x, mv));                 \
        x = _mm_xor_si128(                                          \
            x, _mm_slli_epi64(_mm_shuffle_epi32(x, 0x4e), 17));     \
    } while (0)

/* The same pass with SSE2 only: the lanes are independent, so the low
 * 128-bit lanes of all 12 accumulators run first (half 0), then the high
 * ones (half 1), 12 xmm accumulators at a time. */
__attribute__((noinline))
static void pass_sse2_half(struct vector_state *state,
                           const struct vector_state *k,
                           const struct vector_state *m, uint64_t iterations,
                           unsigned half)
{
#define WORD(i) ((i) * WORDS_PER_ACC + 2 * half)
#define LOAD(i) __m128i x##i = _mm_loadu_si128( \
        (const __m128i *)&state->words[WORD(i)])
#define KV(i) _mm_loadu_si128((const __m128i *)&k->words[WORD(i)])
#define MV(i) _mm_loadu_si128((const __m128i *)&m->words[WORD(i)])
#define STORE(i) _mm_storeu_si128((__m128i *)&state->words[WORD(i)], x##i)
    LOAD(0); LOAD(1); LOAD(2); LOAD(3); LOAD(4); LOAD(5);
    LOAD(6); LOAD(7); LOAD(8); LOAD(9); LOAD(10); LOAD(11);
    for (uint64_t i = 0; i < iterations; i++) {
        SSE2_STEP(x0, KV(0), MV(0));
        SSE2_STEP(x1, KV(1), MV(1));
        SSE2_STEP(x2, KV(2), MV(2));
        SSE2_STEP(x3, KV(3), MV(3));
        SSE2_STEP(x4, KV(4), MV(4));
        SSE2_STEP(x5, KV(5), MV(5));
        SSE2_STEP(x6, KV(6), MV(6));
        SSE2_STEP(x7, KV(7), MV(7));
        SSE2_STEP(x8, KV(8), MV(8));
        SSE2_STEP(x9, KV(9), MV(9));
        SSE2_STEP(x10, KV(10), MV(10));
        SSE2_STEP(x11, KV(11), MV(11));
    }
    STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5);
    STORE(6); STORE(7); STORE(8); STORE(9); STORE(10); STORE(11);
#undef WORD
#undef LOAD
#undef KV
#undef MV
#undef STORE
}

/* ------------------------------------------------------------------ */
/* FP control state                                                    */
/* ------------------------------------------------------------------ */

static uint64_t double_bits(double d)
{
    uint64_t bits;
    memcpy(&bits, &d, sizeof(bits));
    return bits;
}

static void set_fp_control(void)
{
    _mm_setcsr(MXCSR_WANTED);
    fpu_control_t cw = X87_CW_WANTED;
    _FPU_SETCW(cw);
}

/* Checks the control registers and that they still act; returns a hash. */
static uint64_t check_fp_control(uint64_t round)
{
    unsigned mxcsr = _mm_getcsr() & ~MXCSR_FLAGS;
    if (mxcsr != MXCSR_WANTED)
        tp_selfcheck_fail("round %llu: MXCSR is %#x (flags masked), "
                          "expected %#x", (unsigned long long)round, mxcsr,
                          MXCSR_WANTED);
    fpu_control_t cw;
    _FPU_GETCW(cw);
    if ((cw & 0x0f3f) != (X87_CW_WANTED & 0x0f3f))
        tp_selfcheck_fail("round %llu: x87 control word is %#x, expected "
                          "%#x", (unsigned long long)round, (unsigned)cw,
                          (unsigned)X87_CW_WANTED);

    volatile double one = 1.0, ten = 10.0, tiny = 1e-300, small = 1e-10;
    double tenth = one / ten;
    if (double_bits(tenth) != 0x3fb9999999999999ULL)
        tp_selfcheck_fail("round %llu: 1.0/10.0 is %016llx, expected "
                          "3fb9999999999999 (round toward zero)",
                          (unsigned long long)round,
                          (unsigned long long)double_bits(tenth));
    double flushed = tiny * small;
    if (double_bits(flushed) != 0)
        tp_selfcheck_fail("round %llu: 1e-300*1e-10 is %016llx, expected +0 "
                          "(flush to zero)", (unsigned long long)round,
                          (unsigned long long)double_bits(flushed));
    volatile long double big = 1.0L, tinier = 0x1p-60L;
    long double sum = big + tinier;
    if (sum - big != 0.0L)
        tp_selfcheck_fail("round %llu: (1 + 2^-60) - 1 is not 0 in long "
                          "double (x87 53-bit precision lost)",
                          (unsigned long long)round);
    return tp_hash_mix((uint64_t)mxcsr << 16 | (uint64_t)(cw & 0x0f3f),
                       double_bits(tenth));
}

/* ------------------------------------------------------------------ */

static void fill(struct vector_state *s, uint64_t seed, uint64_t what)
{
    uint64_t rng = tp_mix64(seed ^ what);
    for (size_t i = 0; i < STATE_WORDS; i++)
        s->words[i] = tp_rand(&rng);
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, iters = 200000, seed = 1, sse2 = 0;
    unsigned long long pause_us = 0;
    const struct tp_opt opts[] = {
        { "rounds",   &rounds,   0, 100000000ULL, "number of passes" },
        { "iters",    &iters,    1, 1ULL << 40, "inner-loop iterations per pass" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the state and constants" },
        { "sse2",     &sse2,     0, 1, "1 = use the SSE2 code even with AVX2 (same results)" },
        { "pause-us", &pause_us, 0, 60000000ULL, "pause between passes in microseconds" },
    };
    tp_parse_args(argc, argv,
                  "AVX2 (or SSE2) integer mixing with live vector registers; "
                  "checks lanes against scalar code and the FP control "
                  "registers.",
                  opts, TP_NOPTS(opts));

    __builtin_cpu_init();
    const int use_avx2 = !sse2 && __builtin_cpu_supports("avx2");

    static struct vector_state state, previous, k, m;
    fill(&state, seed, 0x7374617465ULL);
    fill(&k, seed, 0x6b6b6bULL);
    fill(&m, seed, 0x6d6d6dULL);
    set_fp_control();

    /* The instruction set is not printed: stdout must not depend on it. */
    tp_say("vectors: rounds=%llu iters=%llu seed=%llu\n", rounds, iters, seed);
    uint64_t sum = tp_hash_mix(0x766563ULL, check_fp_control(0));
    uint64_t report_every = rounds >= 10 ? rounds / 10 : 1;
    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        previous = state;
        if (use_avx2) {
            pass_avx2(&state, &k, &m, iters);
        } else {
            pass_sse2_half(&state, &k, &m, iters, 0);
            pass_sse2_half(&state, &k, &m, iters, 1);
        }

        /* Scalar check of one lane, a different one each round. */
        uint64_t lane = r % LANES;
        uint64_t expected[2] = { previous.words[2 * lane],
                                 previous.words[2 * lane + 1] };
        lane_scalar(expected, &k.words[2 * lane], &m.words[2 * lane], iters);
        if (expected[0] != state.words[2 * lane] ||
            expected[1] != state.words[2 * lane + 1])
            tp_selfcheck_fail("round %llu: lane %llu is %016llx:%016llx, "
                              "scalar code gives %016llx:%016llx",
                              (unsigned long long)(r + 1),
                              (unsigned long long)lane,
                              (unsigned long long)state.words[2 * lane],
                              (unsigned long long)state.words[2 * lane + 1],
                              (unsigned long long)expected[0],
                              (unsigned long long)expected[1]);
        sum = tp_hash_mix(sum, check_fp_control(r + 1));
        uint64_t h = tp_mix64(tp_hash_words(r, state.words, STATE_WORDS));
        sum = tp_hash_mix(sum, h);
        if ((r + 1) % report_every == 0)
            tp_say("round %llu/%llu state=%016llx\n",
                   (unsigned long long)(r + 1), rounds,
                   (unsigned long long)h);
        if (pause_us != 0 && r + 1 < rounds)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    tp_finish(sum);
}
