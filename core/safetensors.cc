#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "core/autograd.h"
#include "core/files.h"
#include "core/status.h"

namespace lc {
namespace {

// Tensor bytes are copied between memory and file as they are, and the
// format stores them little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");

// The largest header the reference implementation accepts.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr char kMetadataKey[] = "__metadata__";
// A valid header nests three levels; deeper input is rejected before it can
// exhaust the stack.
constexpr int kMaxJsonDepth = 64;

struct DTypeCode {
  DType dtype;
  const char* code;
};
constexpr DTypeCode kDTypeCodes[] = {{DType::kFloat32, "F32"},
                                     {DType::kFloat64, "F64"},
                                     {DType::kBFloat16, "BF16"},
                                     {DType::kInt64, "I64"},
                                     {DType::kUInt8, "U8"}};

const char* CodeOf(DType dtype) {
  for (const DTypeCode& entry : kDTypeCodes) {
    if (entry.dtype == dtype) return entry.code;
  }
  LC_CHECK(false) << "no safetensors code for dtype " << DTypeName(dtype);
  return "";
}

bool DTypeFromCode(absl::string_view code, DType* dtype) {
  for (const DTypeCode& entry : kDTypeCodes) {
    if (code == entry.code) {
      *dtype = entry.dtype;
      return true;
    }
  }
  return false;
}

// A name or value for an error message: quoted, escaped and cut to a
// readable length.
std::string Quote(absl::string_view s) {
  constexpr size_t kMaxShown = 64;
  if (s.size() <= kMaxShown) return absl::StrCat("\"", absl::CEscape(s), "\"");
  return absl::StrCat("\"", absl::CEscape(s.substr(0, kMaxShown)), "\"...");
}

bool IsValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char lead = s[i];
    size_t extra;
    uint32_t code_point;
    uint32_t min_code_point;
    if (lead < 0x80) {
      ++i;
      continue;
    } else if ((lead & 0xE0) == 0xC0) {
      extra = 1, code_point = lead & 0x1F, min_code_point = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      extra = 2, code_point = lead & 0x0F, min_code_point = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      extra = 3, code_point = lead & 0x07, min_code_point = 0x10000;
    } else {
      return false;
    }
    if (s.size() - i <= extra) return false;
    for (size_t k = 1; k <= extra; ++k) {
      const unsigned char continuation = s[i + k];
      if ((continuation & 0xC0) != 0x80) return false;
      code_point = (code_point << 6) | (continuation & 0x3F);
    }
    if (code_point < min_code_point || code_point > 0x10FFFF ||
        (code_point >= 0xD800 && code_point <= 0xDFFF)) {
      return false;
    }
    i += extra + 1;
  }
  return true;
}

void AppendUtf8(uint32_t code_point, std::string* out) {
  if (code_point < 0x80) {
    out->push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else if (code_point < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (code_point >> 18)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

// A JSON string literal for `s` (valid UTF-8, written as is apart from the
// characters JSON requires escaped).
std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppend(
          &out, "\\u00",
          absl::Hex(static_cast<unsigned char>(c), absl::kZeroPad2));
    } else {
      out.push_back(c);
    }
  }
  out.push_back('"');
  return out;
}

struct Json {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };
  Kind kind = Kind::kNull;
  std::string text;  // kString: the decoded string; kNumber, kBool: literal
  std::vector<Json> items;                            // kArray
  std::vector<std::pair<std::string, Json>> members;  // kObject, file order
};

// What a JSON value is, for error messages.
std::string Describe(const Json& value) {
  switch (value.kind) {
    case Json::Kind::kNull:
      return "null";
    case Json::Kind::kBool:
    case Json::Kind::kNumber:
      return value.text;
    case Json::Kind::kString:
      return Quote(value.text);
    case Json::Kind::kArray:
      return absl::StrCat("an array of ", value.items.size(), " values");
    case Json::Kind::kObject:
      return "an object";
  }
  return "";
}

