#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "gtest/gtest.h"

namespace lc {
namespace {

using ::testing::TempDir;

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64,
                                DType::kBFloat16, DType::kInt64, DType::kUInt8};

std::string TempPath(const std::string& name) {
  return absl::StrCat(TempDir(), "/", name);
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// A safetensors file: `header_size` as 8 little-endian bytes, then `header`
// and `data` as they are.
std::string FileBytes(uint64_t header_size, const std::string& header,
                      const std::string& data) {
  std::string bytes(8, '\0');
  std::memcpy(bytes.data(), &header_size, 8);
  return bytes + header + data;
}
std::string FileBytes(const std::string& header, const std::string& data) {
  return FileBytes(header.size(), header, data);
}

// Random values of any dtype: normal draws for floating dtypes, integers
// spread over a wide range for int64 and over [0, 255] for uint8.
Tensor RandomTensor(const Shape& shape, DType dtype, Generator& gen) {
  if (IsFloating(dtype)) return Randn(shape, gen, dtype);
  std::vector<double> values = Randn(shape, gen, DType::kFloat64).ToVector();
  for (double& v : values) {
    v = dtype == DType::kInt64
            ? std::round(v * 1e12)
            : std::clamp(std::round(v * 40 + 128), 0.0, 255.0);
  }
  return FromVector(values, shape, dtype);
}

// A [rows, n] view of the 1-D tensor `row` with row stride 0.
Tensor RepeatRows(const Tensor& row, int64_t rows) {
  auto impl = std::make_shared<TensorImpl>(row.impl());
  impl->shape = {rows, row.size(0)};
  impl->strides = {0, row.stride(0)};
  return Tensor(std::move(impl));
}

// The elements of `t` in row-major order as raw bytes.
std::string DenseBytes(const Tensor& t) {
  const Tensor dense = t.contiguous();
  return std::string(static_cast<const char*>(dense.raw_data()),
                     dense.numel() * DTypeSize(dense.dtype()));
}

void ExpectSameTensor(const std::string& name, const Tensor& expected,
                      const Tensor& actual) {
  SCOPED_TRACE(name);
  ASSERT_TRUE(actual.defined());
  EXPECT_EQ(ShapeToString(actual.shape()), ShapeToString(expected.shape()));
  EXPECT_EQ(DTypeName(actual.dtype()), DTypeName(expected.dtype()));
  EXPECT_TRUE(actual.device().is_cpu());
  EXPECT_TRUE(actual.is_contiguous());
  EXPECT_FALSE(actual.requires_grad());
  EXPECT_EQ(DenseBytes(actual), DenseBytes(expected));
}

std::vector<std::string> TempFilesFor(const std::string& path) {
  const std::filesystem::path target(path);
  std::vector<std::string> found;
  for (const auto& entry :
       std::filesystem::directory_iterator(target.parent_path())) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, target.filename().string() + ".tmp")) {
      found.push_back(name);
    }
  }
  return found;
}

// Expects that reading `path` fails with DataLoss naming the path and
// containing `problem`.
void ExpectDataLoss(const std::string& path, const std::string& problem) {
  const absl::StatusOr<SafetensorsFile> result = ReadSafetensors(path);
  ASSERT_FALSE(result.ok()) << "expected an error containing: " << problem;
  EXPECT_EQ(result.status().code(), absl::StatusCode::kDataLoss)
      << result.status();
  EXPECT_TRUE(absl::StrContains(result.status().message(), path))
      << result.status();
  EXPECT_TRUE(absl::StrContains(result.status().message(), problem))
      << result.status() << "\nexpected to contain: " << problem;
}

