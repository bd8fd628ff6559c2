/*
 * deepstack - a main-thread stack several MiB deep.
 *
 * Each round recurses through a non-inlined function whose frame holds a
 * FRAME_WORDS-word array filled with data that is a pure function of
 * (seed, round, level). The round's depth is drawn from the seed between
 * 3/4 and all of --depth-kib (counting only the arrays; the real frames are
 * a little larger). At the deepest point the program pauses --pause-us
 * microseconds, so a freeze at any time most likely finds the stack at full
 * depth; on the way back every frame checks its array and that the array
 * is still at the address it had when it was filled (the stack must come
 * back at the same place), and folds it into the round's hash.
 *
 * The soft RLIMIT_STACK must cover the depth: when --depth-kib needs more
 * than the soft limit allows, the program raises it with setrlimit at
 * start-up (up to the hard limit; else it exits with 3). With the default
 * 4096 KiB the default 8 MiB limit is enough and nothing is changed.
 *
 * With --rendezvous N the wait happens at the deepest point of round N,
 * right before its pause, so the freeze sees the deep stack.
 */
#include "common.h"

#include <sys/resource.h>

#define FRAME_WORDS 120u   /* 960 bytes of data per frame */

static uint64_t g_seed;
static uint64_t g_pause_us;

static inline uint64_t frame_word(uint64_t key, size_t word_index)
{
    return tp_mix64(key + (uint64_t)(word_index + 1) * TP_GOLDEN);
}

static uint64_t frame_key(uint64_t round, uint64_t level)
{
    uint64_t k = tp_mix64(g_seed ^ 0x64656570ULL);
    k ^= tp_mix64(round * 0xd1b54a32d192ed03ULL + 0x11);
    return tp_mix64(k ^ tp_mix64(level * 0x8cb92ba72f3d8dd7ULL + 0x22));
}

/*
 * Level `level` of round `round`, counting down to 0. noinline and the
 * work after the call keep it a real recursion (no tail call, no loop);
 * the volatile array keeps every frame's data in memory.
 */
__attribute__((noinline))
static uint64_t descend(uint64_t round, uint64_t level)
{
    volatile uint64_t frame[FRAME_WORDS];
    const uint64_t key = frame_key(round, level);
    for (size_t i = 0; i < FRAME_WORDS - 1; i++)
        frame[i] = frame_word(key, i);
    /* The last word holds the array's own address: checked, never hashed. */
    frame[FRAME_WORDS - 1] = (uint64_t)(uintptr_t)frame;

    uint64_t below;
    if (level == 0) {
        tp_rendezvous(round);
        tp_nanosleep_ns(g_pause_us * 1000ULL);
        below = tp_mix64(round);
    } else {
        below = descend(round, level - 1);
    }

    uint64_t h = tp_hash_mix(below, level);
    for (size_t i = 0; i < FRAME_WORDS - 1; i++) {
        uint64_t v = frame[i];
        if (v != frame_word(key, i))
            tp_selfcheck_fail("round %llu level %llu: frame word %zu is "
                              "%016llx, expected %016llx",
                              (unsigned long long)round,
                              (unsigned long long)level, i,
                              (unsigned long long)v,
                              (unsigned long long)frame_word(key, i));
        h = tp_hash_word(h, v);
    }
    if (frame[FRAME_WORDS - 1] != (uint64_t)(uintptr_t)frame)
        tp_selfcheck_fail("round %llu level %llu: the frame moved or its "
                          "address word changed",
                          (unsigned long long)round,
                          (unsigned long long)level);
    return h;
}

/* Makes sure the soft stack limit covers `need_bytes`. */
static void ensure_stack_limit(uint64_t need_bytes)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_STACK, &rl) != 0)
        tp_syserr("getrlimit(RLIMIT_STACK)");
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need_bytes)
        return;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need_bytes) {
        errno = ERANGE;
        tp_syserr("the hard RLIMIT_STACK (%llu bytes) is below the %llu "
                  "bytes --depth-kib needs",
                  (unsigned long long)rl.rlim_max,
                  (unsigned long long)need_bytes);
    }
    rl.rlim_cur = need_bytes;
    if (setrlimit(RLIMIT_STACK, &rl) != 0)
        tp_syserr("setrlimit(RLIMIT_STACK, %llu)",
                  (unsigned long long)need_bytes);
}

int main(int argc, char **argv)
{
    unsigned long long depth_kib = 4096, rounds = 16, pause_us = 20000;
    unsigned long long seed = 1;
    const struct tp_opt opts[] = {
        { "depth-kib", &depth_kib, 4, 65536, "deepest recursion, in KiB of frame arrays" },
        { "rounds",    &rounds,    0, 100000000ULL, "number of recursions" },
        { "pause-us",  &pause_us,  0, 60000000ULL, "pause at the deepest point, in microseconds" },
        { "seed",      &seed,      0, UINT64_MAX, "seed of the depths and frame contents" },
    };
    tp_parse_args(argc, argv,
                  "Deep recursion with seeded frames, checked on the way "
                  "back; pauses at the deepest point.",
                  opts, TP_NOPTS(opts));
    g_seed = seed;
    g_pause_us = pause_us;

    const uint64_t frame_bytes = FRAME_WORDS * sizeof(uint64_t);
    const uint64_t max_levels = depth_kib * 1024 / frame_bytes;
    /* A real frame is the array plus saved registers and the return
     * address; allow half again, plus 1 MiB for everything else. */
    ensure_stack_limit(depth_kib * 1024 * 3 / 2 + (1u << 20));

    tp_say("deepstack: depth-kib=%llu levels<=%llu rounds=%llu seed=%llu\n",
           depth_kib, (unsigned long long)max_levels, rounds, seed);

    uint64_t rng = tp_mix64(seed ^ 0x737461636bULL);
    uint64_t sum = tp_hash_mix(0x64656570ULL, max_levels);
    for (uint64_t r = 0; r < rounds; r++) {
        /* The rendezvous for this round is at its deepest point. */
        uint64_t levels = max_levels - tp_rand_below(&rng, max_levels / 4 + 1);
        if (levels == 0)
            levels = 1;
        uint64_t h = descend(r + 1, levels - 1);
        sum = tp_hash_mix(sum, h);
        tp_say("round %llu/%llu levels=%llu hash=%016llx\n",
               (unsigned long long)(r + 1), rounds,
               (unsigned long long)levels, (unsigned long long)h);
    }
    tp_finish(sum);
}
