// `unswag tables`: prints the fitted few-bit derivative tables (the source of
// the numbers in docs/fewbit.md).
#include <fmt/core.h>

#include "cli/commands.h"
#include "kernels/fewbit_tables.h"

namespace unswag::cli {

int run_tables() {
  fmt::print("{}", kernels::fewbit_tables_markdown());
  return 0;
}

}  // namespace unswag::cli
