// Byte-level BPE from tokenizer.json: parsing and validation, added-token splitting, NFC, PCRE2
// pre-tokenization and the merge loop. See bpe_tokenizer.h for the pipeline.
#include "data/bpe_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "data/unicode_normalize.h"

namespace llm::data {

using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------------------------
// GPT-2's byte <-> code point map: printable Latin-1 bytes stand for themselves, the other 68 bytes are
// given the code points 256, 257, ... in byte order.
struct ByteMap {
  std::array<char32_t, 256> to_unicode{};
  std::array<int16_t, 324> to_byte{};  // code point -> byte, -1 when the code point is not in the alphabet
  ByteMap() {
    to_byte.fill(-1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      to_unicode[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      to_byte[to_unicode[b]] = static_cast<int16_t>(b);
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap map;
  return map;
}

// The bytes a byte-level token string stands for; false when a character is outside the alphabet (or the
// string is not valid UTF-8).
bool unmap_bytes(std::string_view token, std::string& bytes) {
  bytes.clear();
  const ByteMap& map = byte_map();
  size_t i = 0;
  while (i < token.size()) {
    char32_t cp = 0;
    const int length = utf8_decode(token, i, &cp);
    if (length == 0 || cp >= map.to_byte.size() || map.to_byte[cp] < 0) return false;
    bytes.push_back(static_cast<char>(map.to_byte[cp]));
    i += length;
  }
  return true;
}

// Rust's char::is_whitespace (the Unicode White_Space property), used by lstrip/rstrip.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Start of the code point that ends at text[end] (exclusive), or end - 1 for an invalid byte.
size_t previous_char_start(std::string_view text, size_t end) {
  size_t start = end - 1;
  while (start > 0 && end - start < 4 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
  char32_t cp = 0;
  if (utf8_decode(text, start, &cp) == static_cast<int>(end - start)) return start;
  return end - 1;
}

std::string describe(const json& value) {
  std::string dump = value.dump();
  if (dump.size() > 60) dump = dump.substr(0, 57) + "...";
  return std::string(value.type_name()) + " " + dump;
}

// ---------------------------------------------------------------------------------------------------------
// PCRE2

// Oniguruma's \s (which `tokenizers` uses) also matches U+0085; PCRE2's does not, so widen it.
std::string widen_whitespace_class(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 16);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (e == 's') {
        out += in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
      } else if (e == 'S' && !in_class) {
        out += "[^\\s\\x{85}]";
      } else {
        out.push_back(c);
        out.push_back(e);
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

std::string escape_literal(std::string_view text) {
  std::string out;
  for (const char c : text) {
    if (std::string_view("\\^$.|?*+()[]{}-/#").find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

// Per-thread match state: a one-pair match block and a JIT stack large enough for long whitespace runs.
struct MatchState {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchState() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchState() {
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(data);
  }
  MatchState(const MatchState&) = delete;
  MatchState& operator=(const MatchState&) = delete;
};

MatchState& match_state() {
  thread_local MatchState state;
  if (state.data == nullptr || state.context == nullptr) throw std::bad_alloc();
  return state;
}

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& context) {
    const std::string widened = widen_whitespace_class(pattern);
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(widened.data()), widened.size(), PCRE2_UTF | PCRE2_UCP,
                          &error, &offset, nullptr);
    if (code_ == nullptr) {
      throw std::runtime_error(context + ": cannot compile regex " + json(pattern).dump() + ": " +
                               pcre2_message(error) + " at offset " + std::to_string(offset));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the pieces of an Isolated split of valid UTF-8 text: every match, and every gap between
  // matches, in order; empty matches are skipped.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const {
    MatchState& state = match_state();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t start = 0;
    size_t last_end = 0;
    while (start < text.size()) {
      const int rc =
          pcre2_match(code_, subject, text.size(), start, PCRE2_NO_UTF_CHECK, state.data, state.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) throw std::runtime_error("pre-tokenizer regex failed: " + pcre2_message(rc));
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data);
      const size_t match_start = ovector[0];
      const size_t match_end = ovector[1];
      if (match_end <= match_start) {  // empty match: move on by one character
        char32_t cp = 0;
        start = match_start + std::max(1, utf8_decode(text, match_start, &cp));
        continue;
      }
      if (match_start > last_end) pieces.push_back(text.substr(last_end, match_start - last_end));
      pieces.push_back(text.substr(match_start, match_end - match_start));
      last_end = start = match_end;
    }
    if (last_end < text.size()) pieces.push_back(text.substr(last_end));
  }

  bool matches_at_start(std::string_view text) const {
    MatchState& state = match_state();
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0,
                               PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK, state.data, state.context);
    return rc >= 0;
  }

 private:
  pcre2_code* code_ = nullptr;
};

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------------------
// Added tokens: a byte trie, searched leftmost-first then longest, as Aho-Corasick's LeftmostLongest.

class TokenTrie {
 public:
  void add(std::string_view content, int index) {
    int node = 0;
    for (const char ch : content) {
      const auto c = static_cast<unsigned char>(ch);
      int next = -1;
      for (const auto& [key, child] : nodes_[node].children) {
        if (key == c) next = child;
      }
      if (next < 0) {
        next = static_cast<int>(nodes_.size());
        nodes_[node].children.emplace_back(c, next);
        nodes_.emplace_back();
      }
      node = next;
    }
    nodes_[node].index = index;
    first_byte_[static_cast<unsigned char>(content[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  // The longest token starting at text[pos]: its index, and its length in *length; -1 when none.
  int longest_at(std::string_view text, size_t pos, size_t* length) const {
    if (!first_byte_[static_cast<unsigned char>(text[pos])]) return -1;
    int node = 0;
    int best = -1;
    for (size_t i = pos; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      int next = -1;
      for (const auto& [key, child] : nodes_[node].children) {
        if (key == c) next = child;
      }
      if (next < 0) break;
      node = next;
      if (nodes_[node].index >= 0) {
        best = nodes_[node].index;
        *length = i + 1 - pos;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int>> children;
    int index = -1;
  };
  std::vector<Node> nodes_{Node{}};
  std::array<bool, 256> first_byte_{};
  bool empty_ = true;
};

// ---------------------------------------------------------------------------------------------------------
// The per-thread word cache: pre-token bytes -> ids, for the tokenizer that last used this thread.

std::atomic<uint64_t> next_tokenizer_serial{1};

struct WordCache {
  uint64_t owner = 0;
  std::unordered_map<std::string, std::vector<int32_t>> words;
};

constexpr size_t kMaxCachedWordBytes = 64;
constexpr size_t kMaxCachedWords = 1 << 16;

}  // namespace

char32_t byte_to_unicode(uint8_t b) {
  return byte_map().to_unicode[b];
}

// ---------------------------------------------------------------------------------------------------------

struct BpeTokenizer::Impl {
  std::string source;
  uint64_t serial = next_tokenizer_serial.fetch_add(1);

  // Model.
  std::unordered_map<std::string, int32_t> vocab;           // token as written in tokenizer.json -> id
  std::unordered_map<std::string, int32_t> vocab_by_bytes;  // token bytes -> id (byte-level tokens only)
  std::array<int32_t, 256> byte_ids{};
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  std::unordered_map<uint64_t, Merge> merges;
  bool ignore_merges = false;

  // Normalizer and pre-tokenizer.
  bool nfc = false;
  std::vector<std::unique_ptr<Regex>> splits;  // Split pre-tokenizers, in order
  bool add_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // GPT-2's pattern when ByteLevel.use_regex
  std::unique_ptr<Regex> word_char;         // [\p{L}\p{N}_] for single_word

  // Added tokens.
  std::vector<AddedTokenSpec> added;
  TokenTrie raw_trie;         // normalized == false
  TokenTrie normalized_trie;  // normalized == true, contents normalized
  std::unordered_map<std::string, int32_t> added_by_content;

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  const Merge* find_merge(int32_t a, int32_t b) const {
    const auto it = merges.find(pair_key(a, b));
    return it == merges.end() ? nullptr : &it->second;
  }

  void encode(std::string_view text, std::vector<int32_t>& out) const;
  void encode_normalizable(std::string_view text, std::vector<int32_t>& out) const;
  void pre_tokenize_and_merge(std::string_view text, std::vector<int32_t>& out) const;
  void encode_valid_utf8(std::string_view text, std::vector<int32_t>& out) const;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  void merge_symbols(std::string_view word, std::vector<int32_t>& out) const;

  // Calls piece(text) for text between added tokens and token(id) for each added token, as `tokenizers`'
  // AddedVocabulary::find_matches does.
  template <typename Piece, typename Token>
  void split_on_added(const TokenTrie& trie, std::string_view text, Piece&& piece, Token&& token) const;
  bool word_char_before(std::string_view text, size_t pos) const;
  bool word_char_after(std::string_view text, size_t pos) const;
};

template <typename Piece, typename Token>
void BpeTokenizer::Impl::split_on_added(const TokenTrie& trie, std::string_view text, Piece&& piece,
                                        Token&& token) const {
  if (trie.empty()) {
    if (!text.empty()) piece(text);
    return;
  }
  size_t emitted = 0;  // text before this has been handed out
  size_t pos = 0;
  while (pos < text.size()) {
    size_t length = 0;
    const int index = trie.longest_at(text, pos, &length);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedTokenSpec& spec = added[index];
    size_t start = pos;
    size_t stop = pos + length;
    pos = stop;  // the next search starts after this match, whatever happens to it
    if (spec.single_word && (word_char_before(text, start) || word_char_after(text, stop))) continue;
    if (spec.lstrip) {
      size_t s = start;
      while (s > emitted) {
        const size_t prev = previous_char_start(text, s);
        char32_t cp = 0;
        if (utf8_decode(text, prev, &cp) != static_cast<int>(s - prev) || !is_white_space(cp)) break;
        s = prev;
      }
      start = s;
    }
    if (spec.rstrip) {
      char32_t cp = 0;
      int n = 0;
      while (stop < text.size() && (n = utf8_decode(text, stop, &cp)) > 0 && is_white_space(cp)) stop += n;
    }
    if (start < emitted) start = emitted;
    if (start > emitted) piece(text.substr(emitted, start - emitted));
    token(spec.id);
    emitted = stop;
    pos = std::max(pos, stop);
  }
  if (emitted < text.size()) piece(text.substr(emitted));
}

bool BpeTokenizer::Impl::word_char_before(std::string_view text, size_t pos) const {
  if (pos == 0) return false;
  const size_t start = previous_char_start(text, pos);
  char32_t cp = 0;
  if (utf8_decode(text, start, &cp) != static_cast<int>(pos - start)) return false;
  return word_char->matches_at_start(text.substr(start, pos - start));
}

bool BpeTokenizer::Impl::word_char_after(std::string_view text, size_t pos) const {
  if (pos >= text.size()) return false;
  char32_t cp = 0;
  const int n = utf8_decode(text, pos, &cp);
  if (n == 0) return false;
  return word_char->matches_at_start(text.substr(pos, n));
}

void BpeTokenizer::Impl::encode(std::string_view text, std::vector<int32_t>& out) const {
  split_on_added(
      raw_trie, text, [&](std::string_view piece) { encode_normalizable(piece, out); },
      [&](int32_t id) { out.push_back(id); });
}

void BpeTokenizer::Impl::encode_normalizable(std::string_view text, std::vector<int32_t>& out) const {
  std::string normalized;
  if (nfc && !is_nfc_quick(text)) {
    normalized = nfc_normalize(text);
    text = normalized;
  }
  split_on_added(
      normalized_trie, text, [&](std::string_view piece) { pre_tokenize_and_merge(piece, out); },
      [&](int32_t id) { out.push_back(id); });
}

// Valid UTF-8 runs go through the pre-tokenizer; each invalid byte becomes its own single-byte token.
void BpeTokenizer::Impl::pre_tokenize_and_merge(std::string_view text, std::vector<int32_t>& out) const {
  size_t run_start = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (static_cast<unsigned char>(text[i]) < 0x80) {
      ++i;
      continue;
    }
    char32_t cp = 0;
    const int n = utf8_decode(text, i, &cp);
    if (n > 0) {
      i += n;
      continue;
    }
    if (i > run_start) encode_valid_utf8(text.substr(run_start, i - run_start), out);
    merge_word(text.substr(i, 1), out);
    run_start = ++i;
  }
  if (run_start == 0) {
    encode_valid_utf8(text, out);
  } else if (run_start < text.size()) {
    encode_valid_utf8(text.substr(run_start), out);
  }
}

void BpeTokenizer::Impl::encode_valid_utf8(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::string_view> pieces{text};
  std::vector<std::string_view> next;
  for (const auto& regex : splits) {
    next.clear();
    for (const std::string_view piece : pieces) regex->split(piece, next);
    pieces.swap(next);
  }
  std::string prefixed;
  for (std::string_view piece : pieces) {
    if (add_prefix_space && piece[0] != ' ') {
      prefixed.assign(1, ' ');
      prefixed.append(piece);
      piece = prefixed;
    }
    if (byte_level_regex) {
      next.clear();
      byte_level_regex->split(piece, next);
      for (const std::string_view word : next) merge_word(word, out);
    } else {
      merge_word(piece, out);
    }
  }
}

void BpeTokenizer::Impl::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    const int32_t id = byte_ids[static_cast<unsigned char>(word[0])];
    if (id < 0) {
      std::ostringstream message;
      message << source << ": byte 0x" << std::hex << static_cast<int>(static_cast<unsigned char>(word[0]))
              << " has no token in the vocabulary";
      throw std::runtime_error(message.str());
    }
    out.push_back(id);
    return;
  }
  if (ignore_merges) {
    const auto it = vocab_by_bytes.find(std::string(word));
    if (it != vocab_by_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    merge_symbols(word, out);
    return;
  }
  thread_local WordCache cache;
  if (cache.owner != serial) {
    cache.words.clear();
    cache.owner = serial;
  }
  std::string key(word);
  const auto it = cache.words.find(key);
  if (it != cache.words.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  const size_t first = out.size();
  merge_symbols(word, out);
  if (cache.words.size() >= kMaxCachedWords) cache.words.clear();
  cache.words.emplace(std::move(key),
                      std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(first), out.end()));
}

// The merge loop: start from one symbol per byte and repeatedly apply the lowest-ranked merge among
// adjacent pairs, the leftmost one on ties. Short words rescan a cached rank per pair; long ones use a
// heap, as `tokenizers` does, which gives the same order.
void BpeTokenizer::Impl::merge_symbols(std::string_view word, std::vector<int32_t>& out) const {
  const int n = static_cast<int>(word.size());
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    int32_t rank;  // rank of the merge of this symbol with the next one, INT_MAX when none
    int32_t merged_id;
  };
  thread_local std::vector<Symbol> symbols;
  symbols.resize(n);
  for (int i = 0; i < n; ++i) {
    const int32_t id = byte_ids[static_cast<unsigned char>(word[i])];
    if (id < 0) {
      merge_word(word.substr(i, 1), out);  // throws, naming the byte
      return;
    }
    symbols[i] = Symbol{id, i - 1, i + 1 < n ? i + 1 : -1, INT_MAX, -1};
  }
  const auto update_rank = [&](int i) {
    Symbol& s = symbols[i];
    s.rank = INT_MAX;
    if (s.next < 0) return;
    if (const Merge* merge = find_merge(s.id, symbols[s.next].id)) {
      s.rank = merge->rank;
      s.merged_id = merge->id;
    }
  };
  const auto apply = [&](int i) {  // merge symbol i with its next
    Symbol& s = symbols[i];
    const int j = s.next;
    s.id = s.merged_id;
    s.next = symbols[j].next;
    if (s.next >= 0) symbols[s.next].prev = i;
    symbols[j].id = -1;  // consumed
  };

  if (n <= 128) {
    for (int i = 0; i < n; ++i) update_rank(i);
    while (true) {
      int best = -1;
      int32_t best_rank = INT_MAX;
      for (int i = 0; i >= 0; i = symbols[i].next) {
        if (symbols[i].rank < best_rank) {
          best_rank = symbols[i].rank;
          best = i;
        }
      }
      if (best < 0) break;
      apply(best);
      update_rank(best);
      if (symbols[best].prev >= 0) update_rank(symbols[best].prev);
    }
  } else {
    using Entry = std::pair<int64_t, int32_t>;  // (rank << 32 | position, merged id)
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
    const auto push = [&](int i) {
      update_rank(i);
      if (symbols[i].rank != INT_MAX) {
        heap.emplace((static_cast<int64_t>(symbols[i].rank) << 32) | i, symbols[i].merged_id);
      }
    };
    for (int i = 0; i < n; ++i) push(i);
    while (!heap.empty()) {
      const auto [key, merged_id] = heap.top();
      heap.pop();
      const int i = static_cast<int>(key & 0xFFFFFFFF);
      const auto rank = static_cast<int32_t>(key >> 32);
      Symbol& s = symbols[i];
      if (s.id < 0 || s.next < 0) continue;
      // Stale entries: the pair at i changed since this entry was pushed.
      const Merge* merge = find_merge(s.id, symbols[s.next].id);
      if (merge == nullptr || merge->rank != rank || merge->id != merged_id) continue;
      s.merged_id = merged_id;
      apply(i);
      push(i);
      if (s.prev >= 0) push(s.prev);
    }
  }
  for (int i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

// ---------------------------------------------------------------------------------------------------------
// Loading.

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read error");
  return buffer.str();
}

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
}

class Checker {
 public:
  explicit Checker(std::string source) : source_(std::move(source)) {}
  [[noreturn]] void fail(const std::string& key, const std::string& message) const {
    throw std::runtime_error(source_ + ": " + key + ": " + message);
  }
  const json& object(const json& parent, const char* key, const std::string& path) const {
    const auto it = parent.find(key);
    if (it == parent.end()) fail(path, "missing; expected an object");
    if (!it->is_object()) fail(path, "expected an object, found " + describe(*it));
    return *it;
  }
  bool boolean(const json& parent, const char* key, bool fallback, const std::string& path) const {
    const auto it = parent.find(key);
    if (it == parent.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(path, "expected true or false, found " + describe(*it));
    return it->get<bool>();
  }
  std::string string(const json& parent, const char* key, const std::string& path) const {
    const auto it = parent.find(key);
    if (it == parent.end()) fail(path, "missing; expected a string");
    if (!it->is_string()) fail(path, "expected a string, found " + describe(*it));
    return it->get<std::string>();
  }
  int32_t id(const json& value, const std::string& path) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 || value.get<int64_t>() >= kMaxId) {
      fail(path, "expected a token id in [0, " + std::to_string(kMaxId) + "), found " + describe(value));
    }
    return static_cast<int32_t>(value.get<int64_t>());
  }
  const std::string& source() const { return source_; }
  static constexpr int64_t kMaxId = 1 << 24;

 private:
  std::string source_;
};

// tokenizer_config.json writes special tokens as a string, as {"content": ...}, or as null.
bool config_token(const json& config, const char* key, const Checker& check, std::string* content) {
  if (!config.is_object()) return false;
  const auto it = config.find(key);
  if (it == config.end()) return false;
  if (it->is_null()) {
    content->clear();
    return true;
  }
  if (it->is_string()) {
    *content = it->get<std::string>();
    return true;
  }
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    *content = (*it)["content"].get<std::string>();
    return true;
  }
  check.fail(std::string("tokenizer_config.json ") + key,
             "expected a token string, {\"content\": ...} or null, found " + describe(*it));
}

}  // namespace

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_files(const std::string& tokenizer_json_path,
                                                       const std::string& config_path) {
  const json tokenizer = parse_json_file(tokenizer_json_path);
  json config;
  if (!config_path.empty()) {
    std::ifstream probe(config_path);
    if (probe) config = parse_json_file(config_path);
  }
  if (!config.is_null() && !config.is_object()) {
    throw std::runtime_error(config_path + ": expected a JSON object, found " + describe(config));
  }
  return std::make_unique<BpeTokenizer>(tokenizer, config, tokenizer_json_path);
}

BpeTokenizer::BpeTokenizer(const json& root, const json& config, std::string source)
    : impl_(std::make_unique<Impl>()), source_(std::move(source)) {
  Impl& m = *impl_;
  m.source = source_;
  const Checker check(source_);
  if (!root.is_object()) check.fail("(root)", "expected a JSON object, found " + describe(root));

  // --- model
  const auto model_it = root.find("model");
  if (model_it == root.end() || model_it->is_null()) check.fail("model", "missing; expected a BPE model");
  const json& model = *model_it;
  if (!model.is_object()) check.fail("model", "expected an object, found " + describe(model));
  const std::string type = model.contains("type") ? check.string(model, "type", "model.type") : "BPE";
  if (type != "BPE") {
    check.fail("model.type", "\"" + type + "\" is not supported; supported: \"BPE\" (byte-level)");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      !(model["dropout"].is_number() && model["dropout"].get<double>() == 0.0)) {
    check.fail("model.dropout",
               "BPE dropout is not supported; expected null, found " + describe(model["dropout"]));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto it = model.find(key);
    if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
      check.fail(std::string("model.") + key,
                 "not supported by byte-level BPE; expected null, found " + describe(*it));
    }
  }
  m.ignore_merges = check.boolean(model, "ignore_merges", false, "model.ignore_merges");

  const json& vocab = check.object(model, "vocab", "model.vocab");
  int32_t max_id = -1;
  std::vector<const std::string*> by_id;
  m.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const int32_t id = check.id(it.value(), "model.vocab[" + json(it.key()).dump() + "]");
    m.vocab.emplace(it.key(), id);
    max_id = std::max(max_id, id);
  }
  const auto added_it = root.find("added_tokens");
  if (added_it != root.end() && !added_it->is_null() && !added_it->is_array()) {
    check.fail("added_tokens", "expected an array, found " + describe(*added_it));
  }
  const json empty_array = json::array();
  const json& added_json = (added_it != root.end() && added_it->is_array()) ? *added_it : empty_array;
  for (size_t i = 0; i < added_json.size(); ++i) {
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const json& entry = added_json[i];
    if (!entry.is_object()) check.fail(path, "expected an object, found " + describe(entry));
    AddedTokenSpec spec;
    if (!entry.contains("id")) check.fail(path + ".id", "missing; expected a token id");
    spec.id = check.id(entry["id"], path + ".id");
    spec.content = check.string(entry, "content", path + ".content");
    if (spec.content.empty()) check.fail(path + ".content", "is empty");
    spec.special = check.boolean(entry, "special", false, path + ".special");
    spec.lstrip = check.boolean(entry, "lstrip", false, path + ".lstrip");
    spec.rstrip = check.boolean(entry, "rstrip", false, path + ".rstrip");
    spec.normalized = check.boolean(entry, "normalized", !spec.special, path + ".normalized");
    spec.single_word = check.boolean(entry, "single_word", false, path + ".single_word");
    max_id = std::max(max_id, spec.id);
    m.added.push_back(std::move(spec));
  }
  if (max_id < 0) check.fail("model.vocab", "is empty");

  token_bytes_.assign(static_cast<size_t>(max_id) + 1, std::string());
  valid_.assign(token_bytes_.size(), 0);
  special_.assign(token_bytes_.size(), 0);
  m.byte_ids.fill(-1);
  std::string bytes;
  m.vocab_by_bytes.reserve(m.vocab.size());
  for (const auto& [token, id] : m.vocab) {
    if (valid_[id]) {
      check.fail("model.vocab", "id " + std::to_string(id) + " is given to two tokens, " +
                                    json(token).dump() + " and another");
    }
    valid_[id] = 1;
    if (unmap_bytes(token, bytes)) {
      token_bytes_[id] = bytes;
      m.vocab_by_bytes.emplace(bytes, id);
      if (bytes.size() == 1) m.byte_ids[static_cast<unsigned char>(bytes[0])] = id;
    } else {
      token_bytes_[id] = token;  // not a byte-level token: decodes to its own text, as in `tokenizers`
    }
  }

  // --- merges
  const auto merges_it = model.find("merges");
  if (merges_it == model.end() || !merges_it->is_array()) {
    check.fail("model.merges", merges_it == model.end() ? "missing; expected an array"
                                                        : "expected an array, found " + describe(*merges_it));
  }
  const json& merges = *merges_it;
  m.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string path = "model.merges[" + std::to_string(i) + "]";
    const json& merge = merges[i];
    std::string left, right;
    if (merge.is_string()) {
      const std::string& text = merge.get_ref<const std::string&>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        check.fail(path,
                   "expected \"left right\" (two tokens separated by one space), found " + describe(merge));
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      check.fail(path, "expected \"left right\" or [\"left\", \"right\"], found " + describe(merge));
    }
    const auto find = [&](const std::string& token) {
      const auto it = m.vocab.find(token);
      if (it == m.vocab.end()) check.fail(path, "token " + json(token).dump() + " is not in model.vocab");
      return it->second;
    };
    const int32_t a = find(left);
    const int32_t b = find(right);
    const int32_t merged = find(left + right);
    m.merges[Impl::pair_key(a, b)] = Impl::Merge{static_cast<int32_t>(i), merged};
  }

