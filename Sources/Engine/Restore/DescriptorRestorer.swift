// Recreates the victim's descriptors in the target (OpenFiles.swift has the kinds). Objects are made by
// injected syscalls, so they belong to the target; what they hold (a pipe's bytes, a socket's queue, a
// memfd's contents, an eventfd's count, a timer) is filled through a pidfd_getfd copy from here.
// A new object lands on the lowest free number, which may be another record's: every object is first
// parked above all wanted numbers, then moved to its own; dups follow; epoll sets come last, once every
// descriptor they watch has its final number (a registration is keyed by the number it was made with).
import Sys

final class DescriptorRestorer {
    let injector: SyscallInjector
    let memory: ProcessMemory
    let dataAddress: UInt64
    /// The target as this node numbers it.
    let processID: ProcessID
    /// Where each record's object waits (final descriptor -> parked one), above every final number.
    private var parked: [Int32: Int32] = [:]
    private var parkingBase: UInt64 = 0
    /// Established TCP connections left in repair mode until the process is let go (final descriptor).
    private(set) var liveSockets: [(descriptor: Int32, end: TCPSocketEnd)] = []

    /// Regular files, directories and FIFO ends opened through the file the access check resolved
    /// (/proc/PID/fd/N of this node's fammig), not by their path again: by number.
    let reopenPaths: ReopenPaths
    /// A tree's pipes, and this process's own number in the tree.
    let treePipes: (restore: TreePipeRestore, ownProcessID: ProcessID)?

    init(injector: SyscallInjector, memory: ProcessMemory, dataAddress: UInt64, processID: ProcessID, reopenPaths: ReopenPaths = ReopenPaths(),
         treePipes: (restore: TreePipeRestore, ownProcessID: ProcessID)? = nil) {
        (self.injector, self.memory, self.dataAddress, self.processID) = (injector, memory, dataAddress, processID)
        self.reopenPaths = reopenPaths
        self.treePipes = treePipes
    }

    /// Opens a regular file or directory record: through its checked file when there is one (a magic
    /// link, which O_NOFOLLOW would refuse; the path was resolved at the check), else by its path.
    private func openChecked(_ record: OpenFile, flags: Int32) throws -> Int32 {
        guard let reopenPath = reopenPaths[record.descriptor] else { return try openInTarget(record.path, flags: flags) }
        return try openInTarget(reopenPath, flags: flags & ~OpenFlag.noFollow)
    }

    private enum Number {
        static let socketpair = 53, shutdown = 48, fcntl = 72, epollCtl = 233, timerfdCreate = 283, signalfd4 = 289
        static let socket = 41
        static let eventfd2 = 290, epollCreate1 = 291, pipe2 = 293, memfdCreate = 319, getdents64 = 217
        static let inotifyInit1 = 294, inotifyAddWatch = 254, inotifyRemoveWatch = 255
    }
    private static let duplicateAbove: UInt64 = 0        // F_DUPFD
    private static let setStatusFlags: UInt64 = 4        // F_SETFL
    private static let ignoredOpenFlags: Int32 = OpenFlag.create | OpenFlag.exclusive | OpenFlag.truncate | OpenFlag.noControllingTerminal

