// The deterministic driver's own judgements, on participants that need no process: a livelock is
// found at once, and the regression file and determinism check say exactly what they found.
import Engine
import Testing
@testable import Torture

/// A participant that is always ready and whose step changes nothing (a busy wait), or that finishes
/// after `steps` steps.
final class FakeParticipant: Participant {
    let actor: ActorName
    let isEssential = true
    private var stepsLeft: Int?
    private(set) var taken = 0
    init(actor: ActorName, steps: Int?) {
        self.actor = actor
        stepsLeft = steps
    }
    func availability() -> Availability {
        if let stepsLeft, stepsLeft == 0 { return .finished }
        return .choices(["spin"])
    }
    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        taken += 1
        if let left = stepsLeft { stepsLeft = left - 1 }
        return nil
    }
    func abort(reason: String) {}
}

@Suite struct DriverTests {
    func drive(_ participants: [Participant], strategy: StrategyName) -> (DriverOutcome, Int) {
        var rng = SeededGenerator(seed: 3)
        let driver = DeterministicDriver(participants: participants, clock: VirtualClock(),
                                         scheduler: Scheduler(strategy: strategy, rng: &rng), stepLimit: 400_000,
                                         adversarialSteps: Int.max, keepTrace: false, traceSink: nil)
        return (driver.run(rng: &rng), driver.stepCount)
    }

    @Test func aStepThatChangesNothingIsALivenessFailureAtOnce() {
        // Regression (seed 0x3f8e32e211b8b5cb): the fault handler reported "serve" ready with nothing to
        // serve; pct ran it 399,761 times and the schedule ended only at the step budget.
        let (outcome, steps) = drive([FakeParticipant(actor: .faultHandler, steps: nil), FakeParticipant(actor: .dumper, steps: 5)],
                                     strategy: .random)
        guard case .stuck(let reason) = outcome else {
            Issue.record("expected a liveness failure, got \(outcome)")
            return
        }
        #expect(reason.contains("no progress") && reason.contains("fault-handler: spin"))
        #expect(steps < DeterministicDriver.repeatLimit + 100)
    }

    @Test func stepsThatEndAreNotJudgedALivelock() {
        let (outcome, steps) = drive([FakeParticipant(actor: .dumper, steps: 3000), FakeParticipant(actor: .restorer, steps: 3000)],
                                     strategy: .random)
        guard case .completed = outcome else {
            Issue.record("expected completion, got \(outcome)")
            return
        }
        #expect(steps == 6000)
    }

    @Test func theFirstDifferingStepIsNamed() {
        #expect(Campaign.firstDifference(["1 a", "2 b"], ["1 a", "2 b"]) == nil)
        let difference = Campaign.firstDifference(["1 a", "2 b", "3 c"], ["1 a", "2 x"])
        #expect(difference?.step == 2 && difference?.first == "2 b" && difference?.second == "2 x")
        #expect(Campaign.firstDifference(["1 a"], ["1 a", "2 b"])?.first == "(ended)")
    }

    @Test func theRegressionFileIsReadLineByLine() throws {
        let text = """
            # comment
            0xdee9b1c9aef5aee7 replays  # the mremap hang

            42 pass --mode postcopy-fam,nonlive --program holes --push off --size 1 --no-kill # filtered
            """
        let seeds = try Regressions.parse(text, path: "r.txt")
        #expect(seeds.count == 2)
        #expect(seeds[0] == RegressionSeed(seed: 0xdee9b1c9aef5aee7, expectation: .replays, filter: ScenarioFilter(),
                                           note: "the mremap hang", line: 2))
        var filter = ScenarioFilter(modes: [.postcopyFAM, .nonlive], programs: ["holes"], push: false)
        filter.size = 1
        filter.noKill = true
        #expect(seeds[1].filter == filter && seeds[1].line == 4 && seeds[1].expectation == .pass)
        // What a line spells is what its replay command spells.
        #expect(try Regressions.parseFilter(filter.commandLineOptions) == filter)
    }

    @Test(arguments: ["0xZZ pass", "12", "12 maybe", "12 pass --mode warp", "12 pass --size", "12 pass --frobnicate"])
    func aMalformedRegressionLineNamesItsLine(line: String) {
        #expect(throws: RegressionFileError.self) { try Regressions.parse("# first\n" + line, path: "r.txt") }
        do { _ = try Regressions.parse("# first\n" + line, path: "r.txt") } catch {
            #expect(error.description.hasPrefix("r.txt:2: "))
        }
    }
}
