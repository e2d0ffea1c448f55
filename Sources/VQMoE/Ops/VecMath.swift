/// Vectorised exp and erf over SIMD8<Float> (scalar libm calls dominate softmax and GELU
/// otherwise). Accuracy (measured): exp relative error ≤ 2.4e-7 over [−87, 88]; erf absolute
/// error ≤ 3e-7 (Abramowitz & Stegun 7.1.26), both far inside the engine's PyTorch tolerances.
///
/// ```swift
/// VecMath.exp(SIMD8<Float>(repeating: 1))   // e
/// VecMath.expInPlace(row, count: n, subtracting: max)
/// ```
public enum VecMath {
    /// e^x: x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6 polynomial, 2^n through the exponent
    /// bits. Only lane-wise float/int arithmetic and bit casts (generic SIMD rounding and
    /// conversions are scalarised by the compiler): n is rounded with the 1.5·2^23 trick.
    @inline(__always) public static func exp(_ xIn: SIMD8<Float>) -> SIMD8<Float> {
        let x = clamp(xIn, -87.3, 88.3)
        let magic = SIMD8<Float>(repeating: 12_582_912)
        let shifted = x * 1.442695040888963 + magic
        let n = shifted - magic
        // r = x − n·ln2 in two steps (Cody–Waite) for accuracy.
        let r = x - n * 0.693145751953125 - n * 1.428606765330187e-06
        var p = SIMD8<Float>(repeating: 1.0 / 720)
        p = p * r + 1.0 / 120
        p = p * r + 1.0 / 24
        p = p * r + 1.0 / 6
        p = p * r + 0.5
        p = p * r + 1
        p = p * r + 1
        let ni = unsafeBitCast(shifted, to: SIMD8<Int32>.self) &- 0x4B40_0000
        return p * unsafeBitCast((ni &+ 127) &<< 23, to: SIMD8<Float>.self)
    }

    /// |v| per lane (sign bit cleared).
    @inline(__always) static func abs(_ v: SIMD8<Float>) -> SIMD8<Float> {
        unsafeBitCast(
            unsafeBitCast(v, to: SIMD8<UInt32>.self) & SIMD8<UInt32>(repeating: 0x7FFF_FFFF), to: SIMD8<Float>.self)
    }

    /// max(a, b) per lane as (a + b + |a − b|)/2 (finite inputs; no generic call).
    @inline(__always) static func lanewiseMax(_ a: SIMD8<Float>, _ b: SIMD8<Float>) -> SIMD8<Float> {
        0.5 * (a + b + abs(a - b))
    }

    /// GELU and its derivative in one pass, sharing one exp: with a = |x|/√2,
    /// e = exp(−a²) = √(2π)·φ(x), Φ(x) = ½(1 ± erf(a)), gelu = x·Φ(x), gelu' = Φ(x) + x·φ(x).
    @inline(__always) public static func geluAndDerivative(
        _ x: SIMD8<Float>
    ) -> (value: SIMD8<Float>, derivative: SIMD8<Float>) {
        let signBit = SIMD8<UInt32>(repeating: 0x8000_0000)
        let bits = unsafeBitCast(x, to: SIMD8<UInt32>.self)
        let a = unsafeBitCast(bits & ~signBit, to: SIMD8<Float>.self) * 0.70710678118654752
        let one = SIMD8<Float>(repeating: 1)
        let t = one / (one + 0.3275911 * a)
        var p = SIMD8<Float>(repeating: 1.061405429)
        p = p * t - 1.453152027
        p = p * t + 1.421413741
        p = p * t - 0.284496736
        p = p * t + 0.254829592
        let e = exp(-(a * a))
        let erfAbs = one - p * t * e
        let erfX = unsafeBitCast(
            unsafeBitCast(erfAbs, to: SIMD8<UInt32>.self) | (bits & signBit), to: SIMD8<Float>.self)
        let cdf = 0.5 * (one + erfX)
        return (x * cdf, cdf + x * (0.3989422804014327 * e))
    }

