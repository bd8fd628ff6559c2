// The image is untrusted input: before the restorer uses an address from it, the metadata and the page
// table must agree with each other and stay inside user space.
import Sys

extension ImageReader {
    /// The image's state word, read without verifying anything else (to wait for a commit); nil when
    /// the backend is too small to hold a superblock or the word is not a valid state.
    public static func peekState(backend: any FAMBackend) -> ImageState? {
        guard backend.byteCount >= ImageLayout.pageSize,
              backend.loadBytes(at: 0, count: ImageLayout.magic.count) == ImageLayout.magic else { return nil }
        return ImageLayout.state(fromWord: backend.loadUInt64(at: ImageLayout.stateWordOffset))
    }
}

extension ProcessState {
    /// Every dumped page must lie in a mapping that the restorer creates and may write.
    func validate(pageAddresses: [UInt64], path: String) throws(ImageError) {
        var mappingIndex = 0
        for (slot, address) in pageAddresses.enumerated() {
            while mappingIndex < mappings.count && mappings[mappingIndex].end <= address { mappingIndex += 1 }
            guard mappingIndex < mappings.count, mappings[mappingIndex].contains(address) else {
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "it lies in no mapping of the process")
            }
            switch mappings[mappingIndex].kind {
            case .vdsoPart, .vsyscall:
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "it lies in the vDSO")
            case .file where mappings[mappingIndex].shared:
                throw .badPageAddress(path: path, slot: slot, address: address, reason: "it lies in a shared file mapping")
            default: break
            }
        }
        for file in files where file.path.isEmpty || !file.path.hasPrefix("/") {
            throw .malformedMetadata(reason: "fd \(file.descriptor) has no absolute path")
        }
        guard executablePath.hasPrefix("/") else { throw .malformedMetadata(reason: "executable path '\(executablePath)' is not absolute") }
    }
}
