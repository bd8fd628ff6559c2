// Issue 13: the dump and the nonlive restore code their pages (HMAC-SHA256 per 4 KiB, the marks) on
// every CPU, a share of the batch per thread. A code is a pure function of its page, so the parallel
// answer must be exactly the one-thread answer, page by page, at every split; and a real FAM's codes of a
// batch must be the codes the writer's single-page path and the reader's check compute.
import Foundation
import Testing
@testable import Engine
import Sys

@Suite struct PageCodingTests {
    static let key = try! MigrationKey(bytes: (0..<MigrationKey.byteCount).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) })

    /// Pages that differ from each other (and whose codes then differ) by index.
    static func pages(_ pageCount: Int) -> [UInt8] {
        (0..<(pageCount * ImageLayout.pageSize)).map { UInt8(truncatingIfNeeded: ($0 &* 131) ^ ($0 >> 12) &* 7) }
    }

    static func code(_ authenticator: ImageAuthenticator) -> @Sendable (Int, ArraySlice<UInt8>) -> UInt64 {
        { index, page in authenticator.markDigest(page: page, generation: 7, address: UInt64(index + 16) * .pageSize, headerCode: [UInt8](repeating: 9, count: 32)) }
    }

    @Test(arguments: [0, 1, 31, 32, 63, 64, 65, 200, 512])
    func theCodesOnSeveralThreadsAreTheCodesOnOne(pageCount: Int) {
        let bytes = Self.pages(pageCount)
        let code = Self.code(ImageAuthenticator(key: Self.key))
        let oneThread = PageCoding.codes(of: bytes, pageByteCount: ImageLayout.pageSize, threadCount: 1, code: code)
        #expect(oneThread.count == pageCount)
        // Each page coded on its own, from its own copy, as the reader's single-page check does.
        let pageByPage = (0..<pageCount).map { index in
            code(index, Array(bytes[(index * ImageLayout.pageSize)..<((index + 1) * ImageLayout.pageSize)])[...])
        }
        #expect(oneThread == pageByPage)
        for threadCount in [2, 3, 8] {
            #expect(PageCoding.codes(of: bytes, pageByteCount: ImageLayout.pageSize, threadCount: threadCount, code: code) == oneThread,
                    "\(threadCount) threads, \(pageCount) pages")
        }
        // Distinct pages, distinct codes: a share coded twice or left out would show.
        #expect(Set(oneThread).count == pageCount)
    }

    /// The page code through OpenSSL's SHA-256 (Sys.PageMACKey, what every path uses) is swift-crypto's
    /// HMAC-SHA256 of the same bytes, for pages that differ, at any offset of a larger copy, for several
    /// keys, generations, addresses and header codes.
    @Test func theFastPageCodeIsSwiftCryptosHMAC() throws {
        let bytes = Self.pages(12)
        for keySeed in [UInt8(1), 77, 250] {
            let key = try MigrationKey(bytes: (0..<MigrationKey.byteCount).map { UInt8(truncatingIfNeeded: Int($0) &* Int(keySeed) &+ 3) })
            let authenticator = ImageAuthenticator(key: key)
            for index in 0..<12 {
                let page = bytes[(index * ImageLayout.pageSize)..<((index + 1) * ImageLayout.pageSize)]
                let headerCode = (0..<32).map { UInt8(truncatingIfNeeded: $0 &+ index &* 5 &+ Int(keySeed)) }
                let generation = UInt64(index) &* 0x9E37_79B9_7F4A_7C15, address = UInt64(0x7f00_0000_0000) + UInt64(index) * .pageSize
                let fast = authenticator.markDigest(page: page, generation: generation, address: address, headerCode: headerCode)
                #expect(fast == authenticator.referenceMarkDigest(page: page, generation: generation, address: address, headerCode: headerCode),
                        "page \(index), key seed \(keySeed)")
                // Every input counts: another address gives another code.
                #expect(fast != authenticator.markDigest(page: page, generation: generation, address: address + .pageSize, headerCode: headerCode))
            }
        }
    }

    /// RealFAM's codes (a share per CPU, each loaded straight from the mapping) and its load for the
    /// restore (one copy, coded on every CPU) give the model's at-once answer, at an offset inside the file.
    @Test func aRealFAMCodesABatchAsTheAtOnceDefaultDoes() throws {
        let path = "/dev/shm/fammig-pagecoding-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        let pageCount = 300
        let fam = try RealFAM.create(path: path, byteCount: (pageCount + 3) * ImageLayout.pageSize, prefault: true)
        defer { fam.mapping.close(); _ = try? SharedMapping.remove(path: path) }
        let bytes = Self.pages(pageCount)
        fam.store(bytes, at: 3 * ImageLayout.pageSize)
        let code = Self.code(ImageAuthenticator(key: Self.key))
        let expected = PageCoding.codes(of: bytes, pageByteCount: ImageLayout.pageSize, threadCount: 1, code: code)
        #expect(fam.pageCodes(at: 3 * ImageLayout.pageSize, pageCount: pageCount, pageByteCount: ImageLayout.pageSize, code: code) == expected)
        let loaded = fam.startPageLoad(at: 3 * ImageLayout.pageSize, pageCount: pageCount, pageByteCount: ImageLayout.pageSize, code: code).finish()
        #expect(loaded.bytes == bytes)
        #expect(loaded.codes == expected)
        // One byte changed in the last page changes that page's code only.
        fam.store([bytes[bytes.count - 1] ^ 1], at: 3 * ImageLayout.pageSize + bytes.count - 1)
        let changed = fam.pageCodes(at: 3 * ImageLayout.pageSize, pageCount: pageCount, pageByteCount: ImageLayout.pageSize, code: code)
        #expect(Array(changed.dropLast()) == Array(expected.dropLast()))
        #expect(changed.last != expected.last)
    }
}
