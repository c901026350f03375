#include "engine/model/safetensors.h"

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

// One tensor for the test writer: `gap` zero bytes are inserted before its data, so offsets can
// be made odd (unaligned).
struct Spec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
  size_t gap = 0;
};

template <typename T>
std::vector<uint8_t> Bytes(const std::vector<T>& values) {
  std::vector<uint8_t> out(values.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// Assembles a file from a raw header string (padded with spaces to a multiple of 8) and data.
std::vector<uint8_t> Assemble(std::string header, const std::vector<uint8_t>& data) {
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::vector<uint8_t> file(8 + header.size() + data.size());
  uint64_t n = header.size();
  std::memcpy(file.data(), &n, 8);
  std::memcpy(file.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(file.data() + 8 + header.size(), data.data(), data.size());
  return file;
}

// A minimal safetensors writer: header JSON + space padding + data.
std::vector<uint8_t> Build(const std::vector<Spec>& specs, std::string metadata_json = "") {
  std::vector<std::string> entries;
  if (!metadata_json.empty()) entries.push_back(absl::StrCat("\"__metadata__\":", metadata_json));
  std::vector<uint8_t> data;
  for (const Spec& s : specs) {
    data.resize(data.size() + s.gap, 0);
    size_t begin = data.size();
    data.insert(data.end(), s.data.begin(), s.data.end());
    entries.push_back(absl::StrCat("\"", s.name, "\":{\"dtype\":\"", s.dtype, "\",\"shape\":[",
                                   absl::StrJoin(s.shape, ","), "],\"data_offsets\":[", begin, ",",
                                   data.size(), "]}"));
  }
  return Assemble(absl::StrCat("{", absl::StrJoin(entries, ","), "}"), data);
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           absl::StrCat("safetensors_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Write(const std::string& name, const std::vector<uint8_t>& bytes) {
    std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    return path;
  }

  std::filesystem::path dir_;
};

absl::Status ParseError(const std::vector<uint8_t>& file) {
  return ParseSafetensorsHeader(file, "t.safetensors").status();
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, NamesAndSizesRoundTrip) {
  for (DType d : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3,
                  DType::kF8E5M2, DType::kI64, DType::kI32, DType::kI16, DType::kI8, DType::kU64,
                  DType::kU32, DType::kU16, DType::kU8, DType::kBool}) {
    std::optional<DType> back = DTypeFromName(DTypeName(d));
    ASSERT_TRUE(back.has_value()) << DTypeName(d);
    EXPECT_EQ(*back, d);
  }
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "F8_E4M3");
  EXPECT_FALSE(DTypeFromName("bf16").has_value());
  EXPECT_FALSE(DTypeFromName("F4").has_value());
  EXPECT_EQ(ShapeToString({512, 256}), "[512, 256]");
  EXPECT_EQ(ShapeToString({}), "[]");
}

TEST_F(SafetensorsTest, RoundTripsF32F16Bf16ExactlyAtUnalignedOffsets) {
  const float denorm = std::numeric_limits<float>::denorm_min();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> f32 = {0.0f, -0.0f, -1.5f, 3.25f, denorm, -denorm * 7, inf, -inf, 1e38f};
  // fp16: 0, -0, smallest subnormal, largest subnormal, 1, -2, max, inf, -inf.
  std::vector<uint16_t> f16 = {0x0000, 0x8000, 0x0001, 0x03ff, 0x3c00,
                               0xc000, 0x7bff, 0x7c00, 0xfc00};
  std::vector<float> f16_expected = {
      0.0f, -0.0f, std::ldexp(1.0f, -24), 1023 * std::ldexp(1.0f, -24), 1.0f, -2.0f, 65504.0f,
      inf,  -inf};
  // bf16: 1, -5, smallest subnormal, inf, -inf, 3.140625.
  std::vector<uint16_t> bf16 = {0x3f80, 0xc0a0, 0x0001, 0x7f80, 0xff80, 0x4049};
  std::vector<float> bf16_expected = {1.0f, -5.0f, std::ldexp(1.0f, -133), inf, -inf, 3.140625f};

  std::string path = Write("a.safetensors", Build({{"f32", "F32", {3, 3}, Bytes(f32), 1},
                                                   {"f16", "F16", {9}, Bytes(f16), 2},
                                                   {"bf16", "BF16", {2, 1, 3}, Bytes(bf16), 0}},
                                                  R"({"format":"pt"})"));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  ASSERT_EQ((*file)->tensors().size(), 3u);
  EXPECT_EQ((*file)->tensors()[0].name, "bf16");  // Sorted by name.

  struct Case {
    std::string name;
    std::vector<float> expected;
  };
  for (const Case& c : {Case{"f32", f32}, Case{"f16", f16_expected}, Case{"bf16", bf16_expected}}) {
    const TensorView* t = (*file)->Find(c.name);
    ASSERT_NE(t, nullptr) << c.name;
    EXPECT_NE(reinterpret_cast<uintptr_t>(t->bytes.data()) % 2, 0u) << "offset should be odd";
    EXPECT_EQ(t->numel(), static_cast<int64_t>(c.expected.size()));
    std::vector<float> out(t->numel(), 42.0f);
    ASSERT_TRUE(CopyToFloat32(*t, absl::MakeSpan(out)).ok());
    for (size_t i = 0; i < out.size(); ++i) {
      EXPECT_EQ(FloatBits(out[i]), FloatBits(c.expected[i])) << c.name << "[" << i << "]";
    }
  }
  EXPECT_EQ((*file)->Find("bf16")->shape, (std::vector<int64_t>{2, 1, 3}));
}

TEST(CopyToBf16Test, RoundsToNearestEvenAndConvertsF16) {
  std::vector<float> f32 = {1.0f, BitsToFloat(0x3f808000), BitsToFloat(0x3f818000),
                            BitsToFloat(0x3f808001), -std::numeric_limits<float>::infinity()};
  std::vector<uint8_t> bytes = Bytes(f32);
  TensorView t{"w", DType::kF32, {5}, bytes};
  std::vector<uint16_t> out(5);
  ASSERT_TRUE(CopyToBf16(t, absl::MakeSpan(out)).ok());
  EXPECT_THAT(out, ::testing::ElementsAre(0x3f80, 0x3f80, 0x3f82, 0x3f81, 0xff80));

  std::vector<uint16_t> f16 = {0x3c00, 0x3c01, 0xc500, 0x0001};  // 1, 1+2^-10, -5, 2^-24.
  std::vector<uint8_t> f16_bytes = Bytes(f16);
  TensorView h{"h", DType::kF16, {4}, f16_bytes};
  std::vector<uint16_t> out16(4);
  ASSERT_TRUE(CopyToBf16(h, absl::MakeSpan(out16)).ok());
  EXPECT_THAT(out16, ::testing::ElementsAre(0x3f80, 0x3f80, 0xc0a0, 0x3380));

  std::vector<uint16_t> bf = {0x1234, 0xffff, 0x0001};
  std::vector<uint8_t> bf_bytes = Bytes(bf);
  TensorView b{"b", DType::kBF16, {3}, bf_bytes};
  std::vector<uint16_t> outb(3);
  ASSERT_TRUE(CopyToBf16(b, absl::MakeSpan(outb)).ok());
  EXPECT_EQ(outb, bf);
}

TEST(CopyTest, RejectsOtherDtypesAndSizeMismatches) {
  std::vector<uint8_t> bytes(16, 0);
  std::vector<float> out(4);
  absl::Status s = CopyToFloat32(TensorView{"ids", DType::kI32, {4}, bytes}, absl::MakeSpan(out));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.message(), HasSubstr("'ids'"));
  EXPECT_THAT(s.message(), HasSubstr("I32"));

  std::vector<float> small(3);
  s = CopyToFloat32(TensorView{"w", DType::kF32, {4}, bytes}, absl::MakeSpan(small));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'w'"));

  // Shape says 8 bf16 elements = 16 bytes, but the view has 15 bytes.
  std::vector<float> eight(8);
  s = CopyToFloat32(TensorView{"v", DType::kBF16, {8}, absl::MakeSpan(bytes).subspan(1)},
                    absl::MakeSpan(eight));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  std::vector<uint16_t> eight16(8);
  s = CopyToBf16(TensorView{"v", DType::kF32, {-1, 8}, bytes}, absl::MakeSpan(eight16));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((TensorView{"v", DType::kF32, {-1, 8}, bytes}.numel()), -1);
}

