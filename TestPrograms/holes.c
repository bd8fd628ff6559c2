/*
 * holes - a mapping layout full of protections, holes and moved memory.
 *
 * Two areas, both anonymous and private:
 *
 * The region: --pages pages. Its first and last pages are PROT_NONE guard
 * pages for the whole run. Every other page is in one of four states: RW,
 * RO (PROT_READ), NONE (PROT_NONE, its data kept) or HOLE (munmapped). A
 * mapped page holds data that is a pure function of (seed, page, version).
 *
 * The mover: a mapping of 1..--mover-pages pages that lives in one half of
 * a landing zone (two halves of --mover-pages pages, reserved PROT_NONE).
 * It moves to the other half with mremap(MREMAP_MAYMOVE|MREMAP_FIXED),
 * growing or shrinking on the way, and also grows in place (after
 * unmapping the reservation behind it) and shrinks in place; whatever it
 * leaves is reserved PROT_NONE again.
 *
 * Each step makes one seeded operation on a run of 1..8 region pages (to
 * RO, to RW with new data, to NONE, munmap, map the holes again) or on the
 * mover (move, grow, shrink), then checks everything: RW and RO pages hold
 * their data (a page coming back from NONE must still hold its old data,
 * a page mapped into a hole must read as zeros first), and a probe of every
 * page that must fault does fault, at the probed address and with the
 * right si_code: read of NONE and guard pages and of the landing zone
 * reservation SEGV_ACCERR, read of a hole SEGV_MAPERR, write of an RO page
 * SEGV_ACCERR. The probes catch SIGSEGV in a handler that siglongjmps back.
 * Then it pauses --pause-us. At the end NONE pages are made readable and
 * checked too.
 *
 * The checksum covers the operations, states, versions, probe outcomes and
 * all data; never an address.
 */
#include "common.h"

#include <setjmp.h>
#include <sys/mman.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / sizeof(uint64_t))
#define RUN_PAGES_MAX 8u

enum page_state { PAGE_RW, PAGE_RO, PAGE_NONE, PAGE_HOLE };
static const char *const g_state_names[] = { "RW", "RO", "NONE", "HOLE" };

enum operation {
    OP_READ_ONLY, OP_READ_WRITE, OP_NO_ACCESS, OP_UNMAP, OP_MAP,
    OP_MOVER_MOVE, OP_MOVER_GROW, OP_MOVER_SHRINK, OP_COUNT
};
static const char *const g_op_names[] = {
    "ro", "rw", "none", "unmap", "map", "move", "grow", "shrink",
};

static uint64_t g_seed;

/* Region. */
static unsigned char *g_region;
static uint64_t g_region_pages;
static uint8_t *g_state;
static uint64_t *g_version;

/* Mover and its landing zone (two halves of g_mover_max pages). */
static unsigned char *g_landing;
static uint64_t g_mover_max;
static uint64_t g_mover_half;
static uint64_t g_mover_pages;
static uint64_t *g_mover_version;

/* ------------------------------------------------------------------ */
/* Page data                                                           */
/* ------------------------------------------------------------------ */

static uint64_t page_key(uint64_t area, uint64_t page, uint64_t version)
{
    uint64_t k = tp_mix64(g_seed ^ 0x686f6c6573ULL ^ (area << 56));
    k ^= tp_mix64(page * 0xd1b54a32d192ed03ULL + 0x33);
    return tp_mix64(k ^ tp_mix64(version * 0x8cb92ba72f3d8dd7ULL + 0x44));
}

static void page_write(unsigned char *page, uint64_t key)
{
    uint64_t *words = (uint64_t *)page;
    for (size_t i = 0; i < PAGE_WORDS; i++)
        words[i] = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
}

static void page_check(const unsigned char *page, uint64_t key,
                       uint64_t step, const char *what, uint64_t index,
                       uint64_t version)
{
    const uint64_t *words = (const uint64_t *)page;
    for (size_t i = 0; i < PAGE_WORDS; i++) {
        uint64_t want = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
        if (words[i] != want)
            tp_selfcheck_fail("step %llu: %s page %llu (version %llu) word "
                              "%zu is %016llx, expected %016llx",
                              (unsigned long long)step, what,
                              (unsigned long long)index,
                              (unsigned long long)version, i,
                              (unsigned long long)words[i],
                              (unsigned long long)want);
    }
}

