// One descriptor of the metadata region, in the ProcessState encoding (ProcessStateCodec.swift): what each
// kind of open file carries, decoded as untrusted input with every count bounded.
import Sys

extension OpenFile {
    func encode(into writer: inout BinaryWriter) {
        writer.writeInt32(descriptor)
        writer.writeString(path)
        writer.writeInt32(flags)
        writer.writeInt64(position)
        func writeCarried(_ file: CarriedFile) {
            writer.writeBytes(file.contents)
            writer.writeUInt32(file.mode)
            writer.writeUInt32(file.userID)
            writer.writeUInt32(file.groupID)
        }
        switch kind {
        case .regular: writer.writeUInt8(0)
        case .directory: writer.writeUInt8(1)
        case .deletedFile(let file): writer.writeUInt8(2); writeCarried(file)
        case .memfd(let name, let file, let seals):
            writer.writeUInt8(3); writer.writeString(name); writeCarried(file); writer.writeUInt32(seals)
        case .duplicate(let original): writer.writeUInt8(4); writer.writeInt32(original)
        case .pipe(let end):
            writer.writeUInt8(5); writer.writeInt32(end.channel); writer.writeBool(end.isReadEnd)
            writer.writeInt32(end.capacityByteCount); writer.writeBytes(end.buffered)
        case .treePipe(let end):
            writer.writeUInt8(14); writer.writeInt32(end.pipe); writer.writeBool(end.isReadEnd)
            writer.writeInt32(end.capacityByteCount); writer.writeBytes(end.buffered)
        case .eventCounter(let count, let semaphore): writer.writeUInt8(6); writer.writeUInt64(count); writer.writeBool(semaphore)
        case .signalQueue(let mask): writer.writeUInt8(7); writer.writeUInt64(mask)
        case .timer(let timer):
            writer.writeUInt8(8); writer.writeInt32(timer.clock); writer.writeUInt64(timer.ticks); writer.writeInt32(timer.settimeFlags)
            writer.writeUInt64(timer.valueNanoseconds); writer.writeUInt64(timer.intervalNanoseconds)
        case .eventPoll(let entries):
            writer.writeUInt8(9)
            writer.writeArray(entries) { writer, entry in
                writer.writeInt32(entry.descriptor); writer.writeUInt32(entry.events); writer.writeUInt64(entry.data)
            }
        case .memfdOfMapping(let start, let end, let seals):
            writer.writeUInt8(11); writer.writeUInt64(start); writer.writeUInt64(end); writer.writeUInt32(seals)
        case .unixSocket(let end):
            writer.writeUInt8(10); writer.writeInt32(end.type); writer.writeInt32(end.peer)
            writer.writeArray(end.queued) { writer, message in writer.writeBytes(message) }
            writer.writeUInt8(end.shutdown); writer.writeInt32(end.sendBufferByteCount); writer.writeInt32(end.receiveBufferByteCount)
        case .tcpSocket(let end): writer.writeUInt8(12); end.encode(into: &writer)
        case .inotify(let watches):
            writer.writeUInt8(13)
            writer.writeArray(watches) { writer, watch in
                writer.writeInt32(watch.watchDescriptor); writer.writeString(watch.path); writer.writeUInt32(watch.mask)
            }
        }
    }

    /// Bounds each length; relations between records (a dup's original, a pipe's other end, a socket's
    /// peer, an epoll's targets) are checked by `validate`.
    static func decode(_ reader: inout BinaryReader) throws(ImageError) -> OpenFile {
        let descriptor = try reader.readInt32()
        guard descriptor >= 0 else { throw .malformedMetadata(reason: "fd \(descriptor)") }
        var file = OpenFile(descriptor: descriptor, path: try reader.readString(maximumByteCount: KernelLimits.pathByteCountMax),
                            flags: try reader.readInt32(), position: try reader.readInt64())
        let limit = DescriptorLimits.carriedByteCountMax
        func readCarried() throws(ImageError) -> CarriedFile {
            CarriedFile(contents: try reader.readBytes(maximumByteCount: limit), mode: try reader.readUInt32(),
                        userID: try reader.readUInt32(), groupID: try reader.readUInt32())
        }
        switch try reader.readUInt8() {
        case 0: file.kind = .regular
        case 1: file.kind = .directory
        case 2: file.kind = .deletedFile(try readCarried())
        case 3:
            let name = try reader.readString(maximumByteCount: 249)  // MFD_NAME_MAX_LEN
            file.kind = .memfd(name: name, file: try readCarried(), seals: try reader.readUInt32())
        case 4: file.kind = .duplicate(of: try reader.readInt32())
        case 5:
            file.kind = .pipe(PipeEnd(channel: try reader.readInt32(), isReadEnd: try reader.readBool(),
                                      capacityByteCount: try reader.readInt32(), buffered: try reader.readBytes(maximumByteCount: limit)))
        case 14:
            file.kind = .treePipe(TreePipeEnd(pipe: try reader.readInt32(), isReadEnd: try reader.readBool(),
                                              capacityByteCount: try reader.readInt32(), buffered: try reader.readBytes(maximumByteCount: limit)))
        case 6: file.kind = .eventCounter(count: try reader.readUInt64(), semaphore: try reader.readBool())
        case 7: file.kind = .signalQueue(mask: try reader.readUInt64())
        case 8:
            file.kind = .timer(TimerDescriptor(clock: try reader.readInt32(), ticks: try reader.readUInt64(), settimeFlags: try reader.readInt32(),
                                               valueNanoseconds: try reader.readUInt64(), intervalNanoseconds: try reader.readUInt64()))
        case 9:
            file.kind = .eventPoll(try reader.readArray(maximumCount: DescriptorLimits.epollEntryCountMax) { (reader) throws(ImageError) in
                EpollEntry(descriptor: try reader.readInt32(), events: try reader.readUInt32(), data: try reader.readUInt64())
            })
        case 10:
            let type = try reader.readInt32(), peer = try reader.readInt32()
            let queued = try reader.readArray(maximumCount: DescriptorLimits.queuedMessageCountMax) { (reader) throws(ImageError) in
                try reader.readBytes(maximumByteCount: limit)
            }
            file.kind = .unixSocket(UnixSocketEnd(type: type, peer: peer, queued: queued, shutdown: try reader.readUInt8(),
                                                  sendBufferByteCount: try reader.readInt32(), receiveBufferByteCount: try reader.readInt32()))
        case 11:
            file.kind = .memfdOfMapping(mappingStart: try reader.readUInt64(), mappingEnd: try reader.readUInt64(), seals: try reader.readUInt32())
        case 12: file.kind = .tcpSocket(try TCPSocketEnd.decode(&reader, descriptor: descriptor))
        case 13:
            file.kind = .inotify(try reader.readArray(maximumCount: DescriptorLimits.inotifyWatchCountMax) { (reader) throws(ImageError) in
                InotifyWatch(watchDescriptor: try reader.readInt32(), path: try reader.readString(maximumByteCount: KernelLimits.pathByteCountMax),
                             mask: try reader.readUInt32())
            })
        case let other: throw .malformedMetadata(reason: "fd \(descriptor) has unknown kind \(other)")
        }
        return file
    }
}
