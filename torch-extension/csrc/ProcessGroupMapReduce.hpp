// c10d backend "mapreduce": torch.distributed collectives on CPU tensors through libmapreduce's
// C ABI.
//
// Every collective returns at once with a MapReduceWork and is started with the library's
// non-blocking call (mr_iallreduce, ...) on the caller's thread, or later on a completer lane when
// it was held back (below). One completion thread per backend
// waits on the library requests in issue order (a communicator completes its ops in that order)
// and copies staged results back into the caller's tensors. It never runs user code: marking a
// Work's Future completed (which runs the Future's callbacks) is handed to a FutureCompleter,
// whose threads are free to block. A callback may therefore issue another collective and wait for
// it (DDP's PowerSGD hook does): the completion thread stays free to finish that op, and its
// Future is marked by the completer lane after the callback's own.
//
// Collectives are matched across ranks by the order they are issued in, so an op that a
// callback issues must take the same place in that order on every rank, although when the
// callback runs (on a completer lane, or inline on the thread that adds it to an already completed
// Future) depends on timing. The backend therefore starts ops in a fixed order: within one issuing
// context (user threads; each completer lane's callbacks), an op is held back, unstarted, while an
// earlier op of that context whose Future had been handed out (getFuture) when it was issued has
// not yet run its callbacks; the ops those callbacks issue start first. That is the order NCCL
// gives (its Futures complete at issue, so callbacks run inline): every op's callback chain comes
// right after it. DDP's PowerSGD hook with several buckets depends on it; gloo, whose callbacks
// run inline or on its worker threads as timing has it, fails there.
//
// This file must never depend on private PyTorch symbols: only the public c10d Backend/Work/Store
// interfaces, so the extension keeps building as PyTorch moves.
#pragma once

#include <atomic>
#include <condition_variable>
#include <optional>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "mapreduce.h"

namespace mapreduce_torch {

// Marks Futures completed (which runs their callbacks) on threads that nothing else waits for.
//
// Futures complete in lanes. An op issued by a user thread completes in lane 0; an op issued
// from a callback running in lane k completes in lane k+1. Each lane is one thread that runs its
// tasks in issue order, and a callback that waits for the op it issued never waits on its own
// thread: that op's Future is marked by the next lane. A lane is also an issuing context for the
// backend's ordering of ops (see the top of this file).
class FutureCompleter {
 public:
  // Lanes beyond this share the last one (a callback chain nested that deep could then wait on
  // itself).
  static constexpr size_t kMaxLanes = 32;

  FutureCompleter() = default;
  ~FutureCompleter();
  FutureCompleter(const FutureCompleter&) = delete;
  FutureCompleter& operator=(const FutureCompleter&) = delete;

  // The lane for an op issued on the calling thread.
  static size_t laneForCaller();
  void post(size_t lane, std::function<void()> task);
  // Run what is queued, then stop every lane. From a lane's own thread (a callback that shuts
  // the process group down) that thread is left to finish by itself.
  void stop();

 private:
  struct Lane;
  static void run(std::shared_ptr<Lane> lane, size_t depth);
  std::mutex mutex_;
  std::vector<std::shared_ptr<Lane>> lanes_;
  std::vector<std::thread> threads_;
  bool stopping_ = false;
};

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
      std::weak_ptr<Communicator> comm,
      std::chrono::milliseconds timeout);

  std::vector<at::Tensor> result() override;
  // Hands the Future out: from now on callbacks may be added to it, so later ops of the context
  // that issued this one wait until those callbacks ran (see the top of this file).
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  // The Future, for the backend's own callbacks (not handed out).
  const c10::intrusive_ptr<c10::ivalue::Future>& future() const {
    return future_;
  }
  void expose() {
    exposed_.store(true);
  }
  bool exposed() const {
    return exposed_.load();
  }
  // Set while the op is held back behind `earlier`'s callbacks; cleared once started.
  void setHeldBehind(std::string earlier);
  void setStarted();
  // If the op is not done within `timeout` (without one: the process group's timeout plus a
  // grace period, so that the library's own timeout, which names the silent peer, comes first),
  // the communicator is aborted (its buffers could otherwise still be written after we return)
  // and a DistBackendError is thrown.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void abort() override;

  // Called once, on a FutureCompleter thread: completes the Future (running its callbacks) and
  // the Work. wait() returns as soon as the Future holds its value, before user callbacks run.
  void complete(std::exception_ptr error);

  const std::string& description() const {
    return description_;
  }

 private:
  const std::string description_;
  const std::vector<at::Tensor> outputs_;
  const c10::intrusive_ptr<c10::ivalue::Future> future_;
  const std::weak_ptr<Communicator> comm_;
  const std::chrono::milliseconds timeout_;
  std::atomic<bool> exposed_{false};
  // Guarded by c10d::Work::mutex_.
  std::string heldBehind_;
};

