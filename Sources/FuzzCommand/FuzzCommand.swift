// The fuzz gate's command line: runs each target over the committed corpus (Tests/fuzz/corpus) for a
// fixed number of inputs (not a time: the same inputs on every machine), and prints the one command that
// makes a failing input again. A trap kills the process; `--progress FILE` names the input running at
// that moment, and scripts/fuzz turns it into that same command.
import ArgumentParser
import Engine
import Foundation
import Fuzzing

@main
struct FuzzCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuzz",
        abstract: "Fuzzes the image reader and the frame decoder with seeded mutations of a committed corpus.",
        discussion: """
            Targets: state (process state codec), frame (message decoder), stream (frame assembler over \
            TCP-like chunks), image (image reader: superblock, metadata, page table, marks, commit record, \
            pages; changed without the key, or sealed again with it as an insider would). Input I of a \
            target depends on --seed and I only. Exit 0: every oracle held; 1: an input broke one (its \
            replay command is printed); 2: usage or corpus error.
            """,
        subcommands: [Run.self, ImportImage.self, SeedFrames.self, SeedChannel.self],
        defaultSubcommand: Run.self)
}

struct CorpusOptions: ParsableArguments {
    @Option(help: "The corpus directory (one subdirectory per target).")
    var corpus = "Tests/fuzz/corpus"

    func load() throws -> FuzzCorpus {
        var entries: [FuzzTarget: [(name: String, bytes: [UInt8])]] = [:]
        for target in FuzzTarget.allCases {
            let directory = corpus + "/" + target.rawValue
            let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
            entries[target] = try names.filter { $0.hasSuffix(".bin") }.map { name in
                guard let data = FileManager.default.contents(atPath: directory + "/" + name) else {
                    throw ValidationError("cannot read corpus entry \(directory)/\(name)")
                }
                return (name, Array(data))
            }
        }
        return FuzzCorpus(entries: entries)
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Runs the targets for a fixed number of inputs each.")

    @OptionGroup var corpusOptions: CorpusOptions

    @Option(help: "Targets to run, comma-separated (state, frame, stream, image), or all.")
    var target = "all"

    @Option(help: "Inputs per target, the corpus entries first (a count, not a time: the gate is deterministic).")
    var inputs = 10_000

    @Option(help: "The campaign seed; input I of a target depends on it and I only.")
    var seed: UInt64 = 1

    @Option(help: "Run only this input (the number a failure or a trap printed).")
    var input: Int?

    @Option(help: "Write the input's bytes to this file before running it (to add it to the corpus).")
    var writeInput: String?

    @Option(help: "A file that holds the target and input running now, so a trap can be named and replayed.")
    var progress: String?

    func validate() throws {
        guard inputs >= 0 else { throw ValidationError("--inputs must be 0 or more.") }
        if input != nil && target == "all" { throw ValidationError("--input needs one --target (the one the failure named).") }
        _ = try targets()
    }

    func targets() throws -> [FuzzTarget] {
        if target == "all" { return FuzzTarget.allCases }
        return try target.split(separator: ",").map { name in
            guard let target = FuzzTarget(rawValue: String(name)) else {
                throw ValidationError("unknown target '\(name)'; pass one of \(FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")), or all.")
            }
            return target
        }
    }

    func run() throws {
        let corpus = try corpusOptions.load()
        let targets = try targets()
        for target in targets where corpus.count(target) == 0 {
            print("fuzz: no corpus entries under \(corpusOptions.corpus)/\(target.rawValue); pass --corpus DIR.")
            throw ExitCode(2)
        }
        let fuzzer = Fuzzer(corpus: corpus, seed: seed)
        let progressHandle = try progress.map { path -> FileHandle in
            guard FileManager.default.createFile(atPath: path, contents: nil) else { throw ValidationError("cannot create --progress \(path)") }
            return try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        }
        var failureCount = 0
        for target in targets {
            let indexes = input.map { [$0] } ?? Array(0..<max(inputs, corpus.count(target)))
            var failures: [(index: Int, problem: String)] = []
            var acceptedCount = 0
            let started = ContinuousClock.now
            for index in indexes {
                let fuzzInput = fuzzer.input(target, index: index)
                if let progressHandle {
                    try progressHandle.seek(toOffset: 0)
                    progressHandle.write(Data("\(target.rawValue) \(index)\n".utf8))
                }
                if let writeInput {
                    guard FileManager.default.createFile(atPath: writeInput, contents: Data(fuzzInput.bytes)) else {
                        throw ValidationError("cannot write --write-input \(writeInput)")
                    }
                }
                switch fuzzer.run(target, input: fuzzInput) {
                case .refused: break
                case .accepted: acceptedCount += 1
                case .broken(let problem): failures.append((index, problem))
                }
            }
            let elapsed = ContinuousClock.now - started
            print("fuzz \(target.rawValue): \(indexes.count) inputs (\(corpus.count(target)) corpus entries), \(acceptedCount) accepted, "
                  + "\(failures.count) failures, \(elapsed.components.seconds).\(String(format: "%03d", elapsed.components.attoseconds / 1_000_000_000_000_000)) s")
            for failure in failures.prefix(5) {
                print("  input \(failure.index): \(failure.problem)\n    replay: fuzz --target \(target.rawValue) --seed \(seed) --input \(failure.index)")
            }
            failureCount += failures.count
        }
        if let progressHandle {
            try progressHandle.seek(toOffset: 0)
            progressHandle.write(Data("done\n".utf8))
            try progressHandle.truncate(atOffset: 5)
        }
        if failureCount > 0 { throw ExitCode(1) }
    }
}

