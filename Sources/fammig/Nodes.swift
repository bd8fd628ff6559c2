// The two nodes of a `fammig run`, built for the chosen mode: the source's dumper and the target's
// restorer, plus (post-copy) the target's fault handler and pusher, joined by a real TCP connection on
// loopback. Each actor gets its own thread from the threaded driver.
import Engine
import Logging
import Oracles
import Sys

/// Where a migration's image goes: a FAM file of its own, or an extent of a pool.
enum ImageStorage {
    case file(String)
    case pool(FAMPool)
}

struct Nodes {
    var actors: [any EngineActor]
    var restorer: Restorer
    var transports: [any Transport]
    /// The image's extent when the storage is a pool: `close()` frees it.
    var poolImage: PoolImage?

    var transportByteCount: Int { transports.reduce(0) { $0 + $1.bytesSent } }

    func close() {
        transports.forEach { $0.close() }
        poolImage?.release()
    }

    static func make(mode: MigrationMode, push: Bool, victim: ProcessID, storage: ImageStorage, stubPath: String, separateNodes: Bool,
                     oracles: MigrationOracles?, clock: MonotonicClock, timeline: MigrationTimeline, metrics: FaultMetrics,
                     logger: Logger, network: NodeNetwork? = nil,
                     stallTimeoutSeconds: Int32 = Int32(MigrationPlan.defaultStallTimeoutSeconds)) throws -> Nodes {
        let pidNamespace: PIDNamespace = separateNodes ? .fresh : .shared
        // Both nodes live in this process: the key never leaves its memory.
        let key = MigrationKey.generate()
        let makeBackend: (Int) throws(ImageError) -> any FAMBackend
        let openBackend: () throws(ImageError) -> (any FAMBackend)?
        var poolImage: PoolImage?
        switch storage {
        case .file(let famPath):
            makeBackend = makeRealBackend(path: famPath)
            openBackend = openRealBackend(path: famPath)
        case .pool(let pool):
            let image = PoolImage(pool: pool, key: key)
            makeBackend = image.makeBackend()
            openBackend = image.openBackend()
            poolImage = image
        }
        let plan = MigrationPlan(mode: mode, push: push, key: key, stallTimeout: .seconds(Int64(stallTimeoutSeconds)))
        let stallMilliseconds = stallTimeoutSeconds * 1000
        func nodes(source: (any Transport)?, target: (any Transport)?, imageIdentity: [UInt8]? = nil) throws -> Nodes {
            var plan = plan
            plan.imageIdentity = imageIdentity
            let sourceNode = try Migration.source(plan, victim: victim, ports: SourcePorts(
                makeBackend: makeBackend, transport: source, observer: oracles, clock: clock, timeline: timeline, logger: logger))
            let targetNode = try Migration.target(plan, ports: TargetPorts(
                openBackend: openBackend, transport: target, stubPath: stubPath, observer: oracles, clock: clock,
                timeline: timeline, metrics: metrics, logger: logger, pidNamespace: pidNamespace))
            return Nodes(actors: sourceNode.actors + targetNode.actors, restorer: targetNode.restorer,
                         transports: [source, target].compactMap { $0 }, poolImage: poolImage)
        }
        guard mode.isPostcopy else { return try nodes(source: nil, target: nil) }
        // With a node network, each side's socket lives in its node's network namespace: the connection
        // crosses a veth pair between two separate network stacks.
        let listener = try network.map { network in
            try network.inside(network.sourceNamespace) { try TCPTransport.listen(on: Endpoint(host: network.sourceAddress, port: 0)) }
        } ?? TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let targetSide = try network.map { network in
            try network.inside(network.targetNamespace) { try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000, stallTimeoutMilliseconds: stallMilliseconds) }
        } ?? TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000, stallTimeoutMilliseconds: stallMilliseconds)
        guard let sourceSide = try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000, stallTimeoutMilliseconds: stallMilliseconds) else {
            targetSide.close()
            throw EngineError.timedOut("the target's connection never arrived at the source")
        }
        oracles?.expectLazyPages()
        // The same handshake and sealed frames as two separate nodes use (SecureChannel.swift).
        let channel = try SecureChannel.establishBoth(source: sourceSide, target: targetSide, key: key,
                                                      agreement: ChannelAgreement(mode: mode, generation: plan.generation))
        return try nodes(source: channel.source, target: channel.target, imageIdentity: channel.source.imageIdentity)
    }
}
