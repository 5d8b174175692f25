#include "ProcessGroupMapReduce.hpp"

#include <cstdlib>
#include <cstring>
#include <optional>

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace mapreduce_torch {

namespace {

// ---------------------------------------------------------------------------------------------
// Library errors

std::string libraryMessage(const std::string& what, mr_result rc) {
  // mr_last_error() is per thread: this must run on the thread whose call failed.
  const char* detail = mr_last_error();
  const char* code = mr_result_string(rc);
  std::string message = c10::str("mapreduce: ", what, " failed (", code ? code : "unknown error", ")");
  if (detail != nullptr && detail[0] != '\0') {
    message += ": ";
    message += detail;
  }
  return message;
}

std::exception_ptr libraryError(const std::string& what, mr_result rc) {
  return std::make_exception_ptr(
      c10::DistBackendError({__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, libraryMessage(what, rc)));
}

void checkLibrary(const std::string& what, mr_result rc) {
  if (rc != MR_OK) {
    C10_THROW_ERROR(DistBackendError, libraryMessage(what, rc));
  }
}

// ---------------------------------------------------------------------------------------------
// Types

const char* torchDtypeName(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kInt:
      return "torch.int32";
    case at::kLong:
      return "torch.int64";
    case at::kShort:
      return "torch.int16";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return c10::toString(t);
  }
}

constexpr const char* kSupportedDtypes =
    "torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, "
    "torch.int32, torch.int64";

std::optional<mr_dtype> toLibraryDtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return MR_FLOAT32;
    case at::kDouble:
      return MR_FLOAT64;
    case at::kHalf:
      return MR_FLOAT16;
    case at::kBFloat16:
      return MR_BFLOAT16;
    case at::kChar:
      return MR_INT8;
    case at::kByte:
      return MR_UINT8;
    case at::kInt:
      return MR_INT32;
    case at::kLong:
      return MR_INT64;
    default:
      return std::nullopt;
  }
}

const char* reduceOpName(const c10d::ReduceOp& op) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM:
      return "SUM";
    case c10d::ReduceOp::AVG:
      return "AVG";
    case c10d::ReduceOp::PRODUCT:
      return "PRODUCT";
    case c10d::ReduceOp::MIN:
      return "MIN";
    case c10d::ReduceOp::MAX:
      return "MAX";
    case c10d::ReduceOp::BAND:
      return "BAND";
    case c10d::ReduceOp::BOR:
      return "BOR";
    case c10d::ReduceOp::BXOR:
      return "BXOR";
    case c10d::ReduceOp::PREMUL_SUM:
      return "PREMUL_SUM";
    default:
      return "UNUSED";
  }
}

mr_op toLibraryOp(const char* collective, const c10d::ReduceOp& op, const at::Tensor& t) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM:
      return MR_SUM;
    case c10d::ReduceOp::AVG:
      return MR_AVG;
    case c10d::ReduceOp::PRODUCT:
      return MR_PROD;
    case c10d::ReduceOp::MIN:
      return MR_MIN;
    case c10d::ReduceOp::MAX:
      return MR_MAX;
    default:
      TORCH_CHECK(
          false,
          "mapreduce ",
          collective,
          ": reduce op ",
          reduceOpName(op),
          " is not supported (tensor dtype ",
          torchDtypeName(t.scalar_type()),
          "); supported ops: SUM, AVG, MAX, MIN, PRODUCT");
  }
}

// Checks that `t` is something the library can work on and returns its library dtype.
mr_dtype checkTensor(const char* collective, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "mapreduce ", collective, ": got an undefined tensor");
  const char* dtype = torchDtypeName(t.scalar_type());
  TORCH_CHECK(
      t.device().is_cpu(),
      "mapreduce ",
      collective,
      ": got a tensor of dtype ",
      dtype,
      " on device ",
      t.device(),
      "; the mapreduce backend supports CPU tensors only");
  TORCH_CHECK(
      t.layout() == at::kStrided,
      "mapreduce ",
      collective,
      ": got a ",
      t.layout(),
      " tensor of dtype ",
      dtype,
      "; only dense (strided) tensors are supported");
  const auto libraryDtype = toLibraryDtype(t.scalar_type());
  TORCH_CHECK(
      libraryDtype.has_value(),
      "mapreduce ",
      collective,
      ": dtype ",
      dtype,
      " is not supported; supported dtypes: ",
      kSupportedDtypes);
  return *libraryDtype;
}

