/// postcopy-fam: metadata into FAM first (the target starts then), pages in the background, pages the
/// target asks for first; faults served from FAM once marked; the victim is killed when the commit record
/// is durable. With push, the target's pusher installs the rest from FAM.
struct PostcopyFAM: MigrationModeDefinition {
    var wireCode: UInt8 { 2 }
    var isPostcopy: Bool { true }
    var usesFAM: Bool { true }
    func sourceStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any SourcePageStrategy {
        PostcopyFAMDump(transport: try requiredLink(transport, .postcopyFAM))
    }
    func targetStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any TargetPageStrategy {
        LazyFromFAM(transport: try requiredLink(transport, .postcopyFAM))
    }
    func runsPusher(_ plan: MigrationPlan) -> Bool { plan.push }
}
