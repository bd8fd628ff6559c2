// Why this file exists: /proc is input from the kernel, read as text or packed words. Every parser here
// throws on text it does not understand instead of guessing.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// Something in /proc that could not be read or understood.
public struct ProcFSError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let reason: String
    public var description: String { "\(path): \(reason)" }
}

/// One line of /proc/PID/maps.
public struct MapsEntry: Equatable, Sendable {
    public var start: UInt64
    public var end: UInt64
    public var readable: Bool
    public var writable: Bool
    public var executable: Bool
    public var shared: Bool
    public var fileOffset: UInt64
    public var device: String
    public var inode: UInt64
    /// The path column: a file path, `[heap]`, `[stack]`, `[vdso]`… or empty for anonymous memory.
    public var path: String

    public var byteCount: UInt64 { end - start }
}

public enum ProcFS {
    /// Reads a whole /proc file (their sizes are not known in advance).
    public static func readFile(_ path: String) throws -> [UInt8] {
        let descriptor = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(descriptor) }
        var result: [UInt8] = []
        // Torture reads a status or stat file before every step: a 64 KiB array made and zeroed for each
        // read showed in its profile. Most /proc files fit in one page; longer ones take more reads.
        try withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 8) { (chunk) throws in
            // Ends at end of file (a /proc file is finite; a regular file, its size).
            while true {
                let count = try retryingInterrupts("read(\(path))") { read(descriptor, chunk.baseAddress, chunk.count) }
                if count == 0 { return }
                result.append(contentsOf: UnsafeRawBufferPointer(rebasing: chunk[0..<count]))
            }
        }
        return result
    }

    public static func readText(_ path: String) throws -> String {
        String(decoding: try readFile(path), as: UTF8.self)
    }

    public static func readLink(_ path: String) throws -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let count = try checked("readlink(\(path))") { readlink(path, &buffer, buffer.count - 1) }
        return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func maps(_ processID: ProcessID) throws -> [MapsEntry] {
        let path = "/proc/\(processID)/maps"
        let text = try readText(path)
        var entries: [MapsEntry] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            entries.append(try parseMapsLine(Substring(line), path: path))
        }
        return entries
    }

    static func parseMapsLine(_ line: Substring, path: String) throws(ProcFSError) -> MapsEntry {
        // Six columns; the path column may itself contain spaces, so split at most five times.
        let columns = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard columns.count >= 5 else { throw ProcFSError(path: path, reason: "bad maps line '\(line)'") }
        let range = columns[0].split(separator: "-")
        let permissions = Array(columns[1].utf8)
        guard range.count == 2, let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16),
              permissions.count == 4, let offset = UInt64(columns[2], radix: 16),
              let inode = UInt64(columns[4]) else {
            throw ProcFSError(path: path, reason: "bad maps line '\(line)'")
        }
        let name = columns.count > 5 ? String(columns[5].drop(while: { $0 == " " })) : ""
        return MapsEntry(start: start, end: end, readable: permissions[0] == UInt8(ascii: "r"),
                         writable: permissions[1] == UInt8(ascii: "w"),
                         executable: permissions[2] == UInt8(ascii: "x"),
                         shared: permissions[3] == UInt8(ascii: "s"), fileOffset: offset,
                         device: String(columns[3]), inode: inode, path: name)
    }

    /// `Key:\tvalue` lines of /proc/PID/status.
    public static func status(_ processID: ProcessID) throws -> [String: String] {
        var result: [String: String] = [:]
        for line in try readText(path(of: processID, .status)).split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            result[String(line[..<colon])] = line[line.index(after: colon)...].trimmingSpaces()
        }
        return result
    }

    /// The fields of /proc/PID/stat after the command name, numbered as in proc(5) (field 1 = pid).
    public static func statFields(_ processID: ProcessID) throws -> [Int: String] {
        let path = Self.path(of: processID, .stat)
        let text = try readText(path)
        // The command name is in parentheses and may contain anything: split after the last ')'.
        guard let close = text.lastIndex(of: ")") else { throw ProcFSError(path: path, reason: "no ')' in stat") }
        let rest = text[text.index(after: close)...].split(separator: " ", omittingEmptySubsequences: true)
        var result: [Int: String] = [:]
        for (index, field) in rest.enumerated() { result[index + 3] = String(field) }
        return result
    }

    /// The thread IDs of a process.
    public static func threadIDs(_ processID: ProcessID) throws -> [ProcessID] {
        try directoryEntries("/proc/\(processID)/task").compactMap { Int32($0, radix: 10) }.sorted().map { ProcessID(rawValue: $0) }
    }

    /// The children of a process, zombies included: the union of /proc/PID/task/TID/children over its
    /// threads (each thread lists the children it forked), sorted. A thread that exits meanwhile is
    /// skipped; text that is not a list of PIDs throws.
    public static func childProcessIDs(_ processID: ProcessID) throws -> [ProcessID] {
        var children = Set<Int32>()
        for threadID in try threadIDs(processID) {
            let path = "/proc/\(processID)/task/\(threadID)/children"
            guard let text = try? readText(path) else { continue }
            for field in text.split(whereSeparator: { $0 == " " || $0 == "\n" }) {
                guard let child = Int32(field, radix: 10), child > 0 else {
                    throw ProcFSError(path: path, reason: "'\(field.prefix(32))' is not a PID")
                }
                children.insert(child)
            }
        }
        return children.sorted().map { ProcessID(rawValue: $0) }
    }

    /// Writes `text` to a /proc file in one write (the kernel parses a /proc value per write call).
    public static func writeText(_ path: String, _ text: String) throws {
        let descriptor = try retryingInterrupts("open(\(path))") { open(path, O_WRONLY | O_CLOEXEC) }
        defer { close(descriptor) }
        let bytes = Array(text.utf8)
        let written = try bytes.withUnsafeBytes { (buffer) throws -> Int in
            try retryingInterrupts("write(\(path))") { write(descriptor, buffer.baseAddress, buffer.count) }
        }
        guard written == bytes.count else { throw ProcFSError(path: path, reason: "wrote \(written) of \(bytes.count) bytes") }
    }

    /// Open descriptor numbers of a process, sorted.
    public static func descriptors(_ processID: ProcessID) throws -> [Int32] {
        try directoryEntries("/proc/\(processID)/fd").compactMap { Int32($0, radix: 10) }.sorted()
    }

    public static func directoryEntries(_ path: String) throws -> [String] {
        guard let directory = opendir(path) else { throw SyscallError.current("opendir(\(path))") }
        defer { closedir(directory) }
        var names: [String] = []
        // A dirent is as long as its name, not sizeof(dirent): copying the whole d_name array (256
        // bytes) read past the last record of getdents' buffer, and crashed when that crossed into an
        // unmapped page. Read the name in place, up to its NUL.
        let nameOffset = MemoryLayout<dirent>.offset(of: \dirent.d_name)!
        while let entry = readdir(directory) {
            let name = String(cString: UnsafeRawPointer(entry).advanced(by: nameOffset).assumingMemoryBound(to: CChar.self))
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// The addresses of the pages among `pageCount` from `address` that are present or swapped out
    /// (pagemap bits 63 and 62); with `excludingFilePages`, less those that are a file's page-cache pages
    /// (bit 61: in a private file mapping, the pages not yet written). In increasing order.
    /// Read a chunk at a time and sifted in C: a sparse mapping (4 GiB reserved, 200 pages touched) has a
    /// million words, and sifting them in Swift was a sixth of a torture campaign's CPU time.
    public static func presentPageAddresses(_ processID: ProcessID, address: UInt64, pageCount: Int,
                                            excludingFilePages: Bool) throws -> [UInt64] {
        precondition(pageCount >= 0 && address % 4096 == 0, "pages from \(address), \(pageCount) of them")
        let path = "/proc/\(processID)/pagemap"
        let descriptor = try retryingInterrupts("open(\(path))") { open(path, O_RDONLY | O_CLOEXEC) }
        defer { close(descriptor) }
        let chunkPageCount = 65536
        var words = [UInt64](repeating: 0, count: min(pageCount, chunkPageCount))
        var addresses: [UInt64] = []
        var donePageCount = 0
        // Ends after the last chunk; each read makes progress or throws.
        while donePageCount < pageCount {
            let chunkCount = min(chunkPageCount, pageCount - donePageCount)
            let chunkAddress = address + UInt64(donePageCount) * 4096
            try words.withUnsafeMutableBytes { (bytes) throws in
                var doneByteCount = 0
                while doneByteCount < chunkCount * 8 {
                    let count = try retryingInterrupts("pread(\(path))") {
                        pread(descriptor, bytes.baseAddress! + doneByteCount, chunkCount * 8 - doneByteCount,
                              off_t(chunkAddress / 4096 * 8) + off_t(doneByteCount))
                    }
                    if count == 0 { throw SyscallError(call: "pread(\(path)) ended early", errno: .ioError) }
                    doneByteCount += count
                }
            }
            let selectedCount = words.withUnsafeMutableBufferPointer { buffer in
                csys_select_pagemap_pages(buffer.baseAddress!, chunkCount, (1 << 63) | (1 << 62),
                                          excludingFilePages ? 1 << 61 : 0, chunkAddress)
            }
            addresses.append(contentsOf: words[0..<selectedCount])
            donePageCount += chunkCount
        }
        return addresses
    }

    /// The PID a process has in its own PID namespace (the last NSpid field), e.g. 1 for a namespace's
    /// first process; the same PID when it lives in ours.
    public static func innermostProcessID(_ processID: ProcessID) throws -> ProcessID {
        let status = try status(processID)
        guard let last = status["NSpid"]?.split(whereSeparator: { $0 == " " || $0 == "\t" }).last,
              let value = Int32(last, radix: 10) else { return processID }
        return ProcessID(value)
    }

    /// The state letter of a process (its main thread) in /proc/PID/stat, typed; nil when it is gone.
    public static func state(_ processID: ProcessID) -> TaskState? {
        stateInStat(path(of: processID, .stat))
    }

    /// The state letter of thread `threadID` of `processID`; nil when it is gone.
    public static func state(_ processID: ProcessID, thread threadID: ProcessID) -> TaskState? {
        stateInStat("/proc/\(processID.rawValue)/task/\(threadID.rawValue)/stat")
    }

    private static func stateInStat(_ path: String) -> TaskState? {
        // The command name is in parentheses and may contain anything: the state follows the last ')'.
        guard let bytes = try? readFile(path), let close = bytes.lastIndex(of: UInt8(ascii: ")")), close + 2 < bytes.count else { return nil }
        return TaskState(letter: bytes[close + 2])
    }

    /// Whether the process is dead, dying, or has SIGKILL pending (a kill is recorded at once, while
    /// the death it causes comes a little later): "was it killed" without a race.
    /// Torture asks before every step: the three lines it needs are found with libc's strstr, not by
    /// splitting the file into lines (which was a twentieth of a campaign's CPU time in the debug build).
    public static func isKilledOrEnded(_ processID: ProcessID) -> Bool {
        guard var bytes = try? readFile(path(of: processID, .status)) else { return true }
        bytes.append(0)
        return bytes.withUnsafeBufferPointer { buffer -> Bool in
            let text = UnsafeRawPointer(buffer.baseAddress!).assumingMemoryBound(to: CChar.self)
            guard let state = strstr(text, "\nState:") else { return true }
            var letter = state + 7
            while letter.pointee == 0x20 || letter.pointee == 0x09 { letter += 1 }
            if let taskState = TaskState(letter: UInt8(bitPattern: letter.pointee)), taskState.hasEnded { return true }
            let killBit: UInt64 = 1 << 8  // SIGKILL is signal 9
            for key in ["\nSigPnd:", "\nShdPnd:"] {
                guard let line = strstr(text, key) else { continue }
                if strtoull(line + 8, nil, 16) & killBit != 0 { return true }
            }
            return false
        }
    }

    /// Whether a PID names a live (not zombie) process.
    public static func isAlive(_ processID: ProcessID) -> Bool {
        guard let state = ProcFS.state(processID) else { return false }
        return !state.hasEnded
    }
}

/// A task's state as /proc/PID/stat shows it (proc(5), the letters of fs/proc/array.c).
public enum TaskState: Equatable, Sendable {
    /// R: running or runnable.
    case running
    /// S: interruptible sleep.
    case sleeping
    /// D: uninterruptible sleep.
    case diskSleep
    /// T: stopped by a signal (a group-stop).
    case stopped
    /// t: in a ptrace stop.
    case tracingStop
    /// Z: ended, not yet reaped.
    case zombie
    /// X: dead (being reaped).
    case dead
    /// I: an idle kernel thread; P: parked.
    case idle, parked

    /// nil for a letter this kernel should not show.
    public init?(letter: UInt8) {
        switch letter {
        case UInt8(ascii: "R"): self = .running
        case UInt8(ascii: "S"): self = .sleeping
        case UInt8(ascii: "D"): self = .diskSleep
        case UInt8(ascii: "T"): self = .stopped
        case UInt8(ascii: "t"): self = .tracingStop
        case UInt8(ascii: "Z"): self = .zombie
        case UInt8(ascii: "X"): self = .dead
        case UInt8(ascii: "I"): self = .idle
        case UInt8(ascii: "P"): self = .parked
        default: return nil
        }
    }

    /// A zombie or dead: it runs no more.
    public var hasEnded: Bool { self == .zombie || self == .dead }
    /// In a stop (group-stop or ptrace stop), or ended: it will not run by itself.
    public var isStoppedOrEnded: Bool { self == .stopped || self == .tracingStop || hasEnded }
}

extension Substring {
    /// The text without leading and trailing spaces and tabs (/proc pads its columns with both).
    /// Scans bytes, not characters: /proc is read for every process state and every driver step, and
    /// the character-wise version (reversed twice) was a fifth of a torture campaign's CPU time.
    public func trimmingSpaces() -> String {
        let bytes = utf8
        var start = bytes.startIndex
        var end = bytes.endIndex
        while start < end, bytes[start] == 0x20 || bytes[start] == 0x09 { start = bytes.index(after: start) }
        while start < end {
            let last = bytes.index(before: end)
            guard bytes[last] == 0x20 || bytes[last] == 0x09 else { break }
            end = last
        }
        // Spaces and tabs are one byte each: both ends stay on character boundaries.
        return String(self[start..<end])
    }
}
