// AtomicFile: the target is replaced whole on commit() and left as it was on every failure.
#include "data/atomic_file.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

// A distinct type, to check that the class throws the caller's error type.
struct TestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class AtomicFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("llm_atomic_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  std::string temp_of(const std::string& target) const {
    return target + ".tmp." + std::to_string(::getpid());
  }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  static std::string contents(const std::string& file) {
    std::ifstream in(file, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  fs::path dir_;
};

TEST_F(AtomicFileTest, CommitReplacesTheTargetWhole) {
  const std::string target = path("out.bin");
  llm::write_file_atomic<TestError>(target, "old contents");
  {
    llm::AtomicFile<TestError> file(target);
    file.write("new ", 4);
    EXPECT_EQ(file.written(), 4u);
    // Until the commit, the target keeps its old bytes and the new ones sit in the temporary file.
    EXPECT_EQ(contents(target), "old contents");
    EXPECT_TRUE(fs::exists(temp_of(target)));
    file.write("contents", 8);
    file.write(nullptr, 0);
    EXPECT_EQ(file.written(), 12u);
    file.commit();
  }
  EXPECT_EQ(contents(target), "new contents");
  EXPECT_EQ(listing(), std::vector<std::string>({"out.bin"}));
}

TEST_F(AtomicFileTest, AnExceptionBeforeTheCommitLeavesTheTargetAsItWas) {
  const std::string target = path("out.bin");
  llm::write_file_atomic<TestError>(target, "last good");
  try {
    llm::AtomicFile<TestError> file(target);
    file.write("half of the new fi", 18);
    throw std::logic_error("the writer failed half-way");
  } catch (const std::logic_error&) {
  }
  EXPECT_EQ(contents(target), "last good");
  EXPECT_EQ(listing(), std::vector<std::string>({"out.bin"}));
}

TEST_F(AtomicFileTest, FailuresThrowTheCallersErrorNamingTheFile) {
  // The folder does not exist: nothing can be created.
  const std::string missing = path("no/such/folder/out.bin");
  try {
    llm::AtomicFile<TestError> file(missing);
    ADD_FAILURE() << "a file was opened in a missing folder";
  } catch (const TestError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }

  // The target is a non-empty folder: the rename fails, and the temporary file is removed.
  const std::string blocked = path("taken");
  fs::create_directories(blocked + "/inside");
  try {
    llm::write_file_atomic<TestError>(blocked, "text");
    ADD_FAILURE() << "a file was renamed over a non-empty folder";
  } catch (const TestError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot rename"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(blocked), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(temp_of(blocked)));
  EXPECT_TRUE(fs::is_directory(blocked + "/inside"));
}

}  // namespace