TEST(ParseTest, ScalarsEmptyTensorsAndGaps) {
  std::vector<float> one = {2.5f};
  auto file = Build({{"scalar", "F32", {}, Bytes(one)},
                     {"empty", "F16", {0, 4}, {}},
                     {"ids", "I64", {2}, std::vector<uint8_t>(16, 1), 5}});
  auto header = ParseSafetensorsHeader(file);
  ASSERT_TRUE(header.ok()) << header.status();
  ASSERT_EQ(header->tensors.size(), 3u);
  EXPECT_EQ(header->tensors[0].name, "empty");
  EXPECT_EQ(header->tensors[0].numel, 0u);
  EXPECT_EQ(header->tensors[2].name, "scalar");
  EXPECT_EQ(header->tensors[2].numel, 1u);
  EXPECT_EQ(header->data_offset % 8, 0u);
  EXPECT_EQ(header->data_bytes, 4u + 5u + 16u);
  TensorView v = MakeTensorView(*header, header->tensors[2], file);
  float f = 0;
  ASSERT_TRUE(CopyToFloat32(v, absl::Span<float>(&f, 1)).ok());
  EXPECT_EQ(f, 2.5f);
}

TEST(ParseTest, RejectsBadPrefixAndHeaderLength) {
  absl::Status s = ParseError({1, 2, 3});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("t.safetensors"));
  EXPECT_THAT(s.message(), HasSubstr("shorter than the 8-byte"));

  std::vector<uint8_t> file = Assemble("{}", {});
  uint64_t n = 1000;
  std::memcpy(file.data(), &n, 8);
  EXPECT_THAT(ParseError(file).message(), HasSubstr("header length 1000 exceeds"));
  n = 200'000'000;
  std::memcpy(file.data(), &n, 8);
  EXPECT_THAT(ParseError(file).message(), HasSubstr("limit"));
  n = 1;
  std::memcpy(file.data(), &n, 8);
  EXPECT_THAT(ParseError(file).message(), HasSubstr("too small"));
  n = std::numeric_limits<uint64_t>::max();
  std::memcpy(file.data(), &n, 8);
  EXPECT_FALSE(ParseError(file).ok());
  EXPECT_FALSE(ParseSafetensorsHeader({}).ok());
  EXPECT_TRUE(ParseSafetensorsHeader(Assemble("{}", {})).ok());
}

