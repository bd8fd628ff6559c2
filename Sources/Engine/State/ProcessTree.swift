// Process trees: a parent with its forked children (and theirs), their sessions and process groups, and
// children that ended but were not reaped (zombies). The root's ProcessState holds one record per other
// process of its tree (`members`), each after its parent, so the restorer can create them in order.
import Sys

/// Where a process sits in its tree, as /proc/PID/stat shows it.
public struct ProcessLineage: Equatable, Sendable {
    /// Read at the freeze of a tree (the tree's own numbers, which may be 0 for ids from outside its PID
    /// namespace); false: nothing recorded (a mode without trees, or an older checkpoint path), nothing restored.
    public var isRecorded = false
    public var parentProcessID = ProcessID(rawValue: 0)
    public var processGroupID = ProcessID(rawValue: 0)
    public var sessionID = ProcessID(rawValue: 0)
    /// The signal the parent gets when this process ends (clone's exit_signal; SIGCHLD after fork).
    public var exitSignal: Int32 = 17
    /// Descriptors this process holds as it inherited them from its parent: the same open file
    /// description at the same number (kcmp), so the restored child inherits them too and they stay one.
    public var inheritedDescriptors: [Int32] = []
    /// Shared-memory mappings this process holds as its parent holds them (same object, address and
    /// offset): kept from the parent at the restore, so the object stays one.
    public var inheritedMappingStarts: [UInt64] = []
    /// Descriptors this process holds as an open file description its parent holds at another number
    /// (a dup2 onto stdin of an inherited descriptor the parent keeps): the restored child inherits the
    /// parent's and moves it to its own number, so they stay one.
    public var renumberedDescriptors: [RenumberedDescriptor] = []

    public init() {}
}

/// A child's descriptor that is its parent's open file description at another number.
public struct RenumberedDescriptor: Equatable, Sendable {
    public var descriptor: Int32
    public var parentDescriptor: Int32
}

/// A child that exited but was not reaped: restored as a zombie with the same wait status.
public struct ZombieProcess: Equatable, Sendable {
    public var processID: ProcessID
    public var lineage: ProcessLineage
    /// The wait(2) status its parent will read: exit code << 8, or the killing signal (no core dump).
    public var waitStatus: Int32

    public init(processID: ProcessID, lineage: ProcessLineage, waitStatus: Int32) {
        (self.processID, self.lineage, self.waitStatus) = (processID, lineage, waitStatus)
    }

    public var exitCode: Int32? { waitStatus & 0x7f == 0 ? (waitStatus >> 8) & 0xff : nil }
    public var killingSignal: Int32? { waitStatus & 0x7f == 0 ? nil : waitStatus & 0x7f }
}

/// One process of a tree besides its root.
public enum TreeMember: Equatable, Sendable {
    case live(ProcessState)
    case zombie(ZombieProcess)

    public var processID: ProcessID {
        switch self {
        case .live(let state): state.processID
        case .zombie(let zombie): zombie.processID
        }
    }
    public var lineage: ProcessLineage {
        switch self {
        case .live(let state): state.lineage
        case .zombie(let zombie): zombie.lineage
        }
    }
}

/// Page addresses of a tree: each process's pages carry its ordinal (0 = the root, then `members` in
/// order, zombies included) above the 47 bits of user space, so one sorted page table holds them all
/// and a single process's image is exactly what it was before trees.
public enum TreePageAddress {
    static let ordinalShift: UInt64 = 48
    public static let addressMask: UInt64 = (1 << 48) - 1

    public static func tagged(_ address: UInt64, ordinal: Int) -> UInt64 { UInt64(ordinal) << ordinalShift | address }
    public static func ordinal(of tagged: UInt64) -> Int { Int(tagged >> ordinalShift) }
    public static func address(of tagged: UInt64) -> UInt64 { tagged & addressMask }
}

public enum TreeLimits {
    /// Processes of a tree, the root included: more are refused at checkpoint and rejected in an image.
    public static let processCountMax = 64
}

extension ProcessState {
    /// The processes of the tree in ordinal order: the root, then every member (a zombie as nil state).
    public var treeProcessIDs: [ProcessID] { [processID] + members.map(\.processID) }
    public var liveMembers: [ProcessState] {
        members.compactMap { if case .live(let state) = $0 { state } else { nil } }
    }
    /// The IDs of the SysV shared memory segments the tree's live processes have attached, sorted, each
    /// once: the one scan of the mappings for them (whether the tree needs a fresh IPC namespace, whether
    /// this node's still has them).
    public var sysvSegmentIdentifiers: [Int32] {
        Set(liveProcesses.flatMap { process in
            process.state.mappings.compactMap { if case .sharedMemory(let object) = $0.kind { object.sysv?.identifier } else { nil } }
        }).sorted()
    }
    /// Whether any live process of the tree has a SysV shared memory segment attached.
    public var holdsSysVSharedMemory: Bool { !sysvSegmentIdentifiers.isEmpty }
    /// The live processes of the tree with their ordinals, the root first.
    public var liveProcesses: [(ordinal: Int, state: ProcessState)] {
        [(0, self)] + members.enumerated().compactMap { index, member in
            if case .live(let state) = member { (index + 1, state) } else { nil }
        }
    }
}


