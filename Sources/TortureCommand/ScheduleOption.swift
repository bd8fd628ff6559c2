// Why this file exists: `--schedule`'s text, read into the picks a scripted replay follows (Schedule.swift).
import ArgumentParser
import Torture

func parseSchedule(_ text: String) throws -> [SchedulePick] {
    switch ScheduleScript.decode(text) {
    case .success(let picks): return picks
    case .failure(let error): throw ValidationError("--schedule: \(error).")
    }
}
