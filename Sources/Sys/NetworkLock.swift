// Why this file exists: while a TCP connection is away (read in repair mode on the source, not yet live
// on the target), a peer outside the process keeps sending or retransmitting; a segment that meets no
// socket is answered with a reset, and one that meets the socket being read is acknowledged and then
// lost. So the connection's segments must be dropped meanwhile: the peer just retransmits until the
// target's socket answers. CRIU uses netfilter for this; this kernel has neither nftables nor iptables
// nor tc's drop action, but it has tc's htb and pfifo: a class whose queue holds 0 packets drops all
// it is given. Filters (u32, by TCP port, IPv4 and IPv6) send a locked port's segments there; all other
// traffic goes straight through (htb's default class 0: unshaped). On one machine every loopback
// segment leaves through `lo`, so one egress filter sees both directions.
#if canImport(Glibc)
import Glibc
#endif

public enum NetworkLock {
    static let tc = "/usr/sbin/tc"
    static let dropClass = "1:fa"

    /// Drops every TCP segment of `family` (AF_INET 2, AF_INET6 10) from or to `port` on `device` until
    /// `unlock(port:)`. A port is locked for one family (tc keeps one protocol per preference).
    public static func lock(port: UInt16, family: Int32, device: String = "lo") throws {
        if !((try? output(["qdisc", "show", "dev", device])) ?? "").contains("htb 1:") {
            try run(["qdisc", "add", "dev", device, "root", "handle", "1:", "htb"])
        }
        if !((try? output(["class", "show", "dev", device])) ?? "").contains("htb \(dropClass)") {
            try run(["class", "add", "dev", device, "parent", "1:", "classid", dropClass, "htb", "rate", "8bit"])
            try run(["qdisc", "add", "dev", device, "parent", dropClass, "handle", "fa:", "pfifo", "limit", "0"])
        }
        // One preference per port (and family), so that unlocking removes exactly this port's filters.
        let (protocolName, match) = family == 10 ? ("ipv6", "ip6") : ("ip", "ip")
        do {
            for direction in ["sport", "dport"] {
                try run(["filter", "add", "dev", device, "parent", "1:", "protocol", protocolName, "pref", "\(port)", "u32",
                         "match", match, direction, "\(port)", "0xffff", "flowid", dropClass])
            }
        }
    }

    /// Lets `port`'s segments through again; the qdisc goes when no port is locked any more.
    public static func unlock(port: UInt16, device: String = "lo") {
        for protocolName in ["ip", "ipv6"] {
            try? run(["filter", "del", "dev", device, "parent", "1:", "protocol", protocolName, "pref", "\(port)"])
        }
        if ((try? output(["filter", "show", "dev", device])) ?? "x").isEmpty {
            try? run(["qdisc", "del", "dev", device, "root"])
        }
    }

    /// Is `port` locked on `device` now?
    public static func isLocked(port: UInt16, device: String = "lo") -> Bool {
        ((try? output(["filter", "show", "dev", device])) ?? "").contains("pref \(port) ")
    }

    private static func run(_ arguments: [String]) throws {
        let processID = try Spawn.program(path: tc, arguments: arguments, environment: [],
                                          standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
        let status = try Spawn.waitForExit(processID)
        guard status == .exited(0) else {
            throw NetworkNamespaceError.command(([tc] + arguments).joined(separator: " "), status: "\(status)")
        }
    }

    private static func output(_ arguments: [String]) throws -> String {
        var template = Array("/tmp/.fammig-tc-XXXXXX".utf8CString)
        let descriptor = mkstemp(&template)
        guard descriptor >= 0 else { throw SyscallError.current("mkstemp") }
        close(descriptor)
        let path = String(cString: template)
        defer { unlink(path) }
        let processID = try Spawn.program(path: tc, arguments: arguments, environment: [],
                                          standardOutputPath: path, standardErrorPath: "/dev/null")
        let status = try Spawn.waitForExit(processID)
        guard status == .exited(0) else { throw NetworkNamespaceError.command(([tc] + arguments).joined(separator: " "), status: "\(status)") }
        guard let file = fopen(path, "r") else { return "" }
        defer { fclose(file) }
        var text = ""
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), file) != nil { text += String(cString: line) }
        return text
    }
}
