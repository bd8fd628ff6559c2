// DirectoryTree.remove: a sweeper that finds its leftover already gone (another `fammig gc` removed it
// first) reports it removed. GCTests once failed on exactly that: "cannot remove work directory …: file
// doesn't exist".
import Foundation
import Testing
import Sys

@Suite struct DirectoryTreeTests {
    @Test func aTreeIsRemovedWithoutFollowingItsSymlinks() throws {
        let root = NSTemporaryDirectory() + "fammig-tree-test-\(getpid())"
        let outside = root + "-outside"
        try FileManager.default.createDirectory(atPath: root + "/a/b", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: outside) }
        FileManager.default.createFile(atPath: root + "/a/b/file", contents: Data([1, 2, 3]))
        FileManager.default.createFile(atPath: outside + "/kept", contents: Data([4]))
        try FileManager.default.createSymbolicLink(atPath: root + "/a/link", withDestinationPath: outside)
        try DirectoryTree.remove(root)
        #expect(!FileManager.default.fileExists(atPath: root))
        #expect(FileManager.default.fileExists(atPath: outside + "/kept"))
    }

    @Test func aTreeAlreadyGoneCountsAsRemoved() throws {
        let root = NSTemporaryDirectory() + "fammig-tree-gone-\(getpid())"
        #expect(!FileManager.default.fileExists(atPath: root))
        try DirectoryTree.remove(root)
    }
}
