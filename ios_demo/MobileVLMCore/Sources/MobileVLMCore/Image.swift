import Foundation

/// An 8-bit RGB picture, rows top to bottom, 3 bytes per pixel: what the platform decoder's bitmap
/// becomes before the manifest's preprocessing (same steps and bytes as the Python reference / PIL).
public struct RgbImage: Equatable {
    public let width: Int
    public let height: Int
    public var rgb: [UInt8]

    public init(width: Int, height: Int, rgb: [UInt8]) {
        precondition(width >= 1 && height >= 1 && rgb.count == width * height * 3, "RgbImage: \(width)x\(height) needs \(width * height * 3) bytes")
        self.width = width
        self.height = height
        self.rgb = rgb
    }

    public static func filled(width: Int, height: Int, color: [UInt8]) -> RgbImage {
        var data = [UInt8](repeating: 0, count: width * height * 3)
        for i in 0..<(width * height) {
            data[3 * i] = color[0]; data[3 * i + 1] = color[1]; data[3 * i + 2] = color[2]
        }
        return RgbImage(width: width, height: height, rgb: data)
    }

    /// Straight-alpha RGBA bytes composited over opaque white as PIL's `Image.alpha_composite` does
    /// (its 7-bit fixed point); alpha 255 leaves a pixel unchanged. iOS: draw a CGImage into an RGBA
    /// context with `premultipliedLast` and un-premultiply first, or use `rgbaStraight` from the app.
    public static func fromRGBA(width: Int, height: Int, rgba: [UInt8]) -> RgbImage {
        precondition(rgba.count == width * height * 4, "expected \(width * height * 4) RGBA bytes, got \(rgba.count)")
        var out = [UInt8](repeating: 0, count: width * height * 3)
        for i in 0..<(width * height) {
            let a = Int(rgba[4 * i + 3])
            for c in 0..<3 { out[3 * i + c] = compositeOverWhite(Int(rgba[4 * i + c]), a) }
        }
        return RgbImage(width: width, height: height, rgb: out)
    }

    static func compositeOverWhite(_ src: Int, _ alpha: Int) -> UInt8 {
        if alpha == 0 { return 255 }
        let blend = 255 * (255 - alpha)
        let outa255 = alpha * 255 + blend
        let coef1 = alpha * 255 * 255 * 128 / outa255
        let coef2 = 255 * 128 - coef1
        let tmp = src * coef1 + 255 * coef2 + (0x80 << 7)
        return UInt8((((tmp >> 8) + tmp) >> 8) >> 7)
    }

    /// Upright for an EXIF orientation tag 1-8 (as PIL's `ImageOps.exif_transpose`).
    public func oriented(_ exifOrientation: Int) -> RgbImage {
        switch exifOrientation {
        case 2: return transform(swap: false, mirrorX: true, mirrorY: false)
        case 3: return transform(swap: false, mirrorX: true, mirrorY: true)
        case 4: return transform(swap: false, mirrorX: false, mirrorY: true)
        case 5: return transform(swap: true, mirrorX: false, mirrorY: false)
        case 6: return transform(swap: true, mirrorX: true, mirrorY: false)
        case 7: return transform(swap: true, mirrorX: true, mirrorY: true)
        case 8: return transform(swap: true, mirrorX: false, mirrorY: true)
        default: return self
        }
    }

    private func transform(swap: Bool, mirrorX: Bool, mirrorY: Bool) -> RgbImage {
        let w = swap ? height : width
        let h = swap ? width : height
        var out = [UInt8](repeating: 0, count: w * h * 3)
        for y in 0..<h {
            for x in 0..<w {
                let tx = mirrorX ? w - 1 - x : x
                let ty = mirrorY ? h - 1 - y : y
                let sx = swap ? ty : tx
                let sy = swap ? tx : ty
                let s = 3 * (sy * width + sx)
                let d = 3 * (y * w + x)
                out[d] = rgb[s]; out[d + 1] = rgb[s + 1]; out[d + 2] = rgb[s + 2]
            }
        }
        return RgbImage(width: w, height: h, rgb: out)
    }

