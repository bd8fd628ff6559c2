// Reads a process's descriptors into OpenFile records: /proc/PID/fd and fdinfo say what each is; kcmp
// says which share an open file description; unix_diag names a socket's peer; contents (carried files,
// pipe buffers, socket queues) are read through a pidfd_getfd copy without being consumed. The preflight
// reads without contents (the victim runs; only refusals matter), the freeze with them, and the state
// oracle reads the restored target the same way.
import Sys

enum DescriptorReader {
    /// Every descriptor of `processID`, in descriptor order; throws the first one that cannot migrate.
    /// With `contents` false, carried bytes are only counted (the records hold none).
    /// With `allowingLoneEnds` (a process of a tree) a pipe end whose other end the process does not
    /// hold is recorded for the tree to judge (TreePipes); else it is refused where it is met.
    static func read(_ processID: ProcessID, contents: Bool, allowingLoneEnds: Bool = false) throws(CheckpointError) -> [OpenFile] {
        do {
            return try readThrowing(processID, contents: contents, allowingLoneEnds: allowingLoneEnds)
        } catch let error as CheckpointError {
            throw error
        } catch {
            if !ProcFS.isAlive(processID) { throw .noSuchProcess(processID) }
            throw .system(processID, "reading its descriptors: \(error)")
        }
    }

    private struct Probe {
        var descriptor: Int32
        var link: String
        var identity: FileIdentity?
        var info: FDInfo
    }

    private static func readThrowing(_ processID: ProcessID, contents: Bool, allowingLoneEnds: Bool) throws -> [OpenFile] {
        let numbers: [Int32]
        do { numbers = try ProcFS.descriptors(processID) } catch { throw CheckpointError.readFailed(processID, "listing its descriptors", error) }
        var probes: [Probe] = []
        for number in numbers {
            let linkPath = ProcFS.path(of: processID, .descriptor(number))
            guard let link = try? ProcFS.readLink(linkPath),
                  let info = try? FDInfo.read(processID, descriptor: number) else { continue }  // closed meanwhile
            let identity = FileIdentity.of(path: linkPath)
            probes.append(Probe(descriptor: number, link: link, identity: identity, info: info))
        }
        func refuse(_ probe: Probe, _ reason: String) -> CheckpointError {
            .unsupportedDescriptor(processID, descriptor: probe.descriptor, target: "\(probe.link) (\(reason))")
        }

        // Which descriptors share an open file description: compared only within one (link, inode)
        // group, since a dup always shows the same link and inode, and there by binary search among the
        // group's descriptions kept in kcmp's order (1500 opens of /dev/null took 11 s pairwise).
        var firstOfDescription: [Int32: Int32] = [:]
        var groups: [String: [Int32]] = [:]  // each description's lowest descriptor, in kcmp order
        for probe in probes {
            let key = "\(probe.link)|\(probe.identity?.device ?? 0)|\(probe.identity?.inode ?? 0)"
            var sorted = groups[key, default: []]
            var low = 0, high = sorted.count
            var found: Int32?
            while low < high {
                let middle = (low + high) / 2
                switch try ForeignDescriptor.compareOpenFiles(processID, probe.descriptor, sorted[middle]) {
                case .same: found = sorted[middle]; low = high
                case .before: high = middle
                case .after: low = middle + 1
                case .unordered:
                    // No order to search by: compare with each.
                    found = try sorted.first { try ForeignDescriptor.compareOpenFiles(processID, probe.descriptor, $0) == .same }
                    low = found == nil ? sorted.count : high
                    high = low
                }
            }
            if let found {
                firstOfDescription[probe.descriptor] = found
            } else {
                sorted.insert(probe.descriptor, at: low)
                groups[key] = sorted
            }
        }
        let descriptions = probes.filter { firstOfDescription[$0.descriptor] == nil }

        // Pipes: by inode, each pipe needs exactly one read and one write description in the process.
        var pipeEnds: [UInt64: [Probe]] = [:]
        // Sockets: by inode, with what unix_diag says.
        var sockets: [UInt64: (probe: Probe, info: UnixSocketInfo)] = [:]
        for probe in descriptions {
            guard let identity = probe.identity else { continue }
            if identity.isFIFO { pipeEnds[identity.inode, default: []].append(probe) }
            if identity.isSocket {
                guard let info = try UnixSocketDiagnostics.socket(inode: identity.inode) else {
                    // Not a UNIX socket: a TCP one is read by classify.
                    guard TCPSocketReader.isTCP(try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)) else {
                        throw refuse(probe, "only UNIX socket pairs and TCP sockets can be migrated")
                    }
                    continue
                }
                sockets[identity.inode] = (probe, info)
            }
        }

