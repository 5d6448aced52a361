// Where a tensor's memory lives: the CPU or one CUDA device by index.
#ifndef LONGCTX_CORE_DEVICE_H_
#define LONGCTX_CORE_DEVICE_H_

#include <ostream>
#include <string>

namespace lc {

enum class DeviceType : uint8_t { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;  // CUDA ordinal; always 0 for the CPU.

  static Device Cpu() { return Device{DeviceType::kCpu, 0}; }
  static Device Cuda(int index = 0) { return Device{DeviceType::kCuda, index}; }

  bool is_cpu() const { return type == DeviceType::kCpu; }
  bool is_cuda() const { return type == DeviceType::kCuda; }
  // "cpu" or "cuda:N".
  std::string ToString() const;

  friend bool operator==(const Device& a, const Device& b) {
    return a.type == b.type && a.index == b.index;
  }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

inline std::ostream& operator<<(std::ostream& os, const Device& d) {
  return os << d.ToString();
}

}  // namespace lc

#endif  // LONGCTX_CORE_DEVICE_H_
