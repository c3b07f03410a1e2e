// NFC: decompose every character canonically (recursively, Hangul by arithmetic), put each run of
// combining marks in canonical order (a stable sort by combining class), then compose each mark with the
// last starter when nothing between them blocks it (UAX #15, section 3.11 and the D117 algorithm).
#include "data/unicode_normalize.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace llm::data {
namespace {

struct CombiningClassRange {
  uint32_t first;
  uint32_t last;
  uint8_t ccc;
};
struct Decomposition {
  uint32_t code_point;
  uint16_t offset;
  uint8_t length;
};
struct Composition {
  uint32_t first;
  uint32_t second;
  uint32_t composite;
};
struct CodePointRange {
  uint32_t first;
  uint32_t last;
};

#include "data/unicode_normalize_tables.inc"

// Hangul syllable arithmetic (Unicode chapter 3.12).
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28;
constexpr uint32_t kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Bytes that are not valid UTF-8 travel through as these values: never a code point, class 0, and they
// compose with nothing.
constexpr uint32_t kRawByteFlag = 0x80000000u;

uint8_t combining_class(uint32_t cp) {
  if (cp < 0x300 || (cp & kRawByteFlag)) return 0;
  const auto* end = std::end(kCombiningClassRanges);
  const auto* it = std::upper_bound(std::begin(kCombiningClassRanges), end, cp,
                                    [](uint32_t c, const CombiningClassRange& r) { return c < r.first; });
  if (it == std::begin(kCombiningClassRanges)) return 0;
  --it;
  return cp <= it->last ? it->ccc : 0;
}

bool quick_check_not_yes(uint32_t cp) {
  const auto* it = std::upper_bound(std::begin(kQuickCheckRanges), std::end(kQuickCheckRanges), cp,
                                    [](uint32_t c, const CodePointRange& r) { return c < r.first; });
  if (it == std::begin(kQuickCheckRanges)) return false;
  --it;
  return cp <= it->last;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (cp >= 0xC0 && !(cp & kRawByteFlag)) {
    const auto* it = std::lower_bound(std::begin(kDecompositions), std::end(kDecompositions), cp,
                                      [](const Decomposition& d, uint32_t c) { return d.code_point < c; });
    if (it != std::end(kDecompositions) && it->code_point == cp) {
      out.insert(out.end(), kDecompositionData + it->offset, kDecompositionData + it->offset + it->length);
      return;
    }
  }
  out.push_back(cp);
}

// The primary composite of (first, second), or 0 when there is none.
uint32_t compose_pair(uint32_t first, uint32_t second) {
  if (first >= kLBase && first < kLBase + kLCount && second >= kVBase && second < kVBase + kVCount) {
    return kSBase + ((first - kLBase) * kVCount + (second - kVBase)) * kTCount;
  }
  if (first >= kSBase && first < kSBase + kSCount && (first - kSBase) % kTCount == 0 && second > kTBase &&
      second < kTBase + kTCount) {
    return first + (second - kTBase);
  }
  const Composition key{first, second, 0};
  const auto* it = std::lower_bound(std::begin(kCompositions), std::end(kCompositions), key,
                                    [](const Composition& a, const Composition& b) {
                                      return a.first != b.first ? a.first < b.first : a.second < b.second;
                                    });
  if (it != std::end(kCompositions) && it->first == first && it->second == second) return it->composite;
  return 0;
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp & kRawByteFlag) {
    out.push_back(static_cast<char>(cp & 0xFF));
  } else if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

int utf8_decode(std::string_view text, size_t i, char32_t* cp) {
  const size_t n = text.size();
  if (i >= n) return 0;
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  int length = 0;
  char32_t value = 0;
  char32_t minimum = 0;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    length = 2;
    value = b0 & 0x1F;
    minimum = 0x80;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    length = 3;
    value = b0 & 0x0F;
    minimum = 0x800;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    length = 4;
    value = b0 & 0x07;
    minimum = 0x10000;
  } else {
    return 0;
  }
  if (i + length > n) return 0;
  for (int k = 1; k < length; ++k) {
    const unsigned char b = byte(i + k);
    if ((b & 0xC0) != 0x80) return 0;
    value = (value << 6) | (b & 0x3F);
  }
  if (value < minimum || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 0;
  *cp = value;
  return length;
}

bool is_nfc_quick(std::string_view text) {
  uint8_t last_ccc = 0;
  size_t i = 0;
  while (i < text.size()) {
    const unsigned char b = static_cast<unsigned char>(text[i]);
    if (b < 0xCC) {  // below U+0300 (or an invalid byte): class 0 and quick-check Yes
      last_ccc = 0;
      ++i;
      continue;
    }
    char32_t cp = 0;
    const int length = utf8_decode(text, i, &cp);
    if (length == 0) {
      last_ccc = 0;
      ++i;
      continue;
    }
    i += length;
    const uint8_t ccc = combining_class(cp);
    if (ccc != 0 && last_ccc > ccc) return false;
    if (quick_check_not_yes(cp)) return false;
    last_ccc = ccc;
  }
  return true;
}

std::string nfc_normalize(std::string_view text) {
  if (is_nfc_quick(text)) return std::string(text);

  // 1. Canonical decomposition.
  std::vector<uint32_t> cps;
  cps.reserve(text.size() + 8);
  size_t i = 0;
  while (i < text.size()) {
    char32_t cp = 0;
    const int length = utf8_decode(text, i, &cp);
    if (length == 0) {
      cps.push_back(kRawByteFlag | static_cast<unsigned char>(text[i]));
      ++i;
      continue;
    }
    i += length;
    decompose(cp, cps);
  }

  // 2. Canonical ordering: stable sort of each run of nonzero combining classes.
  std::vector<uint8_t> classes(cps.size());
  for (size_t k = 0; k < cps.size(); ++k) classes[k] = combining_class(cps[k]);
  for (size_t k = 0; k < cps.size();) {
    if (classes[k] == 0) {
      ++k;
      continue;
    }
    size_t end = k;
    while (end < cps.size() && classes[end] != 0) ++end;
    // Insertion sort: runs are short and it is stable.
    for (size_t a = k + 1; a < end; ++a) {
      const uint32_t cp = cps[a];
      const uint8_t c = classes[a];
      size_t b = a;
      while (b > k && classes[b - 1] > c) {
        cps[b] = cps[b - 1];
        classes[b] = classes[b - 1];
        --b;
      }
      cps[b] = cp;
      classes[b] = c;
    }
    k = end;
  }

  // 3. Canonical composition: a character combines with the last starter when it is adjacent to it, or when
  // every character between them has a nonzero class lower than its own (otherwise it is blocked).
  size_t out = 0;
  size_t starter = SIZE_MAX;
  uint8_t last_class = 0;  // class of the last character kept; 0 means the starter itself
  for (size_t k = 0; k < cps.size(); ++k) {
    const uint32_t cp = cps[k];
    const uint8_t c = classes[k];
    if (starter != SIZE_MAX && (last_class == 0 || last_class < c)) {
      const uint32_t composite = compose_pair(cps[starter], cp);
      if (composite != 0) {
        cps[starter] = composite;
        continue;
      }
    }
    if (c == 0) starter = out;
    last_class = c;
    cps[out++] = cp;
  }
  std::string result;
  result.reserve(text.size());
  for (size_t k = 0; k < out; ++k) append_utf8(cps[k], result);
  return result;
}

const char* unicode_tables_version() {
  return LLM_UNICODE_VERSION;
}

}  // namespace llm::data
