/*
 * heapchurn - the malloc heap and the program break, moving under churn.
 *
 * Keeps a table of --slots heap blocks. Each round makes --ops random
 * operations (seeded): an empty slot gets a malloc of a random size (1 B to
 * 256 KiB, mostly small, a few large enough for glibc to mmap); a full slot
 * is freed, realloc'd to a new size or rewritten. Every block holds data
 * that is a pure function of (seed, slot, version), and it is checked
 * before every free, realloc and rewrite (realloc: the kept prefix) and at
 * the end. Rounds come in phases of 20: ten that mostly allocate, so the
 * heap and the break grow, then ten that mostly free, so free() trims the
 * break; the last round of a phase also calls malloc_trim(0), which gives
 * back free pages inside the heap too.
 *
 * Each round then moves the break itself: sbrk() up by a random number of
 * pages in two steps, fills the new memory, pauses --pause-us with it in
 * place, checks it, and sbrk() back down in two steps (checking the rest
 * between them) to exactly where the round found it. No malloc or stdio
 * call happens while the break is moved, so malloc never sees it.
 *
 * The checksum covers the block contents, sizes and versions and the sbrk
 * data; never an address. --verbose 1 prints on stderr where the break
 * stands at the end of each half phase.
 */
#include "common.h"

#include <malloc.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PHASE_ROUNDS 20u

struct slot {
    unsigned char *data;   /* NULL = empty */
    size_t size_bytes;
    uint64_t version;
};

static uint64_t g_seed;

static uint64_t block_key(uint64_t slot, uint64_t version)
{
    uint64_t k = tp_mix64(g_seed ^ 0x68656170636875ULL);
    k ^= tp_mix64(slot * 0xd1b54a32d192ed03ULL + 0x51);
    k ^= tp_mix64(version * 0x8cb92ba72f3d8dd7ULL + 0x7e);
    return tp_mix64(k);
}

static inline uint64_t block_word(uint64_t key, size_t word_index)
{
    return tp_mix64(key + (uint64_t)(word_index + 1) * TP_GOLDEN);
}

/* Byte i of the content is byte (i % 8) of word (i / 8), little endian. */
static void fill_bytes(unsigned char *data, size_t size_bytes, uint64_t key)
{
    size_t words = size_bytes / 8;
    for (size_t w = 0; w < words; w++) {
        uint64_t v = block_word(key, w);
        memcpy(data + w * 8, &v, 8);
    }
    if (size_bytes % 8 != 0) {
        uint64_t v = block_word(key, words);
        memcpy(data + words * 8, &v, size_bytes % 8);
    }
}

/* Returns the first byte offset that differs, or -1. */
static long check_bytes(const unsigned char *data, size_t size_bytes,
                        uint64_t key)
{
    size_t words = size_bytes / 8;
    for (size_t w = 0; w < words; w++) {
        uint64_t v;
        memcpy(&v, data + w * 8, 8);
        if (v != block_word(key, w)) {
            uint64_t want = block_word(key, w);
            for (size_t b = 0; b < 8; b++)
                if (data[w * 8 + b] != (unsigned char)(want >> (8 * b)))
                    return (long)(w * 8 + b);
        }
    }
    if (size_bytes % 8 != 0) {
        uint64_t want = block_word(key, words);
        for (size_t b = 0; b < size_bytes % 8; b++)
            if (data[words * 8 + b] != (unsigned char)(want >> (8 * b)))
                return (long)(words * 8 + b);
    }
    return -1;
}

static uint64_t hash_bytes(uint64_t h, const unsigned char *data,
                           size_t size_bytes)
{
    size_t words = size_bytes / 8;
    for (size_t w = 0; w < words; w++) {
        uint64_t v;
        memcpy(&v, data + w * 8, 8);
        h = tp_hash_word(h, v);
    }
    uint64_t tail = 0;
    memcpy(&tail, data + words * 8, size_bytes % 8);
    return tp_hash_word(h, tail ^ size_bytes);
}

static void verify_slot(const struct slot *s, uint64_t slot_index,
                        size_t size_bytes, uint64_t round, const char *when)
{
    long bad = check_bytes(s->data, size_bytes, block_key(slot_index,
                                                          s->version));
    if (bad >= 0)
        tp_selfcheck_fail("round %llu (%s): slot %llu (version %llu, %zu "
                          "bytes) differs at byte %ld",
                          (unsigned long long)round, when,
                          (unsigned long long)slot_index,
                          (unsigned long long)s->version, s->size_bytes, bad);
}

/* Mostly small blocks; 2% are 64-256 KiB, where glibc may use mmap. */
static size_t pick_size(uint64_t *rng)
{
    uint64_t c = tp_rand_below(rng, 100);
    if (c < 60)
        return 1 + (size_t)tp_rand_below(rng, 256);
    if (c < 90)
        return 257 + (size_t)tp_rand_below(rng, 4096 - 256);
    if (c < 98)
        return 4097 + (size_t)tp_rand_below(rng, 65536 - 4096);
    return 65537 + (size_t)tp_rand_below(rng, 262144 - 65536);
}

