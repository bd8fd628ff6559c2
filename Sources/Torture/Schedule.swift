// Why this file exists: a schedule written down. The driver records which actor it let move at each
// step (and which of that actor's choices); a replay can follow such a script instead of the seeded
// scheduler. That is what the shrinker cuts: picks that the failure does not need are left out, and
// what is left is a replay command whose schedule a reader can follow step by step.

/// One step of a schedule: the actor that moved and which of its choices it took (the link's two
/// directions, in their fixed order; every other actor offers one).
public struct SchedulePick: Sendable, Codable, Equatable, CustomStringConvertible {
    public var actor: ActorName
    public var index: Int

    public init(actor: ActorName, index: Int = 0) {
        self.actor = actor
        self.index = index
    }

    public var description: String { index == 0 ? actor.rawValue : "\(actor.rawValue).\(index)" }
}

public enum ScheduleScript {
    /// Picks as the command line spells them: comma-separated, a repeat as `*N` (`dumper*4,link.1,target`);
    /// no pick at all is `none` (the fair order from the first step).
    public static func encode(_ picks: [SchedulePick]) -> String {
        if picks.isEmpty { return "none" }
        var parts: [String] = []
        var position = 0
        while position < picks.count {
            var count = 1
            while position + count < picks.count && picks[position + count] == picks[position] { count += 1 }
            parts.append(count == 1 ? picks[position].description : "\(picks[position])*\(count)")
            position += count
        }
        return parts.joined(separator: ",")
    }

    /// Reads `encode`'s form; a failure names the entry that is wrong.
    public static func decode(_ text: String) -> Result<[SchedulePick], ScheduleScriptError> {
        var picks: [SchedulePick] = []
        if text == "none" { return .success([]) }
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let pieces = part.split(separator: "*", omittingEmptySubsequences: false)
            guard pieces.count <= 2, let name = pieces.first, !name.isEmpty else { return .failure(.badEntry(String(part))) }
            var count = 1
            if pieces.count == 2 {
                guard let repeated = Int(pieces[1]), repeated >= 1, repeated <= 1_000_000 else { return .failure(.badEntry(String(part))) }
                count = repeated
            }
            // An actor name may hold a dot of its own only as the choice index (none of the names has one).
            let nameAndIndex = name.split(separator: ".", omittingEmptySubsequences: false)
            guard nameAndIndex.count <= 2, let actor = ActorName(rawValue: String(nameAndIndex[0])) else {
                return .failure(.unknownActor(String(nameAndIndex[0])))
            }
            var index = 0
            if nameAndIndex.count == 2 {
                guard let chosen = Int(nameAndIndex[1]), chosen >= 0, chosen < 64 else { return .failure(.badEntry(String(part))) }
                index = chosen
            }
            picks.append(contentsOf: repeatElement(SchedulePick(actor: actor, index: index), count: count))
            guard picks.count <= 10_000_000 else { return .failure(.tooLong) }
        }
        return .success(picks)
    }
}

public enum ScheduleScriptError: Error, CustomStringConvertible {
    case badEntry(String)
    case unknownActor(String)
    case tooLong

    public var description: String {
        switch self {
        case .badEntry(let entry): "'\(entry)' is not a schedule entry; write ACTOR, ACTOR.CHOICE or ACTOR*COUNT (e.g. dumper*4,link.1,target)"
        case .unknownActor(let name): "'\(name)' is not an actor; use one of \(ActorName.allCases.map(\.rawValue).joined(separator: ", "))"
        case .tooLong: "the schedule holds more than 10,000,000 steps"
        }
    }
}
