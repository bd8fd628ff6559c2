// Why this file exists: the FAM pool's on-FAM formats, its header and its extent records, and who may
// own an extent. Everything here is read back from FAM that other nodes write (or a crash tore), so a
// decode never traps: a record that does not verify is simply not there.
import Sys

/// A process that owns an extent, named so that a reused PID or a reboot never passes for it.
public struct PoolOwner: Hashable, Sendable, CustomStringConvertible {
    public var processID: UInt32
    /// Clock ticks after boot when it started (/proc/PID/stat field 22).
    public var startTime: UInt64
    /// The first 8 bytes of the machine's boot id (/proc/sys/kernel/random/boot_id), as a number.
    public var bootID: UInt64

    public init(processID: UInt32, startTime: UInt64, bootID: UInt64) {
        self.processID = processID
        self.startTime = startTime
        self.bootID = bootID
    }

    /// Nobody (a free or kept extent).
    public static let none = PoolOwner(processID: 0, startTime: 0, bootID: 0)

    /// `processID` as it runs now, or nil when it does not run.
    public static func of(_ processID: ProcessID) -> PoolOwner? {
        guard let fields = try? ProcFS.statFields(processID), let startText = fields[22], let startTime = UInt64(startText),
              ProcFS.isAlive(processID) else { return nil }
        return PoolOwner(processID: UInt32(bitPattern: processID.rawValue), startTime: startTime, bootID: currentBootID)
    }

    /// This process.
    public static func current() -> PoolOwner {
        guard let owner = of(.current) else { preconditionFailure("this process is not in /proc") }
        return owner
    }

    /// This boot of this machine; 0 if it cannot be read (then every owner looks alive only by PID).
    public static let currentBootID: UInt64 = {
        guard let text = try? ProcFS.readText("/proc/sys/kernel/random/boot_id") else { return 0 }
        let hex = text.filter(\.isHexDigit).prefix(16)
        return UInt64(hex, radix: 16) ?? 0
    }()

    /// Whether the owner still runs: this boot, its PID alive, and started when it did. An owner of
    /// another boot is dead (the pool outlived a reboot); so is a PID reused by a later process.
    public static func isAliveOnThisMachine(_ owner: PoolOwner) -> Bool {
        guard owner.bootID == currentBootID, owner.processID > 0, owner.processID <= UInt32(Int32.max) else { return false }
        return of(ProcessID(Int32(owner.processID)))?.startTime == owner.startTime
    }

    public var description: String { "pid \(processID) (started at tick \(startTime), boot \(String(bootID, radix: 16)))" }
}

/// What an extent record says about its extent.
public enum ExtentState: UInt32, Sendable, CustomStringConvertible {
    /// Nobody's; the slot and its bytes may be given out.
    case free = 1
    /// A live migration's: reclaimed as soon as its owner is dead.
    case owned = 2
    /// A committed checkpoint waiting for its restore: no process owns it, nothing reclaims it but
    /// `fammig pool free` (or the restore that claims it).
    case kept = 3

    public var description: String {
        switch self {
        case .free: "free"
        case .owned: "owned"
        case .kept: "kept"
        }
    }
}

/// One version of one slot of the extent table: a cache line of eight 8-byte words, the last a digest
/// of the others seeded with the pool, the slot and the half, so a torn, stale or moved copy fails.
struct PoolRecord: Equatable, Sendable {
    static let byteCount = 64
    var generation: UInt64
    var state: ExtentState
    var owner: PoolOwner
    var offset: UInt64
    var extentByteCount: UInt64
    var tag: UInt64

    static func free(generation: UInt64) -> PoolRecord {
        PoolRecord(generation: generation, state: .free, owner: .none, offset: 0, extentByteCount: 0, tag: 0)
    }

    func encoded(seed: UInt64) -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt64(generation)
        writer.writeUInt32(state.rawValue)
        writer.writeUInt32(owner.processID)
        writer.writeUInt64(offset)
        writer.writeUInt64(extentByteCount)
        writer.writeUInt64(owner.startTime)
        writer.writeUInt64(owner.bootID)
        writer.writeUInt64(tag)
        writer.writeUInt64(SharedMapping.digest(of: writer.bytes, seed: seed))
        precondition(writer.bytes.count == Self.byteCount, "pool record of \(writer.bytes.count) bytes")
        return writer.bytes
    }

    /// nil for bytes that are no record: never written (zeros), torn by a crash, or damaged.
    static func decode(_ bytes: [UInt8], seed: UInt64) -> PoolRecord? {
        guard bytes.count == byteCount else { return nil }
        let body = Array(bytes[0..<56])
        var reader = BinaryReader(bytes)
        guard let generation = try? reader.readUInt64(), let stateWord = try? reader.readUInt32(),
              let processID = try? reader.readUInt32(), let offset = try? reader.readUInt64(),
              let extentByteCount = try? reader.readUInt64(), let startTime = try? reader.readUInt64(),
              let bootID = try? reader.readUInt64(), let tag = try? reader.readUInt64(), let check = try? reader.readUInt64()
        else { return nil }
        guard check == SharedMapping.digest(of: body, seed: seed), generation > 0, let state = ExtentState(rawValue: stateWord) else { return nil }
        return PoolRecord(generation: generation, state: state,
                          owner: PoolOwner(processID: processID, startTime: startTime, bootID: bootID),
                          offset: offset, extentByteCount: extentByteCount, tag: tag)
    }
}

