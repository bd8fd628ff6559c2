// Sys's FDInfo parses /proc/PID/fdinfo text into typed values; the texts here are this kernel's (6.18),
// as read from an eventfd, an epoll set, an inotify instance and a timerfd of a real process, and
// each malformed variant must give nil, never a guess.
import Foundation
import Sys
import Testing

struct FDInfoTests {
    @Test func statusFlagsAndPositionOfEveryFile() {
        let info = FDInfo(text: "pos:\t8192\nflags:\t02100002\nmnt_id:\t17\nino:\t1036\n")
        #expect(info.statusFlags == 0o2100002)
        #expect(info.position == 8192)
        #expect(FDInfo(text: "").statusFlags == 0)
        #expect(FDInfo(text: "pos:\tx\n").position == 0)
    }

    @Test func anEventfdsCountAndSemaphoreFlag() {
        let info = FDInfo(text: "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1036\neventfd-count:                1f\neventfd-id: 1\neventfd-semaphore: 1\n")
        #expect(info.eventCounter?.count == 0x1f)
        #expect(info.eventCounter?.semaphore == true)
        #expect(FDInfo(text: "eventfd-count: zz\n").eventCounter == nil)
        #expect(FDInfo(text: "pos:\t0\n").signalMask == nil)
        #expect(FDInfo(text: "sigmask:\t0000000000004002\n").signalMask == 0x4002)
    }

    @Test func anEpollSetsRegistrationsInTheKernelsOrder() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1036\n"
            + "tfd:        7 events:       19 data:                3  pos:0 ino:40c sdev:10\n"
            + "tfd:        3 events:        1 data: ffffffffffffffff  pos:0 ino:9 sdev:f\n"
        let registrations = FDInfo(text: text).epollRegistrations
        #expect(registrations == [FDInfo.EpollRegistration(descriptor: 7, events: 0x19, data: 3, inode: 0x40c),
                                  FDInfo.EpollRegistration(descriptor: 3, events: 1, data: .max, inode: 9)])
        #expect(FDInfo(text: "pos:\t0\n").epollRegistrations == [])
        #expect(FDInfo(text: "tfd:        7 events:       19 pos:0 ino:40c\n").epollRegistrations == nil, "a line without data")
    }

    @Test func aTimerfdsClockTicksFlagsAndTimes() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1036\nclockid: 1\nticks: 4\nsettime flags: 01\n"
            + "it_value: (0, 49406829)\nit_interval: (1, 500)\n"
        #expect(FDInfo(text: text).timer == FDInfo.Timer(clock: 1, ticks: 4, settimeFlags: 1, valueNanoseconds: 49_406_829,
                                                          intervalNanoseconds: 1_000_000_500))
        #expect(FDInfo(text: text.replacingOccurrences(of: "(1, 500)", with: "(1, 1000000000)")).timer == nil, "nanoseconds past a second")
        #expect(FDInfo(text: text.replacingOccurrences(of: "ticks: 4\n", with: "")).timer == nil)
    }

    @Test func anInotifyInstancesWatchLines() {
        let text = "pos:\t0\nflags:\t00\nmnt_id:\t17\nino:\t1036\n"
            + "inotify wd:1 ino:3df9d sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:9ddf030000000000\n"
        let lines = FDInfo(text: text).inotifyLines
        #expect(lines.count == 1)
        #expect(lines.first?.values["wd"] == "1")
        #expect(lines.first?.values["f_handle"] == "9ddf030000000000")
        #expect(lines.first?.line.hasPrefix("inotify wd:1 ") == true)
    }
}

/// Sys's KernelPath: the kernel's spellings in maps paths and fd links, as this kernel writes them.
struct KernelPathTests {
    @Test func aMemfdDeletedOrNot() {
        #expect(KernelPath("/memfd:ring (deleted)").memfdName == "ring")
        #expect(KernelPath("/memfd:ring (deleted)").isDeleted)
        #expect(KernelPath("/memfd:a b").memfdName == "a b")
        #expect(KernelPath("/tmp/memfd:x").memfdName == nil)
        #expect(!KernelPath("/memfd:x (deleted)").isFilePath)
    }

    @Test func sharedAnonymousMemorySysVAndSpecialMappings() {
        #expect(KernelPath("/dev/zero (deleted)").isSharedAnonymousObject)
        #expect(!KernelPath("/dev/zero").isSharedAnonymousObject)
        #expect(KernelPath("/SYSV0000abcd (deleted)").isSysVSegment)
        #expect(KernelPath("[heap]").isSpecial && !KernelPath("[heap]").isFilePath)
        #expect(!KernelPath("").isSpecial && !KernelPath("").isFilePath)
    }

    @Test func aFilePathAndItsDeletedName() {
        #expect(KernelPath("/usr/lib/libc.so.6").isFilePath && !KernelPath("/usr/lib/libc.so.6").isDeleted)
        #expect(KernelPath("/tmp/gone (deleted)").name == "/tmp/gone")
        #expect(KernelPath("/tmp/gone (deleted)").isFilePath, "deleted, but still a path of the file tree")
        #expect(!KernelPath("/dev/shm/x").isFilePath)
    }
}