TEST(SafetensorsTest, RoundTripsEveryDTypeAndLayout) {
  Generator gen(101);
  for (const DType dtype : kAllDTypes) {
    SCOPED_TRACE(DTypeName(dtype));
    const Tensor base = RandomTensor({3, 6}, dtype, gen);
    const std::map<std::string, Tensor> tensors = {
        {"dense", base},
        {"transposed", base.transpose(0, 1)},
        {"sliced", base.slice(1, 1, 6, 2)},
        {"broadcast", RepeatRows(RandomTensor({4}, dtype, gen), 3)},
        {"scalar", RandomTensor({}, dtype, gen)},
        {"empty", Empty({0, 5}, dtype)},
        {"rank3", RandomTensor({2, 3, 4}, dtype, gen).permute({2, 0, 1})},
    };
    ASSERT_FALSE(tensors.at("transposed").is_contiguous());
    ASSERT_FALSE(tensors.at("sliced").is_contiguous());
    ASSERT_NE(tensors.at("sliced").offset(), 0);
    ASSERT_FALSE(tensors.at("broadcast").is_contiguous());

    const std::string path = TempPath(absl::StrCat(DTypeName(dtype), ".st"));
    ASSERT_TRUE(WriteSafetensors(path, tensors).ok());
    const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
    ASSERT_TRUE(file.ok()) << file.status();
    ASSERT_EQ(file->tensors.size(), tensors.size());
    for (const auto& [name, tensor] : tensors) {
      ASSERT_EQ(file->tensors.count(name), 1) << name;
      ExpectSameTensor(name, tensor, file->tensors.at(name));
    }
    EXPECT_TRUE(file->metadata.empty());
    EXPECT_TRUE(TempFilesFor(path).empty());
  }
}

TEST(SafetensorsTest, RoundTripsFloatBitPatterns) {
  const std::vector<float> values = {std::numeric_limits<float>::quiet_NaN(),
                                     std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(),
                                     -0.0f,
                                     std::numeric_limits<float>::denorm_min(),
                                     std::numeric_limits<float>::max()};
  Tensor t = Empty({static_cast<int64_t>(values.size())}, DType::kFloat32);
  std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(float));
  const std::string path = TempPath("bits.st");
  ASSERT_TRUE(WriteSafetensors(path, {{"t", t}}).ok());
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(DenseBytes(file->tensors.at("t")), DenseBytes(t));
}

TEST(SafetensorsTest, RoundTripsMetadataAndNames) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"quotes \" and \\ backslash", "line\nbreak\ttab\x01\x1f"},
      {"unicode", "\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80"},
      {"", "empty key"},
      {"empty value", ""},
  };
  const std::map<std::string, Tensor> tensors = {
      {"blocks.0.attn.q_proj.weight", Ones({2, 2})},
      {"name with \"quote\" and \xc3\xa9", Zeros({1})},
  };
  const std::string path = TempPath("metadata.st");
  ASSERT_TRUE(WriteSafetensors(path, tensors, metadata).ok());
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata, metadata);
  for (const auto& [name, tensor] : tensors) {
    ASSERT_EQ(file->tensors.count(name), 1) << name;
    ExpectSameTensor(name, tensor, file->tensors.at(name));
  }
}

TEST(SafetensorsTest, WritesTheReferenceLayout) {
  const Tensor b = FromVector({1.5, -2}, {2}, DType::kFloat32);
  const Tensor a = FromVector({7}, {}, DType::kUInt8);
  const std::string path = TempPath("layout.st");
  ASSERT_TRUE(WriteSafetensors(path, {{"b", b}, {"a", a}}, {{"k", "v"}}).ok());

  // Metadata first, then the tensors sorted by name, their data in the same
  // order; the header is padded with spaces to a multiple of 8 bytes.
  const std::string header =
      "{\"__metadata__\":{\"k\":\"v\"},"
      "\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]}}";
  const std::string padded = header + std::string(8 - header.size() % 8, ' ');
  ASSERT_EQ(padded.size() % 8, 0u);
  EXPECT_EQ(ReadBytes(path), FileBytes(padded, DenseBytes(a) + DenseBytes(b)));
}

