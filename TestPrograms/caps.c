/*
 * caps - a process with a reduced capability set (libcap). Run as root.
 *
 * Start-up:
 *   1. require CAP_KILL and CAP_SETPCAP to be effective (else exit 3);
 *   2. drop CAP_NET_RAW from the bounding set (prctl PR_CAPBSET_DROP);
 *   3. with libcap (cap_get_proc / cap_set_flag / cap_set_proc) clear
 *      CAP_SYS_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE and CAP_CHOWN from the
 *      effective, permitted and inheritable sets;
 *   4. set no_new_privs (prctl PR_SET_NO_NEW_PRIVS).
 *
 * Each round: one deterministic update of a heap buffer, then checks with
 * libcap that the four capabilities are absent from all three sets
 * (cap_get_proc), that CAP_NET_RAW is absent from the bounding set
 * (cap_get_bound), that CAP_KILL is still effective, and that
 * no_new_privs is still 1. Any difference is a self-check failure. If the
 * round number equals --try-regain-at, it tries to raise CAP_SYS_ADMIN
 * into the effective set with cap_set_proc: that must fail with EPERM
 * ("regain refused"); if it works the program prints "regain SUCCEEDED"
 * and fails the self-check.
 *
 * The checksum covers the computation and the checked outcomes (the
 * expected bits and the regain result), never the full capability masks,
 * which depend on the environment the program was started in.
 */
#include "common.h"

#include <sys/capability.h>
#include <sys/prctl.h>
#include <unistd.h>

#define BUF_BYTES (64u * 1024u)
#define BUF_WORDS (BUF_BYTES / sizeof(uint64_t))

static const cap_value_t g_dropped[] = {
    CAP_SYS_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE, CAP_CHOWN,
};
#define NDROPPED (sizeof(g_dropped) / sizeof(g_dropped[0]))

static const cap_flag_t g_sets[] = { CAP_EFFECTIVE, CAP_PERMITTED,
                                     CAP_INHERITABLE };
static const char *const g_set_names[] = { "effective", "permitted",
                                           "inheritable" };
#define NSETS (sizeof(g_sets) / sizeof(g_sets[0]))

/* Regain outcomes (hashed). */
#define REGAIN_NOT_TRIED 0
#define REGAIN_REFUSED   1

static void init_buf(uint64_t *buf)
{
    uint64_t s = tp_mix64(0x63617073ULL);
    for (size_t i = 0; i < BUF_WORDS; i++)
        buf[i] = tp_rand(&s);
}

static void update_buf(uint64_t *buf, uint64_t r)
{
    uint64_t k = tp_mix64(0x6361707372ULL + r * TP_GOLDEN);
    uint64_t carry = k;
    for (size_t i = 0; i < BUF_WORDS; i++) {
        buf[i] = tp_mix64(buf[i] + carry) ^ i;
        carry = buf[i] ^ k;
    }
}

static uint64_t hash_buf(const uint64_t *buf, uint64_t r)
{
    return tp_mix64(tp_hash_words(tp_hash_mix(0x63617073ULL, r), buf,
                                  BUF_WORDS));
}

static const char *cap_name_static(cap_value_t c)
{
    switch (c) {
    case CAP_SYS_ADMIN:  return "CAP_SYS_ADMIN";
    case CAP_NET_RAW:    return "CAP_NET_RAW";
    case CAP_SYS_PTRACE: return "CAP_SYS_PTRACE";
    case CAP_CHOWN:      return "CAP_CHOWN";
    case CAP_KILL:       return "CAP_KILL";
    case CAP_SETPCAP:    return "CAP_SETPCAP";
    default:             return "CAP_?";
    }
}

static cap_flag_value_t get_flag(cap_t caps, cap_value_t c, cap_flag_t set)
{
    cap_flag_value_t v = CAP_CLEAR;
    if (cap_get_flag(caps, c, set, &v) != 0)
        tp_syserr("cap_get_flag(%s)", cap_name_static(c));
    return v;
}

