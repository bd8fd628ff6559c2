// Why this file exists: images are authenticated in torture too (the same engine code, never an
// "unauthenticated because tortured" path), and a key that came from the system's randomness would make
// two runs of one seed differ. So each iteration's key is derived from its seed, by a generator of its
// own (the scenario's generator is not advanced: traces stay what they were), and lives only in the
// dumper and the restorer, never in the model FAM.
import Engine

extension MigrationKey {
    /// The iteration's migration key, a function of its seed alone.
    static func forIteration(seed: UInt64) -> MigrationKey {
        var generator = SeededGenerator(seed: SeededGenerator.mix(seed ^ 0x6B65_795F_666F_725F))  // "key_for_"
        var bytes: [UInt8] = []
        while bytes.count < MigrationKey.byteCount {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        do { return try MigrationKey(bytes: Array(bytes.prefix(MigrationKey.byteCount))) } catch {
            preconditionFailure("a key of \(MigrationKey.byteCount) bytes was refused: \(error)")
        }
    }
}
