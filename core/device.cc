#include "core/device.h"

#include "absl/strings/str_cat.h"

namespace lc {

std::string Device::ToString() const {
  return is_cpu() ? "cpu" : absl::StrCat("cuda:", index);
}

}  // namespace lc
