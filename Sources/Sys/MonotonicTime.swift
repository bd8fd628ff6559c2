// CLOCK_MONOTONIC, the clock the test programs stamp their progress lines with (tp_now), so that a
// report can put a program's own times on the same axis as a migration's events.
#if canImport(Glibc)
import Glibc
#endif

public enum MonotonicTime {
    /// CLOCK_MONOTONIC now, as a duration since its (boot-time) origin.
    public static func now() -> Duration {
        var time = timespec()
        // CLOCK_MONOTONIC cannot fail with a valid timespec pointer: EINVAL/EFAULT would be our bug.
        let result = clock_gettime(CLOCK_MONOTONIC, &time)
        precondition(result == 0, "clock_gettime(CLOCK_MONOTONIC) failed")
        return .seconds(time.tv_sec) + .nanoseconds(time.tv_nsec)
    }
}
