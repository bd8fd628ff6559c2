// An inotify instance's watches, as /proc/PID/fdinfo lists them: one line per watch, with its watch
// descriptor, mask and the file handle of the inode it watches, which gives its path back
// (FileHandles). The restorer adds each watch again in watch-descriptor order: the kernel hands watch
// descriptors out cyclically (the next after the last one given), so a gap is made by adding a watch
// and removing it; the IN_IGNORED events those removals queue are read off before the process runs.
// Refused: a watch on a file no path leads to (deleted, or on a filesystem not mounted here), and events
// queued at the freeze (they cannot be read without taking them from the victim).
import Sys

enum InotifyReader {
    /// IN_ALL_EVENTS.
    static let eventMask: UInt32 = 0xfff
    /// What a watch keeps of inotify_add_watch's mask: the events, IN_EXCL_UNLINK and IN_ONESHOT.
    static let restorableMask: UInt32 = eventMask | 0x0400_0000 | 0x8000_0000
    /// IN_DONT_FOLLOW: a watch on a symbolic link itself.
    static let dontFollow: UInt32 = 0x0200_0000

    struct Refusal: Error { let reason: String }

    /// `inotify wd:N ino:HEX sdev:HEX mask:HEX ignored_mask:HEX fhandle-bytes:HEX fhandle-type:HEX f_handle:HEX`
    /// lines, by watch descriptor; `resolve` turns (device, handle type, handle) into a path.
    static func watches(fdinfo: FDInfo, resolve: (UInt64, Int32, [UInt8]) -> String? = FileHandles.path)
        throws(Refusal) -> [InotifyWatch] {
        var watches: [InotifyWatch] = []
        for (line, values) in fdinfo.inotifyLines {
            guard let wd = values["wd"].flatMap({ Int32($0) }), wd >= 1,
                  let inode = values["ino"].flatMap({ UInt64($0, radix: 16) }),
                  let device = values["sdev"].flatMap({ UInt64($0, radix: 16) }),
                  let mask = values["mask"].flatMap({ UInt32($0, radix: 16) }) else {
                throw Refusal(reason: "its fdinfo line \"\(line.prefix(80))\" is not understood")
            }
            guard mask & ~restorableMask == 0 else { throw Refusal(reason: "watch \(wd) has mask \(hex(UInt64(mask))), which this fammig does not know") }
            guard let byteCount = values["fhandle-bytes"].flatMap({ Int($0, radix: 16) }),
                  let type = values["fhandle-type"].flatMap({ Int32($0, radix: 16) }),
                  let handleText = values["f_handle"], handleText.count == 2 * byteCount, byteCount <= FileHandles.maximumHandleByteCount else {
                throw Refusal(reason: "watch \(wd) (inode \(inode)) shows no file handle, so its file cannot be found again")
            }
            let digits = Array(handleText.utf8)
            let handle = stride(from: 0, to: digits.count, by: 2).compactMap { UInt8(String(decoding: digits[$0..<($0 + 2)], as: UTF8.self), radix: 16) }
            guard handle.count == byteCount else { throw Refusal(reason: "watch \(wd) has a malformed file handle") }
            guard let path = resolve(device, type, handle) else {
                throw Refusal(reason: "watch \(wd) is on inode \(inode), which no path here leads to (deleted, or on a filesystem not mounted on this node)")
            }
            guard let identity = FileIdentity.of(path: path), identity.inode == inode else {
                throw Refusal(reason: "watch \(wd)'s path \(path) names another file now")
            }
            watches.append(InotifyWatch(watchDescriptor: wd, path: path, mask: mask))
        }
        guard watches.count <= DescriptorLimits.inotifyWatchCountMax else { throw Refusal(reason: "more than \(DescriptorLimits.inotifyWatchCountMax) watches") }
        return watches.sorted { $0.watchDescriptor < $1.watchDescriptor }
    }
}