const at::Tensor& checkSingleTensor(const char* collective, const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(
      tensors.size() == 1,
      "mapreduce ",
      collective,
      ": expected exactly one tensor per call, got ",
      tensors.size());
  return tensors[0];
}

void checkSameDtype(const char* collective, const at::Tensor& expected, const at::Tensor& t) {
  TORCH_CHECK(
      t.scalar_type() == expected.scalar_type(),
      "mapreduce ",
      collective,
      ": tensors must share one dtype, got ",
      torchDtypeName(expected.scalar_type()),
      " and ",
      torchDtypeName(t.scalar_type()));
}

// The one list of per-rank tensors of allgather (outputs) and reduce_scatter (inputs): `size`
// tensors of `reference`'s dtype and element count. `role` names the list's tensors, `other`
// the reference ("output"/"input").
const std::vector<at::Tensor>& checkPerRankList(
    const char* collective,
    const std::vector<std::vector<at::Tensor>>& lists,
    const at::Tensor& reference,
    int size,
    const char* role,
    const char* other) {
  TORCH_CHECK(
      lists.size() == 1,
      "mapreduce ",
      collective,
      ": expected one list of ",
      role,
      " tensors, got ",
      lists.size());
  const std::vector<at::Tensor>& list = lists[0];
  TORCH_CHECK(
      static_cast<int>(list.size()) == size,
      "mapreduce ",
      collective,
      ": expected ",
      size,
      " ",
      role,
      " tensors (one per rank), got ",
      list.size());
  const int64_t n = reference.numel();
  for (const auto& t : list) {
    checkTensor(collective, t);
    checkSameDtype(collective, reference, t);
    TORCH_CHECK(
        t.numel() == n,
        "mapreduce ",
        collective,
        ": every ",
        role,
        " tensor must have as many elements as the ",
        other,
        " (",
        n,
        "), got ",
        t.numel());
  }
  return list;
}

// What to run once the library wrote `recv`: copy it into `output` unless they are the same
// tensor; either way keep `send` and `recv` (which may be one tensor) alive until then.
std::function<void()> finishInto(const at::Tensor& output, const at::Tensor& send, const at::Tensor& recv) {
  if (recv.is_same(output)) {
    return [send, recv] {};
  }
  return [output, send, recv] { output.copy_(recv.view(output.sizes())); };
}

std::string describe(const char* collective, const at::Tensor& t, const char* op = nullptr) {
  std::string d = c10::str(collective, " of ", t.numel(), " x ", torchDtypeName(t.scalar_type()));
  if (op != nullptr) {
    d += c10::str(" (", op, ")");
  }
  return d;
}

