/*
 * kvstore - a small in-memory key-value store under a YCSB-like load.
 *
 * The store is an open-addressing hash table (linear probing, capacity the
 * next power of two at or above 2 * --records) whose slots hold the
 * records themselves: key, key number, version and a --value-bytes value.
 * Keys are YCSB's: "user" followed by the decimal FNV-64 hash of the key
 * number (YCSB's Utils.fnvhash64, hashed insert order). Every value is a
 * pure function of (seed, key number, version).
 *
 * Load: insert key numbers 0..--records-1. Run: --ops operations of
 * --workload A (50% read, 50% update), B (95/5), C (100% read) or F (50%
 * read, 50% read-modify-write), in steps of --batch operations with a
 * --pause-us pause after each. Keys are chosen like YCSB's default
 * request distribution, ScrambledZipfianGenerator: a ZipfianGenerator
 * with theta 0.99 over 10^10 items (YCSB's precomputed zeta constant),
 * scrambled with fnvhash64 modulo --records. Its doubles come from the
 * seeded PRNG and its pow() is our own (exp and log from + - * / only), so
 * the key sequence does not depend on libm. Every read checks the value;
 * an update bumps the version and rewrites the value.
 *
 * stdout: a header, one line per step with the operation counts so far,
 * the final check and the checksum, all deterministic. With --report-ms N
 * (default 100; 0 = off) it also prints ops/s every N ms on stderr, with
 * "progress T N": the CLOCK_MONOTONIC seconds and the operations done.
 * The checksum covers every record (key number, version, value), found
 * by key; never a time or an address.
 */
#include "common.h"

#define KEY_BYTES 32u
#define ZIPF_THETA 0.99
#define ZIPF_ITEMS 10000000000ULL          /* YCSB ScrambledZipfian ITEM_COUNT */
#define ZIPF_ZETAN 26.46902820178302       /* YCSB's zeta(ITEM_COUNT, 0.99) */

enum workload { WORKLOAD_A, WORKLOAD_B, WORKLOAD_C, WORKLOAD_F };
static const char *const g_workload_names[] = { "A", "B", "C", "F", NULL };

struct record {
    char key[KEY_BYTES];     /* empty string = free slot */
    uint64_t keynum;
    uint64_t version;
    uint64_t value[];        /* value_words words */
};

struct table {
    unsigned char *slots;
    uint64_t capacity;       /* power of two */
    size_t stride_bytes;
    size_t value_words;
    uint64_t used;
};

static uint64_t g_seed;

/* ------------------------------------------------------------------ */
/* YCSB pieces                                                         */
/* ------------------------------------------------------------------ */

/* YCSB Utils.fnvhash64: FNV-1 over the 8 bytes, low byte first, then
 * Math.abs (which leaves Long.MIN_VALUE as it is). */
static uint64_t ycsb_fnvhash64(uint64_t value)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0; i < 8; i++) {
        h ^= value & 0xff;
        value >>= 8;
        h *= 1099511628211ULL;
    }
    if ((int64_t)h < 0 && h != 0x8000000000000000ULL)
        h = (uint64_t)(-(int64_t)h);
    return h;
}

static void key_for(uint64_t keynum, char *key)
{
    snprintf(key, KEY_BYTES, "user%llu",
             (unsigned long long)ycsb_fnvhash64(keynum));
}

/* exp and log from + - * / only, so every build and machine computes the
 * same bits (glibc's pow may differ between its FMA and non-FMA variants).
 * Accurate to about 1e-15 relative, plenty for a key distribution. */
static double own_exp(double z)
{
    const double ln2 = 0.6931471805599453;
    if (z < -700.0)
        return 0.0;
    if (z > 700.0)
        z = 700.0;
    double k = (double)(long long)(z / ln2 + (z >= 0 ? 0.5 : -0.5));
    double r = z - k * ln2;                     /* |r| <= ~ln2/2 */
    double term = 1.0, sum = 1.0;
    for (int n = 1; n < 24; n++) {
        term = term * r / n;
        sum += term;
    }
    uint64_t bits;
    double scale = 1.0;
    long long e = (long long)k;
    while (e > 1000) {                          /* not reached for |z| <= 700 */
        sum *= 0x1p1000;
        e -= 1000;
    }
    while (e < -1000) {
        sum *= 0x1p-1000;
        e += 1000;
    }
    bits = (uint64_t)(e + 1023) << 52;
    memcpy(&scale, &bits, sizeof(scale));
    return sum * scale;
}

