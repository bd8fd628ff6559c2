// Why this file exists: several fammig processes may sweep the same leftovers at once (two `fammig gc`,
// or a gc beside a run's own cleanup). Removing a directory tree another sweeper is removing too must
// count an entry that vanished under it as removed, not as a failure.
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

public enum DirectoryTree {
    /// Removes `path` and everything under it, never following a symlink. Returns once nothing is left
    /// there, also when it was never there or another process removed it (wholly or in part) meanwhile;
    /// throws why something stays.
    public static func remove(_ path: String) throws(SyscallError) {
        var status = stat()
        guard lstat(path, &status) == 0 else {
            if Glibc.errno == ENOENT { return }
            throw SyscallError.current("lstat(\(path))")
        }
        if status.st_mode & S_IFMT == S_IFDIR {
            let names: [String]
            do { names = try ProcFS.directoryEntries(path) } catch let error as SyscallError {
                if error.errno == .noSuchFileOrDirectory { return }
                throw error
            } catch { throw SyscallError(call: "opendir(\(path))", errno: .ioError) }
            // Bounded by the tree's depth: each call goes one directory down.
            for name in names { try remove(path + "/" + name) }
            if rmdir(path) != 0 && Glibc.errno != ENOENT { throw SyscallError.current("rmdir(\(path))") }
        } else if unlink(path) != 0 && Glibc.errno != ENOENT {
            throw SyscallError.current("unlink(\(path))")
        }
    }
}
