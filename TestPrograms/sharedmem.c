/*
 * sharedmem - shared memory that exists only in the process, mapped more
 * than once, checked every round against its own model.
 *
 * --with takes a comma-separated list (default: all):
 *   anon     MAP_SHARED|MAP_ANONYMOUS, 64 pages: each round updates words
 *            in a few pages; page 5 is dropped with MADV_DONTNEED after
 *            each write (its data lives on in the shared object), pages
 *            60..63 are never touched until the last round (must read zeros)
 *   split    MAP_SHARED|MAP_ANONYMOUS, 32 pages with pages 8..15 made
 *            read-only (three mappings of one object) and a second view
 *            of the whole object made by mremap(old_size 0): a write
 *            through one view must show through the other
 *   memfd    memfd "fammig-shm", 16 pages, mapped twice (pages 0..15 and
 *            4..11 at offset 4 pages), its descriptor closed: aliasing
 *            checked every round
 *   memfdfd  memfd "fammig-shm-fd", 8 pages, mapped and its descriptor
 *            kept: each round reads the whole object through the descriptor
 *            first, then write() through it shows in the mapping and a
 *            store in the mapping shows in pread; the offset moves on
 *   sysv     (not in the default) a SysV segment (IPC_PRIVATE, 4 pages)
 *            attached and at once marked for removal, so that it goes with
 *            the process: migrated nonlive, refused in post-copy (kernobjects
 *            checks one every round)
 *
 * Each round is one step (--rendezvous counts rounds); it prints one line
 * per round and pauses --pause-us. The checksum hashes the final contents.
 */
#include "common.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE 4096UL
#define WORDS_PER_PAGE (PAGE / 8)

static int want(const char *list, const char *kind)
{
    size_t n = strlen(kind);
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && strncmp(p, kind, n) == 0)
            return 1;
        p += len;
        if (*p == ',')
            p++;
    }
    return 0;
}

static void *map_or_die(size_t bytes, int prot, int flags, int fd, off_t offset, const char *what)
{
    void *p = mmap(NULL, bytes, prot, flags, fd, offset);
    if (p == MAP_FAILED)
        tp_syserr("mmap(%s)", what);
    return p;
}

