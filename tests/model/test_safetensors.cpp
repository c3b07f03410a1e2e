// The safetensors reader and writer: round trips, dtype conversions, sharded folders, and every kind of
// malformed file (each must give an error naming the file and tensor, never a crash).
#include <gtest/gtest.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "llm/safetensors.h"

namespace {

namespace fs = std::filesystem;
using llm::SafeDType;
using llm::SafetensorsError;
using llm::SafetensorsFile;

class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("llm_st_" + tag + "_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

// A file with `header` as its JSON header and `data_bytes` bytes of data.
std::vector<uint8_t> make_file(const std::string& header, size_t data_bytes,
                               uint64_t header_len_override = 0) {
  std::vector<uint8_t> bytes(8 + header.size() + data_bytes, 0);
  const uint64_t n = header_len_override ? header_len_override : header.size();
  std::memcpy(bytes.data(), &n, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  for (size_t i = 0; i < data_bytes; ++i) bytes[8 + header.size() + i] = static_cast<uint8_t>(i * 7);
  return bytes;
}

// The error text of parsing `bytes`, or "" when it parses.
std::string parse_error(const std::vector<uint8_t>& bytes) {
  try {
    SafetensorsFile::from_bytes("bad.safetensors", bytes);
  } catch (const SafetensorsError& e) {
    return e.what();
  }
  return "";
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

TEST(Safetensors, WriteReadRoundTrip) {
  TempDir dir("rt");
  const std::vector<float> a = {1.5f, -2.25f, 3.0f, 1e-30f, -0.0f, 7.0f};
  const std::vector<float> scalar = {42.0f};
  const std::string path = dir.str() + "/t.safetensors";
  llm::write_safetensors(path,
                         {{"a", {2, 3}, a.data()}, {"empty", {0, 4}, nullptr}, {"s", {}, scalar.data()}},
                         SafeDType::kF32, {{"note", "hello"}});
  const SafetensorsFile file(path);
  ASSERT_EQ(file.tensors().size(), 3u);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "hello");
  EXPECT_EQ(file.find("a")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(file.read_floats("a"), a);
  EXPECT_EQ(file.find("empty")->numel, 0);
  EXPECT_EQ(file.read_floats("s"), scalar);
  std::vector<double> as_double(6);
  file.read("a", as_double.data(), 6);
  EXPECT_EQ(as_double[1], -2.25);
  EXPECT_THROW(file.read("a", as_double.data(), 5), SafetensorsError);
  EXPECT_THROW(file.read_floats("nope"), SafetensorsError);

  // The header is padded with spaces so that the data starts 8-byte aligned.
  const std::vector<uint8_t> bytes = read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(::getpid())));
}

TEST(Safetensors, HalfAndBf16ConversionsRoundTripEveryValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = llm::half_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(llm::half_to_float(llm::float_to_half(f))));
      continue;
    }
    ASSERT_EQ(llm::float_to_half(f), h) << h;
    const float b = llm::bf16_to_float(static_cast<uint16_t>(h));
    if (!std::isnan(b)) {
      ASSERT_EQ(llm::float_to_bf16(b), h) << h;
    }
  }
  EXPECT_EQ(llm::float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(llm::float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(llm::float_to_half(65520.0f), 0x7C00);                      // rounds up to infinity
  EXPECT_EQ(llm::float_to_half(std::ldexp(1.0f, -25)), 0);              // tie, rounds to even (zero)
  EXPECT_EQ(llm::float_to_half(std::ldexp(3.0f, -26)), 1);              // 0.75 ulp rounds up
  EXPECT_EQ(llm::float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie to even
  EXPECT_EQ(llm::float_to_half(1.0f + std::ldexp(3.0f, -11)), 0x3C02);  // tie to even (up)
  EXPECT_EQ(llm::float_to_bf16(1.0f), 0x3F80);
  float tie;
  const uint32_t tie_bits = 0x3F808000u;
  std::memcpy(&tie, &tie_bits, 4);
  EXPECT_EQ(llm::float_to_bf16(tie), 0x3F80);
  EXPECT_TRUE(std::isnan(llm::bf16_to_float(llm::float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Safetensors, ReadsEveryDtype) {
  // One element of each integer dtype plus F64 and both F8 formats.
  const std::string header = R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]},)"
                             R"("u8":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},)"
                             R"("i8":{"dtype":"I8","shape":[1],"data_offsets":[3,4]},)"
                             R"("e4":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[4,6]},)"
                             R"("e5":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[6,7]},)"
                             R"("pad":{"dtype":"U8","shape":[1],"data_offsets":[7,8]},)"
                             R"("i32":{"dtype":"I32","shape":[1],"data_offsets":[8,12]},)"
                             R"("f16":{"dtype":"F16","shape":[2],"data_offsets":[12,16]},)"
                             R"("i64":{"dtype":"I64","shape":[1],"data_offsets":[16,24]},)"
                             R"("f64":{"dtype":"F64","shape":[1],"data_offsets":[24,32]}})";
  std::vector<uint8_t> bytes = make_file(header, 32);
  uint8_t* d = bytes.data() + 8 + header.size();
  d[0] = 0;
  d[1] = 3;
  d[2] = 200;
  d[3] = 0xFE;  // -2
  d[4] = 0x38;  // E4M3: exponent 7, mantissa 0 -> 1.0
  d[5] = 0x7F;  // NaN
  d[6] = 0xC0;  // E5M2: -2.0
  const int32_t i32 = -123456;
  std::memcpy(d + 8, &i32, 4);
  const uint16_t halves[2] = {0x3C00, 0xC000};  // 1, -2
  std::memcpy(d + 12, halves, 4);
  const int64_t i64 = -(int64_t{1} << 40);
  std::memcpy(d + 16, &i64, 8);
  const double f64 = 0.1;
  std::memcpy(d + 24, &f64, 8);
  const SafetensorsFile file = SafetensorsFile::from_bytes("all.safetensors", bytes);
  EXPECT_EQ(file.read_floats("b"), (std::vector<float>{0, 1}));
  EXPECT_EQ(file.read_floats("u8")[0], 200.0f);
  EXPECT_EQ(file.read_floats("i8")[0], -2.0f);
  EXPECT_EQ(file.read_floats("e4")[0], 1.0f);
  EXPECT_TRUE(std::isnan(file.read_floats("e4")[1]));
  EXPECT_EQ(file.read_floats("e5")[0], -2.0f);
  EXPECT_EQ(file.read_floats("i32")[0], -123456.0f);
  EXPECT_EQ(file.read_floats("f16"), (std::vector<float>{1, -2}));
  std::vector<double> v(1);
  file.read("i64", v.data(), 1);
  EXPECT_EQ(v[0], static_cast<double>(i64));
  file.read("f64", v.data(), 1);
  EXPECT_EQ(v[0], 0.1);
}

struct BadCase {
  const char* what;
  std::string header;
  size_t data_bytes;
  const char* expected;  // a substring of the error
};

TEST(Safetensors, MalformedFilesGiveClearErrors) {
  const std::vector<BadCase> cases = {
      {"not JSON", "{not json}", 0, "header is not valid JSON"},
      {"array header", "[1, 2, 3]", 0, "header is not a JSON object"},
      {"unknown dtype", R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}})", 4,
       "unknown dtype \"F7\""},
      {"dtype vs bytes", R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12,
       "need 16 bytes but data_offsets give 12"},
      {"outside data", R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4,
       "outside the data section"},
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "overlaps"},
      {"hole",
       R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, "hole in the data section"},
      {"hole at start", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "hole"},
      {"trailing bytes", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 9, "trailing bytes"},
      {"negative dim", R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4,
       "non-negative integers"},
      {"float dim", R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4,
       "non-negative integers"},
      {"huge shape",
       R"({"a":{"dtype":"F32","shape":[1099511627776,1099511627776,1099511627776],"data_offsets":[0,4]}})", 4,
       "too many elements"},
      {"end before begin", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4,
       "end before they begin"},
      {"missing offsets", R"({"a":{"dtype":"F32","shape":[1]}})", 4, "data_offsets"},
      {"three offsets", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}})", 4, "data_offsets"},
      {"extra field", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", 4,
       "unexpected field"},
      {"entry not object", R"({"a":[1,2]})", 0, "expected an object"},
      {"metadata value", R"({"__metadata__":{"format":1}})", 0, "is not a string"},
      {"metadata array", R"({"__metadata__":[1]})", 0, "must be an object"},
      {"duplicate tensor",
       R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "names \"a\" twice"},
      {"nested shape", R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", 4, "nests deeper"},
      {"deep metadata", R"({"__metadata__":{"a":{"b":[1]}}})", 0, "nests deeper"},
      {"too many dims",
       R"({"a":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}})", 1,
       "dimensions"},
  };
  for (const auto& c : cases) {
    const std::string error = parse_error(make_file(c.header, c.data_bytes));
    EXPECT_NE(error.find(c.expected), std::string::npos) << c.what << ": got \"" << error << "\"";
    EXPECT_EQ(error.rfind("bad.safetensors", 0), 0u) << c.what << ": " << error;
  }
  // Errors about one tensor name it.
  EXPECT_NE(parse_error(make_file(cases[3].header, 12)).find("tensor \"w\""), std::string::npos);

  // Header length problems.
  EXPECT_NE(parse_error({}).find("too short"), std::string::npos);
  EXPECT_NE(parse_error({1, 2, 3}).find("too short"), std::string::npos);
  EXPECT_NE(parse_error(make_file("{}", 0, 1000)).find("runs past the end of the file"), std::string::npos);
  EXPECT_NE(parse_error(make_file("{}", 0, ~uint64_t{0})).find("runs past the end"), std::string::npos);
  EXPECT_NE(parse_error(make_file("", 0)).find("not a JSON object"), std::string::npos);
  // Very deep nesting is refused while parsing (no recursion over it, no stack overflow).
  const std::string deep = "{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + "}";
  EXPECT_NE(parse_error(make_file(deep, 0)).find("nests deeper"), std::string::npos);
  // An empty header object with no data is a valid (empty) file; padding spaces are allowed.
  EXPECT_EQ(parse_error(make_file("{}      ", 0)), "");
}