  // --- added tokens (after the vocabulary: their content is what they decode to)
  for (size_t i = 0; i < m.added.size(); ++i) {
    const AddedTokenSpec& spec = m.added[i];
    valid_[spec.id] = 1;
    special_[spec.id] = spec.special ? 1 : 0;
    token_bytes_[spec.id] = unmap_bytes(spec.content, bytes) ? bytes : spec.content;
    m.added_by_content[spec.content] = spec.id;
  }

  // --- normalizer
  const auto normalizer_it = root.find("normalizer");
  if (normalizer_it != root.end() && !normalizer_it->is_null()) {
    std::vector<std::pair<const json*, std::string>> stack{{&*normalizer_it, "normalizer"}};
    while (!stack.empty()) {
      const auto [node, path] = stack.back();
      stack.pop_back();
      if (!node->is_object()) check.fail(path, "expected an object, found " + describe(*node));
      const std::string kind = check.string(*node, "type", path + ".type");
      if (kind == "NFC") {
        m.nfc = true;
      } else if (kind == "Sequence") {
        const auto list = node->find("normalizers");
        if (list == node->end() || !list->is_array()) check.fail(path + ".normalizers", "expected an array");
        for (size_t k = list->size(); k-- > 0;)
          stack.emplace_back(&(*list)[k], path + ".normalizers[" + std::to_string(k) + "]");
      } else {
        check.fail(path + ".type",
                   "\"" + kind + "\" is not supported; supported: \"NFC\", \"Sequence\" or null");
      }
    }
  }

