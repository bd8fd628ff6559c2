// ProcFS's parsing of /proc text, after trimmingSpaces became a byte scan, isKilledOrEnded a search for
// three lines (torture asks it before every step) and pagemap a chunked read sifted in C: the same
// answers as before, on real processes of this machine.
import Foundation
import Sys
import Testing

extension ProcessTests {
    @Suite(.serialized) struct ProcFSParsingTests {
        @Test(arguments: [("  a b\t", "a b"), ("\t\t", ""), ("", ""), ("x", "x"), (" \tS (sleeping)  ", "S (sleeping)"), ("é  ", "é")])
        func trimmingSpacesDropsOnlyOuterSpacesAndTabs(_ input: String, _ expected: String) {
            #expect(Substring(input).trimmingSpaces() == expected)
        }

        @Test func everyNamedProcEntryIsWhereTheKernelKeepsIt() throws {
            let own = ProcessID.current
            for entry in [ProcEntry.status, .stat, .auxiliaryVector, .executable, .commandLine, .timers, .oomScoreAdjustment,
                          .workingDirectory, .rootDirectory, .threadSchedulerStatistics(own)] {
                #expect(ProcFS.exists(ProcFS.path(of: own, entry)), "\(entry)")
            }
            #expect(try ProcFS.readLink(ProcFS.path(of: own, .executable)) == ProcFS.readLink("/proc/self/exe"))
            #expect(try ProcFS.readLink(ProcFS.path(of: own, .workingDirectory)) == FileManager.default.currentDirectoryPath)
            // A file mapping's map_files link names its file (the range in hex, as maps shows it).
            let mapping = try #require(try ProcFS.maps(own).first { $0.path.hasPrefix("/") && !$0.kernelPath.isDeleted })
            #expect(try ProcFS.readLink(ProcFS.path(of: own, .mappedFile(start: mapping.start, end: mapping.end))) == mapping.path)
            // A descriptor's link and its fdinfo.
            let file = try #require(FileHandle(forReadingAtPath: "/etc/hostname"))
            defer { try? file.close() }
            let number = file.fileDescriptor
            #expect(try ProcFS.readLink(ProcFS.path(of: own, .descriptor(number))) == "/etc/hostname")
            #expect(try ProcFS.readText(ProcFS.path(of: own, .descriptorInfo(number))).hasPrefix("pos:"))
            #expect(!ProcFS.exists(ProcFS.path(of: own, .descriptor(Int32.max))))
        }

        @Test func isKilledOrEndedTellsALiveProcessFromAKilledOne() throws {
            let own = ProcessID(rawValue: getpid())
            #expect(!ProcFS.isKilledOrEnded(own))
            #expect(try ProcFS.status(own)["State"]?.isEmpty == false)
            let child = try Spawn.program(path: "/bin/sleep", arguments: ["60"], environment: [],
                                          standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
            #expect(!ProcFS.isKilledOrEnded(child))
            Spawn.kill(child)
            // The kill is recorded at once (pending SIGKILL, or already a zombie), before anyone reaps it.
            #expect(ProcFS.isKilledOrEnded(child))
            _ = try Spawn.waitForExit(child)
            #expect(ProcFS.isKilledOrEnded(child))
        }

        @Test func taskStateFollowsAProcessFromRunningToStoppedToZombie() throws {
            #expect(ProcFS.state(ProcessID(rawValue: getpid()), thread: Spawn.currentThreadID()) == .running, "this thread reads its own state while it runs")
            let child = try Spawn.program(path: "/bin/sleep", arguments: ["60"], environment: [],
                                          standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
            defer { _ = Spawn.killAndReap(child) }
            #expect(pollUntil(timeout: .seconds(10)) { ProcFS.state(child) == .sleeping })
            Spawn.kill(child, signal: SIGSTOP)
            #expect(pollUntil(timeout: .seconds(10)) { ProcFS.state(child) == .stopped })
            #expect(ProcFS.state(child)?.isStoppedOrEnded == true)
            #expect(ProcFS.isAlive(child))
            Spawn.kill(child)
            #expect(pollUntil(timeout: .seconds(10)) { ProcFS.state(child) == .zombie })
            #expect(!ProcFS.isAlive(child))
            _ = try Spawn.waitForExit(child)
            #expect(ProcFS.state(child) == nil, "a reaped process has no state")
        }

        /// The pages pagemap shows present, against the kernel's own count of them in smaps: a 1 GiB
        /// reservation (four of presentPageAddresses' chunks) with 300 pages touched, and a static
        /// program's file mappings, whose text is all page cache and whose data (and RELRO) is partly written.
        @Test func presentPageAddressesCountsWhatSmapsCounts() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let program = try SpawnedProgram(try TestPaths.testProgram("sparse-static"),
                                             ["--reserve-gib", "1", "--pages", "300", "--steps", "1", "--rendezvous", "1"],
                                             standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err"))
            defer { program.kill() }
            let processID = program.processID
            try #require(pollUntil(timeout: .seconds(30)) { ProcFS.currentSyscall(processID, thread: processID) == SyscallNumber.rtSigtimedwait },
                         "sparse never reached its rendezvous")
            let maps = try ProcFS.maps(processID)
            let smaps = try ProcFS.readText("/proc/\(processID)/smaps")
            func smapsKilobytes(_ entry: MapsEntry, _ field: String) throws -> Int {
                // smaps prints addresses as %08lx.
                func hex(_ value: UInt64) -> String { let digits = String(value, radix: 16); return String(repeating: "0", count: max(0, 8 - digits.count)) + digits }
                let header = hex(entry.start) + "-" + hex(entry.end) + " "
                let block = try #require(smaps.components(separatedBy: "\n" + header).dropFirst().first ?? (smaps.hasPrefix(header) ? smaps : nil))
                let line = try #require(block.split(separator: "\n").first { $0.hasPrefix(field + ":") })
                return try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
            }
            let reservation = try #require(maps.max { $0.byteCount < $1.byteCount })
            #expect(reservation.byteCount == 1 << 30)
            let touched = try ProcFS.presentPageAddresses(processID, address: reservation.start, pageCount: Int(reservation.byteCount / 4096),
                                                          excludingFilePages: false)
            #expect(touched.count == 300)
            #expect(touched.count * 4 == (try smapsKilobytes(reservation, "Rss")) + (try smapsKilobytes(reservation, "Swap")))
            #expect(touched == touched.sorted() && Set(touched).count == touched.count)
            #expect(touched.allSatisfy { $0 >= reservation.start && $0 < reservation.end && $0 % 4096 == 0 })

            let fileMappings = maps.filter { $0.path.hasSuffix("/sparse-static") }
            #expect(fileMappings.count >= 2, "a static program maps its text and its data")
            for mapping in fileMappings {
                let pageCount = Int(mapping.byteCount / 4096)
                let present = try ProcFS.presentPageAddresses(processID, address: mapping.start, pageCount: pageCount, excludingFilePages: false)
                let written = try ProcFS.presentPageAddresses(processID, address: mapping.start, pageCount: pageCount, excludingFilePages: true)
                #expect(present.count * 4 == (try smapsKilobytes(mapping, "Rss")) + (try smapsKilobytes(mapping, "Swap")), "\(mapping.path) at \(String(mapping.start, radix: 16))")
                #expect(written.count * 4 == (try smapsKilobytes(mapping, "Anonymous")) + (try smapsKilobytes(mapping, "Swap")), "\(mapping.path) at \(String(mapping.start, radix: 16))")
                if mapping.executable { #expect(written.isEmpty, "text is never written") }
            }
        }
    }
}
