// Why this file exists: /proc/PID/smaps is the only place the kernel shows a mapping's VmFlags (what
// mmap flags and madvise set on it), so it is parsed here, once, into typed values.

/// One mapping's VmFlags line, by the mapping's start address.
public struct SmapsFlags: Equatable, Sendable {
    /// The two-letter mnemonics, in the kernel's order ("rd", "wr", "nr", "dd", ...).
    public var mnemonics: [String]

    public init(mnemonics: [String]) { self.mnemonics = mnemonics }
    public func contains(_ mnemonic: String) -> Bool { mnemonics.contains(mnemonic) }
}

extension ProcFS {
    /// Every mapping's VmFlags, by start address. smaps walks each mapping's page tables to count its
    /// pages (some 10 ms for 512 MiB here), so callers read it outside the downtime where they can.
    public static func smapsFlags(_ processID: ProcessID) throws -> [UInt64: SmapsFlags] {
        let path = "/proc/\(processID)/smaps"
        let text = try readText(path)
        var flags: [UInt64: SmapsFlags] = [:]
        var current: UInt64?
        for line in text.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line.first?.isHexDigit == true, let start = UInt64(line[..<dash], radix: 16) {
                current = start
            } else if line.hasPrefix("VmFlags:") {
                guard let start = current else { throw ProcFSError(path: path, reason: "a VmFlags line before any mapping") }
                flags[start] = SmapsFlags(mnemonics: line.dropFirst("VmFlags:".count).split(separator: " ").map(String.init))
                current = nil
            }
        }
        return flags
    }
}
