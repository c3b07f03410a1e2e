#include "llm/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "data/atomic_file.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace llm {

namespace {

using json = nlohmann::json;

// The official reader refuses headers above 100 MB; so do we (a corrupt length must not make us
// allocate or parse gigabytes).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeInfo {
  SafeDType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {SafeDType::kBool, "BOOL", 1},      {SafeDType::kU8, "U8", 1},          {SafeDType::kI8, "I8", 1},
    {SafeDType::kF8E5M2, "F8_E5M2", 1}, {SafeDType::kF8E4M3, "F8_E4M3", 1}, {SafeDType::kI16, "I16", 2},
    {SafeDType::kU16, "U16", 2},        {SafeDType::kF16, "F16", 2},        {SafeDType::kBF16, "BF16", 2},
    {SafeDType::kI32, "I32", 4},        {SafeDType::kU32, "U32", 4},        {SafeDType::kF32, "F32", 4},
    {SafeDType::kF64, "F64", 8},        {SafeDType::kI64, "I64", 8},        {SafeDType::kU64, "U64", 8},
};

const DTypeInfo& info(SafeDType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d;
  }
  return kDTypes[0];  // unreachable: every enumerator is listed
}

std::string system_error(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

template <typename U>
U load(const uint8_t* p) {
  U value;
  std::memcpy(&value, p, sizeof(U));
  return value;
}

float f8e4m3_to_float(uint8_t b) {
  // E4M3 "fn": bias 7, no infinities, S.1111.111 is NaN.
  const bool negative = b & 0x80;
  const int exponent = (b >> 3) & 0xF;
  const int mantissa = b & 0x7;
  float value;
  if (exponent == 0xF && mantissa == 0x7) {
    value = std::nanf("");
  } else if (exponent == 0) {
    value = std::ldexp(static_cast<float>(mantissa), -9);  // mantissa/8 * 2^-6
  } else {
    value = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
  }
  return negative ? -value : value;
}

// A value for an error message: scalars as JSON (cut at 60 characters), containers by kind. Never
// recurses, so it is safe on any parsed input.
std::string describe(const json& v) {
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  std::string text = v.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// Thrown from the parser callback when the header nests deeper than a valid header can.
struct TooDeep {};

// Reads one tensor entry of the header; throws with `where` naming the file and tensor.
SafetensorsTensor parse_entry(const std::string& name, const json& entry, uint64_t data_size,
                              const std::string& where) {
  auto fail = [&where](const std::string& why) { return SafetensorsError(where + ": " + why); };
  if (!entry.is_object()) throw fail("expected an object with dtype, shape and data_offsets");
  for (auto it = entry.begin(); it != entry.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      throw fail("unexpected field \"" + it.key() + "\" (expected dtype, shape, data_offsets)");
  }
  SafetensorsTensor t;
  t.name = name;
  auto dtype = entry.find("dtype");
  if (dtype == entry.end() || !dtype->is_string()) throw fail("missing or non-string \"dtype\"");
  if (!safe_dtype_from_name(dtype->get<std::string>(), &t.dtype)) {
    throw fail("unknown dtype \"" + dtype->get<std::string>() + "\" (known: " + safe_dtype_list() + ")");
  }
  auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array()) throw fail("missing or non-array \"shape\"");
  if (shape->size() > 16)
    throw fail("shape has " + std::to_string(shape->size()) + " dimensions (at most 16)");
  // numel saturates at a bound far above any byte count a file can hold, so it cannot overflow.
  constexpr uint64_t kLimit = uint64_t{1} << 62;
  uint64_t numel = 1;
  bool saturated = false;
  for (const auto& d : *shape) {
    if (!d.is_number_unsigned())
      throw fail("shape entries must be non-negative integers, found " + describe(d));
    const uint64_t dim = d.get<uint64_t>();
    if (dim > kLimit) throw fail("shape dimension " + describe(d) + " is too large");
    t.shape.push_back(static_cast<int64_t>(dim));
    if (dim == 0) {
      numel = 0;
      saturated = false;
    } else if (numel != 0 && !saturated) {
      if (numel > kLimit / dim) {
        saturated = true;
      } else {
        numel *= dim;
      }
    }
  }
  if (saturated) throw fail("shape has too many elements");
  t.numel = static_cast<int64_t>(numel);
  auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    throw fail("\"data_offsets\" must be two non-negative integers [begin, end]");
  }
  t.begin = (*offsets)[0].get<uint64_t>();
  t.end = (*offsets)[1].get<uint64_t>();
  if (t.begin > t.end) {
    throw fail("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
               "] end before they begin");
  }
  if (t.end > data_size) {
    throw fail("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
               "] lie outside the data section (" + std::to_string(data_size) + " bytes)");
  }
  const uint64_t expected = numel * safe_dtype_size(t.dtype);  // numel <= 2^62 / dim; size <= 8
  if (numel > kLimit / 8 || t.end - t.begin != expected) {
    throw fail("dtype " + std::string(safe_dtype_name(t.dtype)) + " and shape " + shape->dump() + " need " +
               std::to_string(expected) + " bytes but data_offsets give " + std::to_string(t.end - t.begin));
  }
  return t;
}

}  // namespace

