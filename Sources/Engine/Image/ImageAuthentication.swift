// Why this file exists: the checksums of an image catch corruption, not intent: anyone who can write the
// file can recompute them. So a migration has a secret key, made by the source node and handed to the
// target out of band (never through FAM), and the image carries HMAC-SHA256 codes under sub-keys of it:
// one over the header (superblock fields, key identifier, creator record, metadata, page table), one
// per page in its dumped mark (so a page or mark rewritten in FAM fails on every install path, before
// the commit record too), and one over the commit record and every mark. A reader that does not hold the key, or
// an image someone changed after the source wrote it, gets a refusal that names which of the two it is.
// All of the cryptography is swift-crypto's: HKDF to derive sub-keys, HMAC-SHA256, and its
// constant-time comparison of codes.
import Crypto
import Sys

/// The secret of one migration: 32 random bytes. Who holds it can write images a target accepts, so it
/// is exactly as trusted as the source node; it never goes into FAM.
public struct MigrationKey: Sendable {
    public static let byteCount = 32

    // Bytes, not a SymmetricKey, because that type is not Sendable; a SymmetricKey is made per use.
    public let bytes: [UInt8]

    /// A key from its bytes (a key file, a seed); exactly `byteCount` of them.
    public init(bytes: [UInt8]) throws(ImageError) {
        guard bytes.count == Self.byteCount else { throw .badKey(reason: "has \(bytes.count) bytes, a migration key has \(Self.byteCount)") }
        self.bytes = bytes
    }

    /// A new key from the system's cryptographic random source (Swift's system generator is getrandom(2)
    /// on Linux). Only executables call this: the engine itself never reads randomness (torture derives
    /// its keys from the seed).
    public static func generate() -> MigrationKey {
        var random = SystemRandomNumberGenerator()
        // Exactly `byteCount` bytes, so the initializer cannot refuse them.
        return try! MigrationKey(bytes: (0..<byteCount).map { _ in UInt8.random(in: .min ... .max, using: &random) })
    }

    /// A sub-key per purpose, so that a code made for one purpose never verifies for another (the
    /// transport will take its own).
    func subkey(_ purpose: String, byteCount: Int = 32) -> SymmetricKey {
        HKDF<SHA256>.deriveKey(inputKeyMaterial: SymmetricKey(data: bytes), salt: Array("fammig migration key v1".utf8),
                               info: Array(purpose.utf8), outputByteCount: byteCount)
    }

    /// `byteCount` (at most 32) bytes derived from the key for one purpose, revealing nothing of it.
    func derivedBytes(purpose: String, byteCount: Int) -> [UInt8] {
        precondition(byteCount <= 32, "\(byteCount) derived bytes from one code")
        return Array(HMAC<SHA256>.authenticationCode(for: Array(purpose.utf8), using: subkey(purpose)).prefix(byteCount))
    }

    /// Identifies the key without revealing it (a code under a sub-key of its own purpose): stored in the
    /// image so that a reader with another key is told "wrong key", not "tampered".
    public var identifier: [UInt8] { identifier(imageIdentity: nil) }

    /// The identifier an image of this key and of `imageIdentity` carries (nil: an image of no
    /// particular migration, as `identifier`): another migration's image under this key carries another.
    public func identifier(imageIdentity: [UInt8]?) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: Array("key identifier".utf8) + (imageIdentity ?? []), using: subkey("image key identifier"))
            .prefix(ImageLayout.keyIdentifierByteCount))
    }
}

/// Who wrote the image: the source node's effective user and group and its permitted capabilities,
/// stored under the header code. A restore never gives the process more than this creator had.
public struct ImageCreator: Equatable, Sendable {
    public var userID: UInt32
    public var groupID: UInt32
    public var permittedCapabilities: UInt64

    public init(userID: UInt32, groupID: UInt32, permittedCapabilities: UInt64) {
        self.userID = userID
        self.groupID = groupID
        self.permittedCapabilities = permittedCapabilities
    }

    /// This process, as the kernel sees it now.
    public static func current() -> ImageCreator {
        let identity = ProcessIdentity.current()
        return ImageCreator(userID: identity.effectiveUserID, groupID: identity.effectiveGroupID,
                            permittedCapabilities: identity.permittedCapabilities)
    }

    static let encodedByteCount = 16

    func encoded() -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt32(userID)
        writer.writeUInt32(groupID)
        writer.writeUInt64(permittedCapabilities)
        return writer.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(ImageError) -> ImageCreator {
        var reader = BinaryReader(bytes)
        return ImageCreator(userID: try reader.readUInt32(), groupID: try reader.readUInt32(), permittedCapabilities: try reader.readUInt64())
    }

    static let setGroupIDCapability: UInt64 = 1 << 6
    static let setUserIDCapability: UInt64 = 1 << 7

    /// Refuses credentials beyond this creator's: capabilities it did not have, and, unless it could
    /// change them (CAP_SETUID, CAP_SETGID), user or group IDs other than its own.
    public func checkAdmits(_ credentials: Credentials, path: String) throws(ImageError) {
        let capabilities = credentials.permitted | credentials.effective | credentials.inheritable | credentials.ambient
        if capabilities & ~permittedCapabilities != 0 {
            throw .exceedsCreator(path: path, reason: "capabilities \(hex(capabilities & ~permittedCapabilities)) that its creator (uid \(userID)) did not have")
        }
        if permittedCapabilities & Self.setUserIDCapability == 0, let other = credentials.userIDs.first(where: { $0 != userID }) {
            throw .exceedsCreator(path: path, reason: "user ID \(other), but its creator ran as uid \(userID) without CAP_SETUID")
        }
        if permittedCapabilities & Self.setGroupIDCapability == 0,
           let other = (credentials.groupIDs + credentials.supplementaryGroups).first(where: { $0 != groupID }) {
            throw .exceedsCreator(path: path, reason: "group ID \(other), but its creator ran as gid \(groupID) without CAP_SETGID")
        }
    }
}

