// The dumped marks' keyed code, HMAC-SHA256, page after page without a Swift allocation or a copy:
// OpenSSL's own HMAC (EVP_MAC "HMAC" with SHA-256), keyed and fed its label once, then duplicated per
// page (the duplicate carries the keyed state, so the key is never processed again). No cryptography is
// written here: this only calls libcrypto. It is the same code as swift-crypto's HMAC<SHA256> over the
// same bytes (PageCodingTests checks that, byte for byte); only the per-call costs of the generic Swift
// path are gone.
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include "CSys.h"

// A failure of libcrypto on a context it made is not an input error: a wrong code would be worse than
// stopping (a page would pass or fail its check for a reason that is not its bytes).
static void page_mac_failed(const char *what) {
    fprintf(stderr, "fammig: OpenSSL HMAC-SHA256 failed (%s)\n", what);
    abort();
}

int csys_page_mac_init(csys_page_mac_key *key, const uint8_t *keyBytes, size_t keyByteCount, const uint8_t *label, size_t labelByteCount) {
    key->context = NULL;
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) return -1;
    EVP_MAC_CTX *context = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);
    if (context == NULL) return -1;
    char digest[] = "SHA256";
    OSSL_PARAM parameters[] = { OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0), OSSL_PARAM_construct_end() };
    if (EVP_MAC_init(context, keyBytes, keyByteCount, parameters) != 1
        || (labelByteCount > 0 && EVP_MAC_update(context, label, labelByteCount) != 1)) {
        EVP_MAC_CTX_free(context);
        return -1;
    }
    key->context = context;
    return 0;
}

void csys_page_mac_free(csys_page_mac_key *key) {
    EVP_MAC_CTX_free(key->context);  // it cleanses the keyed state
    key->context = NULL;
}

static void store_le64(uint8_t *target, uint64_t value) {
    for (int index = 0; index < 8; index++) target[index] = (uint8_t)(value >> (8 * index));
}

uint64_t csys_page_mac(const csys_page_mac_key *key, uint64_t generation, uint64_t address, const uint8_t *headerCode, size_t headerCodeByteCount,
                       const void *page, size_t pageByteCount) {
    // As BinaryWriter lays them out: two little-endian words, then the header code with its u32 count.
    uint8_t prefix[20];
    store_le64(prefix, generation);
    store_le64(prefix + 8, address);
    for (int index = 0; index < 4; index++) prefix[16 + index] = (uint8_t)((uint64_t)headerCodeByteCount >> (8 * index));
    // Reading the keyed context from several threads at once is safe: a duplicate only reads it.
    EVP_MAC_CTX *context = EVP_MAC_CTX_dup(key->context);
    if (context == NULL) page_mac_failed("EVP_MAC_CTX_dup");
    uint8_t digest[32];
    size_t digestByteCount = 0;
    if (EVP_MAC_update(context, prefix, sizeof prefix) != 1 || EVP_MAC_update(context, headerCode, headerCodeByteCount) != 1
        || EVP_MAC_update(context, page, pageByteCount) != 1 || EVP_MAC_final(context, digest, &digestByteCount, sizeof digest) != 1
        || digestByteCount != sizeof digest) {
        page_mac_failed("a page's code");
    }
    EVP_MAC_CTX_free(context);
    uint64_t word = 0;
    for (int index = 0; index < 8; index++) word |= (uint64_t)digest[index] << (8 * index);
    return word;
}
