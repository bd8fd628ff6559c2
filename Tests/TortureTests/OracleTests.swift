// The oracles' own judgement on known cases: what they must accept, and what they must reject.
import Testing
@testable import Oracles

@Suite struct XStateComparisonTests {
    /// 2432 bytes of XSAVE standard format with a recognisable pattern and XSTATE_BV = x87|SSE|AVX.
    static func xsave() -> [UInt8] {
        var bytes = (0..<2432).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        for index in 512..<520 { bytes[index] = 0 }
        bytes[512] = 0b111
        return bytes
    }

    @Test func onlyTheInUseBitsDifferIsTheSameState() {
        // Regression (gate seed 0x12c074e0fd40a7d9 under load): the CPU's init optimisation cleared the
        // AVX bit between freeze and read-back; the registers were the same.
        var restored = Self.xsave()
        restored[512] = 0b011
        #expect(StateOracle.firstXStateDifference(Self.xsave(), restored) == nil)
    }

    @Test func aRegisterThatDiffersIsCaught() {
        var restored = Self.xsave()
        restored[160] ^= 1        // XMM0's first byte
        #expect(StateOracle.firstXStateDifference(Self.xsave(), restored) == 160)
        var upper = Self.xsave()
        upper[576] ^= 0x80        // YMM0's upper half, in the AVX component
        #expect(StateOracle.firstXStateDifference(Self.xsave(), upper) == 576)
        #expect(StateOracle.firstXStateDifference(Self.xsave(), Array(Self.xsave().prefix(1024))) == 1024)
    }
}
