// The production driver: each actor on its own OS thread (ptrace answers only the thread that attached),
// blocking or sleeping on what the actor says it waits for. The first failure aborts every actor, each on
// its own thread.
import Foundation
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
    private let pinToCPU: Int32?

    /// `deadline` bounds the whole run; `pinToCPU` pins every actor thread to one CPU (ptrace wake-ups
    /// across CPUs are slow in these VMs).
    public init(logger: Logger, deadline: Duration = .seconds(300), pinToCPU: Int32? = nil) {
        self.logger = logger
        self.deadline = deadline
        self.pinToCPU = pinToCPU
    }

    private struct Shared {
        var firstError: EngineError?
        var finishedCount = 0
    }

    /// Runs the actors to completion; throws the first error any of them threw.
    public func run(_ actors: [any EngineActor]) throws(EngineError) {
        let shared = Mutex(Shared())
        let done = DispatchSemaphore(value: 0)
        let clock = ContinuousClock()
        let start = clock.now
        for actor in actors {
            let box = UncheckedBox(actor)
            let logger = self.logger
            let deadline = self.deadline
            let pin = self.pinToCPU
            let thread = Thread {
                if let pin { Spawn.pin(cpu: pin) }
                let actor = box.value
                // Ends when the actor finishes or fails, or once any actor failed or the deadline passed.
                while true {
                    if let error = shared.withLock({ $0.firstError }) {
                        actor.abort(reason: "\(error)")
                        break
                    }
                    if clock.now - start > deadline {
                        shared.withLock { if $0.firstError == nil { $0.firstError = .timedOut("\(actor.name) after \(deadline)") } }
                        continue
                    }
                    switch actor.nextAction() {
                    case .finished:
                        break
                    case .waiting(.retryAfter(let duration)):
                        Thread.sleep(forTimeInterval: Double(duration.components.attoseconds) / 1e18 + Double(duration.components.seconds))
                        continue
                    case .waiting(.readable(let descriptors, let timeout)):
                        Spawn.waitReadable(descriptors, timeoutMilliseconds: Int32(max(1, nanoseconds(timeout) / 1_000_000)))
                        continue
                    case .waiting(.peer):
                        Thread.sleep(forTimeInterval: 0.0001)
                        continue
                    case .ready(let step):
                        let stepStart = clock.now
                        defer {
                            logger.debug("step", metadata: ["actor": "\(actor.name)", "step": "\(step)",
                                                            "microseconds": "\((clock.now - stepStart).components.attoseconds / 1_000_000_000_000)"])
                        }
                        do {
                            try actor.perform()
                        } catch {
                            let engineError = (error as? EngineError) ?? .aborted("\(error)")
                            shared.withLock { if $0.firstError == nil { $0.firstError = engineError } }
                            actor.abort(reason: "\(error)")
                            break
                        }
                        continue
                    }
                    break
                }
                shared.withLock { $0.finishedCount += 1 }
                done.signal()
            }
            thread.name = "fammig-\(actor.name)"
            thread.stackSize = 8 << 20
            thread.start()
        }
        for _ in actors { done.wait() }
        if let error = shared.withLock({ $0.firstError }) { throw error }
    }
}

/// Hands a non-Sendable actor to the one thread that will own it from then on.
private final class UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
