import Foundation
import VQMoE
import XCTest

/// Code perplexity, codes used and dead codes of an evaluation, and the collapse threshold.
final class CodeHealthTests: XCTestCase {
    func testPerplexityUsedAndDeadByHand() {
        // p = (2046, 2) / 2048: H = −Σ p log p.
        let p1 = 2046.0 / 2048, p2 = 2.0 / 2048
        let h = CodeHealth([0, 0, 0, 2, 2046, 0, 0, 0])
        XCTAssertEqual(h.perplexity, exp(-(p1 * log(p1) + p2 * log(p2))), accuracy: 1e-12)
        XCTAssertEqual(h.perplexity, 1.00778, accuracy: 1e-5)
        XCTAssertEqual(h.used, 2)
        XCTAssertEqual(h.dead, 6)
        XCTAssertEqual(h.codebookSize, 8)
        XCTAssertEqual(CodeHealth([5, 5, 5, 5]).perplexity, 4, accuracy: 1e-12)  // uniform: K
        XCTAssertEqual(CodeHealth([0, 7, 0]).perplexity, 1, accuracy: 1e-12)
        XCTAssertEqual(CodeHealth([0, 0]).perplexity, 0)  // no tokens
    }

    func testDefaultThresholdIsAQuarterOfTheCodebookAtLeastOneAndAHalf() {
        XCTAssertEqual(CodeHealth.defaultThreshold(k: 8), 2)
        XCTAssertEqual(CodeHealth.defaultThreshold(k: 4), 1.5)
        XCTAssertEqual(CodeHealth.defaultThreshold(k: 64), 16)
        XCTAssertTrue(CodeHealth([2046, 2, 0, 0, 0, 0, 0, 0]).isCollapsed(threshold: 2))
        XCTAssertFalse(CodeHealth([1, 1, 1, 1, 1, 1, 1, 1]).isCollapsed(threshold: 2))
        XCTAssertFalse(CodeHealth([2046, 2, 0, 0, 0, 0, 0, 0]).isCollapsed(threshold: 0), "0 turns the check off")
    }
}
