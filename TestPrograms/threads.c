/*
 * threads - four pthreads (by default) working in lock-step rounds: a mutex,
 * two condition variables, thread-local data, and a private heap buffer per
 * worker, so a freeze catches several threads at once (the main thread at
 * its rendezvous, the workers blocked on a condition variable) and a
 * post-copy restore takes faults from several threads.
 *
 * Each round every worker mixes its thread-local state with the round number
 * into every page of its own buffer, then adds a digest into its own slot of
 * a shared table under the mutex. The main thread starts a round, waits for
 * all workers, prints the round's combined digest, and checks each worker's
 * buffer against a recomputation. Output is independent of scheduling.
 *
 * A step is a round (1..--rounds); the rendezvous is in the main thread
 * before it starts that round, while every worker waits for it.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>

#define MAX_WORKERS 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t round_started = PTHREAD_COND_INITIALIZER;
static pthread_cond_t round_done = PTHREAD_COND_INITIALIZER;
static uint64_t current_round;      /* 0: not started; rounds + 1: stop */
static unsigned finished_workers;
static uint64_t slot_digest[MAX_WORKERS];
static uint64_t worker_pages = 16;
static uint64_t base_seed = 1;

static __thread uint64_t tls_state;
static __thread unsigned tls_index;

struct worker {
    pthread_t thread;
    unsigned index;
    uint64_t *buffer;
};

static uint64_t page_value(unsigned index, uint64_t round, uint64_t page, uint64_t word, uint64_t state)
{
    return tp_mix64(state ^ tp_mix64((uint64_t)index << 48 ^ round << 32 ^ page << 12 ^ word));
}

static void *work(void *argument)
{
    struct worker *self = argument;
    tls_index = self->index;
    tls_state = tp_mix64(base_seed + self->index);
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (current_round == seen)
            pthread_cond_wait(&round_started, &lock);
        seen = current_round;
        pthread_mutex_unlock(&lock);
        if (seen == UINT64_MAX)
            return NULL;

        uint64_t digest = 0;
        for (uint64_t page = 0; page < worker_pages; page++) {
            uint64_t *words = self->buffer + page * 512;
            for (uint64_t word = 0; word < 512; word += 8) {
                words[word] = page_value(tls_index, seen, page, word, tls_state);
                digest = tp_hash_word(digest, words[word]);
            }
        }
        tls_state = tp_mix64(tls_state ^ digest);

        pthread_mutex_lock(&lock);
        slot_digest[tls_index] = digest;
        finished_workers++;
        pthread_cond_signal(&round_done);
        pthread_mutex_unlock(&lock);
    }
}

int main(int argc, char **argv)
{
    unsigned long long workers = 4, rounds = 20, pages = 16, seed = 1, pause_us = 0;
    const struct tp_opt opts[] = {
        { "workers",  &workers,  1, MAX_WORKERS, "worker threads besides main" },
        { "rounds",   &rounds,   0, 100000000, "lock-step rounds" },
        { "pages",    &pages,    1, 1 << 20, "pages of private heap buffer per worker" },
        { "seed",     &seed,     0, UINT64_MAX, "seed of the thread-local states" },
        { "pause-us", &pause_us, 0, 60000000, "pause after each round in microseconds" },
    };
    tp_parse_args(argc, argv, "Four pthreads in lock-step rounds: mutex, condition variables, thread-local data.",
                  opts, TP_NOPTS(opts));
    worker_pages = pages;
    base_seed = seed;
    tp_say("threads: workers=%llu rounds=%llu pages=%llu seed=%llu\n", workers, rounds, pages, seed);

    struct worker team[MAX_WORKERS];
    uint64_t expected_state[MAX_WORKERS];
    for (unsigned i = 0; i < workers; i++) {
        team[i].index = i;
        team[i].buffer = malloc(pages * 4096);
        if (team[i].buffer == NULL)
            tp_syserr("malloc worker buffer");
        expected_state[i] = tp_mix64(seed + i);
        if (pthread_create(&team[i].thread, NULL, work, &team[i]) != 0)
            tp_syserr("pthread_create");
    }

    uint64_t checksum = tp_hash_mix(0x746872656164ULL, workers);
    for (uint64_t round = 1; round <= rounds; round++) {
        tp_rendezvous(round);
        pthread_mutex_lock(&lock);
        finished_workers = 0;
        current_round = round;
        pthread_cond_broadcast(&round_started);
        while (finished_workers < workers)
            pthread_cond_wait(&round_done, &lock);
        uint64_t combined = 0;
        for (unsigned i = 0; i < workers; i++)
            combined = tp_hash_mix(combined, slot_digest[i]);
        pthread_mutex_unlock(&lock);

        /* Recompute every worker's buffer from its expected thread-local state. */
        for (unsigned i = 0; i < workers; i++) {
            uint64_t digest = 0;
            for (uint64_t page = 0; page < pages; page++) {
                for (uint64_t word = 0; word < 512; word += 8) {
                    uint64_t value = page_value(i, round, page, word, expected_state[i]);
                    if (team[i].buffer[page * 512 + word] != value)
                        tp_selfcheck_fail("round %llu: worker %u page %llu word %llu is %016llx, expected %016llx",
                                          (unsigned long long)round, i, (unsigned long long)page,
                                          (unsigned long long)word, (unsigned long long)team[i].buffer[page * 512 + word],
                                          (unsigned long long)value);
                    digest = tp_hash_word(digest, value);
                }
            }
            if (digest != slot_digest[i])
                tp_selfcheck_fail("round %llu: worker %u digest differs", (unsigned long long)round, i);
            expected_state[i] = tp_mix64(expected_state[i] ^ digest);
        }
        checksum = tp_hash_mix(checksum, combined);
        tp_say("round %llu %016llx\n", (unsigned long long)round, (unsigned long long)combined);
        if (pause_us)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    pthread_mutex_lock(&lock);
    current_round = UINT64_MAX;
    pthread_cond_broadcast(&round_started);
    pthread_mutex_unlock(&lock);
    for (unsigned i = 0; i < workers; i++)
        if (pthread_join(team[i].thread, NULL) != 0)
            tp_syserr("pthread_join");
    tp_finish(checksum);
}
