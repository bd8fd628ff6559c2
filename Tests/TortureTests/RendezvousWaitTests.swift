// A freeze inside each kind of interrupted system call: the test programs' rendezvous waits in nanosleep,
// a futex (with and without a timeout) or ppoll as well as sigwaitinfo, and each is restored in every mode
// and replays by seed.
import Testing
@testable import Torture

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct RendezvousWaitTests {
        /// The wait is drawn from a generator of its own: pinning it changes no other draw of a seed, and an
        /// old regression line (pinned to sigwait) names the scenario it always did.
        @Test func theWaitIsItsOwnDrawAndPinningItChangesNothingElse() throws {
            var pinned = ScenarioFilter()
            pinned.rendezvousWaits = [.sigwait]
            var kinds: Set<RendezvousWait> = []
            for index in 0..<300 {
                let seed = Scenario.iterationSeed(campaignSeed: 1, index: index)
                var drawn = Scenario.make(seed: seed, filter: ScenarioFilter())
                let old = Scenario.make(seed: seed, filter: pinned)
                kinds.insert(drawn.rendezvousWait ?? .sigwait)
                #expect(old.rendezvousWait == nil && !old.arguments.contains("--rendezvous-wait"))
                if let wait = drawn.rendezvousWait {
                    #expect(drawn.arguments.suffix(2) == ["--rendezvous-wait", "\(wait.argument)"])
                    drawn.arguments.removeLast(2)
                    drawn.rendezvousWait = nil
                }
                #expect(drawn == old)
            }
            #expect(kinds == Set(RendezvousWait.allCases))
            #expect(throws: Regressions.FilterError.self) { try RendezvousWait.list("nanosleep,sleep") }
            #expect(try RendezvousWait.list("ppoll,futex-timeout") == [.ppoll, .futexTimeout])
        }

        /// Every kind, in every mode, on a single-threaded and a multi-threaded program: frozen inside the
        /// call (the summary names it), every oracle passes (the registers the state oracle derives for the
        /// restart, the program's own check that its signal mask survived ppoll's temporary one), and a replay
        /// gives the same trace hash.
        @Test(arguments: [RendezvousWait.nanosleep, .futex, .futexTimeout, .ppoll])
        func aProgramFrozenInsideTheCallResumesInIt(wait: RendezvousWait) throws {
            var filter = ScenarioFilter(programs: ["sleeper", "threads"])
            filter.rendezvousWaits = [wait]
            filter.noKill = true
            filter.tamper = false
            filter.killTarget = false
            let options = try TorturePaths.campaignOptions(seed: 8, iterations: 12, filter: filter)
            let campaign = Campaign(options: options)
            var modes: Set<String> = []
            for index in 0..<12 {
                let seed = Scenario.iterationSeed(campaignSeed: 8, index: index)
                let result = campaign.runOne(seed: seed, filter: filter, keepTrace: false)
                #expect(result.passed, "\(Report.failureText(result, filter: filter))")
                #expect(result.scenario.summary.contains("in \(wait.rawValue) strategy"))
                #expect(campaign.runOne(seed: seed, filter: filter, keepTrace: false).traceHash == result.traceHash)
                modes.insert(result.scenario.mode.rawValue)
            }
            #expect(modes.count == 3, "\(modes)")
        }
    }
}
