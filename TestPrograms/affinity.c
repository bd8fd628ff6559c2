/*
 * affinity - a process that asks for its CPUs and reports, at its end, the
 * CPUs it was left with: CPU affinity is state a migration must carry.
 *
 * With --cpus MASK (a bit per CPU, 0 = leave the mask it started with) the
 * main thread sets its own mask first. With --thread-cpus MASK a second
 * thread is started, which sets its own mask to MASK. Both then sleep
 * --rounds times for --sleep-ms (the main thread's rounds are the steps of
 * --rendezvous), checking a small heap state after each wake-up. At the end
 * each thread reads its mask again (sched_getaffinity) and the program prints
 * "affinity main=LIST [thread=LIST]" and a checksum that covers both masks:
 * a migrated run that lost a mask ends with another checksum than an
 * unmigrated run.
 */
#include "common.h"

#include <pthread.h>
#include <sched.h>

#define HEAP_WORDS 4096

static unsigned long long rounds = 40, sleep_ms = 25, thread_cpus = 0;
static cpu_set_t thread_final;

static void set_mask(unsigned long long mask, const char *who)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int cpu = 0; cpu < 64; cpu++)
        if (mask & (1ULL << cpu))
            CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        tp_syserr("sched_setaffinity(%s, %#llx)", who, mask);
}

/* The mask as a CPU list ("0-1", "1"), into buf. */
static void describe(const cpu_set_t *set, char *buf, size_t size)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, set))
            continue;
        int last = cpu;
        while (last + 1 < CPU_SETSIZE && CPU_ISSET(last + 1, set))
            last++;
        int n = last == cpu
            ? snprintf(buf + used, size - used, "%s%d", used ? "," : "", cpu)
            : snprintf(buf + used, size - used, "%s%d-%d", used ? "," : "", cpu, last);
        if (n < 0 || (size_t)n >= size - used)
            break;
        used += (size_t)n;
        cpu = last;
    }
}

static uint64_t hash_set(uint64_t h, const cpu_set_t *set)
{
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, set))
            h = tp_hash_mix(h, (uint64_t)cpu + 1);
    return h;
}

static void *second_thread(void *argument)
{
    (void)argument;
    set_mask(thread_cpus, "thread");
    for (unsigned long long r = 0; r < rounds; r++)
        tp_nanosleep_ns(sleep_ms * 1000000ULL);
    if (sched_getaffinity(0, sizeof thread_final, &thread_final) != 0)
        tp_syserr("sched_getaffinity(thread)");
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned long long cpus = 0;
    const struct tp_opt opts[] = {
        { "cpus",        &cpus,        0, UINT64_MAX, "the main thread's CPU mask, a bit per CPU (0: leave it)" },
        { "thread-cpus", &thread_cpus, 0, UINT64_MAX, "start a second thread with this CPU mask (0: no second thread)" },
        { "rounds",      &rounds,      0, 100000000ULL, "number of sleep rounds" },
        { "sleep-ms",    &sleep_ms,    0, 3600000ULL, "milliseconds asleep per round" },
    };
    tp_parse_args(argc, argv,
                  "Sets its CPU masks, sleeps, and reports the masks it ends with.",
                  opts, TP_NOPTS(opts));
    if (cpus != 0)
        set_mask(cpus, "main");
    uint64_t *heap = calloc(HEAP_WORDS, sizeof(uint64_t));
    if (heap == NULL)
        tp_syserr("calloc");
    pthread_t thread;
    if (thread_cpus != 0 && pthread_create(&thread, NULL, second_thread, NULL) != 0)
        tp_syserr("pthread_create");

    tp_say("affinity: cpus=%#llx thread-cpus=%#llx rounds=%llu sleep-ms=%llu\n", cpus, thread_cpus, rounds, sleep_ms);
    uint64_t state = 0x6166666eULL;
    for (unsigned long long r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        for (size_t i = 0; i < HEAP_WORDS; i++)
            heap[i] = tp_mix64(heap[i] ^ state ^ i);
        uint64_t before = tp_hash_words(r, heap, HEAP_WORDS);
        tp_nanosleep_ns(sleep_ms * 1000000ULL);
        if (tp_hash_words(r, heap, HEAP_WORDS) != before)
            tp_selfcheck_fail("round %llu: the heap changed while asleep", r + 1);
        state = tp_mix64(state + before);
    }
    if (thread_cpus != 0 && pthread_join(thread, NULL) != 0)
        tp_syserr("pthread_join");

    cpu_set_t main_final;
    if (sched_getaffinity(0, sizeof main_final, &main_final) != 0)
        tp_syserr("sched_getaffinity(main)");
    char main_list[256], thread_list[256] = "";
    describe(&main_final, main_list, sizeof main_list);
    uint64_t sum = hash_set(tp_hash_mix(state, rounds), &main_final);
    if (thread_cpus != 0) {
        describe(&thread_final, thread_list, sizeof thread_list);
        sum = hash_set(tp_hash_mix(sum, 0x74687264ULL), &thread_final);
        tp_say("affinity main=%s thread=%s\n", main_list, thread_list);
    } else {
        tp_say("affinity main=%s\n", main_list);
    }
    free(heap);
    tp_finish(sum);
}
