// The dumped marks' keyed code, HMAC-SHA256 (RFC 2104) over OpenSSL's SHA-256, page after page without
// an allocation or a copy: the two pad states are hashed once per key and copied (a struct copy) per
// page. It is the same code as swift-crypto's HMAC<SHA256> over the same bytes (PageCodingTests checks
// that, byte for byte); only the per-call costs of the generic Swift path are gone.
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>
#include <string.h>
#include "CSys.h"

_Static_assert(sizeof(SHA256_CTX) <= sizeof(((csys_page_mac_key *)0)->inner), "SHA256_CTX larger than its room");

void csys_page_mac_init(csys_page_mac_key *key, const uint8_t *keyBytes, size_t keyByteCount, const uint8_t *label, size_t labelByteCount) {
    uint8_t block[SHA256_CBLOCK];
    uint8_t hashedKey[SHA256_DIGEST_LENGTH];
    // A key longer than a block is hashed first (RFC 2104); ours are 32 bytes.
    if (keyByteCount > SHA256_CBLOCK) {
        SHA256(keyBytes, keyByteCount, hashedKey);
        keyBytes = hashedKey;
        keyByteCount = SHA256_DIGEST_LENGTH;
    }
    SHA256_CTX *inner = (SHA256_CTX *)key->inner, *outer = (SHA256_CTX *)key->outer;
    memset(block, 0x36, sizeof block);
    for (size_t index = 0; index < keyByteCount; index++) block[index] ^= keyBytes[index];
    SHA256_Init(inner);
    SHA256_Update(inner, block, sizeof block);
    if (labelByteCount > 0) SHA256_Update(inner, label, labelByteCount);
    memset(block, 0x5c, sizeof block);
    for (size_t index = 0; index < keyByteCount; index++) block[index] ^= keyBytes[index];
    SHA256_Init(outer);
    SHA256_Update(outer, block, sizeof block);
    memset(block, 0, sizeof block);
    memset(hashedKey, 0, sizeof hashedKey);
}

static void store_le64(uint8_t *target, uint64_t value) {
    for (int index = 0; index < 8; index++) target[index] = (uint8_t)(value >> (8 * index));
}

uint64_t csys_page_mac(const csys_page_mac_key *key, uint64_t generation, uint64_t address, const uint8_t *headerCode, size_t headerCodeByteCount,
                       const void *page, size_t pageByteCount) {
    // As BinaryWriter lays them out: two little-endian words, then the header code with its u32 count.
    uint8_t prefix[20];
    uint8_t digest[SHA256_DIGEST_LENGTH];
    store_le64(prefix, generation);
    store_le64(prefix + 8, address);
    for (int index = 0; index < 4; index++) prefix[16 + index] = (uint8_t)((uint64_t)headerCodeByteCount >> (8 * index));
    SHA256_CTX context;
    memcpy(&context, key->inner, sizeof context);
    SHA256_Update(&context, prefix, sizeof prefix);
    SHA256_Update(&context, headerCode, headerCodeByteCount);
    SHA256_Update(&context, page, pageByteCount);
    SHA256_Final(digest, &context);
    memcpy(&context, key->outer, sizeof context);
    SHA256_Update(&context, digest, sizeof digest);
    SHA256_Final(digest, &context);
    uint64_t word = 0;
    for (int index = 0; index < 8; index++) word |= (uint64_t)digest[index] << (8 * index);
    return word;
}
