import Foundation
import XCTest

@testable import MobileVLMCore

/// Golden files written by `python -m mobilevlm.export.golden`; folder from MOBILEVLM_GOLDEN (set by
/// .ci/apps). Without it these tests are skipped, unless MOBILEVLM_GOLDEN_REQUIRED=1 (CI).
func loadGolden() throws -> (URL, JSON) {
    let path = ProcessInfo.processInfo.environment["MOBILEVLM_GOLDEN"] ?? ""
    let file = URL(fileURLWithPath: path).appendingPathComponent("golden.json")
    guard !path.isEmpty, FileManager.default.fileExists(atPath: file.path) else {
        if ProcessInfo.processInfo.environment["MOBILEVLM_GOLDEN_REQUIRED"] == "1" {
            throw BundleError("golden files required but not found at '\(path)'")
        }
        throw XCTSkip("no golden files (set MOBILEVLM_GOLDEN=DIR)")
    }
    let text = String(decoding: FileManager.default.contents(atPath: file.path)!, as: UTF8.self)
    return (URL(fileURLWithPath: path), try JSON.parse(text))
}

/// A bundle folder holding `manifestText` and an empty file for every path it lists.
func fakeBundle(_ manifestText: String) throws -> URL {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("mvlm-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
    let json = try JSON.parse(manifestText)
    for key in json["files"]?.keys ?? [] {
        let f = root.appendingPathComponent(key)
        try FileManager.default.createDirectory(at: f.deletingLastPathComponent(), withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: f.path, contents: Data())
    }
    try manifestText.write(to: root.appendingPathComponent(Manifest.fileName), atomically: true, encoding: .utf8)
    return root
}

func ints(_ j: JSON?) -> [Int] { (j?.array ?? []).map { Int($0.int ?? -1) } }

final class GoldenTests: XCTestCase {
    var dir: URL!
    var golden: JSON!
    var manifest: Manifest!
    var tokenizer: Tokenizer!

    override func setUpWithError() throws {
        (dir, golden) = try loadGolden()
        let text = String(decoding: FileManager.default.contents(atPath: dir.appendingPathComponent("manifest.json").path)!, as: UTF8.self)
        manifest = try Manifest.load(try fakeBundle(text), verify: .exists)
        tokenizer = try Tokenizer.load(dir.appendingPathComponent("tokenizer.json"))
    }

    func testTheRealBundleLoadsWithEveryChecksum() throws {
        // MOBILEVLM_BUNDLE: where the bundle is seen from here (CI copies it into the Swift chroot).
        let bundle = URL(fileURLWithPath: ProcessInfo.processInfo.environment["MOBILEVLM_BUNDLE"] ?? golden["bundle"]!.string!)
        guard FileManager.default.fileExists(atPath: bundle.path) else { throw XCTSkip("bundle folder not on this machine") }
        let real = try Manifest.load(bundle, verify: .sha256)
        XCTAssertEqual(real.artifacts.count, manifest.artifacts.count)
    }

    func testManifestSectionsAreRead() {
        XCTAssertEqual(Int(golden["image_size"]!.int!), manifest.image.size)
        XCTAssertEqual(ints(golden["pad_color"]).map { UInt8($0) }, manifest.image.padColor)
        XCTAssertFalse(manifest.prompt.beforeImageIds.isEmpty)
    }

    func testEveryImageGivesTheReferenceTensor() throws {
        var wrong: [String] = []
        let images = golden["images"]!.array!
        XCTAssertFalse(images.isEmpty)
        for image in images {
            let w = Int(image["width"]!.int!), h = Int(image["height"]!.int!)
            let rgba = [UInt8](FileManager.default.contents(atPath: dir.appendingPathComponent(image["pixels"]!.string!).path)!)
            let upright = RgbImage.fromRGBA(width: w, height: h, rgba: rgba).oriented(Int(image["exif_orientation"]!.int!))
            let prepared = ImagePreprocessor.prepare(
                upright, size: manifest.image.size, aspectMode: image["aspect_mode"]!.string!,
                padColor: manifest.image.padColor)
            XCTAssertEqual(ints(image["expected"]!["shape"]), [1, 3, prepared.height, prepared.width])
            if SHA256.hex(prepared.chw()) != image["expected"]!["sha256"]!.string! {
                wrong.append("\(image["name"]!.string!) (\(image["aspect_mode"]!.string!), exif \(image["exif_orientation"]!.int!))")
            }
        }
        XCTAssertEqual(wrong, [], "tensor SHA-256 differs from PIL's")
    }

    func testPromptTokenIdsMatchThePythonTokenizer() throws {
        for p in golden["prompts"]!.array! {
            var before = try tokenizer.encode(p["before_image"]!.string!)
            if manifest.prompt.addBos { before.insert(manifest.prompt.bosId, at: 0) }
            XCTAssertEqual(before, ints(p["before_ids"]))
            XCTAssertEqual(manifest.prompt.beforeImageIds, ints(p["manifest_before_ids"]))
            XCTAssertEqual(try tokenizer.encode(p["after_image"]!.string!), ints(p["after_ids"]), p["case"]!.string!)
            if p["fits_context"]!.bool! {
                let prompt = try Prompt.build(manifest.prompt, question: p["question"]!.string!, tokenizer: tokenizer)
                XCTAssertEqual(prompt.afterText, p["after_image"]!.string!)
                XCTAssertEqual(prompt.promptTokens, Int(p["prompt_tokens"]!.int!))
            } else {
                XCTAssertThrowsError(try Prompt.build(manifest.prompt, question: p["question"]!.string!, tokenizer: tokenizer)) { error in
                    XCTAssertTrue((error as! BundleError).message.hasPrefix("prompt takes \(p["prompt_tokens"]!.int!) tokens"), "\(error)")
                }
            }
        }
    }

    func testTokenizerStringsEncodeAsInPython() throws {
        for c in golden["tokenizer_cases"]!.array! {
            XCTAssertEqual(try tokenizer.encode(c["text"]!.string!), ints(c["ids"]), c["text"]!.text())
        }
    }

    func testTokenIdsDecodeAsInPython() throws {
        for c in golden["decode_cases"]!.array! {
            XCTAssertEqual(try tokenizer.decode(ints(c["ids"])), c["text"]!.string!)
        }
    }

    func testStopConditionsCutWherePythonCuts() {
        for c in golden["stops"]!.array! {
            let stops = c["stop_strings"]!.array!.map { $0.string! }
            let controller = StopController(stopStrings: stops, eosIds: manifest.prompt.eosIds, maxNewTokens: Int(c["max_new_tokens"]!.int!))
            var shown = ""
            for piece in c["pieces"]!.array! {
                shown += controller.onText(piece.string!)
                for stop in stops { XCTAssertFalse(shown.contains(stop), "\(c["name"]!.string!): a stop string was shown") }
            }
            shown += controller.finish()
            let name = c["name"]!.string!
            XCTAssertEqual(shown, c["expected_text"]!.string!, name)
            XCTAssertEqual(controller.text, c["expected_text"]!.string!, name)
            XCTAssertEqual(controller.reason.rawValue, c["expected_reason"]!.string!, name)
            XCTAssertEqual(controller.tokens, Int(c["expected_tokens"]!.int!), name)
        }
    }

    func testStatisticsAreDerivedAndShownAsInPython() throws {
        for c in golden["stats"]!.array! {
            let stats = try RunnerStats.parse(c["json"]!.string!)
            let e = c["expected"]!
            XCTAssertEqual(stats.promptTokens, e["prompt_tokens"]!.int!)
            XCTAssertEqual(stats.generatedTokens, e["generated_tokens"]!.int!)
            for (value, key) in [
                (stats.prefillTokPerS, "prefill_tok_s"), (stats.decodeTokPerS, "decode_tok_s"), (stats.ttftMs, "ttft_ms"), (stats.loadS, "load_s"),
            ] {
                if let expected = e[key]!.number {
                    XCTAssertEqual(value!, expected, accuracy: 1e-9 * max(1, abs(expected)), key)
                } else {
                    XCTAssertNil(value, key)
                }
            }
            XCTAssertEqual(stats.line, c["line"]!.string!)
        }
    }

    func testFixedDecimalsRoundAsInPython() {
        for row in golden["fixed_cases"]!.array! {
            let r = row.array!
            XCTAssertEqual(fixed(r[0].number!, Int(r[1].int!)), r[2].string!, row.text())
        }
    }
}
