// The safetensors reader (mmap + full header validation), the atomic writer,
// and the sharded-checkpoint loader declared in unswag/safetensors.h.
#include "unswag/safetensors.h"

#include "models/file_io.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader does not byte-swap"
#endif

namespace unswag::safetensors {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, before
// allocating or parsing anything of that size.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeEntry {
  const char* name;
  at::ScalarType type;
};

// Names as the Python library spells them (safetensors/torch.py, _TYPES).
const std::vector<DtypeEntry>& dtype_table() {
  static const std::vector<DtypeEntry> table = {
      {"BOOL", at::kBool},
      {"U8", at::kByte},
      {"I8", at::kChar},
      {"I16", at::kShort},
      {"U16", at::kUInt16},
      {"I32", at::kInt},
      {"U32", at::kUInt32},
      {"I64", at::kLong},
      {"U64", at::kUInt64},
      {"F16", at::kHalf},
      {"BF16", at::kBFloat16},
      {"F32", at::kFloat},
      {"F64", at::kDouble},
      {"C64", at::kComplexFloat},
      {"F8_E4M3", at::kFloat8_e4m3fn},
      {"F8_E5M2", at::kFloat8_e5m2},
      {"F8_E4M3FNUZ", at::kFloat8_e4m3fnuz},
      {"F8_E5M2FNUZ", at::kFloat8_e5m2fnuz},
  };
  return table;
}

std::string supported_dtypes() {
  std::string s;
  for (const auto& e : dtype_table()) s += (s.empty() ? "" : " ") + std::string(e.name);
  return s;
}

using io::errno_text;
using io::exists;
using io::join;

using io::Fd;

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// nlohmann keeps the last of duplicate keys silently; a duplicate tensor name
// would then hide a tensor, so the parse callback rejects duplicates at every
// object level (tensor names, entry fields, metadata keys).
json parse_header(const std::string& path, const char* begin, const char* end) {
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event, json& value) {
    switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(value.get<std::string>()).second && duplicate.empty())
          duplicate = value.get<std::string>();
        break;
      default:
        break;
    }
    return true;
  };
  json header;
  try {
    header = json::parse(begin, end, on_event);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "safetensors: ", path, ": header is not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(duplicate.empty(), "safetensors: ", path, ": duplicate key \"", duplicate,
              "\" in the header (duplicate tensor names or fields are not allowed)");
  TORCH_CHECK(header.is_object(), "safetensors: ", path, ": header must be a JSON object, got ", header.type_name());
  return header;
}

uint64_t checked_mul(uint64_t a, uint64_t b, const std::string& path, const std::string& name) {
  uint64_t r = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), "safetensors: ", path, ": tensor \"", name,
              "\": size overflows 64 bits");
  return r;
}

TensorInfo parse_entry(const std::string& path, const std::string& name, const json& entry) {
  const std::string where = "safetensors: " + path + ": tensor \"" + name + "\"";
  TORCH_CHECK(entry.is_object(), where, ": entry must be a JSON object, got ", entry.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"})
    TORCH_CHECK(entry.contains(field), where, ": entry is missing \"", field, "\"");

  TensorInfo info;
  info.name = name;
  const json& dtype = entry.at("dtype");
  TORCH_CHECK(dtype.is_string(), where, ": \"dtype\" must be a string");
  info.dtype = dtype.get<std::string>();

  const json& shape = entry.at("shape");
  TORCH_CHECK(shape.is_array(), where, ": \"shape\" must be an array of non-negative integers");
  uint64_t numel = 1;
  for (const json& d : shape) {
    TORCH_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= uint64_t(INT64_MAX), where,
                ": \"shape\" must be an array of non-negative integers, got ", shape.dump());
    info.shape.push_back(int64_t(d.get<uint64_t>()));
    numel = checked_mul(numel, d.get<uint64_t>(), path, name);
  }

  const json& offsets = entry.at("data_offsets");
  TORCH_CHECK(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
                  offsets[1].is_number_unsigned(),
              where, ": \"data_offsets\" must be [begin, end] with non-negative integers, got ", offsets.dump());
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  TORCH_CHECK(info.end >= info.begin, where, ": data_offsets [", info.begin, ", ", info.end,
              "] end before begin");

  // The dtype check comes after the structural ones so that the message about
  // an unknown dtype is not masked, and before the size check that needs it.
  at::ScalarType type;
  try {
    type = scalar_type(info.dtype);
  } catch (const c10::Error&) {
    TORCH_CHECK(false, where, ": unsupported dtype \"", info.dtype, "\" (supported: ", supported_dtypes(), ")");
  }
  const uint64_t expected = checked_mul(numel, c10::elementSize(type), path, name);
  TORCH_CHECK(info.end - info.begin == expected, where, ": byte size ", info.end - info.begin,
              " (data_offsets [", info.begin, ", ", info.end, "]) does not match shape ", shape.dump(), " of ",
              info.dtype, " (", expected, " bytes)");
  return info;
}

}  // namespace