static void page_check_zero(const unsigned char *page, uint64_t step,
                            const char *what, uint64_t index)
{
    const uint64_t *words = (const uint64_t *)page;
    for (size_t i = 0; i < PAGE_WORDS; i++)
        if (words[i] != 0)
            tp_selfcheck_fail("step %llu: fresh %s page %llu word %zu is "
                              "%016llx, expected zero",
                              (unsigned long long)step, what,
                              (unsigned long long)index, i,
                              (unsigned long long)words[i]);
}

static uint64_t hash_page(uint64_t h, const unsigned char *page)
{
    return tp_hash_words(h, (const uint64_t *)page, PAGE_WORDS);
}

/* ------------------------------------------------------------------ */
/* Fault probes                                                        */
/* ------------------------------------------------------------------ */

static sigjmp_buf g_probe_env;
static volatile sig_atomic_t g_probing;
static volatile int g_fault_code;
static void *volatile g_fault_address;

static void on_segv(int sig, siginfo_t *info, void *context)
{
    (void)context;
    if (!g_probing) {
        /* A real crash: let it happen with the default action. */
        signal(sig, SIG_DFL);
        return;
    }
    g_fault_code = info->si_code;
    g_fault_address = info->si_addr;
    siglongjmp(g_probe_env, 1);
}

/* Touches one byte; returns 0 when the access worked, else the si_code of
 * the SIGSEGV it raised. A write stores the byte it read (nothing changes
 * if it wrongly succeeds). */
static int probe(unsigned char *address, int write)
{
    volatile unsigned char *p = address;
    g_fault_code = 0;
    g_fault_address = NULL;
    /* savemask = 1: the handler runs with SIGSEGV blocked, and siglongjmp
     * must bring back the mask sigsetjmp saw. */
    if (sigsetjmp(g_probe_env, 1) == 0) {
        g_probing = 1;
        unsigned char v = *p;
        if (write)
            *p = v;
        g_probing = 0;
        return 0;
    }
    g_probing = 0;
    if (g_fault_address != address)
        tp_selfcheck_fail("a probe faulted at another address than the "
                          "probed one");
    return g_fault_code;
}

static const char *code_name(int code)
{
    switch (code) {
    case 0: return "no fault";
    case SEGV_MAPERR: return "SEGV_MAPERR";
    case SEGV_ACCERR: return "SEGV_ACCERR";
    default: return "another si_code";
    }
}

static uint64_t expect_fault(unsigned char *address, int write, int want,
                             uint64_t step, const char *what, uint64_t index)
{
    int got = probe(address, write);
    if (got != want)
        tp_selfcheck_fail("step %llu: %s of %s page %llu gave %s (%d), "
                          "expected %s", (unsigned long long)step,
                          write ? "write" : "read", what,
                          (unsigned long long)index, code_name(got), got,
                          code_name(want));
    return (uint64_t)got;
}

/* ------------------------------------------------------------------ */
/* Mapping helpers                                                     */
/* ------------------------------------------------------------------ */

static unsigned char *region_page(uint64_t page)
{
    return g_region + page * PAGE_BYTES;
}

static unsigned char *half_base(uint64_t half)
{
    return g_landing + half * g_mover_max * PAGE_BYTES;
}

static unsigned char *mover_base(void)
{
    return half_base(g_mover_half);
}

static void map_fresh(unsigned char *address, uint64_t pages, int prot,
                      const char *what)
{
    void *p = mmap(address, pages * PAGE_BYTES, prot,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED)
        tp_syserr("mmap %s (%llu pages)", what, (unsigned long long)pages);
    if (p != address)
        tp_selfcheck_fail("mmap %s: MAP_FIXED_NOREPLACE ignored", what);
}

static void protect(unsigned char *address, uint64_t pages, int prot)
{
    if (mprotect(address, pages * PAGE_BYTES, prot) != 0)
        tp_syserr("mprotect(%llu pages, %d)", (unsigned long long)pages,
                  prot);
}

/* Calls apply(first, count) for each maximal run of pages in
 * [first, first+count) whose state satisfies `mapped` (1: not a hole,
 * 0: a hole). */
static void for_each_run(uint64_t first, uint64_t count, int mapped,
                         void (*apply)(uint64_t, uint64_t))
{
    uint64_t p = first;
    while (p < first + count) {
        int is_mapped = g_state[p] != PAGE_HOLE;
        if (is_mapped != mapped) {
            p++;
            continue;
        }
        uint64_t q = p;
        while (q < first + count && (g_state[q] != PAGE_HOLE) == mapped)
            q++;
        apply(p, q - p);
        p = q;
    }
}

static uint64_t g_step;   /* for messages from the run callbacks */

