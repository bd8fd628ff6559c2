// The migration key on disk: made by the node that writes the image (`checkpoint`, `source`), carried
// to the node that reads it (`restore`, `inspect`, `target`) out of band, never through FAM. The file is
// one line, "fammig-migration-key-v1 " and 64 hex digits; it is created 0600 and O_EXCL, and a key file
// that another user owns or that group or others may read is refused: whoever can read the key can
// write an image this node will restore.
import ArgumentParser
import Engine
import Sys

/// Where a reading command takes the key from: `--key-file PATH` or `--key-fd N`, exactly one.
struct KeySourceOptions: ParsableArguments {
    @Option(help: "The key file the source node wrote (mode 0600, owned by this user): the image (and the source) must verify under it.")
    var keyFile: String?

    @Option(help: "A descriptor to read the key from instead (one key line, as in a key file; read to its end and closed first).")
    var keyFd: Int32?

    func validate() throws {
        guard (keyFile == nil) != (keyFd == nil) else { throw ValidationError("pass the migration key: --key-file PATH or --key-fd N (one of them).") }
        if let keyFd, keyFd < 0 { throw ValidationError("--key-fd takes a descriptor number, 0 or more.") }
    }

    func read() throws(ExitCode) -> MigrationKey {
        if let keyFd { return try KeyFile.read(descriptor: keyFd) }
        return try KeyFile.read(path: keyFile ?? "")
    }
}

/// Where a writing command (`checkpoint`, `source`) puts the new key: `--key-file PATH` or `--key-fd N`.
struct KeySinkOptions: ParsableArguments {
    @Option(help: "The key file to create (mode 0600; it must not exist). The image and the connection are authenticated with this new key: hand the file to the node that reads the image, out of band.")
    var keyFile: String?

    @Option(help: "A descriptor to write the new key to instead (one key line, then closed): a pipe, or a file only this user may read.")
    var keyFd: Int32?

    func validate() throws {
        guard (keyFile == nil) != (keyFd == nil) else { throw ValidationError("say where the new migration key goes: --key-file PATH or --key-fd N (one of them).") }
        if let keyFd, keyFd < 0 { throw ValidationError("--key-fd takes a descriptor number, 0 or more.") }
    }

    /// A new key, written where the options say.
    func create() throws(ExitCode) -> MigrationKey {
        if let keyFd { return try KeyFile.create(descriptor: keyFd) }
        return try KeyFile.create(path: keyFile ?? "")
    }

    /// After a failed migration, its key is worth nothing: the file goes (a descriptor was closed already).
    func removeCreated() {
        if let keyFile { PrivateFile.remove(path: keyFile) }
    }
}

enum KeyFile {
    static let header = "fammig-migration-key-v1 "

    /// A new key, written to a new file at `path` (which must not exist).
    static func create(path: String) throws(ExitCode) -> MigrationKey {
        let key = MigrationKey.generate()
        do { try PrivateFile.create(path: path, bytes: Array(line(key).utf8)) } catch {
            if error.errno == .fileExists {
                throw fail("--key-file \(path) already exists; pass a new path (each migration gets a key of its own).", code: 2)
            }
            throw fail("cannot create the key file \(path): \(error)", code: 2)
        }
        return key
    }

    /// A new key, written as one key line to `descriptor` (`--key-fd`), which is then closed. A regular
    /// file that another user owns, or that group or others may read or write, is refused before the
    /// key is made: the key would leak through it.
    static func create(descriptor: Int32) throws(ExitCode) -> MigrationKey {
        let described: PrivateFileContents
        do { described = try PrivateFile.describe(descriptor: descriptor) } catch {
            throw fail("cannot write the key to --key-fd \(descriptor): \(error); pass a descriptor open for writing.", code: 2)
        }
        if described.isRegularFile {
            let userID = ProcessIdentity.current().effectiveUserID
            guard described.ownerUserID == userID, described.permissionBits & 0o077 == 0 else {
                PrivateFile.close(descriptor: descriptor)
                throw fail("--key-fd \(descriptor) is a file of uid \(described.ownerUserID) with mode \(String(described.permissionBits, radix: 8)): "
                           + "others could read the key; refused (give a pipe, or a file of this user with mode 0600).", code: 2)
            }
        }
        let key = MigrationKey.generate()
        do { try PrivateFile.writeAndClose(descriptor: descriptor, bytes: Array(line(key).utf8)) } catch {
            throw fail("cannot write the key to --key-fd \(descriptor): \(error); pass a descriptor open for writing.", code: 2)
        }
        return key
    }

