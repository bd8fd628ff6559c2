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
    /// Whether each injection ends at its (last) syscall's exit stop instead of the int3 after it. A
    /// tracer that dies with its tracee in the int3's SIGTRAP stop leaves that SIGTRAP to be delivered
    /// (fatal, and an int3 with SIGTRAP blocked resets the victim's SIGTRAP action to SIG_DFL); one that
    /// dies at a syscall-exit stop leaves no signal. The source's injections use it (two stops a call):
    /// its victim must outlive a dead tracer. Call `park` before the victim's own registers are final.
    public var endsAtSyscallExit = false
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
        let after = endsAtSyscallExit ? try runToSyscallExit(name, registers: registersFor(number, arguments), syscallCount: 1)
            : try runToTrap(name, registers: registersFor(number, arguments), trapAddress: instructionAddress + trapOffset)
        injectedCount += 1
        return after.syscallResult
    }

    /// Runs `body`, a sequence of ptrace calls and stops: a failed ptrace call becomes `.ptrace`, an
    /// injection error passes as it is; nothing else can be thrown in there.
    private func withInjectionErrors<Result>(_ body: () throws -> Result) throws(InjectionError) -> Result {
        do {
            return try body()
        } catch let error as InjectionError {
            throw error
        } catch let error as SyscallError {
            throw .ptrace(error)
        } catch {
            preconditionFailure("unexpected error \(error)")
        }
    }

    /// Sets `registers`, lets the tracee run, and returns its registers at the int3 whose next
    /// instruction is `trapAddress`; throws at any other stop but a group-stop.
    private func runToTrap(_ name: String, registers: GeneralRegisters, trapAddress: UInt64) throws(InjectionError) -> GeneralRegisters {
        try withInjectionErrors {
            try tracee.setRegisters(registers)
            try tracee.resume()
            // The tracee's code leaves the table's loop only through its trap or a fault, so this
            // ends at the trap, or throws at any other stop but a group-stop.
            while true {
                let reason = try tracee.waitForStop()
                switch reason {
                case .signal(SIGTRAP):
                    let after = try tracee.registers()
                    guard after.rip == trapAddress else {
                        throw InjectionError.unexpectedStop(name: name, reason: reason, rip: after.rip)
                    }
                    return after
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
        }
    }

    /// Sets `registers`, lets the tracee run to the exit stop of its `syscallCount`-th syscall, and
    /// returns its registers there; throws at any other stop but a group-stop.
    private func runToSyscallExit(_ name: String, registers: GeneralRegisters, syscallCount: Int) throws(InjectionError) -> GeneralRegisters {
        try withInjectionErrors {
            try tracee.setRegisters(registers)
            // Ends after 2 * syscallCount syscall stops (entry and exit alternate) or at a stop that throws.
            var syscallStops = 0
            while syscallStops < 2 * syscallCount {
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
            return try tracee.registers()
        }
    }

    /// After injections that ended at a syscall-exit stop, with the thread's own registers set again:
    /// moves it to an interrupt stop (no user instruction runs in between), where the kernel's restart
    /// logic will see its registers when it resumes, as at the freeze. Every signal but SIGKILL and
    /// SIGSTOP must be blocked meanwhile, so no handler of the victim runs here.
    public func park() throws(InjectionError) {
        try withInjectionErrors {
            try tracee.interrupt()
            try tracee.resume()
            // Ends at the interrupt stop: only a stop or the end can come with every signal blocked.
            for _ in 0..<1000 {
                let reason = try tracee.waitForStop()
                switch reason {
                case .event(Tracee.eventStop, _): return
                case .event, .syscall: try tracee.resume()
                case .exited, .killed: throw InjectionError.traceeDied(name: "park", reason: reason)
                case .signal(let signal) where signal == SIGSTOP: try tracee.resume(signal: signal)
                case .signal:
                    let after = try tracee.registers()
                    throw InjectionError.unexpectedStop(name: "park", reason: reason, rip: after.rip)
                }
            }
            throw InjectionError.unexpectedStop(name: "park", reason: .syscall, rip: 0)
        }
    }

    // MARK: Batches: many syscalls, one stop

    /// One syscall of a batch.
    public struct BatchedCall: Sendable {
        public var name: String
        public var number: Int
        public var arguments: [UInt64]
        public init(_ name: String, _ number: Int, _ arguments: UInt64...) {
            precondition(arguments.count <= 6, "a syscall takes at most six arguments")
            self.name = name
            self.number = number
            self.arguments = arguments
        }
    }

    /// The loop a batch runs (x86-64): while r13 > 0, load number and six arguments from the 64-byte
    /// entry at r12, `syscall`, store rax in the entry's last word, r12 += 64, r13 -= 1; then int3.
    /// Each injected syscall costs two context switches of the tracee and tracer (tens of µs, far more
    /// across CPUs or on a loaded machine); a batch pays them once.
    public static let batchLoopCode: [UInt8] = [
        0x4d, 0x85, 0xed,              // test r13, r13
        0x74, 0x32,                    // jz done
        0x49, 0x8b, 0x04, 0x24,        // mov rax, [r12]
        0x49, 0x8b, 0x7c, 0x24, 0x08,  // mov rdi, [r12+8]
        0x49, 0x8b, 0x74, 0x24, 0x10,  // mov rsi, [r12+16]
        0x49, 0x8b, 0x54, 0x24, 0x18,  // mov rdx, [r12+24]
        0x4d, 0x8b, 0x54, 0x24, 0x20,  // mov r10, [r12+32]
        0x4d, 0x8b, 0x44, 0x24, 0x28,  // mov r8, [r12+40]
        0x4d, 0x8b, 0x4c, 0x24, 0x30,  // mov r9, [r12+48]
        0x0f, 0x05,                    // syscall
        0x49, 0x89, 0x44, 0x24, 0x38,  // mov [r12+56], rax
        0x49, 0x83, 0xc4, 0x40,        // add r12, 64
        0x49, 0xff, 0xcd,              // dec r13
        0xeb, 0xc9,                    // jmp loop
        0xcc,                          // done: int3
    ]
    /// Bytes of one entry of a batch's table.
    public static let batchEntryByteCount = 64

    /// Runs `calls` in order with one stop: `batchLoopCode` must be at `codeAddress`, and
    /// `calls.count * 64` writable bytes at `tableAddress` (both in the tracee, neither used by the
    /// calls themselves). Returns each call's raw result (negative errno on failure), in order.
    public func batch(_ calls: [BatchedCall], codeAddress: UInt64, tableAddress: UInt64, memory: ProcessMemory) throws -> [Int64] {
        if calls.isEmpty { return [] }
        var table: [UInt8] = []
        table.reserveCapacity(calls.count * Self.batchEntryByteCount)
        for call in calls {
            for word in [UInt64(call.number)] + call.arguments + [UInt64](repeating: 0, count: 7 - call.arguments.count) {
                LittleEndian.append(word, to: &table)
            }
        }
        precondition(table.count == calls.count * Self.batchEntryByteCount, "a batch entry is not 64 bytes")
        try memory.write(table, at: tableAddress)
        var registers = template
        registers.origRax = UInt64(bitPattern: -1)
        registers.r12 = tableAddress
        registers.r13 = UInt64(calls.count)
        registers.rip = codeAddress
        let name = "a batch of \(calls.count) (\(calls[0].name) ... \(calls[calls.count - 1].name))"
        if endsAtSyscallExit {
            // Stopped at the last call's exit, before the loop stores its result: that one is in rax.
            let after = try runToSyscallExit(name, registers: registers, syscallCount: calls.count)
            guard after.r13 == 1 else { throw InjectionError.unexpectedStop(name: name, reason: .syscall, rip: after.rip) }
            injectedCount += calls.count
            let words = LittleEndian.words(try memory.read(at: tableAddress, byteCount: table.count), count: calls.count * 8)
            return (0..<(calls.count - 1)).map { Int64(bitPattern: words[$0 * 8 + 7]) } + [after.syscallResult]
        }
        let after = try runToTrap(name, registers: registers, trapAddress: codeAddress + UInt64(Self.batchLoopCode.count))
        guard after.r13 == 0 else { throw InjectionError.unexpectedStop(name: name, reason: .signal(SIGTRAP), rip: after.rip) }
        injectedCount += calls.count
        let words = LittleEndian.words(try memory.read(at: tableAddress, byteCount: table.count), count: calls.count * 8)
        return (0..<calls.count).map { Int64(bitPattern: words[$0 * 8 + 7]) }
    }

    /// A batch whose every call must succeed: the first failure throws, named.
    @discardableResult
    public func callBatch(_ calls: [BatchedCall], codeAddress: UInt64, tableAddress: UInt64, memory: ProcessMemory) throws -> [UInt64] {
        let results = try batch(calls, codeAddress: codeAddress, tableAddress: tableAddress, memory: memory)
        for (call, result) in zip(calls, results) where result < 0 && result > -4096 {
            throw InjectionError.failed(name: call.name, errno: Int32(-result))
        }
        return results.map { UInt64(bitPattern: $0) }
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
        try runToSyscallExit(name, registers: registersFor(number, arguments), syscallCount: 1).syscallResult
    }
}
