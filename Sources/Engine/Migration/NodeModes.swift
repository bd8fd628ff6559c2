// How each node moves memory in each mode, and the page strategy that does it (Actors/Source,
// Actors/Target); built only by Migration.source and Migration.target from a MigrationMode and the
// node's transport.

/// What the source does with the victim's memory.
public enum DumpMode: Sendable {
    /// Everything into FAM while the victim is frozen; the target starts after the commit.
    case nonlive
    /// Metadata into FAM first (the target starts then), pages in the background, pages the target
    /// asks for first; the victim is killed when the commit record is durable.
    case postcopyFAM(transport: any Transport)
    /// No FAM: state and pages over the socket; the frozen victim lives until every page was sent (or
    /// the target needs no more), then it is killed.
    case postcopySocket(transport: any Transport, push: Bool)
}

/// How the restorer gets pages.
public enum RestoreMode: Sendable {
    /// Nonlive: every page from a committed image, before the process runs.
    case eager
    /// postcopy-fam: metadata and pages from FAM once marked; requests for the rest to the source.
    case lazyFromFAM(transport: any Transport)
    /// postcopy-socket: metadata and every page over the socket.
    case lazyFromSocket(transport: any Transport)
}

extension DumpMode {
    /// The source strategy of this mode.
    func sourceStrategy(batchPageCount: Int) -> any SourcePageStrategy {
        switch self {
        case .nonlive: NonliveBatchDump()
        case .postcopyFAM(let transport): PostcopyFAMDump(transport: transport)
        case .postcopySocket(let transport, let push): SocketPageServer(transport: transport, push: push, batchPageCount: batchPageCount)
        }
    }
}

extension RestoreMode {
    /// The target strategy of this mode.
    func targetStrategy() -> any TargetPageStrategy {
        switch self {
        case .eager: EagerInstall()
        case .lazyFromFAM(let transport): LazyFromFAM(transport: transport)
        case .lazyFromSocket(let transport): LazyFromSocket(transport: transport)
        }
    }
}
