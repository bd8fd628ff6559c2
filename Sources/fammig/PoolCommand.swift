// `fammig pool`: make, list and collect a FAM pool, the pre-allocated, pre-faulted FAM region that holds
// many images (Engine/FAM/FAMPool.swift); and `PoolImage`, one migration's extent in it as the source's
// `makeBackend` and the target's `openBackend`.
import ArgumentParser
import Engine
import Foundation
import Sys

struct Pool: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make, list and clean a FAM pool: one pre-faulted FAM region whose extents hold many images.",
        subcommands: [Create.self, List.self, Collect.self, Free.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create",
                                                        abstract: "Make a new pool file, reserve and pre-fault all of it, and write an empty extent table.")
        @Option(help: "The pool file to create (it must not exist), e.g. /dev/shm/fammig.pool or a file on a DAX file system.")
        var pool: String
        @Option(help: "The pool's size in MiB.")
        var mib: Int
        @Option(help: "Extent slots in the table (images the pool holds at once).")
        var slots: Int = FAMPool.defaultSlotCount

        func validate() throws {
            guard mib >= 4 && mib <= 1 << 20 else { throw ValidationError("--mib takes 4 to 1048576.") }
            guard slots >= 1 && slots <= PoolHeader.maximumSlotCount else { throw ValidationError("--slots takes 1 to \(PoolHeader.maximumSlotCount).") }
            if ProcFS.exists(pool) { throw ValidationError("\(pool) already exists; pass a new path or remove it.") }
        }

        func run() throws {
            let made = try PoolFile.create(path: pool, byteCount: mib << 20, slotCount: slots)
            print("pool \(pool): \(made.header.poolByteCount >> 20) MiB, \(made.header.slotCount) slots, "
                  + "\((made.header.poolByteCount - made.header.dataOffset) >> 20) MiB for extents")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "Print the pool's extents and whether each owner still runs.")
        @Option(help: "The pool file.")
        var pool: String

        func run() throws {
            let opened = try PoolFile.open(path: pool, prefault: false)
            do {
                let extents = try opened.extents()
                print("pool \(pool): \(opened.header.poolByteCount >> 20) MiB, \(opened.header.slotCount) slots, "
                      + "\(extents.count) extents, \(try opened.freeByteCount() >> 20) MiB free")
                for extent in extents {
                    let life = extent.state == .owned ? (PoolOwner.isAliveOnThisMachine(extent.owner) ? " (alive)" : " (dead: gc reclaims it)") : ""
                    print("  \(extent)\(life)")
                }
            } catch { throw fail("\(error)", code: 2) }
        }
    }

    struct Collect: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "gc", abstract: "Free every extent whose owner is dead.")
        @Option(help: "The pool file.")
        var pool: String

        func run() throws {
            let opened = try PoolFile.open(path: pool, prefault: false)
            do {
                let reclaimed = try opened.collectGarbage()
                print("reclaimed \(reclaimed.count) extents (\(reclaimed.reduce(0) { $0 + $1.byteCount } >> 20) MiB)")
                for extent in reclaimed { print("  \(extent)") }
            } catch { throw fail("\(error)", code: 2) }
        }
    }

    struct Free: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "free", abstract: "Free one extent by slot (a kept checkpoint nobody will restore).")
        @Option(help: "The pool file.")
        var pool: String
        @Option(help: "The slot `fammig pool ls` shows.")
        var slot: Int

        func run() throws {
            let opened = try PoolFile.open(path: pool, prefault: false)
            do {
                guard let extent = try opened.extents().first(where: { $0.slot == slot }) else {
                    throw fail("slot \(slot) of \(pool) holds no extent; see `fammig pool ls --pool \(pool)`.", code: 2)
                }
                if extent.state == .owned && PoolOwner.isAliveOnThisMachine(extent.owner) {
                    throw fail("slot \(slot) belongs to a running migration (\(extent.owner)); let it finish.", code: 2)
                }
                guard try opened.free(extent) else { throw fail("slot \(slot) changed meanwhile; look again with `fammig pool ls`.", code: 2) }
                print("freed \(extent)")
            } catch let error as PoolError { throw fail("\(error)", code: 2) }
        }
    }
}

