import EdgeTestSupport
import SCIM
import XCTest

/// The incremental `members` scanner against the whole-document parser:
/// the same elements, whatever the chunks' boundaries, and the same
/// refusals of malformed input.
final class MemberScannerTests: XCTestCase {
    /// What the scanner yields for `doc` cut into pieces at `cuts`, and whether it saw `members`.
    func scan(_ doc: [UInt8], cuts: [Int], maxElementBytes: Int = 64 * 1024) throws -> (members: [JSON], saw: Bool, peak: Int) {
        var scanner = MemberScanner(maxElementBytes: maxElementBytes)
        var out: [JSON] = []
        var from = 0
        for cut in cuts.sorted() + [doc.count] where cut >= from {
            try scanner.feed(Array(doc[from..<cut])) { out.append($0) }
            from = cut
        }
        try scanner.finish()
        return (out, scanner.sawMembers, scanner.peakBuffered)
    }

    /// What the whole-document parser says `members` is.
    func reference(_ doc: [UInt8]) throws -> [JSON]? { try JSONParser.parse(doc)["members"]?.arrayValue }

    let documents: [String] = [
        #"{"members":[{"value":"a"},{"value":"b","type":"User"}]}"#,
        #"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"id":"g1","displayName":"staff","members":[{"value":"u1","$ref":"https://x/Users/u1","display":"Ann"}],"meta":{"resourceType":"Group"}}"#,
        // `members` nested in other attributes, or inside strings, is not the group's.
        #"{"meta":{"members":[{"value":"nested"}]},"x":[{"members":[{"value":"deeper"}]}],"members":[{"value":"real"}]}"#,
        #"{"note":"\"members\":[{\"value\":\"fake\"}]","members":[{"value":"real"}],"after":{"members":1}}"#,
        #"{"displayName":"no members here","meta":{"members":[{"value":"nested"}]}}"#,
        #"{"members":[]}"#, #"{"members":null}"#, #"{"members":{"value":"not an array"}}"#, #"{}"#,
        // Names as SCIM compares them, and spelled with escapes.
        #"{"Members":[{"value":"a"}]}"#, #"{"mem\u0062ers":[{"value":"escaped name"}]}"#,
        #"{"members\u0000":[{"value":"another name"}],"members":[{"value":"b"}]}"#,
        // Values with escapes, non-ASCII, surrogate pairs, nesting, numbers, and elements that are not objects.
        #"{"members":[{"value":"a\"b\\c\/d\b\f\n\r\t\u00e9\ud83d\ude00","type":"Group","display":"Zoë ☃ 😀"},"#
            + #" {"value" : "x", "deep":{"a":[1,-2.5e+3,0.1,true,false,null,{"b":[]}]}} , 42, "s", [1,[2]], null, true]}"#,
        "\t\r\n {\n \"members\" \t:\r [ { \"value\" : \"spaced\" } \n , {\"value\":\"y\"} ] , \"id\" : \"1\" } \n",
        #"{"id":"0","displayName":"x","meta":{"a":{"b":{"c":[[[["members"]]]]}}},"members":[{"value":"last"}]}"#,
    ]

    func testYieldsWhatTheWholeDocumentParserReadsWhateverTheSplits() throws {
        var random = SplitMix(seed: 0x9E37_79B9_7F4A_7C15)
        for text in documents {
            let doc = Array(text.utf8)
            let want = try reference(doc)
            let whole = try scan(doc, cuts: [])
            XCTAssertEqual(whole.members, want ?? [], text)
            XCTAssertEqual(whole.saw, want != nil, text)
            // Byte by byte.
            XCTAssertEqual(try scan(doc, cuts: Array(0..<doc.count)).members, want ?? [], text)
            // Cut in two at every position.
            for k in 0...doc.count { XCTAssertEqual(try scan(doc, cuts: [k]).members, want ?? [], "\(text) cut at \(k)") }
            // Random splits.
            for _ in 0..<50 {
                let cuts = (0..<(1 + random.below(8))).map { _ in random.below(doc.count + 1) }
                XCTAssertEqual(try scan(doc, cuts: cuts).members, want ?? [], "\(text) cut at \(cuts)")
            }
        }
    }