TEST(Safetensors, TruncatedFileIsRefused) {
  TempDir dir("trunc");
  const std::vector<float> a(100, 1.0f);
  const std::string path = dir.str() + "/t.safetensors";
  llm::write_safetensors(path, {{"a", {100}, a.data()}}, SafeDType::kF32);
  std::vector<uint8_t> bytes = read_bytes(path);
  for (size_t cut : {size_t{1}, size_t{3}, size_t{400}, bytes.size() - 9}) {
    std::vector<uint8_t> shorter(bytes.begin(), bytes.end() - static_cast<long>(cut));
    EXPECT_NE(parse_error(shorter), "") << cut;
  }
  fs::resize_file(path, bytes.size() - 2);
  EXPECT_THROW(SafetensorsFile file(path), SafetensorsError);
  EXPECT_THROW(SafetensorsFile file(dir.str() + "/missing.safetensors"), SafetensorsError);
}

TEST(Safetensors, ShardedFolderWithIndex) {
  TempDir dir("shards");
  std::vector<std::vector<float>> data;
  std::vector<llm::SafetensorsWriteTensor> tensors;
  data.reserve(5);
  for (int i = 0; i < 5; ++i) {
    data.emplace_back(10 * (i + 1), static_cast<float>(i));
    tensors.push_back(
        {"t" + std::to_string(i), {static_cast<int64_t>(data.back().size())}, data.back().data()});
  }
  // 40, 80, 120, 160, 200 bytes with a 130-byte limit: [t0 t1] [t2] [t3] [t4] (t3 and t4 exceed it alone).
  const auto files = llm::write_safetensors_folder(dir.str(), tensors, SafeDType::kF32, 130);
  ASSERT_EQ(files.size(), 5u);
  EXPECT_EQ(files[0], "model-00001-of-00004.safetensors");
  EXPECT_EQ(files.back(), "model.safetensors.index.json");
  const llm::SafetensorsFolder folder(dir.str());
  EXPECT_EQ(folder.files().size(), 4u);
  EXPECT_EQ(folder.names().size(), 5u);
  for (int i = 0; i < 5; ++i) {
    std::vector<float> out(data[i].size());
    folder.read("t" + std::to_string(i), out.data(), out.size());
    EXPECT_EQ(out, data[i]);
  }
  std::ifstream index_in(dir.str() + "/model.safetensors.index.json");
  const auto index = nlohmann::json::parse(index_in);
  EXPECT_EQ(index["metadata"]["total_size"], 600);

  // Writing a small model into the same folder replaces the index by a single file.
  llm::write_safetensors_folder(dir.str(), {tensors[0]}, SafeDType::kF32, 130);
  EXPECT_FALSE(fs::exists(dir.str() + "/model.safetensors.index.json"));
  EXPECT_EQ(llm::SafetensorsFolder(dir.str()).names().size(), 1u);
}