  // --- pre-tokenizer: ByteLevel, or Sequence[Split..., ByteLevel]
  const auto pre_it = root.find("pre_tokenizer");
  if (pre_it == root.end() || pre_it->is_null()) {
    check.fail("pre_tokenizer",
               "missing; expected ByteLevel or Sequence[Split..., ByteLevel] (byte-level BPE)");
  }
  std::vector<std::pair<const json*, std::string>> steps;
  if (pre_it->is_object() && pre_it->value("type", "") == "Sequence") {
    const auto list = pre_it->find("pretokenizers");
    if (list == pre_it->end() || !list->is_array())
      check.fail("pre_tokenizer.pretokenizers", "expected an array");
    for (size_t k = 0; k < list->size(); ++k) {
      steps.emplace_back(&(*list)[k], "pre_tokenizer.pretokenizers[" + std::to_string(k) + "]");
    }
  } else {
    steps.emplace_back(&*pre_it, "pre_tokenizer");
  }
  bool have_byte_level = false;
  for (const auto& [node, path] : steps) {
    if (!node->is_object()) check.fail(path, "expected an object, found " + describe(*node));
    const std::string kind = check.string(*node, "type", path + ".type");
    if (have_byte_level)
      check.fail(path, "ByteLevel must be the last pre-tokenizer; found \"" + kind + "\" after it");
    if (kind == "ByteLevel") {
      have_byte_level = true;
      m.add_prefix_space = check.boolean(*node, "add_prefix_space", true, path + ".add_prefix_space");
      if (check.boolean(*node, "use_regex", true, path + ".use_regex")) {
        m.byte_level_regex = std::make_unique<Regex>(kGpt2Pattern, source_ + ": " + path);
      }
    } else if (kind == "Split") {
      const json& pattern = check.object(*node, "pattern", path + ".pattern");
      std::string regex;
      if (pattern.contains("Regex")) {
        regex = check.string(pattern, "Regex", path + ".pattern.Regex");
      } else if (pattern.contains("String")) {
        regex = escape_literal(check.string(pattern, "String", path + ".pattern.String"));
      } else {
        check.fail(path + ".pattern",
                   "expected {\"Regex\": ...} or {\"String\": ...}, found " + describe(pattern));
      }
      const std::string behavior =
          node->contains("behavior") ? check.string(*node, "behavior", path + ".behavior") : "Isolated";
      if (behavior != "Isolated") {
        check.fail(path + ".behavior", "\"" + behavior + "\" is not supported; supported: \"Isolated\"");
      }
      if (check.boolean(*node, "invert", false, path + ".invert"))
        check.fail(path + ".invert", "true is not supported");
      if (regex.empty()) check.fail(path + ".pattern", "is empty");
      m.splits.push_back(std::make_unique<Regex>(regex, source_ + ": " + path + ".pattern"));
    } else {
      check.fail(path + ".type",
                 "\"" + kind + "\" is not supported; supported: \"ByteLevel\", \"Split\", \"Sequence\"");
    }
  }
  if (!have_byte_level)
    check.fail("pre_tokenizer", "has no ByteLevel step; only byte-level BPE is supported");

