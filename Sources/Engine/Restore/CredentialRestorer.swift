// Gives the target exactly the victim's credentials, never more. The target starts as this restorer
// (root, every capability), so every step only takes something away; the order matters because each
// step needs a capability a later step drops.
import Sys

struct CredentialRestorer {
    let injector: SyscallInjector
    let memory: ProcessMemory
    let dataAddress: UInt64
    let processID: ProcessID

    static let keepCapabilitiesBit: UInt32 = 1 << 4

    func restore(_ wanted: Credentials) throws {
        let status = try ProcFS.status(processID)
        let currentBounding = UInt64(status["CapBnd"] ?? "0", radix: 16) ?? 0
        let currentUsers = (status["Uid"] ?? "").split(whereSeparator: { $0 == "\t" || $0 == " " }).compactMap { UInt32($0) }
        let currentGroups = (status["Gid"] ?? "").split(whereSeparator: { $0 == "\t" || $0 == " " }).compactMap { UInt32($0) }
        let currentSupplementary = (status["Groups"] ?? "").split(separator: " ").compactMap { UInt32($0) }

        if currentSupplementary != wanted.supplementaryGroups {
            var list: [UInt8] = []
            for group in wanted.supplementaryGroups { list.appendLittleEndian(group) }
            try memory.write(list + [0], at: dataAddress)
            try injector.call("setgroups", Syscall.setgroups, UInt64(wanted.supplementaryGroups.count), dataAddress)
        }
        if currentGroups != wanted.groupIDs {
            try injector.call("setresgid", Syscall.setresgid, UInt64(wanted.groupIDs[0]), UInt64(wanted.groupIDs[1]),
                              UInt64(wanted.groupIDs[2]))
            try injector.call("setfsgid", Syscall.setfsgid, UInt64(wanted.groupIDs[3]))
        }
        for capability in 0..<64 where currentBounding & (1 << capability) != 0 && wanted.bounding & (1 << capability) == 0 {
            try injector.call("prctl(PR_CAPBSET_DROP, \(capability))", Syscall.prctl, 24, UInt64(capability))
        }
        let changesUsers = currentUsers != wanted.userIDs
        // Keep the permitted set across setresuid; capset then trims it to exactly the victim's.
        try injector.call("prctl(PR_SET_SECUREBITS)", Syscall.prctl, 28,
                          UInt64(wanted.securebits | (changesUsers ? Self.keepCapabilitiesBit : 0)))
        if changesUsers {
            try injector.call("setresuid", Syscall.setresuid, UInt64(wanted.userIDs[0]), UInt64(wanted.userIDs[1]),
                              UInt64(wanted.userIDs[2]))
            try injector.call("setfsuid", Syscall.setfsuid, UInt64(wanted.userIDs[3]))
        }
        var capabilityData: [UInt8] = []
        capabilityData.appendLittleEndian(UInt32(0x2008_0522))  // _LINUX_CAPABILITY_VERSION_3
        capabilityData.appendLittleEndian(UInt32(0))
        for half in 0..<2 {
            let shift = UInt64(32 * half)
            capabilityData.appendLittleEndian(UInt32(truncatingIfNeeded: wanted.effective >> shift))
            capabilityData.appendLittleEndian(UInt32(truncatingIfNeeded: wanted.permitted >> shift))
            capabilityData.appendLittleEndian(UInt32(truncatingIfNeeded: wanted.inheritable >> shift))
        }
        try memory.write(capabilityData, at: dataAddress)
        try injector.call("capset", Syscall.capset, dataAddress, dataAddress + 8)
        for capability in 0..<64 where wanted.ambient & (1 << capability) != 0 {
            try injector.call("prctl(PR_CAP_AMBIENT_RAISE, \(capability))", Syscall.prctl, 47, 2, UInt64(capability))
        }
        if changesUsers && wanted.securebits & Self.keepCapabilitiesBit == 0 {
            try injector.call("prctl(PR_SET_KEEPCAPS, 0)", Syscall.prctl, 8, 0)
        }
        if wanted.noNewPrivileges {
            try injector.call("prctl(PR_SET_NO_NEW_PRIVS)", Syscall.prctl, 38, 1, 0, 0, 0)
        }
    }
}
