#pragma once
// BLAS calls made from inside a parallel region must run single-threaded: MKL (linked into torch's
// CPU library when torch uses it) otherwise starts its own threads under each of ours, which
// oversubscribes the cores (CPU time measured 4-8x higher on 2 cores). The weak symbol makes this
// a no-op against a torch built without MKL.

extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace sdml {

// BLAS calls on this thread run single-threaded while it lives.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

}  // namespace sdml
