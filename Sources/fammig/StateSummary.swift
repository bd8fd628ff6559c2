// Human-readable lines about a checkpointed process, for `fammig inspect`.
import Engine
import Sys

enum StateSummary {
    static func lines(_ state: ProcessState) -> [String] {
        let thread = state.mainThread
        var lines = [
            "process         pid \(state.processID), \(state.executablePath)"
                + (state.lineage.isRecorded ? ", group \(state.lineage.processGroupID), session \(state.lineage.sessionID)" : ""),
            "registers       rip \(hex(thread.registers.rip)) rsp \(hex(thread.registers.rsp)) fs_base \(hex(thread.registers.fsBase))"
                + (thread.registers.interruptedSyscallRestartCode != nil ? " (inside syscall \(thread.registers.origRax))" : ""),
            "xstate          \(thread.extendedState.count) bytes",
            "signals         mask \(hex(thread.signalMask)), \(state.signalActions.filter { !$0.isDefault }.count) non-default actions, "
                + "\(thread.pendingSignals.count + state.sharedPendingSignals.count) pending",
            "rseq            " + (thread.rseq.map { "\(hex($0.address)) (\($0.byteCount) bytes)" } ?? "none"),
            "brk             \(hex(state.memoryDescriptor.startBrk))...\(hex(state.memoryDescriptor.brk))",
            "credentials     uid \(state.credentials.userIDs) gid \(state.credentials.groupIDs)"
                + (state.credentials.noNewPrivileges ? " no_new_privs" : ""),
            "capabilities    " + CapabilityText.describe(effective: state.credentials.effective, permitted: state.credentials.permitted,
                                                        inheritable: state.credentials.inheritable)
                + ", bounding \(hex(state.credentials.bounding))",
            "seccomp         mode \(state.seccompMode), \(state.seccompFilters.count) filters",
            "mappings        \(state.mappings.count)",
        ]
        for mapping in state.mappings {
            let protection = (mapping.readable ? "r" : "-") + (mapping.writable ? "w" : "-") + (mapping.executable ? "x" : "-")
                + (mapping.shared ? "s" : "p")
            lines.append("  \(hex(mapping.start))-\(hex(mapping.end)) \(protection) \(mapping.kind)")
        }
        lines.append("files           \(state.files.count)")
        for file in state.files { lines.append("  fd \(file.descriptor) \(file.kind.name) \(file.path) at \(file.position)") }
        if !state.members.isEmpty {
            lines.append("tree            \(state.members.count + 1) processes, \(state.members.count - state.liveMembers.count) zombies")
            for member in state.members {
                let lineage = member.lineage
                let what: String
                switch member {
                case .live(let live): what = "\(live.threads.count) thread\(live.threads.count == 1 ? "" : "s"), \(live.mappings.count) mappings, "
                    + "\(live.files.count) files (\(lineage.inheritedDescriptors.count) inherited), \(lineage.inheritedMappingStarts.count) shared mappings inherited"
                case .zombie(let zombie): what = "zombie, wait status \(hex(UInt64(UInt32(bitPattern: zombie.waitStatus))))"
                }
                lines.append("  pid \(member.processID) parent \(lineage.parentProcessID) group \(lineage.processGroupID) session \(lineage.sessionID): \(what)")
            }
        }
        return lines
    }
}
