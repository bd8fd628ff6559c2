// /proc/PID/timers read as typed entries (issue 14: the engine consumes values, never /proc text). What
// of them migrates, and how a refusal reads, is the engine's business (PosixTimerReader).

/// One POSIX timer as /proc/PID/timers lists it, in a group of four lines: `ID: N`,
/// `signal: SIG/VALUE(hex)`, `notify: KIND/pid.N` or `KIND/tid.N`, `ClockID: N`.
public struct ProcTimerEntry: Equatable, Sendable {
    public var id: Int32
    public var signal: Int32
    /// The signal's value word (sigev_value).
    public var value: UInt64
    /// How it notifies, as the kernel spells it: `signal`, `none`, `thread`, ...
    public var notifyKind: String
    /// Whom: `pid` (the process) or `tid` (one thread), numbered `notifyNumber` as this node numbers it.
    public var notifyTarget: String
    public var notifyNumber: Int32
    public var clock: Int32
}

/// Why a /proc/PID/timers text was not read as timers.
public enum ProcTimersError: Error, Equatable, Sendable {
    /// A line that is not one of the four, or whose value does not parse (its first 80 characters).
    case malformedLine(String)
    /// The text ends after timer `id`'s first lines.
    case endsInTimer(Int32)
    /// More than the caller's bound.
    case tooMany(Int)
}

extension ProcFS {
    /// The timers of `text` (a /proc/PID/timers), in the order listed; at most `countMax` of them.
    public static func parseTimers(_ text: String, countMax: Int) throws(ProcTimersError) -> [ProcTimerEntry] {
        var timers: [ProcTimerEntry] = []
        var id: Int32?, signal: Int32?, value: UInt64?, notify: (kind: String, target: String, number: Int32)?
        func malformed(_ line: Substring) -> ProcTimersError { .malformedLine(String(line.prefix(80))) }
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { throw malformed(line) }
            let key = line[..<colon], field = line[line.index(after: colon)...].trimmingSpaces()
            switch key {
            case "ID":
                guard let number = Int32(field), number >= 0 else { throw malformed(line) }
                id = number
            case "signal":
                let parts = field.split(separator: "/")
                guard parts.count == 2, let number = Int32(parts[0]), let word = UInt64(parts[1], radix: 16) else { throw malformed(line) }
                (signal, value) = (number, word)
            case "notify":
                let parts = field.split(separator: "/")
                guard parts.count == 2 else { throw malformed(line) }
                let target = parts[1].split(separator: ".")
                guard target.count == 2, let number = Int32(target[1]) else { throw malformed(line) }
                notify = (String(parts[0]), String(target[0]), number)
            case "ClockID":
                guard let clock = Int32(field), let timerID = id, let signal, let value, let notified = notify else { throw malformed(line) }
                timers.append(ProcTimerEntry(id: timerID, signal: signal, value: value, notifyKind: notified.kind,
                                             notifyTarget: notified.target, notifyNumber: notified.number, clock: clock))
                (id, notify) = (nil, nil)
            default:
                throw malformed(line)
            }
            guard timers.count <= countMax else { throw .tooMany(countMax) }
        }
        if let id { throw .endsInTimer(id) }
        return timers
    }
}
