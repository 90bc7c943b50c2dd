// swift-tools-version:6.2
import PackageDescription

// Warnings that hide data races in C callbacks are errors here (docs/platform.md, "SwiftPM").
let strict: [SwiftSetting] = [.treatWarning("ActorIsolatedCall", as: .error)]

let package = Package(
    name: "scim-edge",
    products: [
        .library(name: "EdgeLoop", targets: ["EdgeLoop"]),
        .library(name: "EdgeTLS", targets: ["EdgeTLS"]),
        .library(name: "EdgeHTTP", targets: ["EdgeHTTP"]),
        .library(name: "EdgeStore", targets: ["EdgeStore"]),
        .library(name: "SCIM", targets: ["SCIM"]),
        .library(name: "EdgeAgent", targets: ["EdgeAgent"]),
        .library(name: "EdgeDelivery", targets: ["EdgeDelivery"]),
        .library(name: "EdgeBroker", targets: ["EdgeBroker"]),
        .executable(name: "scim-broker", targets: ["scim-broker"]),
        .executable(name: "scim-edge", targets: ["scim-edge"]),
        .executable(name: "edge-fixture", targets: ["edge-fixture"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // System libraries from Debian: module map + shim header each, no copied source.
        .systemLibrary(name: "CLibUV", pkgConfig: "libuv", providers: [.apt(["libuv1-dev"])]),
        .systemLibrary(name: "CLMDB", pkgConfig: "lmdb", providers: [.apt(["liblmdb-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CHTTPParser", providers: [.apt(["libhttp-parser-dev"])]),
        .systemLibrary(name: "CYAML", providers: [.apt(["libyaml-dev"])]),
        .systemLibrary(name: "CLDAP", pkgConfig: "ldap", providers: [.apt(["libldap-dev"])]),

        .target(name: "EdgeLoop", dependencies: ["CLibUV"], swiftSettings: strict),
        .target(name: "EdgeTLS", dependencies: ["COpenSSL"], swiftSettings: strict),
        .target(name: "EdgeHTTP", dependencies: ["EdgeLoop", "EdgeTLS", "CHTTPParser"], swiftSettings: strict),
        .target(name: "EdgeStore", dependencies: ["CLMDB", "EdgeLoop"], swiftSettings: strict),
        // The OpenLDAP client (libldap): connections, searches, RFC 4533 sync controls; used by the agent's LDAP sources.
        .target(name: "EdgeLDAP", dependencies: ["CLDAP"], swiftSettings: strict),
        // SCIM 2.0 protocol core: pure Swift, no I/O, no Foundation.
        .target(name: "SCIM", swiftSettings: strict),
        // Strict YAML configuration files (libyaml), shared by the agent and the broker.
        .target(name: "EdgeConfig", dependencies: ["CYAML", "EdgeLoop"], swiftSettings: strict, plugins: ["VersionPlugin"]),
        // `scimEdgeVersion` from the VERSION file (the one version source).
        .plugin(name: "VersionPlugin", capability: .buildTool()),
        // JSON log lines (swift-log handler, the buffered access log) and the one plain-line writer, for both programs.
        .target(name: "EdgeLog", dependencies: ["SCIM", .product(name: "Logging", package: "swift-log")], swiftSettings: strict),
        .target(name: "EdgeMetrics", swiftSettings: strict),
        // The delivery engine the broker and the agents share: per-target durable queues in the store's own LMDB
        // file, the worker and its parts (rate, window, breaker, deletion guard, retries, the SCIM operations),
        // reconciliation, the target configuration.
        .target(
            name: "EdgeDelivery",
            dependencies: [
                "EdgeLoop", "EdgeTLS", "EdgeHTTP", "EdgeStore", "SCIM", "EdgeConfig", "EdgeMetrics",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // The operator commands about targets, one definition for scim-broker and scim-edge (swift-argument-parser).
        .target(
            name: "EdgeTargetCommands",
            dependencies: ["EdgeDelivery", "EdgeConfig", "EdgeLog", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strict),
        .target(
            name: "EdgeAgent",
            dependencies: [
                "EdgeLoop", "EdgeTLS", "EdgeHTTP", "EdgeStore", "SCIM", "EdgeConfig", "EdgeLog", "EdgeLDAP", "EdgeDelivery", "EdgeMetrics",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "EdgeBroker",
            dependencies: [
                "EdgeLoop", "EdgeTLS", "EdgeHTTP", "EdgeStore", "SCIM", "EdgeConfig", "EdgeMetrics", "EdgeDelivery",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "scim-broker",
            dependencies: [
                "EdgeBroker", "EdgeDelivery", "EdgeTargetCommands", "EdgeLog", "EdgeConfig", "EdgeLoop", "EdgeTLS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ], swiftSettings: strict),
        // Operator tools in the agent binary: `scim-edge bench` and `scim-edge sandbox`.
        .target(
            name: "EdgeTools", dependencies: ["EdgeLoop", "EdgeTLS", "EdgeHTTP", "SCIM", "EdgeConfig", "EdgeMetrics"], swiftSettings: strict
        ),
        .executableTarget(
            name: "scim-edge",
            dependencies: [
                "EdgeAgent", "EdgeDelivery", "EdgeTargetCommands", "EdgeLog", "EdgeTools", "EdgeConfig", "EdgeLoop", "EdgeTLS", "SCIM",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ], swiftSettings: strict),

        // Helpers shared by the test targets only (may use Foundation: never linked into the binaries).
        .target(
            name: "EdgeTestSupport", dependencies: ["EdgeLoop", "EdgeTLS", "EdgeHTTP", "SCIM"], path: "Tests/EdgeTestSupport",
            swiftSettings: strict),

        // Test fixture process: crash-test writer and a small HTTP server for benchmarks.
        .executableTarget(
            name: "edge-fixture",
            dependencies: ["EdgeLoop", "EdgeTLS", "EdgeHTTP", "EdgeStore", "EdgeAgent", "EdgeDelivery", "EdgeLog", "EdgeTools", "SCIM"],
            swiftSettings: strict),

        .testTarget(name: "EdgeLoopTests", dependencies: ["EdgeLoop", "EdgeTestSupport"], swiftSettings: strict),
        .testTarget(name: "EdgeTLSTests", dependencies: ["EdgeTLS", "EdgeTestSupport"], swiftSettings: strict),
        .testTarget(name: "EdgeHTTPTests", dependencies: ["EdgeHTTP", "EdgeLoop", "EdgeTLS", "EdgeTestSupport"], swiftSettings: strict),
        .testTarget(name: "SCIMTests", dependencies: ["SCIM", "EdgeTestSupport"], swiftSettings: strict),
        .testTarget(
            name: "EdgeAgentTests",
            dependencies: [
                "EdgeAgent", "EdgeConfig", "EdgeDelivery", "EdgeHTTP", "EdgeLoop", "EdgeStore", "EdgeLDAP", "EdgeTools", "SCIM",
                "EdgeTestSupport",
            ],
            swiftSettings: strict),
        .testTarget(
            name: "EdgeBrokerTests",
            dependencies: [
                "EdgeBroker", "EdgeDelivery", "EdgeAgent", "EdgeLoop", "EdgeStore", "EdgeTLS", "EdgeTools", "SCIM", "EdgeTestSupport",
            ],
            swiftSettings: strict),
        .testTarget(name: "EdgeMetricsTests", dependencies: ["EdgeMetrics"], swiftSettings: strict),
        .testTarget(
            name: "EdgeDeliveryTests",
            dependencies: ["EdgeDelivery", "EdgeHTTP", "EdgeLoop", "EdgeStore", "SCIM", "EdgeTestSupport"], swiftSettings: strict),
        .testTarget(
            name: "EdgeToolsTests", dependencies: ["EdgeTools", "EdgeMetrics", "EdgeHTTP", "SCIM", "EdgeTestSupport"], swiftSettings: strict
        ),
        .testTarget(name: "EdgeStoreTests", dependencies: ["EdgeStore", "EdgeLoop", "EdgeTestSupport"], swiftSettings: strict),
    ]
)
