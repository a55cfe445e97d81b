import CoreGraphics
import Foundation
import ImageIO
import MobileVLMCore

/// Decodes a picture to the core's RgbImage as the Python reference loads it: full resolution, the
/// EXIF orientation applied by the core (not by ImageIO), transparency composited over white by the core.
enum PictureLoading {
    static let maxPixels = 64_000_000

    static func load(_ data: Data, name: String) throws -> RgbImage {
        guard let source = CGImageSourceCreateWithData(data as CFData, nil), CGImageSourceGetCount(source) > 0 else {
            throw BundleError("\(name): not a decodable image")
        }
        let properties = CGImageSourceCopyPropertiesAtIndex(source, 0, nil) as? [CFString: Any] ?? [:]
        let orientation = (properties[kCGImagePropertyOrientation] as? NSNumber)?.intValue ?? 1
        guard let image = CGImageSourceCreateImageAtIndex(source, 0, nil) else {
            throw BundleError("\(name): image data is corrupt or truncated")
        }
        let width = image.width
        let height = image.height
        if width * height > maxPixels {
            throw BundleError("\(name): image is \(width)x\(height) pixels, more than the \(maxPixels) accepted")
        }
        // Core Graphics draws 8-bit RGBA only premultiplied; undo it (exact for opaque pixels, which
        // is every pixel of a photo; semi-transparent pixels can be off by a level).
        var rgba = [UInt8](repeating: 0, count: width * height * 4)
        let drawn = rgba.withUnsafeMutableBytes { buffer -> Bool in
            guard
                let context = CGContext(
                    data: buffer.baseAddress, width: width, height: height, bitsPerComponent: 8, bytesPerRow: width * 4,
                    space: CGColorSpace(name: CGColorSpace.sRGB)!, bitmapInfo: CGImageAlphaInfo.premultipliedLast.rawValue)
            else { return false }
            context.draw(image, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        if !drawn { throw BundleError("\(name): cannot draw the image into an RGBA buffer") }
        for i in 0..<(width * height) {
            let a = Int(rgba[4 * i + 3])
            if a != 0 && a != 255 {
                for c in 0..<3 { rgba[4 * i + c] = UInt8(min(255, (Int(rgba[4 * i + c]) * 255 + a / 2) / a)) }
            }
        }
        return RgbImage.fromRGBA(width: width, height: height, rgba: rgba).oriented(orientation)
    }

    /// A CGImage of an RgbImage, for the preview.
    static func cgImage(_ image: RgbImage) -> CGImage? {
        var rgba = [UInt8](repeating: 255, count: image.width * image.height * 4)
        for i in 0..<(image.width * image.height) {
            rgba[4 * i] = image.rgb[3 * i]
            rgba[4 * i + 1] = image.rgb[3 * i + 1]
            rgba[4 * i + 2] = image.rgb[3 * i + 2]
        }
        guard let provider = CGDataProvider(data: Data(rgba) as CFData) else { return nil }
        return CGImage(
            width: image.width, height: image.height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: image.width * 4,
            space: CGColorSpace(name: CGColorSpace.sRGB)!, bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
            provider: provider, decode: nil, shouldInterpolate: true, intent: .defaultIntent)
    }
}