std::string dtype_name(at::ScalarType type) {
  for (const auto& e : dtype_table())
    if (e.type == type) return e.name;
  TORCH_CHECK(false, "safetensors: dtype ", type, " is not supported (supported: ", supported_dtypes(), ")");
}

at::ScalarType scalar_type(const std::string& dtype) {
  for (const auto& e : dtype_table())
    if (dtype == e.name) return e.type;
  TORCH_CHECK(false, "safetensors: unsupported dtype \"", dtype, "\" (supported: ", supported_dtypes(), ")");
}

// ---------------------------------------------------------------- reading ---

struct File::Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base != nullptr) ::munmap(base, size);
  }
};

File File::open(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  TORCH_CHECK(fd.fd >= 0, "safetensors: cannot open ", path, ": ", errno_text());
  struct stat st {};
  TORCH_CHECK(::fstat(fd.fd, &st) == 0, "safetensors: cannot stat ", path, ": ", errno_text());
  TORCH_CHECK(S_ISREG(st.st_mode), "safetensors: ", path, " is not a regular file");
  const uint64_t file_size = uint64_t(st.st_size);
  TORCH_CHECK(file_size >= 8, "safetensors: ", path, ": file is ", file_size,
              " bytes, shorter than the 8-byte header length");

  File file;
  file.path_ = path;
  file.mapping_ = std::make_shared<Mapping>();
  // MAP_PRIVATE with PROT_WRITE is copy-on-write: a caller writing into a
  // tensor from get() gets private pages instead of a SIGSEGV, and the file is
  // never modified (it is opened read-only). MAP_NORESERVE keeps big
  // checkpoints from being charged against strict overcommit limits.
  void* base = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd.fd, 0);
  TORCH_CHECK(base != MAP_FAILED, "safetensors: cannot mmap ", path, ": ", errno_text());
  file.mapping_->base = base;
  file.mapping_->size = file_size;
  const auto* bytes = static_cast<const uint8_t*>(base);

  const uint64_t header_size = read_u64_le(bytes);
  TORCH_CHECK(header_size <= kMaxHeaderBytes, "safetensors: ", path, ": header length ", header_size,
              " exceeds the limit of ", kMaxHeaderBytes, " bytes");
  TORCH_CHECK(header_size <= file_size - 8, "safetensors: ", path, ": header length ", header_size,
              " exceeds the file size (", file_size, " bytes)");
  file.data_start_ = 8 + header_size;
  const uint64_t data_size = file_size - file.data_start_;

  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  const json header = parse_header(path, header_begin, header_begin + header_size);

  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_null()) continue;  // the Python library writes no key, Rust accepts null
      TORCH_CHECK(it.value().is_object(), "safetensors: ", path, ": \"__metadata__\" must be an object of strings");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        TORCH_CHECK(m.value().is_string(), "safetensors: ", path, ": __metadata__ value of \"", m.key(),
                    "\" must be a string, got ", m.value().type_name());
        file.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    TensorInfo info = parse_entry(path, it.key(), it.value());
    TORCH_CHECK(info.end <= data_size, "safetensors: ", path, ": tensor \"", info.name, "\": data_offsets [",
                info.begin, ", ", info.end, "] out of range (data section is ", data_size, " bytes)");
    file.tensors_.push_back(std::move(info));
  }

  // The tensors must tile [0, data_size) exactly: no byte read twice, none
  // unaccounted for. Zero-size tensors sit at the boundary between others.
  std::sort(file.tensors_.begin(), file.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t cursor = 0;
  std::string previous;
  for (const TensorInfo& t : file.tensors_) {
    TORCH_CHECK(t.begin >= cursor, "safetensors: ", path, ": tensor \"", t.name, "\" (data_offsets [", t.begin,
                ", ", t.end, "]) overlaps tensor \"", previous, "\" (ends at ", cursor, ")");
    TORCH_CHECK(t.begin == cursor, "safetensors: ", path, ": gap in the data section: bytes [", cursor, ", ",
                t.begin, ") before tensor \"", t.name, "\" belong to no tensor");
    cursor = t.end;
    previous = t.name;
  }
  TORCH_CHECK(cursor == data_size, "safetensors: ", path, ": ", data_size - cursor,
              " trailing bytes after the last tensor (data section is ", data_size, " bytes, tensors cover ",
              cursor, ")");

  for (size_t i = 0; i < file.tensors_.size(); ++i) file.index_[file.tensors_[i].name] = i;
  return file;
}

