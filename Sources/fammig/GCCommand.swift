// `fammig gc`: removes what killed fammig processes left (Leftovers.swift says how they are found and
// why nothing a live fammig uses is ever touched), and with --pool, the pool extents of dead owners.
import ArgumentParser
import Engine
import Foundation
import Sys

struct GC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Remove what killed fammig processes left: programs a killed run started, FAM files, work directories, node namespaces.",
        discussion: """
            A leftover is removed only when its owner (the fammig whose PID its name carries) is gone: \
            nobody holds that owner's lock in \(Leftovers.ownerDirectory). A live fammig's files are never \
            touched. Exit 0 when everything found was removed, 1 when something could not be.
            """)

    @Flag(help: "List what would be removed, remove nothing.")
    var dryRun = false

    @Option(help: "Also reclaim the extents of this FAM pool whose owners are gone (as fammig pool gc).")
    var pool: String?

    func run() throws {
        let leftovers = Leftovers.find()
        var failures = 0
        for leftover in leftovers {
            if dryRun {
                print("would remove \(leftover)")
                continue
            }
            if let problem = Leftovers.remove(leftover) {
                FileHandle.standardError.write(Data("fammig gc: cannot remove \(leftover): \(problem)\n".utf8))
                failures += 1
            } else {
                print("removed \(leftover)")
            }
        }
        if let pool, !dryRun {
            let opened = try PoolFile.open(path: pool, prefault: false)
            do {
                let reclaimed = try opened.collectGarbage()
                print("reclaimed \(reclaimed.count) pool extents of gone owners (\(reclaimed.reduce(0) { $0 + $1.byteCount } >> 20) MiB)")
            } catch { throw fail("cannot collect the pool \(pool): \(error)", code: 2) }
        }
        if leftovers.isEmpty { print("nothing left by killed fammig processes") }
        if failures > 0 { throw ExitCode(1) }
    }
}
