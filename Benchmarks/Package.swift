// swift-tools-version:6.1
// Benchmarks live in their own package so that `swift build` and CI of the
// main package stay fast (ordo-one/benchmark adds ~30 s to a cold build).
import PackageDescription

let package = Package(
    name: "scim-edge-benchmarks",
    dependencies: [
        .package(url: "https://github.com/ordo-one/benchmark", exact: "1.38.1", traits: ["MallocInterposer"]),
        .package(name: "scim-edge", path: ".."),
    ],
    targets: [
        .executableTarget(
            name: "FoundationBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "EdgeLoop", package: "scim-edge"),
                .product(name: "EdgeTLS", package: "scim-edge"),
                .product(name: "EdgeHTTP", package: "scim-edge"),
                .product(name: "EdgeStore", package: "scim-edge"),
            ],
            path: "Benchmarks/FoundationBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .executableTarget(
            name: "SCIMBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "SCIM", package: "scim-edge"),
            ],
            path: "Benchmarks/SCIMBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
