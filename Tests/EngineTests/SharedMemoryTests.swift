// Issue 11, item 4: shared memory that exists only in the process (MAP_SHARED|MAP_ANONYMOUS, memfd
// mappings, with or without the memfd's descriptor) migrates in every mode: one object per victim
// object, every mapping of it at its address and offset, its pages (also those only the object holds)
// dumped, installed eagerly (nonlive) or through userfaultfd on shmem (post-copy).
import Foundation
import Glibc
import Testing
@testable import Engine
import Oracles
import Sys

struct SharedMemoryCase: Sendable, CustomTestStringConvertible {
    var program: String
    var arguments: [String]
    var mode: String
    var push = "on"
    var testDescription: String { "\(program) \(mode)\(mode == "nonlive" ? "" : " push \(push)") \(arguments.joined(separator: " "))" }

    static let all: [SharedMemoryCase] = ["nonlive", "postcopy-socket", "postcopy-fam"].flatMap { mode in
        [SharedMemoryCase(program: "sharedmem-static", arguments: ["--rounds", "70", "--pause-us", "10000"], mode: mode),
         SharedMemoryCase(program: "sharedmem", arguments: ["--rounds", "70", "--pause-us", "10000", "--with", "split,memfdfd"], mode: mode)]
            // A SysV segment marked for removal goes with the process, in post-copy before the resume.
            + [SharedMemoryCase(program: "sharedmem-static", arguments: ["--rounds", "70", "--pause-us", "10000", "--with", "anon,sysv"], mode: mode)]
    }.flatMap { migration in
        migration.mode == "nonlive" ? [migration] : [migration, SharedMemoryCase(program: migration.program, arguments: migration.arguments,
                                                                                  mode: migration.mode, push: "off")]
    }
}

extension ProcessTests {
    @Suite(.serialized) struct SharedMemoryTests {
        @Test(arguments: SharedMemoryCase.all) func sharedMemorySurvivesMigration(_ migration: SharedMemoryCase) throws {
            try migrateProgram(migration.program, arguments: migration.arguments,
                               runOptions: ["--mode", migration.mode, "--push", migration.push, "--after-ms", "300"],
                               timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        /// The dump takes every page the object holds, not only those this mapping has in its page
        /// table: page 5 of `anon` is dropped with MADV_DONTNEED each round (its data lives on in the
        /// object), page 60 never touched (a hole: not dumped).
        @Test func pagesOnlyTheObjectHoldsAreDumped() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("sharedmem-static"),
                                                           ["--rounds", "30", "--pause-us", "200000", "--with", "anon"],
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(5)) { ((try? String(contentsOfFile: directory.path("out"), encoding: .utf8)) ?? "").contains("round 1 ok") })
            let mappings = try Preflight.mappings(program.processID)
            let shared = try #require(mappings.first { if case .sharedMemory = $0.kind { true } else { false } })
            #expect(shared.byteCount == 64 * 4096)
            let pages = try Preflight.dirtyPageAddresses(program.processID, mappings: [shared])
            #expect(pages.contains(shared.start + 5 * 4096), "page 5 (dropped from the page table, kept by the object) was not dumped")
            #expect(!pages.contains(shared.start + 60 * 4096), "page 60 was never touched and must not be dumped")
            program.kill()
        }
    }
}

@Suite struct SharedMemoryStateTests {
    func sharedState() -> ProcessState {
        var state = plausibleState(processID: ProcessID(4242), dataRange: 0x7f00_0000_0000..<0x7f00_0001_0000)
        let anonymous = SharedMemory(object: 0, memfdName: nil, byteCount: 8 * 4096)
        let memfd = SharedMemory(object: 1, memfdName: "shm", byteCount: 4 * 4096)
        state.mappings.insert(contentsOf: [
            Mapping(start: 0x7f10_0000_0000, end: 0x7f10_0000_4000, readable: true, writable: true, executable: false, shared: true,
                    fileOffset: 0, kind: .sharedMemory(anonymous)),
            Mapping(start: 0x7f10_0000_4000, end: 0x7f10_0000_8000, readable: true, writable: false, executable: false, shared: true,
                    fileOffset: 0x4000, kind: .sharedMemory(anonymous)),
            Mapping(start: 0x7f10_0001_0000, end: 0x7f10_0001_4000, readable: true, writable: true, executable: false, shared: true,
                    fileOffset: 0, kind: .sharedMemory(memfd)),
        ], at: 0)
        state.mappings.sort { $0.start < $1.start }
        state.files.append(OpenFile(descriptor: 3, path: "", flags: 0o2, position: 8,
                                    kind: .memfdOfMapping(mappingStart: 0x7f10_0001_0000, mappingEnd: 0x7f10_0001_4000, seals: 0)))
        return state
    }

    @Test func sharedMemoryRoundTripsThroughTheImageEncoding() throws {
        let state = sharedState()
        let decoded = try ProcessState.decode(state.encoded())
        #expect(decoded == state)
        try decoded.validate(pageAddresses: [0x7f10_0000_0000, 0x7f10_0001_3000], path: "test")
    }

    /// Two objects where there was one (or one where there were two) is a layout mismatch.
    @Test func oracleNamesASplitObject() {
        let checkpointed = sharedState()
        var restored = checkpointed
        restored.mappings[checkpointed.mappings.firstIndex { $0.start == 0x7f10_0000_4000 }!].kind = .sharedMemory(SharedMemory(object: 2, memfdName: nil, byteCount: 8 * 4096))
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: restored).map(\.field) == ["memory layout"])
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: checkpointed).isEmpty)
    }

    @Test func inconsistentSharedMemoryIsRejected() {
        let cases: [(String, (inout ProcessState) -> Void)] = [
            ("unlike its other mappings", { state in
                state.mappings[state.mappings.firstIndex { $0.start == 0x7f10_0000_4000 }!].kind = .sharedMemory(SharedMemory(object: 0, memfdName: "other", byteCount: 8 * 4096))
            }),
            ("mapped at offset", { state in
                state.mappings[state.mappings.firstIndex { $0.start == 0x7f10_0001_0000 }!].fileOffset = 0x2000
            }),
            ("that is not restored", { state in
                state.files[state.files.count - 1].kind = .memfdOfMapping(mappingStart: 0x7f10_0000_0000, mappingEnd: 0x7f10_0000_4000, seals: 0)
            }),
        ]
        for (reason, damage) in cases {
            var state = sharedState()
            damage(&state)
            do {
                let decoded = try ProcessState.decode(state.encoded())
                try decoded.validate(pageAddresses: [], path: "test")
                Issue.record("accepted a state whose shared memory: \(reason)")
            } catch {
                #expect("\(error)".contains(reason), "\(error)")
            }
        }
    }
}
