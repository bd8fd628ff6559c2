// Issue 12: a source that dies after it read the victim's TCP sockets (a connection in repair mode, then
// disconnected, so that the target's socket can take its address pair on this node) and before the
// commit record leaves the victim running on with its connections live, not gone: its guard rebuilds
// each socket from the calls the tracer wrote down before it disconnected it (Sys/TCPSocketCalls.swift),
// after the target's copy let go of the addresses, and unlocks every port the tracer locked.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests.HandOverTests {
    /// Every point between the sockets' hand-over and the commit record (hand-over) at which `--die-at`
    /// can kill the source.
    static let tcpDeaths: [(Mode, String)] = Mode.allCases.flatMap { mode in ["frozen", "before-commit", "target-done"].map { (mode, $0) } }

    /// tcpsockets holds two listeners (IPv4, IPv6) and two connections (IPv4, IPv6; both ends its own,
    /// bytes queued both ways at the freeze); at its rendezvous it is migrated, and the source is killed
    /// at `moment`. The victim must run on untraced and, released, use every socket again: each round
    /// a client connects to each listener and bytes go both ways over each connection, checked byte by
    /// byte against the program's model, so a socket not given back (or given back wrong) fails it. Its
    /// checksum is the unmigrated run's. The target's copy is gone, and no guard or watchdog is left.
    @Test(arguments: tcpDeaths)
    func aSourceKilledAfterItTookTheSocketsLeavesTheVictimItsConnections(mode: Mode, moment: String) throws {
        let migration = try TwoNodes(mode: mode, sourceArguments: ["--die-at", moment], targetArguments: ["--stall-timeout", "5"],
                                     programName: "tcpsockets",
                                     arguments: ["--rounds", "30", "--pause-us", "2000", "--with", "listen4,listen6,conn4,conn6"])
        defer { migration.finish() }
        let what = "\(mode.rawValue), source killed at \(moment)"
        let sourceOutcome = try migration.source.waitForExit(timeout: .seconds(90))
        #expect(sourceOutcome.killedBySignal, "\(what): the source did not die: \(migration.sourceErrors)")
        let targetOutcome = try migration.target.waitForExit(timeout: .seconds(60))
        #expect(targetOutcome.exitStatus != 0, "\(what): the target finished without its source: \(migration.targetErrors)")
        #expect(pollUntil(timeout: .seconds(10)) { migration.restoredProcess() == nil }, "\(what): the restored copy runs beside the victim")
        try Self.expectVictimRunsOn(migration, what)
        #expect(!migration.sourceErrors.contains("could not give"), "\(what): \(migration.sourceErrors)")
        migration.expectNothingLeft(what)
    }
}

extension ProcessTests.RedisTests {
    /// A connection whose peer is outside the victim: redis-server's client (redisclient, which never
    /// reconnects and checks every key it wrote) keeps loading it while `fammig source` takes the
    /// connection (port locked on lo, socket read in repair mode and disconnected) and is killed right
    /// after (`--die-at frozen`). The guard gives the server its connection back and unlocks the port:
    /// the client's requests and the server's replies go on over the same connection, every key checks,
    /// and no lock or guard is left.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: server), "redis-server is not installed (apt-get install redis-server)"),
          arguments: ["postcopy-socket", "postcopy-fam"])
    func redisKeepsItsClientWhenItsSourceDiesHoldingTheConnection(_ mode: String) throws {
        let directory = try ScratchDirectory(under: "/dev/shm")
        defer { directory.remove() }
        let leftovers = LeftoverCheck()
        defer { leftovers.finish() }
        let port = try freeLoopbackPort()
        let serverArguments = ["--port", "\(port)", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        let server = leftovers.own(try SpawnedProgram(Self.server, serverArguments, standardOutputPath: directory.path("server.out"),
                                                      standardErrorPath: directory.path("server.err")))
        let client = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("redisclient"),
                                                      ["--port", "\(port)", "--seconds", "6", "--report-ms", "250", "--shutdown", "1"],
                                                      standardOutputPath: directory.path("client.out"), standardErrorPath: directory.path("client.err")))
        let clientOutput = { (try? String(contentsOfFile: directory.path("client.out"), encoding: .utf8)) ?? "" }
        try #require(pollUntil(timeout: .seconds(20)) { clientOutput().contains("t_ms=") }, "the client never loaded the server")
        let probe = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        let endpoint = "\(probe.endpoint)"
        probe.close()
        let keyPath = directory.path("migration.key")
        let famArguments = mode == "postcopy-fam" ? ["--fam", directory.path("image.fam")] : []
        let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                      ["source", "--pid", "\(server.processID)", "--mode", mode, "--key-file", keyPath,
                                                       "--listen", endpoint, "--die-at", "frozen"] + famArguments,
                                                      standardOutputPath: directory.path("source.out"), standardErrorPath: directory.path("source.err")))
        let sourceErrors = { (try? String(contentsOfFile: directory.path("source.err"), encoding: .utf8)) ?? "" }
        try #require(pollUntil(timeout: .seconds(30)) { sourceErrors().contains("listening on") } && waitForKeyFile(keyPath),
                     "the source never listened: \(sourceErrors())")
        let target = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                      ["target", "--mode", mode, "--key-file", keyPath, "--connect", endpoint] + famArguments,
                                                      standardOutputPath: directory.path("target.out"), standardErrorPath: directory.path("target.err")))
        #expect(try source.waitForExit(timeout: .seconds(60)).killedBySignal, "the source did not die at frozen: \(sourceErrors())")
        #expect(try target.waitForExit(timeout: .seconds(60)).exitStatus != 0, "the target finished without its source")
        let clientStatus = try client.waitForExit(timeout: .seconds(60))
        #expect(clientStatus == .exited(0), "\(clientOutput())")
        #expect(clientOutput().contains(" verified") && !clientOutput().contains("connection lost"), "\(clientOutput())")
        #expect(!sourceErrors().contains("could not give"), "\(sourceErrors())")
        #expect(!NetworkLock.isLocked(port: port), "port \(port) is still locked on lo")
        #expect(try server.waitForExit(timeout: .seconds(30)) == .exited(0), "the server did not end on its client's SHUTDOWN")
    }
}
