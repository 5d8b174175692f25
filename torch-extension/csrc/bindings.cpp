// Python module mapreduce_torch._C: the backend class and the factory that
// torch.distributed.Backend.register_backend calls.
#include <pybind11/chrono.h>
#include <torch/python.h>

#include "ProcessGroupMapReduce.hpp"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Registers c10d's Backend and Store Python types, which the class below derives from and the
  // factory takes.
  py::module_::import("torch.distributed");

  m.doc() = "c10d backend 'mapreduce' backed by libmapreduce";

  py::class_<
      mapreduce_torch::ProcessGroupMapReduce,
      c10d::Backend,
      c10::intrusive_ptr<mapreduce_torch::ProcessGroupMapReduce>>(
      m,
      "ProcessGroupMapReduce",
      "A c10d backend running collectives on CPU tensors through libmapreduce.");

  m.def(
      "create_backend",
      &mapreduce_torch::createProcessGroupMapReduce,
      py::arg("store"),
      py::arg("rank"),
      py::arg("world_size"),
      py::arg("timeout"),
      // Rendezvous blocks on the store and on the other ranks: let other Python threads run.
      py::call_guard<py::gil_scoped_release>(),
      "Create the backend: rendezvous through the c10d store, then connect the communicator.");
}