    public func crop(left: Int, top: Int, width w: Int, height h: Int) -> RgbImage {
        var out = [UInt8](repeating: 0, count: w * h * 3)
        for y in 0..<h {
            let s = 3 * ((top + y) * width + left)
            out.replaceSubrange((3 * y * w)..<(3 * (y + 1) * w), with: rgb[s..<(s + 3 * w)])
        }
        return RgbImage(width: w, height: h, rgb: out)
    }

    /// Pasted onto a `color` square of side max(w, h) at ((side - w) / 2, (side - h) / 2).
    public func paddedToSquare(_ color: [UInt8]) -> RgbImage {
        let side = max(width, height)
        var canvas = RgbImage.filled(width: side, height: side, color: color)
        let left = (side - width) / 2
        let top = (side - height) / 2
        for y in 0..<height {
            let d = 3 * ((top + y) * side + left)
            canvas.rgb.replaceSubrange(d..<(d + 3 * width), with: rgb[(3 * y * width)..<(3 * (y + 1) * width)])
        }
        return canvas
    }

    /// uint8 CHW bytes: the layout of the artifact's [1, 3, S, S] input.
    public func chw() -> [UInt8] {
        let n = width * height
        var out = [UInt8](repeating: 0, count: 3 * n)
        for i in 0..<n {
            out[i] = rgb[3 * i]; out[n + i] = rgb[3 * i + 1]; out[2 * n + i] = rgb[3 * i + 2]
        }
        return out
    }
}

/// manifest["preprocessing"] applied to an upright picture. The resize is a port of Pillow's 8-bit
/// `ImagingResample` (Resample.c): bicubic (a = -0.5) widened by the downscale factor, coefficients
/// normalised in doubles and rounded to 22-bit fixed point, horizontal then vertical pass, each clipped
/// to 0...255 — the same bytes as PIL, checked against the golden files' SHA-256.
public struct ImagePreprocessor {
    static let precisionBits: Int32 = 22
    public let spec: Manifest.ImageSpec

    public init(_ spec: Manifest.ImageSpec) { self.spec = spec }

    /// uint8 CHW bytes of length 3 * S * S.
    public func tensor(_ upright: RgbImage) -> [UInt8] {
        ImagePreprocessor.prepare(upright, size: spec.size, aspectMode: spec.aspectMode, padColor: spec.padColor).chw()
    }

    public static func prepare(_ input: RgbImage, size: Int, aspectMode: String, padColor: [UInt8]) -> RgbImage {
        var image = input
        if aspectMode == "pad" && image.width != image.height {
            image = image.paddedToSquare(padColor)
        } else if aspectMode == "crop" && image.width != image.height {
            // Python: round() rounds half to even
            let scale = Double(size) / Double(min(image.width, image.height))
            let w = max(size, Int((Double(image.width) * scale).rounded(.toNearestOrEven)))
            let h = max(size, Int((Double(image.height) * scale).rounded(.toNearestOrEven)))
            image = resize(image, w, h)
            image = image.crop(left: (w - size) / 2, top: (h - size) / 2, width: size, height: size)
        }
        if image.width != size || image.height != size {
            image = resize(image, size, size)
        }
        return image
    }