TEST(SafetensorsTest, ReadsFilesWrittenByPythonSafetensors) {
  // Written by tests/data/make_safetensors_golden.py with
  // safetensors.numpy.save_file.
  const absl::StatusOr<SafetensorsFile> file =
      ReadSafetensors("tests/data/golden.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"note", "golden \"file\" \xc3\xa9"}};
  EXPECT_EQ(file->metadata, metadata);
  ASSERT_EQ(file->tensors.size(), 6u);

  const Tensor& f32 = file->tensors.at("f32");
  EXPECT_EQ(f32.dtype(), DType::kFloat32);
  EXPECT_EQ(f32.shape(), (Shape{2, 3}));
  EXPECT_EQ(f32.ToVector(),
            (std::vector<double>{0.5, -1.25, 3.0, static_cast<float>(1e-3),
                                 -0.0, 65504.0}));
  EXPECT_TRUE(std::signbit(f32.at({1, 1})));

  const Tensor& f64 = file->tensors.at("f64");
  EXPECT_EQ(f64.dtype(), DType::kFloat64);
  EXPECT_EQ(f64.ToVector(), (std::vector<double>{1.0 / 3.0, -2.5, 1e300}));

  const Tensor& i64 = file->tensors.at("i64");
  EXPECT_EQ(i64.dtype(), DType::kInt64);
  EXPECT_EQ(i64.shape(), (Shape{2, 2}));
  const int64_t* i64_data = i64.data<int64_t>();
  EXPECT_EQ(
      std::vector<int64_t>(i64_data, i64_data + 4),
      (std::vector<int64_t>{-(int64_t{1} << 40), -1, 0, int64_t{1} << 62}));

  const Tensor& u8 = file->tensors.at("u8");
  EXPECT_EQ(u8.dtype(), DType::kUInt8);
  EXPECT_EQ(u8.ToVector(), (std::vector<double>{0, 1, 128, 255}));

  const Tensor& scalar = file->tensors.at("scalar");
  EXPECT_EQ(scalar.shape(), Shape{});
  EXPECT_EQ(scalar.item(), 7.0);

  const Tensor& empty = file->tensors.at("empty");
  EXPECT_EQ(empty.shape(), (Shape{0, 4}));
  EXPECT_EQ(empty.dtype(), DType::kFloat32);

  // Written back by the C++ writer and read again, nothing changes.
  const std::string path = TempPath("golden_copy.st");
  ASSERT_TRUE(WriteSafetensors(path, file->tensors, file->metadata).ok());
  const absl::StatusOr<SafetensorsFile> copy = ReadSafetensors(path);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ(copy->metadata, file->metadata);
  for (const auto& [name, tensor] : file->tensors) {
    ExpectSameTensor(name, tensor, copy->tensors.at(name));
  }
}

TEST(SafetensorsTest, ReadsBFloat16GoldenFile) {
  // Written by tests/data/make_safetensors_golden.py by hand (numpy has no
  // bfloat16) and checked there with safetensors.safe_open.
  const absl::StatusOr<SafetensorsFile> file =
      ReadSafetensors("tests/data/golden_bf16.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const Tensor& bf16 = file->tensors.at("bf16");
  EXPECT_EQ(bf16.dtype(), DType::kBFloat16);
  EXPECT_EQ(bf16.shape(), (Shape{2, 2}));
  EXPECT_EQ(bf16.ToVector(),
            (std::vector<double>{1.0, -3.0, 0.333984375,
                                 -std::numeric_limits<double>::infinity()}));
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.st");
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(file.status().message(), path))
      << file.status();
}

TEST(SafetensorsTest, DirectoryIsNotAFile) {
  const std::string path = TempPath("a_directory");
  std::filesystem::create_directories(path);
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(absl::StrContains(file.status().message(), path))
      << file.status();
}

TEST(SafetensorsTest, FifoIsRefusedWithoutWaitingForAWriter) {
  const std::string path = TempPath("a_fifo");
  std::remove(path.c_str());
  ASSERT_EQ(mkfifo(path.c_str(), 0600), 0) << std::strerror(errno);
  auto read = std::async(std::launch::async,
                         [&] { return ReadSafetensors(path).status(); });
  if (read.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "ReadSafetensors waits for a writer of the FIFO";
    close(open(path.c_str(), O_WRONLY));  // lets the blocked open return
  }
  const absl::Status status = read.get();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "is a FIFO")) << status;
}

TEST(SafetensorsTest, RejectsBadHeaderLengths) {
  const std::string path = TempPath("bad_length.st");
  WriteBytes(path, "");
  ExpectDataLoss(path, "file has 0 bytes, too short for the 8-byte header");
  WriteBytes(path, "1234567");
  ExpectDataLoss(path, "file has 7 bytes");
  WriteBytes(path, FileBytes(1000, "{}", "0123456789"));
  ExpectDataLoss(path,
                 "header length 1000 exceeds the 12 bytes after the length");
  WriteBytes(path, FileBytes(200'000'000, "{}", ""));
  ExpectDataLoss(path, "header length 200000000 exceeds the limit of");
  WriteBytes(path, FileBytes(~uint64_t{0}, "{}", ""));
  ExpectDataLoss(path, "header length 18446744073709551615 exceeds the limit");
  WriteBytes(path, FileBytes("", ""));
  ExpectDataLoss(path, "unexpected end, expected a value");
}

