/*
 * filemaps - file-backed mappings: private dirty, private clean, shared.
 *
 * At start-up it creates, each with mkstemp and --pages pages of data that
 * is a pure function of (seed, file, page):
 *
 *   private  <--dir>/fammig-filemaps-XXXXXX, mapped MAP_PRIVATE read-write.
 *            Each round rewrites --writes pages of its first half (private
 *            dirty pages: copies that exist only in memory), and reads
 *            --writes pages of its second half, which stay clean: they
 *            must still show the file's data;
 *   clean    another file in --dir, mapped MAP_PRIVATE read-only; each
 *            round reads --writes pages;
 *   shared   with --shared 1 only: a file in --shm-dir (tmpfs), mapped
 *            MAP_SHARED read-write. Each round rewrites --writes pages and
 *            then reads them back from the file with pread, which must see
 *            the new data. With --read-only-between 1 the shared mapping
 *            is made PROT_READ after each round's writes and PROT_READ|
 *            PROT_WRITE again before the next (the file stays open for
 *            writing, so the kernel must still allow it: a restore that
 *            maps it from a read-only open makes that mprotect fail).
 *
 * It closes each descriptor once the file is mapped, so the mappings are
 * the only reference to the files. Every read is checked, and every page
 * is checked before it is rewritten. At the end it checks every mapped
 * page, and the files themselves: the private and clean files must still
 * hold their first data (private writes never reach the file), the shared
 * file the latest. Last it unmaps and removes the files; an exit through a
 * self-check failure or a system error removes them too (atexit). The
 * files must exist while the process runs: a restore maps them again by
 * path. Their names are never printed.
 *
 * The checksum covers versions and contents; never a name or an address.
 */
#include "common.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / sizeof(uint64_t))

enum file_kind { FILE_PRIVATE, FILE_CLEAN, FILE_SHARED, FILE_COUNT };
static const char *const g_kind_names[] = { "private", "clean", "shared" };

struct mapped_file {
    char path[PATH_MAX];
    int exists;              /* created and not yet removed */
    unsigned char *base;     /* NULL = not mapped */
    uint64_t *version;       /* per page */
};

static struct mapped_file g_files[FILE_COUNT];
static uint64_t g_seed;
static uint64_t g_pages;

static void remove_files(void)
{
    for (int k = 0; k < FILE_COUNT; k++) {
        if (g_files[k].exists && unlink(g_files[k].path) != 0)
            fprintf(stderr, "%s: cannot remove %s: %s\n", tp_progname(NULL),
                    g_files[k].path, strerror(errno));
        g_files[k].exists = 0;
    }
}

static uint64_t page_key(int kind, uint64_t page, uint64_t version)
{
    uint64_t k = tp_mix64(g_seed ^ 0x66696c656dULL ^ ((uint64_t)kind << 56));
    k ^= tp_mix64(page * 0xd1b54a32d192ed03ULL + 0x77);
    return tp_mix64(k ^ tp_mix64(version * 0x8cb92ba72f3d8dd7ULL + 0x88));
}

static void page_fill(uint64_t *page, uint64_t key)
{
    for (size_t i = 0; i < PAGE_WORDS; i++)
        page[i] = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
}

static void page_check(const uint64_t *page, int kind, uint64_t index,
                       uint64_t version, uint64_t round, const char *where)
{
    uint64_t key = page_key(kind, index, version);
    for (size_t i = 0; i < PAGE_WORDS; i++) {
        uint64_t want = tp_mix64(key + (uint64_t)(i + 1) * TP_GOLDEN);
        if (page[i] != want)
            tp_selfcheck_fail("round %llu: %s file page %llu (version %llu, "
                              "%s) word %zu is %016llx, expected %016llx",
                              (unsigned long long)round, g_kind_names[kind],
                              (unsigned long long)index,
                              (unsigned long long)version, where, i,
                              (unsigned long long)page[i],
                              (unsigned long long)want);
    }
}

