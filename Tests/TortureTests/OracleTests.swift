// The oracles' own judgement on known cases: what they must accept, and what they must reject.
import Testing
@testable import Oracles
import Sys

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

@Suite struct RestartExpectationTests {
    func frozen(rax: Int64, origRax: Int64) -> GeneralRegisters {
        var registers = GeneralRegisters()
        registers.rip = 0x401000
        registers.rax = UInt64(bitPattern: rax)
        registers.origRax = UInt64(bitPattern: origRax)
        return registers
    }

    @Test(arguments: [-512, -513, -514, -516] as [Int64])
    func aRestartCodeReRunsTheCall(code: Int64) {
        let expected = StateOracle.expectedResumeRegisters(frozen(rax: code, origRax: 35))  // nanosleep
        #expect(expected.rip == 0x400ffe && expected.rax == 35)
    }

    @Test(arguments: [(-4, 35), (0, 35), (-512, -1), (7, -1)] as [(Int64, Int64)])
    func anythingElseResumesAsItWas(rax: Int64, origRax: Int64) {
        let expected = StateOracle.expectedResumeRegisters(frozen(rax: rax, origRax: origRax))
        #expect(expected.rip == 0x401000 && expected.rax == UInt64(bitPattern: rax))
    }
}
