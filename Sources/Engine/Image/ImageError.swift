// Why this file exists: an image is input (another node wrote it, a copy may be cut short, memory may
// be corrupt), so every way it can be wrong is a case here, and each description says what is wrong,
// where, and what to do about it.
import Sys

public enum ImageError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The FAM file could not be created (exists already, no space, no permission).
    case cannotCreate(path: String, SyscallError)
    /// The FAM file could not be opened or mapped.
    case cannotOpen(path: String, SyscallError)
    /// The FAM pool could not give or find this image's extent (its own message says what to do).
    case pool(String)
    /// The FAM region is smaller than the image that must go into it.
    case backendTooSmall(path: String, byteCount: Int, requiredByteCount: Int)
    case badMagic(path: String)
    case truncated(path: String, byteCount: Int, requiredByteCount: Int)
    case unsupportedVersion(path: String, version: UInt32)
    case unsupportedPageSize(path: String, pageSize: UInt32)
    case superblockChecksumMismatch(path: String)
    /// The self-checking state word is neither a known state nor consistent.
    case damagedState(path: String, word: UInt64)
    /// A region in the superblock's table is misaligned, outside the file, too small or overlapping.
    case badRegion(path: String, region: ImageRegionKind, reason: String)
    case uncommitted(path: String, state: ImageState)
    case aborted(path: String)
    case metadataChecksumMismatch(path: String)
    case pageTableChecksumMismatch(path: String)
    /// Page table entry `slot` is not page-aligned or not above the previous entry.
    case badPageAddress(path: String, slot: Int, address: UInt64, reason: String)
    /// The state says complete, but the commit record is missing, damaged or disagrees.
    case badCommitRecord(path: String, reason: String)
    case marksChecksumMismatch(path: String)
    /// A complete image with a slot whose mark is not stored.
    case pageNotMarked(path: String, slot: Int, address: UInt64)
    case pageChecksumMismatch(path: String, slot: Int, address: UInt64)
    /// The engine's metadata blob does not decode.
    case malformedMetadata(reason: String)
    /// The metadata decodes, but what it says is not something a real process could have, or not
    /// something the restorer may do (a mapping outside user space, two threads with one ID, a
    /// descriptor beyond the kernel's limit, a dropped seccomp sandbox, ...): refused before any
    /// process is created.
    case unrestorableState(path: String, reason: String)
    /// An image file someone other than this user could have written.
    case untrustedFile(path: String, reason: String)
    /// A key file or key bytes that are not a migration key.
    case badKey(reason: String)
    /// The image was written under another migration key.
    case wrongKey(path: String)
    /// The image is not of the migration this node agreed on with the source (its image identity).
    case anotherMigration(path: String)
    /// The header (superblock, creator, metadata, page table) checksums but does not carry the code the
    /// key gives it: someone changed it after the source wrote it.
    case headerNotAuthentic(path: String)
    /// The commit record or the marks checksum but do not carry the commit code.
    case commitRecordNotAuthentic(path: String)
    /// The process would get more than the image's authenticated creator had.
    case exceedsCreator(path: String, reason: String)
    /// The restore would open a path the victim itself could not open (checked as the victim, before
    /// any process is created).
    case fileAccessDenied(path: String, reason: String)

    public var description: String {
        switch self {
        case .cannotCreate(let path, let error):
            "cannot create FAM file \(path) (\(error)); remove a stale file or choose another FAM directory."
        case .pool(let message): message
        case .cannotOpen(let path, let error):
            "cannot open FAM file \(path) (\(error)); pass the file the source node wrote, and check this node maps the same FAM."
        case .backendTooSmall(let path, let byteCount, let requiredByteCount):
            "\(path): the FAM file has \(byteCount) bytes, the image needs \(requiredByteCount); create it with ImageLayout.byteCount."
        case .badMagic(let path):
            "\(path) is not a FAM image (bad magic); pass the file the source node wrote."
        case .truncated(let path, let byteCount, let requiredByteCount):
            "\(path): image is truncated: \(byteCount) bytes, the superblock says \(requiredByteCount); the copy is incomplete."
        case .unsupportedVersion(let path, let version):
            "\(path): format version \(version) is not supported (this fammig reads version \(ImageLayout.formatVersion))."
        case .unsupportedPageSize(let path, let pageSize):
            "\(path): page size \(pageSize) is not supported (this fammig uses \(ImageLayout.pageSize)); restore on a node with the source's page size."
        case .superblockChecksumMismatch(let path):
            "\(path): the superblock does not match its checksum; the image is corrupted, take the checkpoint again."
        case .damagedState(let path, let word):
            "\(path): the image state word 0x\(String(word, radix: 16)) is damaged; the image is corrupted, take the checkpoint again."
        case .badRegion(let path, let region, let reason):
            "\(path): the \(region) region \(reason); the image is corrupted, take the checkpoint again."
        case .uncommitted(let path, .metadataCommitted):
            "\(path): image is not complete (state: metadataCommitted); the dump did not finish: wait for it, or open it for post-copy."
        case .uncommitted(let path, let state):
            "\(path): image is not committed (state: \(state)); the checkpoint did not finish, take it again."
        case .aborted(let path):
            "\(path): image was aborted by the source; the checkpoint failed, take it again."
        case .metadataChecksumMismatch(let path):
            "\(path): the process metadata does not match its checksum; the image is corrupted, take the checkpoint again."
        case .pageTableChecksumMismatch(let path):
            "\(path): the page table does not match its checksum; the image is corrupted, take the checkpoint again."
        case .badPageAddress(let path, let slot, let address, let reason):
            "\(path): page table entry \(slot) (address 0x\(String(address, radix: 16))) \(reason); the image is corrupted, take the checkpoint again."
        case .badCommitRecord(let path, let reason):
            "\(path): the commit record \(reason); the image is corrupted or unfinished, take the checkpoint again."
        case .marksChecksumMismatch(let path):
            "\(path): the dumped marks do not match the commit record's checksum; the image is corrupted, take the checkpoint again."
        case .pageNotMarked(let path, let slot, let address):
            "\(path): page slot \(slot) (address 0x\(String(address, radix: 16))) has no dumped mark in a complete image; the image is corrupted."
        case .pageChecksumMismatch(let path, let slot, let address):
            "\(path): page slot \(slot) (address 0x\(String(address, radix: 16))) does not match its mark checksum (a code under the migration key); the image is corrupted, or was changed by someone without the key."
        case .malformedMetadata(let reason):
            "process metadata is malformed: \(reason); the image was written by an incompatible fammig or is corrupted."
        case .untrustedFile(let path, let reason):
            "\(path): refused: the image file \(reason); only an image that no one else could have changed is restored (chown it to this user, chmod go-w)."
        case .badKey(let reason):
            "the migration key \(reason); pass the key file the source node wrote."
        case .wrongKey(let path):
            "\(path): wrong key: the image was written under another migration key; pass the key file the source node wrote for this image."
        case .anotherMigration(let path):
            "\(path): another migration's image: it does not carry the image identity this node agreed on with the source in the handshake; pass the FAM file this migration's source writes."
        case .headerNotAuthentic(let path):
            "\(path): tampered metadata: the header, process metadata or page table does not match its authentication code (HMAC); the image was changed after the source wrote it, refused."
        case .commitRecordNotAuthentic(let path):
            "\(path): tampered commit record: the commit record or the dumped marks do not match their authentication code (HMAC); the image was changed after the source wrote it, refused."
        case .exceedsCreator(let path, let reason):
            "\(path): the process state exceeds what the image's creator had: \(reason); refused."
        case .fileAccessDenied(let path, let reason):
            "\(path): the process state asks for a file its victim could not open: \(reason); refused."
        case .unrestorableState(let path, let reason):
            "\(path): the process state cannot be restored: \(reason); the image is corrupted or was not written by fammig, take the checkpoint again."
        }
    }
}