TEST(ParseTest, RejectsNonJsonAndNonObjectHeaders) {
  EXPECT_THAT(ParseError(Assemble("{not json", {})).message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError(Assemble("[1, 2]", {})).message(), HasSubstr("must be a JSON object"));
  EXPECT_THAT(ParseError(Assemble("{\"a\": 1} x", {})).message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError(Assemble("{\"a\":\"\xff\"}", {})).message(), HasSubstr("not valid JSON"));
  EXPECT_THAT(ParseError(Assemble(R"({"w": [1]})", {})).message(),
              HasSubstr("tensor 'w': entry must be an object"));
  EXPECT_THAT(ParseError(Assemble(R"({"__metadata__": {"k": 1}})", {})).message(),
              HasSubstr("'__metadata__': value of 'k' must be a string"));
  EXPECT_THAT(ParseError(Assemble(R"({"__metadata__": []})", {})).message(),
              HasSubstr("'__metadata__' must be an object"));
}

// Builds a one-tensor header with the given field texts over `data_size` bytes of data.
std::vector<uint8_t> OneTensor(const std::string& dtype, const std::string& shape,
                               const std::string& offsets, size_t data_size) {
  return Assemble(absl::StrCat(R"({"model.w": {"dtype": )", dtype, R"(, "shape": )", shape,
                               R"(, "data_offsets": )", offsets, "}}"),
                  std::vector<uint8_t>(data_size, 0));
}

TEST(ParseTest, RejectsBadTensorFieldsNamingTensorAndField) {
  struct Case {
    std::string dtype, shape, offsets;
    std::string expected;
  };
  const Case cases[] = {
      {R"("Q4")", "[2]", "[0, 4]", "field 'dtype': unknown dtype 'Q4'"},
      {"7", "[2]", "[0, 4]", "field 'dtype' must be a string, got integer"},
      {R"("F16")", "[2, -3]", "[0, 4]", "field 'shape': dimension 1 is negative (-3)"},
      {R"("F16")", "[2.0]", "[0, 4]", "field 'shape': dimension 0 must be an integer, got float"},
      {R"("F16")", "2", "[0, 4]", "field 'shape' must be an array"},
      {R"("F16")", "[4611686018427387904, 4]", "[0, 4]", "overflows"},
      {R"("F16")", "[99999999999999999999]", "[0, 4]", "must be an integer"},
      {R"("F64")", "[2305843009213693952]", "[0, 4]", "byte size"},
      {R"("F16")", "[2]", "[0, 40]", "field 'data_offsets': end 40 is beyond the data section"},
      {R"("F16")", "[2]", "[4, 0]", "field 'data_offsets': begin 4 is after end 0"},
      {R"("F16")", "[2]", "[0, 6]", "field 'data_offsets': range [0, 6) holds 6 bytes"},
      {R"("F16")", "[2]", "[-1, 3]", "begin must be a non-negative integer"},
      {R"("F16")", "[2]", "[0]", "must be an array [begin, end]"},
      {R"("F16")", "[2]", "[0, 4.5]", "end must be a non-negative integer, got float"},
  };
  for (const Case& c : cases) {
    absl::Status s = ParseError(OneTensor(c.dtype, c.shape, c.offsets, 16));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.expected;
    EXPECT_THAT(s.message(), HasSubstr("t.safetensors")) << c.expected;
    EXPECT_THAT(s.message(), HasSubstr("tensor 'model.w'")) << c.expected;
    EXPECT_THAT(s.message(), HasSubstr(c.expected));
  }
  absl::Status s = ParseError(Assemble(R"({"w": {"dtype": "F32", "shape": [1]}})", {}));
  EXPECT_THAT(s.message(), HasSubstr("tensor 'w': missing field 'data_offsets'"));
  s = ParseError(Assemble(R"({"": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})", {}));
  EXPECT_THAT(s.message(), HasSubstr("empty name"));
}

