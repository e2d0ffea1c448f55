import Foundation

/// Small, dependency-free SVG charts for reports: line charts (several series), scatter plots
/// (colour by class) and grouped bar charts, with axes, ticks, a title and a legend.
///
/// ```swift
/// var chart = SVGPlot(title: "validation BPC", xLabel: "step", yLabel: "bits per character")
/// chart.line("smoe", xs: [100, 200], ys: [2.1, 1.9])
/// try chart.render().write(toFile: "bpc.svg", atomically: true, encoding: .utf8)
/// ```
public struct SVGPlot {
    public var title: String
    public var xLabel: String
    public var yLabel: String
    public var width = 700.0, height = 400.0
    /// Fix the y range (otherwise from the data).
    public var yRange: (Double, Double)?

    enum Mark { case line, points, bars }
    struct Series { var name: String; var xs: [Double]; var ys: [Double]; var mark: Mark; var color: String }
    var series: [Series] = []
    var barLabels: [String] = []

    /// A colour-blind-friendly palette (Okabe–Ito, then Tableau), cycled.
    public static let palette = [
        "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
        "#4E79A7", "#F28E2B", "#59A14F", "#E15759", "#76B7B2", "#EDC948", "#B07AA1", "#9C755F",
    ]

    public init(title: String, xLabel: String, yLabel: String) {
        self.title = title
        self.xLabel = xLabel
        self.yLabel = yLabel
    }

    public mutating func line(_ name: String, xs: [Double], ys: [Double]) {
        series.append(
            Series(
                name: name, xs: xs, ys: ys, mark: .line, color: SVGPlot.palette[series.count % SVGPlot.palette.count]))
    }

    public mutating func points(_ name: String, xs: [Double], ys: [Double], colorIndex: Int? = nil) {
        let c = SVGPlot.palette[(colorIndex ?? series.count) % SVGPlot.palette.count]
        series.append(Series(name: name, xs: xs, ys: ys, mark: .points, color: c))
    }