  // --- decoder
  const auto decoder_it = root.find("decoder");
  if (decoder_it != root.end() && !decoder_it->is_null()) {
    if (!decoder_it->is_object()) check.fail("decoder", "expected an object, found " + describe(*decoder_it));
    const std::string kind = check.string(*decoder_it, "type", "decoder.type");
    if (kind != "ByteLevel")
      check.fail("decoder.type", "\"" + kind + "\" is not supported; supported: \"ByteLevel\" or null");
  }

  // --- added-token tries (normalized contents are matched in normalized text)
  m.word_char = std::make_unique<Regex>("[\\p{L}\\p{N}_]", source_);
  for (size_t i = 0; i < m.added.size(); ++i) {
    const AddedTokenSpec& spec = m.added[i];
    if (spec.normalized) {
      m.normalized_trie.add(m.nfc ? nfc_normalize(spec.content) : spec.content, static_cast<int>(i));
    } else {
      m.raw_trie.add(spec.content, static_cast<int>(i));
    }
  }
  added_tokens_ = m.added;

  // --- post-processor: does it put a special token first?
  std::vector<const json*> processors;
  const auto post_it = root.find("post_processor");
  if (post_it != root.end() && post_it->is_object()) {
    if (post_it->value("type", "") == "Sequence" && post_it->contains("processors") &&
        (*post_it)["processors"].is_array()) {
      for (const json& p : (*post_it)["processors"]) processors.push_back(&p);
    } else {
      processors.push_back(&*post_it);
    }
  }
  int32_t post_bos = -1;
  for (const json* p : processors) {
    if (!p->is_object() || p->value("type", "") != "TemplateProcessing") continue;
    const auto single = p->find("single");
    if (single == p->end() || !single->is_array() || single->empty()) continue;
    const json& first = (*single)[0];
    if (first.is_object() && first.contains("SpecialToken") && first["SpecialToken"].is_object() &&
        first["SpecialToken"].contains("id") && first["SpecialToken"]["id"].is_string()) {
      post_bos = token_to_id(first["SpecialToken"]["id"].get<std::string>());
      if (post_bos < 0) {
        check.fail("post_processor",
                   "special token " + first["SpecialToken"]["id"].dump() + " is not in the vocabulary");
      }
      adds_bos_ = true;
    }
  }

