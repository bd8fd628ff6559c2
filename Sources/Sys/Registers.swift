// The x86-64 general registers in the order of the kernel's `user_regs_struct`.
internal import CSys
#if canImport(Glibc)
import Glibc
#endif

/// The general registers of a stopped thread (`PTRACE_GETREGS`), fs/gs base included.
public struct GeneralRegisters: Equatable, Sendable {
    public var r15: UInt64 = 0, r14: UInt64 = 0, r13: UInt64 = 0, r12: UInt64 = 0
    public var rbp: UInt64 = 0, rbx: UInt64 = 0, r11: UInt64 = 0, r10: UInt64 = 0
    public var r9: UInt64 = 0, r8: UInt64 = 0, rax: UInt64 = 0, rcx: UInt64 = 0
    public var rdx: UInt64 = 0, rsi: UInt64 = 0, rdi: UInt64 = 0, origRax: UInt64 = 0
    public var rip: UInt64 = 0, cs: UInt64 = 0, eflags: UInt64 = 0, rsp: UInt64 = 0
    public var ss: UInt64 = 0, fsBase: UInt64 = 0, gsBase: UInt64 = 0
    public var ds: UInt64 = 0, es: UInt64 = 0, fs: UInt64 = 0, gs: UInt64 = 0

    public init() {}

    /// Field names in kernel order, for encoding and for oracles that name the register that differs.
    public static let fieldNames = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi",
        "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
    ]

    /// The registers as 27 words in kernel order.
    public var words: [UInt64] {
        get {
            [r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, origRax, rip, cs,
             eflags, rsp, ss, fsBase, gsBase, ds, es, fs, gs]
        }
        set {
            precondition(newValue.count == 27, "user_regs_struct has 27 words, got \(newValue.count)")
            (r15, r14, r13, r12, rbp, rbx, r11, r10) = (newValue[0], newValue[1], newValue[2], newValue[3],
                                                         newValue[4], newValue[5], newValue[6], newValue[7])
            (r9, r8, rax, rcx, rdx, rsi, rdi, origRax) = (newValue[8], newValue[9], newValue[10], newValue[11],
                                                          newValue[12], newValue[13], newValue[14], newValue[15])
            (rip, cs, eflags, rsp, ss, fsBase, gsBase) = (newValue[16], newValue[17], newValue[18], newValue[19],
                                                          newValue[20], newValue[21], newValue[22])
            (ds, es, fs, gs) = (newValue[23], newValue[24], newValue[25], newValue[26])
        }
    }

    public init(words: [UInt64]) { self.words = words }

    /// The syscall return value as a signed number (negative errno on failure).
    public var syscallResult: Int64 { Int64(bitPattern: rax) }

    /// The kernel's "restart me" codes a thread shows when frozen inside an interrupted syscall.
    public var interruptedSyscallRestartCode: Int64? {
        let value = Int64(bitPattern: rax)
        guard Int64(bitPattern: origRax) >= 0 else { return nil }
        return [-512, -513, -514, -516].contains(value) ? value : nil
    }

    /// The registers a restored thread must resume with: an interrupted syscall is re-entered in full
    /// (`rip -= 2`, `rax = orig_rax`), because the kernel's restart block did not travel with the image.
    public var resumableAfterRestore: GeneralRegisters {
        var result = self
        if interruptedSyscallRestartCode != nil {
            result.rip &-= 2
            result.rax = origRax
        }
        result.origRax = UInt64(bitPattern: -1)
        return result
    }
}

extension GeneralRegisters {
    init(_ raw: user_regs_struct) {
        self.init()
        var copy = raw
        words = withUnsafeBytes(of: &copy) { Array($0.bindMemory(to: UInt64.self)) }
    }

    var raw: user_regs_struct {
        var result = user_regs_struct()
        let values = words
        withUnsafeMutableBytes(of: &result) { buffer in
            let slots = buffer.bindMemory(to: UInt64.self)
            precondition(slots.count == values.count, "user_regs_struct size changed")
            for index in values.indices { slots[index] = values[index] }
        }
        return result
    }
}