// A strict RFC 8259 parser for the header.
class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : text_(text) {}

  // Parses the text as one JSON value followed by nothing but whitespace.
  // Errors are DataLoss naming the byte where parsing failed.
  absl::StatusOr<Json> Parse() {
    Json value;
    if (!ParseValue(&value, 0)) return absl::DataLossError(error_);
    SkipWhitespace();
    if (pos_ != text_.size()) {
      Fail("unexpected text after the top-level value");
      return absl::DataLossError(error_);
    }
    return value;
  }

 private:
  bool Fail(absl::string_view what) {
    error_ = absl::StrCat("invalid JSON in header at byte ", pos_, ": ", what);
    return false;
  }

  bool AtEnd() const { return pos_ >= text_.size(); }

  void SkipWhitespace() {
    while (!AtEnd() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                        text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(char c) {
    if (AtEnd() || text_[pos_] != c) return false;
    ++pos_;
    return true;
  }

  bool ConsumeDigits() {
    const size_t start = pos_;
    while (!AtEnd() && absl::ascii_isdigit(text_[pos_])) ++pos_;
    return pos_ > start;
  }

  bool ParseValue(Json* out, int depth) {
    if (depth > kMaxJsonDepth) {
      return Fail(
          absl::StrCat("nested deeper than ", kMaxJsonDepth, " levels"));
    }
    SkipWhitespace();
    if (AtEnd()) return Fail("unexpected end, expected a value");
    const char c = text_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->kind = Json::Kind::kString;
      return ParseString(&out->text);
    }
    if (c == '-' || absl::ascii_isdigit(c)) {
      out->kind = Json::Kind::kNumber;
      return ParseNumber(&out->text);
    }
    for (const char* literal : {"true", "false", "null"}) {
      if (absl::StartsWith(text_.substr(pos_), literal)) {
        pos_ += std::strlen(literal);
        out->kind = literal[0] == 'n' ? Json::Kind::kNull : Json::Kind::kBool;
        out->text = literal;
        return true;
      }
    }
    return Fail(absl::StrCat("unexpected character ",
                             Quote(text_.substr(pos_, 1)),
                             ", expected a value"));
  }

  bool ParseObject(Json* out, int depth) {
    out->kind = Json::Kind::kObject;
    ++pos_;  // '{'
    SkipWhitespace();
    if (Consume('}')) return true;
    while (true) {
      SkipWhitespace();
      if (AtEnd() || text_[pos_] != '"') return Fail("expected a string key");
      std::string key;
      if (!ParseString(&key)) return false;
      SkipWhitespace();
      if (!Consume(':')) return Fail("expected ':' after an object key");
      Json value;
      if (!ParseValue(&value, depth + 1)) return false;
      out->members.emplace_back(std::move(key), std::move(value));
      SkipWhitespace();
      if (Consume('}')) return true;
      if (!Consume(',')) return Fail("expected ',' or '}' in an object");
    }
  }

  bool ParseArray(Json* out, int depth) {
    out->kind = Json::Kind::kArray;
    ++pos_;  // '['
    SkipWhitespace();
    if (Consume(']')) return true;
    while (true) {
      Json value;
      if (!ParseValue(&value, depth + 1)) return false;
      out->items.push_back(std::move(value));
      SkipWhitespace();
      if (Consume(']')) return true;
      if (!Consume(',')) return Fail("expected ',' or ']' in an array");
    }
  }

  bool ParseHex4(uint32_t* value) {
    *value = 0;
    for (int i = 0; i < 4; ++i) {
      if (AtEnd() || !absl::ascii_isxdigit(text_[pos_])) {
        return Fail("expected 4 hex digits after \\u");
      }
      const char c = absl::ascii_tolower(text_[pos_++]);
      *value = *value * 16 + (absl::ascii_isdigit(c) ? c - '0' : c - 'a' + 10);
    }
    return true;
  }

  bool ParseString(std::string* out) {
    ++pos_;  // opening quote
    while (true) {
      if (AtEnd()) return Fail("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return true;
      if (static_cast<unsigned char>(c) < 0x20) {
        return Fail("unescaped control character in a string");
      }
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (AtEnd()) return Fail("unterminated string");
      const char escape = text_[pos_++];
      switch (escape) {
        case '"':
        case '\\':
        case '/':
          out->push_back(escape);
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t code_point;
          if (!ParseHex4(&code_point)) return false;
          if (code_point >= 0xDC00 && code_point <= 0xDFFF) {
            return Fail("unpaired UTF-16 low surrogate in a \\u escape");
          }
          if (code_point >= 0xD800 && code_point <= 0xDBFF) {
            uint32_t low;
            if (!Consume('\\') || !Consume('u') || !ParseHex4(&low) ||
                low < 0xDC00 || low > 0xDFFF) {
              return Fail("unpaired UTF-16 high surrogate in a \\u escape");
            }
            code_point =
                0x10000 + ((code_point - 0xD800) << 10) + (low - 0xDC00);
          }
          AppendUtf8(code_point, out);
          break;
        }
        default:
          --pos_;
          return Fail(
              absl::StrCat("invalid escape \\",
                           absl::CEscape(absl::string_view(&escape, 1))));
      }
    }
  }

  bool ParseNumber(std::string* out) {
    const size_t start = pos_;
    Consume('-');
    if (!Consume('0') && !ConsumeDigits()) return Fail("invalid number");
    if (Consume('.') && !ConsumeDigits()) return Fail("invalid number");
    if (Consume('e') || Consume('E')) {
      if (!Consume('+')) Consume('-');
      if (!ConsumeDigits()) return Fail("invalid number");
    }
    *out = std::string(text_.substr(start, pos_ - start));
    return true;
  }

  absl::string_view text_;
  size_t pos_ = 0;
  std::string error_;
};

