// Why this file exists: a pipe whose two ends different processes of a tree hold (a parent that writes
// and a child that reads, the two children of a shell pipeline) is one object that no single process's
// records can rebuild. Each process's reader records such an end as it is (DescriptorReader: a lone end,
// with this node's inode); here the tree numbers those pipes (the order in which its processes, in tree
// order and each by descriptor, first hold them, which a restored tree reads back alike) and checks that
// each has its read end and its write end inside the tree; and the restore makes each pipe once, in the
// nearest process that both holders descend from, parks its ends at descriptors above every number of
// the tree, lets each holder take its end from there (the holders are cloned from it, so they inherit
// the parked ends), and closes the parked ends once the whole tree is built (TargetTree).
import Sys

/// One process of a tree as its tree pipes need it: its descriptors, and those it inherited at the same
/// number from its parent (the parent's restore hands them down).
struct TreePipeHolder {
    var processID: ProcessID
    var files: [OpenFile]
    var inherited: Set<Int32>
}

enum TreePipes {
    static let loneEndReason = "a pipe must have its read end and its write end open once each in the process, or each in a process of its tree"

    /// A process migrated alone holds no pipe end whose other end it does not hold.
    static func refuseLoneEnds(_ files: [OpenFile], processID: ProcessID) throws(CheckpointError) {
        for file in files {
            guard case .treePipe(let end) = file.kind else { continue }
            throw .unsupportedDescriptor(processID, descriptor: file.descriptor,
                                         target: "pipe:[\(end.inode)] (\(loneEndReason): it holds its \(end.isReadEnd ? "read" : "write") end alone)")
        }
    }

    /// The own (not inherited) tree pipe ends of every process, by pipe: which process holds each read
    /// and each write end.
    static func ownEnds<Key: Hashable>(_ holders: [TreePipeHolder], key: (TreePipeEnd) -> Key)
        -> [Key: (read: [(processID: ProcessID, file: OpenFile)], write: [(processID: ProcessID, file: OpenFile)])] {
        var ends: [Key: (read: [(processID: ProcessID, file: OpenFile)], write: [(processID: ProcessID, file: OpenFile)])] = [:]
        for holder in holders {
            for file in holder.files where !holder.inherited.contains(file.descriptor) {
                guard case .treePipe(let end) = file.kind else { continue }
                if end.isReadEnd { ends[key(end), default: ([], [])].read.append((holder.processID, file)) } else {
                    ends[key(end), default: ([], [])].write.append((holder.processID, file))
                }
            }
        }
        return ends
    }

    /// Numbers the tree pipe ends of `holders` (in tree order) by this node's inodes, which are then
    /// cleared: the records read back from a restored tree compare equal. Each pipe that any process
    /// holds an end of as its own must have exactly one read end and one write end so held; one whose
    /// ends are all inherited is its parent's pipe, handed down as it is. Anything else has an end
    /// outside the tree (or a second open file description of one end) and is refused.
    static func number(_ holders: inout [TreePipeHolder], root: ProcessID) throws(CheckpointError) {
        var ordinals: [UInt64: Int32] = [:]
        for holder in holders {
            for file in holder.files {
                guard case .treePipe(let end) = file.kind, ordinals[end.inode] == nil else { continue }
                ordinals[end.inode] = Int32(ordinals.count)
            }
        }
        for (inode, ends) in ownEnds(holders, key: \.inode).sorted(by: { ordinals[$0.key]! < ordinals[$1.key]! }) {
            guard ends.read.count == 1 && ends.write.count == 1 else {
                let first = ends.read.first ?? ends.write[0]
                throw .unsupportedTree(root, reason: "fd \(first.file.descriptor) of pid \(first.processID) is an end of pipe:[\(inode)], which has "
                                       + "\(ends.read.count) read and \(ends.write.count) write ends of its own in the tree, not one of each "
                                       + "(its other end is outside the tree, or an end was opened again)")
            }
        }
        for index in holders.indices {
            holders[index].files = holders[index].files.map { file in
                guard case .treePipe(var end) = file.kind else { return file }
                var numbered = file
                end.pipe = ordinals[end.inode]!
                end.inode = 0
                numbered.kind = .treePipe(end)
                return numbered
            }
        }
    }

    /// The holders of a tree's state, in tree order (the root, then its live members).
    static func holders(_ state: ProcessState) -> [TreePipeHolder] {
        var holders = [TreePipeHolder(processID: state.processID, files: state.files, inherited: [])]
        for case .live(let member) in state.members {
            let fromParent = member.lineage.inheritedDescriptors + member.lineage.renumberedDescriptors.map(\.descriptor)
            holders.append(TreePipeHolder(processID: member.processID, files: member.files, inherited: Set(fromParent)))
        }
        return holders
    }