TEST(ParseTest, RejectsOverlapAndDuplicates) {
  std::string header = R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                       R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})";
  absl::Status s = ParseError(Assemble(header, std::vector<uint8_t>(24)));
  EXPECT_THAT(s.message(), HasSubstr("'a' [0, 16) and 'b' [12, 20) overlap"));

  // Identical ranges overlap too; empty ranges never do.
  header = R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},)"
           R"( "b": {"dtype": "I8", "shape": [4], "data_offsets": [4, 8]},)"
           R"( "c": {"dtype": "I8", "shape": [0], "data_offsets": [5, 5]}})";
  EXPECT_THAT(ParseError(Assemble(header, std::vector<uint8_t>(8))).message(),
              HasSubstr("overlap"));

  header = R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},)"
           R"( "a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})";
  s = ParseError(Assemble(header, std::vector<uint8_t>(8)));
  EXPECT_THAT(s.message(), HasSubstr("duplicate key 'a'"));
  // Nested duplicates are errors as well.
  header = R"({"a": {"dtype": "U8", "dtype": "I8", "shape": [4], "data_offsets": [0, 4]}})";
  EXPECT_THAT(ParseError(Assemble(header, std::vector<uint8_t>(8))).message(),
              HasSubstr("duplicate key 'dtype'"));
  // The same key in sibling objects is fine.
  header = R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},)"
           R"( "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}})";
  EXPECT_TRUE(ParseSafetensorsHeader(Assemble(header, std::vector<uint8_t>(8))).ok());
}

TEST_F(SafetensorsTest, OpenReportsTruncatedEmptyMissingAndDirectory) {
  std::vector<float> v(16, 1.0f);
  std::vector<uint8_t> full = Build({{"w", "F32", {16}, Bytes(v)}});
  std::vector<uint8_t> truncated(full.begin(), full.end() - 10);
  std::string path = Write("trunc.safetensors", truncated);
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(file.status().message(), HasSubstr(path));
  EXPECT_THAT(file.status().message(), HasSubstr("tensor 'w'"));
  EXPECT_THAT(file.status().message(), HasSubstr("beyond the data section"));

  std::string empty = Write("empty.safetensors", {});
  file = SafetensorsFile::Open(empty);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(file.status().message(), HasSubstr("empty"));
  EXPECT_THAT(file.status().message(), HasSubstr(empty));

  std::string missing = (dir_ / "nope.safetensors").string();
  file = SafetensorsFile::Open(missing);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(file.status().message(), HasSubstr(missing));

  EXPECT_EQ(SafetensorsFile::Open(dir_.string()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsTest, GetAndMappedFileMove) {
  std::vector<float> v = {1, 2, 3};
  std::string path = Write("m.safetensors", Build({{"w", "F32", {3}, Bytes(v)}}));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->Get("w").ok());
  absl::Status missing = (*file)->Get("x").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr("'x'"));
  EXPECT_THAT(missing.message(), HasSubstr(path));

  auto mapped = MappedFile::Open(path);
  ASSERT_TRUE(mapped.ok());
  const uint8_t* data = mapped->bytes().data();
  MappedFile moved = std::move(*mapped);
  EXPECT_EQ(moved.bytes().data(), data);
  EXPECT_TRUE(mapped->bytes().empty());
  MappedFile assigned;
  assigned = std::move(moved);
  EXPECT_EQ(assigned.bytes().data(), data);
  EXPECT_EQ(assigned.path(), path);
  EXPECT_TRUE(ParseSafetensorsHeader(assigned.bytes()).ok());
}

}  // namespace
}  // namespace sieve::engine
