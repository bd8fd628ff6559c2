// The opt-in `tree` program under torture: every mode migrates the tree (post-copy too, one target of
// several processes), and a killed source leaves no process of the tree behind.
import Engine
import Foundation
import Sys
import Testing
@testable import Torture

extension ProcessSpawningTortureTests {
    @Suite(.serialized) struct TreeTortureTests {
        /// Campaign seed 105's only iteration (0x2782c34c05813941): the nemesis kills the source while the
        /// frozen tree's members are traced by the dead source's thread. They used to stay zombies that
        /// their namespace's pid 1 waited for: left behind, a leak.
        @Test func aKilledSourceLeavesNoProcessOfTheTreeBehind() throws {
            let filter = ScenarioFilter(modes: [.nonlive], programs: ["tree"])
            let options = try TorturePaths.campaignOptions(seed: 105, iterations: 1, filter: filter)
            let campaign = Campaign(options: options)
            let results = campaign.run { _, _ in }
            #expect(results.map(\.scenario.seed) == [0x2782_c34c_0581_3941])
            #expect(results.first?.scenario.kill != nil, "the seed no longer kills the source")
            #expect(results.allSatisfy { $0.passed }, "\(results.map { $0.outcome })")
            #expect(campaign.leaks.isEmpty, "\(campaign.leaks)")
        }

        /// Every mode migrates the tree with every oracle: no iteration is refused, and each mode (both
        /// post-copy ones with the restored tree as one target, faults from every process served by one
        /// fault handler) completes at least once; nothing of any tree is left behind.
        @Test func treeCampaignMigratesInEveryMode() throws {
            let options = try TorturePaths.campaignOptions(seed: 5, iterations: 16, filter: ScenarioFilter(programs: ["tree"]))
            let campaign = Campaign(options: options)
            let results = campaign.run { _, _ in }
            for result in results where !result.passed { Issue.record("\(Report.failureText(result, filter: options.filter))") }
            for result in results {
                #expect(!result.outcome.hasPrefix("refused before the freeze"), "\(result.outcome)")
            }
            for mode in MigrationMode.allCases {
                #expect(results.contains { $0.scenario.mode == mode && $0.outcome.hasPrefix("completed") }, "no \(mode) iteration completed")
            }
            #expect(campaign.leaks.isEmpty, "\(campaign.leaks)")
        }
    }
}
