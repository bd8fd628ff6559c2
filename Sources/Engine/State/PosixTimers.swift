// POSIX timers (timer_create): /proc/PID/timers lists each timer's ID, clock, how it notifies and its
// signal and value; only timer_gettime, injected into the process, tells the time left and the period.
// The restore recreates each timer with its own ID (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.16: timer_create
// then takes the ID it is given), in ID order, and arms it with the time it had left at the freeze. What
// cannot be recreated the same (CPU-time and alarm clocks, SIGEV_THREAD_ID to a thread outside the
// process) is refused before the freeze. Not carried: a timer's overrun count (no call sets it; it
// restarts at 0) and the link between a timer and its signal already pending (restored as a queued
// SI_TIMER signal, which the timer's next expiry may queue once more for a real-time signal).
import Sys

public struct PosixTimer: Equatable, Sendable, CustomStringConvertible {
    /// How the timer tells of an expiry (`sigev_notify`).
    public enum Notification: Equatable, Sendable {
        /// SIGEV_SIGNAL: a signal to the process.
        case signal
        /// SIGEV_NONE: nothing; the program polls timer_gettime.
        case none
        /// SIGEV_SIGNAL | SIGEV_THREAD_ID: a signal to one thread (glibc's SIGEV_THREAD timers are these,
        /// to its helper thread), named as the process numbers it.
        case thread(ProcessID)
    }

    /// The timer's ID (timer_t), as timer_create returned it.
    public var id: Int32
    /// CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, CLOCK_BOOTTIME 7.
    public var clock: Int32
    public var notification: Notification
    /// sigev_signo (meaningless, but kept, for SIGEV_NONE).
    public var signal: Int32
    /// sigev_value, which the signal's siginfo carries.
    public var value: UInt64
    /// Time left until the next expiry (0: disarmed), and the period (0: one-shot).
    public var valueNanoseconds: UInt64 = 0
    public var intervalNanoseconds: UInt64 = 0

    public var isArmed: Bool { valueNanoseconds != 0 }
    public var description: String {
        "timer \(id) (clock \(clock), \(notification), signal \(signal), value \(hex(value))): \(valueNanoseconds) ns left, interval \(intervalNanoseconds) ns"
    }

    public init(id: Int32, clock: Int32, notification: Notification, signal: Int32, value: UInt64,
                valueNanoseconds: UInt64 = 0, intervalNanoseconds: UInt64 = 0) {
        (self.id, self.clock, self.notification, self.signal, self.value) = (id, clock, notification, signal, value)
        (self.valueNanoseconds, self.intervalNanoseconds) = (valueNanoseconds, intervalNanoseconds)
    }

    /// The clocks a timer may use here (the CPU-time clocks count another process's time, the alarm
    /// clocks need CAP_WAKE_ALARM).
    public static let clocks: Set<Int32> = [0, 1, 7]
    /// More are refused (a process seldom holds more than a few).
    public static let countMax = 256
    /// A time the kernel accepts (a timespec's tv_sec is signed).
    public static let nanosecondsMax: UInt64 = UInt64(Int64.max / 2)

    /// The 64-byte `struct sigevent` timer_create takes.
    var sigevent: [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendLittleEndian(value)
        bytes.appendLittleEndian(signal)
        let notify: Int32
        var threadID: Int32 = 0
        switch notification {
        case .signal: notify = 0
        case .none: notify = 1
        case .thread(let thread): notify = 4; threadID = thread.rawValue  // SIGEV_THREAD_ID
        }
        bytes.appendLittleEndian(notify)
        bytes.appendLittleEndian(threadID)
        bytes += [UInt8](repeating: 0, count: 64 - bytes.count)
        return bytes
    }

    /// The `struct itimerspec` timer_settime takes: interval, then value, each (tv_sec, tv_nsec).
    var itimerspec: [UInt8] {
        var bytes: [UInt8] = []
        for nanoseconds in [intervalNanoseconds, valueNanoseconds] {
            bytes.appendLittleEndian(nanoseconds / 1_000_000_000)
            bytes.appendLittleEndian(nanoseconds % 1_000_000_000)
        }
        return bytes
    }