struct CorruptHeaderCase {
  std::string header;
  int64_t data_size;
  std::string problem;
};

TEST(SafetensorsTest, RejectsCorruptHeaders) {
  const std::string f32_2 =
      "{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  const std::vector<CorruptHeaderCase> cases = {
      {"{\"a\":", 0, "invalid JSON in header at byte 5: unexpected end"},
      {"{\"a\" 1}", 0, "expected ':' after an object key"},
      {"{\"a\":{}} x", 0, "unexpected text after the top-level value"},
      {"{'a':1}", 0, "expected a string key"},
      {"{\"a\":[1 2]}", 0, "expected ',' or ']' in an array"},
      {"{\"a\":tru}", 0, "unexpected character \"t\""},
      {"{\"a\":01}", 0, "expected ',' or '}' in an object"},
      {"{\"a\":-}", 0, "invalid number"},
      {"{\"a\\q\":1}", 0, "invalid escape \\q"},
      {"{\"\\ud800\":1}", 0, "unpaired UTF-16 high surrogate"},
      {"{\"\\udc00\":1}", 0, "unpaired UTF-16 low surrogate"},
      {"{\"a\\u12\":1}", 0, "expected 4 hex digits"},
      {"{\"a\nb\":1}", 0, "unescaped control character"},
      {"{\"\xff\":1}", 0, "header is not valid UTF-8"},
      {"{\"\xc0\xaf\":1}", 0, "header is not valid UTF-8"},
      {"{\"a\":" + std::string(100000, '['), 0, "nested deeper than 64"},
      {"[1,2]", 0, "header is an array of 2 values, expected an object"},
      {"\"text\"", 0, "header is \"text\", expected an object"},
      {"{\"a\":1}", 0, "tensor \"a\": entry is 1, expected an object"},
      {"{\"a\":{\"shape\":[],\"data_offsets\":[0,4]}}", 4,
       "tensor \"a\": missing key \"dtype\""},
      {"{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4,
       "tensor \"a\": missing key \"shape\""},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[]}}", 4,
       "tensor \"a\": missing key \"data_offsets\""},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],"
       "\"foo\":1}}",
       4, "tensor \"a\": unexpected key \"foo\""},
      {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[],"
       "\"data_offsets\":[0,4]}}",
       4, "tensor \"a\": duplicate key \"dtype\""},
      {"{\"a\":" + f32_2 + ",\"a\":" + f32_2 + "}", 8,
       "header has key \"a\" twice"},
      {"{\"a\":{\"dtype\":\"F16\",\"shape\":[],\"data_offsets\":[0,2]}}", 2,
       "tensor \"a\": unsupported dtype \"F16\", expected one of F32, F64, "
       "BF16, I64, U8"},
      {"{\"a\":{\"dtype\":4,\"shape\":[],\"data_offsets\":[0,4]}}", 4,
       "unsupported dtype 4"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
       "tensor \"a\": shape[0] is -1, expected an integer in [0, 2^63)"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,2.0],\"data_offsets\":[0,8]}}",
       8, "shape[1] is 2.0, expected an integer"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1e3],\"data_offsets\":[0,8]}}", 8,
       "shape[0] is 1e3, expected an integer"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],"
       "\"data_offsets\":[0,8]}}",
       8, "shape[0] is 99999999999999999999, expected an integer"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", 8,
       "shape is \"2\", expected an array"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],"
       "\"data_offsets\":[0,8]}}",
       8, "shape [4294967296, 4294967296, 4] of F32 needs 2^63 bytes or more"},
      {"{\"a\":{\"dtype\":\"U8\",\"shape\":[3037000500,3037000500],"
       "\"data_offsets\":[0,8]}}",
       8, "needs 2^63 bytes or more"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8,
       "data_offsets is an array of 1 values, expected [begin, end]"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,-8]}}", 8,
       "data_offsets is an array of 2 values, expected [begin, end]"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":{}}}", 8,
       "data_offsets is an object"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8,
       "data_offsets [8, 0] end before they begin"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}",
       8, "data_offsets [0, 400] exceed the data section of 8 bytes"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
       "data_offsets [0, 4] span 4 bytes, but dtype F32 and shape [2] need "
       "8"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
       12,
       "tensors \"a\" (data_offsets [0, 8]) and \"b\" (data_offsets [4, 12]) "
       "overlap"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
       "\"b\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
       8, "overlap"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
       "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
       12, "bytes [4, 8) of the data section belong to no tensor"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
       "bytes [0, 4) of the data section belong to no tensor"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8,
       "bytes [4, 8) of the data section belong to no tensor"},
      {"{}", 3, "bytes [0, 3) of the data section belong to no tensor"},
      {"{\"__metadata__\":[]}", 0,
       "__metadata__ is an array of 0 values, expected an object"},
      {"{\"__metadata__\":{\"k\":1}}", 0,
       "__metadata__ entry \"k\" is 1, expected a string"},
      {"{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0,
       "__metadata__ has key \"k\" twice"},
      {"{\"__metadata__\":{},\"__metadata__\":{}}", 0,
       "header has key \"__metadata__\" twice"},
  };
  const std::string path = TempPath("corrupt_header.st");
  for (const CorruptHeaderCase& c : cases) {
    SCOPED_TRACE(c.header.substr(0, 200));
    WriteBytes(path, FileBytes(c.header, std::string(c.data_size, '\0')));
    ExpectDataLoss(path, c.problem);
  }
}

