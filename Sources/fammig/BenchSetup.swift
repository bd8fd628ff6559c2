// What `bench` and `study` set up once, before any measurement: a work directory, the FAM pool the
// images go to (made and pre-faulted once, as a node would: no migration pays for FAM allocation), the
// node network, and the raw baselines the figures are compared with.
import ArgumentParser
import Engine
import Foundation
import Sys

final class BenchSetup {
    let workDirectory: String
    let pool: FAMPool?
    let network: NodeNetwork?
    private let temporaryPoolPath: String?

    init(largestMebibytes: Int, pool poolPath: String?, famFiles: Bool, netns: Bool, link: LinkRate?) throws {
        workDirectory = try makeWorkDirectory()
        temporaryPoolPath = famFiles || poolPath != nil ? nil : "/dev/shm/fammig-bench-pool-\(getpid())"
        do {
            if let temporaryPoolPath {
                _ = try PoolFile.create(path: temporaryPoolPath, byteCount: (largestMebibytes * 3 / 2 + 64) << 20, slotCount: 16)
                pool = try PoolFile.open(path: temporaryPoolPath, prefault: true)
            } else {
                pool = try poolPath.map { try PoolFile.open(path: $0, prefault: true) }
            }
            network = netns ? try NodeNetwork(tag: getpid(), link: link) : nil
        } catch {
            if let temporaryPoolPath { _ = try? SharedMapping.remove(path: temporaryPoolPath) }
            removeWorkDirectory(workDirectory)
            throw error
        }
    }

    func close() {
        network?.remove()
        if let temporaryPoolPath { _ = try? SharedMapping.remove(path: temporaryPoolPath) }
        removeWorkDirectory(workDirectory)
    }

    var poolDescription: String {
        pool.map { "extents of the pool \($0.backend.path ?? "")" } ?? "a FAM file per migration, made before the freeze"
    }

    var linkDescription: String {
        network.map { "veth between two network namespaces" + ($0.link.map { ", tbf \($0)" } ?? "") } ?? "loopback"
    }

    /// UFFDIO_COPY from FAM, a TCP round trip and TCP bandwidth across the node network (or loopback);
    /// printed as they are measured.
    func measureBaselines() throws -> Bench.BaselineFigures {
        var baselines = Bench.BaselineFigures()
        baselines.userfaultfdCopyMicroseconds = try Self.userfaultfdBaseline()
        baselines.pageCodeMicroseconds = Self.pageCodeBaseline()
        baselines.tcpRoundTripMicroseconds = try Self.tcpRoundTripBaseline(network: network)
        baselines.tcpGigabitsPerSecond = try Self.tcpBandwidthBaseline(network: network)
        print(String(format: "baselines: UFFDIO_COPY from FAM %.2f us per 4 KiB, page code (HMAC-SHA256 of 4 KiB, the mark check) %.2f us, "
                     + "TCP (%@) round trip %.1f us and %.2f Gb/s, flush %@",
                     baselines.userfaultfdCopyMicroseconds, baselines.pageCodeMicroseconds, linkDescription as NSString, baselines.tcpRoundTripMicroseconds,
                     baselines.tcpGigabitsPerSecond, "\(FlushInstruction.best())" as NSString))
        return baselines
    }

    static func userfaultfdBaseline() throws -> Double {
        let path = "/dev/shm/fammig-bench-uffd-\(getpid()).img"
        let pageCount = 1 << 12
        let mapping = try SharedMapping.create(path: path, byteCount: pageCount * .pageSize, prefault: true)
        defer { mapping.close(); _ = try? SharedMapping.remove(path: path) }
        return try Baselines.userfaultfdCopyMicroseconds(from: mapping, pageCount: pageCount)
    }