/* Compares a region with its model; fails naming the first differing word. */
static void check_words(const char *what, uint64_t round, const uint64_t *have, const uint64_t *model, size_t words)
{
    for (size_t i = 0; i < words; i++)
        if (have[i] != model[i])
            tp_selfcheck_fail("round %llu: %s word %zu (page %zu) is %016llx, expected %016llx", (unsigned long long)round,
                              what, i, i / WORDS_PER_PAGE, (unsigned long long)have[i], (unsigned long long)model[i]);
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 60, pause_us = 10000;
    const char *with = "anon,split,memfd,memfdfd";
    uint64_t *sysv = NULL;
    struct tp_opt opts[] = {
        { "rounds", &rounds, 1, 1000000, "rounds to run" },
        { "pause-us", &pause_us, 0, 10000000, "pause after each round (us)" },
    };
    struct tp_stropt sopts[] = {
        { "with", &with, NULL, "comma-separated kinds: anon,split,memfd,memfdfd,sysv" },
    };
    tp_parse_args_with_strings(argc, argv, "Shared anonymous and memfd memory, mapped more than once, checked every round.",
                               opts, TP_NOPTS(opts), sopts, TP_NOPTS(sopts));
    int use_anon = want(with, "anon"), use_split = want(with, "split");
    int use_memfd = want(with, "memfd"), use_memfdfd = want(with, "memfdfd");
    if (want(with, "sysv")) {
        int id = shmget(IPC_PRIVATE, 4 * PAGE, IPC_CREAT | 0600);
        if (id < 0)
            tp_syserr("shmget");
        sysv = shmat(id, NULL, 0);
        if (sysv == (void *)-1)
            tp_syserr("shmat");
        if (shmctl(id, IPC_RMID, NULL) != 0)
            tp_syserr("shmctl(IPC_RMID)");
        sysv[0] = 1;
    }
    uint64_t seed = 0x5ade;

    uint64_t *anon = NULL, *anon_model = NULL;
    const size_t anon_pages = 64;
    if (use_anon) {
        anon = map_or_die(anon_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0, "anon");
        anon_model = calloc(anon_pages * WORDS_PER_PAGE, 8);
        if (anon_model == NULL)
            tp_syserr("calloc");
    }
    uint64_t *split = NULL, *split_view = NULL, *split_model = NULL;
    const size_t split_pages = 32;
    if (use_split) {
        split = map_or_die(split_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0, "split");
        split_model = calloc(split_pages * WORDS_PER_PAGE, 8);
        if (split_model == NULL)
            tp_syserr("calloc");
        for (size_t i = 0; i < split_pages * WORDS_PER_PAGE; i += 61)
            split[i] = split_model[i] = tp_mix64(i + 77);
        if (mprotect((char *)split + 8 * PAGE, 8 * PAGE, PROT_READ) != 0)
            tp_syserr("mprotect(split)");
        split_view = mremap(split, 0, split_pages * PAGE, MREMAP_MAYMOVE);
        if (split_view == MAP_FAILED)
            tp_syserr("mremap(split, 0)");
        if (mprotect(split_view, split_pages * PAGE, PROT_READ | PROT_WRITE) != 0)
            tp_syserr("mprotect(split view)");
    }
    uint64_t *memfd_a = NULL, *memfd_b = NULL, *memfd_model = NULL;
    const size_t memfd_pages = 16;
    if (use_memfd) {
        int fd = (int)syscall(SYS_memfd_create, "fammig-shm", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)(memfd_pages * PAGE)) != 0)
            tp_syserr("memfd_create/ftruncate");
        memfd_a = map_or_die(memfd_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0, "memfd a");
        memfd_b = map_or_die(8 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4 * PAGE, "memfd b");
        close(fd);
        memfd_model = calloc(memfd_pages * WORDS_PER_PAGE, 8);
        if (memfd_model == NULL)
            tp_syserr("calloc");
    }
    int memfdfd = -1;
    uint64_t *memfdfd_map = NULL, *memfdfd_model = NULL;
    const size_t memfdfd_pages = 8;
    off_t memfdfd_offset = 0;
    if (use_memfdfd) {
        memfdfd = (int)syscall(SYS_memfd_create, "fammig-shm-fd", MFD_ALLOW_SEALING);
        if (memfdfd < 0 || ftruncate(memfdfd, (off_t)(memfdfd_pages * PAGE)) != 0)
            tp_syserr("memfd_create/ftruncate (fd)");
        memfdfd_map = map_or_die(memfdfd_pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, memfdfd, 0, "memfdfd");
        memfdfd_model = calloc(memfdfd_pages * WORDS_PER_PAGE, 8);
        if (memfdfd_model == NULL)
            tp_syserr("calloc");
    }

    for (uint64_t round = 1; round <= rounds; round++) {
        tp_rendezvous(round);
        if (use_anon) {
            /* Pages 60..63 stay holes of the object (a read fault on shared memory would allocate
             * them): read only in the last round, when they must be zeros. */
            check_words("anon", round, anon, anon_model, (round == rounds ? anon_pages : 60) * WORDS_PER_PAGE);
            for (int k = 0; k < 8; k++) {
                size_t page = (size_t)tp_rand_below(&seed, anon_pages - 4);  /* never page 60..63 */
                if (page == 60)
                    page = 1;
                size_t word = page * WORDS_PER_PAGE + (size_t)tp_rand_below(&seed, WORDS_PER_PAGE);
                anon[word] = anon_model[word] = tp_rand(&seed);
            }
            size_t five = 5 * WORDS_PER_PAGE + round % WORDS_PER_PAGE;
            anon[five] = anon_model[five] = round * 0x1001;
            /* The data stays in the shared object; only this mapping's page table entry goes. */
            if (madvise((char *)anon + 5 * PAGE, PAGE, MADV_DONTNEED) != 0)
                tp_syserr("madvise(DONTNEED)");
        }
        if (use_split) {
            check_words("split", round, split, split_model, split_pages * WORDS_PER_PAGE);
            check_words("split view", round, split_view, split_model, split_pages * WORDS_PER_PAGE);
            /* Write through the view into the read-only part, and through the original elsewhere. */
            size_t ro = (8 + (size_t)tp_rand_below(&seed, 8)) * WORDS_PER_PAGE + (size_t)tp_rand_below(&seed, WORDS_PER_PAGE);
            split_view[ro] = split_model[ro] = tp_rand(&seed);
            size_t rw = (size_t)tp_rand_below(&seed, 8) * WORDS_PER_PAGE + (size_t)tp_rand_below(&seed, WORDS_PER_PAGE);
            split[rw] = split_model[rw] = tp_rand(&seed);
        }
        if (use_memfd) {
            check_words("memfd a", round, memfd_a, memfd_model, memfd_pages * WORDS_PER_PAGE);
            check_words("memfd b", round, memfd_b, memfd_model + 4 * WORDS_PER_PAGE, 8 * WORDS_PER_PAGE);
            size_t at = (size_t)tp_rand_below(&seed, 8 * WORDS_PER_PAGE);
            memfd_b[at] = memfd_model[4 * WORDS_PER_PAGE + at] = tp_rand(&seed);
            size_t other = (size_t)tp_rand_below(&seed, memfd_pages * WORDS_PER_PAGE);
            memfd_a[other] = memfd_model[other] = tp_rand(&seed);
        }
        if (use_memfdfd) {
            /* Through the descriptor first, before any store or load in the mapping faults a page in:
             * the object itself must hold every page (read(2) of a hole gives zeros, no fault). */
            static uint64_t through_fd[8 * WORDS_PER_PAGE];
            if (pread(memfdfd, through_fd, sizeof through_fd, 0) != (ssize_t)sizeof through_fd)
                tp_syserr("pread(memfd)");
            check_words("memfd read through its descriptor", round, through_fd, memfdfd_model, memfdfd_pages * WORDS_PER_PAGE);
            check_words("memfd with fd", round, memfdfd_map, memfdfd_model, memfdfd_pages * WORDS_PER_PAGE);
            if (lseek(memfdfd, 0, SEEK_CUR) != memfdfd_offset)
                tp_selfcheck_fail("round %llu: memfd offset %lld, expected %lld", (unsigned long long)round,
                                  (long long)lseek(memfdfd, 0, SEEK_CUR), (long long)memfdfd_offset);
            uint64_t value = tp_rand(&seed);
            if (memfdfd_offset + 8 > (off_t)(memfdfd_pages * PAGE))
                memfdfd_offset = lseek(memfdfd, 0, SEEK_SET);
            if (write(memfdfd, &value, 8) != 8)
                tp_syserr("write(memfd)");
            memfdfd_model[memfdfd_offset / 8] = value;
            memfdfd_offset += 8;
            size_t at = (size_t)tp_rand_below(&seed, memfdfd_pages * WORDS_PER_PAGE);
            memfdfd_map[at] = memfdfd_model[at] = tp_rand(&seed);
            uint64_t back;
            if (pread(memfdfd, &back, 8, (off_t)(at * 8)) != 8 || back != memfdfd_model[at])
                tp_selfcheck_fail("round %llu: pread of memfd word %zu does not see the mapping's store", (unsigned long long)round, at);
        }
        tp_say("round %llu ok\n", (unsigned long long)round);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }
    uint64_t h = 0x5a5a;
    if (use_anon)
        h = tp_hash_words(h, anon_model, anon_pages * WORDS_PER_PAGE);
    if (use_split)
        h = tp_hash_words(h, split_model, split_pages * WORDS_PER_PAGE);
    if (use_memfd)
        h = tp_hash_words(h, memfd_model, memfd_pages * WORDS_PER_PAGE);
    if (use_memfdfd)
        h = tp_hash_words(h, memfdfd_model, memfdfd_pages * WORDS_PER_PAGE);
    tp_finish(h);
}