    /// The key file's one line.
    static func line(_ key: MigrationKey) -> String {
        header + key.bytes.map { byte in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined() + "\n"
    }

    /// The key in the file at `path`, after checking that only this user could have read or written it.
    static func read(path: String) throws(ExitCode) -> MigrationKey {
        let contents: PrivateFileContents
        do { contents = try PrivateFile.read(path: path, maxByteCount: 256) } catch {
            if error.errno == .tooManySymbolicLinkLevels {
                throw fail("--key-file \(path) is a symbolic link; pass the key file itself.", code: 2)
            }
            throw fail("cannot read the key file \(path): \(error); pass the key file the source node wrote.", code: 2)
        }
        guard contents.isRegularFile else { throw fail("--key-file \(path) is not a regular file.", code: 2) }
        let userID = ProcessIdentity.current().effectiveUserID
        guard contents.ownerUserID == userID else {
            throw fail("the key file \(path) belongs to uid \(contents.ownerUserID), not to this user (uid \(userID)); refused: "
                       + "copy it and own the copy (chown) if you trust whoever wrote it.", code: 2)
        }
        guard contents.permissionBits & 0o077 == 0 else {
            throw fail("the key file \(path) has mode \(String(contents.permissionBits, radix: 8)): group or others may read or write it; "
                       + "refused (chmod 600 it, and treat the key as leaked if others did read it).", code: 2)
        }
        return try parse(contents.bytes, source: "the key file \(path)")
    }

    /// The key on descriptor `descriptor` (`--key-fd`: a pipe or file the caller opened, read to its
    /// end and closed). Whoever could hand this process the descriptor already holds the key, so there
    /// is no owner or mode to check.
    static func read(descriptor: Int32) throws(ExitCode) -> MigrationKey {
        let bytes: [UInt8]
        do { bytes = try PrivateFile.readAndClose(descriptor: descriptor, maxByteCount: 256) } catch {
            throw fail("cannot read the key from --key-fd \(descriptor): \(error); pass a descriptor open for reading.", code: 2)
        }
        return try parse(bytes, source: "--key-fd \(descriptor)")
    }

    /// `bytes`: one key line; `source` names where it came from in the message.
    private static func parse(_ bytes: [UInt8], source: String) throws(ExitCode) -> MigrationKey {
        let text = String(decoding: bytes, as: UTF8.self)
        let digits = text.hasPrefix(header) ? text.dropFirst(header.count).trimmingSuffix(while: { $0 == "\n" }) : ""
        var bytes: [UInt8] = []
        var index = digits.startIndex
        while digits.count == 2 * MigrationKey.byteCount, index < digits.endIndex {
            let next = digits.index(index, offsetBy: 2)
            guard let byte = UInt8(digits[index..<next], radix: 16) else { break }
            bytes.append(byte)
            index = next
        }
        guard bytes.count == MigrationKey.byteCount, let key = try? MigrationKey(bytes: bytes) else {
            throw fail("\(source) is not a fammig migration key (one line: \"\(header)\" and \(2 * MigrationKey.byteCount) hex digits).", code: 2)
        }
        return key
    }
}

private extension Substring {
    func trimmingSuffix(while predicate: (Character) -> Bool) -> Substring {
        var end = endIndex
        while end > startIndex, predicate(self[index(before: end)]) { end = index(before: end) }
        return self[startIndex..<end]
    }
}