// The value of a JSON number that is an integer in [0, 2^63).
bool AsNonNegativeInt(const Json& value, int64_t* out) {
  if (value.kind != Json::Kind::kNumber) return false;
  int64_t result = 0;
  for (const char c : value.text) {
    if (!absl::ascii_isdigit(c) ||
        __builtin_mul_overflow(result, 10, &result) ||
        __builtin_add_overflow(result, c - '0', &result)) {
      return false;
    }
  }
  *out = result;
  return true;
}

// One tensor's header entry: where its bytes lie in the data section.
struct TensorEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  Shape shape;
  int64_t begin = 0;  // byte offsets into the data section
  int64_t end = 0;
};

// Parses and checks one tensor entry of the header against a data section
// of `data_size` bytes. Errors are DataLoss naming the tensor.
absl::Status ParseTensorEntry(const std::string& name, const Json& info,
                              int64_t data_size, TensorEntry* entry) {
  auto corrupt = [&name](const auto&... parts) {
    return absl::DataLossError(
        absl::StrCat("tensor ", Quote(name), ": ", parts...));
  };
  if (info.kind != Json::Kind::kObject) {
    return corrupt("entry is ", Describe(info),
                   ", expected an object with dtype, shape and data_offsets");
  }
  const Json* dtype = nullptr;
  const Json* shape = nullptr;
  const Json* offsets = nullptr;
  for (const auto& [key, value] : info.members) {
    const Json** slot = key == "dtype"          ? &dtype
                        : key == "shape"        ? &shape
                        : key == "data_offsets" ? &offsets
                                                : nullptr;
    if (slot == nullptr) {
      return corrupt("unexpected key ", Quote(key),
                     ", expected only dtype, shape and data_offsets");
    }
    if (*slot != nullptr) return corrupt("duplicate key ", Quote(key));
    *slot = &value;
  }
  if (dtype == nullptr) return corrupt("missing key \"dtype\"");
  if (shape == nullptr) return corrupt("missing key \"shape\"");
  if (offsets == nullptr) return corrupt("missing key \"data_offsets\"");

  entry->name = name;
  if (dtype->kind != Json::Kind::kString ||
      !DTypeFromCode(dtype->text, &entry->dtype)) {
    return corrupt("unsupported dtype ", Describe(*dtype),
                   ", expected one of F32, F64, BF16, I64, U8");
  }
  if (shape->kind != Json::Kind::kArray) {
    return corrupt("shape is ", Describe(*shape),
                   ", expected an array of non-negative integers");
  }
  for (size_t i = 0; i < shape->items.size(); ++i) {
    int64_t size;
    if (!AsNonNegativeInt(shape->items[i], &size)) {
      return corrupt("shape[", i, "] is ", Describe(shape->items[i]),
                     ", expected an integer in [0, 2^63)");
    }
    entry->shape.push_back(size);
  }
  int64_t nbytes = DTypeSize(entry->dtype);
  for (const int64_t size : entry->shape) {
    if (__builtin_mul_overflow(nbytes, size, &nbytes)) {
      return corrupt("shape ", ShapeToString(entry->shape), " of ", dtype->text,
                     " needs 2^63 bytes or more");
    }
  }
  if (offsets->kind != Json::Kind::kArray || offsets->items.size() != 2 ||
      !AsNonNegativeInt(offsets->items[0], &entry->begin) ||
      !AsNonNegativeInt(offsets->items[1], &entry->end)) {
    return corrupt("data_offsets is ", Describe(*offsets),
                   ", expected [begin, end] with integers in [0, 2^63)");
  }
  const std::string range =
      absl::StrCat("data_offsets [", entry->begin, ", ", entry->end, "]");
  if (entry->end < entry->begin) {
    return corrupt(range, " end before they begin");
  }
  if (entry->end > data_size) {
    return corrupt(range, " exceed the data section of ", data_size, " bytes");
  }
  if (entry->end - entry->begin != nbytes) {
    return corrupt(range, " span ", entry->end - entry->begin,
                   " bytes, but dtype ", dtype->text, " and shape ",
                   ShapeToString(entry->shape), " need ", nbytes);
  }
  return absl::OkStatus();
}

