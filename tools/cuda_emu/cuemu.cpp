// cuemu runtime: the fiber scheduler behind cuemu.h (see there for what it
// models and checks).
#include "cuemu.h"

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)  // CUEMU_ASAN=1 builds (build.py)
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

namespace cuemu {
namespace {

constexpr size_t kStack = 256 * 1024;
constexpr int64_t kMaxThreads = 1024;

// ---- contexts: a stack pointer per fiber, switched without system calls
#if defined(__x86_64__)
// cuemu_switch(save, to): pushes the callee-saved registers and the SSE/x87
// control words on the current stack, stores its pointer in *save, and pops
// the same from `to`.
extern "C" void cuemu_switch(void** save, void* to);
asm(R"(
  .text
  .globl cuemu_switch
  .hidden cuemu_switch
  .type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
)");

// A new context whose first switch-in calls entry() on the stack ending at top.
void* new_context(char* top, void (*entry)()) {
#if defined(__SANITIZE_ADDRESS__)
  // The frames of the stack's last fiber were left, not returned from: their
  // redzones are still marked in AddressSanitizer's shadow.
  __asan_unpoison_memory_region(top - kStack, kStack);
#endif
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15}) - 9;
  sp[0] = 0x1F80u | (uint64_t{0x037F} << 32);  // default MXCSR, x87 control word
  for (int i = 1; i <= 6; ++i) sp[i] = 0;       // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(entry);    // ret: entry sees rsp = 8 mod 16
  sp[8] = 0;                                    // entry never returns
  return sp;
}
#else
#error "tools/cuda_emu: the context switch is written for x86-64 only"
#endif

enum class State { kNew, kRunnable, kDone };

struct Barrier {
  int64_t arrived = 0;
  uint64_t gen = 0;
  uint32_t mask = 0;       // lanes arrived in this generation (warp barriers)
  uint32_t last_mask = 0;  // lanes of the last completed generation
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  uint3 idx;
  int64_t tid;
  State state;
};

// A static __shared__ declaration's storage, kept across blocks and poisoned
// again at its first use in each block (epoch: the block it was poisoned for).
struct SharedVar {
  const char* site;
  size_t type_hash;
  size_t bytes;
  std::unique_ptr<unsigned char[]> storage;
  void* ptr;
  uint64_t epoch;
};

struct Runtime {
  std::vector<SharedVar> shared;
  uint64_t block_epoch = 0;  // run_block calls so far
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  std::vector<char*> free_stacks;
  void* sched_sp = nullptr;
  int64_t cur = -1;
  int64_t live = 0;
  std::vector<int64_t> warp_live;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<uint64_t> slots;
  std::vector<unsigned char> smem;
  uint64_t progress = 0;
  std::string error;
  KernelBody body = nullptr;
  void* arg = nullptr;
  bool in_kernel = false;
  int64_t launches = 0;
};

Runtime rt;

void fail(const std::string& msg) {
  if (rt.error.empty()) rt.error = msg;
}

void yield_to_scheduler() {
  Fiber& f = rt.fibers[rt.cur];
  cuemu_switch(&f.sp, rt.sched_sp);
}

[[noreturn]] void fiber_entry() {
  rt.body(rt.arg);
  Fiber& f = rt.fibers[rt.cur];
  f.state = State::kDone;
  ++rt.progress;
  --rt.live;
  const int64_t w = f.tid / 32;
  --rt.warp_live[w];
  // Exited threads no longer hold a barrier back.
  if (rt.block_bar.arrived > 0 && rt.block_bar.arrived == rt.live) {
    rt.block_bar.arrived = 0;
    ++rt.block_bar.gen;
  }
  Barrier& wb = rt.warp_bar[w];
  if (wb.arrived > 0 && wb.arrived == rt.warp_live[w]) {
    wb.arrived = 0;
    wb.last_mask = wb.mask;
    wb.mask = 0;
    ++wb.gen;
  }
  void* dead = nullptr;  // this stack is handed back by the scheduler
  cuemu_switch(&dead, rt.sched_sp);
  __builtin_unreachable();
}

// Arrive at `b`, shared by `members` live threads; wait for the rest.
void arrive_and_wait(Barrier& b, int64_t members, uint32_t lane_bit) {
  const uint64_t gen = b.gen;
  ++rt.progress;
  b.mask |= lane_bit;
  if (++b.arrived == members) {
    b.arrived = 0;
    b.last_mask = b.mask;
    b.mask = 0;
    ++b.gen;
    return;
  }
  while (b.gen == gen) yield_to_scheduler();  // never resumed after an error
}

