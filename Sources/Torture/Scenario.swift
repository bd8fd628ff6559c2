// Why this file exists: a seed names a whole iteration. From it (and the campaign's filters) come the
// mode, the program and its size, where the program stops to be frozen, the strategy, the batch size
// and the nemesis plan. Shrinking replaces parts of it by overrides that the replay command spells out.
import Engine

/// A test program and how torture sizes it. Level 0 is the smallest run that still exercises its state.
public struct ProgramSpec: Sendable {
    public var name: String
    /// The executable under the programs directory (static builds start faster).
    public var binary: String
    /// Arguments for a size level (0, 1, 2); the rendezvous option is added by the scenario.
    public var arguments: @Sendable (Int) -> [String]
    /// How many steps the program takes at a size level: the rendezvous falls in 1...steps.
    public var steps: @Sendable (Int) -> Int
    /// The option that puts the program's own files in a directory torture gives it (removed after each
    /// iteration: a program killed by a failed migration never removes them itself).
    public var fileDirectoryOption: String? = nil

    public static let catalog: [ProgramSpec] = [
        ProgramSpec(name: "memwalk", binary: "memwalk-static",
                    arguments: { ["--mib", "\(1 << $0)", "--steps", "\(1500 << $0)", "--batch", "100000", "--pause-us", "0"] },
                    steps: { 1500 << $0 }),
        ProgramSpec(name: "memwalk-dynamic", binary: "memwalk",
                    arguments: { ["--mib", "\(1 << $0)", "--steps", "\(1000 << $0)", "--batch", "100000", "--pause-us", "0"] },
                    steps: { 1000 << $0 }),
        ProgramSpec(name: "sleeper", binary: "sleeper-static",
                    arguments: { ["--rounds", "\(4 + 4 * $0)", "--sleep-ms", "1"] }, steps: { 4 + 4 * $0 }),
        ProgramSpec(name: "signals", binary: "signals-static",
                    arguments: { ["--rounds", "\(60 + 20 * $0)", "--pause-us", "50"] }, steps: { 60 + 20 * $0 }),
        ProgramSpec(name: "seccomp", binary: "seccomp-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "50"] }, steps: { 8 + 8 * $0 }),
        ProgramSpec(name: "caps", binary: "caps-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "50"] }, steps: { 8 + 8 * $0 }),
        ProgramSpec(name: "heapchurn", binary: "heapchurn-static",
                    arguments: { ["--rounds", "\(6 + 6 * $0)", "--slots", "64", "--ops", "100", "--sbrk-kib", "64", "--pause-us", "0"] },
                    steps: { 6 + 6 * $0 }),
        ProgramSpec(name: "deepstack", binary: "deepstack-static",
                    arguments: { ["--depth-kib", "\(512 << $0)", "--rounds", "4", "--pause-us", "0"] }, steps: { _ in 4 }),
        ProgramSpec(name: "holes", binary: "holes-static",
                    arguments: { ["--pages", "32", "--mover-pages", "8", "--steps", "\(30 + 30 * $0)", "--pause-us", "0"] },
                    steps: { 30 + 30 * $0 }),
        ProgramSpec(name: "sparse", binary: "sparse-static",
                    arguments: { ["--reserve-gib", "4", "--pages", "\(200 << $0)", "--steps", "2000", "--batch", "100000", "--pause-us", "0"] },
                    steps: { _ in 2000 }),
        ProgramSpec(name: "filemaps", binary: "filemaps-static",
                    arguments: { ["--pages", "16", "--rounds", "\(6 + 6 * $0)", "--writes", "4", "--pause-us", "0"] }, steps: { 6 + 6 * $0 },
                    fileDirectoryOption: "--dir"),
        ProgramSpec(name: "vectors", binary: "vectors-static",
                    arguments: { ["--rounds", "\(6 + 6 * $0)", "--iters", "2000", "--pause-us", "0"] }, steps: { 6 + 6 * $0 }),
        ProgramSpec(name: "blocked", binary: "blocked-static",
                    arguments: { ["--rounds", "\(3 + 3 * $0)", "--wait-ms", "1"] }, steps: { 3 + 3 * $0 }),
        ProgramSpec(name: "kvstore", binary: "kvstore-static",
                    arguments: { ["--records", "\(500 << $0)", "--ops", "4000", "--batch", "500", "--value-bytes", "64", "--pause-us", "0",
                                  "--report-ms", "0"] }, steps: { _ in 8 }),
        ProgramSpec(name: "threads", binary: "threads-static",
                    arguments: { ["--workers", "4", "--rounds", "\(6 + 6 * $0)", "--pages", "\(4 << $0)"] }, steps: { 6 + 6 * $0 }),
    ]

    /// Programs torture runs only when `--program` names them: never drawn, so that adding one leaves
    /// every seed's scenario as it was.
    public static let optIn: [ProgramSpec] = [
        ProgramSpec(name: "descriptors", binary: "descriptors-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--timer-ms", "1"] }, steps: { 8 + 8 * $0 },
                    fileDirectoryOption: "--dir"),
        ProgramSpec(name: "sharedmem", binary: "sharedmem-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0"] }, steps: { 8 + 8 * $0 }),
        ProgramSpec(name: "tree", binary: "tree-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0"] }, steps: { 8 + 8 * $0 }),
        // The tree with its pipe split: the parent holds only the write end, A only the read end.
        ProgramSpec(name: "tree-split", binary: "tree-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--with", "split"] }, steps: { 8 + 8 * $0 }),
        // A pipeline between two workers (B writes, the grandchild G reads), made by the parent, which holds no end.
        ProgramSpec(name: "tree-pipeline", binary: "tree-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--with", "pipeline"] }, steps: { 8 + 8 * $0 }),
        // A reads the pipe at fd 7, the parent holds the same description at fd 3.
        ProgramSpec(name: "tree-renumber", binary: "tree-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--with", "renumber"] }, steps: { 8 + 8 * $0 }),
        // POSIX timers (none firing: nothing asynchronous), inotify watches, a sealed mapped memfd.
        ProgramSpec(name: "kernobjects", binary: "kernobjects-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--timer-ms", "0", "--with", "timers,inotify,seals"] },
                    steps: { 8 + 8 * $0 }, fileDirectoryOption: "--dir"),
        // A SysV segment marked for removal (in post-copy installed before the resume; the target gets a
        // fresh IPC namespace with its fresh PID namespace, since the frozen victim still holds the ID).
        ProgramSpec(name: "kernobjects-sysv", binary: "kernobjects-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--with", "sysv"] }, steps: { 8 + 8 * $0 }),
        // Process context: cwd (a directory of its own), umask, oom_score_adj, dumpable, THP-disable, the
        // alternate stacks of two threads, eight madvise flags and three membarrier registrations.
        ProgramSpec(name: "context", binary: "context-static",
                    arguments: { ["--rounds", "\(8 + 8 * $0)", "--pause-us", "0", "--thread", "1", "--advise", "1"] },
                    steps: { 8 + 8 * $0 }, fileDirectoryOption: "--dir"),
    ]

    public static func named(_ name: String) -> ProgramSpec? { (catalog + optIn).first { $0.name == name } }
}

