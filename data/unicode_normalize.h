// Unicode normalization form C (NFC), the normalizer of Qwen2-family tokenizer.json files.
//
// A full implementation (canonical decomposition, canonical ordering, canonical composition, with Hangul
// done algorithmically) driven by tables generated from Python's unicodedata by
// dev/reference/unicode_nfc_tables.py into data/unicode_normalize_tables.inc. Text that passes the NFC
// quick check (all ASCII text, and most text in any script) is returned unchanged without decomposing.
#pragma once

#include <string>
#include <string_view>

namespace llm::data {

// NFC of UTF-8 text. Bytes that are not valid UTF-8 are kept as they are and block composition across them.
std::string nfc_normalize(std::string_view text);

// The length in bytes (1-4) of the valid UTF-8 sequence that starts at text[i], storing its code point in
// *cp; 0 when the bytes there are not valid UTF-8 (overlong forms, surrogates and code points above
// U+10FFFF are invalid, as in PCRE2 and Rust).
int utf8_decode(std::string_view text, size_t i, char32_t* cp);

// True when nfc_normalize(text) == text is known without normalizing (the NFC quick check says Yes).
bool is_nfc_quick(std::string_view text);

// The Unicode version of the tables, e.g. "14.0.0".
const char* unicode_tables_version();

}  // namespace llm::data