// MARK: Encoding

extension ProcessLineage {
    func encode(into writer: inout BinaryWriter) {
        writer.writeBool(isRecorded)
        writer.writeInt32(parentProcessID.rawValue)
        writer.writeInt32(processGroupID.rawValue)
        writer.writeInt32(sessionID.rawValue)
        writer.writeInt32(exitSignal)
        writer.writeArray(inheritedDescriptors) { writer, descriptor in writer.writeInt32(descriptor) }
        writer.writeArray(inheritedMappingStarts) { writer, start in writer.writeUInt64(start) }
        writer.writeArray(renumberedDescriptors) { writer, renumbered in
            writer.writeInt32(renumbered.descriptor)
            writer.writeInt32(renumbered.parentDescriptor)
        }
    }

    static func decode(_ reader: inout BinaryReader) throws(ImageError) -> ProcessLineage {
        var lineage = ProcessLineage()
        lineage.isRecorded = try reader.readBool()
        lineage.parentProcessID = ProcessID(rawValue: try reader.readInt32())
        lineage.processGroupID = ProcessID(rawValue: try reader.readInt32())
        lineage.sessionID = ProcessID(rawValue: try reader.readInt32())
        lineage.exitSignal = try reader.readInt32()
        guard [lineage.parentProcessID, lineage.processGroupID, lineage.sessionID].allSatisfy({ $0.rawValue >= 0 }) else {
            throw .malformedMetadata(reason: "negative parent, group or session id")
        }
        guard KernelLimits.signalNumbers.contains(lineage.exitSignal) else {
            throw .malformedMetadata(reason: "exit signal \(lineage.exitSignal)")
        }
        lineage.inheritedDescriptors = try reader.readArray(maximumCount: 65536) { (reader) throws(ImageError) in try reader.readInt32() }
        lineage.inheritedMappingStarts = try reader.readArray(maximumCount: 65530) { (reader) throws(ImageError) in try reader.readUInt64() }
        lineage.renumberedDescriptors = try reader.readArray(maximumCount: 65536) { (reader) throws(ImageError) in
            RenumberedDescriptor(descriptor: try reader.readInt32(), parentDescriptor: try reader.readInt32())
        }
        return lineage
    }
}

extension ProcessState {
    /// Appended to the process's own encoding: its lineage, then (the root only) every member.
    func encodeTree(into writer: inout BinaryWriter) {
        lineage.encode(into: &writer)
        writer.writeArray(members) { writer, member in
            switch member {
            case .live(let state):
                writer.writeUInt8(1)
                writer.writeBytes(state.encoded())
            case .zombie(let zombie):
                writer.writeUInt8(2)
                writer.writeInt32(zombie.processID.rawValue)
                zombie.lineage.encode(into: &writer)
                writer.writeInt32(zombie.waitStatus)
            }
        }
    }

    /// A member's own encoding holds no members: trees are one level of records, ordered by creation.
    static func decodeTree(_ reader: inout BinaryReader, isMember: Bool) throws(ImageError) -> (ProcessLineage, [TreeMember]) {
        let lineage = try ProcessLineage.decode(&reader)
        let members = try reader.readArray(maximumCount: isMember ? 0 : TreeLimits.processCountMax - 1) { (reader) throws(ImageError) -> TreeMember in
            switch try reader.readUInt8() {
            case 1:
                let bytes = try reader.readBytes(maximumByteCount: 64 << 20)
                return .live(try ProcessState.decode(bytes, isMember: true))
            case 2:
                let processID = ProcessID(rawValue: try reader.readInt32())
                guard processID.rawValue >= 1 else { throw .malformedMetadata(reason: "zombie pid \(processID)") }
                let lineage = try ProcessLineage.decode(&reader)
                let status = try reader.readInt32()
                return .zombie(ZombieProcess(processID: processID, lineage: lineage, waitStatus: status))
            case let kind:
                throw .malformedMetadata(reason: "tree member of kind \(kind)")
            }
        }
        return (lineage, members)
    }
}

// MARK: Validation

