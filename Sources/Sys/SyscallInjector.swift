// Why this file exists: the engine changes another process's state by making it run syscalls: registers
// are set to a `syscall; int3` sequence, the tracee runs to the int3, and rax holds the result. This is
// the only place that knows that dance.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// An injected syscall that could not be run, or that the tracee answered with an error.
public enum InjectionError: Error, CustomStringConvertible, Sendable {
    case failed(name: String, errno: Int32)
    case traceeDied(name: String, reason: StopReason)
    case unexpectedStop(name: String, reason: StopReason, rip: UInt64)
    case ptrace(SyscallError)

    public var description: String {
        switch self {
        case .failed(let name, let errno):
            "injected \(name) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .traceeDied(let name, let reason):
            "the process died while running injected \(name): \(reason)"
        case .unexpectedStop(let name, let reason, let rip):
            "injected \(name) stopped unexpectedly (\(reason)) at rip 0x\(String(rip, radix: 16))"
        case .ptrace(let error): "\(error)"
        }
    }
}

/// The machine code every injection runs: `syscall; int3`.
public let syscallTrapInstruction: [UInt8] = [0x0f, 0x05, 0xcc]

/// Runs syscalls inside a stopped tracee. The code `syscall; int3` must be at `instructionAddress`.
public final class SyscallInjector: @unchecked Sendable {
    public let tracee: Tracee
    public var instructionAddress: UInt64
    /// Segment registers and flags come from here; every injection sets orig_rax = -1 so the kernel's
    /// syscall-restart logic never rewrites the registers we set.
    public var template: GeneralRegisters
    public private(set) var injectedCount = 0
    /// Where the injected code traps, from `instructionAddress` (3 for `syscall; int3`).
    public var trapOffset: UInt64 = 3

    public init(tracee: Tracee, instructionAddress: UInt64, template: GeneralRegisters) {
        self.tracee = tracee
        self.instructionAddress = instructionAddress
        self.template = template
    }

    /// The template with `syscall(number, arguments...)` loaded, at the injected instruction.
    private func registersFor(_ number: Int, _ arguments: [UInt64]) -> GeneralRegisters {
        precondition(arguments.count <= 6, "a syscall takes at most six arguments")
        var registers = template
        let values = arguments + [UInt64](repeating: 0, count: 6 - arguments.count)
        registers.rax = UInt64(number)
        registers.origRax = UInt64(bitPattern: -1)
        (registers.rdi, registers.rsi, registers.rdx) = (values[0], values[1], values[2])
        (registers.r10, registers.r8, registers.r9) = (values[3], values[4], values[5])
        registers.rip = instructionAddress
        return registers
    }

    /// Runs one syscall; returns the raw result (negative errno on failure).
    public func raw(_ name: String, _ number: Int, _ arguments: [UInt64]) throws(InjectionError) -> Int64 {
        let registers = registersFor(number, arguments)
        do {
            try tracee.setRegisters(registers)
            try tracee.resume()
            // Ends at the trap after the injected syscall, or throws at any stop but a group-stop.
            while true {
                let reason = try tracee.waitForStop()
                switch reason {
                case .signal(SIGTRAP):
                    let after = try tracee.registers()
                    guard after.rip == instructionAddress + trapOffset else {
                        throw InjectionError.unexpectedStop(name: name, reason: reason, rip: after.rip)
                    }
                    injectedCount += 1
                    return after.syscallResult
                case .event(_, _):
                    // A group-stop or PTRACE_INTERRUPT from elsewhere: go on.
                    try tracee.resume()
                case .exited, .killed:
                    throw InjectionError.traceeDied(name: name, reason: reason)
                case .signal, .syscall:
                    let after = try tracee.registers()
                    throw InjectionError.unexpectedStop(name: name, reason: reason, rip: after.rip)
                }
            }
        } catch let error as InjectionError {
            throw error
        } catch let error as SyscallError {
            throw .ptrace(error)
        } catch {
            preconditionFailure("unexpected error \(error)")
        }
    }

    /// Runs one syscall and throws if it failed.
    @discardableResult
    public func call(_ name: String, _ number: Int, _ arguments: UInt64...) throws(InjectionError) -> UInt64 {
        let result = try raw(name, number, arguments)
        if result < 0 && result > -4096 { throw .failed(name: name, errno: Int32(-result)) }
        return UInt64(bitPattern: result)
    }

    /// Runs the final syscall (munmap of the code it runs from) to its exit stop, never reaching the int3.
    public func callToExitStop(_ name: String, _ number: Int, _ arguments: UInt64...) throws(InjectionError) -> Int64 {
        let registers = registersFor(number, arguments)
        do {
            try tracee.setRegisters(registers)
            var syscallStops = 0
            while syscallStops < 2 {
                try tracee.resumeToSyscall()
                let reason = try tracee.waitForStop()
                switch reason {
                case .syscall: syscallStops += 1
                case .event: continue
                case .exited, .killed: throw InjectionError.traceeDied(name: name, reason: reason)
                case .signal:
                    let after = try tracee.registers()
                    throw InjectionError.unexpectedStop(name: name, reason: reason, rip: after.rip)
                }
            }
            return try tracee.registers().syscallResult
        } catch let error as InjectionError {
            throw error
        } catch let error as SyscallError {
            throw .ptrace(error)
        } catch {
            preconditionFailure("unexpected error \(error)")
        }
    }
}
