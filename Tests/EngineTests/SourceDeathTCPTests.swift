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