    func restore(_ files: [OpenFile]) throws {
        let records = files.sorted { $0.descriptor < $1.descriptor }
        let byDescriptor = Dictionary(uniqueKeysWithValues: records.map { ($0.descriptor, $0) })
        parkingBase = UInt64((records.map(\.descriptor).max() ?? 0) + 1)

        for record in records {
            switch record.kind {
            case .duplicate, .eventPoll, .treePipe: continue
            case .pipe(let end) where end.channel != record.descriptor: continue  // made with its channel
            case .unixSocket(let end) where end.peer < record.descriptor: continue  // made with its peer
            default: break
            }
            try create(record, records: records, byDescriptor: byDescriptor)
        }
        // Status flags and offsets belong to the open file description: set them on the parked copy.
        for record in records {
            guard let descriptor = parked[record.descriptor] else { continue }
            try injector.call("fcntl(F_SETFL)", Number.fcntl, UInt64(descriptor), Self.setStatusFlags, UInt64(UInt32(bitPattern: record.flags)))
            switch record.kind {
            case .regular, .directory, .deletedFile, .memfd, .memfdOfMapping:
                if record.position != 0 {
                    try injector.call("lseek", Syscall.lseek, UInt64(descriptor), UInt64(bitPattern: record.position), 0)
                }
            default: break
            }
        }
        for record in records {
            guard let descriptor = parked[record.descriptor] else { continue }
            try moveToFinal(descriptor, record)
        }
        try restoreTreePipes(records)
        for record in records {
            guard case .duplicate(let original) = record.kind else { continue }
            try injector.call("dup3", Syscall.dup3, UInt64(original), UInt64(record.descriptor), closeOnExec(record))
        }
        for record in records {
            guard case .eventPoll(let entries) = record.kind else { continue }
            let created = try injector.call("epoll_create1", Number.epollCreate1, 0)
            let epoll = try injector.call("fcntl(F_DUPFD)", Number.fcntl, created, Self.duplicateAbove, parkingBase)
            try injector.call("close", Syscall.close, created)
            for entry in entries {
                // struct epoll_event is packed on x86-64: u32 events, u64 data.
                var event: [UInt8] = []
                event.appendLittleEndian(entry.events)
                event.appendLittleEndian(entry.data)
                try memory.write(event, at: dataAddress)
                try injector.call("epoll_ctl(ADD \(entry.descriptor))", Number.epollCtl, epoll, 1, UInt64(entry.descriptor), dataAddress)
            }
            try injector.call("fcntl(F_SETFL)", Number.fcntl, epoll, Self.setStatusFlags, UInt64(UInt32(bitPattern: record.flags)))
            try moveToFinal(Int32(epoll), record)
        }
    }

    /// Makes the tree pipes this process is the nearest common ancestor of their holders of, parked at
    /// the tree's temporary base or above, filled and flagged; then takes this process's own ends from
    /// where they are parked (made here, or inherited from the parent it was cloned from).
    private func restoreTreePipes(_ records: [OpenFile]) throws {
        if let (pipes, own) = treePipes {
            for pipe in pipes.pipes(madeBy: own) {
                try injector.call("pipe2", Number.pipe2, dataAddress, UInt64(OpenFlag.closeOnExec))
                let pair = try memory.read(at: dataAddress, byteCount: 8).littleEndianWord(at: 0)
                var parkedEnds: [Int32] = []
                for made in [pair & 0xffff_ffff, pair >> 32] {
                    parkedEnds.append(Int32(try injector.call("fcntl(F_DUPFD)", Number.fcntl, made, Self.duplicateAbove, UInt64(pipes.temporaryBase))))
                    try injector.call("close", Syscall.close, made)
                }
                let writer = try take(parkedEnds[1])
                try writer.setPipeCapacity(Int(pipe.capacityByteCount))
                if !pipe.buffered.isEmpty { try writer.append(pipe.buffered) }
                for (end, record) in zip(parkedEnds, [pipe.read, pipe.write]) {
                    try injector.call("fcntl(F_SETFL)", Number.fcntl, UInt64(end), Self.setStatusFlags, UInt64(UInt32(bitPattern: record.flags)))
                }
                pipes.park(pipe.ordinal, read: parkedEnds[0], write: parkedEnds[1])
            }
        }
        for record in records {
            guard case .treePipe(let end) = record.kind else { continue }
            guard let parked = treePipes?.restore.parked[end.pipe] else {
                throw RestoreError.system("fd \(record.descriptor): its pipe's other end is held by no process of the tree it descends from")
            }
            try injector.call("dup3", Syscall.dup3, UInt64(end.isReadEnd ? parked.read : parked.write), UInt64(record.descriptor), closeOnExec(record))
        }
    }

    private func closeOnExec(_ record: OpenFile) -> UInt64 { UInt64(UInt32(bitPattern: record.flags & OpenFlag.closeOnExec)) }