extension ProcessState {
    /// What the restorer will do with the tree must be possible: distinct PIDs; each member's parent
    /// created before it and alive (a zombie has no children); sessions and groups led by a process of
    /// the tree (or the root's own, which come from outside the tree); statuses a process can end with;
    /// inherited descriptors and mappings that the parent has.
    func validateTree(pageAddresses: [UInt64], path: String) throws(ImageError) {
        func refuse(_ reason: String) -> ImageError { .unrestorableState(path: path, reason: reason) }
        guard members.count < TreeLimits.processCountMax else { throw refuse("a tree of \(members.count + 1) processes") }
        var created: [ProcessID: Int] = [processID: 0]
        var liveStates: [ProcessID: ProcessState] = [processID: self]
        let outside: Set<ProcessID> = [lineage.processGroupID, lineage.sessionID]
        for (index, member) in members.enumerated() {
            let pid = member.processID, lineage = member.lineage
            guard created[pid] == nil else { throw refuse("pid \(pid) appears twice in the tree") }
            guard let parent = liveStates[lineage.parentProcessID] else {
                throw refuse("pid \(pid)'s parent \(lineage.parentProcessID) is not a live process created before it")
            }
            for (what, id) in [("session", lineage.sessionID), ("process group", lineage.processGroupID)] {
                guard id == pid || created[id] != nil || outside.contains(id) else {
                    throw refuse("pid \(pid)'s \(what) \(id) is led by no process of the tree created before it")
                }
            }
            // setpgid joins only a group of the caller's own session.
            if lineage.processGroupID != pid {
                let leaderSession = liveStates[lineage.processGroupID]?.lineage.sessionID
                    ?? members.first(where: { $0.processID == lineage.processGroupID })?.lineage.sessionID ?? self.lineage.sessionID
                guard leaderSession == lineage.sessionID else {
                    throw refuse("pid \(pid) is in process group \(lineage.processGroupID) of another session")
                }
            }
            if lineage.sessionID != pid && lineage.sessionID != parent.lineage.sessionID {
                throw refuse("pid \(pid) is in session \(lineage.sessionID), not its parent's \(parent.lineage.sessionID), and does not lead one")
            }
            for descriptor in lineage.inheritedDescriptors where !parent.files.contains(where: { $0.descriptor == descriptor }) {
                throw refuse("pid \(pid) inherits fd \(descriptor), which its parent does not hold")
            }
            for renumbered in lineage.renumberedDescriptors {
                guard parent.files.contains(where: { $0.descriptor == renumbered.parentDescriptor }), renumbered.descriptor >= 0,
                      !lineage.inheritedDescriptors.contains(renumbered.descriptor),
                      lineage.renumberedDescriptors.filter({ $0.descriptor == renumbered.descriptor }).count == 1 else {
                    throw refuse("pid \(pid) takes fd \(renumbered.descriptor) from its parent's fd \(renumbered.parentDescriptor), which is not a descriptor of its parent's or clashes with another")
                }
            }
            switch member {
            case .zombie(let zombie):
                guard lineage.inheritedDescriptors.isEmpty, lineage.inheritedMappingStarts.isEmpty, lineage.renumberedDescriptors.isEmpty else {
                    throw refuse("zombie \(pid) holds descriptors or mappings")
                }
                let status = zombie.waitStatus
                let valid = (status & 0x7f == 0 && status & ~0xff00 == 0)
                    || (status & ~0x7f == 0 && KernelLimits.signalNumbers.contains(status & 0x7f) && status & 0x7f != 0x7f)
                guard valid else { throw refuse("zombie \(pid)'s wait status \(hex(UInt64(UInt32(bitPattern: zombie.waitStatus)))) is no exit a process can have") }
            case .live(let state):
                guard state.members.isEmpty else { throw refuse("member \(pid) holds members of its own") }
                for start in lineage.inheritedMappingStarts {
                    guard let mine = state.mappings.first(where: { $0.start == start }), case .sharedMemory = mine.kind,
                          let theirs = parent.mappings.first(where: { $0.start == start }), case .sharedMemory = theirs.kind,
                          mine.end == theirs.end, mine.fileOffset == theirs.fileOffset else {
                        throw refuse("pid \(pid) inherits shared memory at \(hex(start)), which its parent does not map so")
                    }
                }
                let ordinal = index + 1
                let own = pageAddresses.filter { TreePageAddress.ordinal(of: $0) == ordinal }.map(TreePageAddress.address(of:))
                try state.validate(pageAddresses: own, path: path)
                liveStates[pid] = state
            }
            created[pid] = index + 1
        }
        if let stray = pageAddresses.first(where: { TreePageAddress.ordinal(of: $0) > members.count }) {
            throw .badPageAddress(path: path, slot: pageAddresses.firstIndex(of: stray) ?? 0, address: stray, reason: "belongs to no process of the tree")
        }
    }
}