// 0 .. n - 1 in the order CUEMU_ORDER sets: forward, reverse, or shuffled
// with a generator seeded by the shuffle's number and `salt`. Used for the
// threads of a block (salt: the block) and for the blocks of a grid (salt:
// ~0, so that the order differs from every block's), so that a kernel whose
// blocks depend on each other's writes within one launch (a race on a GPU,
// where blocks run in any order and at once) gives a different result under
// some order.
std::vector<int64_t> run_order(int64_t n, uint64_t salt) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  const char* env = std::getenv("CUEMU_ORDER");
  const std::string mode = env != nullptr ? env : "forward";
  if (mode == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (mode.rfind("shuffle", 0) == 0) {
    const uint64_t seed = mode.size() > 7 ? std::strtoull(mode.c_str() + 7, nullptr, 10) : 0;
    std::mt19937_64 gen(seed * 1000003u + salt);
    std::shuffle(order.begin(), order.end(), gen);
  }
  return order;
}

void run_block(int64_t nthreads, const dim3& bd, uint64_t block_linear) {
  ++rt.block_epoch;  // static shared memory: poisoned at first use (shared_alloc)
  std::fill(rt.smem.begin(), rt.smem.end(), 0xff);
  rt.fibers.resize(nthreads);
  const int64_t nwarps = (nthreads + 31) / 32;
  rt.warp_live.assign(nwarps, 0);
  rt.warp_bar.assign(nwarps, Barrier{});
  rt.block_bar = Barrier{};
  rt.slots.assign(2 * nthreads, 0);
  for (int64_t t = 0; t < nthreads; ++t) {
    Fiber& f = rt.fibers[t];
    f.tid = t;
    f.idx = uint3{static_cast<unsigned>(t % bd.x), static_cast<unsigned>((t / bd.x) % bd.y),
                  static_cast<unsigned>(t / (static_cast<int64_t>(bd.x) * bd.y))};
    f.state = State::kNew;
    ++rt.warp_live[t / 32];
  }
  rt.live = nthreads;
  const std::vector<int64_t> order = run_order(nthreads, block_linear);
  while (rt.live > 0 && rt.error.empty()) {
    const uint64_t before = rt.progress;
    for (int64_t t : order) {
      Fiber& f = rt.fibers[t];
      if (f.state == State::kDone) continue;
      if (f.state == State::kNew) {  // a stack only while the thread is alive
        f.stack = rt.free_stacks.back();
        rt.free_stacks.pop_back();
        f.sp = new_context(f.stack + kStack, fiber_entry);
        f.state = State::kRunnable;
      }
      rt.cur = t;
      threadIdx = f.idx;
      cuemu_switch(&rt.sched_sp, f.sp);
      rt.cur = -1;
      if (f.state == State::kDone) {
        rt.free_stacks.push_back(f.stack);
        f.stack = nullptr;
      }
      if (!rt.error.empty()) break;
    }
    if (rt.error.empty() && rt.live > 0 && rt.progress == before) {
      fail("threads of a block wait on each other: a __syncthreads or a warp shuffle that "
           "not every live thread of the block (warp) reaches");
    }
  }
  // Threads abandoned after an error give their stacks back.
  for (Fiber& f : rt.fibers) {
    if (f.stack != nullptr) {
      rt.free_stacks.push_back(f.stack);
      f.stack = nullptr;
    }
  }
}

}  // namespace