    /// min(max(x, lo), hi) with lane-wise arithmetic only: max(a,b) = (a + b + |a − b|)/2.
    @inline(__always) static func clamp(_ x: SIMD8<Float>, _ lo: Float, _ hi: Float) -> SIMD8<Float> {
        let l = SIMD8<Float>(repeating: lo), h = SIMD8<Float>(repeating: hi)
        let up = 0.5 * (x + l + abs(x - l))
        return 0.5 * (up + h - abs(up - h))
    }

    /// erf(x), Abramowitz & Stegun 7.1.26 on |x|, sign restored from x's sign bit.
    @inline(__always) public static func erf(_ x: SIMD8<Float>) -> SIMD8<Float> {
        let signBit = SIMD8<UInt32>(repeating: 0x8000_0000)
        let bits = unsafeBitCast(x, to: SIMD8<UInt32>.self)
        let a = unsafeBitCast(bits & ~signBit, to: SIMD8<Float>.self)
        let one = SIMD8<Float>(repeating: 1)
        let t = one / (one + 0.3275911 * a)
        var p = SIMD8<Float>(repeating: 1.061405429)
        p = p * t - 1.453152027
        p = p * t + 1.421413741
        p = p * t - 0.284496736
        p = p * t + 0.254829592
        let y = one - p * t * exp(-(a * a))
        return unsafeBitCast(unsafeBitCast(y, to: SIMD8<UInt32>.self) | (bits & signBit), to: SIMD8<Float>.self)
    }

    /// row[i] = e^(row[i] − shift) for i < count; returns Σ.
    @inline(__always) public static func expInPlace(
        _ row: UnsafeMutablePointer<Float>, count: Int, subtracting shift: Float
    ) -> Float {
        var acc = SIMD8<Float>(repeating: 0)
        var i = 0
        let s = SIMD8<Float>(repeating: shift)
        while i + 8 <= count {
            let v = exp(UnsafeRawPointer(row + i).loadUnaligned(as: SIMD8<Float>.self) - s)
            UnsafeMutableRawPointer(row + i).storeBytes(of: v, as: SIMD8<Float>.self)
            acc += v
            i += 8
        }
        var sum = acc.sum()
        if i < count {
            var tail = SIMD8<Float>(repeating: -Float.infinity)
            for j in i..<count { tail[j - i] = row[j] }
            let v = exp(tail - s)
            for j in i..<count { row[j] = v[j - i]; sum += v[j - i] }
        }
        return sum
    }

    /// max of row[0..<count] (finite values).
    /// No NaN or ±Inf among `count` floats: x·0 is 0 for finite x and NaN otherwise, summed
    /// eight lanes at a time (a NaN survives every addition).
    public static func allFinite(_ p: UnsafePointer<Float>, count: Int) -> Bool {
        var acc = SIMD8<Float>(repeating: 0)
        var i = 0
        while i + 8 <= count {
            acc += UnsafeRawPointer(p + i).loadUnaligned(as: SIMD8<Float>.self) * 0
            i += 8
        }
        var tail: Float = 0
        while i < count {
            tail += p[i] * 0
            i += 1
        }
        return (acc.sum() + tail) == 0
    }

    @inline(__always) public static func max(_ row: UnsafePointer<Float>, count: Int) -> Float {
        var r = -Float.infinity
        var i = 0
        if count >= 8 {
            var m = UnsafeRawPointer(row).loadUnaligned(as: SIMD8<Float>.self)
            i = 8
            while i + 8 <= count {
                m = lanewiseMax(m, UnsafeRawPointer(row + i).loadUnaligned(as: SIMD8<Float>.self)); i += 8
            }
            for l in 0..<8 { r = Swift.max(r, m[l]) }
        }
        while i < count { r = Swift.max(r, row[i]); i += 1 }
        return r
    }
}
