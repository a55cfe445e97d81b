import MobileVLMCore
import PhotosUI
import SwiftUI

/// Pick a bundle (Documents/ via the Files app, or any folder), a picture and a question; the answer
/// streams in, then the runner's statistics. Errors (no manifest, a manifest version the app does not
/// know, a missing artifact) are shown in red as the core words them.
struct ContentView: View {
    @StateObject private var model = DemoModel()
    @State private var photo: PhotosPickerItem?
    @State private var importing = false

    var body: some View {
        NavigationStack {
            Form {
                Section("Bundle") {
                    Picker("Bundle", selection: $model.bundleURL) {
                        Text("None").tag(URL?.none)
                        ForEach(model.bundlesInDocuments, id: \.self) { url in
                            Text(url.lastPathComponent).tag(URL?.some(url))
                        }
                    }
                    Button("Open a bundle folder…") { importing = true }
                    if !model.artifacts.isEmpty {
                        Picker("Artifact", selection: $model.artifactName) {
                            ForEach(model.artifacts, id: \.self) { Text($0) }
                        }
                    }
                    if let status = model.status {
                        Text(status.text).foregroundStyle(status.isError ? .red : .secondary).font(.footnote)
                    }
                }
                Section("Question") {
                    PhotosPicker("Pick a picture", selection: $photo, matching: .images)
                    if let preview = model.preview {
                        Image(decorative: preview, scale: 1).resizable().scaledToFit().frame(maxHeight: 220)
                    }
                    TextField("Ask about the picture", text: $model.question, axis: .vertical)
                    HStack {
                        Button("Ask") { model.ask() }.disabled(model.running)
                        Spacer()
                        Button("Stop", role: .destructive) { model.stop() }.disabled(!model.running)
                    }
                }
                Section("Answer") {
                    Text(model.answer).font(.body)
                    if !model.stats.isEmpty {
                        Text(model.stats).font(.caption.monospaced()).foregroundStyle(.secondary)
                    }
                }
            }
            .navigationTitle("MobileVLM")
            .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
                if case .success(let url) = result { model.bundleURL = url }
            }
            .onChange(of: photo) { _, item in
                Task {
                    if let data = try? await item?.loadTransferable(type: Data.self) { model.setPicture(data) }
                }
            }
            .onChange(of: model.bundleURL) { _, _ in model.loadBundle() }
            .onChange(of: model.artifactName) { _, _ in model.startEngine() }
            .onAppear { model.scanDocuments() }
        }
    }
}

/// The screen's state; the work runs off the main thread, results come back on it.
@MainActor
final class DemoModel: ObservableObject {
    struct Status {
        let text: String
        let isError: Bool
    }

    @Published var bundleURL: URL?
    @Published var bundlesInDocuments: [URL] = []
    @Published var artifacts: [String] = []
    @Published var artifactName = ""
    @Published var status: Status?
    @Published var preview: CGImage?
    @Published var question = ""
    @Published var answer = ""
    @Published var stats = ""
    @Published var running = false

    private var manifest: Manifest?
    private var tokenizer: Tokenizer?
    private var session: Session?
    private var picture: RgbImage?
    private let queue = DispatchQueue(label: "mobilevlm.engine")

    /// Bundles copied into the app's Documents folder (Files app → On My iPhone → MobileVLM).
    func scanDocuments() {
        let docs = FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
        let folders = (try? FileManager.default.contentsOfDirectory(at: docs, includingPropertiesForKeys: nil)) ?? []
        bundlesInDocuments = folders.filter { FileManager.default.fileExists(atPath: $0.appendingPathComponent(Manifest.fileName).path) }
        if bundleURL == nil { bundleURL = bundlesInDocuments.first }
    }

    func loadBundle() {
        guard let url = bundleURL else { return }
        let scoped = url.startAccessingSecurityScopedResource()
        defer { if scoped { url.stopAccessingSecurityScopedResource() } }
        do {
            let m = try Manifest.load(url, verify: .size)
            manifest = m
            tokenizer = try Tokenizer.load(try m.file(m.tokenizerFile))
            let runnable = m.artifacts.filter { EngineFactory.backends.contains($0.backend) }
            if runnable.isEmpty { _ = try m.firstArtifact(backend: "executorch") }
            artifacts = runnable.map(\.name)
            artifactName = artifacts.first ?? ""
            if picture == nil, let first = m.parityCases.first {
                let file = try m.file(first.image)
                if let data = FileManager.default.contents(atPath: file.path) { setPicture(data, name: file.path) }
                question = first.question
            }
        } catch {
            show(error)
        }
    }

    func startEngine() {
        guard let m = manifest, let artifact = m.artifacts.first(where: { $0.name == artifactName }) else { return }
        status = Status(text: "Loading \(artifact.name)…", isError: false)
        let tokenizer = self.tokenizer
        queue.async {
            do {
                let started = Date()
                let engine = try EngineFactory.make(manifest: m, artifact: artifact)
                try engine.load()
                let seconds = Date().timeIntervalSince(started)
                DispatchQueue.main.async {
                    self.session = Session(manifest: m, tokenizer: tokenizer, engine: engine)
                    self.status = Status(text: "\(artifact.name) loaded in \(fixed(seconds, 2)) s", isError: false)
                }
            } catch {
                DispatchQueue.main.async { self.show(error) }
            }
        }
    }

    func setPicture(_ data: Data, name: String = "picture") {
        do {
            let image = try PictureLoading.load(data, name: name)
            picture = image
            preview = PictureLoading.cgImage(image)
        } catch {
            show(error)
        }
    }

    func ask() {
        guard let session else { return show(BundleError("Load a bundle first.")) }
        guard let picture else { return show(BundleError("Pick a picture first.")) }
        let question = self.question
        answer = ""
        stats = ""
        running = true
        queue.async {
            do {
                let maxNew = max(1, min(256, session.manifest.prompt.contextLength / 2))
                let result = try session.ask(picture, question: question, maxNewTokens: maxNew) { visible in
                    DispatchQueue.main.async { self.answer = visible }
                }
                DispatchQueue.main.async {
                    self.answer = result.text
                    self.stats = (result.stats?.line ?? "no statistics") + (result.reason == .maxNewTokens ? " (token limit)" : "")
                    self.running = false
                }
            } catch {
                DispatchQueue.main.async {
                    self.show(error)
                    self.running = false
                }
            }
        }
    }

    func stop() { session?.engine.stop() }

    private func show(_ error: Error) {
        status = Status(text: (error as? BundleError)?.message ?? error.localizedDescription, isError: true)
    }
}

/// The engines this app has, by manifest backend.
enum EngineFactory {
    static var backends: [String] {
        if #available(iOS 18.0, *) { return ["executorch", "coreml"] }
        return ["executorch"]
    }

    static func make(manifest: Manifest, artifact: Manifest.Artifact) throws -> Engine {
        switch artifact.backend {
        case ExecuTorchEngine.backend:
            return try ExecuTorchEngine(manifest: manifest, artifact: artifact)
        case "coreml":
            if #available(iOS 18.0, *) { return try CoreMLEngine(manifest: manifest, artifact: artifact) }
            throw BundleError("\(artifact.name): Core ML artifacts need iOS 18 (stateful models)")
        default:
            throw BundleError("\(artifact.name): this app has no engine for backend '\(artifact.backend)'")
        }
    }
}
