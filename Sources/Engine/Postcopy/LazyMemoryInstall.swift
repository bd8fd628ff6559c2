// Installing pages into the restored process (from FAM, from the socket, zeros) and waking the threads
// that wait for them, each page checked against its mark and digest first: LazyMemory's second half.
import Sys

extension LazyMemory {
    /// Installs `count` adjacent slots from FAM (the marks must be stored): one private copy checked
    /// against the marks, copied in, shown to the oracle, then whoever faulted on them woken. Returns
    /// how many were newly installed here.
    ///
    /// The copy is read and checked before the install lock is taken and outside the state lock (with
    /// the reader's page checker: the reader itself never leaves the state lock, see `pageChecker`), so
    /// a fault never waits behind another installer's page codes; inside the install lock only the run
    /// still missing is computed and installed from that copy, and it lies inside the checked range.
    @discardableResult
    func installFromFAM(slot: Int, count: Int) throws -> Int {
        let checker = pageChecker(observed: slot..<(slot + count))
        // Only the leading run still missing, adjacent and not being checked by another installer is
        // read and coded, claimed meanwhile (the install below may find it shorter, never longer). A
        // first page another installer is checking is read here too, alone: whoever faulted on it does
        // not wait for that installer's whole run.
        let claimedCount = claimMissingRun(slot: slot, count: count)
        defer { releaseClaims(slot..<(slot + claimedCount)) }
        let wanted = claimedCount > 0 ? claimedCount : missingRun(slot: slot, count: 1)
        // Installed already: once the install lock is free, whoever installed it has woken its waiters
        // (as when the run is found installed inside the lock below).
        guard wanted > 0 else { return installLock.withLock { 0 } }
        let checked = checker.load(slots: slot..<(slot + wanted))
        return try installLock.withLock { () throws -> Int in
            let run = missingRun(slot: slot, count: wanted)
            // A page of this copy that failed its check stops the migration even when another installer
            // put that page in first, from its own checked copy: the page changed in FAM after its seal
            // (which no honest source does), and a racing reader must not hide that.
            _ = try checked.prefix(wanted)
            guard run > 0 else { return 0 }
            // Invariant 4 on this path too: every page against its mark's digest before it goes in, and
            // what goes in is the copy that was checked (a page changed in FAM between a check there and
            // a copy from there would go in unchecked). A page changed in FAM after its seal stops the
            // migration (the target is killed) rather than running the program on it.
            let pages = try checked.prefix(run)
            let address = currentAddress(slot)
            let copied = try copyAll(slot: slot, address: address, byteCount: pages.count) { offset, remaining throws -> CopyOutcome in
                try userfaultfd.copy(bytes: pages, offset: offset, byteCount: remaining, to: address + UInt64(offset), dontWake: true)
            }
            try finishInstall(slot: slot, count: run, copied: copied) { offset in
                Array(pages[(offset * .pageSize)..<((offset + 1) * .pageSize)])
            }
            return copied.newly.count
        }
    }

    /// A checker for pages whose marks were seen here (a precondition), taken under the state lock: the
    /// reader is never copied out of it (a copy alive while another thread records a mark under the lock
    /// makes that store copy the reader's whole observed-marks record, a Bool per page, on the fault path).
    func pageChecker(observed slots: Range<Int>) -> ImageReader.PageChecker {
        lock.withLock {
            guard reader != nil else { preconditionFailure("a page checker without an image") }
            return reader!.pageChecker(observed: slots)
        }
    }

    /// `missingRun`, without the slots another installer claimed, claimed for this one: it reads and
    /// codes them now. Claims last only while one `installFromFAM` runs.
    func claimMissingRun(slot: Int, count: Int) -> Int {
        lock.withLock {
            var run = 0
            while run < count, !installed[slot + run], !claimed[slot + run],
                  currentAddresses[slot + run] == currentAddresses[slot] + UInt64(run) * .pageSize {
                run += 1
            }
            for claim in slot..<(slot + run) { claimed[claim] = true }
            return run
        }
    }

    func releaseClaims(_ slots: Range<Int>) {
        guard !slots.isEmpty else { return }
        lock.withLock {
            for claim in slots {
                precondition(claimed[claim], "page slot \(claim) released but not claimed")
                claimed[claim] = false
            }
        }
    }

