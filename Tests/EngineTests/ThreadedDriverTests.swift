// The production driver's own promises, on actors that need no process: it returns only once every
// actor's thread has let go of its actor, and the first failure ends every actor.
import Engine
import Logging
import Synchronization
import Sys
import Testing

/// Takes `steps` steps, or throws at step `failAt`.
final class CountingActor: EngineActor {
    let name: String
    private var left: Int
    private let failAt: Int?
    private(set) var aborted = false
    private var taken = 0
    init(name: String, steps: Int, failAt: Int? = nil) {
        self.name = name
        left = steps
        self.failAt = failAt
    }
    func nextAction() -> NextAction {
        if left == 0 { return .finished }
        return .ready(.pusher(.push))
    }
    func perform() throws(EngineError) {
        taken += 1
        left -= 1
        if taken == failAt { throw .aborted("step \(taken) of \(name) fails") }
    }
    func abort(reason: String) { aborted = true }
}

@Suite struct ThreadedDriverTests {
    /// Regression: chaos campaigns (`torture --chaos`, CI's last step) failed their no-harm check now and
    /// then with a watchdog child and its socket left behind: the driver returned when every thread had
    /// signalled, while a thread that had signalled still held its actor (so the restored process's
    /// memory, and the watchdog it owns, were released later, after the check).
    @Test func everyActorIsReleasedWhenRunReturns() throws {
        for round in 0..<200 {
            weak var released: CountingActor?
            try {
                let actors = (0..<4).map { CountingActor(name: "a\($0)", steps: 3 + $0) }
                released = actors[3]
                try ThreadedDriver(logger: Logger(label: "test")).run(actors)
            }()
            #expect(released == nil, "round \(round): an actor outlived ThreadedDriver.run")
            if released != nil { return }
        }
    }

    @Test func theFirstFailureEndsEveryActor() {
        let slow = CountingActor(name: "slow", steps: 1_000_000)
        let failing = CountingActor(name: "failing", steps: 100, failAt: 5)
        #expect(throws: EngineError.self) { try ThreadedDriver(logger: Logger(label: "test")).run([slow, failing]) }
        #expect(slow.aborted && failing.aborted)
    }
}
