// Address arithmetic shared by the dumper and the restorer.

enum AddressSpace {
    /// The lowest user address mmap may use here, and the top of user space (47-bit).
    static let lowestAddress: UInt64 = 0x10000
    static let userSpaceEnd: UInt64 = 0x7fff_ffff_f000

    /// A free, page-aligned range of `byteCount` bytes with a free page on both sides (so the kernel
    /// never merges it with a neighbour), avoiding every range given. Searches from high addresses down,
    /// below the usual mmap area.
    static func freeRange(byteCount: UInt64, avoiding ranges: [(UInt64, UInt64)]) -> UInt64? {
        let guardBytes: UInt64 = .pageSize
        let taken = ranges.filter { $0.0 < userSpaceEnd }.sorted { $0.0 < $1.0 }
        // Try a fixed, memorable area first (easy to spot in maps), then any gap.
        let preferred: UInt64 = 0x5f0_0000_0000
        if taken.allSatisfy({ $0.1 + guardBytes <= preferred || $0.0 >= preferred + byteCount + guardBytes }) {
            return preferred
        }
        var cursor = lowestAddress + 0x1000_0000
        for range in taken {
            if range.0 > cursor + guardBytes && range.0 - cursor - guardBytes >= byteCount + guardBytes {
                return cursor + guardBytes
            }
            cursor = max(cursor, range.1)
        }
        if userSpaceEnd > cursor + 2 * guardBytes + byteCount { return cursor + guardBytes }
        return nil
    }
}

/// The slot of `address` in a strictly increasing page table (binary search), or nil: the one slot
/// lookup every node uses.
func slotIndex(of address: UInt64, in pageAddresses: [UInt64]) -> Int? {
    let low = firstSlot(notBelow: address, in: pageAddresses)
    return low < pageAddresses.count && pageAddresses[low] == address ? low : nil
}

/// Binary search: the index of the first address >= `address` in sorted `pageAddresses`.
func firstSlot(notBelow address: UInt64, in pageAddresses: [UInt64]) -> Int {
    var low = 0, high = pageAddresses.count
    while low < high {
        let middle = (low + high) / 2
        if pageAddresses[middle] < address { low = middle + 1 } else { high = middle }
    }
    return low
}