void run_grid(const char* name, int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by,
              int64_t bz, int64_t smem, KernelBody body, void* arg) {
  const std::string where = std::string("cuemu: ") + name + ": ";
  TORCH_CHECK(!rt.in_kernel, where, "a launch from inside a kernel");
  TORCH_CHECK(gx >= 1 && gx <= (int64_t{1} << 31) - 1, where, "grid.x = ", gx,
              " is outside [1, 2^31 - 1]");
  TORCH_CHECK(gy >= 1 && gy <= 65535 && gz >= 1 && gz <= 65535, where, "grid.y = ", gy,
              ", grid.z = ", gz, ": each must be in [1, 65535]");
  TORCH_CHECK(bx >= 1 && by >= 1 && bz >= 1 && bz <= 64 && bx * by * bz <= kMaxThreads, where,
              "block (", bx, ", ", by, ", ", bz, ") is not a valid block of <= 1024 threads");
  TORCH_CHECK(smem >= 0 && smem <= 48 * 1024, where, "dynamic shared memory of ", smem,
              " bytes is over 48 KiB (needs cudaFuncSetAttribute)");
  const int64_t nthreads = bx * by * bz;
  ++rt.launches;
  if (std::getenv("CUEMU_TRACE") != nullptr) {  // which kernels an op launches, and how
    std::fprintf(stderr, "cuemu: %s grid (%lld, %lld, %lld) block (%lld, %lld, %lld)\n", name,
                 static_cast<long long>(gx), static_cast<long long>(gy),
                 static_cast<long long>(gz), static_cast<long long>(bx),
                 static_cast<long long>(by), static_cast<long long>(bz));
  }
  if (rt.stacks == nullptr) {
    void* p = mmap(nullptr, kStack * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuemu: could not map fiber stacks");
    rt.stacks = static_cast<char*>(p);
    for (int64_t i = kMaxThreads - 1; i >= 0; --i) rt.free_stacks.push_back(rt.stacks + i * kStack);
  }
  rt.smem.resize(static_cast<size_t>(smem) + 16);  // poisoned by run_block
  rt.body = body;
  rt.arg = arg;
  rt.error.clear();
  rt.in_kernel = true;
  gridDim = dim3(gx, gy, gz);
  blockDim = dim3(bx, by, bz);
  for (const int64_t b : run_order(gx * gy * gz, ~uint64_t{0})) {
    blockIdx = uint3{static_cast<unsigned>(b % gx), static_cast<unsigned>((b / gx) % gy),
                     static_cast<unsigned>(b / (gx * gy))};
    run_block(nthreads, blockDim, static_cast<uint64_t>(b));
    if (!rt.error.empty()) break;
  }
  rt.in_kernel = false;
  if (!rt.error.empty()) {
    const std::string msg = rt.error;
    rt.error.clear();
    TORCH_CHECK(false, where, msg, " (block ", blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z,
                ")");
  }
}

void sync_block() {
  TORCH_CHECK(rt.cur >= 0, "cuemu: __syncthreads outside a kernel");
  arrive_and_wait(rt.block_bar, rt.live, 0);
}

uint64_t shfl_xor(unsigned member_mask, uint64_t v, int lane_mask, int width) {
  TORCH_CHECK(rt.cur >= 0, "cuemu: shuffle outside a kernel");
  const int64_t tid = rt.fibers[rt.cur].tid;
  const int64_t w = tid / 32;
  const int lane = static_cast<int>(tid % 32);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  }
  if ((member_mask >> lane & 1u) == 0) {
    fail("a lane calls a shuffle whose member mask leaves it out");
  }
  // Two banks of slots, alternating by barrier generation: a lane can write
  // the next shuffle's value only after this barrier, which every lane of the
  // previous shuffle has passed, so one barrier per shuffle suffices.
  Barrier& bar = rt.warp_bar[w];
  uint64_t* bank = rt.slots.data() + (bar.gen & 1) * rt.fibers.size();
  bank[tid] = v;
  arrive_and_wait(bar, rt.warp_live[w], 1u << lane);
  const uint32_t took_part = bar.last_mask;
  const int src = lane ^ lane_mask;
  uint64_t out = v;
  if (src < (lane & ~(width - 1)) + width) {
    if ((took_part >> src & 1u) == 0 || (member_mask >> src & 1u) == 0) {
      fail("lane " + std::to_string(lane) + " of warp " + std::to_string(w) +
           " reads lane " + std::to_string(src) + " of a shuffle, which does not take part");
    } else {
      out = bank[w * 32 + src];
    }
  }
  return out;
}

int64_t launch_count() { return rt.launches; }

void* shared_alloc(const char* site, size_t type_hash, size_t bytes, size_t align) {
  SharedVar* var = nullptr;
  for (SharedVar& v : rt.shared) {
    if (v.site == site && v.type_hash == type_hash) {
      var = &v;
      break;
    }
  }
  if (var == nullptr) {
    SharedVar v{site, type_hash, bytes, std::make_unique<unsigned char[]>(bytes + align),
                nullptr, 0};
    void* p = v.storage.get();
    size_t space = bytes + align;
    v.ptr = std::align(align, bytes, p, space);
    rt.shared.push_back(std::move(v));
    var = &rt.shared.back();
  }
  if (var->epoch != rt.block_epoch) {  // the block's first use: NaN bytes
    std::memset(var->ptr, 0xff, var->bytes);
    var->epoch = rt.block_epoch;
  }
  return var->ptr;
}

void* dynamic_smem() {
  void* p = rt.smem.data();
  size_t space = rt.smem.size();
  return std::align(16, 1, p, space);
}

void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
    fail("a " + std::to_string(bytes) + "-byte vector access at a misaligned address");
  }
}

}  // namespace cuemu
