// Issue 11, item 6: Debian's redis-server (persistence off) migrated for real while a client loads it
// over one TCP connection (TestPrograms/redisclient.c: it never reconnects, writes keys with known
// values, reads them back, and at the end checks DBSIZE and a full SCAN against its own record). The
// connection's peer is outside the victim, so the source holds its segments back (Sys/NetworkLock.swift)
// while it is away: the client only waits, it sees no reset. Ops per 250 ms before, during and after the
// migration are printed.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

struct RedisCase: Sendable, CustomTestStringConvertible {
    var mode: String
    var testDescription: String { "redis-server \(mode)" }
    static let all = ["nonlive", "postcopy-fam", "postcopy-socket"].map { RedisCase(mode: $0) }
}

/// A TCP port nothing listens on now (the kernel's pick for a socket bound to port 0, closed again).
func freeLoopbackPort() throws -> UInt16 {
    let listener = try TCPSocket.listen(host: "127.0.0.1", port: 0)
    defer { listener.close() }
    return listener.localPort
}

extension ProcessTests {
    @Suite(.serialized) struct RedisTests {
        static let server = "/usr/bin/redis-server"

        @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: server), "redis-server is not installed (apt-get install redis-server)"),
              arguments: RedisCase.all)
        func redisKeepsServingItsClientThroughMigration(_ migration: RedisCase) throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let port = try freeLoopbackPort()
            let serverArguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            leftovers.expectProgram([Self.server] + serverArguments)
            let client = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("redisclient"),
                                                          ["--port", "\(port)", "--seconds", "5", "--report-ms", "250", "--shutdown", "1"],
                                                          standardOutputPath: directory.path("client.out"), standardErrorPath: directory.path("client.err")))
            let outcome = try leftovers.fammig(["run", "--no-reference", "--mode", migration.mode, "--after-ms", "2000", "--",
                                                Self.server] + serverArguments, timeout: .seconds(90))
            let clientStatus = try client.waitForExit(timeout: .seconds(30))
            let clientOutput = (try? String(contentsOfFile: directory.path("client.out"), encoding: .utf8)) ?? ""
            print("redis \(migration.mode): \(outcome.standardOutput.split(separator: "\n").filter { $0.hasPrefix("downtime") || $0.hasPrefix("busy") }.joined(separator: ", "))")
            print("redis \(migration.mode) client ops per 250 ms: \(clientOutput.split(separator: "\n").filter { $0.hasPrefix("t_ms=") }.map { $0.split(separator: "=").last ?? "" }.joined(separator: " "))")
            #expect(outcome.exitStatus == 0, "exit \(outcome.exitStatus): \(outcome.standardError)\n\(outcome.standardOutput)")
            #expect(outcome.standardOutput.contains("oracle      registers and state: PASS"), "\(outcome.standardOutput)")
            #expect(outcome.standardOutput.contains("oracle      program: PASS (exited with status 0)"), "\(outcome.standardOutput)")
            // The same connection all along: the client never reconnects and checked every key.
            #expect(clientStatus == .exited(0), "\(clientOutput)")
            #expect(clientOutput.contains(" verified"), "\(clientOutput)")
            #expect(!clientOutput.contains("connection lost"), "\(clientOutput)")
            #expect(!NetworkLock.isLocked(port: port), "port \(port) is still locked on lo")
        }
    }
}
