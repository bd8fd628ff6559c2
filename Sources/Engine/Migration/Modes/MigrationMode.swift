// Why this file exists: the modes, registered in one place. A mode is a case below (its raw value is what
// the command line spells), its line in `definition`, and a folder beside this file holding its
// definition (a `MigrationModeDefinition`: handshake number, whether it is post-copy and uses FAM, the
// strategies it makes, whether the target pushes) and its two page strategies, the source's
// (`SourcePageStrategy`, Actors/Source) and the target's (`TargetPageStrategy`, Actors/Target). Nothing
// else names a mode to decide what the engine does: Migration.source and .target ask the definition.

/// What one mode is to the engine. Made by `MigrationMode.definition` only.
protocol MigrationModeDefinition {
    /// The mode's number in the handshake's frames and its proof (SecureChannel): fixed per mode, so
    /// that a mode added later changes no other mode's number.
    var wireCode: UInt8 { get }
    /// Whether the target resumes before every page is in (the fault handler then runs beside the restorer).
    var isPostcopy: Bool { get }
    /// Whether the source writes an image into FAM.
    var usesFAM: Bool { get }
    /// The source's page strategy for `plan`, over `transport` (nil: the nodes have no link).
    func sourceStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any SourcePageStrategy
    /// The target's page strategy for `plan`, over `transport`.
    func targetStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any TargetPageStrategy
    /// Whether the target runs the pusher beside the fault handler.
    func runsPusher(_ plan: MigrationPlan) -> Bool
}

extension MigrationModeDefinition {
    /// The link a mode needs, or the setup error that names its mode.
    func requiredLink(_ transport: (any Transport)?, _ mode: MigrationMode) throws(MigrationSetupError) -> any Transport {
        guard let transport else { throw .transportMissing(mode) }
        return transport
    }
}

/// How a process moves. The raw values are what every command line and report spells.
public enum MigrationMode: String, Sendable, CaseIterable, Codable {
    /// Everything into FAM while the victim is frozen; the target starts after the commit.
    case nonlive
    /// No FAM: state and pages over the socket; the frozen victim lives until every page was sent.
    case postcopySocket = "postcopy-socket"
    /// Metadata into FAM first (the target starts then), pages in the background, faults served from
    /// FAM once marked, the rest asked of the source; the victim is killed at the commit.
    case postcopyFAM = "postcopy-fam"

    /// What the mode is to the engine: the one switch over the modes (each in its folder beside this file).
    var definition: any MigrationModeDefinition {
        switch self {
        case .nonlive: Nonlive()
        case .postcopySocket: PostcopySocket()
        case .postcopyFAM: PostcopyFAM()
        }
    }

    /// Whether the target resumes before every page is in (a fault handler serves the rest).
    public var isPostcopy: Bool { definition.isPostcopy }
    /// Whether the source writes an image into FAM.
    public var usesFAM: Bool { definition.usesFAM }
    /// The mode's number in the handshake's frames and its proof (SecureChannel).
    public var wireCode: UInt8 { definition.wireCode }
}