    /// How many slots from `slot` (at most `count`) are not installed and lie adjacent at their current
    /// addresses. Stands while the install lock is held; without it, a hint (installFromFAM's read).
    func missingRun(slot: Int, count: Int) -> Int {
        lock.withLock {
            var run = 0
            while run < count, !installed[slot + run],
                  currentAddresses[slot + run] == currentAddresses[slot] + UInt64(run) * .pageSize {
                run += 1
            }
            return run
        }
    }

    /// Installs pages that came over the socket (`bytes` covers whole pages from `address`).
    @discardableResult
    func installBytes(address: UInt64, bytes: [UInt8]) throws -> Int {
        guard let slot = frozenSlot(for: address) else { throw EngineError.aborted("the source sent page \(hex(address)), which is not in the page table") }
        let count = bytes.count / .pageSize
        guard slot + count <= pageAddresses.count,
              pageAddresses[slot + count - 1] == address + UInt64(count - 1) * .pageSize else {
            throw EngineError.aborted("the source sent \(count) pages at \(hex(address)) that are not adjacent dumped pages")
        }
        return try installLock.withLock { () throws -> Int in
            var total = 0
            var index = 0
            while index < count {
                let run = missingRun(slot: slot + index, count: count - index)
                guard run > 0 else { index += 1; continue }
                let destination = currentAddress(slot + index)
                // Whole messages (the usual case) go to the kernel without another copy.
                let chunk = index == 0 && run == count ? bytes : Array(bytes[(index * .pageSize)..<((index + run) * .pageSize)])
                let copied = try copyAll(slot: slot + index, address: destination, byteCount: chunk.count) { offset, remaining throws -> CopyOutcome in
                    let piece = offset == 0 && remaining == chunk.count ? chunk : Array(chunk[offset..<(offset + remaining)])
                    return try userfaultfd.copy(bytes: piece, to: destination + UInt64(offset), dontWake: true)
                }
                try finishInstall(slot: slot + index, count: run, copied: copied) { offset in
                    Array(chunk[(offset * .pageSize)..<((offset + 1) * .pageSize)])
                }
                total += copied.newly.count
                index += run
            }
            return total
        }
    }

    /// The slot of a page by the address it had at the freeze (the source's numbering).
    func frozenSlot(for address: UInt64) -> Int? { slotIndex(of: address, in: pageAddresses) }

    /// `count` pages from `slot` as one private copy checked against their marks' digests (their marks
    /// must have been seen here first): the copy to install, for an installer that does not use the
    /// userfaultfd (pwrite of a private file page).
    func verifiedPages(slot: Int, count: Int) throws(ImageError) -> [UInt8] {
        try pageChecker(observed: slot..<(slot + count)).load(slots: slot..<(slot + count)).prefix(count)
    }

    /// A page outside registered memory was written another way (pwrite of a private file page).
    func noteInstalledElsewhere(slot: Int) {
        lock.withLock {
            if !installed[slot] { installed[slot] = true; installedPageCount += 1 }
        }
    }

    /// Kills the target: a migration that cannot complete must never leave it running on holes.
    func killTarget() {
        // A tree's members first (the root's death would let them run on, orphaned, on holes).
        for processID in processIDsByOrdinal.reversed().compactMap({ $0 }) { Spawn.kill(processID) }
    }

    /// A never-touched anonymous page: zeros, then wake.
    func installZeroPage(address: UInt64) throws {
        try installLock.withLock { () throws in
            try zeroFill(address: address)
            try wake(address: address)
        }
    }

    /// UFFDIO_ZEROPAGE that waits out a mapping change in progress (EAGAIN: its event is applied first);
    /// a page present already (EEXIST) or no longer registered (ENOENT) needs nothing. Install lock held.
    func zeroFill(address: UInt64) throws {
        for _ in 0..<10_000 {
            let failure: SyscallError
            do {
                _ = try userfaultfd.zeroPage(at: address, dontWake: true)
                return
            } catch { failure = error }
            switch failure.errno {
            case .resourceTemporarilyUnavailable:
                try drainEvents()
                OSThread.sleep(for: .microseconds(20))
            case .noSuchFileOrDirectory:
                return
            default:
                throw failure
            }
        }
        throw EngineError.aborted("the target kept changing its mappings while page \(hex(address)) was zero-filled")
    }

