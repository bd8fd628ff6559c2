/// postcopy-socket: no FAM; state and pages over the socket; the frozen victim lives until every page was
/// sent (or the target needs no more), then it is killed. With push, the source sends pages nobody asked for.
struct PostcopySocket: MigrationModeDefinition {
    var wireCode: UInt8 { 1 }
    var isPostcopy: Bool { true }
    var usesFAM: Bool { false }
    func sourceStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any SourcePageStrategy {
        SocketPageServer(transport: try requiredLink(transport, .postcopySocket), push: plan.push, batchPageCount: plan.batchPageCount)
    }
    func targetStrategy(_ plan: MigrationPlan, transport: (any Transport)?) throws(MigrationSetupError) -> any TargetPageStrategy {
        LazyFromSocket(transport: try requiredLink(transport, .postcopySocket))
    }
    func runsPusher(_ plan: MigrationPlan) -> Bool { false }
}
