import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// Config values are checked against a plugin's schema: unknown key, wrong type, out of
/// range and power-of-two errors name the key path; defaults are filled in.
final class HyperparameterTests: XCTestCase {
    private func spec(
        _ name: String, _ type: Int32, flags: UInt32 = 0, def: Double = 0, defString: String? = nil,
        min: Double = 0, max: Double = 0, choices: String? = nil
    ) throws -> HyperparameterSpec {
        try name.withCString { n in
            try (defString ?? "").withCString { ds in
                try (choices ?? "").withCString { cs in
                    try HyperparameterSpec(
                        vqmoe_hparam_spec(
                            name: n, type: type, flags: flags, description: nil, default_number: def,
                            default_string: defString == nil ? nil : ds, min_value: min, max_value: max,
                            choices: choices == nil ? nil : cs), plugin: "test")
                }
            }
        }
    }

    private func schema() throws -> [HyperparameterSpec] {
        [
            try spec("codebook_size", VQMOE_HP_INT, flags: VQMOE_HP_HAS_MIN | VQMOE_HP_POWER_OF_TWO, def: 8, min: 2),
            try spec("beta", VQMOE_HP_FLOAT, flags: VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX, def: 0.25, min: 0, max: 1),
            try spec("ema", VQMOE_HP_BOOL, def: 0),
            try spec("mode", VQMOE_HP_STRING, defString: "ste", choices: "ste,mix,x"),
        ]
    }

    func testDefaultsAreFilled() throws {
        let hp = try ResolvedHyperparameters(schema: schema(), values: [:], keyPath: "model.quantizer")
        XCTAssertEqual(hp.values["codebook_size"] as? Int, 8)
        XCTAssertEqual(hp.values["beta"] as? Double, 0.25)
        XCTAssertEqual(hp.values["ema"] as? Bool, false)
        XCTAssertEqual(hp.values["mode"] as? String, "ste")
    }

    func testLaterLayersOverrideEarlier() throws {
        let hp = try ResolvedHyperparameters(schema: schema(), layers: [["beta": 0.5], ["beta": 0.75]], keyPath: "q")
        XCTAssertEqual(hp.values["beta"] as? Double, 0.75)
    }

    func testErrorsNameTheKeyPath() throws {
        let s = try schema()
        func msg(_ v: [String: Any]) -> String {
            errorMessage { _ = try ResolvedHyperparameters(schema: s, values: v, keyPath: "model.quantizer") }
        }
        XCTAssertEqual(
            msg(["betta": 0.1]), "model.quantizer.betta: unknown hyperparameter; known: beta, ema, mode, codebook_size")
        XCTAssertEqual(msg(["codebook_size": 12]), "model.quantizer.codebook_size: 12 is not a power of 2")
        XCTAssertEqual(msg(["codebook_size": 1]), "model.quantizer.codebook_size: 1 is below the minimum 2")
        XCTAssertEqual(msg(["codebook_size": 2.5]), "model.quantizer.codebook_size: expected an integer, got 2.5")
        XCTAssertEqual(msg(["beta": 1.5]), "model.quantizer.beta: 1.5 is above the maximum 1.0")
        XCTAssertEqual(msg(["beta": "high"]), "model.quantizer.beta: expected a number, got \"high\"")
        XCTAssertEqual(msg(["mode": "both"]), "model.quantizer.mode: 'both' is not one of ste, mix, x")
        XCTAssertEqual(msg(["ema": 3]), "model.quantizer.ema: expected true or false, got 3")
    }

    func testJSONBooleansAndNumbersAreNotConfused() throws {
        let json =
            try JSONSerialization.jsonObject(with: Data(#"{"ema": true, "codebook_size": 16, "beta": 1}"#.utf8))
            as! [String: Any]
        let hp = try ResolvedHyperparameters(schema: schema(), values: json, keyPath: "q")
        XCTAssertEqual(hp.values["ema"] as? Bool, true)
        XCTAssertEqual(hp.values["codebook_size"] as? Int, 16)
        XCTAssertEqual(hp.values["beta"] as? Double, 1.0)
        let bad = try JSONSerialization.jsonObject(with: Data(#"{"codebook_size": true}"#.utf8)) as! [String: Any]
        XCTAssertEqual(
            errorMessage { _ = try ResolvedHyperparameters(schema: self.schema(), values: bad, keyPath: "q") },
            "q.codebook_size: expected an integer, got true")
    }

    func testASchemaWhoseDefaultBreaksItsOwnRangeIsRefused() {
        let msg = errorMessage { _ = try self.spec("k", VQMOE_HP_INT, flags: VQMOE_HP_HAS_MIN, def: 0, min: 1) }
        XCTAssertTrue(msg.contains("default of hyperparameter 'k' breaks its own schema"), msg)
    }
}