/// When the nemesis kills the source node.
public struct KillPlan: Sendable, Codable, Equatable {
    /// After the dumper took this many steps (1 = right after its preflight)...
    public var afterDumperSteps: Int
    /// ...or, when set, as soon as the dumper's next step is this one.
    public var beforeDumperStep: KillPoint?
    /// Frames the source had sent but that were not delivered yet are lost (else they still arrive).
    public var dropInFlight: Bool
}

/// When the target node dies: after its fault handler took this many steps since the restored process
/// first ran (post-copy only, and never in an iteration whose source is killed too).
public struct TargetKillPlan: Sendable, Codable, Equatable {
    public var afterFaultHandlerSteps: Int
    /// Frames the target had sent but that were not delivered yet are lost (else they still arrive).
    public var dropInFlight: Bool
}

/// A dumper step a kill can come right before (its raw value is what reports and descriptions print).
public enum KillPoint: String, Sendable, Codable, Equatable {
    /// Every page dumped, the commit record not yet stored.
    case commit
    /// The commit record durable, the victim not yet killed.
    case release

    public func isNext(_ step: DumperStep) -> Bool {
        switch (self, step) {
        case (.commit, .commit), (.release, .release): true
        default: false
        }
    }
}

/// What a campaign restricts, and what a shrunk replay overrides.
public struct ScenarioFilter: Sendable, Codable, Equatable {
    public var modes: [MigrationMode]?
    public var programs: [String]?
    public var strategies: [StrategyName]?
    public var push: Bool?
    // Overrides (shrinking).
    public var size: Int?
    public var noKill = false
    public var adversarialSteps: Int?
    /// Identical steps in a row that count as no progress (shrinking a liveness failure; nil: the
    /// driver's own limit).
    public var repeatLimit: Int?
    /// The tamperer on (every FAM-mode iteration), off, or drawn per seed (nil).
    public var tamper: Bool?
    /// The racing installer on (every postcopy-fam iteration), off, or drawn per seed (nil).
    public var racer: Bool?
    /// The bystander that reads the target's command line while it is built (post-copy): on, off, or drawn (nil).
    public var bystander: Bool?
    /// The target-node nemesis on (every post-copy iteration without a source kill), off, or drawn (nil).
    public var killTarget: Bool?
    /// The link delivers each frame as it is sent (post-copy): on, off, or drawn (nil).
    public var instantLink: Bool?
    /// The attacker (a rogue peer, a FAM writer without the key: Attacker.swift) on, off, or drawn (nil).
    public var attacker: Bool?
    /// Run under the threaded driver with real ports and seeded perturbations (Chaos.swift), not the
    /// deterministic driver: the seed then names the perturbations, not the interleaving.
    public var chaos = false
    /// A program of the user's instead of the catalog's (`--workload 'CMD ARGS'`, Workload.swift): its
    /// absolute path and arguments, split on blanks.
    public var workload: String?
    /// The user's check of a migrated workload's run (`--check 'CMD'`), instead of comparing its stdout and
    /// exit status with the reference run's.
    public var check: String?
    /// Freeze the workload at the exit of this system call (1-based) instead of one drawn from the seed.
    public var freezeAtSyscall: Int?
    /// The calls a test program may wait in at its rendezvous (nil: drawn per seed).
    public var rendezvousWaits: [RendezvousWait]?
    /// A written schedule the driver follows instead of the strategy (shrinking; `--schedule`).
    public var schedule: [SchedulePick]?
    /// Pages per dump batch instead of the drawn size (shrinking: fewer, larger batches are fewer steps).
    public var batchPageCount: Int?

