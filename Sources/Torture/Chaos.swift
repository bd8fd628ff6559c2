// Why this file exists: the deterministic driver explores interleavings of a model (one thread, model FAM,
// in-memory link); what the model leaves out (real threads racing on the lazy memory, a real TCP stream,
// a real FAM file, a target that runs while the fault handler installs) only the threaded driver meets.
// Chaos runs the same engine under the production driver with real ports, and perturbs it at the ports
// from a seed: delays and yields before actor steps, around sends and receives, around fences, before
// the target's wakes, and CPU placement of every actor thread and of the target. A seed names the plan
// of perturbations, not the interleaving: a chaos failure is replayed by seed as nearly as timing allows,
// and becomes a deterministic seed or a test before it is called fixed.
import Engine
import Foundation
import Logging
import Oracles
import Synchronization
import Sys

/// Seeded perturbations shared by every port of one chaos iteration (each draw under a lock: actors call
/// from their own threads).
final class Perturbation: Sendable {
    private let generator: Mutex<SeededGenerator>
    private let cpuCount: Int32

    init(seed: UInt64) {
        generator = Mutex(SeededGenerator(seed: seed ^ 0x4348_414F_5321))
        cpuCount = Int32(max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }

    /// Sometimes nothing, sometimes a yield, sometimes a sleep of up to `maximumMicroseconds`.
    func disturb(maximumMicroseconds: Int = 300) {
        let (kind, amount) = generator.withLock { ($0.below(8), $0.below(maximumMicroseconds + 1)) }
        switch kind {
        case 0...3: return
        case 4, 5: sched_yield()
        default: usleep(UInt32(amount))
        }
    }

    func cpu() -> Int32 { generator.withLock { Int32($0.below(Int(cpuCount))) } }
}

/// An engine actor whose steps are disturbed, on a thread placed on a seeded CPU.
final class ChaoticActor: EngineActor {
    private let inner: any EngineActor
    private let perturbation: Perturbation
    private var placed = false
    var name: String { inner.name }

    init(_ inner: any EngineActor, perturbation: Perturbation) {
        self.inner = inner
        self.perturbation = perturbation
    }

    func nextAction() -> NextAction { inner.nextAction() }

    func perform() throws(EngineError) {
        if !placed {
            Spawn.pin(cpu: perturbation.cpu())
            placed = true
        }
        perturbation.disturb()
        try inner.perform()
    }

    func abort(reason: String) { inner.abort(reason: reason) }
}

/// A transport whose sends and receives are disturbed.
final class ChaoticTransport: Transport, @unchecked Sendable {
    private let inner: any Transport
    private let perturbation: Perturbation
    init(_ inner: any Transport, perturbation: Perturbation) {
        self.inner = inner
        self.perturbation = perturbation
    }
    func send(_ message: Message) throws(TransportError) {
        perturbation.disturb(maximumMicroseconds: 200)
        try inner.send(message)
    }
    func receive() throws(TransportError) -> Message? {
        perturbation.disturb(maximumMicroseconds: 100)
        return try inner.receive()
    }
    func waitReadable(timeoutMilliseconds: Int32) -> Bool { inner.waitReadable(timeoutMilliseconds: timeoutMilliseconds) }
    var readableDescriptor: Int32? { inner.readableDescriptor }
    func close() { inner.close() }
    var bytesSent: Int { inner.bytesSent }
    var bytesReceived: Int { inner.bytesReceived }
}

/// A FAM whose flushes and fences are disturbed (what a reader on another node sees between them moves).
final class ChaoticFAM: ForwardingFAM, @unchecked Sendable {
    private let perturbation: Perturbation
    init(_ inner: any FAMBackend, perturbation: Perturbation) {
        self.perturbation = perturbation
        super.init(inner)
    }
    override func flush(at byteOffset: Int, count: Int) {
        inner.flush(at: byteOffset, count: count)
        perturbation.disturb(maximumMicroseconds: 50)
    }
    override func fence() {
        perturbation.disturb(maximumMicroseconds: 100)
        inner.fence()
    }
}

/// The production gate, disturbed: the target resumes and is woken at once, after a seeded pause, and
/// its threads are placed on a seeded CPU. It also releases the test program from its rendezvous.
final class ChaoticGate: TargetGate, @unchecked Sendable {
    private let perturbation: Perturbation
    private let releaseSignal: Int32
    init(perturbation: Perturbation, releaseSignal: Int32) {
        self.perturbation = perturbation
        self.releaseSignal = releaseSignal
    }
    func resume(processID: ProcessID, _ start: @escaping () throws(RestoreError) -> Void) throws(RestoreError) {
        for thread in (try? ProcFS.threadIDs(processID)) ?? [] { Spawn.pin(threadID: thread, cpu: perturbation.cpu()) }
        perturbation.disturb()
        try start()
        Spawn.kill(processID, signal: releaseSignal)
    }
    func wake(processID: ProcessID, address: UInt64, byteCount: Int, _ wake: @escaping () throws(SyscallError) -> Void) throws(SyscallError) {
        perturbation.disturb(maximumMicroseconds: 100)
        try wake()
    }
    func released(processID: ProcessID) {}
    func memoryEventRead(processID: ProcessID) { perturbation.disturb(maximumMicroseconds: 100) }
}
