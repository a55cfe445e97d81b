// swift-tools-version:5.9
// The platform-free core of the iOS demo: manifest, prompt, image tensor, tokenizer, stop conditions,
// statistics. Foundation only (no UIKit, CoreML or ExecuTorch), so `swift test` runs it on Linux.
import PackageDescription

let package = Package(
    name: "MobileVLMCore",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [.library(name: "MobileVLMCore", targets: ["MobileVLMCore"])],
    targets: [
        .target(name: "MobileVLMCore"),
        .testTarget(name: "MobileVLMCoreTests", dependencies: ["MobileVLMCore"]),
    ]
)
