import Foundation
import XCTest

@testable import MobileVLMCore

/// Bad bundles: each is an error message the app shows, naming the file and the problem.
func manifestText(_ artifactsAndFiles: String, version: Int = 1) -> String {
    """
    {"format": "mobilevlm-bundle", "format_version": \(version), "model": {"config": {}},
     "preprocessing": {"image_size": 32, "aspect_mode": "pad", "pad_color": [122, 116, 104], "resize": "bicubic", "channel_order": "RGB",
                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
     "prompt": {"before_image": "USER: ", "after_image": "\\n{prompt} ASSISTANT:", "prompt_slot": "{prompt}", "add_bos": true, "bos_id": 1,
                "eos_ids": [2], "stop_strings": ["</s>"], "before_image_ids": [1, 293, 28, 223], "image_tokens": 4, "context_length": 64},
     "tokenizer": {"file": "tokenizer.json"},
     "parity": {"cases": [{"id": "case-00", "image": "parity/case-00.png", "question": "What?", "max_new_tokens": 12}]},
     \(artifactsAndFiles)}
    """
}

let good = """
    "artifacts": [{"name": "executorch-fp32", "backend": "executorch", "file": "model.pte", "quantization": {"recipe": "fp32"}}],
    "files": {"model.pte": {"bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"},
              "tokenizer.json": {"bytes": 2, "sha256": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}}
    """