static uint64_t *mapped_page(int kind, uint64_t index)
{
    return (uint64_t *)(g_files[kind].base + index * PAGE_BYTES);
}

/* Creates the file with version-0 data and maps it; the descriptor is
 * closed before returning. */
static void create_and_map(int kind, const char *dir, int prot, int flags)
{
    struct mapped_file *f = &g_files[kind];
    int n = snprintf(f->path, sizeof(f->path), "%s/fammig-filemaps-XXXXXX",
                     dir);
    if (n < 0 || (size_t)n >= sizeof(f->path)) {
        errno = ENAMETOOLONG;
        tp_syserr("file name in %s", dir);
    }
    int fd = mkstemp(f->path);
    if (fd < 0)
        tp_syserr("mkstemp in %s", dir);
    f->exists = 1;
    uint64_t page[PAGE_WORDS];
    for (uint64_t p = 0; p < g_pages; p++) {
        page_fill(page, page_key(kind, p, 0));
        if (pwrite(fd, page, PAGE_BYTES, (off_t)(p * PAGE_BYTES)) !=
            (ssize_t)PAGE_BYTES)
            tp_syserr("writing the %s file", g_kind_names[kind]);
    }
    f->base = mmap(NULL, g_pages * PAGE_BYTES, prot, flags, fd, 0);
    if (f->base == MAP_FAILED)
        tp_syserr("mmap the %s file", g_kind_names[kind]);
    if (close(fd) != 0)
        tp_syserr("close the %s file", g_kind_names[kind]);
    f->version = calloc(g_pages, sizeof(uint64_t));
    if (f->version == NULL)
        tp_syserr("calloc");
}