    static func bicubic(_ value: Double) -> Double {
        let a = -0.5
        let x = value < 0.0 ? -value : value
        if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 }
        if x < 2.0 { return (((x - 5) * x + 8) * x - 4) * a }
        return 0.0
    }

    struct Coefficients {
        let ksize: Int
        var bounds: [Int]
        var k: [Int32]

        init(inSize: Int, outSize: Int) {
            let scale = Double(inSize) / Double(outSize)
            let filterscale = scale < 1.0 ? 1.0 : scale
            let support = 2.0 * filterscale
            ksize = Int(support.rounded(.up)) * 2 + 1
            bounds = [Int](repeating: 0, count: outSize * 2)
            var kk = [Double](repeating: 0, count: outSize * ksize)
            for xx in 0..<outSize {
                let center = 0.0 + (Double(xx) + 0.5) * scale
                var ww = 0.0
                let ss = 1.0 / filterscale
                var xmin = Int(center - support + 0.5)
                if xmin < 0 { xmin = 0 }
                var xmax = Int(center + support + 0.5)
                if xmax > inSize { xmax = inSize }
                xmax -= xmin
                for x in 0..<max(xmax, 0) {
                    let w = ImagePreprocessor.bicubic((Double(x + xmin) - center + 0.5) * ss)
                    kk[xx * ksize + x] = w
                    ww += w
                }
                for x in 0..<max(xmax, 0) where ww != 0.0 {
                    kk[xx * ksize + x] /= ww
                }
                bounds[2 * xx] = xmin
                bounds[2 * xx + 1] = xmax
            }
            let one = Double(Int32(1) << ImagePreprocessor.precisionBits)
            k = kk.map { $0 < 0 ? Int32(-0.5 + $0 * one) : Int32(0.5 + $0 * one) }
        }
    }

    @inline(__always) static func clip8(_ v: Int32) -> UInt8 {
        let s = v >> precisionBits
        return s < 0 ? 0 : (s > 255 ? 255 : UInt8(s))
    }

    /// Pillow's `Image.resize((w, h), Image.BICUBIC)` of an RGB image.
    public static func resize(_ input: RgbImage, _ outW: Int, _ outH: Int) -> RgbImage {
        if outW == input.width && outH == input.height { return input }
        let vert = Coefficients(inSize: input.height, outSize: outH)
        let yFirst = vert.bounds[0]
        let yLast = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1]
        var src = input
        var rowOffset = 0
        let half = Int32(1) << (precisionBits - 1)
        if outW != input.width {
            let horiz = Coefficients(inSize: input.width, outSize: outW)
            let rows = yLast - yFirst
            var tmp = [UInt8](repeating: 0, count: outW * rows * 3)
            input.rgb.withUnsafeBufferPointer { px in
                for yy in 0..<rows {
                    let row = (yy + yFirst) * input.width * 3
                    for xx in 0..<outW {
                        let xmin = horiz.bounds[2 * xx], xmax = horiz.bounds[2 * xx + 1], base = xx * horiz.ksize
                        var s0 = half, s1 = half, s2 = half
                        for x in 0..<xmax {
                            let p = row + (x + xmin) * 3
                            let w = horiz.k[base + x]
                            s0 = s0 &+ Int32(px[p]) &* w
                            s1 = s1 &+ Int32(px[p + 1]) &* w
                            s2 = s2 &+ Int32(px[p + 2]) &* w
                        }
                        let d = (yy * outW + xx) * 3
                        tmp[d] = clip8(s0); tmp[d + 1] = clip8(s1); tmp[d + 2] = clip8(s2)
                    }
                }
            }
            src = RgbImage(width: outW, height: rows, rgb: tmp)
            rowOffset = yFirst
        }
        if outH == input.height {
            return src.height == outH ? src : src.crop(left: 0, top: 0, width: outW, height: outH)
        }
        var out = [UInt8](repeating: 0, count: outW * outH * 3)
        src.rgb.withUnsafeBufferPointer { px in
            for yy in 0..<outH {
                let ymin = vert.bounds[2 * yy] - rowOffset, ymax = vert.bounds[2 * yy + 1], base = yy * vert.ksize
                for xx in 0..<outW {
                    var s0 = half, s1 = half, s2 = half
                    for y in 0..<ymax {
                        let p = ((y + ymin) * outW + xx) * 3
                        let w = vert.k[base + y]
                        s0 = s0 &+ Int32(px[p]) &* w
                        s1 = s1 &+ Int32(px[p + 1]) &* w
                        s2 = s2 &+ Int32(px[p + 2]) &* w
                    }
                    let d = (yy * outW + xx) * 3
                    out[d] = clip8(s0); out[d + 1] = clip8(s1); out[d + 2] = clip8(s2)
                }
            }
        }
        return RgbImage(width: outW, height: outH, rgb: out)
    }
}
