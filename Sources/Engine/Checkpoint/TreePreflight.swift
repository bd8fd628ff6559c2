// The checks of a process tree: every process as Preflight checks one, and what only a tree
// can hold that its restore could not rebuild. Run before the freeze on the running tree (/proc only),
// and again on the frozen one, which may have changed in between.
import Sys

/// A process of a tree as /proc lists it, in creation order for the restore (each after its parent).
/// `processID` is this node's number for it (for /proc, ptrace, kcmp); the tree's own numbers (its
/// records, its lineage) are those of the root's PID namespace (`fields.own...`, `ownParentProcessID`),
/// the same unless the root is pid 1 of a namespace of its own.
struct TreeListing: Equatable {
    var processID: ProcessID
    var fields: ProcessTreeFields
    /// The parent as the tree numbers it: 0 for a root whose parent is outside its namespace.
    var ownParentProcessID: ProcessID

    /// `processID`'s entry, its parent found among `earlier` (a root when there is none).
    init(processID: ProcessID, fields: ProcessTreeFields, earlier: [TreeListing]) {
        self.processID = processID
        self.fields = fields
        if let parent = earlier.first(where: { $0.processID == fields.parentProcessID }) {
            ownParentProcessID = parent.fields.ownProcessID
        } else {
            ownParentProcessID = fields.ownProcessID == processID ? fields.parentProcessID : ProcessID(rawValue: 0)
        }
    }

    var ownProcessID: ProcessID { fields.ownProcessID }
}

enum TreePreflight {
    /// The tree under `root` (the root first, then breadth first, each level by PID), every process
    /// checked; throws the first reason it cannot be migrated.
    @discardableResult
    static func check(root: ProcessID) throws(CheckpointError) -> [TreeListing] {
        // A root without children is one process: a pipe end alone is refused where the reader meets it.
        let hasChildren = !((try? ProcFS.childProcessIDs(root)) ?? []).isEmpty
        var holders = [TreePipeHolder(processID: root, files: try Preflight.checkProcess(root, allowingLoneEnds: hasChildren), inherited: [])]
        let listing = try list(root: root)
        var files: [ProcessID: [OpenFile]] = [:]
        for process in listing.dropFirst() where !process.fields.isZombie {
            do { files[process.processID] = try Preflight.checkProcess(process.processID, allowingLoneEnds: true) } catch .alreadyTraced(let child, let tracer) {
                throw .unsupportedTree(root, reason: "its child pid \(child) is traced by pid \(tracer) (a debugger?)")
            }
        }
        try checkShape(listing)
        for process in listing.dropFirst() where !process.fields.isZombie {
            let inherited = try inheritance(of: process, in: listing)
            holders.append(TreePipeHolder(processID: process.processID, files: files[process.processID] ?? [],
                                          inherited: Set(inherited.descriptors + inherited.renumbered.map(\.descriptor))))
        }
        if holders.count == 1 {
            try TreePipes.refuseLoneEnds(holders[0].files, processID: root)
        } else {
            try TreePipes.number(&holders, root: root)
        }
        return listing
    }

    /// How many pages a dump of the whole tree would take now (a plan for the FAM's size, so that it is
    /// not made again during the downtime); a member that ends meanwhile counts nothing.
    static func estimatedDirtyPageCount(root: ProcessID) throws(CheckpointError) -> Int {
        var count = try Preflight.estimatedDirtyPageCount(root)
        for process in try list(root: root).dropFirst() where !process.fields.isZombie {
            count += (try? Preflight.estimatedDirtyPageCount(process.processID)) ?? 0
        }
        return count
    }

    /// Breadth first from the root; a child that ends meanwhile is listed as the zombie it became.
    static func list(root: ProcessID) throws(CheckpointError) -> [TreeListing] {
        var listing: [TreeListing] = []
        do {
            listing.append(TreeListing(processID: root, fields: try ProcessTreeFS.fields(root), earlier: []))
            var next = 0
            // Ends when every listed process's children are listed: at most processCountMax of them.
            while next < listing.count {
                let parent = listing[next]
                next += 1
                if parent.fields.isZombie { continue }
                for child in try ProcFS.childProcessIDs(parent.processID) {
                    guard listing.count < TreeLimits.processCountMax else {
                        throw CheckpointError.unsupportedTree(root, reason: "it has more than \(TreeLimits.processCountMax) processes")
                    }
                    listing.append(TreeListing(processID: child, fields: try ProcessTreeFS.fields(child), earlier: listing))
                }
            }
        } catch let error as CheckpointError {
            throw error
        } catch {
            if !ProcFS.isAlive(root) { throw .noSuchProcess(root) }
            throw .system(root, "listing its process tree: \(error)")
        }
        return listing
    }

