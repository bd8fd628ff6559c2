// Issue 12, item 7: the attacker as a nemesis. A rogue peer on the link (a forged sealed frame, a replayed
// one, an unsealed `complete` to the source) and a FAM writer without the key (the header's code, the
// metadata, the page table, the commit record). Every iteration must pass its oracles: completed with the
// restored process exactly the checkpointed one, or refused with the attack's own cause, the victim alive
// while no complete image exists. The draw comes from a generator of its own: seeds keep their scenarios.
import Foundation
import Testing
@testable import Engine
@testable import Torture

@Suite struct AttackPlanTests {
    /// The attacker's draw changes nothing else of a seed's scenario.
    @Test func theAttackerIsDrawnBesideTheOldScenario() {
        for seed in UInt64(1)...200 {
            var off = ScenarioFilter()
            off.attacker = false
            var drawn = ScenarioFilter()
            drawn.attacker = nil
            var without = Scenario.make(seed: seed, filter: drawn)
            #expect(Scenario.make(seed: seed, filter: off).attack == nil)
            without.attack = nil
            #expect(without == Scenario.make(seed: seed, filter: off), "seed \(seed)")
        }
        var on = ScenarioFilter()
        on.attacker = true
        on.noKill = true
        on.tamper = false
        on.killTarget = false
        let kinds = Set((UInt64(1)...300).compactMap { Scenario.make(seed: $0, filter: on).attack?.kind })
        #expect(kinds == Set(AttackPlan.Kind.allCases), "kinds drawn: \(kinds)")
    }

    /// Each refusal the oracle takes for the attack's is one the engine really gives.
    @Test func theOracleKnowsEachRefusal() {
        let peer = AttackPlan(kind: .forgedFrame, towardTarget: true, delay: 0)
        #expect(peer.isItsRefusal("\(TransportError.malformed("frame 3 does not open under this migration's channel key (changed, replayed, reordered or forged)"))"))
        #expect(!peer.isItsRefusal("the peer closed the connection"))
        let writer = AttackPlan(kind: .headerCode, towardTarget: false, delay: 0)
        #expect(writer.isItsRefusal("\(ImageError.headerNotAuthentic(path: "model FAM"))"))
        #expect(writer.isItsRefusal("\(ImageError.metadataChecksumMismatch(path: "model FAM"))"))
        #expect(writer.isItsRefusal("\(ImageError.commitRecordNotAuthentic(path: "model FAM"))"))
        #expect(!writer.isItsRefusal("the target closed the connection"))
    }
}

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct AttackerTortureTests {
        /// Seeds with the attacker on, in every mode: each passes, and the attack fired in most.
        @Test func attackedIterationsPassTheirOracles() throws {
            var filter = ScenarioFilter()
            filter.attacker = true
            filter.noKill = true
            filter.tamper = false
            filter.killTarget = false
            filter.racer = false
            let campaign = Campaign(options: try TorturePaths.campaignOptions(seed: 12, iterations: 24, filter: filter))
            let results = campaign.run { _, _ in }
            #expect(results.count == 24)
            var kinds: Set<AttackPlan.Kind> = []
            var refused = 0
            for result in results {
                #expect(result.passed, "\(Report.failureText(result, filter: filter))")
                if let attack = result.scenario.attack { kinds.insert(attack.kind) }
                if result.outcome.hasPrefix("failed") { refused += 1 }
            }
            #expect(kinds.count >= 4, "kinds: \(kinds)")
            #expect(refused > 0, "no attack was refused: \(results.map(\.outcome))")
            #expect(campaign.leaks.isEmpty, "\(campaign.leaks)")
        }
    }
}
