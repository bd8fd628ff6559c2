// Why this file exists: /proc/PID/fdinfo/N is where the kernel shows what a descriptor holds beyond
// its link: the open file description's status flags and offset, an eventfd's count, a signalfd's
// mask, a timerfd's clock and times, an epoll set's registrations, an inotify instance's watches. Its
// text is parsed here, once, into typed values; what they mean for a migration is the engine's.

/// One descriptor's fdinfo, as read at one moment.
public struct FDInfo: Equatable, Sendable {
    /// The text as the kernel wrote it.
    public let text: String
    /// Its `key:\tvalue` lines (a key's last line wins).
    public let fields: [String: String]

    public init(text: String) {
        self.text = text
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingSpaces()
        }
        self.fields = fields
    }

    /// Descriptor `descriptor` of `processID`'s fdinfo.
    public static func read(_ processID: ProcessID, descriptor: Int32) throws -> FDInfo {
        FDInfo(text: try ProcFS.readText(ProcFS.path(of: processID, .descriptorInfo(descriptor))))
    }

    /// The open file description's status flags (`flags`, octal; 0 when absent or malformed).
    public var statusFlags: Int32 { fields["flags"].flatMap { Int32($0, radix: 8) } ?? 0 }

    /// The open file description's offset (`pos`; 0 when absent or malformed).
    public var position: Int64 { fields["pos"].flatMap { Int64($0) } ?? 0 }

    /// An eventfd's count and whether it is a semaphore (`eventfd-count`, hex), or nil.
    public var eventCounter: (count: UInt64, semaphore: Bool)? {
        guard let count = fields["eventfd-count"].flatMap({ UInt64($0, radix: 16) }) else { return nil }
        return (count, fields["eventfd-semaphore"] == "1")
    }

    /// A signalfd's mask (`sigmask`, hex), or nil.
    public var signalMask: UInt64? { fields["sigmask"].flatMap { UInt64($0, radix: 16) } }

    /// A timerfd as its fdinfo shows it.
    public struct Timer: Equatable, Sendable {
        public var clock: Int32
        public var ticks: UInt64
        /// timerfd_settime's flags (octal in the text).
        public var settimeFlags: Int32
        public var valueNanoseconds: UInt64
        public var intervalNanoseconds: UInt64

        public init(clock: Int32, ticks: UInt64, settimeFlags: Int32, valueNanoseconds: UInt64, intervalNanoseconds: UInt64) {
            (self.clock, self.ticks, self.settimeFlags) = (clock, ticks, settimeFlags)
            (self.valueNanoseconds, self.intervalNanoseconds) = (valueNanoseconds, intervalNanoseconds)
        }
    }

    /// `clockid`, `ticks`, `settime flags`, `it_value: (s, ns)`, `it_interval: (s, ns)`; nil when one is
    /// missing or out of range.
    public var timer: Timer? {
        func nanoseconds(_ text: String?) -> UInt64? {
            guard let text else { return nil }
            let numbers = text.filter { $0.isNumber || $0 == "," }.split(separator: ",").compactMap { UInt64($0) }
            guard numbers.count == 2, numbers[1] < 1_000_000_000, numbers[0] < UInt64.max / 2_000_000_000 else { return nil }
            return numbers[0] * 1_000_000_000 + numbers[1]
        }
        guard let clock = fields["clockid"].flatMap({ Int32($0) }), let ticks = fields["ticks"].flatMap({ UInt64($0) }),
              let flags = fields["settime flags"].flatMap({ Int32($0, radix: 8) }),
              let value = nanoseconds(fields["it_value"]), let interval = nanoseconds(fields["it_interval"]) else { return nil }
        return Timer(clock: clock, ticks: ticks, settimeFlags: flags, valueNanoseconds: value, intervalNanoseconds: interval)
    }

    /// One registration of an epoll set: the descriptor it was made through, its events and data, and
    /// the inode of the file registered.
    public struct EpollRegistration: Equatable, Sendable {
        public var descriptor: Int32
        public var events: UInt32
        public var data: UInt64
        public var inode: UInt64

        public init(descriptor: Int32, events: UInt32, data: UInt64, inode: UInt64) {
            (self.descriptor, self.events, self.data, self.inode) = (descriptor, events, data, inode)
        }
    }

    /// `tfd: N events: HEX data: HEX pos:N ino:HEX sdev:HEX` lines, in the kernel's order; nil when one
    /// does not parse.
    public var epollRegistrations: [EpollRegistration]? {
        var result: [EpollRegistration] = []
        for line in text.split(separator: "\n") where line.hasPrefix("tfd:") {
            var values: [String: String] = [:]
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            var index = 0
            while index < words.count {
                let word = words[index]
                if word.hasSuffix(":"), index + 1 < words.count {
                    values[String(word.dropLast())] = String(words[index + 1]); index += 2
                } else if let colon = word.firstIndex(of: ":") {
                    values[String(word[..<colon])] = String(word[word.index(after: colon)...]); index += 1
                } else { index += 1 }
            }
            guard let descriptor = values["tfd"].flatMap({ Int32($0) }), let events = values["events"].flatMap({ UInt32($0, radix: 16) }),
                  let data = values["data"].flatMap({ UInt64($0, radix: 16) }), let inode = values["ino"].flatMap({ UInt64($0, radix: 16) }) else {
                return nil
            }
            result.append(EpollRegistration(descriptor: descriptor, events: events, data: data, inode: inode))
        }
        return result
    }

    /// The words of each `inotify wd:N ino:HEX sdev:HEX mask:HEX ...` line, by key (a word without a
    /// colon is left out), in the kernel's order.
    public var inotifyLines: [(line: Substring, values: [Substring: Substring])] {
        text.split(separator: "\n").filter { $0.hasPrefix("inotify ") }.map { line in
            var values: [Substring: Substring] = [:]
            for word in line.split(separator: " ").dropFirst() {
                guard let colon = word.firstIndex(of: ":") else { continue }
                values[word[..<colon]] = word[word.index(after: colon)...]
            }
            return (line, values)
        }
    }
}
