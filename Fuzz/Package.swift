// swift-tools-version:6.2
// Coverage-guided fuzzers (libFuzzer) for the SCIM core's parsers. Their own
// package: `--sanitize=fuzzer` turns every executable of a package into a
// library, so they stay out of the main one. Run with `make fuzz`.
import PackageDescription

let package = Package(
    name: "scim-edge-fuzz",
    dependencies: [.package(name: "scim-edge", path: "..")],
    targets: [
        .executableTarget(name: "FuzzJSON", dependencies: [.product(name: "SCIM", package: "scim-edge")]),
        .executableTarget(name: "FuzzFilter", dependencies: [.product(name: "SCIM", package: "scim-edge")]),
        .executableTarget(name: "FuzzPatch", dependencies: [.product(name: "SCIM", package: "scim-edge")]),
    ]
)
