#include "ProcessGroupMapReduce.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>

#include <ATen/core/ivalue.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
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
      "; the mapreduce backend supports CPU and CUDA tensors");
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

std::vector<at::Tensor*> pointersTo(std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor*> out;
  for (auto& t : tensors) {
    out.push_back(&t);
  }
  return out;
}

int checkRoot(const char* collective, int64_t root, int size) {
  TORCH_CHECK(
      root >= 0 && root < size,
      "mapreduce ",
      collective,
      ": root rank ",
      root,
      " is out of range for world size ",
      size);
  return static_cast<int>(root);
}

// The tensors of a coalesced call: as many inputs as outputs, one dtype, CPU. Returns the dtype.
mr_dtype checkCoalesced(
    const char* collective,
    const std::vector<at::Tensor>& outputs,
    const std::vector<at::Tensor>& inputs) {
  TORCH_CHECK(!inputs.empty(), "mapreduce ", collective, ": got no tensors");
  TORCH_CHECK(
      outputs.size() == inputs.size(),
      "mapreduce ",
      collective,
      ": expected as many outputs as inputs, got ",
      outputs.size(),
      " and ",
      inputs.size());
  const mr_dtype dtype = checkTensor(collective, inputs[0]);
  for (size_t i = 0; i < inputs.size(); ++i) {
    checkTensor(collective, inputs[i]);
    checkTensor(collective, outputs[i]);
    checkSameDtype(collective, inputs[0], inputs[i]);
    checkSameDtype(collective, inputs[0], outputs[i]);
  }
  return dtype;
}

// Element counts and displacements of an all-to-all-v from dim-0 split sizes (empty: equal).
struct Splits {
  std::vector<size_t> counts;
  std::vector<size_t> displs;
  int64_t total = 0;
};

Splits toSplits(const char* collective, const char* role, const at::Tensor& t, const std::vector<int64_t>& sizes, int size) {
  Splits s;
  const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
  const int64_t perRow = rows == 0 ? 0 : t.numel() / rows;
  if (sizes.empty()) {
    TORCH_CHECK(
        rows % size == 0,
        "mapreduce ",
        collective,
        ": the ",
        role,
        "'s first dimension (",
        rows,
        ") must divide by the world size (",
        size,
        ") when no split sizes are given");
    s.counts.assign(size, static_cast<size_t>(rows / size * perRow));
  } else {
    TORCH_CHECK(
        static_cast<int>(sizes.size()) == size,
        "mapreduce ",
        collective,
        ": expected ",
        size,
        " ",
        role,
        " split sizes (one per rank), got ",
        sizes.size());
    int64_t sum = 0;
    for (int64_t v : sizes) {
      TORCH_CHECK(v >= 0, "mapreduce ", collective, ": negative ", role, " split size ", v);
      sum += v;
      s.counts.push_back(static_cast<size_t>(v * perRow));
    }
    TORCH_CHECK(
        sum == rows,
        "mapreduce ",
        collective,
        ": ",
        role,
        " split sizes add up to ",
        sum,
        " rows but the ",
        role,
        " has ",
        rows);
  }
  size_t at = 0;
  for (size_t c : s.counts) {
    s.displs.push_back(at);
    at += c;
  }
  s.total = static_cast<int64_t>(at);
  return s;
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
// Library groups (mr_group_start) open on this thread through startCoalescing.
thread_local int coalescingDepth = 0;
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
  expose();
  return future_;
}

void MapReduceWork::setHeldBehind(std::string earlier) {
  std::lock_guard<std::mutex> lock(mutex_);
  heldBehind_ = std::move(earlier);
}

void MapReduceWork::setStarted() {
  std::lock_guard<std::mutex> lock(mutex_);
  heldBehind_.clear();
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
    std::string held;
    if (!heldBehind_.empty()) {
      held = c10::str(
          " (it never started: it waited for the Future callbacks of the earlier ",
          heldBehind_,
          ", issued from the same thread, to finish; a callback that waits for an op issued after "
          "its own cannot)");
    }
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
            " ms",
            held,
            "; the communicator was aborted and this process group can no longer be used"));
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
// StagedWork (CUDA tensors through pinned host memory)

StagedWork::StagedWork(
    int rank,
    c10d::OpType opType,
    c10::Device device,
    c10::intrusive_ptr<c10d::Work> hostWork,
    std::vector<at::Tensor> deviceOutputs,
    std::vector<at::Tensor> hostOutputs)
    : c10d::Work(rank, opType),
      device_(device),
      hostWork_(std::move(hostWork)),
      deviceOutputs_(std::move(deviceOutputs)),
      hostOutputs_(std::move(hostOutputs)),
      future_(c10::make_intrusive<c10::ivalue::Future>(
          c10::ListType::create(c10::TensorType::get()),
          std::vector<c10::Device>{device_})) {
  future_->addCallback([this](c10::ivalue::Future& f) { finish(f.hasError() ? f.exception_ptr() : nullptr); });
}

