// Post-copy installs the restorer makes itself before the resume (pages the kernel touches, from FAM or
// from the socket): the Restorer's second half.
import Logging
import Synchronization
import Sys

extension Restorer {
    func installEager(slot: Int, memory: LazyMemory) throws {
        let address = pageAddresses[slot]
        if memory.isRegistered(address) && !strayPageSlots.contains(slot) {
            try memory.installFromFAM(slot: slot, count: 1)
        } else {
            precondition(memory.isDumped(slot), "page slot \(slot) read before its mark was seen")
            try memory.verifyPage(slot: slot)
            let location = memory.famLocation(slot: slot)
            try target!.writePages(from: location.mapping, at: location.offset, byteCount: .pageSize, to: address)
            try observer?.pagesInstalled(processID: target!.processID, address: address, targetAddress: address, byteCount: .pageSize, installedBytes: nil)
            memory.noteInstalledElsewhere(slot: slot)
        }
        eagerSlotsLeft.remove(slot)
    }

    /// Socket mode: any page that arrives before the resume goes in now, page by page into registered
    /// memory (UFFDIO_COPY) or not (pwrite), since one run of pages may span both.
    func installReceived(address: UInt64, bytes: [UInt8], memory: LazyMemory) throws {
        guard let first = memory.slot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), not in the page table") }
        for index in 0..<(bytes.count / .pageSize) {
            let pageAddress = address + UInt64(index) * .pageSize
            let page = Array(bytes[(index * .pageSize)..<((index + 1) * .pageSize)])
            guard memory.slot(for: pageAddress) == first + index else {
                throw EngineError.aborted("the source sent pages at \(hex(address)) that are not adjacent dumped pages")
            }
            if memory.isRegistered(pageAddress) && !strayPageSlots.contains(first + index) {
                try memory.installBytes(address: pageAddress, bytes: page)
            } else if !memory.isInstalled(first + index) {
                try target!.writeBytes(page, to: pageAddress)
                try observer?.pagesInstalled(processID: target!.processID, address: pageAddress, targetAddress: pageAddress, byteCount: .pageSize,
                                             installedBytes: nil)
                memory.noteInstalledElsewhere(slot: first + index)
            }
            eagerSlotsLeft.remove(first + index)
        }
    }
}
