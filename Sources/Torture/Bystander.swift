// Why this file exists: another process on the target node that reads the restored process's command
// line, as ps, pgrep -f and top do for every process whenever they like. Between the restorer's mmap of
// the victim's stack and the registration of that mapping with the userfaultfd, reading
// /proc/PID/cmdline faults the argument page (the top stack page) in as the kernel's zero page; the
// engine's UFFDIO_COPY then finds it present (EEXIST) and leaves it so. The campaign saw that target
// die with `segfault at 0 ip 0 sp 7fffffffe7a0` (a `ret` into the zeroed top stack page) when another
// engineer's tools happened to look at the right moment. That window lies inside one restorer step
// (layout), so the bystander reopens it between that step and the next: it unregisters the mapping that
// holds the arguments, reads the command line as any bystander would (the real kernel path), and
// registers the mapping again on the engine's own userfaultfd. After the engine's first look at its
// registered memory no bystander could fault a page in any more, so it only acts before that.
import Engine
import Sys

final class Bystander: Participant {
    let actor = ActorName.bystander
    let isEssential = false
    private let restorer: Restorer
    private var done = false

    init(restorer: Restorer) {
        self.restorer = restorer
    }

    func availability() -> Availability {
        if done { return .finished }
        guard let memory = restorer.lazyMemory else { return .waiting(nil, "the target is not laid out yet") }
        // The real window has closed once the registration is checked (or the process runs).
        if restorer.strayPagesChecked || memory.isRunning { return .finished }
        return .choices(["read the target's command line while its stack is unregistered"])
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        guard let memory = restorer.lazyMemory else { preconditionFailure("bystander stepped without a target") }
        done = true
        let processID = memory.targetProcessID
        guard let argumentStart = (try? ProcFS.statFields(processID))?[48].flatMap({ UInt64($0) }), argumentStart > 0 else {
            return "no argument address in /proc/\(processID)/stat"
        }
        guard memory.isRegistered(argumentStart),
              let mapping = try ProcFS.maps(processID).first(where: { $0.start <= argumentStart && argumentStart < $0.end }) else {
            return "arguments at \(hex(argumentStart)) are not in registered memory"
        }
        let byteCount = mapping.end - mapping.start
        try memory.userfaultfd.unregister(start: mapping.start, byteCount: byteCount)
        let commandLine = (try? ProcFS.readFile(ProcFS.path(of: processID, .commandLine))) ?? []
        try memory.userfaultfd.registerMissing(start: mapping.start, byteCount: byteCount)
        return "read \(commandLine.count) bytes of /proc/PID/cmdline (arguments at \(hex(argumentStart)))"
    }

    func abort(reason: String) { done = true }
}
