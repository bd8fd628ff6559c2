// Why this file exists: two installers that meet on one page. The engine's own installers take turns
// under one lock, so under the deterministic driver a UFFDIO_COPY never finds a page already there, and
// the kernel's answers for that (EEXIST on the first page, a partial copy with EAGAIN on a later one)
// never come. The racing installer is a second installer behind the engine's back: between steps it
// copies the right bytes of a sealed, not yet installed page through the target's own userfaultfd,
// without waking anyone, and shows them to the oracle. The engine's next copy over it then really gets
// EEXIST or a partial copy, and a thread faulting there sleeps until the engine wakes it.
import Engine
import Sys

final class RacingInstaller: Participant {
    let actor = ActorName.racer
    let isEssential = false
    private let memory: () -> LazyMemory?
    private let model: () -> ModelFAM?
    private let observer: any MigrationObserver
    private var reader: ImageReader?
    /// Pages it copies at most: enough to meet the engine's runs several times, not so many that the
    /// engine finds nothing left to do.
    private var budget: Int

    /// The iteration's key, to open the image as the target does.
    private let key: MigrationKey

    init(memory: @escaping () -> LazyMemory?, model: @escaping () -> ModelFAM?, observer: any MigrationObserver, budget: Int,
         key: MigrationKey) {
        self.key = key
        self.memory = memory
        self.model = model
        self.observer = observer
        self.budget = budget
    }

    /// Sealed slots in registered memory that the engine has not installed.
    private func candidates(_ memory: LazyMemory) -> [Int] {
        guard let model = model(), !model.isReleased else { return [] }
        if reader == nil { reader = UncheckedFabricView.openImage(model: model, key: key) }
        guard var reader else { return [] }
        let slots = (0..<reader.pageCount).filter {
            !memory.isInstalled($0) && memory.isRegistered(memory.currentAddress($0)) && reader.isMarked(slot: $0)
        }
        self.reader = reader
        return slots
    }

    func availability() -> Availability {
        guard budget > 0, let memory = memory(), memory.isRunning, !memory.isComplete else {
            return budget > 0 ? .waiting(nil, "no target memory") : .finished
        }
        return candidates(memory).isEmpty ? .waiting(nil, "no sealed page left to race") : .choices(["install behind the engine"])
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        guard let memory = memory(), let reader else { preconditionFailure("racer stepped without target memory") }
        let slots = candidates(memory)
        guard !slots.isEmpty else { preconditionFailure("racer stepped with nothing to race") }
        let slot = slots[rng.below(slots.count)]
        budget -= 1
        // An honest installer, as the engine's are: one private copy, checked against the page's mark, is
        // what goes in (a page checked in FAM and then copied from FAM again could change in between); a
        // page that does not match its mark (the tamperer's) is left alone.
        let bytes: [UInt8]
        do { bytes = try reader.verifiedPages(slots: slot..<(slot + 1)) } catch {
            return "slot \(slot) (\(hex(reader.pageAddresses[slot]))): does not verify, left"
        }
        let address = memory.currentAddress(slot)
        let outcome: String
        do {
            switch try memory.userfaultfd.copy(bytes: bytes, to: address, dontWake: true) {
            case .copied, .partial:
                try observer.pagesInstalled(processID: memory.targetProcessID, address: reader.pageAddresses[slot], targetAddress: address,
                                            byteCount: bytes.count, installedBytes: bytes)
                outcome = "copied"
            case .firstPageAlreadyPresent:
                outcome = "already present"
            }
        } catch let error as SyscallError {
            // The process is changing its mappings (an event not read yet), or the page's range is gone.
            outcome = "\(error.errno)"
        }
        return "slot \(slot) (\(hex(reader.pageAddresses[slot]))): \(outcome)"
    }

    func abort(reason: String) { budget = 0 }
}