static uintptr_t current_break(void)
{
    void *b = sbrk(0);
    if (b == (void *)-1)
        tp_syserr("sbrk(0)");
    return (uintptr_t)b;
}

static unsigned char *move_break(intptr_t delta_bytes)
{
    void *old = sbrk(delta_bytes);
    if (old == (void *)-1)
        tp_syserr("sbrk(%ld)", (long)delta_bytes);
    return old;
}

/* One round's excursion of the break: up in two steps, pause, down in two
 * steps. Returns a hash of the data it kept there. */
static uint64_t sbrk_excursion(uint64_t round, uint64_t *rng,
                               uint64_t max_pages, uint64_t pause_us)
{
    uint64_t first_pages = 1 + tp_rand_below(rng, max_pages);
    uint64_t second_pages = 1 + tp_rand_below(rng, max_pages);
    size_t first_bytes = (size_t)first_pages * PAGE_BYTES;
    size_t second_bytes = (size_t)second_pages * PAGE_BYTES;
    uint64_t first_key = block_key(0x5b5b0000ULL + round, 1);
    uint64_t second_key = block_key(0x5b5b0000ULL + round, 2);

    uintptr_t start = current_break();
    unsigned char *first = move_break((intptr_t)first_bytes);
    if ((uintptr_t)first != start)
        tp_selfcheck_fail("round %llu: sbrk returned a break that is not the "
                          "current one", (unsigned long long)round);
    fill_bytes(first, first_bytes, first_key);
    unsigned char *second = move_break((intptr_t)second_bytes);
    if (second != first + first_bytes)
        tp_selfcheck_fail("round %llu: second sbrk step is not contiguous",
                          (unsigned long long)round);
    fill_bytes(second, second_bytes, second_key);

    /* The pause happens with both steps in place. */
    tp_nanosleep_ns(pause_us * 1000ULL);

    long bad = check_bytes(second, second_bytes, second_key);
    if (bad >= 0)
        tp_selfcheck_fail("round %llu: sbrk step 2 (%llu pages) differs at "
                          "byte %ld", (unsigned long long)round,
                          (unsigned long long)second_pages, bad);
    uint64_t h = hash_bytes(tp_hash_mix(0x7362726bULL, round), second,
                            second_bytes);
    move_break(-(intptr_t)second_bytes);
    bad = check_bytes(first, first_bytes, first_key);
    if (bad >= 0)
        tp_selfcheck_fail("round %llu: sbrk step 1 (%llu pages) differs at "
                          "byte %ld after shrinking step 2",
                          (unsigned long long)round,
                          (unsigned long long)first_pages, bad);
    h = hash_bytes(h, first, first_bytes);
    move_break(-(intptr_t)first_bytes);
    if (current_break() != start)
        tp_selfcheck_fail("round %llu: the break did not come back to where "
                          "the round found it", (unsigned long long)round);
    return tp_hash_mix(h, first_pages * 1000003ULL + second_pages);
}