// A flat contiguous tensor with the same dtype as `like`.
at::Tensor flatBuffer(const at::Tensor& like, int64_t numel) {
  return at::empty({numel}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// ---------------------------------------------------------------------------------------------
// MR_TIMEOUT_MS from the process-group timeout

// Serialises the temporary MR_TIMEOUT_MS set-up below across process groups of one process.
std::mutex& environmentMutex() {
  static std::mutex m;
  return m;
}

// While alive: MR_TIMEOUT_MS is the process-group timeout, unless the user set the variable.
// The library reads its configuration when the unique id and the communicator are created, so
// the variable only needs to exist around those calls; it is removed again afterwards so that a
// later process group with another timeout gets its own value.
class TimeoutEnvironment {
 public:
  explicit TimeoutEnvironment(std::chrono::milliseconds timeout) : lock_(environmentMutex()) {
    if (std::getenv("MR_TIMEOUT_MS") == nullptr && timeout.count() > 0) {
      ::setenv("MR_TIMEOUT_MS", std::to_string(timeout.count()).c_str(), 1);
      set_ = true;
    }
  }
  ~TimeoutEnvironment() {
    if (set_) {
      ::unsetenv("MR_TIMEOUT_MS");
    }
  }
  TimeoutEnvironment(const TimeoutEnvironment&) = delete;
  TimeoutEnvironment& operator=(const TimeoutEnvironment&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  bool set_ = false;
};

// ---------------------------------------------------------------------------------------------
// Rendezvous

// Keys live under the PrefixStore that c10d gives each process group, so they are unique per
// group. They are deleted once every rank has read the id: a store that outlives the group
// (torchrun's agent store, re-created groups of the same name) must not hand a stale id to the
// next group.
const std::string kUniqueIdKey = "mapreduce/unique_id";

// Rank 0 stores this prefix and its error message instead of an id when it cannot create one.
const std::string kErrorPrefix = "error:";

std::string ackKey(int rank) {
  return kUniqueIdKey + "/read/" + std::to_string(rank);
}

void deleteQuietly(c10d::Store& store, const std::string& key) {
  try {
    store.deleteKey(key);
  } catch (const std::exception&) {
    // Stores without deleteKey keep the key; groups are still distinct by prefix.
  }
}

std::string errorText(const std::exception& e) {
  if (const auto* c10Error = dynamic_cast<const c10::Error*>(&e)) {
    return c10Error->what_without_backtrace();
  }
  return e.what();
}

mr_unique_id exchangeUniqueId(c10d::Store& store, int rank, int size, std::chrono::milliseconds timeout) {
  mr_unique_id id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) {
    const mr_result rc = mr_get_unique_id(&id);
    if (rc != MR_OK) {
      // Tell the other ranks at once instead of leaving them to time out on the store.
      const std::string message = libraryMessage("mr_get_unique_id on rank 0", rc);
      const std::string published = kErrorPrefix + message;
      store.set(kUniqueIdKey, std::vector<uint8_t>(published.begin(), published.end()));
      C10_THROW_ERROR(DistBackendError, message);
    }
    const auto* bytes = reinterpret_cast<const uint8_t*>(&id);
    store.set(kUniqueIdKey, std::vector<uint8_t>(bytes, bytes + sizeof(id)));
    if (size > 1) {
      std::vector<std::string> acks;
      acks.reserve(size - 1);
      for (int r = 1; r < size; ++r) {
        acks.push_back(ackKey(r));
      }
      store.wait(acks, timeout);
      for (const auto& key : acks) {
        deleteQuietly(store, key);
      }
    }
    deleteQuietly(store, kUniqueIdKey);
  } else {
    const std::vector<uint8_t> bytes = store.get(kUniqueIdKey);
    const std::string text(bytes.begin(), bytes.end());
    if (bytes.size() != sizeof(id) && text.rfind(kErrorPrefix, 0) == 0) {
      C10_THROW_ERROR(DistBackendError, text.substr(kErrorPrefix.size()));
    }
    TORCH_CHECK(
        bytes.size() == sizeof(id),
        "mapreduce: the unique id in the store has ",
        bytes.size(),
        " bytes, expected ",
        sizeof(id),
        " (is another program using key '",
        kUniqueIdKey,
        "'?)");
    std::memcpy(&id, bytes.data(), sizeof(id));
    store.set(ackKey(rank), std::vector<uint8_t>{1});
  }
  return id;
}

} // namespace

// -----------------------------------------------------------------------------------------------
// FutureCompleter

namespace {
// 0 on user threads; k+1 on lane k's thread.
thread_local size_t completerDepth = 0;
} // namespace

struct FutureCompleter::Lane {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::function<void()>> tasks;
  bool stopping = false;
};

FutureCompleter::~FutureCompleter() {
  stop();
}

size_t FutureCompleter::laneForCaller() {
  return std::min(completerDepth, kMaxLanes - 1);
}

void FutureCompleter::post(size_t index, std::function<void()> task) {
  std::shared_ptr<Lane> lane;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_INTERNAL_ASSERT(!stopping_, "mapreduce: a Future was completed after the process group closed");
    index = std::min(index, kMaxLanes - 1);
    while (lanes_.size() <= index) {
      lanes_.push_back(std::make_shared<Lane>());
      threads_.emplace_back(&FutureCompleter::run, lanes_.back(), lanes_.size());
    }
    lane = lanes_[index];
  }
  {
    std::lock_guard<std::mutex> lock(lane->mutex);
    lane->tasks.push_back(std::move(task));
  }
  lane->changed.notify_one();
}

