// `torture`: the whole engine under seeded adversarial schedules (DESIGN.md §4), the CI correctness gate.
import ArgumentParser
import Torture

@main
struct TortureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "torture", abstract: "Run the engine under seeded adversarial schedules.")
    func run() throws {}
}