int main(int argc, char **argv)
{
    unsigned long long seed = 1, rounds = 200, slots = 512, ops = 400;
    unsigned long long sbrk_kib = 256, pause_us = 2000, verbose = 0;
    const struct tp_opt opts[] = {
        { "seed",     &seed,     0, UINT64_MAX, "PRNG seed (sizes, operations, contents)" },
        { "rounds",   &rounds,   0, 100000000ULL, "rounds of churn + sbrk excursion" },
        { "slots",    &slots,    1, 1000000ULL, "heap block slots" },
        { "ops",      &ops,      0, 100000000ULL, "malloc/free/realloc/rewrite operations per round" },
        { "sbrk-kib", &sbrk_kib, 4, 1048576ULL, "largest sbrk step in KiB (two steps per round)" },
        { "pause-us", &pause_us, 0, 60000000ULL, "pause per round in microseconds, with the sbrk memory in place" },
        { "verbose",  &verbose,  0, 1, "1 = how far the break moved, on stderr" },
    };
    tp_parse_args(argc, argv,
                  "malloc/free/realloc churn with seeded sizes and a break "
                  "that grows and shrinks; every block is checked.",
                  opts, TP_NOPTS(opts));
    g_seed = seed;

    struct slot *table = calloc((size_t)slots, sizeof(*table));
    if (table == NULL)
        tp_syserr("calloc %llu slots", slots);
    tp_say("heapchurn: seed=%llu rounds=%llu slots=%llu ops=%llu "
           "sbrk-kib=%llu\n", seed, rounds, slots, ops, sbrk_kib);

    const uint64_t max_sbrk_pages = sbrk_kib / 4;
    const uintptr_t first_break = current_break();
    uintptr_t lowest_break = first_break, highest_break = first_break;
    uint64_t rng = tp_mix64(seed ^ 0x636875726eULL);
    uint64_t allocs = 0, frees = 0, reallocs = 0, rewrites = 0;
    uint64_t live = 0, live_bytes = 0;
    uint64_t sum = tp_hash_mix(0x68656170ULL, slots);
    uint64_t report_every = rounds >= 10 ? rounds / 10 : 1;

    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        const int growing = (r % PHASE_ROUNDS) < PHASE_ROUNDS / 2;
        for (uint64_t k = 0; k < ops; k++) {
            uint64_t i = tp_rand_below(&rng, slots);
            struct slot *s = &table[i];
            uint64_t c = tp_rand_below(&rng, 100);
            if (s->data == NULL) {
                if (!growing && c >= 30)
                    continue;               /* shrinking: allocate less */
                size_t size = pick_size(&rng);
                s->data = malloc(size);
                if (s->data == NULL)
                    tp_syserr("malloc(%zu)", size);
                s->size_bytes = size;
                s->version++;
                fill_bytes(s->data, size, block_key(i, s->version));
                allocs++;
                live++;
                live_bytes += size;
            } else if (c < (growing ? 20u : 70u)) {
                verify_slot(s, i, s->size_bytes, r + 1, "before free");
                free(s->data);
                s->data = NULL;
                frees++;
                live--;
                live_bytes -= s->size_bytes;
                s->size_bytes = 0;
            } else if (c < (growing ? 60u : 85u)) {
                verify_slot(s, i, s->size_bytes, r + 1, "before realloc");
                size_t size = pick_size(&rng);
                size_t kept = size < s->size_bytes ? size : s->size_bytes;
                unsigned char *moved = realloc(s->data, size);
                if (moved == NULL)
                    tp_syserr("realloc(%zu)", size);
                s->data = moved;
                verify_slot(s, i, kept, r + 1, "kept by realloc");
                live_bytes = live_bytes - s->size_bytes + size;
                s->size_bytes = size;
                s->version++;
                fill_bytes(s->data, size, block_key(i, s->version));
                reallocs++;
            } else {
                verify_slot(s, i, s->size_bytes, r + 1, "before rewrite");
                s->version++;
                fill_bytes(s->data, s->size_bytes, block_key(i, s->version));
                rewrites++;
            }
        }
        if (r % PHASE_ROUNDS == PHASE_ROUNDS - 1)
            malloc_trim(0);

        uintptr_t now = current_break();
        if (now < lowest_break)
            lowest_break = now;
        if (now > highest_break)
            highest_break = now;
        if (verbose && (r % (PHASE_ROUNDS / 2)) == PHASE_ROUNDS / 2 - 1)
            fprintf(stderr, "heapchurn: round %llu (end of a %s half): "
                            "break %+ld KiB from its start, %llu live\n",
                    (unsigned long long)(r + 1),
                    growing ? "growing" : "shrinking",
                    (long)(now - first_break) / 1024,
                    (unsigned long long)live);

        sum = tp_hash_mix(sum, sbrk_excursion(r + 1, &rng, max_sbrk_pages,
                                              pause_us));
        sum = tp_hash_mix(sum, live * 0x100000000ULL + (uint64_t)growing);
        sum = tp_hash_mix(sum, live_bytes);

        if ((r + 1) % report_every == 0)
            tp_say("round %llu/%llu live=%llu bytes=%llu allocs=%llu "
                   "frees=%llu reallocs=%llu rewrites=%llu\n",
                   (unsigned long long)(r + 1), rounds,
                   (unsigned long long)live, (unsigned long long)live_bytes,
                   (unsigned long long)allocs, (unsigned long long)frees,
                   (unsigned long long)reallocs,
                   (unsigned long long)rewrites);
    }

    /* Final check: every live block, then free them all (checked). */
    uint64_t counted = 0, counted_bytes = 0;
    for (uint64_t i = 0; i < slots; i++) {
        struct slot *s = &table[i];
        sum = tp_hash_mix(sum, s->version);
        if (s->data == NULL)
            continue;
        verify_slot(s, i, s->size_bytes, rounds, "final");
        sum = hash_bytes(tp_hash_mix(sum, i), s->data, s->size_bytes);
        counted++;
        counted_bytes += s->size_bytes;
    }
    if (counted != live || counted_bytes != live_bytes)
        tp_selfcheck_fail("final: %llu live blocks of %llu bytes, counted "
                          "%llu of %llu", (unsigned long long)live,
                          (unsigned long long)live_bytes,
                          (unsigned long long)counted,
                          (unsigned long long)counted_bytes);
    if (allocs - frees != live)
        tp_selfcheck_fail("final: allocs %llu - frees %llu != live %llu",
                          (unsigned long long)allocs,
                          (unsigned long long)frees, (unsigned long long)live);
    for (uint64_t i = 0; i < slots; i++)
        free(table[i].data);
    free(table);
    malloc_trim(0);

    if (verbose)
        fprintf(stderr, "heapchurn: break moved from %+ld KiB to %+ld KiB "
                        "around its start (end of rounds)\n",
                (long)(lowest_break - first_break) / 1024,
                (long)(highest_break - first_break) / 1024);
    tp_say("verified live=%llu bytes=%llu\n", (unsigned long long)live,
           (unsigned long long)live_bytes);
    sum = tp_hash_mix(sum, allocs);
    sum = tp_hash_mix(sum, frees);
    sum = tp_hash_mix(sum, reallocs);
    tp_finish(tp_hash_mix(sum, rewrites));
}
