// Why this file exists: every dumped page gets a keyed code (its mark), and every page installed on the
// target is checked against it: 131,072 codes for 512 MiB on each side. Through swift-crypto's generic
// HMAC each code costs about as much again as its SHA-256 (generic metadata, copy-on-write hash states,
// allocations), and two threads coding at once contend on the runtime's metadata cache. This is OpenSSL's
// own HMAC-SHA256 (CSys/pagecode.c only calls libcrypto's EVP_MAC): keyed once, duplicated per page,
// straight from the bytes where they lie. PageCodingTests checks it against swift-crypto's.
internal import CSys

/// HMAC-SHA256 under one key with its label already fed, prepared once. Immutable after `init` (every
/// code duplicates the keyed context), so any number of threads may code with one at once.
public final class PageMACKey: @unchecked Sendable {
    /// Invariant: allocated and initialized in `init`, never written again, zeroed and freed in `deinit`.
    private let key: UnsafeMutablePointer<csys_page_mac_key>

    public init(keyBytes: [UInt8], label: [UInt8]) {
        key = .allocate(capacity: 1)
        key.initialize(to: csys_page_mac_key())
        let status = keyBytes.withUnsafeBufferPointer { keyBuffer in
            label.withUnsafeBufferPointer { labelBuffer in
                csys_page_mac_init(key, keyBuffer.baseAddress, keyBuffer.count, labelBuffer.baseAddress, labelBuffer.count)
            }
        }
        // libcrypto always has HMAC and SHA-256 (Debian's libssl3); without them no image can be checked.
        precondition(status == 0, "OpenSSL's HMAC-SHA256 is not available (libcrypto's default provider)")
    }

    deinit {
        csys_page_mac_free(key)
        key.deallocate()
    }

    /// The first 8 bytes (little endian) of HMAC(label || generation || address || headerCode's u32 count
    /// || headerCode || page): BinaryWriter's layout of the three fields.
    public func code(page: ArraySlice<UInt8>, generation: UInt64, address: UInt64, headerCode: [UInt8]) -> UInt64 {
        page.withUnsafeBufferPointer { pageBuffer in
            headerCode.withUnsafeBufferPointer { headerBuffer in
                csys_page_mac(key, generation, address, headerBuffer.baseAddress, headerBuffer.count, pageBuffer.baseAddress, pageBuffer.count)
            }
        }
    }
}
