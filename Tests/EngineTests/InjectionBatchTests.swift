// The victim's own answers at freeze (signal actions, resource limits, ...) come from one batch of
// injected syscalls run by a small loop in a scratch page: one stop instead of some ninety. Checked
// here against what /proc says independently, and the victim must run on untouched afterwards.
import Foundation
import Testing
@testable import Engine
import Sys

@Suite(.serialized) struct InjectionBatchTests {
    @Test func frozenVictimsBatchedAnswersAgreeWithProc() throws {
        let directory = try ScratchDirectory(under: "/tmp")
        defer { directory.remove() }
        let program = try SpawnedProgram(try TestPaths.testProgram("signals-static"), ["--rounds", "100000", "--pause-us", "1000"],
                                         standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err"))
        defer { program.kill() }
        // Its handlers are installed once its status says it catches SIGUSR1 (signal 10).
        #expect(pollUntil(timeout: .seconds(10)) { (signalSet("SigCgt", of: program.processID) ?? 0) & (1 << 9) != 0 })
        let caught = try #require(signalSet("SigCgt", of: program.processID))
        let ignored = try #require(signalSet("SigIgn", of: program.processID))
        let limitsText = try ProcFS.readText("/proc/\(program.processID)/limits")

        let victim = try FrozenVictim.freeze(program.processID)
        let state: ProcessState
        do {
            state = try victim.capture()
        } catch {
            victim.release(kill: false)
            throw error
        }
        victim.release(kill: false)

        #expect(state.signalActions.count == 62)
        for action in state.signalActions {
            let bit = UInt64(1) << UInt64(action.signal - 1)
            #expect((action.handler == 1) == (ignored & bit != 0), "signal \(action.signal): handler \(action.handler), SigIgn \(hex(ignored))")
            #expect((action.handler > 1) == (caught & bit != 0), "signal \(action.signal): handler \(action.handler), SigCgt \(hex(caught))")
        }
        // RLIMIT_NOFILE (7) and RLIMIT_STACK (3), as /proc/PID/limits shows them.
        for (resource, label) in [(Int32(7), "Max open files"), (Int32(3), "Max stack size")] {
            let line = try #require(limitsText.split(separator: "\n").first { $0.hasPrefix(label) })
            let fields = line.dropFirst(label.count).split(separator: " ").prefix(2).map { $0 == "unlimited" ? UInt64.max : UInt64($0) }
            let limit = try #require(state.resourceLimits.first { $0.resource == resource })
            #expect([limit.soft, limit.hard] == fields, "\(label): \(line)")
        }
        #expect(state.threads.count == 1 && state.threads[0].signalStack == .disabled)
        // Untouched: it runs on and keeps checking its own dispositions and mask every round.
        usleep(300_000)
        #expect(processLife(program.processID) == .running)
        let errors = (try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? ""
        #expect(errors.isEmpty, "the victim complained after the capture: \(errors)")
    }

    private func signalSet(_ key: String, of processID: ProcessID) -> UInt64? {
        (try? ProcFS.status(processID)).flatMap { $0[key] }.flatMap { UInt64($0, radix: 16) }
    }
}

/// postcopy-fam: the source marks the pages a target installs before it resumes (private file pages,
/// the rseq area) before its metadata commit, so the target finds them in FAM instead of asking.
@Suite struct PagesBeforeResumeTests {
    @Test func privateFilePagesAndTheRseqPageAreDumpedFirst() {
        let dataStart: UInt64 = 0x7f00_0000_0000
        var state = plausibleState(processID: ProcessID(4242), dataRange: dataStart..<(dataStart + 0x10000))
        let stackPage = state.mappings.first { $0.kind == .stack }!.start
        // A memfd mapping is installed before the resume too; shared anonymous memory is not.
        let memfdStart: UInt64 = 0x7e00_0000_0000, sharedStart: UInt64 = 0x7d00_0000_0000
        state.mappings.append(Mapping(start: memfdStart, end: memfdStart + 0x2000, readable: true, writable: true, executable: false, shared: true,
                                      fileOffset: 0, kind: .sharedMemory(SharedMemory(object: 1, memfdName: "cache", byteCount: 0x2000))))
        state.mappings.append(Mapping(start: sharedStart, end: sharedStart + 0x1000, readable: true, writable: true, executable: false, shared: true,
                                      fileOffset: 0, kind: .sharedMemory(SharedMemory(object: 2, memfdName: nil, byteCount: 0x1000))))
        let pageAddresses: [UInt64] = [0x40_0000, 0x40_1000, sharedStart, memfdStart + 0x1000,
                                       dataStart, dataStart + 0x1000, dataStart + 0x5000, stackPage]
        // Slots 0-1: the file pages; 3: the memfd page; 4: the rseq area's page (rseq at dataStart + 64).
        #expect(Dumper.slotsNeededBeforeResume(state, pageAddresses: pageAddresses) == [0..<2, 3..<5])
    }
}