void FutureCompleter::run(std::shared_ptr<Lane> lane, size_t depth) {
  completerDepth = depth;
  std::unique_lock<std::mutex> lock(lane->mutex);
  for (;;) {
    lane->changed.wait(lock, [&] { return !lane->tasks.empty() || lane->stopping; });
    if (lane->tasks.empty()) {
      return;
    }
    std::function<void()> task = std::move(lane->tasks.front());
    lane->tasks.pop_front();
    lock.unlock();
    task();
    task = nullptr; // drop what it holds (Work, tensors) before waiting again
    lock.lock();
  }
}

void FutureCompleter::stop() {
  std::vector<std::shared_ptr<Lane>> lanes;
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    lanes = lanes_;
    threads.swap(threads_);
  }
  for (auto& lane : lanes) {
    {
      std::lock_guard<std::mutex> lock(lane->mutex);
      lane->stopping = true;
    }
    lane->changed.notify_all();
  }
  for (auto& t : threads) {
    if (t.get_id() == std::this_thread::get_id()) {
      t.detach(); // it holds its lane and ends once its current task returns
    } else if (t.joinable()) {
      t.join();
    }
  }
}

// -----------------------------------------------------------------------------------------------
// Communicator

Communicator::~Communicator() {
  const mr_result rc = mr_comm_destroy(comm_);
  if (rc != MR_OK) {
    TORCH_WARN(libraryMessage("mr_comm_destroy", rc));
  }
}

void Communicator::abort() {
  const mr_result rc = mr_comm_abort(comm_);
  if (rc != MR_OK) {
    TORCH_WARN(libraryMessage("mr_comm_abort", rc));
  }
}

// -----------------------------------------------------------------------------------------------
// MapReduceWork

MapReduceWork::MapReduceWork(
    int rank,
    c10d::OpType opType,
    const char* profilingTitle,
    std::string description,
    std::vector<at::Tensor> outputs,
    std::weak_ptr<Communicator> comm,
    std::chrono::milliseconds timeout)
    : c10d::Work(rank, opType, profilingTitle),
      description_(std::move(description)),
      outputs_(std::move(outputs)),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))),
      comm_(std::move(comm)),
      timeout_(timeout) {
  // The first callback, so it runs as soon as the Future holds its value and before any user
  // callback: Work::wait() returns then, whatever the callbacks go on to do. complete() keeps
  // this Work alive while the Future's callbacks run.
  future_->addCallback([this](c10::ivalue::Future& f) { finish(f.hasError() ? f.exception_ptr() : nullptr); });
}

std::vector<at::Tensor> MapReduceWork::result() {
  return outputs_;
}

c10::intrusive_ptr<c10::ivalue::Future> MapReduceWork::getFuture() {
  return future_;
}

// Added to the process-group timeout for waits without their own: the library bounds every wait
// for a remote by MR_TIMEOUT_MS (the process-group timeout unless set) and reports which peer was
// silent; this bound only catches an op whose completion never arrives.
constexpr std::chrono::milliseconds kWaitGrace{5000};

bool MapReduceWork::wait(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout == kNoTimeout) {
    timeout = timeout_.count() > 0 ? timeout_ + kWaitGrace : std::chrono::milliseconds::max();
  }
  const bool bounded = timeout < std::chrono::hours(24 * 365);
  if (!bounded) {
    cv_.wait(lock, [this] { return completed_; });
  } else if (!cv_.wait_for(lock, timeout, [this] { return completed_; })) {
    lock.unlock();
    if (auto comm = comm_.lock()) {
      comm->abort();
    }
    C10_THROW_ERROR(
        DistBackendError,
        c10::str(
            "mapreduce: ",
            description_,
            " did not complete within ",
            timeout.count(),
            " ms; the communicator was aborted and this process group can no longer be used"));
  }
  if (exception_) {
    std::rethrow_exception(exception_);
  }
  return true;
}

void MapReduceWork::abort() {
  if (auto comm = comm_.lock()) {
    comm->abort();
  }
}

void MapReduceWork::complete(std::exception_ptr error) {
  // The Work completes in the Future's first callback (see the constructor), so once wait()
  // returns getFuture() already holds the value. A throwing callback propagates from here.
  if (error) {
    future_->setError(error);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
  }
}