/* Reads page `index` of the file itself (not the mapping) and checks it. */
static void check_file_page(int kind, uint64_t index, uint64_t version,
                            uint64_t round, const char *where)
{
    int fd = open(g_files[kind].path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        tp_syserr("open the %s file", g_kind_names[kind]);
    uint64_t page[PAGE_WORDS];
    if (pread(fd, page, PAGE_BYTES, (off_t)(index * PAGE_BYTES)) !=
        (ssize_t)PAGE_BYTES)
        tp_syserr("pread the %s file", g_kind_names[kind]);
    if (close(fd) != 0)
        tp_syserr("close the %s file", g_kind_names[kind]);
    page_check(page, kind, index, version, round, where);
}

/* Checks, bumps and rewrites one page of a writable mapping. */
static void rewrite_page(int kind, uint64_t index, uint64_t round)
{
    struct mapped_file *f = &g_files[kind];
    page_check(mapped_page(kind, index), kind, index, f->version[index],
               round, "before rewrite");
    f->version[index]++;
    page_fill(mapped_page(kind, index),
              page_key(kind, index, f->version[index]));
}

int main(int argc, char **argv)
{
    unsigned long long pages = 64, rounds = 100, writes = 8;
    unsigned long long pause_us = 5000, shared = 0, seed = 1, read_only_between = 0;
    const char *dir = "/tmp", *shm_dir = "/dev/shm";
    const struct tp_opt opts[] = {
        { "pages",    &pages,    2, 1ULL << 20, "pages per file" },
        { "rounds",   &rounds,   0, 100000000ULL, "number of rounds" },
        { "writes",   &writes,   1, 1ULL << 20, "pages written (and read) per file and round" },
        { "pause-us", &pause_us, 0, 60000000ULL, "pause per round in microseconds" },
        { "shared",   &shared,   0, 1, "1 = also a MAP_SHARED file in --shm-dir" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the file data and page choice" },
        { "read-only-between", &read_only_between, 0, 1, "with --shared 1: PROT_READ between rounds" },
    };
    const struct tp_stropt string_opts[] = {
        { "dir",     &dir,     NULL, "directory for the two private files" },
        { "shm-dir", &shm_dir, NULL, "tmpfs directory for the --shared 1 file" },
    };
    tp_parse_args_with_strings(argc, argv,
                               "MAP_PRIVATE (dirty and clean) and MAP_SHARED "
                               "file mappings, checked against their files.",
                               opts, TP_NOPTS(opts), string_opts,
                               TP_NOPTS(string_opts));
    g_seed = seed;
    g_pages = pages;
    const uint64_t half = pages / 2;

    tp_say("filemaps: pages=%llu rounds=%llu writes=%llu shared=%llu "
           "seed=%llu\n", pages, rounds, writes, shared, seed);
    if (atexit(remove_files) != 0)
        tp_syserr("atexit");
    create_and_map(FILE_PRIVATE, dir, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    create_and_map(FILE_CLEAN, dir, PROT_READ, MAP_PRIVATE);
    if (shared)
        create_and_map(FILE_SHARED, shm_dir, PROT_READ | PROT_WRITE,
                       MAP_SHARED);

    uint64_t rng = tp_mix64(seed ^ 0x6d617073ULL);
    uint64_t report_every = rounds >= 10 ? rounds / 10 : 1;
    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        if (shared && read_only_between &&
            mprotect(g_files[FILE_SHARED].base, pages * PAGE_BYTES, PROT_READ | PROT_WRITE) != 0)
            tp_selfcheck_fail("round %llu: the shared mapping cannot be made writable again: %s",
                              (unsigned long long)(r + 1), strerror(errno));
        for (uint64_t k = 0; k < writes; k++) {
            /* private: dirty the first half, read the clean second half. */
            rewrite_page(FILE_PRIVATE, tp_rand_below(&rng, half), r + 1);
            uint64_t clean = half + tp_rand_below(&rng, pages - half);
            page_check(mapped_page(FILE_PRIVATE, clean), FILE_PRIVATE, clean,
                       0, r + 1, "clean half");
            uint64_t c = tp_rand_below(&rng, pages);
            page_check(mapped_page(FILE_CLEAN, c), FILE_CLEAN, c, 0, r + 1,
                       "read-only");
            if (shared) {
                uint64_t s = tp_rand_below(&rng, pages);
                rewrite_page(FILE_SHARED, s, r + 1);
                check_file_page(FILE_SHARED, s,
                                g_files[FILE_SHARED].version[s], r + 1,
                                "in the file after a shared write");
            }
        }
        if (shared && read_only_between &&
            mprotect(g_files[FILE_SHARED].base, pages * PAGE_BYTES, PROT_READ) != 0)
            tp_syserr("mprotect PROT_READ");
        if ((r + 1) % report_every == 0)
            tp_say("round %llu/%llu\n", (unsigned long long)(r + 1), rounds);
        if (r + 1 < rounds)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    /* Final: every mapped page, then the files themselves. */
    uint64_t sum = tp_hash_mix(0x66696c65ULL, pages);
    uint64_t dirty = 0;
    for (int kind = 0; kind < FILE_COUNT; kind++) {
        if (g_files[kind].base == NULL)
            continue;
        for (uint64_t p = 0; p < pages; p++) {
            uint64_t v = g_files[kind].version[p];
            page_check(mapped_page(kind, p), kind, p, v, rounds, "final");
            /* Private writes stay in memory; shared ones reach the file. */
            check_file_page(kind, p, kind == FILE_SHARED ? v : 0, rounds,
                            "final, in the file");
            if (v != 0)
                dirty++;
            sum = tp_hash_mix(sum, (uint64_t)kind << 32 ^ v);
            sum = tp_hash_words(sum, mapped_page(kind, p), PAGE_WORDS);
        }
        if (munmap(g_files[kind].base, pages * PAGE_BYTES) != 0)
            tp_syserr("munmap the %s file", g_kind_names[kind]);
        g_files[kind].base = NULL;
        free(g_files[kind].version);
    }
    remove_files();
    tp_say("verified files=%d rewritten-pages=%llu\n", shared ? 3 : 2,
           (unsigned long long)dirty);
    tp_finish(sum);
}