// A collective on CUDA tensors, run on pinned host copies. The copies to the host were made on
// the caller's current stream before the op started (blocking, so the library reads finished
// data). When the host op completes, the results are copied back to the device on a stream from
// the pool and an event is recorded there; the Future (created for the CUDA device) completes on
// that stream, so its consumers wait for the copies, and wait() makes the caller's current
// stream wait for them too, so whatever the caller's stream does afterwards is ordered after
// the copy back. Device-generic c10 APIs (Stream, Event, VirtualGuardImpl), so this compiles
// without CUDA headers; it is only ever constructed for CUDA tensors.
class StagedWork : public c10d::Work {
 public:
  StagedWork(
      int rank,
      c10d::OpType opType,
      c10::Device device,
      c10::intrusive_ptr<c10d::Work> hostWork,
      std::vector<at::Tensor> deviceOutputs,
      std::vector<at::Tensor> hostOutputs);

  std::vector<at::Tensor> result() override {
    return deviceOutputs_;
  }
  // Handing this Future out exposes the host op's, whose completion runs this one's callbacks.
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void abort() override {
    hostWork_->abort();
  }

  // Once the host op's Future completed (on its completer lane): copy back, then complete
  // this Work's Future and the Work.
  void copyBack(c10::ivalue::Future& hostFuture);

 private:
  const c10::Device device_;
  const c10::intrusive_ptr<c10d::Work> hostWork_;
  const std::vector<at::Tensor> deviceOutputs_;
  const std::vector<at::Tensor> hostOutputs_;
  const c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::optional<c10::Event> copied_;
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

  c10::intrusive_ptr<c10d::Work> reduce(
      std::vector<at::Tensor>& tensors,
      const c10d::ReduceOptions& opts = c10d::ReduceOptions()) override;

  c10::intrusive_ptr<c10d::Work> gather(
      std::vector<std::vector<at::Tensor>>& outputTensors,
      std::vector<at::Tensor>& inputTensors,
      const c10d::GatherOptions& opts = c10d::GatherOptions()) override;

  c10::intrusive_ptr<c10d::Work> scatter(
      std::vector<at::Tensor>& outputTensors,
      std::vector<std::vector<at::Tensor>>& inputTensors,
      const c10d::ScatterOptions& opts = c10d::ScatterOptions()) override;

  // all_to_all_single: equal splits when both split lists are empty.
  c10::intrusive_ptr<c10d::Work> alltoall_base(
      at::Tensor& outputBuffer,
      at::Tensor& inputBuffer,
      std::vector<int64_t>& outputSplitSizes,
      std::vector<int64_t>& inputSplitSizes,
      const c10d::AllToAllOptions& opts = c10d::AllToAllOptions()) override;

  c10::intrusive_ptr<c10d::Work> alltoall(
      std::vector<at::Tensor>& outputTensors,
      std::vector<at::Tensor>& inputTensors,
      const c10d::AllToAllOptions& opts = c10d::AllToAllOptions()) override;

