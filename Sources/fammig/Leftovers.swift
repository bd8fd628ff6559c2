// What a fammig killed by SIGKILL leaves behind, and how the next `fammig gc` finds it. Every fammig
// process holds an exclusive flock on its owner file, /dev/shm/fammig-owners/PID.lock, for as long as it
// lives; the kernel drops the lock when it dies, however it dies. Everything it makes carries its PID in
// the name: FAM files /dev/shm/fammig-PID-N.img, work directories /tmp/fammig-run-PID-XXXXXX, node
// namespaces fammig-source-PID and fammig-target-PID; `run` also lists the programs it started itself
// (PID, start time, executable) in PID.processes. gc removes a thing only when the flock on its owner's
// file can be taken, i.e. no live process holds it: never what a live fammig still uses. A PID reused
// by a new fammig only delays the clean-up of the old one's leftovers (its lock is held again).
import Engine
import Foundation
import Sys

enum Leftovers {
    static let ownerDirectory = "/dev/shm/fammig-owners"

    static func lockPath(_ ownerProcessID: Int32) -> String { "\(ownerDirectory)/\(ownerProcessID).lock" }
    static func processesPath(_ ownerProcessID: Int32) -> String { "\(ownerDirectory)/\(ownerProcessID).processes" }

    /// This process's owner lock, held until it exits (a process-lifetime value, so deliberately kept
    /// by the caller for the whole run). Nil when it cannot be taken (then gc treats our leftovers as a
    /// dead owner's only once our PID's lock file is free, which it is not while we run: harmless).
    static func claim() -> FileLock? {
        mkdir(ownerDirectory, 0o700)
        return try? FileLock.tryAcquire(path: lockPath(getpid()), creating: true)
    }

    /// On a normal exit: nothing of ours is left, so neither is our owner record.
    static func release(_ lock: FileLock?) {
        guard let lock else { return }
        unlink(processesPath(getpid()))
        unlink(lockPath(getpid()))
        lock.release()
    }

    /// A program this `fammig run` started itself, for gc to end if this run is killed.
    static func recordOwnProcess(_ processID: ProcessID) {
        guard let owner = PoolOwner.of(processID) else { return }
        let executable = (try? ProcFS.readLink(ProcFS.path(of: processID, .executable))) ?? ""
        let line = "\(processID.rawValue) \(owner.startTime) \(executable)\n"
        guard let handle = FileHandle(forWritingAtPath: processesPath(getpid())) ?? {
            FileManager.default.createFile(atPath: processesPath(getpid()), contents: nil, attributes: [.posixPermissions: 0o600])
            return FileHandle(forWritingAtPath: processesPath(getpid()))
        }() else { return }
        handle.seekToEndOfFile()
        handle.write(Data(line.utf8))
        try? handle.close()
    }

    /// Whether the fammig that was `ownerProcessID` is gone: nobody holds its owner lock (or it never
    /// took one, and no process of that PID runs).
    static func isOwnerGone(_ ownerProcessID: Int32) -> Bool {
        if ownerProcessID == getpid() { return false }
        guard ProcFS.exists(lockPath(ownerProcessID)) else { return !ProcFS.isAlive(ProcessID(ownerProcessID)) }
        guard let lock = try? FileLock.tryAcquire(path: lockPath(ownerProcessID)) else { return false }
        lock.release()
        return true
    }

    /// One thing a dead owner left.
    struct Leftover: CustomStringConvertible {
        enum Kind: String { case process, famFile = "FAM file", workDirectory = "work directory", namespace = "network namespace", ownerRecord = "owner record" }
        var kind: Kind
        var name: String
        var owner: Int32
        var description: String { "\(kind.rawValue) \(name) (fammig pid \(owner), gone)" }
    }