        // Memfds that are also mapped, by device and inode: the lowest mapping of each.
        var mappedMemfds: [String: (start: UInt64, end: UInt64)] = [:]
        for entry in (try? ProcFS.maps(processID)) ?? [] where entry.shared && entry.kernelPath.isMemfd {
            let key = "\(entry.device) \(entry.inode)"
            if mappedMemfds[key] == nil { mappedMemfds[key] = (entry.start, entry.end) }
        }
        var carriedByteCount = 0
        var records: [OpenFile] = []
        for probe in probes {
            let flags = probe.info.statusFlags
            let position = probe.info.position
            if let first = firstOfDescription[probe.descriptor] {
                let original = records.first { $0.descriptor == first }!
                records.append(OpenFile(descriptor: probe.descriptor, path: original.path, flags: flags, position: position,
                                        kind: .duplicate(of: first)))
                continue
            }
            var record = OpenFile(descriptor: probe.descriptor, path: "", flags: flags, position: position)
            if let identity = probe.identity, identity.isRegular, KernelPath(probe.link).isMemfd,
               let mapping = mappedMemfds[mapsDevice(identity.device) + " \(identity.inode)"] {
                let seals = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor).seals()
                record.kind = .memfdOfMapping(mappingStart: mapping.start, mappingEnd: mapping.end, seals: seals)
                records.append(record)
                continue
            }
            record.kind = try classify(probe, processID: processID, contents: contents, allowingLoneEnds: allowingLoneEnds, path: &record.path,
                                       pipeEnds: pipeEnds, sockets: sockets, refuse: refuse)
            carriedByteCount += contents ? record.kind.carriedByteCount : plannedByteCount(probe, processID: processID, kind: record.kind)
            if carriedByteCount > DescriptorLimits.carriedByteCountMax {
                throw refuse(probe, "the files, pipe buffers and socket queues to carry exceed \(DescriptorLimits.carriedByteCountMax) bytes")
            }
            records.append(record)
        }
        try checkEpollTargets(records, probes: probes, refuse: refuse)
        return records
    }

    /// A file reopened by path must be the file that path names here: a POSIX message queue shows as
    /// "/name" (its path inside the mqueue filesystem), and a file of another mount namespace as a path
    /// that leads elsewhere or nowhere on this node. Reopening by that path would open another file,
    /// or fail after the victim is gone.
    private static func requireSameFile(at path: String, as identity: FileIdentity, probe: Probe,
                                        refuse: (Probe, String) -> CheckpointError) throws {
        guard let named = FileIdentity.of(path: path), named.isSameFile(as: identity) else {
            throw refuse(probe, "its path names another file, or none, on this node (a POSIX message queue, or a file of another mount namespace)")
        }
    }

    private static func classify(_ probe: Probe, processID: ProcessID, contents: Bool, allowingLoneEnds: Bool, path: inout String,
                                 pipeEnds: [UInt64: [Probe]], sockets: [UInt64: (probe: Probe, info: UnixSocketInfo)],
                                 refuse: (Probe, String) -> CheckpointError) throws -> OpenFileKind {
        let link = probe.link
        switch link {
        case "anon_inode:[eventfd]":
            guard let counter = probe.info.eventCounter else { throw refuse(probe, "its fdinfo has no eventfd-count") }
            return .eventCounter(count: counter.count, semaphore: counter.semaphore)
        case "anon_inode:[signalfd]":
            guard let mask = probe.info.signalMask else { throw refuse(probe, "its fdinfo has no sigmask") }
            return .signalQueue(mask: mask)
        case "anon_inode:[timerfd]":
            // fdinfo shows a periodic timer that expired and was not read yet with no time left: only
            // timerfd_gettime moves it on to its next expiry (adding the expiries missed to its ticks),
            // so ask that first and read ticks and flags after it.
            let copy = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)
            let setting = try TimerDescriptor.settledSetting(first: try copy.timerSetting(), wait: { OSThread.sleep(for: .milliseconds(1)) },
                                                             read: copy.timerSetting)
            guard let shown = try FDInfo.read(processID, descriptor: probe.descriptor).timer else {
                throw refuse(probe, "its fdinfo does not describe a timer")
            }
            let timer = TimerDescriptor(clock: shown.clock, ticks: shown.ticks, settimeFlags: shown.settimeFlags,
                                        valueNanoseconds: setting.valueNanoseconds, intervalNanoseconds: setting.intervalNanoseconds)
            guard [0, 1, 7].contains(timer.clock) else { throw refuse(probe, "alarm clock \(timer.clock) needs CAP_WAKE_ALARM semantics") }
            return .timer(timer)
        case "anon_inode:[eventpoll]":
            guard let registrations = probe.info.epollRegistrations else { throw refuse(probe, "its fdinfo lists malformed registrations") }
            let entries = registrations.map { EpollEntry(descriptor: $0.descriptor, events: $0.events, data: $0.data) }
            guard entries.count <= DescriptorLimits.epollEntryCountMax else { throw refuse(probe, "more than \(DescriptorLimits.epollEntryCountMax) registrations") }
            // fdinfo lists them in the kernel's tree order (by file address): sort them by descriptor.
            return .eventPoll(entries.sorted { $0.descriptor < $1.descriptor })
        case "anon_inode:inotify":
            let watches: [InotifyWatch]
            do { watches = try InotifyReader.watches(fdinfo: probe.info) } catch { throw refuse(probe, error.reason) }
            // At the freeze (and on the target), not before it: an event queued for a moment while the
            // victim runs is no reason to refuse it.
            if contents {
                let queued = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor).queuedByteCount()
                if queued > 0 { throw refuse(probe, "\(queued) bytes of events queued, which cannot be read without taking them from the process") }
            }
            return .inotify(watches)
        default: break
        }
        guard let identity = probe.identity else { throw refuse(probe, "not a file, pipe, UNIX socket pair, eventfd, signalfd, timerfd or epoll") }
        if link == "/dev/null", identity.fileType == FileType.characterDevice {
            path = link
            return .regular
        }
        // /proc is this node's view of its processes, named by PID: /proc/self/status reopened on another
        // node (or in the target's PID namespace) is another process's, or none. (A restore checked it
        // as a regular file of that path, and reopened /proc/<the victim's PID>/status there.)
        if link == "/proc" || link.hasPrefix("/proc/") {
            throw refuse(probe, "a file of /proc, which names this node's processes by PID")
        }
        if identity.isDirectory {
            guard link.hasPrefix("/"), !KernelPath(link).isDeleted else { throw refuse(probe, "a directory that was removed") }
            try requireSameFile(at: link, as: identity, probe: probe, refuse: refuse)
            path = link
            return .directory
        }
        if identity.isRegular {
            guard link.hasPrefix("/") else { throw refuse(probe, "not a path") }
            guard KernelPath(link).isDeleted else {
                try requireSameFile(at: link, as: identity, probe: probe, refuse: refuse)
                path = link
                return .regular
            }
            let name = KernelPath(link).name
            let carried = CarriedFile(contents: [], mode: identity.mode & 0o7777, userID: identity.userID, groupID: identity.groupID)
            guard identity.byteCount <= Int64(DescriptorLimits.carriedByteCountMax) else {
                throw refuse(probe, "\(identity.byteCount) bytes, more than the \(DescriptorLimits.carriedByteCountMax) an image carries")
            }
            if let memfdName = KernelPath(link).memfdName {
                var file = carried
                if contents {
                    file.contents = try readContents(try ForeignDescriptor(reopening: processID, remoteDescriptor: probe.descriptor),
                                                     probe: probe, refuse: refuse)
                }
                path = ""
                let seals = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor).seals()
                return .memfd(name: memfdName, file: file, seals: seals)
            }
            var file = carried
            if contents {
                let copy = try ForeignDescriptor(reopening: processID, remoteDescriptor: probe.descriptor)
                file.contents = try readContents(copy, probe: probe, refuse: refuse)
            }
            path = name
            return .deletedFile(file)
        }
        if identity.isFIFO {
            let ends = pipeEnds[identity.inode] ?? []
            let readers = ends.filter { accessMode($0) != OpenFlag.writeOnly }, writers = ends.filter { accessMode($0) != OpenFlag.readOnly }
            // One end alone: the other may be another process's of the tree (TreePipes decides; a single
            // process refuses it there).
            let lone = allowingLoneEnds && link.hasPrefix("pipe:") && ends.count == 1 && readers.count + writers.count == 1
            guard lone || (readers.count == 1 && writers.count == 1 && ends.count == 2) else {
                throw refuse(probe, "a pipe must have its read end and its write end open once each in the process (found \(readers.count) and \(writers.count))")
            }
            if link.hasPrefix("pipe:") {
                path = ""
            } else {
                guard link.hasPrefix("/"), !KernelPath(link).isDeleted else { throw refuse(probe, "a FIFO without a path") }
                path = link
            }
            let flags = probe.info.statusFlags
            if flags & OpenFlag.direct != 0 { throw refuse(probe, "a packet-mode (O_DIRECT) pipe") }
            let isReadEnd = accessMode(probe) == OpenFlag.readOnly
            let copy = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)
            var buffered: [UInt8] = []
            if isReadEnd && contents {
                switch try copy.peekPipe(maximumByteCount: DescriptorLimits.carriedByteCountMax) {
                case .bytes(let bytes): buffered = bytes
                case .tooLarge: throw refuse(probe, "more bytes buffered than an image carries")
                }
            }
            if lone {
                return .treePipe(TreePipeEnd(pipe: -1, isReadEnd: isReadEnd, capacityByteCount: Int32(try copy.pipeCapacity()),
                                             buffered: buffered, inode: identity.inode))
            }
            return .pipe(PipeEnd(channel: min(ends[0].descriptor, ends[1].descriptor), isReadEnd: isReadEnd,
                                 capacityByteCount: Int32(try copy.pipeCapacity()), buffered: buffered))
        }
        if identity.isSocket, let info = sockets[identity.inode]?.info {
            guard info.type == 1 || info.type == 2 else { throw refuse(probe, "UNIX socket type \(info.type); only stream and datagram pairs migrate") }
            guard !info.isBound else { throw refuse(probe, "a bound UNIX socket; only unnamed socket pairs migrate") }
            guard info.peerInode != 0, let peer = sockets[info.peerInode], peer.info.peerInode == identity.inode else {
                throw refuse(probe, "a UNIX socket whose peer is not held by the process")
            }
            let copy = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)
            var queued: [[UInt8]] = []
            if contents {
                switch try copy.peekMessages(datagrams: info.type == 2, maximumByteCount: DescriptorLimits.carriedByteCountMax,
                                             maximumCount: DescriptorLimits.queuedMessageCountMax) {
                case .messages(let messages): queued = messages
                case .tooLarge: throw refuse(probe, "more queued than an image carries")
                case .controlData: throw refuse(probe, "a queued message carries descriptors or credentials")
                }
            }
            return .unixSocket(UnixSocketEnd(type: Int32(info.type), peer: peer.probe.descriptor, queued: queued, shutdown: info.shutdown,
                                             sendBufferByteCount: try copy.socketOption(level: SocketOption.socketLevel, name: SocketOption.sendBuffer),
                                             receiveBufferByteCount: try copy.socketOption(level: SocketOption.socketLevel, name: SocketOption.receiveBuffer)))
        }
        if identity.isSocket {
            let copy = try ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)
            if TCPSocketReader.isTCP(copy) {
                do { return .tcpSocket(try TCPSocketReader.read(copy, contents: contents)) } catch let refusal as TCPRefusal {
                    throw refuse(probe, refusal.reason)
                }
            }
        }
        throw refuse(probe, "not a file, pipe, UNIX socket pair, TCP socket, eventfd, signalfd, timerfd, epoll or inotify")
    }

    /// The bytes a record will carry, counted before the freeze without reading them.
    private static func plannedByteCount(_ probe: Probe, processID: ProcessID, kind: OpenFileKind) -> Int {
        switch kind {
        case .deletedFile, .memfd: return Int(probe.identity?.byteCount ?? 0)
        case .pipe(let end) where !end.isReadEnd: return 0
        case .treePipe(let end) where !end.isReadEnd: return 0
        case .pipe, .treePipe, .unixSocket:
            return (try? ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor).queuedByteCount()) ?? 0
        case .tcpSocket:
            return (try? ForeignDescriptor(processID: processID, remoteDescriptor: probe.descriptor)).map(TCPSocketReader.plannedByteCount) ?? 0
        default: return 0
        }
    }

    private static func readContents(_ copy: ForeignDescriptor, probe: Probe, refuse: (Probe, String) -> CheckpointError) throws -> [UInt8] {
        guard let bytes = try copy.contents(maximumByteCount: DescriptorLimits.carriedByteCountMax) else {
            throw refuse(probe, "more than the \(DescriptorLimits.carriedByteCountMax) bytes an image carries")
        }
        return bytes
    }

    private static func accessMode(_ probe: Probe) -> Int32 {
        probe.info.statusFlags & OpenFlag.accessModeMask
    }

    /// Every registration must point at a descriptor that still holds the file registered (a registration
    /// outlives the descriptor it was made through while a dup keeps the file open); nested epoll sets
    /// are refused.
    private static func checkEpollTargets(_ records: [OpenFile], probes: [Probe], refuse: (Probe, String) -> CheckpointError) throws {
        let byDescriptor = Dictionary(uniqueKeysWithValues: probes.map { ($0.descriptor, $0) })
        for record in records {
            guard case .eventPoll(let entries) = record.kind, let probe = byDescriptor[record.descriptor] else { continue }
            let registeredInodes = Dictionary((probe.info.epollRegistrations ?? []).map { ($0.descriptor, $0.inode) },
                                              uniquingKeysWith: { first, _ in first })
            for entry in entries {
                guard let target = byDescriptor[entry.descriptor], let inode = registeredInodes[entry.descriptor],
                      target.identity?.inode == inode else {
                    throw refuse(probe, "registration of fd \(entry.descriptor), which no longer holds the registered file")
                }
                if target.link == "anon_inode:[eventpoll]" { throw refuse(probe, "an epoll set that watches another epoll set") }
            }
        }
    }

    /// st_dev as /proc/PID/maps writes it ("major:minor", hex, at least two digits each).
    static func mapsDevice(_ device: UInt64) -> String {
        let major = (device >> 8) & 0xfff | (device >> 32) & ~0xfff
        let minor = device & 0xff | (device >> 12) & ~0xff
        func twoDigits(_ value: UInt64) -> String { let text = String(value, radix: 16); return text.count < 2 ? "0" + text : text }
        return twoDigits(major) + ":" + twoDigits(minor)
    }
}
