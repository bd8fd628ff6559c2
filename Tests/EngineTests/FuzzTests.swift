// The fuzz gate's own checks (issue 12 item 6): the committed corpus is what the targets start from and
// every entry of it is accepted as it is (else the campaign fuzzes nothing behind the first check); a
// short campaign of every target holds every oracle; inputs are a function of (seed, target, index)
// only; and the image oracle does fail when an image changed after the source wrote it opens (so the
// gate can fail).
import Foundation
import Testing
@testable import Engine
import Fuzzing

func loadFuzzCorpus() throws -> FuzzCorpus {
    var entries: [FuzzTarget: [(name: String, bytes: [UInt8])]] = [:]
    for target in FuzzTarget.allCases {
        let directory = TestPaths.packageRoot + "/Tests/fuzz/corpus/" + target.rawValue
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".bin") }
        entries[target] = try names.map { name in (name, [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name)))) }
    }
    return FuzzCorpus(entries: entries)
}

@Suite struct FuzzTests {
    @Test(arguments: FuzzTarget.allCases) func corpusIsAcceptedAndAShortCampaignHoldsEveryOracle(target: FuzzTarget) throws {
        let corpus = try loadFuzzCorpus()
        try #require(corpus.count(target) > 0, "no corpus for \(target)")
        let fuzzer = Fuzzer(corpus: corpus, seed: 0x5EED)
        for index in 0..<corpus.count(target) {
            #expect(fuzzer.run(target, input: fuzzer.input(target, index: index)) == .accepted, "corpus entry \(index) of \(target)")
        }
        var acceptedCount = 0, refusedCount = 0
        for index in corpus.count(target)..<(corpus.count(target) + 300) {
            switch fuzzer.run(target, input: fuzzer.input(target, index: index)) {
            case .accepted: acceptedCount += 1
            case .refused: refusedCount += 1
            case .broken(let problem): Issue.record("\(target) input \(index): \(problem)")
            }
        }
        // Mutations reach past the first checks, and most are refused.
        #expect(acceptedCount > 0 && refusedCount > 0, "\(target): \(acceptedCount) accepted, \(refusedCount) refused")
    }

    @Test func inputsDependOnSeedTargetAndIndexOnly() throws {
        let corpus = try loadFuzzCorpus()
        let first = Fuzzer(corpus: corpus, seed: 7), second = Fuzzer(corpus: corpus, seed: 7), other = Fuzzer(corpus: corpus, seed: 8)
        for target in FuzzTarget.allCases {
            let index = corpus.count(target) + 41
            #expect(first.input(target, index: index).bytes == second.input(target, index: index).bytes)
            _ = first.input(target, index: index + 1)  // no state carried from one input to the next
            #expect(first.input(target, index: index).bytes == second.input(target, index: index).bytes)
            let differs = (0..<8).contains { other.input(target, index: index + $0).bytes != first.input(target, index: index + $0).bytes }
            #expect(differs, "\(target): seed 8 gives seed 7's inputs")
        }
    }

    /// An insider's change (sealed again with the key) judged as if no key had been used: the oracle
    /// sees a changed image that opens, and says so. Without this, a gate that never fails would pass.
    @Test func imageOracleCatchesAChangedImageThatOpens() throws {
        let corpus = try loadFuzzCorpus()
        let entry = try #require(corpus.entries[.image]?.first)
        let fam = MemoryFAM(bytes: entry.bytes)
        let reader = try ImageReader.open(backend: fam, key: Fuzzer.corpusKey, requireComplete: true)
        var page = fam.loadBytes(at: reader.layout.pageOffset(slot: 0), count: ImageLayout.pageSize)
        page[100] ^= 0x40
        fam.store(page, at: reader.layout.pageOffset(slot: 0))
        ImageSealer.reseal(fam, key: Fuzzer.corpusKey)
        let input = FuzzInput(entryName: entry.name, bytes: fam.bytes, imageMode: .changedWithoutKey)
        guard case .broken(let problem) = Fuzzer(corpus: corpus, seed: 1).run(.image, input: input) else {
            Issue.record("a page changed and sealed again was not reported")
            return
        }
        #expect(problem.contains("opens as complete"), "\(problem)")
        // The same change without the key, the mark's digest recomputed as an unkeyed checksum would
        // be: refused by the complete open (commit code) and by the post-copy page check (page code).
        let unkeyed = MemoryFAM(bytes: entry.bytes)
        unkeyed.store(page, at: reader.layout.pageOffset(slot: 0))
        ImageSealer.recomputeChecksums(unkeyed, forgedPages: [0])
        let unkeyedInput = FuzzInput(entryName: entry.name, bytes: unkeyed.bytes, imageMode: .changedWithoutKey)
        let verdict = Fuzzer(corpus: corpus, seed: 1).run(.image, input: unkeyedInput)
        if case .broken(let problem) = verdict { Issue.record("a page forged without the key: \(problem)") }
        var postcopy = try ImageReader.open(backend: unkeyed, key: Fuzzer.corpusKey, requireComplete: false)
        let marked = postcopy.isMarked(slot: 0)
        #expect(marked)
        #expect(throws: ImageError.self) { try postcopy.verifyPage(slot: 0) }
        #expect(throws: ImageError.self) { _ = try ImageReader.open(backend: unkeyed, key: Fuzzer.corpusKey, requireComplete: true) }
    }
}
