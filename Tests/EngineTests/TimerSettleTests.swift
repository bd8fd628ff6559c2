// A periodic timerfd read in the instant between its expiry time and the kernel's handling of it (a late
// timer interrupt on a loaded machine) says "0 left", as a disarmed one does. Kept as read, the restore
// disarmed a running 2 ms timer ("no expiry of the 2 ms timer since round 19", DescriptorTests under
// load). The reader now reads such a timer again until the kernel caught up.
import Testing
import Sys
@testable import Engine

@Suite struct TimerSettleTests {
    private func settle(_ readings: [TimerSetting]) throws -> (TimerSetting, Int) {
        var next = readings.dropFirst().makeIterator()
        var waits = 0
        let setting = try TimerDescriptor.settledSetting(first: readings[0], wait: { waits += 1 }, read: { next.next() ?? readings.last! })
        return (setting, waits)
    }

    @Test func aPeriodicTimerDueNowIsReadAgainUntilItHasTimeLeft() throws {
        let due = TimerSetting(valueNanoseconds: 0, intervalNanoseconds: 2_000_000)
        let moved = TimerSetting(valueNanoseconds: 1_500_000, intervalNanoseconds: 2_000_000)
        let (setting, waits) = try settle([due, due, moved])
        #expect(setting == moved)
        #expect(waits == 2)
    }

    @Test func aTimerDisarmedWithAPeriodStaysDisarmedAfterBoundedRereads() throws {
        let disarmed = TimerSetting(valueNanoseconds: 0, intervalNanoseconds: 2_000_000)
        let (setting, waits) = try settle([disarmed])
        #expect(setting == disarmed)
        #expect(waits == 20)
    }

    @Test func anArmedOrOneShotReadingIsKeptAtOnce() throws {
        for reading in [TimerSetting(valueNanoseconds: 700, intervalNanoseconds: 2_000_000),
                        TimerSetting(valueNanoseconds: 0, intervalNanoseconds: 0)] {
            let (setting, waits) = try settle([reading])
            #expect(setting == reading)
            #expect(waits == 0)
        }
    }
}