    public init(modes: [MigrationMode]? = nil, programs: [String]? = nil, strategies: [StrategyName]? = nil, push: Bool? = nil) {
        self.modes = modes
        self.programs = programs
        self.strategies = strategies
        self.push = push
    }

    /// The options that reproduce this filter on a command line.
    public var commandLineOptions: [String] {
        var options: [String] = []
        if let modes { options += ["--mode", modes.map(\.rawValue).joined(separator: ",")] }
        if let programs { options += ["--program", programs.joined(separator: ",")] }
        if let strategies { options += ["--strategy", strategies.map(\.rawValue).joined(separator: ",")] }
        if let push { options += ["--push", push ? "on" : "off"] }
        if let size { options += ["--size", "\(size)"] }
        if noKill { options.append("--no-kill") }
        if let adversarialSteps { options += ["--adversarial-steps", "\(adversarialSteps)"] }
        if let repeatLimit { options += ["--repeat-limit", "\(repeatLimit)"] }
        if let tamper { options += ["--tamper", tamper ? "on" : "off"] }
        if let racer { options += ["--racer", racer ? "on" : "off"] }
        if let bystander { options += ["--bystander", bystander ? "on" : "off"] }
        if let instantLink { options += ["--instant-link", instantLink ? "on" : "off"] }
        if let killTarget { options += ["--kill-target", killTarget ? "on" : "off"] }
        if let attacker { options += ["--attacker", attacker ? "on" : "off"] }
        if chaos { options.append("--chaos") }
        if let workload { options += ["--workload", Workload.shellQuoted(workload)] }
        if let check { options += ["--check", Workload.shellQuoted(check)] }
        if let freezeAtSyscall { options += ["--freeze-at-syscall", "\(freezeAtSyscall)"] }
        if let rendezvousWaits { options += ["--rendezvous-wait", rendezvousWaits.map(\.rawValue).joined(separator: ",")] }
        if let batchPageCount { options += ["--batch", "\(batchPageCount)"] }
        if let schedule { options += ["--schedule", ScheduleScript.encode(schedule)] }
        return options
    }
}