const TensorInfo& File::info(const std::string& name) const {
  auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), "safetensors: ", path_, ": no tensor named \"", name, "\"");
  return tensors_[it->second];
}

at::Tensor File::get(const std::string& name) const {
  const TensorInfo& t = info(name);
  const at::ScalarType type = scalar_type(t.dtype);
  auto* data = static_cast<uint8_t*>(mapping_->base) + data_start_ + t.begin;
  const auto options = at::TensorOptions().dtype(type).device(at::kCPU);

  if (type == at::kBool) {
    // A bool byte other than 0/1 is undefined behaviour in torch's kernels.
    for (uint64_t i = 0; i < t.end - t.begin; ++i)
      TORCH_CHECK(data[i] <= 1, "safetensors: ", path_, ": tensor \"", name, "\": BOOL byte ", i, " has value ",
                  int(data[i]), " (must be 0 or 1)");
  }
  // The deleter owns a reference to the mapping, which outlives the File.
  auto keep = mapping_;
  at::Tensor view = at::from_blob(data, t.shape, [keep](void*) {}, options);
  if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(type) != 0) return view.clone();
  return view;
}

std::map<std::string, at::Tensor> load(const std::string& path, bool copy) {
  const File file = File::open(path);
  std::map<std::string, at::Tensor> out;
  for (const TensorInfo& t : file.tensors()) out.emplace(t.name, copy ? file.get(t.name).clone() : file.get(t.name));
  return out;
}

// ---------------------------------------------------------------- writing ---

