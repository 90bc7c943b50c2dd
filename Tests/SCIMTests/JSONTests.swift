import EdgeTestSupport
import SCIM
import XCTest

/// RFC 8259 parsing and serialisation.
final class JSONTests: XCTestCase {
    func parse(_ s: String, _ limits: JSONLimits = JSONLimits()) throws -> JSON { try JSONParser.parse(s, limits: limits) }

    func rejects(
        _ s: String, _ fragment: String, line: Int? = nil, column: Int? = nil,
        limits: JSONLimits = JSONLimits(), file: StaticString = #filePath, lineNo: UInt = #line
    ) {
        XCTAssertThrowsError(try JSONParser.parse(s, limits: limits), file: file, line: lineNo) { error in
            let e = error as! JSONError
            XCTAssertTrue(
                e.message.contains(fragment), "'\(e.message)' should mention '\(fragment)' for \(s.debugDescription)",
                file: file, line: lineNo)
            if let line { XCTAssertEqual(e.line, line, "line", file: file, line: lineNo) }
            if let column { XCTAssertEqual(e.column, column, "column", file: file, line: lineNo) }
        }
    }

    func testValuesAndNesting() throws {
        let v = try parse(#" { "a" : [1, -2.5e3, true, false, null, "x"], "b": {"c": {}} , "d": [] } "#)
        XCTAssertEqual(v["a"]?.arrayValue?.count, 6)
        XCTAssertEqual(v["a"]?.arrayValue?[0], 1)
        XCTAssertEqual(v["a"]?.arrayValue?[1].numberValue?.text, "-2.5e3")
        XCTAssertEqual(v["b"]?["c"], .object(JSONObject()))
        XCTAssertEqual(v["d"], .array([]))
        XCTAssertEqual(try parse("\"top\""), "top", "any value may be the top level (RFC 8259 §2)")
        XCTAssertEqual(try parse(" 0 "), 0)
    }

    func testNumbersStayExact() throws {
        XCTAssertEqual(try parse("9007199254740993").numberValue?.integer, 9_007_199_254_740_993, "beyond Double's integers")
        XCTAssertEqual(try parse("-0").numberValue?.integer, 0)
        let big = try parse("123456789012345678901234567890")
        XCTAssertNil(big.numberValue?.integer, "too large for Int64: kept as decimal text")
        XCTAssertEqual(big.text, "123456789012345678901234567890")
        for text in ["0.1", "1.10", "1e400", "-1.5E-7", "3.141592653589793238462643383279"] {
            XCTAssertEqual(try parse(text).text, text, "decimals round-trip exactly")
        }
        XCTAssertTrue(try parse("1.0").numberValue!.numericallyEquals(try parse("1").numberValue!))
    }

    func testStringsAndEscapes() throws {
        XCTAssertEqual(try parse(#""a\"b\\c\/d\b\f\n\r\t""#), .string("a\"b\\c/d\u{8}\u{C}\n\r\t"))
        XCTAssertEqual(try parse(#""\u00e9\u20AC\ud83d\ude00""#), .string("é€😀"))
        XCTAssertEqual(try parse("\"Zoë 北京\""), .string("Zoë 北京"), "raw UTF-8 passes")
        XCTAssertEqual(try parse(#""\u0000""#), .string("\u{0}"))
    }

    func testStrictnessWithPositions() {
        rejects("{\"a\":1} x", "unexpected data after", line: 1, column: 9)
        rejects("{\"a\":1,}", "member name")
        rejects("[1,]", "unexpected character ']'")
        rejects("{'a':1}", "member name")
        rejects("{\"a\" 1}", "expected ':'")
        rejects("[01]", "leading zero")
        rejects("[1.]", "digit expected after '.'")
        rejects("[-]", "invalid number")
        rejects("[.5]", "unexpected character '.'")
        rejects("[1e]", "exponent")
        rejects("[NaN]", "unexpected character 'N'")
        rejects("[tru]", "invalid literal")
        rejects("\"abc", "unterminated string")
        rejects("\"a\tb\"", "unescaped control character")
        rejects(#""\x""#, "invalid escape")
        rejects(#""\u12G4""#, "hex digit")
        rejects("{\"a\":\n  [1, 2,\n   oops]}", "unexpected character 'o'", line: 3, column: 4)
        rejects("// c\n1", "unexpected character '/'")
        rejects("", "unexpected end")
    }

    func testUnicodeStrictness() {
        rejects(#""\ud800""#, "lone high surrogate")
        rejects(#""\ud800x""#, "lone high surrogate")
        rejects(#""\udc00""#, "lone low surrogate")
        rejects(#""\ud800\u0041""#, "not followed by a low surrogate")
        func bytes(_ b: [UInt8]) -> [UInt8] { [0x22] + b + [0x22] }
        let invalid: [[UInt8]] = [
            [0xC0, 0xAF],  // overlong '/'
            [0xE0, 0x80, 0xAF],  // overlong
            [0xED, 0xA0, 0x80],  // UTF-8-encoded surrogate
            [0xF4, 0x90, 0x80, 0x80],  // above U+10FFFF
            [0xFF], [0x80], [0xE2, 0x82],
        ]
        for seq in invalid {
            XCTAssertThrowsError(try JSONParser.parse(bytes(seq)), "\(seq) must be refused")
        }
        XCTAssertEqual(try JSONParser.parse(bytes([0xF0, 0x9F, 0x98, 0x80])), .string("😀"))
    }

    func testDuplicateMemberNames() throws {
        rejects(#"{"a":1,"a":2}"#, "duplicate member name \"a\"", column: 8)
        rejects(#"{"userName":"x","USERNAME":"y"}"#, "duplicate member name", column: 17)
        var limits = JSONLimits()
        limits.rejectCaseInsensitiveDuplicates = false
        XCTAssertEqual(try parse(#"{"a":1,"A":2}"#, limits).objectValue?.count, 2)
        rejects(#"{"a":1,"a":2}"#, "duplicate", limits: limits)
    }

    func testLimits() {
        var limits = JSONLimits()
        limits.maxDepth = 3
        XCTAssertNoThrow(try JSONParser.parse("[[[1]]]", limits: limits))
        rejects("[[[[1]]]]", "nesting deeper than 3", limits: limits)
        limits = JSONLimits()
        limits.maxStringBytes = 4
        rejects("\"abcde\"", "string longer than 4", limits: limits)
        rejects("\"ab\\ncde\"", "string longer than 4", limits: limits)
        limits = JSONLimits()
        limits.maxBytes = 10
        rejects("[1,2,3,4,5,6]", "larger than 10 bytes", limits: limits)
        limits = JSONLimits()
        limits.maxNumberLength = 5
        rejects("123456", "number longer than 5", limits: limits)
        limits = JSONLimits()
        limits.maxContainerEntries = 2
        rejects("[1,2,3]", "more than 2 elements", limits: limits)
        // Default depth stops a stack-exhaustion attempt.
        rejects(String(repeating: "[", count: 100_000), "nesting deeper than 64")
    }

    func testKeysKeepSpellingButLookUpCaseInsensitively() throws {
        let v = try parse(#"{"userName":"bjensen","Name":{"givenName":"Barbara"}}"#)
        let o = try XCTUnwrap(v.objectValue)
        XCTAssertEqual(o.keys, ["userName", "Name"])
        XCTAssertEqual(o["USERNAME"], "bjensen")
        XCTAssertEqual(v["name"]?["GIVENNAME"], "Barbara")
        XCTAssertEqual(o.spelling(of: "name"), "Name")
        XCTAssertEqual(v.text, #"{"userName":"bjensen","Name":{"givenName":"Barbara"}}"#, "serialised as received")
    }

    func testSerialisationEscapes() throws {
        let v: JSON = ["s": .string("q\"b\\n\nt\t\u{1}é/")]
        XCTAssertEqual(v.text, #"{"s":"q\"b\\n\nt\t\u0001é/"}"#)
        XCTAssertEqual(try JSONParser.parse(v.serialized()), v)
    }

    /// Long strings are scanned eight bytes at a time: a character that
    /// needs an escape (or ends a plain run when parsing) is found at every
    /// offset of a word, in strings of every length around a word.
    func testEscapesAtEveryOffsetOfLongStrings() throws {
        let specials: [(Character, String)] = [
            ("\"", #"\""#), ("\\", #"\\"#), ("\n", #"\n"#), ("\u{1}", #"\u0001"#), ("\u{1F}", #"\u001f"#), ("é", "é"),
            ("\u{7F}", "\u{7F}"), (" ", " "), ("!", "!"), ("#", "#"), ("[", "["), ("]", "]"),
        ]
        for length in [8, 9, 15, 16, 17, 24, 31, 40] {
            for at in 0..<length {
                for (c, escaped) in specials {
                    var plain = Array(repeating: Character("a"), count: length)
                    plain[at] = c
                    let s = String(plain)
                    let expected =
                        "\"" + String(repeating: "a", count: at) + escaped + String(repeating: "a", count: length - at - 1) + "\""
                    XCTAssertEqual(JSON.string(s).text, expected, "\(length) \(at) \(escaped)")
                    XCTAssertEqual(try JSONParser.parse(expected), .string(s), "\(length) \(at) \(escaped)")
                }
            }
        }
        // An unescaped control character or quote inside a long run is still refused.
        XCTAssertThrowsError(try JSONParser.parse("\"aaaaaaaaaaaa\u{1}aaaaaaaaaa\""))
        XCTAssertThrowsError(try JSONParser.parse("\"aaaaaaaaaaaa\"aaaaaaaaaa\""))
        XCTAssertThrowsError(try JSONParser.parse(Array("\"aaaaaaaaaaaa".utf8) + [0xFF] + Array("aaaaaaaaaa\"".utf8)))
    }

    /// parse ∘ serialize is the identity on values, and serialize ∘ parse is
    /// the identity on compact documents: checked on generated documents.
    func testRoundTripProperty() throws {
        var rng = SplitMix(seed: 42)
        for _ in 0..<500 {
            let value = randomJSON(&rng, depth: 0)
            let bytes = value.serialized()
            let back = try JSONParser.parse(bytes)
            XCTAssertEqual(back, value)
            XCTAssertEqual(back.serialized(), bytes)
        }
    }
}

func randomJSON(_ rng: inout SplitMix, depth: Int) -> JSON {
    let pick = depth > 3 ? rng.below(5) : rng.below(7)
    switch pick {
    case 0: return .null
    case 1: return .bool(rng.below(2) == 0)
    case 2: return .number(JSONNumber(integer: Int64(bitPattern: rng.next()) >> rng.below(60)))
    case 3: return .number(JSONNumber(["0.5", "-1.25e-3", "12345.678901234567890", "6E+2"][rng.below(4)])!)
    case 4:
        let alphabet = Array("aZ0 \"\\\n\té€😀/\u{1}")
        return .string(String((0..<rng.below(8)).map { _ in alphabet[rng.below(alphabet.count)] }))
    case 5: return .array((0..<rng.below(4)).map { _ in randomJSON(&rng, depth: depth + 1) })
    default:
        var o = JSONObject()
        for k in 0..<rng.below(4) { o["k\(k)_\(rng.below(100))"] = randomJSON(&rng, depth: depth + 1) }
        return .object(o)
    }
}
