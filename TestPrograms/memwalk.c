/*
 * memwalk - anonymous private memory that must survive migration byte-exact.
 *
 * Maps --mib MiB of anonymous private memory, fills every 4 KiB page with
 * data that is a pure function of (seed, page index, page version), then
 * performs --steps random steps: pick a page, check it still holds exactly
 * the data for its current version, bump the version and rewrite it.
 * Every --batch steps it sleeps --pause-us microseconds, so a migrator can
 * freeze it mid-walk. At the end every page is verified once more and the
 * checksum is a hash over all page contents and versions.
 */
#include "common.h"

#include <sys/mman.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / sizeof(uint64_t))

static uint64_t g_seed;

/* Per-(page, version) key; each word is then a counter-mode splitmix value,
 * so words are independent of each other and generate with good ILP. */
static inline uint64_t page_key(uint64_t idx, uint64_t ver)
{
    uint64_t k = tp_mix64(g_seed ^ 0x6d656d77616c6b31ULL);
    k ^= tp_mix64(idx * 0xd1b54a32d192ed03ULL + 0x1234567ULL);
    k ^= tp_mix64(ver * 0x8cb92ba72f3d8dd7ULL + 0x89abcdefULL);
    return tp_mix64(k);
}

static inline uint64_t page_word(uint64_t key, size_t i)
{
    return tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
}

static void page_write(uint64_t *page, uint64_t idx, uint64_t ver)
{
    uint64_t key = page_key(idx, ver);
    for (size_t i = 0; i < PAGE_WORDS; i++)
        page[i] = page_word(key, i);
}

/* Returns the first mismatching word index, or -1 if the page is intact. */
static long page_check(const uint64_t *page, uint64_t idx, uint64_t ver)
{
    uint64_t key = page_key(idx, ver);
    uint64_t diff = 0;
    for (size_t i = 0; i < PAGE_WORDS; i++)
        diff |= page[i] ^ page_word(key, i);
    if (diff == 0)
        return -1;
    for (size_t i = 0; i < PAGE_WORDS; i++)
        if (page[i] != page_word(key, i))
            return (long)i;
    return -1; /* not reached unless memory changes under us */
}

static void fail_page(const char *when, const uint64_t *page, uint64_t idx,
                      uint64_t ver, long word)
{
    uint64_t key = page_key(idx, ver);
    tp_selfcheck_fail("%s: page %llu (version %llu) word %ld is %016llx, "
                      "expected %016llx",
                      when, (unsigned long long)idx, (unsigned long long)ver,
                      word, (unsigned long long)page[word],
                      (unsigned long long)page_word(key, (size_t)word));
}

int main(int argc, char **argv)
{
    unsigned long long mib = 4, seed = 1, steps = 20000, batch = 500;
    unsigned long long pause_us = 1000, verbose = 0, report_ms = 0;
    const struct tp_opt opts[] = {
        { "mib",      &mib,      1, 1ULL << 20, "MiB of anonymous memory to map" },
        { "seed",     &seed,     0, UINT64_MAX, "PRNG seed (page data and walk order)" },
        { "steps",    &steps,    0, 1ULL << 40, "random verify+rewrite steps" },
        { "batch",    &batch,    1, UINT64_MAX, "steps between pacing pauses" },
        { "pause-us", &pause_us, 0, 60000000ULL, "pacing pause in microseconds" },
        { "verbose",  &verbose,  0, 1, "1 = phase timings on stderr" },
        { "report-ms", &report_ms, 0, 3600000ULL,
          "progress on stderr every this many ms (CLOCK_MONOTONIC seconds and steps done); 0 = never" },
    };
    tp_parse_args(argc, argv,
                  "Random page walk over anonymous memory; verifies every page "
                  "against its seeded content.",
                  opts, TP_NOPTS(opts));
    g_seed = seed;

    const uint64_t npages = (uint64_t)mib * (1024 * 1024 / PAGE_BYTES);
    const size_t bytes = (size_t)npages * PAGE_BYTES;

    tp_say("memwalk: mib=%llu pages=%llu seed=%llu steps=%llu batch=%llu\n",
           mib, (unsigned long long)npages, seed, steps, batch);

    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        tp_syserr("mmap %llu MiB", mib);
    uint64_t *ver = calloc(npages, sizeof(*ver));
    if (ver == NULL)
        tp_syserr("calloc versions");

    /* Fill. */
    double t0 = tp_now();
    for (uint64_t p = 0; p < npages; p++)
        page_write(mem + p * PAGE_WORDS, p, 0);
    double t1 = tp_now();
    if (verbose)
        fprintf(stderr, "memwalk: fill %llu MiB: %.3f s\n", mib, t1 - t0);
    tp_say("fill done\n");

    /* Walk. */
    uint64_t rng = tp_mix64(seed ^ 0x77616c6b6572ULL);
    uint64_t report_every = steps >= 10 ? steps / 10 : 1;
    double last_progress = tp_now();
    for (uint64_t s = 0; s < steps; s++) {
        tp_rendezvous(s + 1);
        uint64_t p = tp_rand_below(&rng, npages);
        uint64_t *page = mem + p * PAGE_WORDS;
        long bad = page_check(page, p, ver[p]);
        if (bad >= 0)
            fail_page("walk", page, p, ver[p], bad);
        ver[p]++;
        page_write(page, p, ver[p]);

        if ((s + 1) % report_every == 0)
            tp_say("step %llu/%llu\n", (unsigned long long)(s + 1), steps);
        /* The clock is read every 256 steps only (a step is about a microsecond). */
        if (report_ms != 0 && (s & 255) == 255) {
            double now = tp_now();
            if (now - last_progress >= (double)report_ms / 1000.0) {
                fprintf(stderr, "memwalk: progress %.6f %llu\n", now,
                        (unsigned long long)(s + 1));
                last_progress = now;
            }
        }
        if ((s + 1) % batch == 0 && s + 1 < steps)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    double t2 = tp_now();
    if (verbose)
        fprintf(stderr, "memwalk: walk %llu steps: %.3f s\n", steps, t2 - t1);

    /* Final verification and checksum over contents and versions. */
    uint64_t h = tp_hash_mix(0x6d656d77616c6bULL, npages);
    uint64_t touched = 0;
    for (uint64_t p = 0; p < npages; p++) {
        const uint64_t *page = mem + p * PAGE_WORDS;
        long bad = page_check(page, p, ver[p]);
        if (bad >= 0)
            fail_page("final", page, p, ver[p], bad);
        if (ver[p] != 0)
            touched++;
        h = tp_hash_word(h, ver[p]);
        h = tp_hash_words(h, page, PAGE_WORDS);
    }
    uint64_t vsum = 0;
    for (uint64_t p = 0; p < npages; p++)
        vsum += ver[p];
    if (vsum != steps)
        tp_selfcheck_fail("sum of page versions %llu != steps %llu",
                          (unsigned long long)vsum, steps);
    if (verbose)
        fprintf(stderr, "memwalk: verify: %.3f s\n", tp_now() - t2);

    h = tp_hash_mix(h, steps);
    tp_say("verified pages=%llu touched=%llu\n",
           (unsigned long long)npages, (unsigned long long)touched);

    munmap(mem, bytes);
    free(ver);
    tp_finish(h);
}