    private func moveToFinal(_ descriptor: Int32, _ record: OpenFile) throws {
        try injector.call("dup3", Syscall.dup3, UInt64(descriptor), UInt64(record.descriptor), closeOnExec(record))
        try injector.call("close", Syscall.close, UInt64(descriptor))
    }

    private func take(_ descriptor: Int32) throws -> ForeignDescriptor {
        try ForeignDescriptor(processID: processID, remoteDescriptor: descriptor)
    }

    /// Makes the object of `record` (both ends of a pipe or socket pair), parks it, and fills it.
    /// Moves a new object above every final number, for `owner`; returns where it now is.
    @discardableResult
    private func park(_ created: UInt64, _ owner: OpenFile) throws -> Int32 {
        precondition(parked[owner.descriptor] == nil, "fd \(owner.descriptor) made twice")
        let moved = Int32(try injector.call("fcntl(F_DUPFD)", Number.fcntl, created, Self.duplicateAbove, parkingBase))
        try injector.call("close", Syscall.close, created)
        parked[owner.descriptor] = moved
        return moved
    }

    private func create(_ record: OpenFile, records: [OpenFile], byDescriptor: [Int32: OpenFile]) throws {
        let flags = record.flags & ~Self.ignoredOpenFlags
        func parkedNumber(_ created: UInt64, _ owner: OpenFile) throws -> Int32 { try park(created, owner) }
        switch record.kind {
        case .regular:
            try park(UInt64(try openChecked(record, flags: flags)), record)
        case .directory:
            let descriptor = UInt64(try openChecked(record, flags: flags))
            if record.position != 0 {
                // ext4 keeps a hashed directory's walk state beside the offset, created at the first
                // getdents: made at an offset (say the end) it believes a later rewind to 0 is where it
                // already is, and that walk finds nothing. One read from the start first sets it up as
                // the victim's was; the lseek after it moves the offset, which ext4 then notices.
                try injector.call("getdents64(\(record.path))", Number.getdents64, descriptor, dataAddress, 1024)
            }
            try park(descriptor, record)
        case .deletedFile(let file):
            // Made here under its old name, opened by the target, unlinked again: it reads back as
            // "PATH (deleted)" with its contents, mode and owner.
            // In the directory the access check resolved (its /proc/PID/fd/N), not the one the path may lead to now.
            let name = record.path.split(separator: "/", omittingEmptySubsequences: false).last.map(String.init) ?? ""
            let path = reopenPaths[.deletedFileDirectory(record.descriptor)].map { $0 + "/" + name } ?? record.path
            do {
                let created = try ForeignDescriptor(creatingExclusively: path)
                try created.write(file.contents, at: 0)
                try created.changeOwner(userID: file.userID, groupID: file.groupID)
                try created.changeMode(file.mode)
            } catch {
                throw RestoreError.system("recreating deleted file \(record.path) for fd \(record.descriptor): \(error) (a file of that name must not exist on this node)")
            }
            defer { try? ForeignDescriptor.removeFile(path) }
            try park(UInt64(try openInTarget(path, flags: flags)), record)
        case .memfdOfMapping(let start, let end, _):
            // The layout made the object with its mappings; map_files opens it again (as root, which the
            // target still is here).
            try park(UInt64(try openInTarget("/proc/self/map_files/\(String(start, radix: 16))-\(String(end, radix: 16))", flags: flags)), record)
        case .memfd(let name, let file, let seals):
            try memory.write(Array(name.utf8) + [0], at: dataAddress + 8192)
            // MFD_ALLOW_SEALING (2) unless the memfd was made without it (its only seal is F_SEAL_SEAL).
            let sealingAllowed = seals != 1
            let created = try injector.call("memfd_create(\(name))", Number.memfdCreate, dataAddress + 8192, sealingAllowed ? 2 : 0)
            let descriptor = try parkedNumber(created, record)
            let copy = try take(descriptor)
            try copy.write(file.contents, at: 0)
            try copy.truncate(byteCount: Int64(file.contents.count))
            try copy.changeOwner(userID: file.userID, groupID: file.groupID)
            try copy.changeMode(file.mode)
            if sealingAllowed && seals != 0 {
                try copy.addSeals(seals & ~1)
                if seals & 1 != 0 { try copy.addSeals(1) }
            }
        case .treePipe: break  // restoreTreePipes
        case .pipe(let end):
            guard let other = records.first(where: { if case .pipe(let otherEnd) = $0.kind { otherEnd.channel == end.channel && $0.descriptor != record.descriptor } else { false } }),
                  case .pipe(let otherEnd) = other.kind else {
                throw RestoreError.system("fd \(record.descriptor): the other end of its pipe is missing")
            }
            let (readRecord, writeRecord) = end.isReadEnd ? (record, other) : (other, record)
            let (readEnd, writeEnd): (UInt64, UInt64)
            if record.path.isEmpty {
                try injector.call("pipe2", Number.pipe2, dataAddress, UInt64(OpenFlag.closeOnExec))
                let pair = try memory.read(at: dataAddress, byteCount: 8)
                readEnd = UInt64(pair.littleEndianWord(at: 0) & 0xffff_ffff)
                writeEnd = pair.littleEndianWord(at: 0) >> 32
            } else {
                // A reader first, so that a non-blocking open for writing finds one. Each end through the
                // FIFO its own access check resolved (for reading, for writing), when there is one.
                readEnd = UInt64(try openInTarget(reopenPaths[readRecord.descriptor] ?? record.path,
                                                  flags: OpenFlag.readOnly | OpenFlag.nonBlocking | OpenFlag.closeOnExec))
                writeEnd = UInt64(try openInTarget(reopenPaths[writeRecord.descriptor] ?? record.path,
                                                   flags: OpenFlag.writeOnly | OpenFlag.nonBlocking | OpenFlag.closeOnExec))
            }
            let readDescriptor = try parkedNumber(readEnd, readRecord)
            let writeDescriptor = try parkedNumber(writeEnd, writeRecord)
            let readState = end.isReadEnd ? end : otherEnd
            let writer = try take(writeDescriptor)
            try writer.setPipeCapacity(Int(readState.capacityByteCount))
            // A FIFO opened on the node where the victim still holds it (post-copy on one machine) is
            // the victim's own pipe, its bytes already in it: refilling would double them.
            let alreadyBuffered = record.path.isEmpty ? 0 : try take(readDescriptor).queuedByteCount()
            if alreadyBuffered == 0 && !readState.buffered.isEmpty {
                try writer.append(readState.buffered)
            } else if alreadyBuffered != readState.buffered.count {
                throw RestoreError.system("FIFO \(record.path) already holds \(alreadyBuffered) bytes, not the \(readState.buffered.count) it held at the checkpoint; another process uses it")
            }
        case .eventCounter(let count, let semaphore):
            let created = try injector.call("eventfd2", Number.eventfd2, 0, semaphore ? 1 : 0)
            let descriptor = try parkedNumber(created, record)
            if count > 0 {
                var bytes: [UInt8] = []
                bytes.appendLittleEndian(count)
                try take(descriptor).append(bytes)
            }
        case .signalQueue(let mask):
            var bytes: [UInt8] = []
            bytes.appendLittleEndian(mask)
            try memory.write(bytes, at: dataAddress)
            try park(try injector.call("signalfd4", Number.signalfd4, UInt64.max, dataAddress, 8, 0), record)
        case .timer(let timer):
            let created = try injector.call("timerfd_create(\(timer.clock))", Number.timerfdCreate, UInt64(timer.clock), 0)
            let copy = try take(try parkedNumber(created, record))
            try copy.setTimer(TimerSetting(valueNanoseconds: timer.valueNanoseconds, intervalNanoseconds: timer.intervalNanoseconds),
                              flags: timer.settimeFlags, clock: timer.clock)
            // After settime, which clears the count.
            if timer.ticks > 0 { try copy.setTimerTicks(timer.ticks) }
        case .unixSocket(let end):
            guard let peer = byDescriptor[end.peer], case .unixSocket(let peerEnd) = peer.kind else {
                throw RestoreError.system("fd \(record.descriptor): its peer fd \(end.peer) is missing")
            }
            try injector.call("socketpair", Number.socketpair, 1, UInt64(end.type) | UInt64(OpenFlag.closeOnExec), 0, dataAddress)
            let pair = try memory.read(at: dataAddress, byteCount: 8).littleEndianWord(at: 0)
            let mine = try take(try parkedNumber(pair & 0xffff_ffff, record))
            let theirs = try take(try parkedNumber(pair >> 32, peer))
            for (socket, state) in [(mine, end), (theirs, peerEnd)] {
                // The *FORCE options set what is asked, doubled, as getsockopt then reports.
                try socket.setSocketOption(level: SocketOption.socketLevel, name: 32, value: state.sendBufferByteCount / 2)     // SocketOption.sendBufferForce
                try socket.setSocketOption(level: SocketOption.socketLevel, name: 33, value: state.receiveBufferByteCount / 2)  // SocketOption.receiveBufferForce
            }
            // What was queued for one end was sent by the other.
            for message in end.queued { try theirs.append(message) }
            for message in peerEnd.queued { try mine.append(message) }
            try mine.shutdownSocket(end.shutdown)
            try theirs.shutdownSocket(peerEnd.shutdown)
        case .tcpSocket(let end):
            let created = try injector.call("socket(TCP)", Number.socket, UInt64(end.local.family), 1 | UInt64(OpenFlag.closeOnExec), 6)
            let copy = try take(try parkedNumber(created, record))
            do { try TCPSocketRestorer.rebuild(copy, end) } catch {
                throw RestoreError.system("fd \(record.descriptor): rebuilding TCP socket \(end.local)\(end.peer.map { " to \($0)" } ?? ""): \(error)")
            }
            if !end.isListening { liveSockets.append((record.descriptor, end)) }
        case .inotify(let watches):
            let created = try injector.call("inotify_init1", Number.inotifyInit1, UInt64(OpenFlag.closeOnExec))
            let descriptor = try parkedNumber(created, record)
            try addWatches(watches, to: descriptor)
        case .duplicate, .eventPoll:
            preconditionFailure("fd \(record.descriptor): \(record.kind.name) records are restored after the others")
        }
    }

