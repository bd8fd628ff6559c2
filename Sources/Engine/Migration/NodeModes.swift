// How each node moves memory in each mode, as the dumper and the restorer branch on it; built only by
// Migration.source and Migration.target from a MigrationMode and the node's transport.

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
