// Issue 11, item 2: process trees migrate: every process with its PID and parent, threads in a
// child, a process-group leader, a session leader with a grandchild, two zombies (an exit status and a
// killing signal), shared anonymous memory, a pipe and a memfd inherited by the children (one object,
// one open file description), in all three modes (post-copy: one userfaultfd per process, served by the
// one fault handler and pusher); what a tree holds that does not migrate is refused before the freeze,
// every process left running.
import Foundation
import Glibc
import Testing
@testable import Engine
import Oracles
@testable import Sys

/// A running `tree` program, its tree frozen and captured, then let go on: a real tree's state.
private func capturedTree(_ program: SpawnedProgram) throws -> ProcessState {
    let tree = try FrozenTree.freeze(program.processID, allowingChildren: true)
    defer { tree.release(kill: false) }
    return try tree.capture()
}

private func startTree(_ directory: ScratchDirectory, leftovers: LeftoverCheck, rounds: Int = 400, pauseMicroseconds: Int = 20000,
                       extra: [String] = []) throws -> SpawnedProgram {
    let program = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("tree-static"),
                                                   ["--rounds", "\(rounds)", "--pause-us", "\(pauseMicroseconds)"] + extra,
                                                   standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
    let started = pollUntil(timeout: .seconds(5)) {
        ((try? String(contentsOfFile: directory.path("out"), encoding: .utf8)) ?? "").contains("round 1/")
    }
    #expect(started, "tree never reached its first round: \((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
    return program
}

extension ProcessTests {
    @Suite(.serialized) struct ProcessTreeTests {
        /// `fammig run --mode nonlive`: the migrated tree ends with the reference run's checksum (every
        /// worker answered every round from its own restored state, found its parent, group and session,
        /// read the pipe's buffered word, moved the memfd's one offset; the zombies were reaped with
        /// their statuses), and the state oracle compared every process of the tree. `--with dup`: B holds
        /// a dup of its inherited stdout (restored as a dup of the inherited description). `--with split`:
        /// the parent holds only the pipe's write end and A only its read end, a word buffered between
        /// them (one pipe, made in the parent and handed down to A). `--with pipeline`: B writes and the
        /// grandchild G reads a second pipe, which their common ancestor (the parent) made and holds no
        /// end of, handed down to G through C. `--with renumber`: A holds the pipe's read end at fd 7, the
        /// parent at fd 3 (one description at two numbers: A's is taken from the parent's and moved).
        @Test(arguments: [("tree-static", "none"), ("tree", "none"), ("tree-static", "dup"), ("tree-static", "split"), ("tree-static", "pipeline"),
                          ("tree-static", "renumber")])
        func treeMigratesNonlive(_ program: String, _ with: String) throws {
            try migrateProgram(program, arguments: ["--rounds", "60", "--pause-us", "10000", "--with", with],
                               runOptions: ["--mode", "nonlive", "--after-ms", "300"], timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
                #expect(report.verdicts.contains { $0.name == "registers and state" })
            }
        }

        /// `fammig run` in both post-copy modes, pushing or not: every process of the tree resumes at once
        /// and its pages come lazily through its own userfaultfd, all served by the one fault handler (and
        /// pusher). Each worker's answers come from its own restored memory (its stack and the shared
        /// area), so a page served to the wrong process, or not at all, fails the checksum; every page
        /// installed in any process is checked against its freeze digest, and the state oracle compares
        /// every process (lineage, zombies, inherited descriptors and shared memory found with kcmp).
        @Test(arguments: [("postcopy-fam", "on"), ("postcopy-fam", "off"), ("postcopy-socket", "on"), ("postcopy-socket", "off")])
        func treeMigratesPostcopy(_ mode: String, _ push: String) throws {
            try migrateProgram("tree-static", arguments: ["--rounds", "60", "--pause-us", "10000"],
                               runOptions: ["--mode", mode, "--push", push, "--after-ms", "300"], timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
                #expect(report.verdicts.contains { $0.name == "registers and state" })
                #expect(report.verdicts.contains { $0.name == "pages" && $0.passed })
            }
        }