static double own_log(double x)                 /* x > 0, normal */
{
    const double ln2 = 0.6931471805599453;
    uint64_t bits;
    memcpy(&bits, &x, sizeof(bits));
    long long e = (long long)((bits >> 52) & 0x7ff) - 1023;
    bits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    memcpy(&m, &bits, sizeof(m));               /* x = m * 2^e, m in [1,2) */
    if (m > 1.4142135623730951) {
        m *= 0.5;
        e++;
    }
    double s = (m - 1.0) / (m + 1.0);           /* |s| <= 0.1716 */
    double s2 = s * s, term = s, sum = 0.0;
    for (int n = 1; n < 40; n += 2) {
        sum += term / n;
        term *= s2;
    }
    return (double)e * ln2 + 2.0 * sum;
}

static double own_pow(double x, double y)
{
    if (x == 0.0)
        return 0.0;
    return own_exp(y * own_log(x));
}

/* YCSB ZipfianGenerator (Gray et al., "Quickly generating billion-record
 * synthetic databases"), items [0, items), with its zetan given. */
struct zipfian {
    uint64_t items;
    double theta, zetan, zeta2theta, alpha, eta;
};

static double zeta(uint64_t n, double theta)
{
    double sum = 0.0;
    for (uint64_t i = 0; i < n; i++)
        sum += 1.0 / own_pow((double)(i + 1), theta);
    return sum;
}

static void zipfian_init(struct zipfian *z, uint64_t items, double theta,
                         double zetan)
{
    z->items = items;
    z->theta = theta;
    z->zetan = zetan;
    z->zeta2theta = zeta(2, theta);
    z->alpha = 1.0 / (1.0 - theta);
    z->eta = (1.0 - own_pow(2.0 / (double)items, 1.0 - theta)) /
             (1.0 - z->zeta2theta / zetan);
}

static double random_unit(uint64_t *rng)        /* [0, 1) */
{
    return (double)(tp_rand(rng) >> 11) * 0x1p-53;
}

static uint64_t zipfian_next(const struct zipfian *z, uint64_t *rng)
{
    double u = random_unit(rng);
    double uz = u * z->zetan;
    if (uz < 1.0)
        return 0;
    if (uz < 1.0 + own_pow(0.5, z->theta))
        return 1;
    uint64_t ret = (uint64_t)((double)z->items *
                              own_pow(z->eta * u - z->eta + 1.0, z->alpha));
    return ret < z->items ? ret : z->items - 1;
}

/* YCSB ScrambledZipfianGenerator over [0, records). */
static uint64_t scrambled_zipfian_next(const struct zipfian *z,
                                       uint64_t records, uint64_t *rng)
{
    return ycsb_fnvhash64(zipfian_next(z, rng)) % records;
}

/* ------------------------------------------------------------------ */
/* The table                                                           */
/* ------------------------------------------------------------------ */

static uint64_t value_word(uint64_t keynum, uint64_t version, size_t i)
{
    uint64_t k = tp_mix64(g_seed ^ 0x6b7673746f7265ULL);
    k ^= tp_mix64(keynum * 0xd1b54a32d192ed03ULL + 0x99);
    k = tp_mix64(k ^ tp_mix64(version * 0x8cb92ba72f3d8dd7ULL + 0xaa));
    return tp_mix64(k + (uint64_t)(i + 1) * TP_GOLDEN);
}

static uint64_t key_hash(const char *key)       /* FNV-1a 64 */
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *key != '\0'; key++) {
        h ^= (unsigned char)*key;
        h *= 0x100000001b3ULL;
    }
    return tp_mix64(h);
}

static struct record *slot_at(const struct table *t, uint64_t i)
{
    return (struct record *)(t->slots + i * t->stride_bytes);
}

/* The record with `key`, or the free slot where it would go. */
static struct record *probe(const struct table *t, const char *key)
{
    uint64_t i = key_hash(key) & (t->capacity - 1);
    for (uint64_t n = 0; n < t->capacity; n++) {
        struct record *rec = slot_at(t, i);
        if (rec->key[0] == '\0' || strcmp(rec->key, key) == 0)
            return rec;
        i = (i + 1) & (t->capacity - 1);
    }
    tp_selfcheck_fail("hash table full (%llu slots)",
                      (unsigned long long)t->capacity);
}