    func testRefusesMalformedInputAsTheParserDoes() {
        let malformed = [
            "", "   ", #"{"members":[{"value":"a"}]"#, #"{"members":[{"value":"a"}]}}"#,
            #"{"members":[{"value":"a"}]} x"#, #"{"members":[{"value":"a"},]}"#, #"{"members":[,]}"#, #"{"a":1,}"#,
            #"{"a" 1}"#, #"{a:1}"#, #"{"a":01}"#, #"{"a":1.}"#, #"{"a":-}"#, #"{"a":tru}"#, #"{"a":nul}"#, #"{"a":truex}"#,
            #"{"a":"\x"}"#, #"{"a":"\u12G4"}"#, #"{"a":"\ud800"}"#, #"{"a":"\udc00"}"#, #"{"a":"\ud800\u0041"}"#,
            "{\"a\":\"tab\there\"}", "{\"a\":\"\u{1}\"}", #"{"members":[{"value":"a"}],"members":[]}"#,
            #"{"members":[],"MEMBERS":[]}"#, #"{"members":[{"value":"a","value":"b"}]}"#, #"{"a":[1 2]}"#, #"{"a":{"b"}}"#,
            #"{"a":"unterminated}"#, #"{"a":[}"#, #"{"a":]}"#, String(repeating: "[", count: 70),
            "{\"a\":" + String(repeating: "[", count: 70),
        ]
        for text in malformed {
            XCTAssertThrowsError(try JSONParser.parse(text), "the reference refuses \(text.debugDescription)")
            XCTAssertThrowsError(try scan(Array(text.utf8), cuts: []), "refused: \(text.debugDescription)")
            XCTAssertThrowsError(
                try scan(Array(text.utf8), cuts: Array(0..<text.utf8.count)), "refused byte by byte: \(text.debugDescription)")
        }
        // Valid JSON, but not a resource.
        for text in ["[]", #""members""#, "42", "null", #"[{"members":[]}]"#] {
            XCTAssertThrowsError(try scan(Array(text.utf8), cuts: [])) {
                XCTAssertTrue("\($0)".contains("a SCIM resource is a JSON object"))
            }
        }
        // Invalid UTF-8 (overlong, surrogate, truncated, stray continuation).
        for bad: [UInt8] in [[0xC0, 0xAF], [0xED, 0xA0, 0x80], [0xE2, 0x82], [0x80], [0xF4, 0x90, 0x80, 0x80], [0xFF]] {
            let doc = Array(#"{"members":[{"value":""#.utf8) + bad + Array(#""}]}"#.utf8)
            XCTAssertThrowsError(try JSONParser.parse(doc))
            XCTAssertThrowsError(try scan(doc, cuts: Array(0..<doc.count)), "\(bad)")
            let elsewhere = Array(#"{"x":""#.utf8) + bad + Array(#"","members":[]}"#.utf8)
            XCTAssertThrowsError(try scan(elsewhere, cuts: []), "in a skipped attribute too: \(bad)")
        }
        // Every truncation of a valid document is refused at its end.
        let doc = Array(documents[12].utf8)
        for k in 0..<doc.count { XCTAssertThrowsError(try scan(Array(doc[..<k]), cuts: []), "cut short at \(k)") }
    }

    /// One byte of valid documents changed at random: the scanner refuses
    /// what the parser refuses and reads what it reads the same way (a
    /// duplicate attribute name other than `members` is the one thing the
    /// scanner does not track).
    func testAgreesWithTheParserOnMutatedDocuments() throws {
        var random = SplitMix(seed: 42)
        let alphabet = Array(#"{}[]:,"\ u0aeE.-+1tfnl"#.utf8) + [0x0A, 0x00, 0xC3, 0xA9, 0xED, 0xF0]
        for _ in 0..<3000 {
            var doc = Array(documents[random.below(documents.count)].utf8)
            for _ in 0..<(1 + random.below(2)) {
                let at = random.below(doc.count)
                switch random.below(3) {
                case 0: doc[at] = alphabet[random.below(alphabet.count)]
                case 1: doc.remove(at: at)
                default: doc.insert(alphabet[random.below(alphabet.count)], at: at)
                }
            }
            let cuts = (0..<random.below(4)).map { _ in random.below(doc.count + 1) }
            let text = String(decoding: doc, as: UTF8.self).debugDescription
            let want: [JSON]??
            do {
                // Valid JSON but not an object is not a resource: refused.
                want = try JSONParser.parse(doc).objectValue == nil ? nil : .some(try reference(doc))
            } catch let e as JSONError where e.message.hasPrefix("duplicate member name") && !e.message.lowercased().contains("members") {
                continue
            } catch {
                want = nil
            }
            if let want {
                do {
                    let got = try scan(doc, cuts: cuts)
                    XCTAssertEqual(got.members, want ?? [], text)
                    XCTAssertEqual(got.saw, want != nil, text)
                } catch { XCTFail("\(text): \(error)") }
            } else {
                XCTAssertThrowsError(try scan(doc, cuts: cuts), "the parser refuses \(text)")
            }
        }
    }

    /// An element larger than the limit is refused, saying so; memory holds
    /// one element at a time, not the group.
    func testMemoryIsBoundedByTheLargestElement() throws {
        let huge = #"{"members":[{"value":"a"},{"value":""# + String(repeating: "x", count: 300) + #""}]}"#
        XCTAssertThrowsError(try scan(Array(huge.utf8), cuts: [], maxElementBytes: 100)) { error in
            XCTAssertTrue("\(error)".contains("an element of members larger than 100 bytes"), "\(error)")
        }
        var doc = Array(#"{"schemas":["urn:ietf:params:scim:schemas:core:2.0:Group"],"displayName":"all","members":["#.utf8)
        for k in 0..<20_000 {
            if k > 0 { doc.append(UInt8(ascii: ",")) }
            doc.append(contentsOf: #"{"value":"user-\#(k)","type":"User"}"#.utf8)
        }
        doc.append(contentsOf: #"],"meta":{"resourceType":"Group"}}"#.utf8)
        let cuts = stride(from: 4096, to: doc.count, by: 4096).map { $0 }
        let r = try scan(doc, cuts: cuts, maxElementBytes: 64)
        XCTAssertEqual(r.members.count, 20_000)
        XCTAssertEqual(r.members.last?["value"], "user-19999")
        XCTAssertEqual(r.members.first?["type"], "User")
        XCTAssertLessThanOrEqual(r.peak, 64, "one element (\(#"{"value":"user-19999","type":"User"}"#.utf8.count) bytes) at most")
    }
}