/// Opening and making pool files for the commands.
enum PoolFile {
    static func create(path: String, byteCount: Int, slotCount: Int) throws(ExitCode) -> FAMPool {
        do {
            let fam = try RealFAM.create(path: path, byteCount: byteCount, prefault: true)
            return try FAMPool.format(backend: fam, slotCount: slotCount, poolID: UInt64.random(in: 1...UInt64.max), lockPath: path)
        } catch let error as ImageError {
            throw fail("\(error)", code: 2)
        } catch {
            _ = try? SharedMapping.remove(path: path)
            throw fail("\(error)", code: 2)
        }
    }

    /// The pool at `path`, mapped read-write (only a file of this user that nobody else may write).
    /// `prefault` maps every page now: a node maps its pool once, so no migration pays page faults.
    static func open(path: String, prefault: Bool) throws(ExitCode) -> FAMPool {
        do {
            return try FAMPool.open(backend: RealFAM.openTrusted(path: path, writable: true, prefault: prefault), lockPath: path)
        } catch let error as ImageError {
            throw fail("\(error)", code: 2)
        } catch {
            throw fail("\(error)", code: 2)
        }
    }
}

/// One migration's image in a pool: the source side allocates its extent (`makeBackend`), the target
/// side finds it by the key's tag and claims it once its metadata is committed (`openBackend`), and
/// `release()` frees whatever this side still holds at the end. Both sides may live in one process.
final class PoolImage: @unchecked Sendable {
    let pool: FAMPool
    let tag: UInt64
    private let lock = NSLock()
    private var sourceExtent: PoolExtent?
    private var targetExtent: PoolExtent?
    private var targetView: ExtentFAM?

    init(pool: FAMPool, key: MigrationKey) {
        self.pool = pool
        self.tag = key.poolTag
    }

    func makeBackend() -> (Int) throws(ImageError) -> any FAMBackend {
        { [self] (byteCount) throws(ImageError) in
            lock.lock()
            defer { lock.unlock() }
            do {
                    // A second call replaces the first extent (the dumper's estimate was too small).
                if let previous = sourceExtent { try pool.free(previous); sourceExtent = nil }
                let extent = try pool.allocate(byteCount: byteCount, tag: tag, owner: .current())
                sourceExtent = extent
                return pool.view(of: extent)
            } catch { throw .pool("\(error)") }
        }
    }

    func openBackend() -> () throws(ImageError) -> (any FAMBackend)? {
        { [self] () throws(ImageError) in
            lock.lock()
            defer { lock.unlock() }
            if let targetView { return targetView }
            do {
                guard let extent = try pool.find(tag: tag) else { return nil }
                let view = pool.view(of: extent)
                // Until the metadata is committed the source may still replace the extent: look, don't take.
                guard let state = ImageReader.peekState(backend: view), state != .creating else { return view }
                guard let claimed = try pool.claim(tag: tag, owner: .current()) else { return nil }
                targetExtent = claimed
                targetView = pool.view(of: claimed)
                return targetView
            } catch { throw .pool("\(error)") }
        }
    }

    /// Keeps the source's extent past this process (a committed checkpoint for a later restore).
    func keepSourceExtent() throws(PoolError) {
        lock.lock()
        defer { lock.unlock() }
        if let extent = sourceExtent { _ = try pool.keep(extent); sourceExtent = nil }
    }

    /// Gives a claimed kept image back to the pool as kept (a restore that failed: try again later).
    func keepTargetExtent() throws(PoolError) {
        lock.lock()
        defer { lock.unlock() }
        if let extent = targetExtent { _ = try pool.keep(extent); targetExtent = nil; targetView = nil }
    }

    /// Frees what this side holds: the target's claimed extent, or the source's if nobody claimed it.
    func release() {
        lock.withLock {
            if let extent = targetExtent { _ = try? pool.free(extent) }
            if let extent = sourceExtent { _ = try? pool.free(extent) }
            targetExtent = nil
            sourceExtent = nil
            targetView = nil
        }
    }
}