static void apply_read_only(uint64_t first, uint64_t count)
{
    protect(region_page(first), count, PROT_READ);
    for (uint64_t p = first; p < first + count; p++) {
        page_check(region_page(p), page_key(0, p, g_version[p]), g_step,
                   "region (to RO)", p, g_version[p]);
        g_state[p] = PAGE_RO;
    }
}

static void apply_read_write(uint64_t first, uint64_t count)
{
    protect(region_page(first), count, PROT_READ | PROT_WRITE);
    for (uint64_t p = first; p < first + count; p++) {
        page_check(region_page(p), page_key(0, p, g_version[p]), g_step,
                   "region (to RW)", p, g_version[p]);
        g_version[p]++;
        page_write(region_page(p), page_key(0, p, g_version[p]));
        g_state[p] = PAGE_RW;
    }
}

static void apply_no_access(uint64_t first, uint64_t count)
{
    protect(region_page(first), count, PROT_NONE);
    for (uint64_t p = first; p < first + count; p++)
        g_state[p] = PAGE_NONE;
}

static void apply_map(uint64_t first, uint64_t count)
{
    map_fresh(region_page(first), count, PROT_READ | PROT_WRITE,
              "into a region hole");
    for (uint64_t p = first; p < first + count; p++) {
        page_check_zero(region_page(p), g_step, "region", p);
        g_version[p]++;
        page_write(region_page(p), page_key(0, p, g_version[p]));
        g_state[p] = PAGE_RW;
    }
}

static void region_unmap(uint64_t first, uint64_t count)
{
    if (munmap(region_page(first), count * PAGE_BYTES) != 0)
        tp_syserr("munmap %llu region pages", (unsigned long long)count);
    for (uint64_t p = first; p < first + count; p++)
        g_state[p] = PAGE_HOLE;
}

/* Fills mover pages [from, to) with fresh data (they were zero). */
static void mover_fill_new(uint64_t from, uint64_t to, uint64_t step)
{
    for (uint64_t i = from; i < to; i++) {
        unsigned char *page = mover_base() + i * PAGE_BYTES;
        page_check_zero(page, step, "mover", i);
        g_mover_version[i]++;
        page_write(page, page_key(1, i, g_mover_version[i]));
    }
}

static void mover_move(uint64_t new_pages, uint64_t step)
{
    unsigned char *old = mover_base();
    uint64_t old_pages = g_mover_pages;
    unsigned char *target = half_base(1 - g_mover_half);
    void *moved = mremap(old, old_pages * PAGE_BYTES, new_pages * PAGE_BYTES,
                         MREMAP_MAYMOVE | MREMAP_FIXED, target);
    if (moved == MAP_FAILED)
        tp_syserr("mremap move %llu -> %llu pages",
                  (unsigned long long)old_pages,
                  (unsigned long long)new_pages);
    if (moved != target)
        tp_selfcheck_fail("mremap MREMAP_FIXED moved elsewhere");
    /* What it left behind becomes reservation again. */
    map_fresh(old, old_pages, PROT_NONE, "landing reservation");
    g_mover_half = 1 - g_mover_half;
    g_mover_pages = new_pages;
    if (new_pages > old_pages)
        mover_fill_new(old_pages, new_pages, step);
}

static void mover_grow(uint64_t extra_pages, uint64_t step)
{
    unsigned char *base = mover_base();
    uint64_t old_pages = g_mover_pages;
    if (munmap(base + old_pages * PAGE_BYTES, extra_pages * PAGE_BYTES) != 0)
        tp_syserr("munmap the reservation behind the mover");
    void *grown = mremap(base, old_pages * PAGE_BYTES,
                         (old_pages + extra_pages) * PAGE_BYTES, 0);
    if (grown == MAP_FAILED)
        tp_syserr("mremap grow in place %llu -> %llu pages",
                  (unsigned long long)old_pages,
                  (unsigned long long)(old_pages + extra_pages));
    if (grown != base)
        tp_selfcheck_fail("mremap without MAYMOVE moved the mapping");
    g_mover_pages = old_pages + extra_pages;
    mover_fill_new(old_pages, g_mover_pages, step);
}

static void mover_shrink(uint64_t fewer_pages)
{
    unsigned char *base = mover_base();
    uint64_t old_pages = g_mover_pages;
    void *shrunk = mremap(base, old_pages * PAGE_BYTES,
                          (old_pages - fewer_pages) * PAGE_BYTES, 0);
    if (shrunk == MAP_FAILED)
        tp_syserr("mremap shrink %llu -> %llu pages",
                  (unsigned long long)old_pages,
                  (unsigned long long)(old_pages - fewer_pages));
    if (shrunk != base)
        tp_selfcheck_fail("mremap shrink moved the mapping");
    g_mover_pages = old_pages - fewer_pages;
    map_fresh(base + g_mover_pages * PAGE_BYTES, fewer_pages, PROT_NONE,
              "landing reservation");
}