/// Everything one iteration does, derived from its seed.
public struct Scenario: Sendable, Codable, Equatable {
    public var seed: UInt64
    public var mode: MigrationMode
    public var push: Bool
    public var program: String
    public var binary: String
    public var arguments: [String]
    public var size: Int
    public var rendezvous: Int
    public var strategy: StrategyName
    public var batchPageCount: Int
    public var kill: KillPlan?
    public var adversarialSteps: Int
    /// A sealed page or mark is changed in FAM (FAM modes only).
    public var tamper: TamperPlan?
    /// A second installer races the engine's (postcopy-fam only).
    public var racer = false
    /// A bystander reads the target's command line while it is built (post-copy only).
    public var bystander: Bool? = nil
    /// The link delivers each frame as it is sent, so the receiver's next look already finds it (post-copy
    /// only; nil: every frame waits for a delivery step, as before the choice existed).
    public var instantLink: Bool? = nil
    /// Identical steps in a row that end the run as no progress (nil: DeterministicDriver.repeatLimit).
    public var repeatLimit: Int? = nil
    /// The target node dies after the resume.
    public var targetKill: TargetKillPlan?
    /// A workload's check command (`--check`), which judges its migrated run end to end.
    public var check: String? = nil
    /// The call the program waits in at its rendezvous (nil: sigwaitinfo, as before the choice existed).
    public var rendezvousWait: RendezvousWait? = nil
    /// A rogue peer or a FAM writer without the key (nil: none, as before the attacker existed).
    public var attack: AttackPlan? = nil
    /// A written schedule followed instead of the strategy (nil: the strategy schedules).
    public var schedule: [SchedulePick]? = nil

    /// The modes a seed draws from, in this order (not `MigrationMode.allCases`): a mode added to the
    /// engine must not change what every existing seed draws; it joins the mix from a generator of its own.
    public static let drawnModes: [MigrationMode] = [.nonlive, .postcopySocket, .postcopyFAM]

    /// The seed of iteration `index` of a campaign started with `seed`.
    public static func iterationSeed(campaignSeed: UInt64, index: Int) -> UInt64 {
        SeededGenerator.mix(campaignSeed &+ SeededGenerator.mix(UInt64(index) &+ 0x746F_7274_7572_65))
    }

    public static func make(seed: UInt64, filter: ScenarioFilter) -> Scenario {
        var rng = SeededGenerator(seed: seed ^ 0x5343_454E_4152_494F)
        let modes = filter.modes ?? Self.drawnModes
        let mode = modes[rng.below(modes.count)]
        let push = filter.push ?? rng.chance(1, in: 2)
        let programs = (filter.programs ?? ProgramSpec.catalog.map(\.name)).compactMap(ProgramSpec.named)
        let spec = programs[rng.below(programs.count)]
        let drawnSize = rng.chance(1, in: 4) ? 1 : 0
        let size = filter.size ?? drawnSize
        let steps = spec.steps(size)
        let rendezvous = 1 + rng.below(max(1, steps))
        let strategies = filter.strategies ?? StrategyName.allCases
        let strategy = strategies[rng.below(strategies.count)]
        let drawnBatchPageCount = [16, 64, 512][rng.below(3)]
        let batchPageCount = filter.batchPageCount ?? drawnBatchPageCount
        var kill: KillPlan?
        let killDrawn = strategy == .killedSource || rng.chance(1, in: 10)
        let afterSteps = 1 + rng.below(12)
        let dropInFlight = rng.chance(1, in: 2)
        let point = rng.below(6)
        let beforeStep: KillPoint? = point < 2 ? .release : point == 2 ? .commit : nil
        if killDrawn && !filter.noKill {
            kill = KillPlan(afterDumperSteps: afterSteps, beforeDumperStep: beforeStep, dropInFlight: dropInFlight)
        }
        // Drawn from a generator of its own, so that every other draw of a seed stays what it was.
        var tamperGenerator = SeededGenerator(seed: seed ^ 0x5441_4D50_4552_4552)
        let tamperDrawn = filter.tamper ?? tamperGenerator.chance(1, in: 10)
        let corruptsMark = tamperGenerator.chance(1, in: 3)
        let tamper = tamperDrawn && mode != .postcopySocket ? TamperPlan(corruptsMark: corruptsMark) : nil
        let racer = mode == .postcopyFAM && (filter.racer ?? tamperGenerator.chance(1, in: 4))
        var targetGenerator = SeededGenerator(seed: seed ^ 0x5441_5247_4554_4B4C)
        let targetKillDrawn = filter.killTarget ?? targetGenerator.chance(1, in: 12)
        let targetKill = targetKillDrawn && mode.isPostcopy && kill == nil
            ? TargetKillPlan(afterFaultHandlerSteps: targetGenerator.below(8), dropInFlight: targetGenerator.chance(1, in: 2)) : nil
        // The attacker, from a generator of its own too; never beside the other nemeses, whose endings
        // its oracle would have to tell apart from its own.
        var attackGenerator = SeededGenerator(seed: seed ^ 0x4154_5441_434B_4552)
        let attackDrawn = filter.attacker ?? attackGenerator.chance(1, in: 10)
        let attackKinds = AttackPlan.kinds(for: mode)
        let attackKind = attackKinds[attackGenerator.below(attackKinds.count)]
        let attackTowardTarget = attackGenerator.chance(1, in: 2)
        // A FAM writer acts within a few steps of what it changes appearing: a target reads the header
        // and the commit record soon after they are stored, and later changes would only miss.
        let attackDelay = attackGenerator.below(attackKind.isRoguePeer ? 40 : 6)
        let attack = attackDrawn && kill == nil && tamper == nil && targetKill == nil && !filter.chaos
            ? AttackPlan(kind: attackKind, towardTarget: attackTowardTarget, delay: attackDelay) : nil
        // A workload takes every draw a catalog program would, so that its seeds mix modes and strategies alike;
        // its freeze point is drawn once its system calls are counted (Workload.freezeSyscall).
        let workload = filter.workload.map(Workload.words)
        // Chaos releases the program as soon as it resumes, which only sigwaitinfo takes at any moment.
        let wait = workload == nil && !filter.chaos ? RendezvousWait.draw(seed: seed, allowed: filter.rendezvousWaits) : .sigwait
        let waitArguments = wait == .sigwait ? [] : ["--rendezvous-wait", "\(wait.argument)"]
        // Its own generator too; drawn in post-copy, where a page found present is taken for installed.
        var bystanderGenerator = SeededGenerator(seed: seed ^ 0x4259_5354_414E_4452)
        let bystander = mode.isPostcopy && (filter.bystander ?? bystanderGenerator.chance(1, in: 8))
        // Its own generator too. A delivery step between a send and its arrival gives every actor one more
        // look at FAM first; a fast network gives none (a fault handler woken by a message acts on it
        // before it polls the marks again), and only an instant link lets torture reach that order.
        var linkGenerator = SeededGenerator(seed: seed ^ 0x494E_5354_414E_544C)
        let instantLink = mode.isPostcopy && (filter.instantLink ?? linkGenerator.chance(1, in: 6))
        var scenario = Scenario(seed: seed, mode: mode, push: push, program: workload == nil ? spec.name : Workload.programName,
                        binary: workload?.first ?? spec.binary,
                        arguments: workload.map { Array($0.dropFirst()) } ?? spec.arguments(size) + ["--rendezvous", "\(rendezvous)"] + waitArguments,
                        size: workload == nil ? size : 0,
                        rendezvous: workload == nil ? rendezvous : filter.freezeAtSyscall ?? 0, strategy: strategy, batchPageCount: batchPageCount, kill: kill,
                        adversarialSteps: filter.adversarialSteps ?? Int.max, tamper: tamper, racer: racer,
                        targetKill: targetKill, check: workload == nil ? nil : filter.check,
                        rendezvousWait: wait == .sigwait ? nil : wait, attack: attack)
        scenario.bystander = bystander ? true : nil
        scenario.instantLink = instantLink ? true : nil
        scenario.repeatLimit = filter.repeatLimit
        scenario.schedule = filter.schedule
        return scenario
    }