// -----------------------------------------------------------------------------------------------
// ProcessGroupMapReduce

ProcessGroupMapReduce::ProcessGroupMapReduce(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout)
    : c10d::Backend(rank, size),
      options_(c10::make_intrusive<Options>("mapreduce", timeout)),
      store_(store) {
  TORCH_CHECK(store, "mapreduce: process group created without a store");
  TORCH_CHECK(size >= 1, "mapreduce: world size must be at least 1, got ", size);
  TORCH_CHECK(rank >= 0 && rank < size, "mapreduce: rank ", rank, " is out of range for world size ", size);

  mr_comm* raw = nullptr;
  {
    TimeoutEnvironment environment(timeout);
    mr_unique_id id;
    try {
      id = exchangeUniqueId(*store, rank, size, timeout);
    } catch (const c10::DistBackendError&) {
      throw;
    } catch (const std::exception& e) {
      C10_THROW_ERROR(
          DistBackendError,
          c10::str("mapreduce: rendezvous through the c10d store failed on rank ", rank, ": ", errorText(e)));
    }
    checkLibrary(c10::str("mr_comm_init_rank (rank ", rank, " of ", size, ")"), mr_comm_init_rank(&raw, size, &id, rank));
  }
  comm_ = std::make_shared<Communicator>(raw);
  completer_ = std::make_unique<FutureCompleter>();
  completionThread_ = std::thread([this] { completionLoop(); });
  init();
}

ProcessGroupMapReduce::~ProcessGroupMapReduce() {
  try {
    close(/*abortFirst=*/false);
  } catch (const std::exception& e) {
    TORCH_WARN("mapreduce: error while closing the process group: ", errorText(e));
  }
}

void ProcessGroupMapReduce::shutdown() {
  close(/*abortFirst=*/false);
}

void ProcessGroupMapReduce::abort() {
  close(/*abortFirst=*/true);
}

void ProcessGroupMapReduce::close(bool abortFirst) {
  std::shared_ptr<Communicator> comm;
  {
    // Taking issueMutex_ first means no op is between its mr_i* call and its queue push.
    std::lock_guard<std::mutex> issue(issueMutex_);
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) {
      return;
    }
    closing_ = true;
    closed_ = true;
    comm = comm_;
  }
  if (abortFirst && comm) {
    comm->abort();
  }
  queueChanged_.notify_all();
  if (completionThread_.joinable()) {
    completionThread_.join();
  }
  // Every op is done; let the callbacks of their Futures finish (a callback that closed the
  // group leaves its own lane to finish by itself).
  if (completer_) {
    completer_->stop();
  }
  comm.reset();
  std::lock_guard<std::mutex> lock(mutex_);
  comm_.reset();
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::enqueue(
    c10d::OpType opType,
    const char* profilingTitle,
    std::string description,
    std::vector<at::Tensor> outputs,
    const std::function<mr_result(mr_comm*, mr_request**)>& start,
    std::function<void()> finish) {
  std::lock_guard<std::mutex> issue(issueMutex_);
  std::shared_ptr<Communicator> comm;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(
        !closing_ && comm_,
        "mapreduce: ",
        description,
        ": the process group has been shut down or aborted");
    comm = comm_;
  }
  auto work = c10::make_intrusive<MapReduceWork>(
      rank_,
      opType,
      profilingTitle,
      description,
      std::move(outputs),
      std::weak_ptr<Communicator>(comm),
      options_->timeout);
  mr_request* request = nullptr;
  checkLibrary(description, start(comm->get(), &request));
  TORCH_INTERNAL_ASSERT(request != nullptr, "mapreduce: ", description, " returned no request");
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(PendingOp{request, work, std::move(finish), FutureCompleter::laneForCaller()});
  }
  queueChanged_.notify_one();
  return work;
}