    /// The owner PID in a name `prefix` + PID + "-" or "."..., or nil.
    static func ownerID(in name: String, prefix: String) -> Int32? {
        guard name.hasPrefix(prefix) else { return nil }
        let digits = name.dropFirst(prefix.count).prefix(while: \.isNumber)
        guard !digits.isEmpty, let next = name.dropFirst(prefix.count + digits.count).first, next == "-" || next == "." else { return nil }
        return Int32(digits)
    }

    /// The FAM files fammig names after their owner: run's image, bench's images and baselines.
    static let famFilePrefixes = ["fammig-", "fammig-bench-", "fammig-bench-baseline-", "fammig-bench-uffd-"]

    /// Everything a gone owner left, processes first (they may use the files).
    static func find() -> [Leftover] {
        var found: [Leftover] = []
        for entry in ((try? ProcFS.directoryEntries(ownerDirectory)) ?? []).sorted() where entry.hasSuffix(".processes") {
            guard let owner = Int32(entry.dropLast(".processes".count)), isOwnerGone(owner),
                  let text = try? String(contentsOfFile: "\(ownerDirectory)/\(entry)", encoding: .utf8) else { continue }
            for line in text.split(separator: "\n") {
                let fields = line.split(separator: " ", maxSplits: 2)
                guard fields.count >= 2, let processID = Int32(fields[0]), let startTime = UInt64(fields[1]),
                      let now = PoolOwner.of(ProcessID(processID)), now.startTime == startTime, ProcFS.isAlive(ProcessID(processID))
                else { continue }
                found.append(Leftover(kind: .process, name: "\(processID)", owner: owner))
            }
        }
        for entry in ((try? ProcFS.directoryEntries("/dev/shm")) ?? []).sorted() {
            guard entry.hasSuffix(".img"), let owner = famFilePrefixes.lazy.compactMap({ ownerID(in: entry, prefix: $0) }).first,
                  isOwnerGone(owner) else { continue }
            found.append(Leftover(kind: .famFile, name: "/dev/shm/" + entry, owner: owner))
        }
        for entry in ((try? ProcFS.directoryEntries("/tmp")) ?? []).sorted() {
            guard let owner = ownerID(in: entry, prefix: "fammig-run-"), isOwnerGone(owner) else { continue }
            found.append(Leftover(kind: .workDirectory, name: "/tmp/" + entry, owner: owner))
        }
        for name in NodeNetwork.namedNamespaces() {
            for prefix in ["fammig-source-", "fammig-target-"] {
                guard name.hasPrefix(prefix), let owner = Int32(name.dropFirst(prefix.count)), isOwnerGone(owner) else { continue }
                found.append(Leftover(kind: .namespace, name: name, owner: owner))
            }
        }
        for entry in ((try? ProcFS.directoryEntries(ownerDirectory)) ?? []).sorted() {
            guard let owner = Int32(entry.split(separator: ".").first ?? ""), isOwnerGone(owner) else { continue }
            found.append(Leftover(kind: .ownerRecord, name: "\(ownerDirectory)/\(entry)", owner: owner))
        }
        return found
    }

    /// Removes one leftover; nil when done, else why not.
    static func remove(_ leftover: Leftover) -> String? {
        switch leftover.kind {
        case .process:
            let processID = ProcessID(Int32(leftover.name)!)
            Spawn.kill(processID)
            return pollGone(processID) ? nil : "pid \(leftover.name) did not end after SIGKILL"
        case .famFile, .ownerRecord:
            return unlink(leftover.name) == 0 || errno == ENOENT ? nil : "unlink: \(String(cString: strerror(errno)))"
        case .workDirectory:
            do { try DirectoryTree.remove(leftover.name) } catch { return "\(error)" }
            return nil
        case .namespace:
            do { try NodeNetwork.removeNamespace(leftover.name) } catch { return "\(error)" }
            return nil
        }
    }

    private static func pollGone(_ processID: ProcessID) -> Bool {
        for _ in 0..<200 {
            if !ProcFS.isAlive(processID) { return true }
            usleep(10_000)
        }
        return false
    }
}