// Parses the JSON header into tensor entries and metadata. Errors are
// DataLoss describing the problem (the caller adds the path).
absl::Status ParseHeader(absl::string_view header, int64_t data_size,
                         std::vector<TensorEntry>* entries,
                         std::map<std::string, std::string>* metadata) {
  if (!IsValidUtf8(header)) {
    return absl::DataLossError("header is not valid UTF-8");
  }
  LC_ASSIGN_OR_RETURN(const Json root, JsonParser(header).Parse());
  if (root.kind != Json::Kind::kObject) {
    return absl::DataLossError(
        absl::StrCat("header is ", Describe(root), ", expected an object"));
  }
  std::set<absl::string_view> seen;
  for (const auto& [key, value] : root.members) {
    if (!seen.insert(key).second) {
      return absl::DataLossError(
          absl::StrCat("header has key ", Quote(key), " twice"));
    }
    if (key != kMetadataKey) {
      entries->emplace_back();
      LC_RETURN_IF_ERROR(
          ParseTensorEntry(key, value, data_size, &entries->back()));
      continue;
    }
    if (value.kind != Json::Kind::kObject) {
      return absl::DataLossError(absl::StrCat(
          kMetadataKey, " is ", Describe(value), ", expected an object"));
    }
    for (const auto& [name, text] : value.members) {
      if (text.kind != Json::Kind::kString) {
        return absl::DataLossError(
            absl::StrCat(kMetadataKey, " entry ", Quote(name), " is ",
                         Describe(text), ", expected a string"));
      }
      if (!metadata->emplace(name, text.text).second) {
        return absl::DataLossError(
            absl::StrCat(kMetadataKey, " has key ", Quote(name), " twice"));
      }
    }
  }
  return absl::OkStatus();
}

// Sorts `entries` by offset and checks that they tile the data section:
// every byte belongs to exactly one tensor.
absl::Status CheckLayout(int64_t data_size, std::vector<TensorEntry>* entries) {
  std::sort(entries->begin(), entries->end(),
            [](const TensorEntry& a, const TensorEntry& b) {
              return std::tie(a.begin, a.end, a.name) <
                     std::tie(b.begin, b.end, b.name);
            });
  int64_t covered = 0;  // bytes [0, covered) belong to the tensors so far
  const TensorEntry* previous = nullptr;
  for (const TensorEntry& entry : *entries) {
    if (entry.begin < covered) {
      return absl::DataLossError(absl::StrCat(
          "tensors ", Quote(previous->name), " (data_offsets [",
          previous->begin, ", ", previous->end, "]) and ", Quote(entry.name),
          " (data_offsets [", entry.begin, ", ", entry.end, "]) overlap"));
    }
    if (entry.begin > covered) {
      return absl::DataLossError(
          absl::StrCat("bytes [", covered, ", ", entry.begin,
                       ") of the data section belong to no tensor"));
    }
    covered = entry.end;
    previous = &entry;
  }
  if (covered != data_size) {
    return absl::DataLossError(
        absl::StrCat("bytes [", covered, ", ", data_size,
                     ") of the data section belong to no tensor"));
  }
  return absl::OkStatus();
}

using FilePtr = std::unique_ptr<std::FILE, int (*)(std::FILE*)>;

}  // namespace