    /// Wakes threads waiting on a page someone else installed (EEXIST still needs a wake).
    func wake(address: UInt64, byteCount: Int = .pageSize) throws {
        let userfaultfd = self.userfaultfd
        try gate.wake(processID: targetProcessID, address: address, byteCount: byteCount) { () throws(SyscallError) in
            try userfaultfd.wake(address: address, byteCount: byteCount)
        }
    }

    /// Runs a multi-page UFFDIO_COPY to the end: EAGAIN advances by what was copied, EEXIST skips one
    /// page (someone else installed it). Returns the page offsets (in pages) this call installed, and
    /// those it found present.
    func copyAll(slot: Int, address: UInt64, byteCount: Int,
                         _ copy: (Int, Int) throws -> CopyOutcome) throws -> (newly: [Int], present: [Int]) {
        var newly: [Int] = []
        var present: [Int] = []
        var done = 0
        // A run that crosses a mapping boundary (neighbours with other protections) fails as a whole
        // with ENOENT: from then on page by page.
        var pageByPage = false
        while done < byteCount {
            let outcome: CopyOutcome
            do { outcome = try copy(done, pageByPage ? .pageSize : byteCount - done) } catch let error as SyscallError
                where error.errno == .noSuchFileOrDirectory || error.errno == .resourceTemporarilyUnavailable {
                // The range was unmapped or moved away (ENOENT), or the process is changing its mappings
                // right now (EAGAIN, nothing copied): the event that says so is queued. Apply it (faults
                // read meanwhile wait their turn); if it moved the page, let the caller try again where
                // the page is now.
                try drainEvents()
                let page = slot + done / .pageSize
                if error.errno == .resourceTemporarilyUnavailable || currentAddress(page) != address + UInt64(done) { return (newly, present) }
                if !pageByPage {
                    pageByPage = true
                    continue
                }
                // This one page has no registered mapping and no event about it: the process replaced
                // the mapping (mmap over it); the dumped page has no place any more.
                discard(page)
                done += .pageSize
                continue
            }
            switch outcome {
            case .copied where pageByPage:
                newly.append(done / .pageSize)
                done += .pageSize
            case .copied:
                newly.append(contentsOf: (done / .pageSize)..<(byteCount / .pageSize))
                done = byteCount
            case .partial(let copiedByteCount):
                newly.append(contentsOf: (done / .pageSize)..<((done + copiedByteCount) / .pageSize))
                done += copiedByteCount
            case .firstPageAlreadyPresent:
                present.append(done / .pageSize)
                done += .pageSize
            }
        }
        return (newly, present)
    }

    /// `present`: pages another installer put there first (EEXIST). They count as installed: nobody of
    /// ours will ever copy them, and a slot left missing would be asked for forever. Whoever installed one
    /// showed it to the oracle (in shared memory: we did, through another mapping of the object).
    func finishInstall(slot: Int, count: Int, copied: (newly: [Int], present: [Int]), installedBytes: (Int) -> [UInt8]) throws {
        let newly = copied.newly
        lock.withLock {
            // Most installs find nothing present: no set to build then.
            let present = copied.present.isEmpty ? [] : Set(copied.present)
            for offset in newly + copied.present where !installed[slot + offset] {
                installed[slot + offset] = true
                installedPageCount += 1
                // currentAddresses directly: the lock is held here.
                if present.contains(offset), sharedRanges.contains(where: { $0.contains(currentAddresses[slot + offset]) }) {
                    aliasPageCount += 1
                }
            }
        }
        // The oracle judges each page copied against its digest from where it was at the freeze, before
        // the wake below lets a waiting thread on (see MigrationObserver for why it gets the bytes).
        for offset in newly {
            guard let observer else { break }
            try observer.pagesInstalled(processID: targetProcessID, address: pageAddresses[slot + offset],
                                        targetAddress: currentAddress(slot + offset), byteCount: .pageSize, installedBytes: installedBytes(offset))
        }
        // Wake explicitly: the copies used DONTWAKE; pages skipped for EEXIST may have waiters too.
        try wake(address: currentAddress(slot), byteCount: count * .pageSize)
    }
}
