// Minimal assertion helpers for the C++ unit tests (no test framework dependency): CHECK and
// friends print the failing expression with file:line and count failures; main() returns
// check::exit_code().
#pragma once

#include <exception>
#include <iostream>
#include <string>

namespace check {

inline int& failures() {
  static int count = 0;
  return count;
}

inline int exit_code() {
  if (failures() == 0) {
    std::cout << "all checks passed\n";
    return 0;
  }
  std::cout << failures() << " check(s) failed\n";
  return 1;
}

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::cerr << file << ":" << line << ": FAILED " << what << "\n";
}

}  // namespace check

#define CHECK(cond)                                      \
  do {                                                   \
    if (!(cond)) check::fail(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_EQ(a, b)                                                          \
  do {                                                                          \
    auto check_a_ = (a);                                                        \
    auto check_b_ = (b);                                                        \
    if (!(check_a_ == check_b_)) check::fail(__FILE__, __LINE__, #a " == " #b); \
  } while (0)

// Checks that `stmt` throws `exc_type` whose what() contains `substring`.
#define CHECK_THROWS(stmt, exc_type, substring)                                                    \
  do {                                                                                             \
    bool check_thrown_ = false;                                                                    \
    try {                                                                                          \
      stmt;                                                                                        \
    } catch (const exc_type& e) {                                                                  \
      check_thrown_ = true;                                                                        \
      if (std::string(e.what()).find(substring) == std::string::npos) {                            \
        check::fail(__FILE__, __LINE__,                                                            \
                    std::string(#stmt " threw '") + e.what() + "' without '" + (substring) + "'"); \
      }                                                                                            \
    } catch (const std::exception& e) {                                                            \
      check_thrown_ = true;                                                                        \
      check::fail(__FILE__, __LINE__, std::string(#stmt " threw the wrong type: ") + e.what());    \
    }                                                                                              \
    if (!check_thrown_) check::fail(__FILE__, __LINE__, #stmt " did not throw");                   \
  } while (0)

// Runs one test function, turning an unexpected exception into a failure.
#define RUN_TEST(fn)                                                           \
  do {                                                                         \
    try {                                                                      \
      fn();                                                                    \
    } catch (const std::exception& e) {                                        \
      check::fail(__FILE__, __LINE__, std::string(#fn " threw: ") + e.what()); \
    }                                                                          \
  } while (0)