void StagedWork::copyBack(c10::ivalue::Future& hostFuture) {
  if (hostFuture.hasError()) {
    future_->setError(hostFuture.exception_ptr());
    return;
  }
  try {
    at::NoGradGuard noGrad;
    c10::impl::VirtualGuardImpl impl(device_.type());
    const c10::Stream stream = impl.getStreamFromGlobalPool(device_);
    c10::StreamGuard guard(stream);
    for (size_t i = 0; i < deviceOutputs_.size(); ++i) {
      deviceOutputs_[i].copy_(hostOutputs_[i], /*non_blocking=*/true);
    }
    c10::Event copied(device_.type());
    copied.record(stream);
    copied_ = std::move(copied);
    // Completed on `stream`: the Future records its own event there for its consumers.
    future_->markCompleted(c10::IValue(deviceOutputs_));
  } catch (...) {
    future_->setError(std::current_exception());
  }
}

c10::intrusive_ptr<c10::ivalue::Future> StagedWork::getFuture() {
  // This Future's callbacks run inside the host op's completion (copyBack).
  hostWork_->getFuture();
  return future_;
}

bool StagedWork::wait(std::chrono::milliseconds timeout) {
  hostWork_->wait(timeout);
  {
    // The Future completes right after the host op's (copy back in between).
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return completed_; });
    if (exception_) {
      std::rethrow_exception(exception_);
    }
  }
  if (copied_) {
    c10::impl::VirtualGuardImpl impl(device_.type());
    copied_->block(impl.getStream(device_));
  }
  return true;
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
  owner_->backend = this;
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
  {
    // Ops held back behind callbacks start as those callbacks finish (graceful shutdown, bounded
    // by the timeout); the rest fail. Not from a completer lane: a callback that closes the group
    // may be what they wait for.
    std::unique_lock<std::mutex> issue(issueMutex_);
    const auto noneHeld = [this] {
      return std::all_of(contexts_.begin(), contexts_.end(), [](const Context& c) { return c.held.empty(); });
    };
    if (!abortFirst && completerDepth == 0) {
      settled_.wait_for(issue, options_->timeout, noneHeld);
    }
    for (Context& context : contexts_) {
      for (auto& op : context.held) {
        std::lock_guard<std::mutex> lock(mutex_);
        queue_.push_back(PendingOp{
            nullptr,
            op,
            std::make_exception_ptr(c10::DistBackendError(
                {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                c10::str(
                    "mapreduce: ",
                    op->work->description(),
                    ": the process group was ",
                    abortFirst ? "aborted" : "shut down",
                    " before it started (it waited for the Future callbacks of an earlier op)")))});
      }
      context.held.clear();
    }
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopCompletion_ = true;
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
  {
    // From here on, completer tasks still running leave the backend alone.
    std::lock_guard<std::mutex> lock(owner_->mutex);
    owner_->backend = nullptr;
  }
  comm.reset();
  std::lock_guard<std::mutex> lock(mutex_);
  comm_.reset();
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::onHost(
    const char* collective,
    c10d::OpType opType,
    const std::vector<at::Tensor*>& args,
    const std::vector<at::Tensor>& outputs,
    const std::function<c10::intrusive_ptr<c10d::Work>()>& run) {
  std::optional<c10::Device> device;
  for (const at::Tensor* t : args) {
    if (t->defined() && t->is_cuda()) {
      TORCH_CHECK(
          !device || *device == t->device(),
          "mapreduce ",
          collective,
          ": tensors on ",
          *device,
          " and ",
          t->device(),
          "; one device per call");
      device = t->device();
    }
  }
  if (!device) {
    return nullptr;
  }
  at::NoGradGuard noGrad;
  std::vector<at::Tensor> originals;
  std::vector<at::Tensor> copies;
  for (at::Tensor* t : args) {
    TORCH_CHECK(
        t->defined() && t->device() == *device,
        "mapreduce ",
        collective,
        ": mixes CUDA and other tensors; one device per call");
    // Blocking copy on the caller's current stream: ordered after what the caller queued
    // there, and finished before the library reads the host memory.
    at::Tensor host = at::empty(t->sizes(), t->options().device(at::kCPU).pinned_memory(true));
    host.copy_(*t);
    originals.push_back(*t);
    copies.push_back(host);
    *t = host;
  }
  c10::intrusive_ptr<c10d::Work> hostWork;
  try {
    hostWork = run();
  } catch (...) {
    for (size_t i = 0; i < args.size(); ++i) {
      *args[i] = originals[i];
    }
    throw;
  }
  for (size_t i = 0; i < args.size(); ++i) {
    *args[i] = originals[i];
  }
  std::vector<at::Tensor> hostOutputs;
  for (const at::Tensor& out : outputs) {
    size_t k = 0;
    while (k < originals.size() && !originals[k].is_same(out)) {
      ++k;
    }
    TORCH_INTERNAL_ASSERT(k < originals.size(), "mapreduce ", collective, ": output not among the staged tensors");
    hostOutputs.push_back(copies[k]);
  }
  auto work =
      c10::make_intrusive<StagedWork>(rank_, opType, *device, hostWork, outputs, std::move(hostOutputs));
  // Runs on the host op's completer lane (or here, if it already completed). Not through
  // getFuture(): nobody else can add callbacks to the host op's Future.
  auto* host = dynamic_cast<MapReduceWork*>(hostWork.get());
  TORCH_INTERNAL_ASSERT(host != nullptr, "mapreduce ", collective, ": the host op is not a MapReduceWork");
  host->future()->addCallback([work](c10::ivalue::Future& f) { work->copyBack(f); });
  return work;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::enqueue(
    c10d::OpType opType,
    const char* profilingTitle,
    std::string description,
    std::vector<at::Tensor> outputs,
    const std::function<mr_result(mr_comm*, mr_request**)>& start,
    std::function<void()> finish) {
  // Declared before the lock, so dropped after it is released (see startLocked).
  std::vector<std::shared_ptr<IssuedOp>> released;
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
  auto op = std::make_shared<IssuedOp>();
  op->work = c10::make_intrusive<MapReduceWork>(
      rank_,
      opType,
      profilingTitle,
      description,
      std::move(outputs),
      std::weak_ptr<Communicator>(comm),
      options_->timeout);
  op->start = start;
  op->finish = std::move(finish);
  op->lane = FutureCompleter::laneForCaller();
  Context& context = contexts_[op->lane];
  // Inside a library group the op must start now; startCoalescing waited for the context.
  if (coalescingDepth == 0) {
    for (const auto& earlier : context.unsettled) {
      if (earlier->work->exposed()) {
        op->gates.push_back(earlier);
      }
    }
  }
  context.unsettled.push_back(op);
  if (coalescingDepth == 0 && (!context.held.empty() || !op->gates.empty())) {
    op->work->setHeldBehind(
        op->gates.empty() ? context.held.back()->work->description() : op->gates.back()->work->description());
    context.held.push_back(op);
    return op->work;
  }
  try {
    startLocked(op, /*rethrow=*/true, released);
  } catch (...) {
    context.unsettled.pop_back();
    throw;
  }
  return op->work;
}

bool ProcessGroupMapReduce::mustWaitLocked(const Context& context) {
  return !context.held.empty() ||
      std::any_of(context.unsettled.begin(), context.unsettled.end(), [](const auto& op) {
           return op->work->exposed();
         });
}

void ProcessGroupMapReduce::startLocked(
    const std::shared_ptr<IssuedOp>& op,
    bool rethrow,
    std::vector<std::shared_ptr<IssuedOp>>& released) {
  std::shared_ptr<Communicator> comm;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    comm = comm_;
  }
  mr_request* request = nullptr;
  std::exception_ptr error;
  if (op->start) {
    const mr_result rc = comm ? op->start(comm->get(), &request) : MR_ERR_ABORTED;
    if (rc != MR_OK) {
      if (rethrow) {
        checkLibrary(op->work->description(), rc);
      }
      error = libraryError(op->work->description(), rc);
    } else {
      TORCH_INTERNAL_ASSERT(request != nullptr, "mapreduce: ", op->work->description(), " returned no request");
    }
  }
  op->start = nullptr;
  // An earlier op may live on only in these gates: its tensors must not be freed here.
  for (auto& gate : op->gates) {
    released.push_back(std::move(gate));
  }
  op->gates.clear();
  op->work->setStarted();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(PendingOp{request, op, error});
  }
  queueChanged_.notify_one();
}

std::vector<std::shared_ptr<ProcessGroupMapReduce::IssuedOp>> ProcessGroupMapReduce::settle(
    const std::shared_ptr<IssuedOp>& op) {
  std::vector<std::shared_ptr<IssuedOp>> released;
  {
    std::lock_guard<std::mutex> issue(issueMutex_);
    op->settled = true;
    Context& context = contexts_[op->lane];
    auto& unsettled = context.unsettled;
    unsettled.erase(std::remove(unsettled.begin(), unsettled.end(), op), unsettled.end());
    while (!context.held.empty()) {
      const auto& gates = context.held.front()->gates;
      if (!std::all_of(gates.begin(), gates.end(), [](const auto& g) { return g->settled; })) {
        break;
      }
      const std::shared_ptr<IssuedOp> next = context.held.front();
      context.held.pop_front();
      startLocked(next, /*rethrow=*/false, released);
    }
  }
  settled_.notify_all();
  return released;
}

void ProcessGroupMapReduce::completionLoop() {
  // Copies back into caller tensors must not be recorded by autograd.
  at::NoGradGuard noGrad;
  for (;;) {
    PendingOp pending;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queueChanged_.wait(lock, [this] { return !queue_.empty() || stopCompletion_; });
      if (queue_.empty()) {
        return;
      }
      pending = std::move(queue_.front());
      queue_.pop_front();
    }
    std::shared_ptr<IssuedOp> op = std::move(pending.op);
    std::exception_ptr error = pending.error;
    if (!error) {
      // No request: a marker that completes once every op queued before it has.
      const mr_result rc = pending.request == nullptr ? MR_OK : mr_wait(pending.request);
      if (rc != MR_OK) {
        error = libraryError(op->work->description(), rc);
      } else if (op->finish) {
        try {
          op->finish();
        } catch (...) {
          error = std::current_exception();
        }
      }
    }
    // Staging buffers are released before anyone is woken up.
    op->finish = nullptr;
    // Never run user callbacks here: one may wait for an op that only this thread can finish.
    const size_t lane = op->lane;
    completer_->post(lane, [owner = owner_, op = std::move(op), error] {
      try {
        op->work->complete(error);
      } catch (const std::exception& e) {
        TORCH_WARN("mapreduce: a completion callback of ", op->work->description(), " threw: ", errorText(e));
      }
      // The callbacks ran: ops held back behind them may start. Ops it let go of are dropped
      // after the lock: freeing their tensors may need the GIL, and a thread holding the GIL
      // may be waiting for our locks to issue an op (a deadlock seen with DDP's PowerSGD hook).
      std::vector<std::shared_ptr<IssuedOp>> released;
      {
        std::lock_guard<std::mutex> lock(owner->mutex);
        if (owner->backend != nullptr) {
          released = owner->backend->settle(op);
        }
      }
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Collectives

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::allreduce(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("allreduce", c10d::OpType::ALLREDUCE, staged, tensors, [&] { return allreduce(tensors, opts); })) {
      return work;
    }
  }
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
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("broadcast", c10d::OpType::BROADCAST, staged, tensors, [&] { return broadcast(tensors, opts); })) {
      return work;
    }
  }
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
    const c10d::AllgatherOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(inputTensors);
    std::vector<at::Tensor> outs;
    for (auto& list : outputTensors) {
      for (auto& t : list) {
        staged.push_back(&t);
        outs.push_back(t);
      }
    }
    if (auto work = onHost("allgather", c10d::OpType::ALLGATHER, staged, outs, [&] {
          return allgather(outputTensors, inputTensors, opts);
        })) {
      return work;
    }
  }
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
    const c10d::AllgatherOptions& opts) {
  {
    std::vector<at::Tensor*> staged{&outputBuffer, &inputBuffer};
    if (auto work = onHost("all_gather_into_tensor", c10d::OpType::_ALLGATHER_BASE, staged, {outputBuffer}, [&] { return _allgather_base(outputBuffer, inputBuffer, opts); })) {
      return work;
    }
  }
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
  {
    std::vector<at::Tensor*> staged = pointersTo(outputTensors);
    for (auto& list : inputTensors) {
      for (auto& t : list) {
        staged.push_back(&t);
      }
    }
    if (auto work = onHost("reduce_scatter", c10d::OpType::REDUCE_SCATTER, staged, outputTensors, [&] {
          return reduce_scatter(outputTensors, inputTensors, opts);
        })) {
      return work;
    }
  }
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
  {
    std::vector<at::Tensor*> staged{&outputBuffer, &inputBuffer};
    if (auto work = onHost("reduce_scatter_tensor", c10d::OpType::_REDUCE_SCATTER_BASE, staged, {outputBuffer}, [&] { return _reduce_scatter_base(outputBuffer, inputBuffer, opts); })) {
      return work;
    }
  }
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

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::reduce(
    std::vector<at::Tensor>& tensors,
    const c10d::ReduceOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("reduce", c10d::OpType::REDUCE, staged, tensors, [&] { return reduce(tensors, opts); })) {
      return work;
    }
  }
  constexpr const char* kName = "reduce";
  at::NoGradGuard noGrad;
  const at::Tensor& tensor = checkSingleTensor(kName, tensors);
  const mr_dtype dtype = checkTensor(kName, tensor);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, tensor);
  TORCH_CHECK(opts.rootTensor == 0, "mapreduce reduce: rootTensor must be 0, got ", opts.rootTensor);
  const int root = checkRoot(kName, opts.rootRank, size_);

  at::Tensor buffer = tensor.contiguous();
  // Only the root's tensor changes; the others are only read.
  std::function<void()> finish = rank_ == root ? finishInto(tensor, buffer, buffer) : [buffer] {};
  const void* send = buffer.data_ptr();
  void* recv = rank_ == root ? buffer.data_ptr() : nullptr;
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::REDUCE,
      "mapreduce:reduce",
      describe(kName, tensor, reduceOpName(opts.reduceOp)),
      tensors,
      [=](mr_comm* comm, mr_request** request) {
        return mr_ireduce(comm, send, recv, count, dtype, op, root, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::gather(
    std::vector<std::vector<at::Tensor>>& outputTensors,
    std::vector<at::Tensor>& inputTensors,
    const c10d::GatherOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(inputTensors);
    std::vector<at::Tensor> outs;
    for (auto& list : outputTensors) {
      for (auto& t : list) {
        staged.push_back(&t);
        outs.push_back(t);
      }
    }
    if (auto work = onHost("gather", c10d::OpType::GATHER, staged, outs, [&] {
          return gather(outputTensors, inputTensors, opts);
        })) {
      return work;
    }
  }
  constexpr const char* kName = "gather";
  at::NoGradGuard noGrad;
  const at::Tensor& input = checkSingleTensor(kName, inputTensors);
  const mr_dtype dtype = checkTensor(kName, input);
  const int root = checkRoot(kName, opts.rootRank, size_);
  const int64_t n = input.numel();

  at::Tensor send = input.contiguous();
  std::vector<at::Tensor> outputs;
  at::Tensor gathered;
  void* recvData = nullptr;
  if (rank_ == root) {
    outputs = checkPerRankList(kName, outputTensors, input, size_, "output", "input");
    gathered = flatBuffer(input, n * size_);
    recvData = gathered.data_ptr();
  } else {
    TORCH_CHECK(
        outputTensors.empty() || (outputTensors.size() == 1 && outputTensors[0].empty()),
        "mapreduce gather: only the root (rank ",
        root,
        ") passes output tensors");
  }
  auto finish = [outputs, send, gathered, n] {
    for (size_t i = 0; i < outputs.size(); ++i) {
      outputs[i].copy_(gathered.narrow(0, static_cast<int64_t>(i) * n, n).view(outputs[i].sizes()));
    }
  };
  const void* sendData = send.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::GATHER,
      "mapreduce:gather",
      describe(kName, input),
      outputs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_igather(comm, sendData, recvData, count, dtype, root, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::scatter(
    std::vector<at::Tensor>& outputTensors,
    std::vector<std::vector<at::Tensor>>& inputTensors,
    const c10d::ScatterOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(outputTensors);
    for (auto& list : inputTensors) {
      for (auto& t : list) {
        staged.push_back(&t);
      }
    }
    if (auto work = onHost("scatter", c10d::OpType::SCATTER, staged, outputTensors, [&] {
          return scatter(outputTensors, inputTensors, opts);
        })) {
      return work;
    }
  }
  constexpr const char* kName = "scatter";
  at::NoGradGuard noGrad;
  const at::Tensor& output = checkSingleTensor(kName, outputTensors);
  const mr_dtype dtype = checkTensor(kName, output);
  const int root = checkRoot(kName, opts.rootRank, size_);
  const int64_t n = output.numel();

  at::Tensor send;
  const void* sendData = nullptr;
  if (rank_ == root) {
    const std::vector<at::Tensor>& inputs = checkPerRankList(kName, inputTensors, output, size_, "input", "output");
    send = flatBuffer(output, n * size_);
    for (size_t i = 0; i < inputs.size(); ++i) {
      send.narrow(0, static_cast<int64_t>(i) * n, n).view(inputs[i].sizes()).copy_(inputs[i]);
    }
    sendData = send.data_ptr();
  } else {
    TORCH_CHECK(
        inputTensors.empty() || (inputTensors.size() == 1 && inputTensors[0].empty()),
        "mapreduce scatter: only the root (rank ",
        root,
        ") passes input tensors");
  }
  at::Tensor recv = output.is_contiguous() ? output : flatBuffer(output, n);
  std::function<void()> finish = finishInto(output, send, recv);
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(n);
  return enqueue(
      c10d::OpType::SCATTER,
      "mapreduce:scatter",
      describe(kName, output),
      outputTensors,
      [=](mr_comm* comm, mr_request** request) {
        return mr_iscatter(comm, sendData, recvData, count, dtype, root, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::alltoall_base(
    at::Tensor& outputBuffer,
    at::Tensor& inputBuffer,
    std::vector<int64_t>& outputSplitSizes,
    std::vector<int64_t>& inputSplitSizes,
    const c10d::AllToAllOptions& opts) {
  {
    std::vector<at::Tensor*> staged{&outputBuffer, &inputBuffer};
    if (auto work = onHost("all_to_all_single", c10d::OpType::ALLTOALL_BASE, staged, {outputBuffer}, [&] { return alltoall_base(outputBuffer, inputBuffer, outputSplitSizes, inputSplitSizes, opts); })) {
      return work;
    }
  }
  constexpr const char* kName = "all_to_all_single";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkTensor(kName, inputBuffer);
  checkTensor(kName, outputBuffer);
  checkSameDtype(kName, inputBuffer, outputBuffer);
  Splits in = toSplits(kName, "input", inputBuffer, inputSplitSizes, size_);
  Splits out = toSplits(kName, "output", outputBuffer, outputSplitSizes, size_);

  const at::Tensor output = outputBuffer;
  at::Tensor send = inputBuffer.contiguous();
  at::Tensor recv = output.is_contiguous() ? output : flatBuffer(output, output.numel());
  if (send.numel() > 0 && recv.numel() > 0 && send.is_alias_of(recv)) {
    send = send.clone();
  }
  std::function<void()> finish = finishInto(output, send, recv);
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  // Without split sizes every rank splits equally (as gloo, all ranks must then call it
  // without them): the equal all-to-all, which shared memory carries.
  const bool equal = inputSplitSizes.empty() && outputSplitSizes.empty();
  if (equal) {
    TORCH_CHECK(
        in.counts == out.counts,
        "mapreduce ",
        kName,
        ": with equal splits the input (",
        inputBuffer.numel(),
        " elements) and the output (",
        outputBuffer.numel(),
        ") must hold as many elements");
  }
  const size_t block = in.counts.empty() ? 0 : in.counts[0];
  return enqueue(
      c10d::OpType::ALLTOALL_BASE,
      "mapreduce:all_to_all_single",
      describe(kName, inputBuffer),
      {output},
      [=](mr_comm* comm, mr_request** request) {
        if (equal) {
          return mr_ialltoall(comm, sendData, recvData, block, dtype, request);
        }
        return mr_ialltoallv(
            comm,
            sendData,
            in.counts.data(),
            in.displs.data(),
            recvData,
            out.counts.data(),
            out.displs.data(),
            dtype,
            request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::alltoall(
    std::vector<at::Tensor>& outputTensors,
    std::vector<at::Tensor>& inputTensors,
    const c10d::AllToAllOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(outputTensors);
    for (at::Tensor* t : pointersTo(inputTensors)) {
      staged.push_back(t);
    }
    if (auto work = onHost("all_to_all", c10d::OpType::ALLTOALL, staged, outputTensors, [&] {
          return alltoall(outputTensors, inputTensors, opts);
        })) {
      return work;
    }
  }
  constexpr const char* kName = "all_to_all";
  at::NoGradGuard noGrad;
  TORCH_CHECK(
      static_cast<int>(inputTensors.size()) == size_ && static_cast<int>(outputTensors.size()) == size_,
      "mapreduce all_to_all: expected ",
      size_,
      " input and output tensors (one per rank), got ",
      inputTensors.size(),
      " and ",
      outputTensors.size());
  const mr_dtype dtype = checkCoalesced(kName, outputTensors, inputTensors);
  Splits in;
  Splits out;
  std::vector<at::Tensor> flatInputs;
  for (int r = 0; r < size_; ++r) {
    in.displs.push_back(static_cast<size_t>(in.total));
    in.counts.push_back(static_cast<size_t>(inputTensors[r].numel()));
    in.total += inputTensors[r].numel();
    out.displs.push_back(static_cast<size_t>(out.total));
    out.counts.push_back(static_cast<size_t>(outputTensors[r].numel()));
    out.total += outputTensors[r].numel();
    flatInputs.push_back(inputTensors[r].reshape({-1}));
  }
  at::Tensor send = at::cat(flatInputs);
  at::Tensor recv = flatBuffer(inputTensors[0], out.total);
  std::vector<at::Tensor> outputs = outputTensors;
  auto finish = [outputs, send, recv, out] {
    for (size_t r = 0; r < outputs.size(); ++r) {
      const auto n = static_cast<int64_t>(out.counts[r]);
      outputs[r].copy_(recv.narrow(0, static_cast<int64_t>(out.displs[r]), n).view(outputs[r].sizes()));
    }
  };
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  return enqueue(
      c10d::OpType::ALLTOALL,
      "mapreduce:all_to_all",
      describe(kName, inputTensors[0]),
      outputs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_ialltoallv(
            comm,
            sendData,
            in.counts.data(),
            in.displs.data(),
            recvData,
            out.counts.data(),
            out.displs.data(),
            dtype,
            request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::allreduce_coalesced(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceCoalescedOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("allreduce_coalesced", c10d::OpType::COALESCED, staged, tensors, [&] {
          return allreduce_coalesced(tensors, opts);
        })) {
      return work;
    }
  }
  constexpr const char* kName = "allreduce_coalesced";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkCoalesced(kName, tensors, tensors);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, tensors[0]);
  std::vector<at::Tensor> flat;
  for (const auto& t : tensors) {
    flat.push_back(t.reshape({-1}));
  }
  at::Tensor buffer = at::cat(flat);
  std::vector<at::Tensor> outputs = tensors;
  auto finish = [outputs, buffer] {
    int64_t at = 0;
    for (const auto& t : outputs) {
      t.copy_(buffer.narrow(0, at, t.numel()).view(t.sizes()));
      at += t.numel();
    }
  };
  void* data = buffer.data_ptr();
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::COALESCED,
      "mapreduce:all_reduce_coalesced",
      c10::str(kName, " of ", tensors.size(), " tensors, ", count, " x ", torchDtypeName(tensors[0].scalar_type()), " (", reduceOpName(opts.reduceOp), ")"),
      outputs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_iallreduce(comm, data, count, dtype, op, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(outputs);
    for (at::Tensor* t : pointersTo(inputs)) {
      staged.push_back(t);
    }
    if (auto work = onHost("all_gather_into_tensor_coalesced", c10d::OpType::COALESCED, staged, outputs, [&] { return allgather_into_tensor_coalesced(outputs, inputs, opts); })) {
      return work;
    }
  }
  constexpr const char* kName = "all_gather_into_tensor_coalesced";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkCoalesced(kName, outputs, inputs);
  std::vector<at::Tensor> flat;
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(
        outputs[i].numel() == inputs[i].numel() * size_,
        "mapreduce ",
        kName,
        ": output ",
        i,
        " must have world size (",
        size_,
        ") times the input's ",
        inputs[i].numel(),
        " elements, got ",
        outputs[i].numel());
    flat.push_back(inputs[i].reshape({-1}));
    offsets.push_back(total);
    total += inputs[i].numel();
  }
  // Every rank contributes its inputs side by side; rank r's block of the result holds rank r's.
  at::Tensor send = at::cat(flat);
  at::Tensor recv = flatBuffer(inputs[0], total * size_);
  std::vector<at::Tensor> outs = outputs;
  const int size = size_;
  auto finish = [outs, send, recv, offsets, total, size] {
    const at::Tensor byRank = recv.view({size, total});
    for (size_t i = 0; i < outs.size(); ++i) {
      const int64_t n = outs[i].numel() / size;
      outs[i].copy_(byRank.narrow(1, offsets[i], n).reshape(outs[i].sizes()));
    }
  };
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(total);
  return enqueue(
      c10d::OpType::COALESCED,
      "mapreduce:all_gather_into_tensor_coalesced",
      c10::str(kName, " of ", inputs.size(), " tensors, ", total, " x ", torchDtypeName(inputs[0].scalar_type())),
      outs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_iallgather(comm, sendData, recvData, count, dtype, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  {
    std::vector<at::Tensor*> staged = pointersTo(outputs);
    for (at::Tensor* t : pointersTo(inputs)) {
      staged.push_back(t);
    }
    if (auto work = onHost("reduce_scatter_tensor_coalesced", c10d::OpType::COALESCED, staged, outputs, [&] { return reduce_scatter_tensor_coalesced(outputs, inputs, opts); })) {
      return work;
    }
  }
  constexpr const char* kName = "reduce_scatter_tensor_coalesced";
  at::NoGradGuard noGrad;
  const mr_dtype dtype = checkCoalesced(kName, outputs, inputs);
  const mr_op op = toLibraryOp(kName, opts.reduceOp, inputs[0]);
  std::vector<at::Tensor> byRank;
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int64_t n = outputs[i].numel();
    TORCH_CHECK(
        inputs[i].numel() == n * size_,
        "mapreduce ",
        kName,
        ": input ",
        i,
        " must have world size (",
        size_,
        ") times the output's ",
        n,
        " elements, got ",
        inputs[i].numel());
    byRank.push_back(inputs[i].reshape({size_, n}));
    offsets.push_back(total);
    total += n;
  }
  // Block r of the packed input holds block r of every input, side by side.
  at::Tensor send = at::cat(byRank, 1).contiguous().view({-1});
  at::Tensor recv = flatBuffer(inputs[0], total);
  std::vector<at::Tensor> outs = outputs;
  auto finish = [outs, send, recv, offsets] {
    for (size_t i = 0; i < outs.size(); ++i) {
      outs[i].copy_(recv.narrow(0, offsets[i], outs[i].numel()).view(outs[i].sizes()));
    }
  };
  const void* sendData = send.data_ptr();
  void* recvData = recv.data_ptr();
  const size_t count = static_cast<size_t>(total);
  return enqueue(
      c10d::OpType::COALESCED,
      "mapreduce:reduce_scatter_tensor_coalesced",
      c10::str(kName, " of ", inputs.size(), " tensors, ", total, " x ", torchDtypeName(inputs[0].scalar_type()), " (", reduceOpName(opts.reduceOp), ")"),
      outs,
      [=](mr_comm* comm, mr_request** request) {
        return mr_ireduce_scatter(comm, sendData, recvData, count, dtype, op, request);
      },
      std::move(finish));
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::send(
    std::vector<at::Tensor>& tensors,
    int dstRank,
    int tag) {
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("send", c10d::OpType::SEND, staged, {}, [&] { return send(tensors, dstRank, tag); })) {
      return work;
    }
  }
  constexpr const char* kName = "send";
  at::NoGradGuard noGrad;
  const at::Tensor& tensor = checkSingleTensor(kName, tensors);
  const mr_dtype dtype = checkTensor(kName, tensor);
  checkRoot("send (destination)", dstRank, size_);
  at::Tensor buffer = tensor.contiguous();
  const void* data = buffer.data_ptr();
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::SEND,
      "mapreduce:send",
      c10::str(describe(kName, tensor), " to rank ", dstRank, " (tag ", tag, ")"),
      tensors,
      [=](mr_comm* comm, mr_request** request) { return mr_isend(comm, data, count, dtype, dstRank, tag, request); },
      [buffer] {});
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::recv(
    std::vector<at::Tensor>& tensors,
    int srcRank,
    int tag) {
  {
    std::vector<at::Tensor*> staged = pointersTo(tensors);
    if (auto work = onHost("recv", c10d::OpType::RECV, staged, tensors, [&] { return recv(tensors, srcRank, tag); })) {
      return work;
    }
  }
  constexpr const char* kName = "recv";
  at::NoGradGuard noGrad;
  const at::Tensor& tensor = checkSingleTensor(kName, tensors);
  const mr_dtype dtype = checkTensor(kName, tensor);
  checkRoot("recv (source)", srcRank, size_);
  at::Tensor buffer = tensor.is_contiguous() ? tensor : flatBuffer(tensor, tensor.numel());
  std::function<void()> finish = finishInto(tensor, buffer, buffer);
  void* data = buffer.data_ptr();
  const size_t count = static_cast<size_t>(buffer.numel());
  return enqueue(
      c10d::OpType::RECV,
      "mapreduce:recv",
      c10::str(describe(kName, tensor), " from rank ", srcRank, " (tag ", tag, ")"),
      tensors,
      [=](mr_comm* comm, mr_request** request) { return mr_irecv(comm, data, count, dtype, srcRank, tag, request); },
      std::move(finish));
}

void ProcessGroupMapReduce::startCoalescing() {
  {
    // The group's ops start as they are issued: let what is held back start first.
    std::unique_lock<std::mutex> issue(issueMutex_);
    const Context& context = contexts_[FutureCompleter::laneForCaller()];
    const std::chrono::milliseconds timeout =
        options_->timeout.count() > 0 ? options_->timeout : std::chrono::hours(24 * 365);
    if (!settled_.wait_for(issue, timeout, [&] { return !mustWaitLocked(context); })) {
      C10_THROW_ERROR(
          DistBackendError,
          c10::str(
              "mapreduce: coalescing could not begin within ",
              timeout.count(),
              " ms: the Future callbacks of an earlier op issued from this thread did not finish"));
    }
  }
  checkLibrary("mr_group_start", mr_group_start());
  ++coalescingDepth;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupMapReduce::endCoalescing() {
  // Sends the group's sends and receives; their Works complete with it.
  if (coalescingDepth > 0) {
    --coalescingDepth;
  }
  checkLibrary("mr_group_end (end of coalescing)", mr_group_end());
  return enqueue(c10d::OpType::COALESCED, "mapreduce:coalesced", "coalesced ops", {}, nullptr, nullptr);
}

void ProcessGroupMapReduce::monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) {
  const std::chrono::milliseconds timeout =
      opts.timeout == c10d::kUnsetTimeout ? options_->timeout : opts.timeout;
  uint64_t call;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    call = monitoredBarriers_++;
  }
  const std::string prefix = c10::str("mapreduce/monitored_barrier/", call, "/");
  const auto arrived = [&](int r) { return c10::str(prefix, "arrived/", r); };
  const std::string released = prefix + "released";
  if (rank_ != 0) {
    store_->set(arrived(rank_), std::vector<uint8_t>{1});
    try {
      store_->wait({released}, timeout);
    } catch (const std::exception& e) {
      C10_THROW_ERROR(
          DistBackendError,
          c10::str(
              "mapreduce monitored_barrier: rank ",
              rank_,
              " was not released by rank 0 within ",
              timeout.count(),
              " ms (rank 0 reports which ranks did not arrive): ",
              errorText(e)));
    }
    return;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<int> missing;
  for (int r = 1; r < size_; ++r) {
    const auto left = std::max(
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()),
        std::chrono::milliseconds(1));
    try {
      store_->wait({arrived(r)}, left);
    } catch (const std::exception&) {
      missing.push_back(r);
      if (!waitAllRanks) {
        break;
      }
    }
  }
  if (!missing.empty()) {
    C10_THROW_ERROR(
        DistBackendError,
        c10::str(
            "mapreduce monitored_barrier: rank",
            missing.size() == 1 ? " " : "s ",
            c10::Join(", ", missing),
            missing.size() == 1 ? " did" : " did",
            " not arrive within ",
            timeout.count(),
            " ms",
            waitAllRanks ? "" : " (the first missing; pass wait_all_ranks=True to list all)"));
  }
  for (int r = 1; r < size_; ++r) {
    deleteQuietly(*store_, arrived(r));
  }
  store_->set(released, std::vector<uint8_t>{1});
}

c10::intrusive_ptr<ProcessGroupMapReduce> createProcessGroupMapReduce(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int size,
    std::chrono::milliseconds timeout) {
  return c10::make_intrusive<ProcessGroupMapReduce>(store, rank, size, timeout);
}

} // namespace mapreduce_torch
