// The parts of torture that need no process: seeds, scenarios, strategies, the in-memory transport.
import Engine
import Testing
@testable import Torture

@Suite struct SchedulingTests {
    @Test func aSeedNamesTheSameScenarioEveryTime() {
        for index in 0..<50 {
            let seed = Scenario.iterationSeed(campaignSeed: 42, index: index)
            #expect(Scenario.make(seed: seed, filter: ScenarioFilter()) == Scenario.make(seed: seed, filter: ScenarioFilter()))
        }
        #expect(Scenario.iterationSeed(campaignSeed: 42, index: 0) != Scenario.iterationSeed(campaignSeed: 42, index: 1))
        #expect(Scenario.iterationSeed(campaignSeed: 42, index: 0) != Scenario.iterationSeed(campaignSeed: 43, index: 0))
    }

    @Test func campaignsMixEveryModeProgramAndStrategy() {
        let scenarios = (0..<400).map { Scenario.make(seed: Scenario.iterationSeed(campaignSeed: 1, index: $0), filter: ScenarioFilter()) }
        #expect(Set(scenarios.map(\.mode)) == Set(MigrationMode.allCases))
        #expect(Set(scenarios.map(\.program)) == Set(ProgramSpec.catalog.map(\.name)))
        #expect(Set(scenarios.map(\.strategy)) == Set(StrategyName.allCases))
        #expect(scenarios.contains { $0.kill != nil } && scenarios.contains { $0.kill == nil })
        #expect(scenarios.contains { $0.push } && scenarios.contains { !$0.push })
    }