    /// What an image says of its tree pipes, checked before any process is made: one own read end and one
    /// own write end of each pipe that has own ends, and no tree pipe in a process that is no tree's.
    static func validate(_ state: ProcessState) -> String? {
        let holders = holders(state)
        if !state.lineage.isRecorded, let lone = state.files.first(where: { if case .treePipe = $0.kind { true } else { false } }) {
            return "fd \(lone.descriptor) is a pipe end whose other end no process of the image holds"
        }
        for holder in holders {
            for file in holder.files {
                guard case .treePipe(let end) = file.kind else { continue }
                guard end.pipe >= 0, end.pipe < Int32(TreeLimits.processCountMax * 64), file.path.isEmpty,
                      (KernelLimits.pipeCapacityByteCountMin...DescriptorLimits.pipeCapacityByteCountMax).contains(end.capacityByteCount),
                      end.buffered.count <= Int(end.capacityByteCount), end.isReadEnd || end.buffered.isEmpty else {
                    return "fd \(file.descriptor) of pid \(holder.processID) is end of tree pipe \(end.pipe) with capacity \(end.capacityByteCount) "
                        + "and \(end.buffered.count) bytes buffered"
                }
            }
        }
        for (pipe, ends) in ownEnds(holders, key: \.pipe).sorted(by: { $0.key < $1.key }) where ends.read.count != 1 || ends.write.count != 1 {
            return "tree pipe \(pipe) has \(ends.read.count) read and \(ends.write.count) write ends of its own, not one of each"
        }
        return nil
    }
}

extension ProcessState {
    /// Numbers the tree pipes of this tree's state in place (TreePipes.number); `root` for refusals.
    mutating func numberTreePipes(root: ProcessID) throws(CheckpointError) {
        var holders = TreePipes.holders(self)
        try TreePipes.number(&holders, root: root)
        files = holders[0].files
        var next = 1
        for index in members.indices {
            guard case .live(var member) = members[index] else { continue }
            member.files = holders[next].files
            members[index] = .live(member)
            next += 1
        }
    }
}

/// A tree restore's pipes (TreePipes): made in the nearest common ancestor of their two holders, parked
/// at `temporaryBase` or above, taken by each holder, closed once the tree is built. Shared by every
/// process's restore of one tree, which runs on one thread, each process after its parent.
final class TreePipeRestore {
    struct Pipe {
        var ordinal: Int32
        /// The tree's own number of the process that makes it.
        var creator: ProcessID
        var read: OpenFile
        var write: OpenFile
        var capacityByteCount: Int32
        var buffered: [UInt8]
    }

    let pipes: [Pipe]
    /// Above every descriptor any process of the tree restores.
    let temporaryBase: Int32
    /// Where each pipe's ends are parked, once its creator made it.
    private(set) var parked: [Int32: (read: Int32, write: Int32)] = [:]

    /// nil when the tree has no pipe with own ends in two processes. The state was validated
    /// (TreePipes.validate).
    init?(_ state: ProcessState) {
        let holders = TreePipes.holders(state)
        var parents: [ProcessID: ProcessID] = [:]
        for case .live(let member) in state.members { parents[member.processID] = member.lineage.parentProcessID }
        func ancestors(_ processID: ProcessID) -> [ProcessID] {
            var chain = [processID]
            // Bounded: a validated tree's parents are created before their children.
            while let parent = parents[chain.last!], chain.count <= TreeLimits.processCountMax { chain.append(parent) }
            return chain
        }
        var pipes: [Pipe] = []
        // Validated: one own read end and one own write end of each pipe that has own ends.
        for (ordinal, ends) in TreePipes.ownEnds(holders, key: \.pipe) {
            guard let reader = ends.read.first, let writer = ends.write.first, case .treePipe(let end) = reader.file.kind else { continue }
            let writerLine = Set(ancestors(writer.processID))
            let creator = ancestors(reader.processID).first { writerLine.contains($0) } ?? state.processID
            pipes.append(Pipe(ordinal: ordinal, creator: creator, read: reader.file, write: writer.file,
                              capacityByteCount: end.capacityByteCount, buffered: end.buffered))
        }
        guard !pipes.isEmpty else { return nil }
        self.pipes = pipes.sorted { $0.ordinal < $1.ordinal }
        temporaryBase = (holders.flatMap { $0.files.map(\.descriptor) }.max() ?? 0) + 1
    }

    func pipes(madeBy ownProcessID: ProcessID) -> [Pipe] { pipes.filter { $0.creator == ownProcessID } }

    func park(_ pipe: Int32, read: Int32, write: Int32) { parked[pipe] = (read, write) }

    /// The parked ends of the pipes `ownProcessID` made (once it made them).
    func parkedDescriptors(madeBy ownProcessID: ProcessID) -> Set<Int32> {
        Set(pipes(madeBy: ownProcessID).compactMap { parked[$0.ordinal] }.flatMap { [$0.read, $0.write] })
    }
}