TEST(Safetensors, BadIndexesAreRefused) {
  TempDir dir("badindex");
  const std::vector<float> v(4, 1.0f);
  llm::write_safetensors(dir.str() + "/a.safetensors", {{"x", {4}, v.data()}, {"y", {4}, v.data()}},
                         SafeDType::kF32);
  auto error_with_index = [&](const std::string& index) -> std::string {
    std::ofstream(dir.str() + "/model.safetensors.index.json") << index;
    try {
      llm::SafetensorsFolder folder(dir.str());
    } catch (const SafetensorsError& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(error_with_index(R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}})"), "");
  EXPECT_NE(error_with_index(R"({"weight_map": {"x": "a.safetensors"}})").find("\"y\", which"),
            std::string::npos);
  EXPECT_NE(error_with_index(
                R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors", "z": "a.safetensors"}})")
                .find("\"z\" is mapped to a.safetensors, which does not contain it"),
            std::string::npos);
  EXPECT_NE(error_with_index(R"({"weight_map": {"x": "../a.safetensors"}})").find("must name a file"),
            std::string::npos);
  EXPECT_NE(error_with_index(R"({"weight_map": {"x": "missing.safetensors"}})").find("cannot open"),
            std::string::npos);
  EXPECT_NE(error_with_index(R"({"weights": {}})").find("weight_map"), std::string::npos);
  EXPECT_NE(error_with_index("{oops").find("not valid JSON"), std::string::npos);
}

}  // namespace