    /// Each watch with its own watch descriptor. The kernel gives the one after the last it gave (1 for
    /// a new instance): below the wanted one, the watch is added and removed again until the next is
    /// the wanted one; the IN_IGNORED events of those removals are read off through a copy.
    private func addWatches(_ watches: [InotifyWatch], to descriptor: Int32) throws {
        var skipped = false
        for watch in watches {
            try memory.write(Array(watch.path.utf8) + [0], at: dataAddress + 8192)
            let isLink = (try? ProcFS.readLink(watch.path)) != nil
            let mask = UInt64(watch.mask | (isLink ? InotifyReader.dontFollow : 0))
            var attempts = 0
            // Bounded: at most twice the watch count limit of attempts (the guard below), then refused.
            while true {
                let given = try injector.call("inotify_add_watch(\(watch.path))", Number.inotifyAddWatch, UInt64(descriptor), dataAddress + 8192, mask)
                if given == UInt64(watch.watchDescriptor) { break }
                attempts += 1
                guard Int64(given) < Int64(watch.watchDescriptor), attempts <= DescriptorLimits.inotifyWatchCountMax * 2 else {
                    throw RestoreError.system("inotify_add_watch(\(watch.path)) gave watch \(given), not \(watch.watchDescriptor) (two watches on one file?)")
                }
                try injector.call("inotify_rm_watch(\(given))", Number.inotifyRemoveWatch, UInt64(descriptor), given)
                skipped = true
            }
        }
        if skipped { try take(descriptor).discardQueued() }
    }

    /// openat(AT_FDCWD, path, flags) inside the target; returns the new descriptor.
    private func openInTarget(_ path: String, flags: Int32) throws -> Int32 {
        let pathAddress = dataAddress + 8192
        try memory.write(Array(path.utf8) + [0], at: pathAddress)
        return Int32(try injector.call("openat(\(path))", Syscall.openat, UInt64(bitPattern: -100), pathAddress,
                                       UInt64(UInt32(bitPattern: flags)), 0))
    }
}
