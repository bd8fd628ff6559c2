// Two "nodes" on one machine with separate network stacks: a network namespace each, joined by a veth
// pair. Created with iproute2 (`ip netns`, `ip link`), entered per thread with setns(2): a socket keeps
// the namespace it was created in, so the calling thread can make one socket in each and return home.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

public enum NetworkNamespaceError: Error, CustomStringConvertible, Sendable {
    case command(String, status: String)
    case setns(String, SyscallError)

    public var description: String {
        switch self {
        case .command(let command, let status):
            "`\(command)` \(status); network namespaces and tc need root and iproute2 (apt-get install iproute2)."
        case .setns(let name, let error): "cannot enter network namespace \(name): \(error)"
        }
    }
}

/// A link rate for tc, as iproute2 writes it ("10gbit", "500mbit"), with its value in bits per second.
public struct LinkRate: Equatable, Sendable, CustomStringConvertible {
    public let text: String
    public let bitsPerSecond: UInt64

    /// Parses "NUMBERUNIT" with UNIT one of bit, kbit, mbit, gbit, tbit (decimal multiples, as tc reads them).
    public init?(_ text: String) {
        let units: [(String, UInt64)] = [("tbit", 1_000_000_000_000), ("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000), ("bit", 1)]
        guard let (unit, multiplier) = units.first(where: { text.hasSuffix($0.0) }) else { return nil }
        let number = text.dropLast(unit.count)
        guard !number.isEmpty, number.allSatisfy(\.isNumber), let value = UInt64(number), value > 0,
              value <= UInt64.max / multiplier, value * multiplier >= 8_000 else { return nil }
        self.text = text
        bitsPerSecond = value * multiplier
    }

    public var description: String { text }
}

/// A pair of network namespaces joined by a veth pair, source side `10.77.N.1`, target side `10.77.N.2`.
/// Invariant: both namespaces exist until `remove()` (idempotent), which also removes the veth pair.
public final class NodeNetwork: @unchecked Sendable {
    public let sourceNamespace: String
    public let targetNamespace: String
    public let sourceAddress: String
    public let targetAddress: String
    /// The rate each end's egress is shaped to (tbf), nil for the veth pair's own speed.
    public let link: LinkRate?
    private var removed = false

    /// `link` shapes both directions with tbf (a token bucket: the rate, a burst of 1 ms at that rate and
    /// at least 256 KiB for the veth's 64 KiB GSO packets, 20 ms of queue). netem, for delay and loss,
    /// is not in this machine's kernel ("Specified qdisc kind is unknown"), so only the rate is shaped.
    public init(tag: Int32, link: LinkRate? = nil) throws {
        self.link = link
        let subnet = Int(tag % 250) + 1
        sourceNamespace = "fammig-source-\(tag)"
        targetNamespace = "fammig-target-\(tag)"
        sourceAddress = "10.77.\(subnet).1"
        targetAddress = "10.77.\(subnet).2"
        let sourceLink = "fms\(tag)", targetLink = "fmt\(tag)"
        do {
            try Self.ip(["netns", "add", sourceNamespace])
            try Self.ip(["netns", "add", targetNamespace])
            try Self.ip(["link", "add", sourceLink, "type", "veth", "peer", "name", targetLink])
            try Self.ip(["link", "set", sourceLink, "netns", sourceNamespace])
            try Self.ip(["link", "set", targetLink, "netns", targetNamespace])
            try Self.ip(["-n", sourceNamespace, "addr", "add", sourceAddress + "/24", "dev", sourceLink])
            try Self.ip(["-n", targetNamespace, "addr", "add", targetAddress + "/24", "dev", targetLink])
            for (namespace, device) in [(sourceNamespace, sourceLink), (targetNamespace, targetLink)] {
                try Self.ip(["-n", namespace, "link", "set", device, "up"])
                try Self.ip(["-n", namespace, "link", "set", "lo", "up"])
                if let link {
                    let burstByteCount = max(256 << 10, link.bitsPerSecond / 8 / 1000)
                    try Self.run("/usr/sbin/tc", ["-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", "rate", link.text,
                                                  "burst", "\(burstByteCount)", "latency", "20ms"])
                }
            }
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// Deletes both namespaces (the veth pair goes with them).
    public func remove() {
        guard !removed else { return }
        removed = true
        _ = try? Self.ip(["netns", "del", sourceNamespace])
        _ = try? Self.ip(["netns", "del", targetNamespace])
    }

    /// Runs `body` with the calling thread inside `namespace`, then returns it to where it was.
    public func inside<T>(_ namespace: String, _ body: () throws -> T) throws -> T {
        let home = try checked("open(/proc/thread-self/ns/net)") { open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC) }
        defer { close(home) }
        let target = try checked("open(/run/netns/\(namespace))") { open("/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC) }
        defer { close(target) }
        if Self.setNetworkNamespace(target) != 0 {
            throw NetworkNamespaceError.setns(namespace, SyscallError.current("setns(\(namespace))"))
        }
        defer { _ = Self.setNetworkNamespace(home) }
        return try body()
    }

    /// setns(descriptor, CLONE_NEWNET) (x86-64 syscall 308), which Swift's Glibc does not import.
    private static func setNetworkNamespace(_ descriptor: Int32) -> Int {
        csys_syscall6(308, Int(descriptor), 0x4000_0000, 0, 0, 0, 0)
    }

    /// The named network namespaces (`ip netns add` keeps them under /run/netns), sorted.
    public static func namedNamespaces() -> [String] {
        ((try? ProcFS.directoryEntries("/run/netns")) ?? []).sorted()
    }

    /// `ip netns del name`: removes a named namespace someone else made (a node pair of a fammig that
    /// was killed before it could).
    public static func removeNamespace(_ name: String) throws {
        try ip(["netns", "del", name])
    }

    private static func ip(_ arguments: [String]) throws {
        try run("/usr/sbin/ip", arguments)
    }

    private static func run(_ path: String, _ arguments: [String]) throws {
        let command = ([path] + arguments).joined(separator: " ")
        let processID = try Spawn.program(path: path, arguments: arguments, environment: [],
                                          standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
        let status = try Spawn.waitForExit(processID)
        guard status == .exited(0) else { throw NetworkNamespaceError.command(command, status: "\(status)") }
    }
}
