// kvc-replay: replays a recorded trace (one layer of one sequence) through a kvc cache policy on
// the CPU reference and, when built with it, the GPU backend. See docs/replay.md.
#include <iostream>

#include "replay.hpp"

int main(int argc, char** argv) {
  return kvc::replay::main_entry(argc, argv, std::cout, std::cerr);
}
