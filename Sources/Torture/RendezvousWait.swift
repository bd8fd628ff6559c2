// Why this file exists: a freeze must catch a program inside each kind of interrupted system call, not
// only in the rendezvous' sigwaitinfo (which the kernel ends with EINTR and never restarts). The test
// programs' `--rendezvous-wait K` (TestPrograms/common.h) waits in another call; this is torture's side:
// which call a seed draws, how to tell that the program is blocked in it, and how to let it go.
import Foundation
import Sys

/// The call a test program waits in at its rendezvous, and what the kernel leaves in rax when a freeze
/// interrupts it.
public enum RendezvousWait: String, Codable, CaseIterable, Sendable {
    /// sigwaitinfo for SIGUSR2: -EINTR, not restarted.
    case sigwait
    /// The raw nanosleep call, for a day: -ERESTART_RESTARTBLOCK.
    case nanosleep
    /// FUTEX_WAIT without a timeout: -ERESTARTSYS.
    case futex
    /// FUTEX_WAIT with a relative timeout: -ERESTART_RESTARTBLOCK.
    case futexTimeout = "futex-timeout"
    /// ppoll with a temporary signal mask and no timeout: -ERESTARTNOHAND, with the thread's own mask in
    /// the kernel's saved_sigmask.
    case ppoll

    /// The test programs' `--rendezvous-wait` value.
    var argument: Int {
        switch self {
        case .sigwait: 0
        case .nanosleep: 1
        case .futex: 2
        case .futexTimeout: 3
        case .ppoll: 4
        }
    }

    /// The signal that ends the wait: SIGUSR2, which sigwaitinfo takes blocked, or the signal whose
    /// handler interrupts the other calls (common.h's TP_RENDEZVOUS_RELEASE_SIGNAL).
    var releaseSignal: Int32 { self == .sigwait ? SIGUSR2 : 62 }

    /// A release sent before the call is entered is only seen after the call: sigwaitinfo takes a pending
    /// SIGUSR2 at once, but the handler-ended calls would sleep their day. Those are released once the
    /// program is seen blocked in the call.
    var releasedWhenBlocked: Bool { self != .sigwait }

    /// The futex value the rendezvous waits on (TP_RENDEZVOUS_FUTEX_VALUE), which no program's own futex
    /// wait uses.
    private static let futexValue: UInt64 = 0x5245_4E44

    /// Thread `thread` of `processID` is blocked in this rendezvous call, told from the program's own
    /// calls of the same kind by its arguments: the raw nanosleep (glibc sleeps with clock_nanosleep), the
    /// futex value, ppoll's missing timeout. Not while it waits for a page the call reads.
    func isBlocked(_ processID: ProcessID, thread: ProcessID) -> Bool {
        guard let call = ProcFS.currentSyscallCall(processID, thread: thread) else { return false }
        let calledIt: Bool = switch self {
        case .sigwait: call.number == SyscallNumber.rtSigtimedwait
        case .nanosleep: call.number == SyscallNumber.nanosleep
        case .futex: call.number == SyscallNumber.futex && call.arguments[2] == Self.futexValue && call.arguments[3] == 0
        case .futexTimeout: call.number == SyscallNumber.futex && call.arguments[2] == Self.futexValue && call.arguments[3] != 0
        case .ppoll: call.number == SyscallNumber.ppoll && call.arguments[1] == 0 && call.arguments[2] == 0
        }
        guard calledIt else { return false }
        switch ProcFS.threadWait(processID, thread: thread) {
        case .futex, .other: return true
        case .running, .ended, .userfault: return false
        }
    }

    /// A seed's draw, from a generator of its own so that no other draw changes: sigwaitinfo in two
    /// iterations of three, else one of the others.
    static func draw(seed: UInt64, allowed: [RendezvousWait]?) -> RendezvousWait {
        var generator = SeededGenerator(seed: seed ^ 0x5245_4E44_5741_4954)
        if let allowed, !allowed.isEmpty { return allowed[generator.below(allowed.count)] }
        guard generator.chance(1, in: 3) else { return .sigwait }
        let others = allCases.filter { $0 != .sigwait }
        return others[generator.below(others.count)]
    }

    /// A comma-separated list of names, as `--rendezvous-wait` takes it.
    static func list(_ text: String) throws(Regressions.FilterError) -> [RendezvousWait] {
        let names = text.split(separator: ",").map(String.init)
        let waits = names.compactMap(RendezvousWait.init(rawValue:))
        guard !names.isEmpty, waits.count == names.count else {
            throw Regressions.FilterError(reason: "--rendezvous-wait takes a list of \(allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return waits
    }
}