static void write_value(struct record *rec, size_t value_words)
{
    for (size_t i = 0; i < value_words; i++)
        rec->value[i] = value_word(rec->keynum, rec->version, i);
}

static void check_record(const struct record *rec, uint64_t keynum,
                         size_t value_words, const char *when)
{
    if (rec->keynum != keynum)
        tp_selfcheck_fail("%s: key %s holds key number %llu, expected %llu",
                          when, rec->key, (unsigned long long)rec->keynum,
                          (unsigned long long)keynum);
    for (size_t i = 0; i < value_words; i++)
        if (rec->value[i] != value_word(keynum, rec->version, i))
            tp_selfcheck_fail("%s: key %s (version %llu) value word %zu is "
                              "%016llx, expected %016llx", when, rec->key,
                              (unsigned long long)rec->version, i,
                              (unsigned long long)rec->value[i],
                              (unsigned long long)value_word(
                                  keynum, rec->version, i));
}

static struct record *lookup(const struct table *t, uint64_t keynum,
                             const char *when)
{
    char key[KEY_BYTES];
    key_for(keynum, key);
    struct record *rec = probe(t, key);
    if (rec->key[0] == '\0')
        tp_selfcheck_fail("%s: key %s (key number %llu) not found", when,
                          key, (unsigned long long)keynum);
    return rec;
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    unsigned long long records = 10000, ops = 500000, batch = 25000;
    unsigned long long value_bytes = 128, pause_us = 5000, seed = 1;
    unsigned long long report_ms = 100;
    const char *workload_name = "A";
    const struct tp_opt opts[] = {
        { "records",     &records,     1, 100000000ULL, "records loaded before the run" },
        { "ops",         &ops,         0, 1ULL << 40, "operations in the run" },
        { "batch",       &batch,       1, 1ULL << 40, "operations per step (a pause follows each)" },
        { "value-bytes", &value_bytes, 8, 65536, "value size in bytes (a multiple of 8)" },
        { "pause-us",    &pause_us,    0, 60000000ULL, "pause after each step in microseconds" },
        { "seed",        &seed,        0, UINT64_MAX, "seed of the key choice, operation mix and values" },
        { "report-ms",   &report_ms,   0, 3600000ULL, "ops/s on stderr every this many ms; 0 = never" },
    };
    const struct tp_stropt string_opts[] = {
        { "workload", &workload_name, g_workload_names,
          "YCSB core workload: A 50/50 read/update, B 95/5, C read only, "
          "F read/read-modify-write" },
    };
    tp_parse_args_with_strings(argc, argv,
                               "An open-addressing key-value store under a "
                               "YCSB-like load with zipfian keys.",
                               opts, TP_NOPTS(opts), string_opts,
                               TP_NOPTS(string_opts));
    if (value_bytes % 8 != 0)
        tp_usage_error("--value-bytes %llu is not a multiple of 8",
                       value_bytes);
    g_seed = seed;
    enum workload workload = WORKLOAD_A;
    for (int w = 0; g_workload_names[w] != NULL; w++)
        if (workload_name == g_workload_names[w])
            workload = (enum workload)w;

    struct table t;
    t.value_words = (size_t)value_bytes / 8;
    t.stride_bytes = sizeof(struct record) + (size_t)value_bytes;
    t.capacity = 1;
    while (t.capacity < 2 * records)
        t.capacity <<= 1;
    t.used = 0;
    t.slots = calloc(t.capacity, t.stride_bytes);
    if (t.slots == NULL)
        tp_syserr("calloc %llu slots", (unsigned long long)t.capacity);

    tp_say("kvstore: records=%llu ops=%llu workload=%s value-bytes=%llu "
           "seed=%llu\n", records, ops, workload_name, value_bytes, seed);

    for (uint64_t n = 0; n < records; n++) {
        char key[KEY_BYTES];
        key_for(n, key);
        struct record *rec = probe(&t, key);
        if (rec->key[0] != '\0')
            tp_selfcheck_fail("load: key %s inserted twice", key);
        memcpy(rec->key, key, KEY_BYTES);
        rec->keynum = n;
        rec->version = 0;
        write_value(rec, t.value_words);
        t.used++;
    }
    tp_say("loaded %llu records in %llu slots\n", records,
           (unsigned long long)t.capacity);

    struct zipfian zipf;
    zipfian_init(&zipf, ZIPF_ITEMS, ZIPF_THETA, ZIPF_ZETAN);
    uint64_t rng = tp_mix64(seed ^ 0x7963736bULL);
    uint64_t reads = 0, updates = 0, rmws = 0, read_hash = 0;
    const uint64_t steps = (ops + batch - 1) / batch;
    const double start = tp_now();
    double last_report = start;
    uint64_t ops_at_last_report = 0;

    for (uint64_t s = 0; s < steps; s++) {
        tp_rendezvous(s + 1);
        uint64_t first = s * batch;
        uint64_t end = first + batch < ops ? first + batch : ops;
        for (uint64_t o = first; o < end; o++) {
            uint64_t keynum = scrambled_zipfian_next(&zipf, records, &rng);
            uint64_t c = tp_rand_below(&rng, 100);
            int do_read, do_write;
            switch (workload) {
            case WORKLOAD_A: do_read = c < 50; do_write = !do_read; break;
            case WORKLOAD_B: do_read = c < 95; do_write = !do_read; break;
            case WORKLOAD_C: do_read = 1; do_write = 0; break;
            case WORKLOAD_F: do_read = 1; do_write = c >= 50; break;
            default: do_read = 1; do_write = 0; break;
            }
            struct record *rec = lookup(&t, keynum, "run");
            if (do_read) {
                check_record(rec, keynum, t.value_words, "read");
                read_hash = tp_hash_word(read_hash, rec->version ^ keynum);
            }
            if (do_write) {
                rec->version++;
                write_value(rec, t.value_words);
            }
            if (do_read && do_write)
                rmws++;
            else if (do_read)
                reads++;
            else
                updates++;

            if (report_ms != 0 && (o & 1023) == 1023) {
                double now = tp_now();
                if (now - last_report >= (double)report_ms / 1000.0) {
                    fprintf(stderr, "kvstore: %.0f ops/s progress %.6f %llu\n",
                            (double)(o + 1 - ops_at_last_report) /
                                (now - last_report),
                            now, (unsigned long long)(o + 1));
                    last_report = now;
                    ops_at_last_report = o + 1;
                }
            }
        }
        tp_say("step %llu/%llu reads=%llu updates=%llu rmw=%llu\n",
               (unsigned long long)(s + 1), (unsigned long long)steps,
               (unsigned long long)reads, (unsigned long long)updates,
               (unsigned long long)rmws);
        if (s + 1 < steps)
            tp_nanosleep_ns(pause_us * 1000ULL);
    }

    /* Final: every record by key, and the table's bookkeeping. */
    uint64_t sum = tp_hash_mix(0x6b7673ULL, records);
    uint64_t version_sum = 0, hottest = 0, hottest_version = 0;
    for (uint64_t n = 0; n < records; n++) {
        struct record *rec = lookup(&t, n, "final");
        check_record(rec, n, t.value_words, "final");
        sum = tp_hash_mix(sum, n);
        sum = tp_hash_mix(sum, rec->version);
        sum = tp_hash_words(sum, rec->value, t.value_words);
        version_sum += rec->version;
        if (rec->version > hottest_version) {
            hottest_version = rec->version;
            hottest = n;
        }
    }
    uint64_t used = 0;
    for (uint64_t i = 0; i < t.capacity; i++)
        if (slot_at(&t, i)->key[0] != '\0')
            used++;
    if (used != records || t.used != records)
        tp_selfcheck_fail("final: %llu slots used, %llu records loaded",
                          (unsigned long long)used, records);
    if (version_sum != updates + rmws)
        tp_selfcheck_fail("final: versions add up to %llu, but %llu updates "
                          "and %llu read-modify-writes were made",
                          (unsigned long long)version_sum,
                          (unsigned long long)updates,
                          (unsigned long long)rmws);
    if (report_ms != 0)
        fprintf(stderr, "kvstore: %.0f ops/s overall\n",
                (double)ops / (tp_now() - start));
    tp_say("verified records=%llu hottest=user%llu writes=%llu\n", records,
           (unsigned long long)ycsb_fnvhash64(hottest),
           (unsigned long long)hottest_version);
    sum = tp_hash_mix(sum, read_hash);
    sum = tp_hash_mix(sum, reads << 1 ^ updates);
    free(t.slots);
    tp_finish(tp_hash_mix(sum, rmws));
}