    /// The program's arguments when its files go to `workDirectory`.
    public func arguments(workDirectory: String) -> [String] {
        arguments + (ProgramSpec.named(program)?.fileDirectoryOption.map { [$0, workDirectory] } ?? [])
    }

    public var summary: String {
        let program = self.program == Workload.programName ? "workload \(binary)" : "\(self.program) size \(size)"
        let freeze = self.program == Workload.programName ? "syscall" : "rendezvous"
        var text = "\(mode.rawValue)\(mode == .nonlive ? "" : push ? " push" : " no-push") \(program) "
            + "\(freeze) \(rendezvous)\(rendezvousWait.map { " in \($0.rawValue)" } ?? "") strategy \(strategy.rawValue) batch \(batchPageCount)"
        if let kill {
            text += kill.beforeDumperStep.map { " kill-before-\($0.rawValue)" } ?? " kill-after-dumper-step \(kill.afterDumperSteps)"
            if kill.dropInFlight { text += " dropping in-flight" }
        }
        if adversarialSteps != Int.max { text += " adversarial-steps \(adversarialSteps)" }
        if let repeatLimit { text += " repeat-limit \(repeatLimit)" }
        if let schedule { text += " scripted \(schedule.count) picks" }
        if let tamper { text += tamper.corruptsMark ? " tampered-mark" : " tampered-page" }
        if racer { text += " racer" }
        if let attack { text += " " + attack.summary }
        if bystander == true { text += " bystander" }
        if instantLink == true { text += " instant-link" }
        if let targetKill {
            text += " kill-target-after-fault-handler-step \(targetKill.afterFaultHandlerSteps)"
            if targetKill.dropInFlight { text += " dropping its in-flight" }
        }
        return text
    }
}