        /// tree's parent reads a worker's answer word and then waits on it: the wait must compare the
        /// value it read, not read it again, or an answer that came in between is slept through for good
        /// (a gate run on a loaded machine saw tree never reach its rendezvous in 60 s). The stall makes
        /// that window wider than any answer takes: the run must still end, at once.
        @Test func treeNeverSleepsThroughAnAnswer() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("tree-static"),
                                                           ["--rounds", "5", "--pause-us", "0", "--answer-stall-us", "5000"],
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            let status = try program.waitForExit(timeout: .seconds(30))
            #expect(status == .exited(0), "\((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
        }

        /// Split pipes in both post-copy modes: A reads, through the pipe remade in its restored parent,
        /// the word the parent wrote before the freeze and each one it writes after the resume; G reads
        /// what B writes, through the pipeline remade in the parent.
        @Test(arguments: [("postcopy-fam", "on", "split"), ("postcopy-socket", "off", "split"), ("postcopy-fam", "off", "pipeline"),
                          ("postcopy-socket", "on", "pipeline"), ("postcopy-fam", "on", "renumber")])
        func splitPipeMigratesPostcopy(_ mode: String, _ push: String, _ with: String) throws {
            try migrateProgram("tree-static", arguments: ["--rounds", "60", "--pause-us", "10000", "--with", with],
                               runOptions: ["--mode", mode, "--push", push, "--after-ms", "300"], timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
                #expect(report.verdicts.contains { $0.name == "registers and state" && $0.passed })
            }
        }

        /// A split pipe is captured as one tree pipe: the parent's write end and A's read end, numbered 0,
        /// no inode kept, the buffered word on the read end; it encodes and decodes to itself and the
        /// image checks accept it, but not without its read end, nor with two read ends, nor in a process
        /// that is no tree's; and the state oracle sees a lost buffered byte.
        @Test func splitPipeIsCapturedAsOneTreePipe() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try startTree(directory, leftovers: leftovers, extra: ["--with", "split"])
            let state = try capturedTree(program)
            program.kill()
            func treePipeEnds(_ files: [OpenFile]) -> [TreePipeEnd] { files.compactMap { if case .treePipe(let end) = $0.kind { end } else { nil } } }
            let rootEnds = treePipeEnds(state.files)
            #expect(rootEnds.count == 1 && rootEnds.first.map { !$0.isReadEnd && $0.pipe == 0 && $0.inode == 0 && $0.buffered.isEmpty } == true, "\(rootEnds)")
            let readerIndex = try #require(state.members.firstIndex { if case .live(let member) = $0 { !treePipeEnds(member.files).isEmpty } else { false } })
            guard case .live(let reader) = state.members[readerIndex] else { Issue.record("no reader"); return }
            let readEnds = treePipeEnds(reader.files)
            #expect(readEnds.count == 1 && readEnds.first.map { $0.isReadEnd && $0.pipe == 0 && $0.inode == 0 && $0.buffered.count == 8 } == true, "\(readEnds)")
            #expect(try ProcessState.decode(state.encoded()) == state)
            try state.validate(pageAddresses: [], path: "test")