const char* safe_dtype_name(SafeDType dtype) {
  return info(dtype).name;
}
size_t safe_dtype_size(SafeDType dtype) {
  return info(dtype).size;
}

bool safe_dtype_from_name(const std::string& name, SafeDType* dtype) {
  for (const auto& d : kDTypes) {
    if (name == d.name) {
      *dtype = d.dtype;
      return true;
    }
  }
  return false;
}

std::string safe_dtype_list() {
  std::string list;
  for (const auto& d : kDTypes) list += (list.empty() ? "" : ", ") + std::string(d.name);
  return list;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  const uint32_t mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  }
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf or NaN
  } else {
    bits = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t exponent = (x >> 23) & 0xFF;
  const uint32_t mantissa = x & 0x7FFFFF;
  if (exponent == 0xFF) return static_cast<uint16_t>(sign | 0x7C00 | (mantissa ? 0x200 : 0));
  const int e = static_cast<int>(exponent) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00);  // overflow to infinity
  if (e <= 0) {
    // Subnormal half: m = (1.mantissa) * 2^(exponent - 126) in units of 2^-24, i.e. M >> (14 - e).
    const int shift = 14 - e;
    if (shift > 24) return sign;
    const uint32_t M = mantissa | 0x800000;
    uint32_t m = M >> shift;
    const uint32_t rest = M & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (m & 1))) ++m;
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t bits = (static_cast<uint32_t>(e) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (bits & 1))) ++bits;  // a carry may round up to infinity
  return static_cast<uint16_t>(sign | bits);
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

