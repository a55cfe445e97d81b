import SwiftUI

@main
struct MobileVLMDemoApp: App {
    var body: some Scene {
        WindowGroup {
            ContentView()
        }
    }
}
