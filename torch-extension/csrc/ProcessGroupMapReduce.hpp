// c10d backend "mapreduce": torch.distributed collectives on CPU tensors through libmapreduce's
// C ABI.
//
// Every collective is issued with the library's non-blocking call (mr_iallreduce, ...) on the
// caller's thread and returns at once with a MapReduceWork. One completion thread per backend
// waits on the library requests in issue order (a communicator completes its ops in that order),
// copies staged results back into the caller's tensors, and then completes the Work and its
// Future. This is what lets DistributedDataParallel overlap gradient all-reduces with backward.
//
// This file must never depend on private PyTorch symbols: only the public c10d Backend/Work/Store
// interfaces, so the extension keeps building as PyTorch moves.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "mapreduce.h"

namespace mapreduce_torch {

// Owns one libmapreduce communicator. Shared between the backend and its Work objects so that a
// Work can abort the communicator (Work::wait with a timeout) without outliving it.
class Communicator {
 public:
  explicit Communicator(mr_comm* comm) : comm_(comm) {}
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  mr_comm* get() const {
    return comm_;
  }
  // End every pending and future op with MR_ERR_ABORTED. Callable from any thread.
  void abort();

 private:
  mr_comm* comm_;
};

class MapReduceWork : public c10d::Work {
 public:
  MapReduceWork(
      int rank,
      c10d::OpType opType,
      const char* profilingTitle,
      std::string description,
      std::vector<at::Tensor> outputs,
      std::weak_ptr<Communicator> comm);

  std::vector<at::Tensor> result() override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  // With a timeout: if the op is not done in time, the communicator is aborted (its buffers
  // could otherwise still be written after we return) and a DistBackendError is thrown.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void abort() override;

  // Called once, by the completion thread.
  void complete(std::exception_ptr error);

  const std::string& description() const {
    return description_;
  }

 private:
  const std::string description_;
  const std::vector<at::Tensor> outputs_;
  const c10::intrusive_ptr<c10::ivalue::Future> future_;
  const std::weak_ptr<Communicator> comm_;
};

class ProcessGroupMapReduce : public c10d::Backend {
 public:
  // Rendezvous through `store` (rank 0 publishes its mr_unique_id) and create the communicator.
  // `timeout` becomes MR_TIMEOUT_MS for the communicator unless the environment sets it.
  ProcessGroupMapReduce(
      const c10::intrusive_ptr<c10d::Store>& store,
      int rank,
      int size,
      std::chrono::milliseconds timeout);
  ~ProcessGroupMapReduce() override;

  const std::string getBackendName() const override {
    return "mapreduce";
  }
  c10::intrusive_ptr<Options> getBackendOptions() override {
    return options_;
  }

  c10::intrusive_ptr<c10d::Work> broadcast(
      std::vector<at::Tensor>& tensors,
      const c10d::BroadcastOptions& opts = c10d::BroadcastOptions()) override;

  c10::intrusive_ptr<c10d::Work> allreduce(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceOptions& opts = c10d::AllreduceOptions()) override;

  c10::intrusive_ptr<c10d::Work> allgather(
      std::vector<std::vector<at::Tensor>>& outputTensors,
      std::vector<at::Tensor>& inputTensors,
      const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;

  c10::intrusive_ptr<c10d::Work> _allgather_base(
      at::Tensor& outputBuffer,
      at::Tensor& inputBuffer,
      const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;

  c10::intrusive_ptr<c10d::Work> reduce_scatter(
      std::vector<at::Tensor>& outputTensors,
      std::vector<std::vector<at::Tensor>>& inputTensors,
      const c10d::ReduceScatterOptions& opts =
          c10d::ReduceScatterOptions()) override;

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& outputBuffer,
      at::Tensor& inputBuffer,
      const c10d::ReduceScatterOptions& opts =
          c10d::ReduceScatterOptions()) override;

  c10::intrusive_ptr<c10d::Work> barrier(
      const c10d::BarrierOptions& opts = c10d::BarrierOptions()) override;

  // Graceful: lets queued ops finish, then destroys the communicator.
  void shutdown() override;
  // Ends queued ops with an error, then destroys the communicator.
  void abort() override;

 private:
  // One issued op waiting for completion.
  struct PendingOp {
    mr_request* request = nullptr;
    c10::intrusive_ptr<MapReduceWork> work;
    // Runs on the completion thread after a successful wait: copies staging buffers back into
    // the caller's tensors. Holds every tensor the library reads or writes, keeping it alive.
    std::function<void()> finish;
  };

  // Issue `start` (which calls one mr_i* function) and queue its request for completion.
  // Throws DistBackendError with the library's message if the library rejects the op.
  c10::intrusive_ptr<c10d::Work> enqueue(
      c10d::OpType opType,
      const char* profilingTitle,
      std::string description,
      std::vector<at::Tensor> outputs,
      const std::function<mr_result(mr_comm*, mr_request**)>& start,
      std::function<void()> finish);

  void completionLoop();
  // Stop accepting ops, drain the queue, join the completion thread, destroy the communicator.
  void close(bool abortFirst);

  c10::intrusive_ptr<Options> options_;
  std::shared_ptr<Communicator> comm_;

  std::mutex mutex_;
  std::condition_variable queueChanged_;
  std::deque<PendingOp> queue_;
  bool closing_ = false;
  bool closed_ = false;
  std::thread completionThread_;
  // Serialises mr_i* calls with queue pushes so that queue order equals issue order.
  std::mutex issueMutex_;
};

// Entry point for torch.distributed.Backend.register_backend.
c10::intrusive_ptr<ProcessGroupMapReduce> createProcessGroupMapReduce(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout);

} // namespace mapreduce_torch
