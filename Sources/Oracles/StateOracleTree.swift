// The state oracle over a process tree: every member, its relations and its own state.
import Engine
import Sys

// MARK: Process trees

extension StateOracle {
    /// Every process of the tree: the same PIDs in the same order, each one's parent, process group,
    /// session and exit signal, what it shares with its parent (found again with kcmp in the restored
    /// tree), a zombie's wait status, and each live member's whole state. Ids from outside the tree (the
    /// root's parent, and its group and session when it leads neither) are the restorer's: they are
    /// compared as "the root's", never by number.
    static func treeMismatches(checkpointed: ProcessState, restored: ProcessState, into mismatches: inout [StateMismatch]) {
        guard checkpointed.lineage.isRecorded else { return }
        func identity(_ id: ProcessID, in tree: ProcessState) -> String {
            if tree.treeProcessIDs.contains(id) { return "pid \(id)" }
            if id == tree.lineage.processGroupID { return "the root's group from outside the tree" }
            if id == tree.lineage.sessionID { return "the root's session from outside the tree" }
            return "\(id), outside the tree"
        }
        func compareLineage(_ name: String, _ expected: ProcessLineage, _ actual: ProcessLineage, isRoot: Bool) {
            func check(_ field: String, _ expectedValue: String, _ actualValue: String) {
                if expectedValue != actualValue { mismatches.append(StateMismatch(field: "\(name) \(field)", expected: expectedValue, actual: actualValue)) }
            }
            if !isRoot {
                check("parent", identity(expected.parentProcessID, in: checkpointed), identity(actual.parentProcessID, in: restored))
                check("exit signal", "\(expected.exitSignal)", "\(actual.exitSignal)")
                check("inherited descriptors", "\(expected.inheritedDescriptors.sorted())", "\(actual.inheritedDescriptors.sorted())")
                check("descriptors taken from the parent", "\(expected.renumberedDescriptors.map { "\($0.parentDescriptor)->\($0.descriptor)" }.sorted())",
                      "\(actual.renumberedDescriptors.map { "\($0.parentDescriptor)->\($0.descriptor)" }.sorted())")
                check("inherited shared memory", "\(expected.inheritedMappingStarts.sorted().map(hex))", "\(actual.inheritedMappingStarts.sorted().map(hex))")
            }
            check("process group", identity(expected.processGroupID, in: checkpointed), identity(actual.processGroupID, in: restored))
            check("session", identity(expected.sessionID, in: checkpointed), identity(actual.sessionID, in: restored))
        }
        compareLineage("pid \(checkpointed.processID)", checkpointed.lineage, restored.lineage, isRoot: true)
        if checkpointed.members.map(\.processID) != restored.members.map(\.processID) {
            mismatches.append(StateMismatch(field: "tree processes", expected: "\(checkpointed.treeProcessIDs)", actual: "\(restored.treeProcessIDs)"))
            return
        }
        for (expected, actual) in zip(checkpointed.members, restored.members) {
            let name = "pid \(expected.processID)"
            compareLineage(name, expected.lineage, actual.lineage, isRoot: false)
            switch (expected, actual) {
            case (.zombie(let expectedZombie), .zombie(let actualZombie)):
                if expectedZombie.waitStatus != actualZombie.waitStatus {
                    mismatches.append(StateMismatch(field: "\(name) zombie wait status", expected: hex(UInt64(UInt32(bitPattern: expectedZombie.waitStatus))),
                                                    actual: hex(UInt64(UInt32(bitPattern: actualZombie.waitStatus)))))
                }
            case (.live(let expectedState), .live(let actualState)):
                mismatches += compare(checkpointed: expectedState, restored: actualState).map {
                    StateMismatch(field: "\(name) \($0.field)", expected: $0.expected, actual: $0.actual)
                }
            default:
                mismatches.append(StateMismatch(field: "\(name)", expected: "\(expected)".prefix(40).description, actual: "\(actual)".prefix(40).description))
            }
        }
    }
}

extension StateOracle {
    /// This node's PID of each process of a tree by ordinal (the root's first), found by walking the
    /// root's descendants in /proc (the oracle's own reading): the records hold the tree's own numbers,
    /// which differ when the root is pid 1 of a namespace of its own. A process not found keeps its number.
    public static func nodeProcessIDs(root: ProcessID, state: ProcessState) -> [ProcessID] {
        guard !state.members.isEmpty else { return [root] }
        var byOwnNumber: [ProcessID: ProcessID] = [:]
        var queue = [root]
        var next = 0
        while next < queue.count && queue.count <= TreeLimits.processCountMax {
            let parent = queue[next]
            next += 1
            for child in (try? ProcFS.childProcessIDs(parent)) ?? [] {
                byOwnNumber[(try? ProcFS.innermostProcessID(child)) ?? child] = child
                queue.append(child)
            }
        }
        return [root] + state.members.map { byOwnNumber[$0.processID] ?? $0.processID }
    }
}
