// swift-tools-version: 6.2
// The module diagram: a target imports only targets below it.
//   fammig, torture (executables)   flags, logging bootstrap, driver choice, exit codes
//   Torture               deterministic driver, model FAM, in-memory transport, strategies, campaigns
//   Oracles               register/state compare, page digests, end-to-end checksums
//   Engine                Migration (the one place a node's actors are assembled from ports) and
//                         Migration/Modes (a folder per mode: its definition and its two page
//                         strategies, registered in one switch); actors: the source's Dumper and the
//                         target's Restorer, each one lifecycle calling its mode's page strategy
//                         (Actors/Source, Actors/Target), the fault handler and pusher over lazy memory
//                         (Postcopy); FAM image, real FAM backend, transport and its sealed channel,
//                         threaded driver
//   Fuzzing               seeded mutator and fuzz targets over the engine's decoders (beside Torture)
//   Sys (+ CSys)          the only raw syscalls and unsafe pointers, and the kernel's numbers, typed
import PackageDescription

let package = Package(
    name: "fammig",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "fammig", targets: ["fammig"]),
        .executable(name: "torture", targets: ["TortureCommand"]),
        .executable(name: "fuzz", targets: ["FuzzCommand"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // libcrypto (OpenSSL, Debian's libssl-dev) for the page marks' HMAC-SHA256 without per-page Swift costs.
        .target(name: "CSys", linkerSettings: [.linkedLibrary("crypto")]),
        .systemLibrary(name: "CSeccomp", pkgConfig: "libseccomp", providers: [.apt(["libseccomp-dev"])]),
        .systemLibrary(name: "CCap", pkgConfig: "libcap", providers: [.apt(["libcap-dev"])]),
        .target(
            name: "Sys",
            dependencies: [
                "CSys", "CSeccomp", "CCap",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "Engine",
            dependencies: [
                "Sys",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(name: "Oracles", dependencies: ["Engine", "Sys"]),
        .executableTarget(
            name: "fammig",
            dependencies: [
                "Engine", "Oracles", "Sys",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Torture",
            dependencies: [
                "Engine", "Oracles", "Sys",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "TortureCommand",
            dependencies: [
                "Torture", "Engine", "Oracles", "Sys",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The fuzz gate: seeded mutations of a committed corpus (Tests/fuzz/corpus), a fixed input count.
        .target(
            name: "Fuzzing",
            dependencies: ["Engine", "Sys", .product(name: "Crypto", package: "swift-crypto")]
        ),
        .executableTarget(
            name: "FuzzCommand",
            dependencies: ["Fuzzing", "Engine", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "EngineTests", dependencies: ["Engine", "Oracles", "Sys", "Torture", "Fuzzing"]),
        .testTarget(name: "TortureTests", dependencies: ["Torture", "Engine", "Oracles", "Sys"]),
    ]
)