template <typename T>
void convert_from_safe_dtype(T* out, const uint8_t* p, SafeDType dtype, size_t n) {
  switch (dtype) {
    case SafeDType::kBool:
      for (size_t i = 0; i < n; ++i) out[i] = p[i] ? T(1) : T(0);
      break;
    case SafeDType::kU8:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(p[i]);
      break;
    case SafeDType::kI8:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(static_cast<int8_t>(p[i]));
      break;
    case SafeDType::kF8E5M2:  // the top byte of an IEEE half
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(half_to_float(static_cast<uint16_t>(p[i] << 8)));
      break;
    case SafeDType::kF8E4M3:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(f8e4m3_to_float(p[i]));
      break;
    case SafeDType::kI16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<int16_t>(p + 2 * i));
      break;
    case SafeDType::kU16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<uint16_t>(p + 2 * i));
      break;
    case SafeDType::kF16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(half_to_float(load<uint16_t>(p + 2 * i)));
      break;
    case SafeDType::kBF16:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(bf16_to_float(load<uint16_t>(p + 2 * i)));
      break;
    case SafeDType::kI32:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<int32_t>(p + 4 * i));
      break;
    case SafeDType::kU32:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<uint32_t>(p + 4 * i));
      break;
    case SafeDType::kF32:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<float>(p + 4 * i));
      break;
    case SafeDType::kF64:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<double>(p + 8 * i));
      break;
    case SafeDType::kI64:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<int64_t>(p + 8 * i));
      break;
    case SafeDType::kU64:
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(load<uint64_t>(p + 8 * i));
      break;
  }
}
template void convert_from_safe_dtype<float>(float*, const uint8_t*, SafeDType, size_t);
template void convert_from_safe_dtype<double>(double*, const uint8_t*, SafeDType, size_t);

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw SafetensorsError(system_error("cannot open safetensors file", path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw SafetensorsError(system_error("cannot stat", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw SafetensorsError(path + ": not a regular file");
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ > 0) {
    void* p = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw SafetensorsError(system_error("cannot map", path));
    }
    map_ = p;
  }
  ::close(fd);
  try {
    parse(static_cast<const uint8_t*>(map_), map_size_);
  } catch (...) {
    release();
    throw;
  }
}

SafetensorsFile SafetensorsFile::from_bytes(const std::string& origin, std::vector<uint8_t> bytes) {
  SafetensorsFile f;
  f.path_ = origin;
  f.owned_ = std::move(bytes);
  f.parse(f.owned_.data(), f.owned_.size());
  return f;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept {
  *this = std::move(o);
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
    // A moved std::vector keeps its heap buffer, so data_ stays valid for owned_ too.
    owned_ = std::move(o.owned_);
    data_ = o.data_;
    map_ = o.map_;
    map_size_ = o.map_size_;
    o.data_ = nullptr;
    o.map_ = nullptr;
    o.map_size_ = 0;
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  release();
}

void SafetensorsFile::release() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
  data_ = nullptr;
}

void SafetensorsFile::parse(const uint8_t* bytes, size_t size) {
  auto fail = [this](const std::string& why) { return SafetensorsError(path_ + ": " + why); };
  if (size < 8) {
    throw fail("file is " + std::to_string(size) + " bytes, too short for the 8-byte header length");
  }
  const uint64_t header_len = load<uint64_t>(bytes);
  if (header_len > size - 8) {
    throw fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
               std::to_string(size) + " bytes); the file is truncated or not safetensors");
  }
  if (header_len > kMaxHeaderBytes) {
    throw fail("header length " + std::to_string(header_len) + " exceeds the " +
               std::to_string(kMaxHeaderBytes) + "-byte limit");
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  if (header_len < 2 || header_begin[0] != '{') throw fail("header is not a JSON object");
  // Duplicate top-level keys would let one tensor entry hide another; nlohmann keeps the last. A valid
  // header nests three levels deep ({"name": {"shape": [...]}}); deeper input is refused while parsing,
  // so that no recursive operation ever sees an arbitrarily deep value.
  std::set<std::string> seen;
  std::string duplicate;
  json header;
  try {
    header = json::parse(
        header_begin, header_begin + header_len, [&](int depth, json::parse_event_t event, json& parsed) {
          if (depth == 1 && event == json::parse_event_t::key) {
            const std::string key = parsed.get<std::string>();
            if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
          }
          if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
              depth >= 3) {
            throw TooDeep{};
          }
          return true;
        });
  } catch (const json::exception& e) {
    throw fail(std::string("header is not valid JSON: ") + e.what());
  } catch (const TooDeep&) {
    throw fail("header nests deeper than a safetensors header does");
  }
  if (!duplicate.empty()) throw fail("header names \"" + duplicate + "\" twice");
  if (!header.is_object()) throw fail("header is not a JSON object");

  const uint64_t data_size = size - 8 - header_len;
  data_ = bytes + 8 + header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) throw fail("\"__metadata__\" must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) throw fail("\"__metadata__\" value of \"" + m.key() + "\" is not a string");
        metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    tensors_.push_back(parse_entry(it.key(), *it, data_size, path_ + ": tensor \"" + it.key() + "\""));
  }
  // The tensors must tile the data section: sorted by offset, each starts where the previous ended.
  std::sort(tensors_.begin(), tensors_.end(), [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  const SafetensorsTensor* previous = nullptr;
  for (const auto& t : tensors_) {
    if (t.begin < cursor) {
      throw fail("tensor \"" + t.name + "\" (bytes " + std::to_string(t.begin) + ".." +
                 std::to_string(t.end) + ") overlaps tensor \"" + previous->name + "\" (ending at " +
                 std::to_string(cursor) + ")");
    }
    if (t.begin > cursor) {
      throw fail("hole in the data section: bytes " + std::to_string(cursor) + ".." +
                 std::to_string(t.begin) + " before tensor \"" + t.name + "\" belong to no tensor");
    }
    cursor = t.end;
    previous = &t;
  }
  if (cursor != data_size) {
    throw fail("the data section has " + std::to_string(data_size) + " bytes but the tensors cover " +
               std::to_string(cursor) + " (trailing bytes belong to no tensor)");
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

template <typename T>
void SafetensorsFile::read(const std::string& name, T* out, size_t count) const {
  const SafetensorsTensor* t = find(name);
  if (t == nullptr) throw SafetensorsError(path_ + ": no tensor \"" + name + "\"");
  if (static_cast<uint64_t>(t->numel) != count) {
    throw SafetensorsError(path_ + ": tensor \"" + name + "\" has " + std::to_string(t->numel) +
                           " elements, expected " + std::to_string(count));
  }
  convert_from_safe_dtype(out, data_ + t->begin, t->dtype, count);
}
template void SafetensorsFile::read<float>(const std::string&, float*, size_t) const;
template void SafetensorsFile::read<double>(const std::string&, double*, size_t) const;

std::vector<float> SafetensorsFile::read_floats(const std::string& name) const {
  const SafetensorsTensor* t = find(name);
  if (t == nullptr) throw SafetensorsError(path_ + ": no tensor \"" + name + "\"");
  std::vector<float> out(static_cast<size_t>(t->numel));
  read(name, out.data(), out.size());
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// SafetensorsFolder

namespace {

const char* kIndexName = "model.safetensors.index.json";
const char* kSingleName = "model.safetensors";

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

}  // namespace

SafetensorsFolder::SafetensorsFolder(const std::string& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw SafetensorsError(dir + ": not a directory");
  const std::string index_path = dir + "/" + kIndexName;
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path, std::ios::binary);
    if (!in) throw SafetensorsError(system_error("cannot open", index_path));
    std::stringstream buffer;
    buffer << in.rdbuf();
    json index;
    try {
      index = json::parse(buffer.str());
    } catch (const json::exception& e) {
      throw SafetensorsError(index_path + ": not valid JSON: " + e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      throw SafetensorsError(index_path + ": expected an object with a \"weight_map\" object");
    }
    std::map<std::string, std::string> weight_map;
    std::map<std::string, size_t> file_index;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it->is_string() || !is_plain_file_name(it->get<std::string>())) {
        throw SafetensorsError(index_path + ": weight_map entry \"" + it.key() +
                               "\" must name a file in the same folder, found " + describe(*it));
      }
      weight_map[it.key()] = it->get<std::string>();
      file_index.emplace(it->get<std::string>(), 0);
    }
    for (auto& [file, position] : file_index) {
      position = files_.size();
      files_.emplace_back(dir + "/" + file);
    }
    for (const auto& [name, file] : weight_map) {
      const size_t f = file_index.at(file);
      if (files_[f].find(name) == nullptr) {
        throw SafetensorsError(index_path + ": tensor \"" + name + "\" is mapped to " + file +
                               ", which does not contain it");
      }
      where_[name] = f;
    }
    for (const auto& file : files_) {
      for (const auto& t : file.tensors()) {
        auto it = weight_map.find(t.name);
        if (it == weight_map.end() || dir + "/" + it->second != file.path()) {
          throw SafetensorsError(file.path() + ": holds tensor \"" + t.name + "\", which " + kIndexName +
                                 (it == weight_map.end() ? " does not list" : " maps to " + it->second));
        }
      }
    }
    return;
  }
  const std::string single = dir + "/" + kSingleName;
  if (!fs::exists(single, ec)) {
    std::string hint;
    if (fs::exists(dir + "/pytorch_model.bin", ec))
      hint =
          " (found pytorch_model.bin: only safetensors weights are supported; re-save with "
          "save_pretrained(..., safe_serialization=True))";
    throw SafetensorsError(dir + ": has neither " + kSingleName + " nor " + kIndexName + hint);
  }
  files_.emplace_back(single);
  for (const auto& t : files_[0].tensors()) where_[t.name] = 0;
}

std::vector<std::string> SafetensorsFolder::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

const SafetensorsTensor* SafetensorsFolder::find(const std::string& name,
                                                 const SafetensorsFile** file) const {
  auto it = where_.find(name);
  if (it == where_.end()) return nullptr;
  if (file != nullptr) *file = &files_[it->second];
  return files_[it->second].find(name);
}

template <typename T>
void SafetensorsFolder::read(const std::string& name, T* out, size_t count) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw SafetensorsError(dir_ + ": no tensor \"" + name + "\"");
  files_[it->second].read(name, out, count);
}
template void SafetensorsFolder::read<float>(const std::string&, float*, size_t) const;
template void SafetensorsFolder::read<double>(const std::string&, double*, size_t) const;

