// All oracles of one migration behind the engine's observer hooks, with their verdicts for the report.
import Engine
import Sys
import Synchronization

public struct OracleVerdict: Sendable, Codable, Equatable {
    public var name: String
    public var passed: Bool
    public var detail: String

    public init(name: String, passed: Bool, detail: String) {
        self.name = name
        self.passed = passed
        self.detail = detail
    }
}

public final class MigrationOracles: MigrationObserver {
    private let pages = Mutex(PageOracle())
    private let verdictList = Mutex<[OracleVerdict]>([])
    private let victim = Mutex<ProcessID?>(nil)

    /// Also read each page installed after the resume back through the target. Only a driver that
    /// holds the target between its steps may ask for this (torture's): a live target may already be
    /// changing the page (see MigrationObserver.pagesInstalled).
    private let readsBackInstalledPages: Bool

    public init(readsBackInstalledPages: Bool = false) {
        self.readsBackInstalledPages = readsBackInstalledPages
    }

    public var verdicts: [OracleVerdict] { verdictList.withLock { $0 } }

    public func record(_ verdict: OracleVerdict) { verdictList.withLock { $0.append(verdict) } }

    public func victimFrozen(processID: ProcessID, state: ProcessState, pageAddresses: [UInt64]) throws {
        // A tree's pages carry their process's ordinal (TreePageAddress): each is read from its own process.
        let rseqByOrdinal = [state.threads.compactMap(\.rseq)] + state.members.map { member -> [RseqConfiguration] in
            if case .live(let live) = member { live.threads.compactMap(\.rseq) } else { [] }
        }
        try pages.withLock {
            try $0.recordFrozen(processIDs: StateOracle.nodeProcessIDs(root: processID, state: state), pageAddresses: pageAddresses, rseq: rseqByOrdinal)
        }
        victim.withLock { $0 = processID }
        frozenState.withLock { $0 = state }
    }

    /// Set for post-copy: pages are checked as they are installed, not all before the target runs.
    private let lazyPages = Mutex(false)
    public func expectLazyPages() { lazyPages.withLock { $0 = true } }

    public func pagesInstalled(processID: ProcessID, address: UInt64, targetAddress: UInt64, byteCount: Int, installedBytes: [UInt8]?) throws {
        guard victim.withLock({ $0 }) != nil else { return }
        do {
            if let installedBytes, !readsBackInstalledPages {
                try pages.withLock { try $0.verify(bytes: installedBytes, at: address) }
            } else {
                // Read where the pages are now, judged against their digests from where they were. A tree's
                // addresses carry their process's ordinal (TreePageAddress): read from that process.
                let ordinal = TreePageAddress.ordinal(of: targetAddress)
                let owner = ordinal == 0 ? processID : treeMember(ordinal: ordinal, root: processID)
                try pages.withLock {
                    try $0.verifyTarget(processID: owner, frozenAddress: address, targetAddress: TreePageAddress.address(of: targetAddress), byteCount: byteCount)
                }
            }
        } catch {
            record(OracleVerdict(name: "pages", passed: false, detail: "\(error)"))
            throw error
        }
    }

    /// The checkpointed tree (its own numbers), from the freeze; and this node's PIDs of the restored
    /// tree by ordinal, found once (the oracle's own walk of /proc) when a member's page is first shown.
    private let frozenState = Mutex<ProcessState?>(nil)
    private let restoredTree = Mutex<(root: ProcessID, processIDs: [ProcessID])?>(nil)

    private func treeMember(ordinal: Int, root: ProcessID) -> ProcessID {
        restoredTree.withLock { known in
            if let known, known.root == root, ordinal < known.processIDs.count { return known.processIDs[ordinal] }
            guard let state = frozenState.withLock({ $0 }) else { return root }
            let processIDs = StateOracle.nodeProcessIDs(root: root, state: state)
            known = (root, processIDs)
            return ordinal < processIDs.count ? processIDs[ordinal] : root
        }
    }

    /// Pages digested at the freeze, and pages checked in the target so far.
    public var frozenPageCount: Int { pages.withLock { $0.digests.count } }
    public var checkedPageCount: Int { pages.withLock { $0.checkedPageCount } }

    /// The page verdict of a post-copy migration, once the last page is in.
    public func recordLazyPageVerdict() {
        let count = pages.withLock { $0.checkedPageCount }
        if !verdicts.contains(where: { $0.name == "pages" }) {
            record(OracleVerdict(name: "pages", passed: true, detail: "\(count) pages matched the freeze digests as they were installed"))
        }
    }

    public func targetReady(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) throws {
        var mismatches = StateOracle.compare(checkpointed: checkpointed, restored: restored)
        mismatches += StateOracle.restartsLandOnSyscall(processID: processID, checkpointed: checkpointed, restored: restored)
        let nodeProcessIDs = StateOracle.nodeProcessIDs(root: processID, state: restored)
        for (index, (expected, actual)) in zip(checkpointed.members, restored.members).enumerated() {
            guard case .live(let expectedState) = expected, case .live(let actualState) = actual else { continue }
            mismatches += StateOracle.restartsLandOnSyscall(processID: nodeProcessIDs[index + 1], checkpointed: expectedState, restored: actualState)
        }
        record(OracleVerdict(name: "registers and state", passed: mismatches.isEmpty,
                             detail: mismatches.isEmpty ? "identical (rseq cpu fields masked)" : mismatches.map(\.description).joined(separator: "; ")))
        // Pages are compared only when this process also saw the freeze (fammig run); a standalone
        // restore has no independent freeze digest.
        if victim.withLock({ $0 }) != nil && !lazyPages.withLock({ $0 }) {
            do {
                let count = try pages.withLock { (oracle) throws -> Int in
                    try oracle.verifyTarget(processIDs: nodeProcessIDs)
                    return oracle.checkedPageCount
                }
                record(OracleVerdict(name: "pages", passed: true, detail: "\(count) pages match the freeze digests"))
            } catch {
                record(OracleVerdict(name: "pages", passed: false, detail: "\(error)"))
                throw error
            }
        }
        if let first = mismatches.first { throw first }
    }
}
