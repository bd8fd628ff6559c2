// The production driver: each actor on its own OS thread (ptrace answers only the thread that attached),
// blocking or sleeping on what the actor says it waits for. The first failure aborts every actor, each on
// its own thread.
import Logging
import Synchronization
import Sys

/// The monotonic clock of a real run.
public struct MonotonicClock: EngineClock {
    private let origin: ContinuousClock.Instant
    public init() { origin = ContinuousClock.now }
    public func now() -> Duration { ContinuousClock.now - origin }
}

public final class ThreadedDriver: Sendable {
    private let logger: Logger
    private let deadline: Duration

    /// `deadline` bounds the whole run. No actor thread is pinned for the whole run: what a thread makes
    /// (the restored process, a nonlive install's checking thread) inherits its mask, so an actor pins
    /// itself only around its ptrace round trips (TracerPin) and lets go before it makes anything.
    public init(logger: Logger, deadline: Duration = .seconds(300)) {
        self.logger = logger
        self.deadline = deadline
    }

    private struct Shared {
        var firstError: EngineError?
        var finishedCount = 0
    }

    /// Runs the actors to completion; throws the first error any of them threw. Returns only once every
    /// actor's thread has returned and let go of its actor, so nothing an actor owns outlives the run.
    public func run(_ actors: [any EngineActor]) throws(EngineError) {
        let shared = Mutex(Shared())
        let clock = ContinuousClock()
        let start = clock.now
        var threads: [OSThread] = []
        for actor in actors {
            let box = UncheckedBox(actor)
            let logger = self.logger
            let deadline = self.deadline
            do {
                threads.append(try OSThread(name: "fammig-\(actor.name)") {
                    Self.drive(box.value, shared: shared, clock: clock, start: start, deadline: deadline, logger: logger)
                    shared.withLock { $0.finishedCount += 1 }
                })
            } catch {
                // The actors already started see the error and abort; the rest never ran.
                shared.withLock { if $0.firstError == nil { $0.firstError = .aborted("starting a thread: \(error)") } }
                for unstarted in actors[threads.count...] { unstarted.abort(reason: "\(error)") }
                break
            }
        }
        for thread in threads { thread.join() }
        if let error = shared.withLock({ $0.firstError }) { throw error }
    }

    /// One actor's thread: steps it, or waits as it says, until it finishes or fails, or another actor failed.
    private static func drive(_ actor: any EngineActor, shared: borrowing Mutex<Shared>, clock: ContinuousClock, start: ContinuousClock.Instant,
                              deadline: Duration, logger: Logger) {
        // Ends when the actor finishes or fails, or once any actor failed or the deadline passed.
        while true {
            if let error = shared.withLock({ $0.firstError }) {
                actor.abort(reason: "\(error)")
                return
            }
            if clock.now - start > deadline {
                shared.withLock { if $0.firstError == nil { $0.firstError = .timedOut("\(actor.name) after \(deadline)") } }
                continue
            }
            switch actor.nextAction() {
            case .finished:
                return
            case .waiting(.retryAfter(let duration)):
                OSThread.sleep(for: duration)
            case .waiting(.readable(let descriptors, let timeout)):
                Spawn.waitReadable(descriptors, timeoutMilliseconds: Int32(max(1, nanoseconds(timeout) / 1_000_000)))
            case .waiting(.peer):
                OSThread.sleep(for: .microseconds(100))
            case .ready(let step):
                let stepStart = clock.now
                defer {
                    logger.debug("step", metadata: ["actor": "\(actor.name)", "step": "\(step)",
                                                    "microseconds": "\((clock.now - stepStart).components.attoseconds / 1_000_000_000_000)"])
                }
                do {
                    try actor.perform()
                } catch {
                    shared.withLock { if $0.firstError == nil { $0.firstError = error } }
                    actor.abort(reason: "\(error)")
                    return
                }
            }
        }
    }
}

/// Hands a non-Sendable actor to the one thread that will own it from then on.
private final class UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