            func rejected(_ change: (inout ProcessState) -> Void) -> Bool {
                var hostile = state
                change(&hostile)
                do { try hostile.validate(pageAddresses: [], path: "test") } catch { return true }
                return false
            }
            #expect(rejected { state in
                guard case .live(var member) = state.members[readerIndex] else { return }
                member.files.removeAll { if case .treePipe = $0.kind { true } else { false } }
                state.members[readerIndex] = .live(member)
            }, "a pipe without its read end")
            #expect(rejected { state in
                state.files = state.files.map { file in
                    guard case .treePipe(var end) = file.kind else { return file }
                    var changed = file
                    end.isReadEnd = true
                    changed.kind = .treePipe(end)
                    return changed
                }
            }, "two read ends")
            #expect(rejected { state in
                state.members = []
                state.lineage = ProcessLineage()
            }, "a tree pipe end in a process alone")
            var restored = state
            guard case .live(var changed) = restored.members[readerIndex] else { return }
            changed.files = changed.files.map { file in
                guard case .treePipe(var end) = file.kind else { return file }
                var lost = file
                end.buffered.removeLast()
                lost.kind = .treePipe(end)
                return lost
            }
            restored.members[readerIndex] = .live(changed)
            #expect(StateOracle.compare(checkpointed: state, restored: restored).contains { $0.field.contains("fd") }, "a lost buffered byte")
        }

        /// A tree's userfaultfd speaks in tagged addresses: a fault or memory event read from the
        /// userfaultfd of ordinal N comes out tagged with N (every address of it, an mremap's both ends),
        /// and the root's (ordinal 0) exactly as the kernel gave it, so a single process is unchanged.
        @Test func treeUserfaultfdTagsMessagesWithTheirOrdinal() {
            let fault = PageFault(address: 0x7fff_ffff_d000, isWrite: true, threadID: ProcessID(rawValue: 7))
            #expect(TreeUserfaultfd.tagged(.fault(fault), ordinal: 0) == .fault(fault))
            var tagged = fault
            tagged.address = TreePageAddress.tagged(fault.address, ordinal: 3)
            #expect(TreeUserfaultfd.tagged(.fault(fault), ordinal: 3) == .fault(tagged))
            #expect(TreePageAddress.ordinal(of: tagged.address) == 3 && TreePageAddress.address(of: tagged.address) == fault.address)
            #expect(TreeUserfaultfd.tagged(.event(.remapped(from: 0x1000, to: 0x5000, length: 0x2000)), ordinal: 2)
                    == .event(.remapped(from: TreePageAddress.tagged(0x1000, ordinal: 2), to: TreePageAddress.tagged(0x5000, ordinal: 2), length: 0x2000)))
            #expect(TreeUserfaultfd.tagged(.event(.removed(start: 0x1000, end: 0x3000)), ordinal: 5)
                    == .event(.removed(start: TreePageAddress.tagged(0x1000, ordinal: 5), end: TreePageAddress.tagged(0x3000, ordinal: 5))))
            #expect(TreeUserfaultfd.tagged(.event(.unmapped(start: 0x1000, end: 0x3000)), ordinal: 1)
                    == .event(.unmapped(start: TreePageAddress.tagged(0x1000, ordinal: 1), end: TreePageAddress.tagged(0x3000, ordinal: 1))))
        }

        /// `checkpoint` then `restore` (the two nonlive commands): the restored tree runs to the same end.
        @Test func checkpointAndRestoreATree() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--rounds", "80", "--pause-us", "10000"]
            let reference = try runCommand(try TestPaths.testProgram("tree-static"), arguments)
            let expected = try #require(reference.standardOutput.split(separator: "\n").last.map(String.init))
            let program = try startTree(directory, leftovers: leftovers, rounds: 80, pauseMicroseconds: 10000)
            let members = try capturedTree(program).members.map(\.processID)
            #expect(members.count == 6, "\(members)")
            let famPath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            try requireVictimAlive(program.processID)
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(program.processID)", "--fam", famPath, "--key-file", keyPath)
            #expect(checkpoint.exitStatus == 0, "\(checkpoint.standardError)")
            #expect(try program.waitForExit(timeout: .seconds(10)) == .killed(signal: SIGKILL))
            for member in members { #expect(!ProcFS.isAlive(member), "pid \(member) outlived the checkpoint") }
            let restore = try leftovers.fammig("restore", "--fam", famPath, "--key-file", keyPath)
            #expect(restore.exitStatus == 0, "\(restore.standardError)")
            #expect(pollUntil(timeout: .seconds(30)) { lastChecksum(inFile: directory.path("out")).map { "checksum=" + $0 } == expected },
                    "restored tree: \((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
            #expect(pollUntil(timeout: .seconds(10)) { !ProcFS.isAlive(program.processID) && members.allSatisfy { !ProcFS.isAlive($0) } })
        }

        /// The captured tree: one record per process, parents first, the lineage /proc shows, what each
        /// child inherited; it encodes and decodes to itself, and the image checks accept it.
        @Test func capturedTreeHoldsEveryProcess() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try startTree(directory, leftovers: leftovers)
            let state = try capturedTree(program)
            #expect(state.members.count == 6)
            let zombies = state.members.compactMap { if case .zombie(let zombie) = $0 { zombie } else { nil } }
            #expect(zombies.map(\.waitStatus).sorted() == [Int32(SIGUSR1), 7 << 8])
            let live = state.liveMembers
            #expect(live.count == 4)
            #expect(live.first { $0.threads.count == 2 } != nil, "A's second thread")
            #expect(live.contains { $0.lineage.processGroupID == $0.processID && $0.lineage.sessionID != $0.processID }, "B leads its group")
            let sessionLeader = try #require(live.first { $0.lineage.sessionID == $0.processID })
            #expect(live.contains { $0.lineage.parentProcessID == sessionLeader.processID && $0.lineage.sessionID == sessionLeader.processID }, "G")
            for member in live {
                #expect(member.lineage.inheritedMappingStarts.count >= 1, "pid \(member.processID) shares the area")
                #expect(Set(member.lineage.inheritedDescriptors).isSuperset(of: [0, 1, 2]), "\(member.lineage.inheritedDescriptors)")
            }
            #expect(try ProcessState.decode(state.encoded()) == state)
            #expect(untouchedProblem(program.processID) == nil, "\(untouchedProblem(program.processID) ?? "")")
            program.kill()
        }

        /// The state oracle fails a lost child, a wrong process group, a lost session, a zombie's status
        /// and a description no longer shared.
        @Test func stateOracleCatchesTreeDifferences() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try startTree(directory, leftovers: leftovers)
            let state = try capturedTree(program)
            program.kill()
            // The state compared with itself differs only where the oracle expects a restart (threads
            // frozen in a system call): a change must add its own field to those.
            let baseline = Set(StateOracle.compare(checkpointed: state, restored: state).map(\.field))
            #expect(baseline.allSatisfy { $0.hasSuffix("register rax") || $0.hasSuffix("register rip") }, "\(baseline)")
            func mismatches(_ change: (inout ProcessState) -> Void) -> [String] {
                var restored = state
                change(&restored)
                return StateOracle.compare(checkpointed: state, restored: restored).map(\.field).filter { !baseline.contains($0) }
            }
            #expect(mismatches { $0.members.removeLast() }.contains("tree processes"))
            let leaderIndex = try #require(state.members.firstIndex { $0.lineage.sessionID == $0.processID })
            #expect(mismatches {
                guard case .live(var member) = $0.members[leaderIndex] else { return }
                member.lineage.processGroupID = $0.processID
                member.lineage.sessionID = $0.lineage.sessionID
                $0.members[leaderIndex] = .live(member)
            }.contains { $0.hasSuffix("process group") || $0.hasSuffix("session") })
            let zombieIndex = try #require(state.members.firstIndex { if case .zombie = $0 { true } else { false } })
            #expect(mismatches {
                guard case .zombie(var zombie) = $0.members[zombieIndex] else { return }
                zombie.waitStatus = 0
                $0.members[zombieIndex] = .zombie(zombie)
            }.contains { $0.hasSuffix("zombie wait status") })
            #expect(mismatches {
                guard case .live(var member) = $0.members.first(where: { if case .live = $0 { true } else { false } })! else { return }
                let index = $0.members.firstIndex { $0.processID == member.processID }!
                member.lineage.inheritedDescriptors.removeLast()
                $0.members[index] = .live(member)
            }.contains { $0.hasSuffix("inherited descriptors") })
        }

        /// An image's tree is untrusted: a member whose parent is not before it, a group led by no one,
        /// a wait status no process can end with, pages of a process the tree does not hold, and more
        /// members than the bound are refused before any process is made.
        @Test func hostileTreesAreRejected() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try startTree(directory, leftovers: leftovers)
            let state = try capturedTree(program)
            program.kill()
            func rejected(_ change: (inout ProcessState) -> Void, pages: [UInt64] = []) -> Bool {
                var hostile = state
                change(&hostile)
                do { try hostile.validate(pageAddresses: pages, path: "test") } catch { return true }
                return false
            }
            #expect(!rejected { _ in })
            #expect(rejected { $0.members.reverse() })
            #expect(rejected { state in
                guard case .zombie(var zombie) = state.members.first(where: { if case .zombie = $0 { true } else { false } })! else { return }
                let index = state.members.firstIndex { $0.processID == zombie.processID }!
                zombie.waitStatus = 0x137f
                state.members[index] = .zombie(zombie)
            })
            #expect(rejected { state in
                guard case .live(var member) = state.members.first(where: { if case .live = $0 { true } else { false } })! else { return }
                let index = state.members.firstIndex { $0.processID == member.processID }!
                member.lineage.processGroupID = ProcessID(rawValue: 999_999)
                state.members[index] = .live(member)
            })
            #expect(rejected({ _ in }, pages: [TreePageAddress.tagged(0x400000, ordinal: 7)]))
            #expect(rejected { state in
                guard case .live(var member) = state.members.first(where: { if case .live = $0 { true } else { false } })! else { return }
                let index = state.members.firstIndex { $0.processID == member.processID }!
                member.lineage.renumberedDescriptors = [RenumberedDescriptor(descriptor: 9, parentDescriptor: 999)]
                state.members[index] = .live(member)
            }, "a descriptor taken from one its parent does not hold")
            var renumbered = state
            if case .live(var member) = renumbered.members.first(where: { if case .live = $0 { true } else { false } })! {
                let index = renumbered.members.firstIndex { $0.processID == member.processID }!
                member.lineage.renumberedDescriptors = [RenumberedDescriptor(descriptor: 9, parentDescriptor: 1)]
                renumbered.members[index] = .live(member)
            }
            #expect(try ProcessState.decode(renumbered.encoded()) == renumbered, "a taken descriptor encodes and decodes")
            var crowded = state
            let zombie = crowded.members.first { if case .zombie = $0 { true } else { false } }!
            for index in 0..<TreeLimits.processCountMax {
                guard case .zombie(var copy) = zombie else { break }
                copy.processID = ProcessID(rawValue: 900_000 + Int32(index))
                crowded.members.append(.zombie(copy))
            }
            #expect(throws: ImageError.self) { try ProcessState.decode(crowded.encoded()) }
        }

        /// What a tree holds that its restore could not rebuild is refused before the freeze, with
        /// every process left running: a child in another PID namespace, a vfork in progress, a traced
        /// child. The program then runs to its own end.
        @Test(arguments: ["pidns", "vfork", "traced"]) func unsupportedTreeIsRefusedBeforeTheFreeze(_ what: String) throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try startTree(directory, leftovers: leftovers, rounds: 60,
                                        extra: what == "traced" ? [] : ["--with", what])
            var tracee: Tracee?
            if what == "traced" {
                let worker = try #require(try ProcFS.childProcessIDs(program.processID).last)
                tracee = try Tracee.seize(worker)
            }
            try requireVictimAlive(program.processID)
            let outcome = try leftovers.fammig("checkpoint", "--pid", "\(program.processID)", "--fam", directory.path("image.fam"),
                                               "--key-file", directory.path("migration.key"))
            if let tracee {
                try tracee.interrupt()
                _ = try tracee.waitForStop()
                try tracee.detach()
            }
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            let expected = ["pidns": "another PID namespace", "vfork": "shares its parent's address space", "traced": "is traced by pid"][what]!
            #expect(outcome.standardError.contains(expected), "\(outcome.standardError)")
            #expect(outcome.standardError.contains("left running untouched"), "\(outcome.standardError)")
            #expect(!FileManager.default.fileExists(atPath: directory.path("image.fam")))
            for process in [program.processID] + ((try? ProcFS.childProcessIDs(program.processID)) ?? []) {
                if (try? ProcessTreeFS.fields(process))?.isZombie == true { continue }
                #expect(untouchedProblem(process) == nil, "\(untouchedProblem(process) ?? "")")
            }
            let status = try program.waitForExit(timeout: .seconds(30))
            #expect(status == .exited(0), "\((try? String(contentsOfFile: directory.path("err"), encoding: .utf8)) ?? "")")
        }
    }
}
