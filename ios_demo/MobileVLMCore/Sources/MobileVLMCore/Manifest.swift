import Foundation

/// A bundle, manifest, tokenizer, picture or prompt the app cannot use; `message` is shown as it is.
public struct BundleError: Error, Equatable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A bundle's manifest.json, checked as `mobilevlm.export.bundle.load_bundle` checks it (format and
/// version, required fields, every listed file inside the folder and present, optionally its size or
/// SHA-256, every artifact's file listed and present), then read into typed sections.
public struct Manifest {
    public static let fileName = "manifest.json"
    public static let format = "mobilevlm-bundle"
    /// The newest manifest format_version this app reads.
    public static let formatVersion: Int64 = 1

    public enum Verify { case exists, size, sha256 }

    public let root: URL
    public let json: JSON
    public let image: ImageSpec
    public let prompt: PromptSpec
    public let artifacts: [Artifact]
    public let parityCases: [ParityCase]
    public let tokenizerFile: String

    public static func load(_ root: URL, verify: Verify) throws -> Manifest {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: root.path, isDirectory: &isDir), isDir.boolValue else {
            throw BundleError("\(root.path): no such bundle folder")
        }
        let file = root.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: file.path) else {
            throw BundleError("\(file.path): missing (not a bundle written by mobilevlm export)")
        }
        guard let data = FileManager.default.contents(atPath: file.path), let text = String(data: data, encoding: .utf8) else {
            throw BundleError("\(file.path): cannot read as UTF-8 text")
        }
        return try parse(root, text, verify: verify)
    }

    public static func parse(_ root: URL, _ text: String, verify: Verify) throws -> Manifest {
        let whereFile = root.appendingPathComponent(fileName).path
        let json: JSON
        do {
            json = try JSON.parse(text)
        } catch {
            throw BundleError("\(whereFile): not valid JSON (\(error))")
        }
        guard json.isObject, json["format"]?.string == format else {
            throw BundleError("\(whereFile): field 'format' must be '\(format)'")
        }
        guard let version = json["format_version"]?.int else {
            throw BundleError("\(whereFile): field 'format_version' must be an integer, got \(json["format_version"]?.text() ?? "null")")
        }
        if version > formatVersion {
            throw BundleError("\(whereFile): format_version \(version) is newer than this app reads (\(formatVersion)); update the app")
        }
        if version < 1 {
            throw BundleError("\(whereFile): format_version \(version) is not a version this app knows (it reads 1 to \(formatVersion))")
        }
        for field in ["model", "preprocessing", "prompt", "tokenizer", "artifacts", "files"] where json[field] == nil {
            throw BundleError("\(whereFile): missing field '\(field)'")
        }
        guard let files = json["files"], files.isObject, let artifactList = json["artifacts"]?.array else {
            throw BundleError("\(whereFile): fields 'files' (object) and 'artifacts' (list) have the wrong type")
        }
        for relative in files.keys {
            let url = try resolveInside(root, relative)
            guard FileManager.default.fileExists(atPath: url.path) else {
                throw BundleError("\(whereFile): listed file '\(relative)' is missing from the bundle")
            }
            if verify != .exists { try check(url, relative, files[relative]!, verify, whereFile) }
        }
        for (i, a) in artifactList.enumerated() {
            guard let file = a["file"]?.string, a["backend"]?.string != nil else {
                throw BundleError("\(whereFile): artifacts[\(i)] needs 'backend' and 'file'")
            }
            let url = try resolveInside(root, file)
            let prefix = file.hasSuffix("/") ? file : file + "/"
            if files[file] == nil && !files.keys.contains(where: { $0.hasPrefix(prefix) }) {
                throw BundleError("\(whereFile): artifacts[\(i)].file '\(file)' is not listed under 'files'")
            }
            guard FileManager.default.fileExists(atPath: url.path) else {
                throw BundleError("\(url.path): artifact file missing")
            }
        }
        return try Manifest(root: root, json: json, whereFile: whereFile)
    }

    private static func check(_ url: URL, _ relative: String, _ info: JSON, _ verify: Verify, _ whereFile: String) throws {
        guard info.isObject else { throw BundleError("\(whereFile): files['\(relative)'] must be an object with bytes and sha256") }
        let size = (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? NSNumber)?.int64Value ?? -1
        if let bytes = info["bytes"]?.int, bytes != size {
            throw BundleError("\(url.path): size \(size) bytes does not match the manifest's \(bytes) (file changed or copied incompletely)")
        }
        if verify == .sha256 {
            let digest: String
            do { digest = try SHA256.hex(fileAt: url) } catch { throw BundleError("\(url.path): cannot read (\(error))") }
            if digest != info["sha256"]?.string {
                throw BundleError("\(url.path): SHA-256 does not match the manifest (file changed or corrupt)")
            }
        }
    }

    /// `root/relative`, refusing absolute paths and paths that leave the bundle folder.
    public static func resolveInside(_ root: URL, _ relative: String) throws -> URL {
        let whereFile = root.appendingPathComponent(fileName).path
        if relative.isEmpty || relative.hasPrefix("/") || relative.hasPrefix("\\") {
            throw BundleError("\(whereFile): file path \(JSON.string(relative).text()) must be a relative path inside the bundle")
        }
        let base = root.standardizedFileURL.resolvingSymlinksInPath()
        let url = base.appendingPathComponent(relative).standardizedFileURL.resolvingSymlinksInPath()
        let prefix = base.path.hasSuffix("/") ? base.path : base.path + "/"
        if !url.path.hasPrefix(prefix) && url.path != base.path {
            throw BundleError("\(whereFile): file path \(JSON.string(relative).text()) escapes the bundle folder")
        }
        return url
    }

    /// The end of every refusal of a program whose methods take more than the apps' runner flow passes.
    static let runnerOnly = "; the demo app drives MultimodalRunner-style programs only"

    /// Refuses bundles the apps would otherwise run wrongly rather than fail on: the apps prepare one
    /// S x S image for `vision_encoder` and call `text_decoder(embeddings, input_pos)`, so a tiled model
    /// (its encoder takes several views) or a feature-level interface (its decoder takes the image as a
    /// third input) would load and then answer from garbage. Absent fields mean the flow the apps drive,
    /// so older bundles load as before.
    static func refuseUndrivable(_ whereFile: String, _ json: JSON) throws {
        if let tiling = json["preprocessing"]?["tiling"], tiling != .null {
            throw BundleError("\(whereFile): this bundle tiles images (preprocessing.tiling); the demo app drives single-image programs only")
        }
        if let kind = json["model"]?["config"]?["interface"], kind != .null, kind.string != "token" {
            throw BundleError("\(whereFile): text_decoder takes an image input (model.config.interface \(kind.string ?? kind.text()))\(runnerOnly)")
        }
        for (i, a) in (json["artifacts"]?.array ?? []).enumerated() {
            guard let decoder = a["methods"]?["text_decoder"], decoder.isObject, let reason = decoderMismatch(decoder) else { continue }
            let name = a["name"]?.string.map { " (\($0))" } ?? ""
            throw BundleError("\(whereFile): artifacts[\(i)]\(name): \(reason)\(runnerOnly)")
        }
    }

    /// Why an artifact's `methods.text_decoder` is not `(embeddings, input_pos)`, or nil.
    private static func decoderMismatch(_ decoder: JSON) -> String? {
        if let kind = decoder["interface"], kind != .null, kind.string != "token" {
            return "text_decoder takes an image input (interface \(kind.string ?? kind.text()))"
        }
        if decoder["multimodal_runner"]?.bool == false {
            return "text_decoder is marked multimodal_runner false"
        }
        if let inputs = decoder["inputs"]?.array, inputs.count > 2 {
            let names = inputs.map { $0["name"]?.string ?? "?" }.joined(separator: ", ")
            return "text_decoder takes \(inputs.count) inputs (\(names)), not embeddings and input_pos"
        }
        return nil
    }

    private init(root: URL, json: JSON, whereFile: String) throws {
        self.root = root
        self.json = json
        try Manifest.refuseUndrivable(whereFile, json)
        image = try ImageSpec(whereFile, json["preprocessing"]!)
        prompt = try PromptSpec(whereFile, json["prompt"]!)
        guard let file = json["tokenizer"]?["file"]?.string else { throw BundleError("\(whereFile): tokenizer.file must be a string") }
        tokenizerFile = file
        artifacts = try json["artifacts"]!.array!.enumerated().map { try Artifact(whereFile, $0.offset, $0.element) }
        parityCases = try (json["parity"]?["cases"]?.array ?? []).enumerated().map { try ParityCase(whereFile, $0.offset, $0.element) }
    }

    public func file(_ relative: String) throws -> URL { try Manifest.resolveInside(root, relative) }

    public func artifacts(backend: String) -> [Artifact] { artifacts.filter { $0.backend == backend } }

    /// The first artifact of `backend`, or an error listing what the bundle has.
    public func firstArtifact(backend: String) throws -> Artifact {
        if let a = artifacts.first(where: { $0.backend == backend }) { return a }
        let names = artifacts.map { "\($0.name) (\($0.backend))" }.joined(separator: ", ")
        throw BundleError(
            "\(root.appendingPathComponent(Manifest.fileName).path): no \(backend) artifact in this bundle (it has: \(names.isEmpty ? "none" : names))")
    }

    /// manifest["preprocessing"].
    public struct ImageSpec {
        public let size: Int
        public let aspectMode: String
        public let padColor: [UInt8]

        init(_ whereFile: String, _ pre: JSON) throws {
            let w = "\(whereFile): preprocessing"
            guard let s = pre["image_size"]?.int, s >= 1, s <= 8192 else { throw BundleError("\(w).image_size must be an integer from 1 to 8192") }
            size = Int(s)
            aspectMode = pre["aspect_mode"]?.string ?? ""
            guard ["pad", "crop", "resize"].contains(aspectMode) else {
                throw BundleError("\(w).aspect_mode is '\(aspectMode)'; this app knows pad, crop and resize")
            }
            guard let pad = pre["pad_color"]?.array, pad.count == 3, pad.allSatisfy({ ($0.int ?? -1) >= 0 && ($0.int ?? 256) <= 255 }) else {
                throw BundleError("\(w).pad_color must be 3 integers 0-255")
            }
            padColor = pad.map { UInt8($0.int!) }
            guard pre["resize"]?.string == "bicubic" else {
                throw BundleError("\(w).resize is '\(pre["resize"]?.string ?? "missing")'; this app implements bicubic (PIL's BICUBIC)")
            }
            guard pre["channel_order"]?.string == "RGB" else {
                throw BundleError("\(w).channel_order is '\(pre["channel_order"]?.string ?? "missing")'; this app produces RGB")
            }
        }
    }

    /// manifest["prompt"].
    public struct PromptSpec {
        public let beforeImage: String
        public let afterImage: String
        public let slot: String
        public let addBos: Bool
        public let bosId: Int
        public let eosIds: [Int]
        public let stopStrings: [String]
        public let beforeImageIds: [Int]
        public let imageTokens: Int
        public let contextLength: Int

        init(_ whereFile: String, _ p: JSON) throws {
            let w = "\(whereFile): prompt"
            func str(_ f: String) throws -> String {
                guard let s = p[f]?.string else { throw BundleError("\(w).\(f) must be a string") }
                return s
            }
            func ids(_ f: String) throws -> [Int] {
                guard let list = p[f]?.array, list.allSatisfy({ ($0.int ?? -1) >= 0 }) else {
                    throw BundleError("\(w).\(f) must be a list of token ids")
                }
                return list.map { Int($0.int!) }
            }
            func integer(_ f: String, _ minimum: Int64) throws -> Int {
                guard let v = p[f]?.int, v >= minimum else { throw BundleError("\(w).\(f) must be an integer of at least \(minimum)") }
                return Int(v)
            }
            beforeImage = try str("before_image")
            afterImage = try str("after_image")
            slot = try str("prompt_slot")
            if !afterImage.contains(slot) && !beforeImage.contains(slot) {
                throw BundleError("\(w): neither before_image nor after_image contains the prompt_slot '\(slot)'")
            }
            guard let b = p["add_bos"]?.bool else { throw BundleError("\(w).add_bos must be true or false") }
            addBos = b
            bosId = try integer("bos_id", 0)
            eosIds = try ids("eos_ids")
            guard let stops = p["stop_strings"]?.array, stops.allSatisfy({ !($0.string ?? "").isEmpty }) else {
                throw BundleError("\(w).stop_strings must be non-empty strings")
            }
            stopStrings = stops.map { $0.string! }
            beforeImageIds = try ids("before_image_ids")
            imageTokens = try integer("image_tokens", 1)
            contextLength = try integer("context_length", 2)
        }
    }

    /// One of manifest["artifacts"].
    public struct Artifact {
        public let name: String
        public let backend: String
        public let file: String
        public let quantization: String
        public let json: JSON

        init(_ whereFile: String, _ index: Int, _ a: JSON) throws {
            json = a
            backend = a["backend"]!.string!
            file = a["file"]!.string!
            name = a["name"]?.string ?? "\(backend)-\(index)"
            quantization = a["quantization"]?["recipe"]?.string ?? "unknown"
        }

        /// A method's section (e.g. "vision" of a Core ML artifact).
        public func method(_ name: String) -> JSON? { json["methods"]?[name] }
    }

    /// One of manifest["parity"]["cases"].
    public struct ParityCase {
        public let id: String
        public let image: String
        public let question: String
        public let maxNewTokens: Int

        init(_ whereFile: String, _ index: Int, _ c: JSON) throws {
            guard let id = c["id"]?.string, let image = c["image"]?.string, let question = c["question"]?.string else {
                throw BundleError("\(whereFile): parity.cases[\(index)] needs id, image and question")
            }
            self.id = id
            self.image = image
            self.question = question
            maxNewTokens = Int(c["max_new_tokens"]?.int ?? 32)
        }
    }
}