    /// Median microseconds of one page's mark code (`ImageAuthenticator.markDigest`, HMAC-SHA256 of a 4 KiB
    /// page where it lies in a larger copy): what every page read from FAM costs on top of its copy.
    static func pageCodeBaseline() -> Double {
        let authenticator = ImageAuthenticator(key: MigrationKey.generate())
        let pageCount = 1 << 10
        let pages = (0..<(pageCount * .pageSize)).map { UInt8(truncatingIfNeeded: $0 &* 131) }
        let headerCode = [UInt8](repeating: 3, count: 32)
        var samples: [Double] = []
        samples.reserveCapacity(pageCount)
        var sink: UInt64 = 0
        let clock = ContinuousClock()
        for page in 0..<pageCount {
            let before = clock.now
            sink ^= authenticator.markDigest(page: pages[(page * .pageSize)..<((page + 1) * .pageSize)], generation: MigrationPlan.singleGeneration,
                                             address: UInt64(page) * .pageSize, headerCode: headerCode)
            let elapsed = clock.now - before
            samples.append(Double(elapsed.components.attoseconds) / 1e12 + Double(elapsed.components.seconds) * 1e6)
        }
        // Every code is used (so none of the calls can be left out), and 1,024 codes of distinct pages fold
        // to zero only by a 2^-64 chance.
        precondition(sink != 0, "the page codes of distinct pages folded to zero")
        samples.sort()
        return samples[samples.count / 2]
    }

    /// A connection from the target's side (client) to the source's (server), across the node network if any.
    static func connectedPair(network: NodeNetwork?) throws -> (client: TCPTransport, server: TCPTransport) {
        let listener = try network.map { network in
            try network.inside(network.sourceNamespace) { try TCPTransport.listen(on: Endpoint(host: network.sourceAddress, port: 0)) }
        } ?? TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let client = try network.map { network in
            try network.inside(network.targetNamespace) { try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000) }
        } ?? TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
        guard let server = try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000) else { throw EngineError.timedOut("baseline accept") }
        return (client, server)
    }

    /// Source to target: 512 MiB as 2 MiB `pages` messages, timed at the receiver.
    static func tcpBandwidthBaseline(network: NodeNetwork?) throws -> Double {
        let (client, server) = try connectedPair(network: network)
        defer { client.close(); server.close() }
        let chunk = [UInt8](repeating: 5, count: 2 << 20)
        let messageCount = 256
        let sender = Thread {
            for index in 0..<messageCount { try? server.send(.pages(address: UInt64(index) << 21, bytes: chunk)) }
        }
        let start = ContinuousClock.now
        sender.start()
        var received = 0
        while received < messageCount {
            // False also when only part of a frame is in: wait again, within the whole run's limit.
            guard ContinuousClock.now - start < .seconds(60) else { throw EngineError.timedOut("bandwidth baseline") }
            guard client.waitReadable(timeoutMilliseconds: 100) else { continue }
            if case .pages? = try client.receive() { received += 1 }
        }
        let elapsed = ContinuousClock.now - start
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return Double(messageCount * chunk.count * 8) / seconds / 1e9
    }

    /// Median of 2,000 round trips of a page request and a 4 KiB answer over TCP (loopback, or the node network).
    static func tcpRoundTripBaseline(network: NodeNetwork?) throws -> Double {
        let (client, server) = try connectedPair(network: network)
        defer { client.close(); server.close() }
        let page = [UInt8](repeating: 7, count: .pageSize)
        let echo = Thread {
            for _ in 0..<2000 {
                while !server.waitReadable(timeoutMilliseconds: 1000) {}
                guard case .pageRequest(let address)? = try? server.receive() else { return }
                try? server.send(.pages(address: address, bytes: page))
            }
        }
        echo.start()
        var samples: [Double] = []
        let clock = ContinuousClock()
        for index in 0..<2000 {
            let before = clock.now
            try client.send(.pageRequest(address: UInt64(index) * .pageSize))
            while !client.waitReadable(timeoutMilliseconds: 1000) {}
            _ = try client.receive()
            let elapsed = clock.now - before
            samples.append(Double(elapsed.components.attoseconds) / 1e12 + Double(elapsed.components.seconds) * 1e6)
        }
        samples.sort()
        return samples[samples.count / 2]
    }
}
