/*
 * sparse - a huge, almost empty anonymous mapping.
 *
 * Reserves --reserve-gib GiB of anonymous private memory with MAP_NORESERVE
 * (and MADV_NOHUGEPAGE, so a touched page costs 4 KiB, not 2 MiB, whatever
 * the THP setting) and touches --pages distinct pages spread over it, drawn
 * from the seed. Each touched page holds data that is a pure function of
 * (seed, page index, version). Then it takes --steps random steps, like
 * memwalk: pick a touched page, check it, bump its version, rewrite it;
 * every --batch steps it pauses --pause-us microseconds. At the end it
 * checks every touched page and that 64 seeded untouched pages read as
 * zeros (only then, so they are never touched before).
 *
 * The checksum covers page indices, versions and contents; never an
 * address.
 */
#include "common.h"

#include <sys/mman.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / sizeof(uint64_t))
#define UNTOUCHED_CHECKS 64u

static uint64_t g_seed;

static uint64_t page_key(uint64_t page_index, uint64_t version)
{
    uint64_t k = tp_mix64(g_seed ^ 0x7370617273ULL);
    k ^= tp_mix64(page_index * 0xd1b54a32d192ed03ULL + 0x55);
    return tp_mix64(k ^ tp_mix64(version * 0x8cb92ba72f3d8dd7ULL + 0x66));
}

static void page_write(uint64_t *page, uint64_t key)
{
    for (size_t i = 0; i < PAGE_WORDS; i++)
        page[i] = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
}

static void page_check(const uint64_t *page, uint64_t page_index,
                       uint64_t version, const char *when)
{
    uint64_t key = page_key(page_index, version);
    for (size_t i = 0; i < PAGE_WORDS; i++) {
        uint64_t want = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
        if (page[i] != want)
            tp_selfcheck_fail("%s: page %llu (version %llu) word %zu is "
                              "%016llx, expected %016llx", when,
                              (unsigned long long)page_index,
                              (unsigned long long)version, i,
                              (unsigned long long)page[i],
                              (unsigned long long)want);
    }
}

/* Open-addressing set of page indices (stored + 1, so 0 = empty). */
struct page_set {
    uint64_t *slots;
    uint64_t mask;
};

static int set_insert(struct page_set *set, uint64_t page_index)
{
    uint64_t i = tp_mix64(page_index) & set->mask;
    while (set->slots[i] != 0) {
        if (set->slots[i] == page_index + 1)
            return 0;
        i = (i + 1) & set->mask;
    }
    set->slots[i] = page_index + 1;
    return 1;
}

static int set_contains(const struct page_set *set, uint64_t page_index)
{
    uint64_t i = tp_mix64(page_index) & set->mask;
    while (set->slots[i] != 0) {
        if (set->slots[i] == page_index + 1)
            return 1;
        i = (i + 1) & set->mask;
    }
    return 0;
}