    /// Namespaces, shared address spaces, exit statuses, sessions and groups, in the tree's own numbers.
    static func checkShape(_ listing: [TreeListing]) throws(CheckpointError) {
        let root = listing[0]
        func refuse(_ reason: String) -> CheckpointError { .unsupportedTree(root.processID, reason: reason) }
        var position: [ProcessID: Int] = [:]
        for (index, process) in listing.enumerated() { position[process.ownProcessID] = index }
        let outside: Set<ProcessID> = [root.fields.ownProcessGroupID, root.fields.ownSessionID]
        for (index, process) in listing.enumerated() where index > 0 {
            let pid = process.ownProcessID, fields = process.fields
            guard fields.isZombie || (fields.namespace != nil && fields.namespace == root.fields.namespace) else {
                throw refuse("pid \(process.processID) lives in another PID namespace than its tree's root")
            }
            if fields.isZombie {
                guard fields.exitCode & 0x80 == 0 else { throw refuse("zombie \(process.processID) dumped core (its status cannot be made again)") }
                continue
            }
            let parent = process.ownParentProcessID
            if (try? ProcessTreeFS.sameAddressSpace(process.processID, fields.parentProcessID)) == true {
                throw refuse("pid \(process.processID) shares its parent's address space (a vfork in progress, or clone(CLONE_VM))")
            }
            let session = fields.ownSessionID, group = fields.ownProcessGroupID
            if session != pid, session != listing[position[parent] ?? 0].fields.ownSessionID {
                throw refuse("pid \(process.processID) stays in session \(session) that its parent left")
            }
            if group != pid, !outside.contains(group) {
                guard let leader = position[group], leader < index else {
                    throw refuse("pid \(process.processID)'s process group \(group) is led by no process of the tree created before it")
                }
            }
        }
    }

    /// What a child holds as its parent holds it (one open file description at one number, one shared
    /// memory object at one address), which its restore inherits from the restored parent; anything
    /// else it shares with another process of the tree is refused.
    static func inheritance(of process: TreeListing, in listing: [TreeListing])
        throws(CheckpointError) -> (descriptors: [Int32], mappings: [UInt64], renumbered: [RenumberedDescriptor]) {
        let pid = process.processID, parent = process.fields.parentProcessID
        let root = listing[0].processID
        let others = listing.filter { $0.processID != pid && !$0.fields.isZombie }.map(\.processID)
        var descriptors: [Int32] = []
        var mappings: [UInt64] = []
        var renumbered: [RenumberedDescriptor] = []
        do {
            let parentDescriptors = Set(try ProcFS.descriptors(parent))
            var othersDescriptors: [ProcessID: [Int32]] = [:]
            for other in others { othersDescriptors[other] = try ProcFS.descriptors(other) }
            let own = try ProcFS.descriptors(pid)
            for descriptor in own where parentDescriptors.contains(descriptor) {
                if try ProcessTreeFS.sameOpenFile(parent, descriptor, pid, descriptor) { descriptors.append(descriptor) }
            }
            for descriptor in own where !descriptors.contains(descriptor) {
                // A dup of an inherited descriptor is restored as a dup of it (DescriptorRestorer), one description.
                var isDuplicateOfInherited = false
                for inherited in descriptors where try ProcessTreeFS.sameOpenFile(pid, inherited, pid, descriptor) {
                    isDuplicateOfInherited = true
                }
                if isDuplicateOfInherited { continue }
                // The parent's description at another number: taken from the parent and moved.
                if let theirs = try parentDescriptors.sorted().first(where: { try ProcessTreeFS.sameOpenFile(parent, $0, pid, descriptor) }) {
                    renumbered.append(RenumberedDescriptor(descriptor: descriptor, parentDescriptor: theirs))
                    continue
                }
                for other in others {
                    for theirs in othersDescriptors[other] ?? [] where try ProcessTreeFS.sameOpenFile(other, theirs, pid, descriptor) {
                        throw CheckpointError.unsupportedTree(root, reason: "fd \(descriptor) of pid \(pid) is one open file description with fd \(theirs) of pid \(other), not its parent's (only a parent's descriptions stay shared, at the same number or another)")
                    }
                }
            }
            let parentMaps = try ProcFS.maps(parent)
            var objectsElsewhere: [String: ProcessID] = [:]
            for other in others {
                for entry in try ProcFS.maps(other) where entry.shared && entry.kernelPath.isDeleted {
                    objectsElsewhere["\(entry.device) \(entry.inode)"] = other
                }
            }
            for entry in try ProcFS.maps(pid) where entry.shared && entry.kernelPath.isDeleted {
                let key = "\(entry.device) \(entry.inode)"
                if parentMaps.contains(where: { $0.start == entry.start && $0.end == entry.end && $0.fileOffset == entry.fileOffset
                                                && $0.device == entry.device && $0.inode == entry.inode && $0.shared }) {
                    mappings.append(entry.start)
                } else if let other = objectsElsewhere[key] {
                    throw CheckpointError.unsupportedTree(root, reason: "shared memory \(hex(entry.start))-\(hex(entry.end)) of pid \(pid) is also mapped by pid \(other), but not as its parent maps it at that address (only memory inherited so stays shared)")
                }
            }
        } catch let error as CheckpointError {
            throw error
        } catch {
            if !ProcFS.isAlive(pid) { throw .noSuchProcess(pid) }
            throw .system(pid, "comparing what it shares with its tree: \(error)")
        }
        return (descriptors, mappings, renumbered)
    }
}