void ProcessGroupMapReduce::completionLoop() {
  // Copies back into caller tensors must not be recorded by autograd.
  at::NoGradGuard noGrad;
  for (;;) {
    PendingOp op;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queueChanged_.wait(lock, [this] { return !queue_.empty() || closing_; });
      if (queue_.empty()) {
        return;
      }
      op = std::move(queue_.front());
      queue_.pop_front();
    }
    std::exception_ptr error;
    const mr_result rc = mr_wait(op.request);
    if (rc != MR_OK) {
      error = libraryError(op.work->description(), rc);
    } else if (op.finish) {
      try {
        op.finish();
      } catch (...) {
        error = std::current_exception();
      }
    }
    // Staging buffers are released before anyone is woken up.
    op.finish = nullptr;
    // Never run user callbacks here: one may wait for an op that only this thread can finish.
    completer_->post(op.lane, [work = std::move(op.work), error] {
      try {
        work->complete(error);
      } catch (const std::exception& e) {
        TORCH_WARN("mapreduce: a completion callback of ", work->description(), " threw: ", errorText(e));
      }
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Collectives

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::allreduce(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceOptions& opts) {
  constexpr const char* kName = "allreduce";
  at::NoGradGuard noGrad;
  const at::Tensor& tensor = checkSingleTensor(kName, tensors);
  const mr_dtype dtype = checkTensor(kName, tensor);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, tensor);

  at::Tensor buffer = tensor.contiguous();
  std::function<void()> finish = finishInto(tensor, buffer, buffer);
  void* data = buffer.data_ptr();
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::ALLREDUCE,
      "mapreduce:all_reduce",
      describe(kName, tensor, reduceOpName(opts.reduceOp)),
      tensors,
      [=](mr_comm* comm, mr_request** request) {
        return mr_iallreduce(comm, data, count, dtype, op, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::broadcast(
    std::vector<at::Tensor>& tensors,
    const c10d::BroadcastOptions& opts) {
  constexpr const char* kName = "broadcast";
  at::NoGradGuard noGrad;
  const at::Tensor& tensor = checkSingleTensor(kName, tensors);
  const mr_dtype dtype = checkTensor(kName, tensor);
  TORCH_CHECK(opts.rootTensor == 0, "mapreduce broadcast: rootTensor must be 0, got ", opts.rootTensor);
  TORCH_CHECK(
      opts.rootRank >= 0 && opts.rootRank < size_,
      "mapreduce broadcast: root rank ",
      opts.rootRank,
      " is out of range for world size ",
      size_);
  const int root = static_cast<int>(opts.rootRank);

  at::Tensor buffer = tensor.contiguous();
  std::function<void()> finish = finishInto(tensor, buffer, buffer);
  if (root == rank_) {
    finish = [buffer] {}; // the root's tensor is only read
  }
  void* data = buffer.data_ptr();
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::BROADCAST,
      "mapreduce:broadcast",
      describe(kName, tensor),
      tensors,
      [=](mr_comm* comm, mr_request** request) {
        return mr_ibroadcast(comm, data, count, dtype, root, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::allgather(
    std::vector<std::vector<at::Tensor>>& outputTensors,
    std::vector<at::Tensor>& inputTensors,
    const c10d::AllgatherOptions& /*opts*/) {
  constexpr const char* kName = "allgather";
  at::NoGradGuard noGrad;
  const at::Tensor& input = checkSingleTensor(kName, inputTensors);
  const mr_dtype dtype = checkTensor(kName, input);
  const std::vector<at::Tensor>& outputs =
      checkPerRankList(kName, outputTensors, input, size_, "output", "input");
  const int64_t n = input.numel();

  at::Tensor send = input.contiguous();
  at::Tensor gathered = flatBuffer(input, n * size_);
  auto finish = [outputs, send, gathered, n] {
    for (size_t i = 0; i < outputs.size(); ++i) {
      outputs[i].copy_(gathered.narrow(0, static_cast<int64_t>(i) * n, n).view(outputs[i].sizes()));
    }
  };
  const void* sendData = send.data_ptr();
  void* recvData = gathered.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::ALLGATHER,
      "mapreduce:all_gather",
      describe(kName, input),
      outputs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_iallgather(comm, sendData, recvData, count, dtype, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::_allgather_base(
    at::Tensor& outputBuffer,
    at::Tensor& inputBuffer,
    const c10d::AllgatherOptions& /*opts*/) {
  constexpr const char* kName = "all_gather_into_tensor";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkTensor(kName, inputBuffer);
  checkTensor(kName, outputBuffer);
  checkSameDtype(kName, inputBuffer, outputBuffer);
  const int64_t n = inputBuffer.numel();
  TORCH_CHECK(
      outputBuffer.numel() == n * size_,
      "mapreduce all_gather_into_tensor: output must have world size (",
      size_,
      ") times the input's ",
      n,
      " elements, got ",
      outputBuffer.numel());

  const at::Tensor output = outputBuffer;
  at::Tensor recv = output.is_contiguous() ? output : flatBuffer(output, n * size_);
  at::Tensor send = inputBuffer.contiguous();
  if (send.is_alias_of(recv)) {
    // In-place use (input is this rank's slice of the output): the library gets disjoint buffers.
    send = send.clone();
  }
  std::function<void()> finish = finishInto(output, send, recv);
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::_ALLGATHER_BASE,
      "mapreduce:all_gather_into_tensor",
      describe(kName, inputBuffer),
      {output},
      [=](mr_comm* comm, mr_request** request) {
        return mr_iallgather(comm, sendData, recvData, count, dtype, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::reduce_scatter(
    std::vector<at::Tensor>& outputTensors,
    std::vector<std::vector<at::Tensor>>& inputTensors,
    const c10d::ReduceScatterOptions& opts) {
  constexpr const char* kName = "reduce_scatter";
  at::NoGradGuard noGrad;
  const at::Tensor& output = checkSingleTensor(kName, outputTensors);
  const mr_dtype dtype = checkTensor(kName, output);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, output);
  const std::vector<at::Tensor>& inputs =
      checkPerRankList(kName, inputTensors, output, size_, "input", "output");
  const int64_t n = output.numel();

  at::Tensor send = flatBuffer(output, n * size_);
  for (size_t i = 0; i < inputs.size(); ++i) {
    send.narrow(0, static_cast<int64_t>(i) * n, n).view(inputs[i].sizes()).copy_(inputs[i]);
  }
  at::Tensor recv = output.is_contiguous() ? output : flatBuffer(output, n);
  std::function<void()> finish = finishInto(output, send, recv);
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::REDUCE_SCATTER,
      "mapreduce:reduce_scatter",
      describe(kName, output, reduceOpName(opts.reduceOp)),
      outputTensors,
      [=](mr_comm* comm, mr_request** request) {
        return mr_ireduce_scatter(comm, sendData, recvData, count, dtype, op, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::_reduce_scatter_base(
    at::Tensor& outputBuffer,
    at::Tensor& inputBuffer,
    const c10d::ReduceScatterOptions& opts) {
  constexpr const char* kName = "reduce_scatter_tensor";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkTensor(kName, outputBuffer);
  checkTensor(kName, inputBuffer);
  checkSameDtype(kName, outputBuffer, inputBuffer);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, outputBuffer);
  const int64_t n = outputBuffer.numel();
  TORCH_CHECK(
      inputBuffer.numel() == n * size_,
      "mapreduce reduce_scatter_tensor: input must have world size (",
      size_,
      ") times the output's ",
      n,
      " elements, got ",
      inputBuffer.numel());

  const at::Tensor output = outputBuffer;
  at::Tensor recv = output.is_contiguous() ? output : flatBuffer(output, n);
  at::Tensor send = inputBuffer.contiguous();
  if (send.is_alias_of(recv)) {
    send = send.clone();
  }
  std::function<void()> finish = finishInto(output, send, recv);
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::_REDUCE_SCATTER_BASE,
      "mapreduce:reduce_scatter_tensor",
      describe(kName, outputBuffer, reduceOpName(opts.reduceOp)),
      {output},
      [=](mr_comm* comm, mr_request** request) {
        return mr_ireduce_scatter(comm, sendData, recvData, count, dtype, op, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::barrier(const c10d::BarrierOptions& /*opts*/) {
  return enqueue(
      c10d::OpType::BARRIER,
      "mapreduce:barrier",
      "barrier",
      {},
      [](mr_comm* comm, mr_request** request) { return mr_ibarrier(comm, request); },
      nullptr);
}

c10::intrusive_ptr<ProcessGroupMapReduce> createProcessGroupMapReduce(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout) {
  return c10::make_intrusive<ProcessGroupMapReduce>(store, rank, size, timeout);
}

} // namespace mapreduce_torch