/* All per-round checks; returns a hash of the checked (expected) bits. */
static uint64_t check_caps(uint64_t round, const char *where)
{
    uint64_t h = tp_hash_mix(0x636865636bULL, NDROPPED);
    cap_t caps = cap_get_proc();
    if (caps == NULL)
        tp_syserr("cap_get_proc");
    for (size_t i = 0; i < NDROPPED; i++) {
        for (size_t s = 0; s < NSETS; s++) {
            cap_flag_value_t v = get_flag(caps, g_dropped[i], g_sets[s]);
            if (v != CAP_CLEAR)
                tp_selfcheck_fail("round %llu (%s): %s is back in the %s set",
                                  (unsigned long long)round, where,
                                  cap_name_static(g_dropped[i]),
                                  g_set_names[s]);
            h = tp_hash_mix(h, ((uint64_t)g_dropped[i] << 8) | (s << 1) | v);
        }
    }
    cap_flag_value_t kill_eff = get_flag(caps, CAP_KILL, CAP_EFFECTIVE);
    if (kill_eff != CAP_SET)
        tp_selfcheck_fail("round %llu (%s): CAP_KILL is no longer effective",
                          (unsigned long long)round, where);
    h = tp_hash_mix(h, ((uint64_t)CAP_KILL << 8) | kill_eff);
    if (cap_free(caps) != 0)
        tp_syserr("cap_free");

    int bound = cap_get_bound(CAP_NET_RAW);
    if (bound < 0)
        tp_syserr("cap_get_bound(CAP_NET_RAW)");
    if (bound != 0)
        tp_selfcheck_fail("round %llu (%s): CAP_NET_RAW is back in the "
                          "bounding set", (unsigned long long)round, where);
    h = tp_hash_mix(h, ((uint64_t)CAP_NET_RAW << 8) | 0x80 | (uint64_t)bound);

    int nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
    if (nnp != 1)
        tp_selfcheck_fail("round %llu (%s): PR_GET_NO_NEW_PRIVS is %d, "
                          "expected 1", (unsigned long long)round, where, nnp);
    return tp_hash_mix(h, (uint64_t)nnp);
}

static void drop_caps(void)
{
    cap_t caps = cap_get_proc();
    if (caps == NULL)
        tp_syserr("cap_get_proc");
    /* Preconditions: this program must start with root's capabilities. */
    if (get_flag(caps, CAP_KILL, CAP_EFFECTIVE) != CAP_SET ||
        get_flag(caps, CAP_SETPCAP, CAP_EFFECTIVE) != CAP_SET) {
        errno = EPERM;
        tp_syserr("CAP_KILL and CAP_SETPCAP must be effective at start "
                  "(run as root)");
    }

    /* Bounding set first: PR_CAPBSET_DROP needs CAP_SETPCAP (kept). */
    if (prctl(PR_CAPBSET_DROP, CAP_NET_RAW, 0, 0, 0) != 0)
        tp_syserr("prctl(PR_CAPBSET_DROP, CAP_NET_RAW)");

    for (size_t s = 0; s < NSETS; s++)
        if (cap_set_flag(caps, g_sets[s], (int)NDROPPED, g_dropped,
                         CAP_CLEAR) != 0)
            tp_syserr("cap_set_flag(%s)", g_set_names[s]);
    if (cap_set_proc(caps) != 0)
        tp_syserr("cap_set_proc (drop)");
    if (cap_free(caps) != 0)
        tp_syserr("cap_free");

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        tp_syserr("prctl(PR_SET_NO_NEW_PRIVS)");
}