absl::Status WriteSafetensors(
    const std::string& path, const std::map<std::string, Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  auto invalid = [&path](const auto&... parts) {
    return absl::InvalidArgumentError(
        absl::StrCat("writing safetensors file ", path, ": ", parts...));
  };
  for (const auto& [key, value] : metadata) {
    if (!IsValidUtf8(key) || !IsValidUtf8(value)) {
      return invalid("metadata entry ", Quote(key), " is not valid UTF-8");
    }
  }
  for (const auto& [name, tensor] : tensors) {
    if (name == kMetadataKey) {
      return invalid("a tensor may not be named ", Quote(name),
                     " (reserved for metadata)");
    }
    if (!IsValidUtf8(name)) {
      return invalid("tensor name ", Quote(name), " is not valid UTF-8");
    }
    if (!tensor.defined())
      return invalid("tensor ", Quote(name), " is undefined");
  }

  std::vector<std::pair<std::string, Tensor>> dense;
  LC_RETURN_IF_ERROR(StatusFromCall([&] {
    NoGradGuard no_grad;
    for (const auto& [name, tensor] : tensors) {
      dense.emplace_back(name, tensor.to(Device::Cpu()).contiguous());
    }
  }));

  std::string header = "{";
  if (!metadata.empty()) {
    absl::StrAppend(&header, JsonString(kMetadataKey), ":{");
    const char* separator = "";
    for (const auto& [key, value] : metadata) {
      absl::StrAppend(&header, separator, JsonString(key), ":",
                      JsonString(value));
      separator = ",";
    }
    header += "}";
  }
  std::vector<absl::string_view> data;
  int64_t offset = 0;
  for (const auto& [name, tensor] : dense) {
    const int64_t nbytes = tensor.numel() * DTypeSize(tensor.dtype());
    absl::StrAppend(&header, header.size() > 1 ? "," : "", JsonString(name),
                    ":{\"dtype\":\"", CodeOf(tensor.dtype()), "\",\"shape\":[",
                    absl::StrJoin(tensor.shape(), ","), "],\"data_offsets\":[",
                    offset, ",", offset + nbytes, "]}");
    data.emplace_back(static_cast<const char*>(tensor.raw_data()), nbytes);
    offset += nbytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderBytes) {
    return invalid("header of ", header.size(), " bytes exceeds the limit of ",
                   kMaxHeaderBytes, " bytes");
  }

  const uint64_t header_size = header.size();
  char header_size_bytes[8];
  std::memcpy(header_size_bytes, &header_size, 8);
  std::vector<absl::string_view> chunks = {
      absl::string_view(header_size_bytes, 8), header};
  chunks.insert(chunks.end(), data.begin(), data.end());
  return WriteFileAtomically("safetensors file", path, chunks);
}

absl::StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  auto corrupt = [&path](const auto&... parts) {
    return absl::DataLossError(
        absl::StrCat("safetensors file ", path, ": ", parts...));
  };
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
  // writer; it is refused below like any file that is not a regular one.
  // (O_NONBLOCK changes nothing for reads of a regular file.)
  const int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    return absl::ErrnoToStatus(
        error, absl::StrCat("cannot open safetensors file ", path));
  }
  struct stat info;
  if (fstat(fd, &info) != 0) {
    const int error = errno;
    close(fd);
    return absl::ErrnoToStatus(
        error, absl::StrCat("cannot stat safetensors file ", path));
  }
  if (!S_ISREG(info.st_mode)) {
    close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("safetensors file ", path, " is ",
                     FileTypeName(info.st_mode), " (expected a regular file)"));
  }
  FilePtr file(fdopen(fd, "rb"), &std::fclose);
  if (file == nullptr) {
    const int error = errno;
    close(fd);
    return absl::ErrnoToStatus(
        error, absl::StrCat("cannot open safetensors file ", path));
  }
  const uint64_t file_size = info.st_size;
  auto read_exactly = [&](void* buffer, uint64_t size, uint64_t position) {
    if (size == 0) return absl::OkStatus();
    if (fseeko(file.get(), static_cast<off_t>(position), SEEK_SET) != 0 ||
        std::fread(buffer, 1, size, file.get()) != size) {
      return corrupt("cannot read ", size, " bytes at offset ", position, ": ",
                     std::ferror(file.get()) ? std::strerror(errno)
                                             : "unexpected end of file");
    }
    return absl::OkStatus();
  };

  if (file_size < 8) {
    return corrupt("file has ", file_size,
                   " bytes, too short for the 8-byte header length");
  }
  uint64_t header_size;
  LC_RETURN_IF_ERROR(read_exactly(&header_size, 8, 0));
  if (header_size > kMaxHeaderBytes) {
    return corrupt("header length ", header_size, " exceeds the limit of ",
                   kMaxHeaderBytes, " bytes");
  }
  if (header_size > file_size - 8) {
    return corrupt("header length ", header_size, " exceeds the ",
                   file_size - 8, " bytes after the length field");
  }
  std::string header(header_size, '\0');
  LC_RETURN_IF_ERROR(read_exactly(header.data(), header_size, 8));

  const int64_t data_start = 8 + header_size;
  const int64_t data_size = file_size - data_start;
  SafetensorsFile result;
  std::vector<TensorEntry> entries;
  absl::Status status =
      ParseHeader(header, data_size, &entries, &result.metadata);
  if (status.ok()) status = CheckLayout(data_size, &entries);
  if (!status.ok()) return corrupt(status.message());

  for (const TensorEntry& entry : entries) {
    Tensor tensor;
    LC_RETURN_IF_ERROR(
        StatusFromCall([&] { tensor = Empty(entry.shape, entry.dtype); }));
    LC_RETURN_IF_ERROR(read_exactly(tensor.raw_data(), entry.end - entry.begin,
                                    data_start + entry.begin));
    result.tensors.emplace(entry.name, std::move(tensor));
  }
  return result;
}

}  // namespace lc