    /// Grouped bars: one group per label, one bar per series.
    public mutating func bars(_ name: String, labels: [String], values: [Double]) {
        barLabels = labels
        series.append(
            Series(
                name: name, xs: (0..<values.count).map(Double.init), ys: values, mark: .bars,
                color: SVGPlot.palette[series.count % SVGPlot.palette.count]))
    }

    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(
            of: ">", with: "&gt;")
    }

    /// "Nice" tick values covering [lo, hi].
    static func ticks(_ lo: Double, _ hi: Double, count: Int = 5) -> [Double] {
        guard hi > lo else { return [lo] }
        let raw = (hi - lo) / Double(count)
        let mag = pow(10, floor(log10(raw)))
        let step = [1.0, 2, 2.5, 5, 10].map { $0 * mag }.first { $0 >= raw } ?? raw
        var t = ceil(lo / step) * step, out: [Double] = []
        while t <= hi + step * 1e-9 { out.append(t); t += step }
        return out
    }

    static func label(_ v: Double) -> String {
        if v == 0 { return "0" }
        if abs(v) >= 1e4 || abs(v) < 1e-3 { return String(format: "%.1e", v) }
        return v == v.rounded() ? String(Int(v)) : String(format: "%.3g", v)
    }

    /// The plot area and the data ranges it maps.
    struct Frame {
        let left = 64.0, right = 200.0, top = 36.0, bottom = 48.0
        let pw: Double, ph: Double
        let x0: Double, x1: Double, y0: Double, y1: Double
        init(width: Double, height: Double, x: (Double, Double), y: (Double, Double)) {
            (pw, ph) = (width - left - right, height - top - bottom)
            (x0, x1, y0, y1) = (x.0, x.1, y.0, y.1)
        }
        func sx(_ x: Double) -> Double { left + (x - x0) / (x1 - x0) * pw }
        func sy(_ y: Double) -> Double { top + (1 - (y - y0) / (y1 - y0)) * ph }
    }

    /// Data ranges (bars: one slot per label, from 0), padded by 5% for lines and points.
    func frame() -> Frame {
        let hasBars = series.contains { $0.mark == .bars }
        let allX = series.flatMap(\.xs).filter(\.isFinite), allY = series.flatMap(\.ys).filter(\.isFinite)
        var x0 = allX.min() ?? 0, x1 = allX.max() ?? 1
        var (y0, y1) = yRange ?? (allY.min() ?? 0, allY.max() ?? 1)
        if hasBars { x0 = -0.5; x1 = Double(max(barLabels.count, 1)) - 0.5; y0 = min(0, y0) }
        if x1 == x0 { x0 -= 1; x1 += 1 }
        if y1 == y0 { y0 -= 1; y1 += 1 }
        if yRange == nil && !hasBars { let pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad }
        return Frame(width: width, height: height, x: (x0, x1), y: (y0, y1))
    }

    public func render() -> String {
        let f = frame()
        var o = [
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" "
                + "font-family=\"sans-serif\" font-size=\"11\">",
            "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
            "<text x=\"\(f.left + f.pw / 2)\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" "
                + "font-weight=\"bold\">\(SVGPlot.esc(title))</text>",
        ]
        o += axes(f) + marks(f) + legend(f)
        o.append("</svg>")
        return o.joined(separator: "\n") + "\n"
    }

    /// Grid, ticks, frame and axis labels.
    func axes(_ f: Frame) -> [String] {
        var o: [String] = []
        for t in SVGPlot.ticks(f.y0, f.y1) {
            o.append(
                "<line x1=\"\(f.left)\" y1=\"\(f.sy(t))\" x2=\"\(f.left + f.pw)\" y2=\"\(f.sy(t))\" "
                    + "stroke=\"#e5e5e5\"/>"
            )
            o.append("<text x=\"\(f.left - 6)\" y=\"\(f.sy(t) + 4)\" text-anchor=\"end\">\(SVGPlot.label(t))</text>")
        }
        let below = f.top + f.ph + 16
        if series.contains(where: { $0.mark == .bars }) {
            for (i, l) in barLabels.enumerated() {
                o.append(
                    "<text x=\"\(f.sx(Double(i)))\" y=\"\(below)\" text-anchor=\"middle\">\(SVGPlot.esc(l))</text>")
            }
        } else {
            for t in SVGPlot.ticks(f.x0, f.x1) {
                o.append(
                    "<line x1=\"\(f.sx(t))\" y1=\"\(f.top)\" x2=\"\(f.sx(t))\" y2=\"\(f.top + f.ph)\" "
                        + "stroke=\"#f0f0f0\"/>"
                )
                o.append("<text x=\"\(f.sx(t))\" y=\"\(below)\" text-anchor=\"middle\">\(SVGPlot.label(t))</text>")
            }
        }
        let midY = f.top + f.ph / 2
        return o + [
            "<rect x=\"\(f.left)\" y=\"\(f.top)\" width=\"\(f.pw)\" height=\"\(f.ph)\" fill=\"none\" stroke=\"#444\"/>",
            "<text x=\"\(f.left + f.pw / 2)\" y=\"\(height - 10)\" "
                + "text-anchor=\"middle\">\(SVGPlot.esc(xLabel))</text>",
            "<text x=\"16\" y=\"\(midY)\" text-anchor=\"middle\" transform=\"rotate(-90 16 "
                + "\(midY))\">\(SVGPlot.esc(yLabel))</text>",
        ]
    }

    /// Lines, points and bars of every series.
    func marks(_ f: Frame) -> [String] {
        var o: [String] = []
        let barSeries = series.filter { $0.mark == .bars }
        let barWidth = barSeries.isEmpty ? 0 : f.pw / Double(max(barLabels.count, 1)) * 0.8 / Double(barSeries.count)
        var barIndex = 0
        for s in series {
            let pts = zip(s.xs, s.ys).filter { $0.0.isFinite && $0.1.isFinite }
            switch s.mark {
            case .line:
                let path = pts.map { String(format: "%.1f,%.1f", f.sx($0.0), f.sy($0.1)) }.joined(separator: " ")
                o.append("<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(s.color)\" stroke-width=\"1.8\"/>")
            case .points:
                o += pts.map { x, y in
                    String(
                        format: "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.2\" fill=\"%@\" fill-opacity=\"0.7\"/>", f.sx(x),
                        f.sy(y), s.color)
                }
            case .bars:
                for (x, y) in pts {
                    let bx = f.sx(x) - barWidth * Double(barSeries.count) / 2 + barWidth * Double(barIndex)
                    let top = f.sy(max(y, 0)), h = abs(f.sy(y) - f.sy(0))
                    o.append(
                        String(
                            format: "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%@\"/>",
                            bx, top, max(barWidth - 1, 1), h, s.color))
                }
                barIndex += 1
            }
        }
        return o
    }

    /// One legend entry per distinct series name, as many as fit beside the plot.
    func legend(_ f: Frame) -> [String] {
        var o: [String] = [], seen = Set<String>(), ly = f.top + 6
        for s in series where !seen.contains(s.name) {
            seen.insert(s.name)
            o.append("<rect x=\"\(f.left + f.pw + 12)\" y=\"\(ly)\" width=\"12\" height=\"12\" fill=\"\(s.color)\"/>")
            o.append(
                "<text x=\"\(f.left + f.pw + 30)\" y=\"\(ly + 10)\">\(SVGPlot.esc(String(s.name.prefix(28))))</text>")
            ly += 17
            if ly > f.top + f.ph { break }
        }
        return o
    }
}