    /// timer_gettime's `struct itimerspec` (32 bytes) into (value, interval); nil when not two timespecs.
    static func setting(itimerspec raw: [UInt8]) -> (value: UInt64, interval: UInt64)? {
        func nanoseconds(at offset: Int) -> UInt64? {
            let seconds = raw.littleEndianWord(at: offset), nanos = raw.littleEndianWord(at: offset + 8)
            guard seconds < nanosecondsMax / 1_000_000_000, nanos < 1_000_000_000 else { return nil }
            return seconds * 1_000_000_000 + nanos
        }
        guard raw.count == 32, let interval = nanoseconds(at: 0), let value = nanoseconds(at: 16) else { return nil }
        return (value, interval)
    }
}

enum PosixTimerReader {
    /// The timers /proc/PID/timers lists, sorted by ID, without their settings (which only
    /// timer_gettime tells). A timer notifying a thread names it as this node numbers it; `threadID`
    /// gives the number the process itself knows it by (nil: not one of its threads, refused).
    static func list(_ processID: ProcessID, threadID: (ProcessID) -> ProcessID? = { try? ProcFS.innermostProcessID($0) })
        throws(CheckpointError) -> [PosixTimer] {
        let text: String
        do { text = try ProcFS.readText(ProcFS.path(of: processID, .timers)) } catch {
            if !ProcFS.isAlive(processID) { throw .noSuchProcess(processID) }
            throw .system(processID, "reading /proc/\(processID)/timers: \(error)")
        }
        do { return try parse(text, threadID: threadID) } catch let reason as TimerRefusal {
            throw .unsupportedContext(processID, reason: reason.reason)
        } catch { throw .system(processID, "\(error)") }
    }

    struct TimerRefusal: Error { let reason: String }

    /// The timers of a /proc/PID/timers text (ProcFS.parseTimers reads it), or the refusal of the first
    /// that cannot be recreated the same.
    static func parse(_ text: String, threadID: (ProcessID) -> ProcessID?) throws -> [PosixTimer] {
        let entries: [ProcTimerEntry]
        do { entries = try ProcFS.parseTimers(text, countMax: PosixTimer.countMax) } catch {
            switch error {
            case .malformedLine(let line): throw TimerRefusal(reason: "its /proc timers line \"\(line)\" is not understood")
            case .endsInTimer(let id): throw TimerRefusal(reason: "its /proc timers list ends in the middle of timer \(id)")
            case .tooMany(let countMax): throw TimerRefusal(reason: "more than \(countMax) POSIX timers")
            }
        }
        var timers: [PosixTimer] = []
        for entry in entries {
            let notification: PosixTimer.Notification
            switch (entry.notifyKind, entry.notifyTarget) {
            case ("signal", "pid"): notification = .signal
            case ("none", "pid"): notification = PosixTimer.Notification.none
            case ("signal", "tid"):
                guard let own = threadID(ProcessID(entry.notifyNumber)) else {
                    throw TimerRefusal(reason: "POSIX timer \(entry.id) signals thread \(entry.notifyNumber), which is not one of its threads")
                }
                notification = .thread(own)
            default:
                throw TimerRefusal(reason: "POSIX timer \(entry.id) notifies by \(entry.notifyKind)/\(entry.notifyTarget).\(entry.notifyNumber), which is not migrated (only SIGEV_SIGNAL, SIGEV_NONE and SIGEV_THREAD_ID)")
            }
            guard PosixTimer.clocks.contains(entry.clock) else {
                throw TimerRefusal(reason: "POSIX timer \(entry.id) runs on clock \(entry.clock); only CLOCK_REALTIME, CLOCK_MONOTONIC and CLOCK_BOOTTIME timers migrate")
            }
            if notification != .none {
                guard KernelLimits.signalNumbers.contains(entry.signal) else { throw TimerRefusal(reason: "POSIX timer \(entry.id) signals \(entry.signal)") }
            }
            timers.append(PosixTimer(id: entry.id, clock: entry.clock, notification: notification, signal: entry.signal, value: entry.value))
        }
        return timers.sorted { $0.id < $1.id }
    }
}