/* Try to put CAP_SYS_ADMIN back into the effective set. */
static uint64_t try_regain(uint64_t round)
{
    cap_t caps = cap_get_proc();
    if (caps == NULL)
        tp_syserr("cap_get_proc");
    const cap_value_t admin = CAP_SYS_ADMIN;
    if (cap_set_flag(caps, CAP_EFFECTIVE, 1, &admin, CAP_SET) != 0)
        tp_syserr("cap_set_flag(regain)");
    errno = 0;
    int rc = cap_set_proc(caps);
    int err = errno;
    if (cap_free(caps) != 0)
        tp_syserr("cap_free");
    if (rc == 0) {
        tp_say("round %llu: regain SUCCEEDED\n", (unsigned long long)round);
        tp_selfcheck_fail("round %llu: cap_set_proc raised CAP_SYS_ADMIN "
                          "into the effective set", (unsigned long long)round);
    }
    if (err != EPERM)
        tp_selfcheck_fail("round %llu: cap_set_proc(regain) failed with "
                          "errno %d (%s), expected EPERM",
                          (unsigned long long)round, err, strerror(err));
    tp_say("round %llu: regain refused\n", (unsigned long long)round);
    return REGAIN_REFUSED;
}

int main(int argc, char **argv)
{
    unsigned long long rounds = 100, pause_us = 20000, regain_at = 0;
    const struct tp_opt opts[] = {
        { "rounds",        &rounds,    0, 100000000ULL, "number of rounds" },
        { "pause-us",      &pause_us,  0, 60000000ULL, "pause per round in microseconds" },
        { "try-regain-at", &regain_at, 0, 100000000ULL,
          "round (1-based) that tries to re-raise CAP_SYS_ADMIN; 0 = never" },
    };
    tp_parse_args(argc, argv,
                  "Computation with dropped capabilities (libcap); checks "
                  "every round that they stay dropped. Run as root.",
                  opts, TP_NOPTS(opts));
    if (regain_at > rounds)
        tp_usage_error("--try-regain-at %llu is beyond --rounds %llu",
                       regain_at, rounds);

    uint64_t *buf = malloc(BUF_BYTES);
    uint64_t *replay = malloc(BUF_BYTES);
    if (buf == NULL || replay == NULL)
        tp_syserr("malloc");
    init_buf(buf);

    tp_say("caps: rounds=%llu pause-us=%llu try-regain-at=%llu\n",
           rounds, pause_us, regain_at);
    drop_caps();
    uint64_t sum = tp_hash_mix(0x63617073ULL, rounds);
    sum = tp_hash_mix(sum, check_caps(0, "after drop"));
    tp_say("dropped CAP_SYS_ADMIN CAP_NET_RAW CAP_SYS_PTRACE CAP_CHOWN\n");

    for (uint64_t r = 0; r < rounds; r++) {
        tp_rendezvous(r + 1);
        update_buf(buf, r);
        uint64_t h = hash_buf(buf, r);
        uint64_t st = check_caps(r + 1, "round");
        uint64_t regain = REGAIN_NOT_TRIED;
        if (r + 1 == regain_at) {
            regain = try_regain(r + 1);
            st = tp_hash_mix(st, check_caps(r + 1, "after regain attempt"));
        }
        sum = tp_hash_mix(sum, h);
        sum = tp_hash_mix(sum, st);
        sum = tp_hash_mix(sum, regain);

        tp_say("round %llu/%llu state=%016llx\n",
               (unsigned long long)(r + 1), rounds, (unsigned long long)h);
        if (r + 1 < rounds)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    init_buf(replay);
    for (uint64_t r = 0; r < rounds; r++)
        update_buf(replay, r);
    for (size_t i = 0; i < BUF_WORDS; i++)
        if (buf[i] != replay[i])
            tp_selfcheck_fail("replay: word %zu is %016llx, expected %016llx",
                              i, (unsigned long long)buf[i],
                              (unsigned long long)replay[i]);
    sum = tp_hash_mix(sum, check_caps(rounds, "end"));
    sum = tp_hash_mix(sum, hash_buf(buf, rounds));
    tp_say("replay ok\n");
    free(buf);
    free(replay);
    tp_finish(sum);
}