    @Test func filtersAndOverridesAreObeyed() {
        var filter = ScenarioFilter(modes: [.postcopyFAM], programs: ["signals"], strategies: [.pct], push: false)
        filter.noKill = true
        filter.size = 0
        filter.adversarialSteps = 7
        for index in 0..<50 {
            let scenario = Scenario.make(seed: UInt64(index), filter: filter)
            #expect(scenario.mode == .postcopyFAM && scenario.program == "signals" && scenario.strategy == .pct)
            #expect(!scenario.push && scenario.kill == nil && scenario.size == 0 && scenario.adversarialSteps == 7)
        }
        #expect(Report.replayCommand(seed: 255, filter: filter)
                == "torture --replay 0xff --mode postcopy-fam --program signals --strategy pct --push off --size 0 --no-kill --adversarial-steps 7")
    }

    @Test(arguments: StrategyName.allCases)
    func everyStrategyPicksAnEnabledChoiceDeterministically(strategy: StrategyName) {
        let choices = [Choice(actor: .dumper, label: "seal slots 0..<64", step: .dumper(.seal(slots: 0..<64))), Choice(actor: .target, label: "run"),
                       Choice(actor: .link, label: "deliver"), Choice(actor: .fabric, label: "write back"),
                       Choice(actor: .faultHandler, label: "serve")]
        func picks(seed: UInt64) -> [Int] {
            var rng = SeededGenerator(seed: seed)
            var scheduler = Scheduler(strategy: strategy, rng: &rng)
            return (0..<500).map { step in scheduler.pick(choices, step: step, rng: &rng) }
        }
        let first = picks(seed: 9)
        #expect(first == picks(seed: 9))
        #expect(first.allSatisfy { choices.indices.contains($0) })
        // Every strategy lets more than one actor move over a long schedule.
        #expect(Set(first).count > 1)
        // A planned kill always goes first.
        var rng = SeededGenerator(seed: 1)
        var scheduler = Scheduler(strategy: strategy, rng: &rng)
        #expect(scheduler.pick(choices + [Choice(actor: .nemesis, label: "kill")], step: 0, rng: &rng) == choices.count)
    }

    @Test func racingFaultsKnowsAnOpenBatchByItsTypedStepNotItsWords() {
        // The strategy once matched the label's prefix "seal": renaming the step would have silently
        // turned racing-faults into random. Now the words do not matter, the case does.
        func targetShare(dumperStep: ActorStep?) -> Int {
            let choices = [Choice(actor: .dumper, label: "renamed", step: dumperStep), Choice(actor: .target, label: "run")]
            var rng = SeededGenerator(seed: 5)
            var scheduler = Scheduler(strategy: .racingFaults, rng: &rng)
            return (0..<2000).filter { scheduler.pick(choices, step: $0, rng: &rng) == 1 }.count
        }
        let open = targetShare(dumperStep: .dumper(.seal(slots: 0..<16)))
        let closed = targetShare(dumperStep: .dumper(.dump(fromSlot: 16)))
        // 40:1 with a batch open, 4:4 without.
        #expect(open > 1800 && closed < 1200)
        #expect(ActorStep.dumper(.seal(slots: 0..<16)).description == "seal slots 0..<16")
    }

    @Test func aKillPlanMatchesTheDumperStepByCase() {
        #expect(KillPoint.commit.isNext(.commit) && !KillPoint.commit.isNext(.release))
        #expect(KillPoint.release.isNext(.release) && !KillPoint.release.isNext(.dump(fromSlot: 0)))
    }

    @Test func delayedDumpStarvesTheDumperForStretches() {
        let choices = [Choice(actor: .dumper, label: "dump"), Choice(actor: .target, label: "run")]
        var rng = SeededGenerator(seed: 3)
        var scheduler = Scheduler(strategy: .delayedDump, rng: &rng)
        var longestRunWithoutDumper = 0
        var current = 0
        for step in 0..<5000 {
            if scheduler.pick(choices, step: step, rng: &rng) == 0 { current = 0 } else { current += 1 }
            longestRunWithoutDumper = max(longestRunWithoutDumper, current)
        }
        // Uniform choice between two would almost never skip the dumper 20 times in a row.
        #expect(longestRunWithoutDumper >= 20)
    }

    @Test func theLinkDeliversEachDirectionInOrderAndTheCloseLast() throws {
        let link = MemoryLink()
        try link.source.send(.pageRequest(address: 0x1000))
        try link.source.send(.pageRequest(address: 0x2000))
        try link.target.send(.complete(generation: 1))
        #expect(try link.target.receive() == nil)
        #expect(link.deliverable == [.toTarget, .toSource])
        link.deliver(.toTarget)
        #expect(try link.target.receive() == .pageRequest(address: 0x1000))
        link.source.close()
        link.deliver(.toTarget)
        link.deliver(.toTarget)
        #expect(try link.target.receive() == .pageRequest(address: 0x2000))
        #expect(throws: TransportError.peerClosed) { try link.target.receive() }
        #expect(throws: TransportError.peerClosed) { try link.target.send(.complete(generation: 1)) }
        #expect(link.source.bytesSent == link.target.bytesReceived)
    }

    @Test func anInstantLinkDeliversAsItSendsButNeverOvertakes() throws {
        let link = MemoryLink()
        link.deliversAtOnce = true
        try link.source.send(.marked(slots: [3]))
        // Readable before any delivery step: the receiver's next look finds it.
        #expect(link.target.waitReadable(timeoutMilliseconds: 0))
        #expect(link.deliverable.isEmpty)
        #expect(try link.target.receive() == .marked(slots: [3]))
        // A frame of a rogue peer waits in flight: what a node sends after it waits behind it.
        link.inject(Message.pageRequest(address: 0x1000).encoded(), kind: "injected", direction: .toTarget)
        try link.source.send(.marked(slots: [4]))
        #expect(link.deliverable == [.toTarget])
        link.deliver(.toTarget)
        #expect(try link.target.receive() == .pageRequest(address: 0x1000))
        #expect(try link.target.receive() == nil)
        link.deliver(.toTarget)
        #expect(try link.target.receive() == .marked(slots: [4]))
        // Drawn in post-copy only, from a generator of its own, and spelled in the replay command.
        let drawn = (0..<600).map { Scenario.make(seed: Scenario.iterationSeed(campaignSeed: 1, index: $0), filter: ScenarioFilter()) }
        #expect(drawn.contains { $0.instantLink == true } && drawn.allSatisfy { $0.instantLink != true || $0.mode.isPostcopy })
        var filter = ScenarioFilter()
        filter.instantLink = false
        #expect(drawn.allSatisfy { var plain = $0; plain.instantLink = nil; return plain == Scenario.make(seed: $0.seed, filter: filter) })
        #expect(filter.commandLineOptions == ["--instant-link", "off"])
    }

    @Test func aCrashedNodeLosesOrDeliversWhatItSent() throws {
        for drop in [true, false] {
            let link = MemoryLink()
            try link.source.send(.marked(slots: [1, 2]))
            link.crash(link.source, dropInFlight: drop)
            while let direction = link.deliverable.first { link.deliver(direction) }
            if !drop { #expect(try link.target.receive() == .marked(slots: [1, 2])) }
            #expect(throws: TransportError.peerClosed) { try link.target.receive() }
        }
    }

    @Test func aScheduleScriptReadsBackWhatItWroteAndNamesWhatIsWrong() throws {
        let picks = [SchedulePick(actor: .dumper), SchedulePick(actor: .dumper), SchedulePick(actor: .dumper),
                     SchedulePick(actor: .link, index: 1), SchedulePick(actor: .faultHandler), SchedulePick(actor: .dumper)]
        #expect(ScheduleScript.encode(picks) == "dumper*3,link.1,fault-handler,dumper")
        #expect(try ScheduleScript.decode(ScheduleScript.encode(picks)).get() == picks)
        #expect(ScheduleScript.encode([]) == "none")
        #expect(try ScheduleScript.decode("none").get() == [])
        for bad in ["", "dumper,", "dumper*0", "dumper*x", "link.", "link.-1", "dumpr", "dumper*2*3"] {
            #expect(throws: ScheduleScriptError.self) { try ScheduleScript.decode(bad).get() }
        }
        guard case .failure(let error) = ScheduleScript.decode("dumpr*2") else { return }
        #expect(error.description.contains("'dumpr' is not an actor"))
    }

    @Test func aScriptedDriverFollowsTheScriptThenTheFairOrder() {
        let dumper = FakeParticipant(actor: .dumper, steps: 3)
        let target = FakeParticipant(actor: .target, steps: 3)
        var rng = SeededGenerator(seed: 3)
        // The restorer is not in this run: its pick is dropped.
        let script = [SchedulePick(actor: .target), SchedulePick(actor: .restorer), SchedulePick(actor: .target), SchedulePick(actor: .dumper)]
        let driver = DeterministicDriver(participants: [dumper, target], clock: VirtualClock(),
                                         scheduler: Scheduler(strategy: .random, rng: &rng), stepLimit: 100,
                                         adversarialSteps: Int.max, script: script, keepTrace: true, traceSink: nil)
        guard case .completed = driver.run(rng: &rng) else {
            Issue.record("the scripted run did not complete")
            return
        }
        // Scripted: target, target, dumper; then the fair order (list order): dumper, dumper, target.
        #expect(driver.picks.map(\.actor) == [.target, .target, .dumper, .dumper, .dumper, .target])
    }

    @Test func theTraceHashDependsOnEveryLineAndItsOrder() {
        var first = TraceHash()
        first.add("1 dumper: freeze")
        first.add("2 target: run")
        var second = TraceHash()
        second.add("2 target: run")
        second.add("1 dumper: freeze")
        var same = TraceHash()
        same.add("1 dumper: freeze")
        same.add("2 target: run")
        #expect(first != second)
        #expect(first == same)
        #expect(first.hex.count == 16)
    }
}