  // --- bos / eos / pad: tokenizer_config.json, else well-known names
  const auto resolve = [&](const char* key, std::initializer_list<const char*> fallbacks) -> int32_t {
    std::string content;
    if (config_token(config, key, check, &content)) {
      if (content.empty()) return -1;
      const int32_t id = token_to_id(content);
      if (id < 0) {
        check.fail(std::string("tokenizer_config.json ") + key,
                   json(content).dump() + " is not in the vocabulary");
      }
      return id;
    }
    for (const char* name : fallbacks) {
      const int32_t id = token_to_id(name);
      if (id >= 0) return id;
    }
    return -1;
  };
  eos_id_ = resolve("eos_token", {"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"});
  bos_id_ = resolve("bos_token", {"<|begin_of_text|>", "<s>", "<bos>"});
  if (bos_id_ < 0 && post_bos >= 0) bos_id_ = post_bos;
  pad_id_ = resolve("pad_token", {"<|pad|>", "<pad>", "<|finetune_right_pad_id|>"});
}

BpeTokenizer::~BpeTokenizer() = default;

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  impl_->encode(text, ids);
  return ids;
}

std::vector<int32_t> BpeTokenizer::encode_with_special_tokens(std::string_view text) const {
  std::vector<int32_t> ids;
  if (adds_bos_ && bos_id_ >= 0) ids.push_back(bos_id_);
  impl_->encode(text, ids);
  return ids;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  std::string text;
  text.reserve(ids.size() * 4);
  for (const int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || !valid_[id]) {
      throw std::invalid_argument(source_ + ": cannot decode token id " + std::to_string(id) +
                                  ": expected an id of the vocabulary, in [0, " +
                                  std::to_string(vocab_size()) + ")");
    }
    if (skip_special_tokens && special_[id]) continue;
    text += token_bytes_[id];
  }
  return text;
}

std::string BpeTokenizer::token_bytes(int32_t id) const {
  return decode({id}, false);
}

bool BpeTokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && special_[id] != 0;
}

int32_t BpeTokenizer::token_to_id(std::string_view token) const {
  const std::string key(token);
  const auto added = impl_->added_by_content.find(key);
  if (added != impl_->added_by_content.end()) return added->second;
  const auto it = impl_->vocab.find(key);
  return it == impl_->vocab.end() ? -1 : it->second;
}

}  // namespace llm::data
