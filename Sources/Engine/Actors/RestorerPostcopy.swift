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

    /// Pages of registered memory that are present before any install: a read of the process's command
    /// line or environment (/proc/PID/cmdline, as ps does, by anyone) between the mmap of the stack and
    /// its registration faults the argument page in as the kernel's zero page. UFFDIO_COPY then fails
    /// with EEXIST, which the installers take for "another installer put the dumped page there", and the
    /// process would run on a zeroed top stack page (a `ret` to 0). Once registered, no reader can fault a
    /// page in any more (the kernel refuses remote faults it cannot hand to the userfaultfd), so one look
    /// right after the layout finds every such page; each is then written over with its dumped bytes
    /// before the resume, as a page outside registered memory is.
    func checkStrayPages(_ memory: LazyMemory) throws {
        strayPagesChecked = true
        for address in try target!.pagesPresentInPrivateRegisteredMemory() {
            guard let slot = memory.slot(for: address), !memory.isInstalled(slot) else { continue }
            logger.info("a registered page was present before its install; it is written with its dumped bytes", metadata: ["address": "\(hex(address))"])
            strayPageSlots.insert(slot)
            eagerSlotsLeft.insert(slot)
        }
    }
}