void save(const std::map<std::string, at::Tensor>& tensors, const std::string& path,
          const std::map<std::string, std::string>& metadata) {
  // Everything that can be rejected is checked before the temporary file exists.
  struct Item {
    std::string name;
    at::Tensor data;  // CPU, contiguous
    std::string dtype;
  };
  std::vector<Item> items;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(name != "__metadata__", "safetensors: saving ", path,
                ": \"__metadata__\" is reserved and cannot name a tensor");
    TORCH_CHECK(tensor.defined(), "safetensors: saving ", path, ": tensor \"", name, "\" is undefined");
    TORCH_CHECK(tensor.layout() == at::kStrided && !tensor.is_quantized(), "safetensors: saving ", path,
                ": tensor \"", name, "\" has layout ", tensor.layout(), "; only dense tensors can be saved");
    std::string dtype;
    try {
      dtype = dtype_name(tensor.scalar_type());
    } catch (const c10::Error&) {
      TORCH_CHECK(false, "safetensors: saving ", path, ": tensor \"", name, "\" has unsupported dtype ",
                  tensor.scalar_type(), " (supported: ", supported_dtypes(), ")");
    }
    // Conjugate/negative views are lazy flags on the tensor; resolve them so the
    // bytes written are the values seen.
    at::Tensor cpu = tensor.detach().to(at::kCPU).resolve_conj().resolve_neg().contiguous();
    items.push_back({name, std::move(cpu), std::move(dtype)});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.data.element_size() > b.data.element_size();  // names stay sorted within a size (map order)
  });

  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const Item& it : items) {
    const uint64_t bytes = uint64_t(it.data.nbytes());
    header[it.name] = {{"dtype", it.dtype}, {"shape", it.data.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // names or metadata that are not valid UTF-8
    TORCH_CHECK(false, "safetensors: saving ", path, ": cannot encode the header (", e.what(), ")");
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  io::write_atomic(path, [&](int fd) {
    io::write_all(fd, length, 8, path);
    io::write_all(fd, text.data(), text.size(), path);
    for (const Item& it : items) io::write_all(fd, it.data.const_data_ptr(), it.data.nbytes(), path);
  });
}

// ---------------------------------------------------------------- shards ---

std::map<std::string, at::Tensor> load_sharded(const std::string& dir, bool copy) {
  const std::string index_path = join(dir, "model.safetensors.index.json");
  if (!exists(index_path)) {
    const std::string single = join(dir, "model.safetensors");
    TORCH_CHECK(exists(single), "safetensors: ", dir, ": neither model.safetensors.index.json nor ",
                "model.safetensors exists");
    return load(single, copy);
  }

  std::ifstream in(index_path);
  TORCH_CHECK(in, "safetensors: cannot read ", index_path);
  json index;
  try {
    index = json::parse(in);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "safetensors: ", index_path, ": not valid JSON (", e.what(), ")");
  }
  TORCH_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
              "safetensors: ", index_path, ": missing \"weight_map\" object");

  // shard file -> the tensors the index assigns to it
  std::map<std::string, std::set<std::string>> shards;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    TORCH_CHECK(it.value().is_string(), "safetensors: ", index_path, ": weight_map entry \"", it.key(),
                "\" must be a file name string");
    const std::string file = it.value().get<std::string>();
    // Shards live in the checkpoint directory; an index must not reach outside it.
    const bool escapes = file == ".." || file.rfind("../", 0) == 0 || file.find("/../") != std::string::npos ||
                         (file.size() >= 3 && file.compare(file.size() - 3, 3, "/..") == 0);
    TORCH_CHECK(!file.empty() && file[0] != '/' && !escapes,
                "safetensors: ", index_path, ": shard \"", file, "\" of tensor \"", it.key(),
                "\" is not a file name inside ", dir);
    shards[file].insert(it.key());
  }

  std::map<std::string, at::Tensor> out;
  for (const auto& [file, names] : shards) {
    const std::string shard_path = join(dir, file);
    TORCH_CHECK(exists(shard_path), "safetensors: ", index_path, ": shard file ", shard_path, " (holding tensor \"", *names.begin(), "\") does not exist");
    const File shard = File::open(shard_path);
    for (const std::string& name : names)
      TORCH_CHECK(shard.contains(name), "safetensors: ", index_path, ": tensor \"", name,
                  "\" is not in its shard ", shard_path);
    for (const TensorInfo& t : shard.tensors())
      TORCH_CHECK(names.count(t.name), "safetensors: ", shard_path, ": tensor \"", t.name,
                  "\" is not assigned to this shard by ", index_path);
    for (const std::string& name : names) out.emplace(name, copy ? shard.get(name).clone() : shard.get(name));
  }
  return out;
}

}  // namespace unswag::safetensors