TEST(SafetensorsTest, AcceptsEmptyAndZeroSizedTensorsAtAnyOffset) {
  // Zero-sized tensors may share an offset with the start of another tensor,
  // in either header order (as Python's safetensors writes them).
  const std::string header =
      "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
      "\"c\":{\"dtype\":\"I64\",\"shape\":[0],\"data_offsets\":[0,0]}}";
  const std::string path = TempPath("zero_sized.st");
  const float value = 2.5f;
  WriteBytes(
      path, FileBytes(header, std::string(reinterpret_cast<const char*>(&value),
                                          sizeof(value))));
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->tensors.at("a").shape(), (Shape{0, 3}));
  EXPECT_EQ(file->tensors.at("b").item(), 2.5);
  EXPECT_EQ(file->tensors.at("c").numel(), 0);

  WriteBytes(path, FileBytes("{}", ""));
  const absl::StatusOr<SafetensorsFile> empty = ReadSafetensors(path);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tensors.empty());
}

// A small valid file with several dtypes and metadata.
std::string SmallValidFile(const std::string& path) {
  Generator gen(202);
  const std::map<std::string, Tensor> tensors = {
      {"weight", RandomTensor({3, 2}, DType::kFloat32, gen)},
      {"bias", RandomTensor({2}, DType::kBFloat16, gen)},
      {"ids", RandomTensor({3}, DType::kInt64, gen)},
      {"mask", RandomTensor({2, 2}, DType::kUInt8, gen)},
      {"empty", Empty({0}, DType::kFloat64)},
  };
  EXPECT_TRUE(WriteSafetensors(path, tensors, {{"step", "12"}}).ok());
  return ReadBytes(path);
}

TEST(SafetensorsTest, RejectsEveryTruncation) {
  const std::string path = TempPath("truncated.st");
  const std::string valid = SmallValidFile(path);
  ASSERT_TRUE(ReadSafetensors(path).ok());
  for (size_t length = 0; length < valid.size(); ++length) {
    SCOPED_TRACE(
        absl::StrCat("truncated to ", length, " of ", valid.size(), " bytes"));
    WriteBytes(path, valid.substr(0, length));
    const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_TRUE(absl::StrContains(file.status().message(), path))
        << file.status();
  }
}

TEST(SafetensorsTest, SurvivesEveryBitFlipInTheHeader) {
  const std::string path = TempPath("flipped.st");
  const std::string valid = SmallValidFile(path);
  uint64_t header_size;
  std::memcpy(&header_size, valid.data(), 8);
  ASSERT_LT(8 + header_size, valid.size());
  int rejected = 0;
  for (size_t byte = 0; byte < 8 + header_size; ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string corrupt = valid;
      corrupt[byte] = static_cast<char>(corrupt[byte] ^ (1 << bit));
      WriteBytes(path, corrupt);
      const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
      if (file.ok()) continue;  // e.g. a changed letter in a name
      ++rejected;
      ASSERT_EQ(file.status().code(), absl::StatusCode::kDataLoss)
          << "byte " << byte << " bit " << bit << ": " << file.status();
      ASSERT_TRUE(absl::StrContains(file.status().message(), path))
          << file.status();
    }
  }
  // Every flip of the length field and of the JSON structure is caught.
  EXPECT_GT(rejected, static_cast<int>(8 * 8 + header_size));
}

