// Why this file exists: fuzzing must be a CI gate, so it must be deterministic: a fixed number of inputs,
// each one a function of (seed, target, index) alone, so any input the gate ran can be made again by
// number (`fuzz --target T --seed S --input I`) without replaying the ones before it. The mutations are
// the ones that break hand-written decoders: flipped bits, counts and lengths set to edge values, cuts,
// garbage appended, chunks repeated or moved, and splices of two corpus entries.

import Engine

/// splitmix64: small, fast, and the same sequence on every machine.
public struct FuzzRandom: Sendable {
    public private(set) var state: UInt64

    public init(seed: UInt64) { state = seed }

    /// The generator for one input: independent of every other index.
    public init(seed: UInt64, target: String, index: Int) {
        var mixed = seed ^ 0x6675_7A7A_5EED_0000
        for byte in target.utf8 { mixed = (mixed ^ UInt64(byte)) &* 0x100_0000_01B3 }
        state = mixed ^ (UInt64(truncatingIfNeeded: index) &* 0x9E37_79B9_7F4A_7C15)
        _ = next()
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }

    /// A value in 0..<bound (0 when bound is 0).
    public mutating func below(_ bound: Int) -> Int { bound <= 0 ? 0 : Int(next() % UInt64(bound)) }

    public mutating func chance(_ numerator: Int, in denominator: Int) -> Bool { below(denominator) < numerator }
}

/// Applies seeded mutations to byte strings, optionally only inside given byte ranges.
public struct FuzzMutator: Sendable {
    /// The u32/u64 values that break naive length and count handling.
    static let edgeWords: [UInt64] = [0, 1, 2, 3, 7, 8, 15, 16, 31, 32, 64, 127, 128, 255, 256, .pageSize - 1, .pageSize, .pageSize + 1, 65535, 65536,
                                      0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF0, 0xFFFF_FFFF, 0x1_0000_0000,
                                      0x7FFF_FFFF_FFFF_F000, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_F000, UInt64.max]

    public init() {}

    /// `bytes` after 1 to 8 mutations; `other` is a second corpus entry to splice from. With
    /// `keepingLength`, only in-place mutations (flip, word, copy) are used, within `ranges` when given.
    public func mutated(_ bytes: [UInt8], other: [UInt8], random: inout FuzzRandom, keepingLength: Bool = false,
                        ranges: [Range<Int>] = []) -> [UInt8] {
        var result = bytes
        let mutationCount = 1 + random.below(random.chance(1, in: 4) ? 8 : 2)
        for _ in 0..<mutationCount {
            let place = { (random: inout FuzzRandom, count: Int, width: Int) -> Int? in
                let candidates = ranges.isEmpty ? [0..<count] : ranges.filter { $0.count >= width && $0.upperBound <= count }
                guard !candidates.isEmpty, count >= width else { return nil }
                let range = candidates[random.below(candidates.count)]
                return range.lowerBound + random.below(range.count - width + 1)
            }
            let choice = keepingLength ? random.below(4) : random.below(9)
            switch choice {
            case 0:
                if let offset = place(&random, result.count, 1) { result[offset] ^= UInt8(1) << UInt8(random.below(8)) }
            case 1:
                if let offset = place(&random, result.count, 1) { result[offset] = UInt8(truncatingIfNeeded: random.next() | 1) ^ result[offset] }
            case 2:
                // A count or length word, at any offset (decoders meet words unaligned too).
                let width = random.chance(1, in: 2) ? 4 : 8
                if let offset = place(&random, result.count, width) {
                    var word = Self.edgeWords[random.below(Self.edgeWords.count)]
                    if random.chance(1, in: 4) { word = word &+ UInt64(random.below(5)) &- 2 }
                    for index in 0..<width { result[offset + index] = UInt8(truncatingIfNeeded: word >> (8 * UInt64(index))) }
                }
            case 3:
                // A chunk copied over another place of the same input (a page table entry repeated, a
                // region offset copied into another field).
                let width = 1 + random.below(16)
                if let target = place(&random, result.count, width), result.count >= width {
                    let sourceOffset = random.below(result.count - width + 1)
                    let chunk = Array(result[sourceOffset..<(sourceOffset + width)])
                    result.replaceSubrange(target..<(target + width), with: chunk)
                }
            case 4:
                result.removeLast(random.below(min(result.count, 64) + 1))
            case 5:
                result.append(contentsOf: (0..<random.below(32)).map { _ in UInt8(truncatingIfNeeded: random.next()) })
            case 6:
                // Bytes inserted or deleted in the middle: every later field shifts.
                let offset = random.below(result.count + 1)
                if random.chance(1, in: 2) {
                    result.insert(contentsOf: (0..<(1 + random.below(8))).map { _ in UInt8(truncatingIfNeeded: random.next()) }, at: offset)
                } else if offset < result.count {
                    result.removeSubrange(offset..<min(result.count, offset + 1 + random.below(8)))
                }
            case 7:
                // Splice: a prefix of this input, the rest from another entry.
                if !other.isEmpty {
                    let cut = random.below(result.count + 1), otherCut = random.below(other.count + 1)
                    result = Array(result[..<cut]) + Array(other[otherCut...])
                }
            default:
                let offset = random.below(result.count + 1)
                result = Array(result[..<offset])
            }
        }
        return result
    }
}