func bundle(_ text: String) throws -> URL {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("mvlm-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
    try "hello".write(to: root.appendingPathComponent("model.pte"), atomically: true, encoding: .utf8)
    try "{}".write(to: root.appendingPathComponent("tokenizer.json"), atomically: true, encoding: .utf8)
    try text.write(to: root.appendingPathComponent("manifest.json"), atomically: true, encoding: .utf8)
    return root
}

final class ManifestTests: XCTestCase {
    func assertRefused(_ root: URL, _ verify: Manifest.Verify = .size, _ parts: String..., line: UInt = #line) {
        XCTAssertThrowsError(try Manifest.load(root, verify: verify), line: line) { error in
            let message = (error as? BundleError)?.message ?? "\(error)"
            for part in parts { XCTAssertTrue(message.contains(part), "'\(message)' should contain '\(part)'", line: line) }
        }
    }

    func testAValidBundleLoadsWithChecksums() throws {
        let m = try Manifest.load(try bundle(manifestText(good)), verify: .sha256)
        XCTAssertEqual(try m.firstArtifact(backend: "executorch").name, "executorch-fp32")
        XCTAssertEqual(m.artifacts[0].quantization, "fp32")
        XCTAssertEqual(m.prompt.afterImage, "\n{prompt} ASSISTANT:")
        XCTAssertEqual(m.parityCases.first?.maxNewTokens, 12)
    }

    func testNoSuchFolder() {
        assertRefused(URL(fileURLWithPath: "/nonexistent/nowhere"), .size, "no such bundle folder")
    }

    func testAFolderWithoutManifest() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("mvlm-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        assertRefused(root, .size, "manifest.json: missing", "not a bundle written by mobilevlm export")
    }

    func testANewerManifestVersion() throws {
        assertRefused(try bundle(manifestText(good, version: 2)), .size, "format_version 2 is newer than this app reads (1)", "update the app")
    }

    func testAnUnknownOlderVersion() throws {
        assertRefused(try bundle(manifestText(good, version: 0)), .size, "format_version 0 is not a version this app knows")
    }

    func testNotJSON() throws {
        assertRefused(try bundle("{\"format\": "), .size, "manifest.json: not valid JSON")
    }

    func testAMissingArtifactFile() throws {
        let root = try bundle(manifestText(good))
        try FileManager.default.removeItem(at: root.appendingPathComponent("model.pte"))
        assertRefused(root, .exists, "listed file 'model.pte' is missing from the bundle")
    }

    func testAPathLeavingTheBundle() throws {
        assertRefused(
            try bundle(manifestText(good.replacingOccurrences(of: "\"model.pte\": {", with: "\"../outside.pte\": {"))), .size,
            "file path \"../outside.pte\" escapes the bundle folder")
    }

    func testAnAbsolutePath() throws {
        assertRefused(
            try bundle(manifestText(good.replacingOccurrences(of: "\"model.pte\": {", with: "\"/etc/passwd\": {"))), .size,
            "must be a relative path inside the bundle")
    }

    func testATruncatedFileAndAChangedFile() throws {
        let root = try bundle(manifestText(good))
        try "hell".write(to: root.appendingPathComponent("model.pte"), atomically: true, encoding: .utf8)
        assertRefused(root, .size, "model.pte: size 4 bytes does not match the manifest's 5")
        try "jello".write(to: root.appendingPathComponent("model.pte"), atomically: true, encoding: .utf8)
        XCTAssertNoThrow(try Manifest.load(root, verify: .size))
        assertRefused(root, .sha256, "model.pte: SHA-256 does not match the manifest")
    }

    func testABundleWithoutAnArtifactForThisApp() throws {
        let m = try Manifest.load(
            try bundle(manifestText(good.replacingOccurrences(of: "\"backend\": \"executorch\"", with: "\"backend\": \"onnx\""))), verify: .size)
        XCTAssertThrowsError(try m.firstArtifact(backend: "coreml")) { error in
            XCTAssertTrue((error as! BundleError).message.contains("no coreml artifact in this bundle (it has: executorch-fp32 (onnx))"))
        }
    }

    /// The one-line message loading `root` fails with.
    func refusal(_ root: URL) -> String {
        do {
            _ = try Manifest.load(root, verify: .size)
            return "loaded (expected a refusal)"
        } catch {
            return (error as? BundleError)?.message ?? "\(error)"
        }
    }

    /// `good` with a `methods.text_decoder` section on its artifact.
    func withDecoder(_ decoder: String) -> String {
        good.replacingOccurrences(
            of: "\"quantization\": {\"recipe\": \"fp32\"}}]", with: "\"quantization\": {\"recipe\": \"fp32\"}, \"methods\": {\"text_decoder\": \(decoder)}}]")
    }

    let twoInputs = "\"inputs\": [{\"name\": \"embeddings\"}, {\"name\": \"input_pos\"}"
    let runnerOnly = "; the demo app drives MultimodalRunner-style programs only"

    func testATiledBundleIsRefused() throws {
        let root = try bundle(
            manifestText(good).replacingOccurrences(
                of: "\"channel_order\": \"RGB\",",
                with: "\"channel_order\": \"RGB\", \"tiling\": {\"grids\": [[1, 2], [2, 1], [2, 2]], \"tile_size\": 32, \"tokens_per_view\": 5},"))
        XCTAssertEqual(
            refusal(root),
            "\(root.appendingPathComponent("manifest.json").path): this bundle tiles images (preprocessing.tiling);"
                + " the demo app drives single-image programs only")
    }

    func testAFeatureLevelInterfaceIsRefused() throws {
        let decoder = "{\(twoInputs), {\"name\": \"image_features\"}], \"interface\": \"cross_attention\", \"multimodal_runner\": false}"
        let root = try bundle(
            manifestText(withDecoder(decoder)).replacingOccurrences(of: "\"config\": {}", with: "\"config\": {\"interface\": \"cross_attention\"}"))
        XCTAssertEqual(
            refusal(root),
            "\(root.appendingPathComponent("manifest.json").path): text_decoder takes an image input (model.config.interface cross_attention)\(runnerOnly)")
    }

    func testAnArtifactWhoseDecoderTakesAnImageIsRefused() throws {
        let cases = [
            ("{\(twoInputs), {\"name\": \"image_mask\"}], \"interface\": \"visual_expert\", \"multimodal_runner\": false}",
             "text_decoder takes an image input (interface visual_expert)"),
            ("{\(twoInputs)], \"multimodal_runner\": false}", "text_decoder is marked multimodal_runner false"),
            ("{\(twoInputs), {\"name\": \"image_mask\"}]}", "text_decoder takes 3 inputs (embeddings, input_pos, image_mask), not embeddings and input_pos"),
        ]
        for (decoder, reason) in cases {
            let root = try bundle(manifestText(withDecoder(decoder)))
            XCTAssertEqual(refusal(root), "\(root.appendingPathComponent("manifest.json").path): artifacts[0] (executorch-fp32): \(reason)\(runnerOnly)")
        }
    }

    func testATokenInterfaceBundleStillLoads() throws {
        let decoder = "{\(twoInputs)], \"interface\": \"token\", \"multimodal_runner\": true}"
        let root = try bundle(manifestText(withDecoder(decoder)).replacingOccurrences(of: "\"config\": {}", with: "\"config\": {\"interface\": \"token\"}"))
        let m = try Manifest.load(root, verify: .sha256)
        XCTAssertEqual(try m.firstArtifact(backend: "executorch").name, "executorch-fp32")
        XCTAssertEqual(m.artifacts[0].method("text_decoder")?["inputs"]?.array?.count, 2)
        XCTAssertEqual(m.image.size, 32)
    }

    func testAnAspectModeTheAppDoesNotKnow() throws {
        assertRefused(try bundle(manifestText(good).replacingOccurrences(of: "\"pad\"", with: "\"letterbox\"")), .size, "aspect_mode is 'letterbox'")
    }

    func testEmptyQuestionIsRefused() throws {
        let m = try Manifest.load(try bundle(manifestText(good)), verify: .size)
        XCTAssertThrowsError(try Prompt.build(m.prompt, question: "  ", tokenizer: nil)) { XCTAssertEqual(($0 as! BundleError).message, "prompt is empty") }
        XCTAssertEqual(try Prompt.build(m.prompt, question: "What?", tokenizer: nil).afterText, "\nWhat? ASSISTANT:")
    }

    func testJSONRoundTripAndErrors() throws {
        let parsed = try JSON.parse("{\"a\": [1, 2.5, \"x\\u00e9\\n\", true, null], \"b\": {\"c\": -3e2}}")
        XCTAssertEqual(parsed.text(), "{\"a\": [1, 2.5, \"x\u{e9}\\n\", true, null], \"b\": {\"c\": -300.0}}")
        XCTAssertThrowsError(try JSON.parse("[1, 2")) { XCTAssertTrue("\($0)".contains("line 1")) }
    }

    func testSHA256() {
        XCTAssertEqual(SHA256.hex(Array("hello".utf8)), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        XCTAssertEqual(SHA256.hex(Array(repeating: 0x61, count: 1_000)), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }

    func testAnUnsupportedTokenizerIsNamed() throws {
        let f = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString).json")
        try "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}, \"pre_tokenizer\": null}".write(to: f, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try Tokenizer.load(f)) { XCTAssertTrue(($0 as! BundleError).message.contains("model.type must be 'BPE'")) }
    }
}

/// A test double that replays pieces (stands in for a runtime in these tests only).
final class ReplayEngine: Engine {
    static let backend = "test"
    var pieces: [String] = []
    var seen: GenerationRequest?
    var stopCalls = 0
    init(manifest: Manifest, artifact: Manifest.Artifact) throws {}
    func load() throws {}
    func generate(_ request: GenerationRequest, sink: GenerationSink) throws -> RunnerStats? {
        seen = request
        for p in pieces where stopCalls == 0 {
            if !sink.onPiece(p) { break }
        }
        return RunnerStats(
            promptTokens: 17, generatedTokens: 3, modelLoadStartMs: 0, modelLoadEndMs: 1500, inferenceStartMs: 100,
            promptEvalEndMs: 150, firstTokenMs: 160, inferenceEndMs: 400)
    }
    func stop() { stopCalls += 1 }
}

final class SessionTests: XCTestCase {
    func testTheSessionDrivesAnEngineAsTheManifestSays() throws {
        let root = try bundle(manifestText(good))
        let m = try Manifest.load(root, verify: .size)
        let engine = try ReplayEngine(manifest: m, artifact: m.artifacts[0])
        engine.pieces = [" red", " circle", "</", "s>", " junk"]
        var updates: [String] = []
        let answer = try Session(manifest: m, tokenizer: nil, engine: engine)
            .ask(RgbImage.filled(width: 40, height: 20, color: [0, 0, 0]), question: "What is it?", maxNewTokens: 12) { updates.append($0) }
        XCTAssertEqual(answer.text, " red circle")
        XCTAssertEqual(answer.reason, StopController.Reason.stopString)
        XCTAssertGreaterThanOrEqual(engine.stopCalls, 1)
        XCTAssertEqual(updates, [" red", " red circle"])
        XCTAssertEqual(engine.seen?.imageCHW.count, 3 * 32 * 32)
        XCTAssertEqual(engine.seen?.prompt.afterText, "\nWhat is it? ASSISTANT:")
        XCTAssertEqual(answer.stats?.line, "prefill 17 tok @ 340.0 tok/s · first token 60 ms · decode 3 tok @ 12.0 tok/s · load 1.50 s")
    }

    func testStopStringHeldBackAndEosIds() {
        let c = StopController(stopStrings: ["</s>", "###"], eosIds: [2], maxNewTokens: 100)
        XCTAssertEqual(c.onText("yes <"), "yes ")
        XCTAssertEqual(c.onText("/"), "")
        XCTAssertEqual(c.onText("s>"), "")
        XCTAssertEqual(c.reason, StopController.Reason.stopString)
        let e = StopController(stopStrings: ["</s>"], eosIds: [2, 7], maxNewTokens: 100)
        e.onToken(5, "red")
        e.onToken(7, "<|end|>")
        XCTAssertEqual(e.text, "red")
        XCTAssertEqual(e.reason, StopController.Reason.eos)
    }

    func testExifOrientationAndTransparency() {
        let img = RgbImage(width: 2, height: 1, rgb: [1, 1, 1, 2, 2, 2])
        XCTAssertEqual(img.oriented(6).rgb, [1, 1, 1, 2, 2, 2])
        XCTAssertEqual(img.oriented(6).width, 1)
        XCTAssertEqual(img.oriented(8).rgb, [2, 2, 2, 1, 1, 1])
        XCTAssertEqual(RgbImage.fromRGBA(width: 2, height: 1, rgba: [0, 0, 0, 0, 10, 20, 30, 255]).rgb, [255, 255, 255, 10, 20, 30])
    }

    func testAConstantPictureStaysConstant() {
        let chw = ImagePreprocessor.prepare(
            RgbImage.filled(width: 50, height: 30, color: [10, 200, 255]), size: 32, aspectMode: "pad",
            padColor: [10, 200, 255]
        ).chw()
        XCTAssertEqual(Set(chw[0..<1024]), [10])
        XCTAssertEqual(Set(chw[1024..<2048]), [200])
        XCTAssertEqual(Set(chw[2048...]), [255])
    }
}