/* ------------------------------------------------------------------ */
/* Checks                                                              */
/* ------------------------------------------------------------------ */

/* Checks every page of both areas; returns a hash of what it saw. */
static uint64_t check_all(uint64_t step)
{
    uint64_t h = tp_hash_mix(0x636865636bULL, step);
    for (uint64_t p = 0; p < g_region_pages; p++) {
        unsigned char *page = region_page(p);
        uint64_t outcome = 0;
        switch (g_state[p]) {
        case PAGE_RW:
            page_check(page, page_key(0, p, g_version[p]), step, "RW region",
                       p, g_version[p]);
            break;
        case PAGE_RO:
            page_check(page, page_key(0, p, g_version[p]), step, "RO region",
                       p, g_version[p]);
            outcome = expect_fault(page, 1, SEGV_ACCERR, step, "RO region",
                                   p);
            break;
        case PAGE_NONE:
            outcome = expect_fault(page, 0, SEGV_ACCERR, step,
                                   p == 0 || p == g_region_pages - 1
                                       ? "guard" : "NONE region", p);
            break;
        case PAGE_HOLE:
            outcome = expect_fault(page, 0, SEGV_MAPERR, step, "hole", p);
            break;
        }
        h = tp_hash_mix(h, (uint64_t)g_state[p] << 32 ^ outcome);
        h = tp_hash_mix(h, g_version[p]);
    }
    for (uint64_t i = 0; i < g_mover_pages; i++)
        page_check(mover_base() + i * PAGE_BYTES,
                   page_key(1, i, g_mover_version[i]), step, "mover", i,
                   g_mover_version[i]);
    /* The reservation right behind the mover and the other half. */
    if (g_mover_pages < g_mover_max)
        h = tp_hash_mix(h, expect_fault(mover_base() + g_mover_pages *
                                            PAGE_BYTES, 0, SEGV_ACCERR,
                                        step, "landing reservation",
                                        g_mover_pages));
    h = tp_hash_mix(h, expect_fault(half_base(1 - g_mover_half), 0,
                                    SEGV_ACCERR, step, "other landing half",
                                    0));
    return tp_hash_mix(h, g_mover_pages);
}

