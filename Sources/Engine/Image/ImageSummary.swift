// Why this file exists: `fammig inspect` prints what an image holds before the engine's decoded
// metadata, so that someone looking at a FAM file sees its state, sizes, regions and which checksums
// were verified, without reading hex.
import Sys

/// Human-readable facts about an opened image.
public struct ImageSummary: Sendable {
    public let lines: [String]

    /// Reads the current state and counts the stored marks now (the dump may still be running).
    public init(reader: ImageReader) {
        let layout = reader.layout
        var lines: [String] = []
        func line(_ label: String, _ value: String) {
            lines.append(Self.padded(label, to: 16) + value)
        }

        line("image", reader.path)
        line("format", "version \(ImageLayout.formatVersion), page size \(ImageLayout.pageSize) bytes")
        let currentState = (try? reader.currentState()).map { "\($0)" } ?? "damaged"
        line("state", "\(currentState) (\(reader.openedState) when opened)")
        line("generation", "\(reader.generation)")
        line("size", "\(layout.fileByteCount) bytes of a \(reader.backend.byteCount)-byte FAM file")
        line("superblock", "checksum \(hex(reader.superblockDigest)) OK")
        line("metadata", "\(layout.metadataByteCount) bytes, checksum \(hex(reader.metadataDigest)) OK")
        line("page table", "\(layout.pageCount) pages (\(layout.pageCount * ImageLayout.pageSize) bytes), checksum \(hex(reader.pageTableDigest)) OK")
        if let first = reader.pageAddresses.first, let last = reader.pageAddresses.last {
            line("addresses", "\(hex(first)) ... \(hex(last))")
        }
        line("authenticated", "header HMAC-SHA256 OK" + (reader.isVerifiedComplete ? ", commit record and marks HMAC-SHA256 OK" : ""))
        line("creator", "uid \(reader.creator.userID), gid \(reader.creator.groupID), permitted capabilities \(hex(reader.creator.permittedCapabilities))")
        line("dumped marks", "\(reader.storedMarkCount()) of \(layout.pageCount)")
        if reader.isVerifiedComplete, let marksDigest = reader.marksDigest {
            line("commit record", "marks checksum \(hex(marksDigest)) OK")
            line("pages", "all \(layout.pageCount) match their marks")
        } else {
            line("commit record", "not checked (opened without requiring a complete image)")
            line("pages", "not checked; each is checked against its mark when read")
        }
        lines.append("regions:")
        for kind in ImageRegionKind.allCases {
            let region = layout.region(kind)
            lines.append("  " + Self.padded("\(kind)", to: 14)
                         + "offset \(region.offset), \(region.byteCount) bytes")
        }
        self.lines = lines
    }

    /// Left-aligns `text` in a column (no Foundation in Engine).
    private static func padded(_ text: String, to width: Int) -> String {
        text + String(repeating: " ", count: max(1, width - text.count))
    }
}
