// Where a mapping of an untrusted image may lie: the checks StateValidation and the decoder both apply
// to every VMA before the restorer maps anything.
import Sys

extension AddressSpace {
    /// `[vsyscall]`: the one mapping above user space, where the kernel puts it in every process.
    static let vsyscallRange: Range<UInt64> = 0xffff_ffff_ff60_0000..<0xffff_ffff_ff60_1000
}

extension Mapping {
    /// Why this cannot be a VMA of a user process, or nil: page-aligned, not empty, inside user space;
    /// `[vsyscall]` exactly where the kernel puts it. Decoding uses it too.
    var addressProblem: String? {
        guard start % .pageSize == 0, end % .pageSize == 0 else { return "is not page-aligned" }
        guard start < end else { return "does not end after it starts" }
        if kind == .vsyscall {
            let range = AddressSpace.vsyscallRange
            guard start == range.lowerBound, end == range.upperBound else {
                return "is [vsyscall] but not where the kernel puts it (\(hex(range.lowerBound))-\(hex(range.upperBound)))"
            }
            return nil
        }
        guard start >= AddressSpace.lowestAddress, end <= AddressSpace.userSpaceEnd else {
            return "lies outside user space (\(hex(AddressSpace.lowestAddress))-\(hex(AddressSpace.userSpaceEnd)))"
        }
        guard fileOffset % .pageSize == 0 else { return "has file offset \(hex(fileOffset)), which is not page-aligned" }
        return nil
    }
}