/// Computes and checks the image's two codes. Every part is length-prefixed and the two codes use
/// different labels, so no arrangement of bytes verifies as another.
package struct ImageAuthenticator: Sendable {
    private let key: MigrationKey
    package let keyIdentifier: [UInt8]
    /// The page marks' HMAC, keyed and labelled once: a code per page is on the dump and fault paths,
    /// and keying an HMAC (two SHA-256 blocks, a sub-key derivation) costs more than a page's worth.
    private let pageCode: PageMACKey

    package init(key: MigrationKey, imageIdentity: [UInt8]? = nil) {
        self.key = key
        keyIdentifier = key.identifier(imageIdentity: imageIdentity)
        pageCode = PageMACKey(keyBytes: key.derivedBytes(purpose: Self.pageCodePurpose, byteCount: 32), label: Self.pageCodeLabel)
    }

    static let pageCodePurpose = "image page marks"
    static let pageCodeLabel = Array("fammig page mark".utf8)

    private func code(label: String, parts: [[UInt8]]) -> HashedAuthenticationCode<SHA256> {
        var hmac = HMAC<SHA256>(key: key.subkey("image authentication"))
        for part in [Array(label.utf8)] + parts {
            var length = BinaryWriter()
            length.writeUInt64(UInt64(part.count))
            hmac.update(data: length.bytes)
            hmac.update(data: part)
        }
        return hmac.finalize()
    }

    /// `superblock`: bytes [0, superblockDigestOffset + 8), every field and the checksum;
    /// `extensionFields`: key identifier and creator record as stored. Compare a stored code with `==`
    /// on the result: swift-crypto compares in constant time.
    package func headerCode(superblock: [UInt8], extensionFields: [UInt8], paddedMetadata: [UInt8], pageTable: [UInt8]) -> HashedAuthenticationCode<SHA256> {
        code(label: "fammig image header", parts: [superblock, extensionFields, paddedMetadata, pageTable])
    }

    /// Bound to the header's code, so a commit record never verifies in another image.
    package func commitCode(headerCode: [UInt8], commitRecord: [UInt8], marks: [UInt8]) -> HashedAuthenticationCode<SHA256> {
        code(label: "fammig image commit", parts: [headerCode, commitRecord, marks])
    }

    /// The code a page's dumped mark holds: the one definition the writer stores and every install
    /// path checks (`ImageReader.verifyPage`). HMAC-SHA256 under the page sub-key over the generation,
    /// the page's address, the image's header code (so a page of another image under the same key never
    /// verifies here) and the page, cut to the mark's 64-bit word. Per page, not per batch: a fault is
    /// served one page at a time, from FAM, before the commit record exists, so each page's check must
    /// stand alone; and HMAC needs no nonce (a GMAC would be faster, but a slot dumped twice under one
    /// nonce would hand a FAM reader the means to forge).
    package func markDigest(page: [UInt8], generation: UInt64, address: UInt64, headerCode: [UInt8]) -> UInt64 {
        markDigest(page: page[...], generation: generation, address: address, headerCode: headerCode)
    }

    /// The same code over a page where it lies in a larger copy (the reader checks a run of pages
    /// without copying each one out first).
    /// Computed by Sys (`PageMACKey`: OpenSSL's SHA-256, no allocation per page); `referenceMarkDigest`
    /// is the same code through swift-crypto, which the tests hold it to.
    package func markDigest(page: ArraySlice<UInt8>, generation: UInt64, address: UInt64, headerCode: [UInt8]) -> UInt64 {
        pageCode.code(page: page, generation: generation, address: address, headerCode: headerCode)
    }

    /// The definition of a page's code, through swift-crypto's HMAC: HMAC-SHA256 under the page sub-key
    /// over the label, then generation, address and header code as BinaryWriter writes them, then the
    /// page; its first eight bytes, little endian. Slow (generic, allocating); for the tests.
    package func referenceMarkDigest(page: ArraySlice<UInt8>, generation: UInt64, address: UInt64, headerCode: [UInt8]) -> UInt64 {
        var prefix = BinaryWriter()
        prefix.writeUInt64(generation)
        prefix.writeUInt64(address)
        prefix.writeBytes(headerCode)
        var hmac = HMAC<SHA256>(key: SymmetricKey(data: key.derivedBytes(purpose: Self.pageCodePurpose, byteCount: 32)))
        hmac.update(data: Self.pageCodeLabel)
        hmac.update(data: prefix.bytes)
        hmac.update(data: page)
        var word: UInt64 = 0
        for (index, byte) in hmac.finalize().prefix(8).enumerated() { word |= UInt64(byte) << (8 * index) }
        return word
    }

    /// Whether `stored` is `code`, compared in constant time (swift-crypto's comparison), so a forger
    /// learns nothing from how long a check takes.
    package static func matches(_ code: HashedAuthenticationCode<SHA256>, stored: [UInt8]) -> Bool {
        code == stored
    }
}

extension ImageReader {
    /// The process state this authenticated image holds, after every check a restore makes before it
    /// creates a process: it decodes, it is something a real process could have (`validate`), and it
    /// grants nothing its creator did not have. `restore`, `inspect` and the restorer all use this one.
    public func checkedProcessState() throws(ImageError) -> ProcessState {
        let state = try ProcessState.decode(metadata)
        try state.validate(pageAddresses: pageAddresses, path: path)
        try creator.checkAdmits(state.credentials, path: path)
        for member in state.liveMembers { try creator.checkAdmits(member.credentials, path: path) }
        return state
    }
}
