// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "qconvert",
    products: [
        .executable(name: "qconvert", targets: ["qconvert"]),
        .library(name: "QConvertKit", targets: ["QConvertKit"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "5.0.1")
    ],
    targets: [
        .target(
            name: "CQKernels",
            // The kernels read float bits through integer pointers: no strict-aliasing assumptions.
            cSettings: [.unsafeFlags(["-O3", "-fno-strict-aliasing"])]
        ),
        .systemLibrary(
            name: "CProtobufC",
            pkgConfig: "libprotobuf-c",
            providers: [.apt(["libprotobuf-c-dev"])]
        ),
        .systemLibrary(
            name: "CZip",
            pkgConfig: "libzip",
            providers: [.apt(["libzip-dev"])]
        ),
        // protoc-c output for Schemas/onnx.proto (scripts/gen-onnx-proto.sh regenerates it).
        .target(
            name: "COnnxProto",
            dependencies: ["CProtobufC"],
            linkerSettings: [.linkedLibrary("protobuf-c")]
        ),
        .target(
            name: "QConvertKit",
            dependencies: [
                "CQKernels",
                "COnnxProto",
                "CZip",
                .product(name: "Yams", package: "Yams")
            ],
            exclude: ["README.md"],
            // Checked arithmetic and bounds in release too: the library parses hostile files, and a missed
            // check must trap rather than corrupt memory. The hot loops are C kernels (CQKernels).
            swiftSettings: []
        ),
        .executableTarget(
            name: "qconvert",
            dependencies: [
                "QConvertKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser")
            ]
        ),
        // Fuzz targets for the readers of hostile formats (make fuzz builds them with sanitizers).
        .target(name: "CFuzzDriver"),
        .executableTarget(
            name: "qconvert-fuzz",
            dependencies: ["QConvertKit", "CFuzzDriver"]
        ),
        .testTarget(
            name: "QConvertKitTests",
            dependencies: ["QConvertKit"]
        ),
        .testTarget(
            name: "EndToEndTests",
            dependencies: ["QConvertKit", "qconvert"]
        )
    ]
)