TEST(SafetensorsTest, OverwritesAtomically) {
  const std::string path = TempPath("overwrite.st");
  ASSERT_TRUE(WriteSafetensors(path, {{"x", Ones({100})}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"y", Zeros({2})}}).ok());
  const absl::StatusOr<SafetensorsFile> file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->tensors.count("x"), 0);
  EXPECT_EQ(file->tensors.at("y").ToVector(), (std::vector<double>{0, 0}));
  EXPECT_TRUE(TempFilesFor(path).empty());
}

TEST(SafetensorsTest, WriteErrorsNameThePath) {
  const std::string missing_dir = TempPath("no_such_dir/x.st");
  absl::Status status = WriteSafetensors(missing_dir, {{"x", Ones({1})}});
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), missing_dir)) << status;

  const std::string directory = TempPath("existing_dir");
  std::filesystem::create_directories(directory);
  status = WriteSafetensors(directory, {{"x", Ones({1})}});
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), directory)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "is a directory")) << status;
  EXPECT_TRUE(TempFilesFor(directory).empty());

  const std::string path = TempPath("invalid.st");
  status = WriteSafetensors(path, {{"undefined", Tensor()}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(
      absl::StrContains(status.message(), "tensor \"undefined\" is undefined"))
      << status;

  status = WriteSafetensors(path, {{"__metadata__", Ones({1})}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "reserved for metadata"))
      << status;

  status = WriteSafetensors(path, {{"x", Ones({1})}}, {{"k", "\xff"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(),
                                "metadata entry \"k\" is not valid UTF-8"))
      << status;
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(SafetensorsTest, FailedWriteKeepsTheOldFile) {
  // A file size limit makes writes fail as a full disk would (EFBIG instead
  // of ENOSPC): the error names the path, the old file stays and the
  // temporary file is removed.
  const std::string path = TempPath("full_disk.st");
  ASSERT_TRUE(WriteSafetensors(path, {{"old", Ones({4})}}).ok());
  const std::string old_bytes = ReadBytes(path);

  const auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit previous_limit;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &previous_limit), 0);
  rlimit small_limit = previous_limit;
  small_limit.rlim_cur = 64 * 1024;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small_limit), 0);
  const absl::Status status =
      WriteSafetensors(path, {{"new", Zeros({1 << 20})}});
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &previous_limit), 0);
  std::signal(SIGXFSZ, previous_handler);

  EXPECT_FALSE(status.ok());
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "writing")) << status;
  EXPECT_EQ(ReadBytes(path), old_bytes);
  EXPECT_TRUE(TempFilesFor(path).empty());
}

// The rename that replaces the target would replace a device node (as root,
// /dev/full became a regular file) or a FIFO: both are refused, and the
// node stays as it was. A symbolic link to /dev/full stands for the device,
// so that no test, even of broken code, can replace the real one.
TEST(SafetensorsTest, RefusesTargetsThatAreNotRegularFiles) {
  const std::string fifo = TempPath("out_fifo");
  std::remove(fifo.c_str());
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  const std::string device = TempPath("out_device");
  std::remove(device.c_str());
  ASSERT_EQ(symlink("/dev/full", device.c_str()), 0) << std::strerror(errno);

  for (const auto& [path, kind] :
       {std::pair<std::string, std::string>{fifo, "is a FIFO"},
        {device, "is a character device"}}) {
    const absl::Status status = WriteSafetensors(path, {{"x", Ones({4})}});
    EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
    EXPECT_TRUE(absl::StrContains(status.message(), kind)) << status;
    EXPECT_TRUE(TempFilesFor(path).empty());
  }
  struct stat info;
  ASSERT_EQ(lstat(fifo.c_str(), &info), 0);
  EXPECT_TRUE(S_ISFIFO(info.st_mode));
  ASSERT_EQ(lstat(device.c_str(), &info), 0);
  EXPECT_TRUE(S_ISLNK(info.st_mode));
}

}  // namespace
}  // namespace lc