int main(int argc, char **argv)
{
    unsigned long long pages = 64, mover_pages = 16, steps = 300;
    unsigned long long pause_us = 2000, seed = 1;
    const struct tp_opt opts[] = {
        { "pages",       &pages,       16, 65536, "pages in the region (first and last are guards)" },
        { "mover-pages", &mover_pages, 2, 65536, "largest size of the mremap'd mapping, in pages" },
        { "steps",       &steps,       0, 100000000ULL, "operations, each followed by a full check" },
        { "pause-us",    &pause_us,    0, 60000000ULL, "pause after each step in microseconds" },
        { "seed",        &seed,        0, UINT64_MAX, "seed of the operations and page data" },
    };
    tp_parse_args(argc, argv,
                  "mprotect/munmap/mremap on a region with guard pages and "
                  "holes; checks data and that the right pages fault.",
                  opts, TP_NOPTS(opts));
    g_seed = seed;
    g_region_pages = pages;
    g_mover_max = mover_pages;

    g_state = calloc(pages, sizeof(*g_state));
    g_version = calloc(pages, sizeof(*g_version));
    g_mover_version = calloc(mover_pages, sizeof(*g_mover_version));
    if (g_state == NULL || g_version == NULL || g_mover_version == NULL)
        tp_syserr("calloc");
    tp_say("holes: pages=%llu mover-pages=%llu steps=%llu seed=%llu\n",
           pages, mover_pages, steps, seed);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0)
        tp_syserr("sigaction(SIGSEGV)");

    /* Everything is mapped before the loop; the loop never calls malloc,
     * so no other mapping lands in a hole of ours. */
    g_region = mmap(NULL, pages * PAGE_BYTES, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_region == MAP_FAILED)
        tp_syserr("mmap region");
    for (uint64_t p = 0; p < pages; p++)
        page_write(region_page(p), page_key(0, p, 0));
    protect(region_page(0), 1, PROT_NONE);
    protect(region_page(pages - 1), 1, PROT_NONE);
    g_state[0] = g_state[pages - 1] = PAGE_NONE;

    g_landing = mmap(NULL, 2 * mover_pages * PAGE_BYTES, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_landing == MAP_FAILED)
        tp_syserr("mmap landing zone");
    g_mover_half = 0;
    g_mover_pages = mover_pages / 2;
    if (munmap(g_landing, g_mover_pages * PAGE_BYTES) != 0)
        tp_syserr("munmap landing start");
    map_fresh(g_landing, g_mover_pages, PROT_READ | PROT_WRITE, "mover");
    mover_fill_new(0, g_mover_pages, 0);

    uint64_t sum = check_all(0);
    uint64_t rng = tp_mix64(seed ^ 0x6d70726f74ULL);
    uint64_t counts[OP_COUNT] = { 0 };
    uint64_t report_every = steps >= 10 ? steps / 10 : 1;
    for (uint64_t s = 0; s < steps; s++) {
        tp_rendezvous(s + 1);
        g_step = s + 1;
        enum operation op = (enum operation)tp_rand_below(&rng, OP_COUNT);
        /* A run inside the guards: [first, first + count). */
        uint64_t first = 1 + tp_rand_below(&rng, pages - 2);
        uint64_t count = 1 + tp_rand_below(&rng, RUN_PAGES_MAX);
        if (first + count > pages - 1)
            count = pages - 1 - first;
        uint64_t amount = 0;
        switch (op) {
        case OP_READ_ONLY:
            for_each_run(first, count, 1, apply_read_only);
            break;
        case OP_READ_WRITE:
            for_each_run(first, count, 1, apply_read_write);
            break;
        case OP_NO_ACCESS:
            for_each_run(first, count, 1, apply_no_access);
            break;
        case OP_UNMAP:
            region_unmap(first, count);
            break;
        case OP_MAP:
            for_each_run(first, count, 0, apply_map);
            break;
        case OP_MOVER_MOVE:
            amount = 1 + tp_rand_below(&rng, mover_pages);
            mover_move(amount, s + 1);
            break;
        case OP_MOVER_GROW:
            if (g_mover_pages < mover_pages) {
                amount = 1 + tp_rand_below(&rng, mover_pages - g_mover_pages);
                mover_grow(amount, s + 1);
            }
            break;
        case OP_MOVER_SHRINK:
            if (g_mover_pages > 1) {
                amount = 1 + tp_rand_below(&rng, g_mover_pages - 1);
                mover_shrink(amount);
            }
            break;
        case OP_COUNT:
            break;
        }
        counts[op]++;
        sum = tp_hash_mix(sum, (uint64_t)op << 48 ^ first << 24 ^ count);
        sum = tp_hash_mix(sum, amount);
        sum = tp_hash_mix(sum, check_all(s + 1));

        if ((s + 1) % report_every == 0) {
            uint64_t in_state[4] = { 0 };
            for (uint64_t p = 0; p < pages; p++)
                in_state[g_state[p]]++;
            tp_say("step %llu/%llu %s=%llu %s=%llu %s=%llu %s=%llu "
                   "mover=%llu last=%s\n",
                   (unsigned long long)(s + 1), steps,
                   g_state_names[0], (unsigned long long)in_state[0],
                   g_state_names[1], (unsigned long long)in_state[1],
                   g_state_names[2], (unsigned long long)in_state[2],
                   g_state_names[3], (unsigned long long)in_state[3],
                   (unsigned long long)g_mover_pages, g_op_names[op]);
        }
        if (s + 1 < steps)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    /* Final: NONE pages (guards too) must still hold their data. */
    uint64_t holes = 0;
    for (uint64_t p = 0; p < pages; p++) {
        if (g_state[p] == PAGE_HOLE) {
            holes++;
            sum = tp_hash_mix(sum, p);
            continue;
        }
        if (g_state[p] == PAGE_NONE)
            protect(region_page(p), 1, PROT_READ);
        page_check(region_page(p), page_key(0, p, g_version[p]), steps,
                   "final region", p, g_version[p]);
        sum = hash_page(tp_hash_mix(sum, g_version[p]), region_page(p));
    }
    for (uint64_t i = 0; i < g_mover_pages; i++)
        sum = hash_page(tp_hash_mix(sum, g_mover_version[i]),
                        mover_base() + i * PAGE_BYTES);
    for (int op = 0; op < OP_COUNT; op++)
        sum = tp_hash_mix(sum, counts[op]);
    tp_say("verified region pages=%llu holes=%llu mover=%llu\n", pages,
           (unsigned long long)holes, (unsigned long long)g_mover_pages);
    tp_finish(sum);
}
