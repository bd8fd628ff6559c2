// What /proc and kcmp tell about a process's place in its tree: parent, group, session, whether it is a
// zombie and with which status, and what two processes share (an address space, an open file description).
internal import CSys
import Glibc

/// /proc/PID/stat's tree fields, in the reading process's PID namespace.
public struct ProcessTreeFields: Equatable, Sendable {
    /// The state letter (R, S, D, T, t, Z, X, ...).
    public var state: Character
    public var parentProcessID: ProcessID
    public var processGroupID: ProcessID
    public var sessionID: ProcessID
    /// Field 38: the signal the parent gets at its end.
    public var exitSignal: Int32
    /// Field 52: the wait status once it ended (a zombie's), 0 before.
    public var exitCode: Int32
    /// The number of PID namespaces it is in (NSpid fields): 1 when it is in the init namespace only.
    public var namespaceDepth: Int
    /// Its own PID, group and session as its own PID namespace numbers them (the last NSpid, NSpgid,
    /// NSsid fields; 0 for a group or session from an outer namespace); the fields above otherwise.
    public var ownProcessID: ProcessID
    public var ownProcessGroupID: ProcessID
    public var ownSessionID: ProcessID
    /// readlink of /proc/PID/ns/pid ("pid:[inode]"), nil when unreadable (a zombie's).
    public var namespace: String?

    public var isZombie: Bool { state == "Z" }
}

public enum ProcessTreeFS {
    public static func fields(_ processID: ProcessID) throws -> ProcessTreeFields {
        let stat = try ProcFS.statFields(processID)
        func number(_ index: Int) throws -> Int32 {
            guard let text = stat[index]?.filter({ !$0.isWhitespace }), let value = Int32(text) else {
                throw ProcFSError(path: "/proc/\(processID)/stat", reason: "field \(index) unreadable")
            }
            return value
        }
        guard let state = stat[3]?.first else { throw ProcFSError(path: "/proc/\(processID)/stat", reason: "no state") }
        let status = (try? ProcFS.status(processID)) ?? [:]
        func innermost(_ key: String) -> ProcessID? {
            status[key]?.split(whereSeparator: { $0 == " " || $0 == "\t" }).last.flatMap { Int32($0) }.map { ProcessID(rawValue: $0) }
        }
        let depth = status["NSpid"]?.split(whereSeparator: { $0 == " " || $0 == "\t" }).count ?? 1
        let group = ProcessID(try number(5)), session = ProcessID(try number(6))
        return ProcessTreeFields(state: state, parentProcessID: ProcessID(try number(4)), processGroupID: group,
                                 sessionID: session, exitSignal: try number(38), exitCode: try number(52),
                                 namespaceDepth: depth, ownProcessID: innermost("NSpid") ?? processID,
                                 ownProcessGroupID: innermost("NSpgid") ?? group, ownSessionID: innermost("NSsid") ?? session,
                                 namespace: try? ProcFS.readLink("/proc/\(processID)/ns/pid"))
    }

    /// kcmp(KCMP_FILE) across two processes: whether `firstDescriptor` of `first` and `secondDescriptor`
    /// of `second` are one open file description (a descriptor inherited over fork is).
    public static func sameOpenFile(_ first: ProcessID, _ firstDescriptor: Int32, _ second: ProcessID,
                                    _ secondDescriptor: Int32) throws(SyscallError) -> Bool {
        let result = csys_syscall6(312, Int(first.rawValue), Int(second.rawValue), 0 /* KCMP_FILE */,
                                   Int(firstDescriptor), Int(secondDescriptor), 0)
        if result < 0 { throw SyscallError.current("kcmp(KCMP_FILE, \(first):\(firstDescriptor), \(second):\(secondDescriptor))") }
        return result == 0
    }

    /// kcmp(KCMP_VM): whether two processes share one address space (vfork, clone(CLONE_VM)).
    public static func sameAddressSpace(_ first: ProcessID, _ second: ProcessID) throws(SyscallError) -> Bool {
        let result = csys_syscall6(312, Int(first.rawValue), Int(second.rawValue), 1 /* KCMP_VM */, 0, 0, 0)
        if result < 0 { throw SyscallError.current("kcmp(KCMP_VM, \(first), \(second))") }
        return result == 0
    }
}
