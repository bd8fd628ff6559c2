/// nonlive: everything into FAM while the victim is frozen; the target starts after the commit.
struct Nonlive: MigrationModeDefinition {
    var wireCode: UInt8 { 0 }
    var isPostcopy: Bool { false }
    var usesFAM: Bool { true }
    func sourceStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any SourcePageStrategy {
        NonliveBatchDump()
    }
    func targetStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any TargetPageStrategy {
        EagerInstall()
    }
    func runsPusher(_ plan: MigrationPlan) -> Bool { false }
}