/// Why bytes are not a pool header.
struct PoolHeaderProblem: Error {
    var reason: String
}

/// The pool's first cache line, written once when the pool is made.
public struct PoolHeader: Equatable, Sendable {
    static let magic: UInt64 = 0x314C_4F4F_504D_4146  // "FAMPOOL1", little endian
    static let version: UInt32 = 1
    static let byteCount = 64
    /// The table starts on the second page; each slot holds two record versions.
    static let tableOffset = ImageLayout.pageSize
    static let slotByteCount = 2 * PoolRecord.byteCount
    /// Bounds a header must keep (it is input): a table of at most this many slots.
    public static let maximumSlotCount = 1 << 16

    public var slotCount: Int
    /// Extents start and end on multiples of this (2 MiB: huge-page and DAX friendly).
    public var unitByteCount: Int
    public var dataOffset: Int
    public var poolByteCount: Int
    /// Random, made with the pool: seeds every record's digest, so records never verify in another pool.
    public var poolID: UInt64

    static func dataOffset(slotCount: Int, unitByteCount: Int) -> Int {
        let tableEnd = tableOffset + slotCount * slotByteCount
        return (tableEnd + unitByteCount - 1) / unitByteCount * unitByteCount
    }

    func encoded() -> [UInt8] {
        var writer = BinaryWriter()
        writer.writeUInt64(Self.magic)
        writer.writeUInt32(Self.version)
        writer.writeUInt32(UInt32(slotCount))
        writer.writeUInt64(UInt64(unitByteCount))
        writer.writeUInt64(UInt64(dataOffset))
        writer.writeUInt64(UInt64(poolByteCount))
        writer.writeUInt64(poolID)
        writer.writeUInt64(0)
        writer.writeUInt64(SharedMapping.digest(of: writer.bytes, seed: Self.magic))
        return writer.bytes
    }

    /// The header, or why the bytes are not one of a pool of `mappedByteCount` bytes.
    static func decode(_ bytes: [UInt8], mappedByteCount: Int) -> Result<PoolHeader, PoolHeaderProblem> {
        var reader = BinaryReader(bytes)
        guard bytes.count == byteCount, let magic = try? reader.readUInt64(), magic == Self.magic else { return .failure(PoolHeaderProblem(reason: "no pool header (bad magic)")) }
        guard let version = try? reader.readUInt32(), version == Self.version else { return .failure(PoolHeaderProblem(reason: "pool version is not \(Self.version)")) }
        guard let slots = try? reader.readUInt32(), let unit = try? reader.readUInt64(), let data = try? reader.readUInt64(),
              let size = try? reader.readUInt64(), let poolID = try? reader.readUInt64(), let _ = try? reader.readUInt64(),
              let check = try? reader.readUInt64() else { return .failure(PoolHeaderProblem(reason: "truncated pool header")) }
        guard check == SharedMapping.digest(of: Array(bytes[0..<56]), seed: Self.magic) else { return .failure(PoolHeaderProblem(reason: "pool header checksum mismatch")) }
        guard slots > 0, slots <= UInt32(maximumSlotCount) else { return .failure(PoolHeaderProblem(reason: "pool header says \(slots) slots (1...\(maximumSlotCount))")) }
        guard unit >= .pageSize, unit <= 1 << 30, unit & (unit - 1) == 0 else { return .failure(PoolHeaderProblem(reason: "pool unit of \(unit) bytes is not a power of two in 4 KiB...1 GiB")) }
        let header = PoolHeader(slotCount: Int(slots), unitByteCount: Int(unit), dataOffset: Int(clamping: data),
                                poolByteCount: Int(clamping: size), poolID: poolID)
        guard UInt64(header.dataOffset) == data, header.dataOffset == dataOffset(slotCount: header.slotCount, unitByteCount: header.unitByteCount) else {
            return .failure(PoolHeaderProblem(reason: "pool data offset \(data) does not follow its table"))
        }
        guard UInt64(header.poolByteCount) == size, header.poolByteCount <= mappedByteCount, header.poolByteCount >= header.dataOffset else {
            return .failure(PoolHeaderProblem(reason: "pool size \(size) does not fit the \(mappedByteCount)-byte mapping"))
        }
        return .success(header)
    }
}