int main(int argc, char **argv)
{
    unsigned long long reserve_gib = 32, pages = 4000, steps = 40000;
    unsigned long long batch = 1000, pause_us = 2000, seed = 1;
    const struct tp_opt opts[] = {
        { "reserve-gib", &reserve_gib, 1, 65536, "GiB of address space to reserve (MAP_NORESERVE)" },
        { "pages",       &pages,       1, 10000000ULL, "distinct pages to touch" },
        { "steps",       &steps,       0, 1ULL << 40, "random verify+rewrite steps" },
        { "batch",       &batch,       1, UINT64_MAX, "steps between pacing pauses" },
        { "pause-us",    &pause_us,    0, 60000000ULL, "pacing pause in microseconds" },
        { "seed",        &seed,        0, UINT64_MAX, "seed of the page choice, walk and data" },
    };
    tp_parse_args(argc, argv,
                  "A huge MAP_NORESERVE mapping with a few thousand seeded "
                  "pages touched and rewritten.",
                  opts, TP_NOPTS(opts));
    g_seed = seed;

    const uint64_t reserve_pages = reserve_gib * (1024ULL * 1024 * 1024 /
                                                  PAGE_BYTES);
    if (pages + UNTOUCHED_CHECKS > reserve_pages / 2)
        tp_usage_error("--pages %llu is too many for %llu GiB (at most half "
                       "the pages, less %u)", pages, reserve_gib,
                       UNTOUCHED_CHECKS);
    const size_t reserve_bytes = (size_t)reserve_pages * PAGE_BYTES;

    tp_say("sparse: reserve-gib=%llu pages=%llu steps=%llu seed=%llu\n",
           reserve_gib, pages, steps, seed);

    unsigned char *base = mmap(NULL, reserve_bytes, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                               -1, 0);
    if (base == MAP_FAILED)
        tp_syserr("mmap %llu GiB MAP_NORESERVE", reserve_gib);
    if (madvise(base, reserve_bytes, MADV_NOHUGEPAGE) != 0)
        tp_syserr("madvise(MADV_NOHUGEPAGE)");

    uint64_t set_slots = 1;
    while (set_slots < 2 * (pages + UNTOUCHED_CHECKS))
        set_slots <<= 1;
    struct page_set set = { calloc(set_slots, sizeof(uint64_t)),
                            set_slots - 1 };
    uint64_t *page_index = malloc(pages * sizeof(uint64_t));
    uint64_t *version = calloc(pages, sizeof(uint64_t));
    if (set.slots == NULL || page_index == NULL || version == NULL)
        tp_syserr("allocating the page tables");

    uint64_t rng = tp_mix64(seed ^ 0x746f756368ULL);
    for (uint64_t j = 0; j < pages; j++) {
        uint64_t p;
        do
            p = tp_rand_below(&rng, reserve_pages);
        while (!set_insert(&set, p));
        page_index[j] = p;
        page_write((uint64_t *)(base + p * PAGE_BYTES), page_key(p, 0));
    }
    tp_say("touched %llu pages\n", pages);

    uint64_t report_every = steps >= 10 ? steps / 10 : 1;
    for (uint64_t s = 0; s < steps; s++) {
        tp_rendezvous(s + 1);
        uint64_t j = tp_rand_below(&rng, pages);
        uint64_t *page = (uint64_t *)(base + page_index[j] * PAGE_BYTES);
        page_check(page, page_index[j], version[j], "walk");
        version[j]++;
        page_write(page, page_key(page_index[j], version[j]));
        if ((s + 1) % report_every == 0)
            tp_say("step %llu/%llu\n", (unsigned long long)(s + 1), steps);
        if ((s + 1) % batch == 0 && s + 1 < steps)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    uint64_t sum = tp_hash_mix(0x737061727365ULL, reserve_pages);
    uint64_t version_sum = 0;
    for (uint64_t j = 0; j < pages; j++) {
        const uint64_t *page = (const uint64_t *)(base + page_index[j] *
                                                  PAGE_BYTES);
        page_check(page, page_index[j], version[j], "final");
        sum = tp_hash_mix(sum, page_index[j]);
        sum = tp_hash_mix(sum, version[j]);
        sum = tp_hash_words(sum, page, PAGE_WORDS);
        version_sum += version[j];
    }
    if (version_sum != steps)
        tp_selfcheck_fail("sum of page versions %llu != steps %llu",
                          (unsigned long long)version_sum, steps);
    for (uint64_t k = 0; k < UNTOUCHED_CHECKS; k++) {
        uint64_t p;
        do
            p = tp_rand_below(&rng, reserve_pages);
        while (set_contains(&set, p));
        const uint64_t *page = (const uint64_t *)(base + p * PAGE_BYTES);
        for (size_t i = 0; i < PAGE_WORDS; i++)
            if (page[i] != 0)
                tp_selfcheck_fail("untouched page %llu word %zu is %016llx, "
                                  "expected zero", (unsigned long long)p, i,
                                  (unsigned long long)page[i]);
        sum = tp_hash_mix(sum, p);
    }
    tp_say("verified pages=%llu untouched-zero=%u\n", pages,
           UNTOUCHED_CHECKS);
    munmap(base, reserve_bytes);
    free(set.slots);
    free(page_index);
    free(version);
    tp_finish(sum);
}
