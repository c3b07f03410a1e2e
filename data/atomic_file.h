// Writing a file so that a crash or an error never leaves it half-written.
//
// The bytes go to a temporary file next to the target, "<path>.tmp.<pid>" (the pid keeps concurrent
// writers, such as several ranks or tools, off each other's temporary). commit() then fsyncs it, renames it
// over the target, and fsyncs the folder so that the rename itself survives a power cut. A rename within
// one folder is atomic, so a reader sees either the old file or the whole new one. Destroyed without a
// commit (an exception on the way), the temporary is removed and the target is left as it was.
//
// Every file the project writes (checkpoints, safetensors, GGUF, token shards, JSON files, the tokenizer
// files copied into a Hugging Face folder) goes through this one class; metrics.jsonl is only appended to.
// `Error` is the exception type thrown, so that each format keeps reporting its own error; every message
// names the file.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

namespace llm {

template <typename Error>
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path)
      : path_(path), temp_(path + ".tmp." + std::to_string(::getpid())) {
    // 0666 less the umask, as fopen and ofstream create files.
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd_ < 0) {
      const int error = errno;  // before the message's allocations can change it
      throw Error("cannot create " + temp_ + ": " + std::strerror(error));
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(temp_.c_str());
  }

  void write(const void* data, size_t size) {
    const char* bytes = static_cast<const char*>(data);
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::write(fd_, bytes + done, size - done);
      if (n < 0) {
        const int error = errno;
        if (error == EINTR) continue;
        throw Error("cannot write " + temp_ + ": " + std::strerror(error));
      }
      done += static_cast<size_t>(n);
    }
    written_ += size;
  }

  // Bytes written so far: the offset of the next write.
  uint64_t written() const { return written_; }

  void commit() {
    // Close even when fsync fails, so that the descriptor is not leaked.
    const bool synced = ::fsync(fd_) == 0;
    const int sync_errno = errno;
    const bool closed = ::close(fd_) == 0;
    fd_ = -1;
    const int close_errno = errno;
    if (!synced || !closed) {
      throw Error("cannot flush " + temp_ + ": " + std::strerror(synced ? close_errno : sync_errno));
    }
    if (::rename(temp_.c_str(), path_.c_str()) != 0) {
      const int error = errno;
      throw Error("cannot rename " + temp_ + " to " + path_ + ": " + std::strerror(error));
    }
    committed_ = true;
    const size_t slash = path_.find_last_of('/');
    const std::string folder = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
    const int folder_fd = ::open(folder.c_str(), O_RDONLY);
    if (folder_fd >= 0) {
      ::fsync(folder_fd);
      ::close(folder_fd);
    }
  }

 private:
  std::string path_, temp_;
  int fd_ = -1;
  uint64_t written_ = 0;
  bool committed_ = false;
};

// The whole of `contents` as the file at `path`, atomically.
template <typename Error>
void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile<Error> file(path);
  file.write(contents.data(), contents.size());
  file.commit();
}

}  // namespace llm