  // The coalesced forms run as one library op over the tensors packed side by side.
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceCoalescedOptions& opts = c10d::AllreduceCoalescedOptions()) override;

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts = c10d::AllgatherOptions()) override;

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts = c10d::ReduceScatterOptions()) override;

  // Point-to-point. Outside a coalescing block each call is its own library op, so two ranks
  // that both send a large tensor before receiving wait on each other (as with blocking MPI
  // sends); batch_isend_irecv coalesces, which sends everything at once.
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override;

  // Coalescing (batch_isend_irecv, _coalescing_manager) is a library group (mr_group_start /
  // mr_group_end) on the calling thread: sends and receives issued in between go out as one
  // op; collectives run as usual. The Work of endCoalescing completes once every op issued
  // before it has (a communicator completes its ops in order). Ops inside a group start at
  // once, so startCoalescing first waits (up to the timeout) until no op of the calling
  // context is held back.
  bool supportsCoalescing() const override {
    return true;
  }
  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  // Meets the other ranks in the c10d store rather than the communicator, so that a rank that
  // never arrives is named (every missing one with waitAllRanks) instead of timing out an op.
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks = false) override;

  // Graceful: lets queued ops finish, then destroys the communicator.
  void shutdown() override;
  // Ends queued ops with an error, then destroys the communicator.
  void abort() override;

 private:
  // An op from its issue until its Future's callbacks have run ("settled").
  struct IssuedOp {
    c10::intrusive_ptr<MapReduceWork> work;
    // Calls one mr_i* function; empty for a marker (endCoalescing) that completes once every op
    // started before it has. Cleared once started.
    std::function<mr_result(mr_comm*, mr_request**)> start;
    // Runs on the completion thread after a successful wait: copies staging buffers back into
    // the caller's tensors. Holds every tensor the library reads or writes, keeping it alive.
    std::function<void()> finish;
    // The issuing context, which is also the FutureCompleter lane its Future completes in.
    size_t lane = 0;
    // Earlier ops of the same context whose Futures were handed out and had not settled when
    // this one was issued: it starts only once they have.
    std::vector<std::shared_ptr<IssuedOp>> gates;
    bool settled = false;
  };

  // The ops of one issuing context that have not settled, and those not started yet.
  struct Context {
    std::vector<std::shared_ptr<IssuedOp>> unsettled;
    std::deque<std::shared_ptr<IssuedOp>> held;
  };

  // One started op waiting for completion.
  struct PendingOp {
    mr_request* request = nullptr;
    std::shared_ptr<IssuedOp> op;
    // Set when the op could not be started after being held (it completes with this error).
    std::exception_ptr error;
  };

  // Run `run` (a CPU op) on pinned host copies of the CUDA tensors in `args`, which are
  // replaced by their copies during the call; `outputs` are the device tensors the op writes.
  // nullptr when no argument is a CUDA tensor (the caller runs the CPU op itself).
  c10::intrusive_ptr<c10d::Work> onHost(
      const char* collective,
      c10d::OpType opType,
      const std::vector<at::Tensor*>& args,
      const std::vector<at::Tensor>& outputs,
      const std::function<c10::intrusive_ptr<c10d::Work>()>& run);

  // Issue `start` (which calls one mr_i* function) and queue its request for completion.
  // Throws DistBackendError with the library's message if the library rejects the op.
  c10::intrusive_ptr<c10d::Work> enqueue(
      c10d::OpType opType,
      const char* profilingTitle,
      std::string description,
      std::vector<at::Tensor> outputs,
      const std::function<mr_result(mr_comm*, mr_request**)>& start,
      std::function<void()> finish);

  // Start `op` (its mr_i* call) and queue it for completion. With issueMutex_ held. Throws the
  // library's error if `rethrow`; otherwise the op completes with it.
  // The op's gates (earlier ops it waited for) move into `released`, which the caller drops
  // only once it holds none of our locks: the last reference to an op owns its tensors, and
  // freeing a tensor may need the GIL, which a thread waiting for our locks may hold.
  void startLocked(
      const std::shared_ptr<IssuedOp>& op,
      bool rethrow,
      std::vector<std::shared_ptr<IssuedOp>>& released);
  // After `op`'s Future ran its callbacks (on its completer lane): start the ops of its context
  // that no longer wait for anything.
  // Returns the ops it let go of, for the caller to drop outside every lock (see startLocked).
  std::vector<std::shared_ptr<IssuedOp>> settle(const std::shared_ptr<IssuedOp>& op);
  // Whether an op issued now in `context` would be held back. With issueMutex_ held.
  static bool mustWaitLocked(const Context& context);
  void completionLoop();
  // Stop accepting ops, start or fail the held ones, drain the queue, join the completion
  // thread, destroy the communicator.
  void close(bool abortFirst);

  c10::intrusive_ptr<Options> options_;
  // Kept for monitored_barrier, which meets the other ranks there.
  const c10::intrusive_ptr<c10d::Store> store_;
  std::shared_ptr<Communicator> comm_;
  // monitored_barrier calls so far; names each call's store keys.
  uint64_t monitoredBarriers_ = 0;

  std::mutex mutex_;
  std::condition_variable queueChanged_;
  std::deque<PendingOp> queue_;
  // No new ops (close() began).
  bool closing_ = false;
  bool closed_ = false;
  // The completion thread ends once the queue is empty.
  bool stopCompletion_ = false;
  std::thread completionThread_;
  // Stopped (and drained) in close() after the completion thread.
  std::unique_ptr<FutureCompleter> completer_;
  // Serialises starting ops with queue pushes (queue order is start order) and guards contexts_.
  // Taken before mutex_.
  std::mutex issueMutex_;
  // Signalled whenever an op settles.
  std::condition_variable settled_;
  // Indexed by issuing context (FutureCompleter lane).
  std::vector<Context> contexts_ = std::vector<Context>(FutureCompleter::kMaxLanes);

  // Completer tasks reach the backend through this, and only while close() has not finished: a
  // task can outlive the backend when a callback shut the group down from its own lane.
  struct Owner {
    std::mutex mutex;
    ProcessGroupMapReduce* backend = nullptr;
  };
  std::shared_ptr<Owner> owner_ = std::make_shared<Owner>();
};

// Entry point for torch.distributed.Backend.register_backend.
c10::intrusive_ptr<ProcessGroupMapReduce> createProcessGroupMapReduce(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout);

} // namespace mapreduce_torch
