// A downstream program that uses the installed kvc headers through find_package(kvc).
#include <cstdio>

#include <kvc/kvc.hpp>

int main() {
  kvc::ModelShape const shape{32, 32, 8, 128};
  if (shape.validate() != kvc::Status::kSuccess || shape.group_size() != 4) return 1;
  std::printf("kvc consumer ok (version %d)\n", KVC_VERSION);
  return 0;
}