// ---------------------------------------------------------------------------------------------------------
// Writing

namespace {

int64_t numel_of(const SafetensorsWriteTensor& t) {
  int64_t n = 1;
  for (int64_t d : t.shape) n *= d;
  return n;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<SafetensorsWriteTensor>& tensors,
                       SafeDType dtype, const std::map<std::string, std::string>& metadata) {
  if (dtype != SafeDType::kF32 && dtype != SafeDType::kF16 && dtype != SafeDType::kBF16) {
    throw SafetensorsError(path + ": cannot write dtype " + safe_dtype_name(dtype) + " (F32, F16 or BF16)");
  }
  const size_t esize = safe_dtype_size(dtype);
  json header = json::object();
  json meta = json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  meta["format"] = "pt";
  header["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || header.contains(t.name))
      throw SafetensorsError(path + ": tensor name \"" + t.name + "\" is reserved or repeated");
    for (int64_t d : t.shape) {
      if (d < 0) throw SafetensorsError(path + ": tensor \"" + t.name + "\" has a negative dimension");
    }
    const uint64_t bytes = static_cast<uint64_t>(numel_of(t)) * esize;
    header[t.name] = {
        {"dtype", safe_dtype_name(dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data section starts 8-byte aligned
  const uint64_t header_len = text.size();

  AtomicFile<SafetensorsError> out(path);
  out.write(&header_len, 8);
  out.write(text.data(), text.size());
  std::vector<uint16_t> buffer;
  for (const auto& t : tensors) {
    const size_t n = static_cast<size_t>(numel_of(t));
    if (dtype == SafeDType::kF32) {
      out.write(t.data, n * 4);
      continue;
    }
    constexpr size_t kChunk = 1 << 16;
    for (size_t start = 0; start < n; start += kChunk) {
      const size_t m = std::min(kChunk, n - start);
      buffer.resize(m);
      for (size_t i = 0; i < m; ++i)
        buffer[i] =
            dtype == SafeDType::kF16 ? float_to_half(t.data[start + i]) : float_to_bf16(t.data[start + i]);
      out.write(buffer.data(), m * 2);
    }
  }
  out.commit();
}

std::vector<std::string> write_safetensors_folder(const std::string& dir,
                                                  const std::vector<SafetensorsWriteTensor>& tensors,
                                                  SafeDType dtype, uint64_t max_shard_bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw SafetensorsError("cannot create folder " + dir + ": " + ec.message());
  const uint64_t esize = safe_dtype_size(dtype);
  uint64_t total = 0;
  std::vector<std::vector<SafetensorsWriteTensor>> shards(1);
  uint64_t current = 0;
  for (const auto& t : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(numel_of(t)) * esize;
    if (!shards.back().empty() && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += bytes;
    total += bytes;
  }
  const std::string index_path = dir + "/" + kIndexName;
  if (shards.size() == 1) {
    write_safetensors(dir + "/" + kSingleName, tensors, dtype);
    fs::remove(index_path, ec);  // a stale index would shadow the new file
    return {kSingleName};
  }
  std::vector<std::string> names;
  json weight_map = json::object();
  char name[64];
  for (size_t s = 0; s < shards.size(); ++s) {
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    write_safetensors(dir + "/" + name, shards[s], dtype);
    for (const auto& t : shards[s]) weight_map[t.name] = name;
    names.push_back(name);
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  AtomicFile<SafetensorsError> out(index_path);
  out.write(text.data(), text.size());
  out.commit();
  fs::remove(dir + "/" + kSingleName, ec);  // would otherwise be read instead of the shards
  names.push_back(kIndexName);
  return names;
}

}  // namespace llm