/// Adds a real image (one `fammig checkpoint` wrote) to the corpus, sealed again under the corpus key,
/// with its metadata as a state entry and as a metadata frame.
struct ImportImage: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "import-image",
                                                    abstract: "Adds a real image to the corpus, sealed under the corpus key.")

    @OptionGroup var corpusOptions: CorpusOptions

    @Option(help: "The image file (from fammig checkpoint).")
    var image: String

    @Option(help: "The image's key file.")
    var keyFile: String

    @Option(help: "The entry's name (without .bin).")
    var name: String

    func run() throws {
        guard let keyText = FileManager.default.contents(atPath: keyFile).map({ String(decoding: $0, as: UTF8.self) }),
              keyText.hasPrefix("fammig-migration-key-v1 ") else { throw ValidationError("\(keyFile) is not a fammig key file") }
        let digits = Array(keyText.dropFirst("fammig-migration-key-v1 ".count).prefix(64))
        let keyBytes = stride(from: 0, to: digits.count, by: 2).compactMap { UInt8(String(digits[$0..<($0 + 2)]), radix: 16) }
        guard let data = FileManager.default.contents(atPath: image) else { throw ValidationError("cannot read \(image)") }
        let key = try MigrationKey(bytes: keyBytes)
        let reader = try ImageReader.open(backend: MemoryFAM(bytes: Array(data)), key: key, requireComplete: true)
        let fam = MemoryFAM(bytes: Array(data.prefix(reader.layout.fileByteCount)))
        ImageSealer.reseal(fam, key: Fuzzer.corpusKey)
        let sealed = try ImageReader.open(backend: fam, key: Fuzzer.corpusKey, requireComplete: true)
        _ = try sealed.checkedProcessState()
        try write(fam.bytes, target: .image)
        try write(sealed.metadata, target: .state)
        try write(Message.metadata(state: sealed.metadata, pageAddresses: sealed.pageAddresses).encoded(), target: .frame)
        print("fuzz: added \(name) (\(fam.byteCount) bytes, \(sealed.pageCount) pages) to image, state and frame")
    }

    private func write(_ bytes: [UInt8], target: FuzzTarget) throws {
        let directory = corpusOptions.corpus + "/" + target.rawValue
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        guard FileManager.default.createFile(atPath: directory + "/" + name + ".bin", contents: Data(bytes)) else {
            throw ValidationError("cannot write \(directory)/\(name).bin")
        }
    }
}

/// Writes one frame of every message kind, and a stream of all of them, to the corpus.
struct SeedFrames: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "seed-frames", abstract: "Writes one frame of every kind to the corpus.")

    @OptionGroup var corpusOptions: CorpusOptions

    func run() throws {
        let nonce = (0..<Message.handshakeNonceByteCount).map { UInt8($0) }
        let frames: [(String, Message)] = [
            ("hello-first", .hello(mode: 2, generation: 9, nonce: nonce, proof: [])),
            ("hello-proof", .hello(mode: 1, generation: 9, nonce: nonce, proof: nonce.reversed())),
            ("metadata-committed", .metadataCommitted(generation: 9)),
            ("page-request", .pageRequest(address: 0x7f00_0000_1000)),
            ("pages", .pages(address: 0x7f00_0000_0000, bytes: (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) })),
            ("marked", .marked(slots: [0, 2, 7, UInt32(Int.pageSize)])),
            ("complete", .complete(generation: 9)),
            ("received", .received(pageByteCount: 65536)),
            ("abort", .abort(reason: "the source gave up: é")),
            ("sealed", .sealed(bytes: (0..<48).map { UInt8($0) })),
        ]
        let directory = corpusOptions.corpus
        try FileManager.default.createDirectory(atPath: directory + "/frame", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: directory + "/stream", withIntermediateDirectories: true)
        for (name, message) in frames {
            FileManager.default.createFile(atPath: "\(directory)/frame/\(name).bin", contents: Data(message.encoded()))
        }
        let stream = frames.flatMap { $0.1.encoded() }
        FileManager.default.createFile(atPath: "\(directory)/stream/all-kinds.bin", contents: Data(stream))
        FileManager.default.createFile(atPath: "\(directory)/stream/handshake-then-pages.bin",
                                       contents: Data(frames[0].1.encoded() + frames[1].1.encoded() + frames[4].1.encoded() + frames[5].1.encoded()))
        print("fuzz: wrote \(frames.count) frames and 2 streams under \(directory)")
    }
}

/// Writes transcripts of the sealed channel (source to target, after the handshake) to the corpus.
struct SeedChannel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "seed-channel",
                                                    abstract: "Writes sealed-channel transcripts (under the corpus key) to the corpus.")

    @OptionGroup var corpusOptions: CorpusOptions

    func run() throws {
        let transcripts: [(String, [Message])] = [
            ("postcopy-fam", [.metadataCommitted(generation: 9), .marked(slots: [0, 1, 5]), .marked(slots: [2]), .complete(generation: 9)]),
            ("postcopy-socket", [.pages(address: 0x7f00_0000_0000, bytes: (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 13) }),
                                 .pages(address: 0x7f00_0000_4000, bytes: [UInt8](repeating: 0xA5, count: Int.pageSize)), .complete(generation: 9)]),
            ("abort", [.metadataCommitted(generation: 9), .abort(reason: "the source gave up")]),
            ("one-frame", [.complete(generation: 9)]),
        ]
        let directory = corpusOptions.corpus + "/channel"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for (name, messages) in transcripts {
            FileManager.default.createFile(atPath: "\(directory)/\(name).bin", contents: Data(try ChannelFuzz.transcript(messages)))
        }
        print("fuzz: wrote \(transcripts.count) channel transcripts under \(directory)")
    }
}
