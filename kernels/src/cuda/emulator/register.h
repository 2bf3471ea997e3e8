// Appended to each emulated source: turns a kernel's C++ signature into the launch table's
// entry (its arity and each parameter's size, checked at every launch against the arguments,
// as `cuLaunchKernel` cannot), and an invoker that reads the arguments from a `void**` array.
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace emu {

using Invoker = void (*)(void** args);

struct KernelInfo {
    const char* name;
    int arity;
    const size_t* sizes;
    Invoker invoke;
};

void add_kernel(const KernelInfo& info);

template <typename Sig, Sig F>
struct Entry;

template <typename... A, void (*F)(A...)>
struct Entry<void (*)(A...), F> {
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(std::decay_t<A>)..., 0};
    template <size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        F(*static_cast<std::decay_t<A>*>(args[I])...);
    }
    static void invoke(void** args) { call(args, std::index_sequence_for<A...>{}); }
    static KernelInfo info(const char* name) {
        return KernelInfo{name, (int)sizeof...(A), sizes, &invoke};
    }
};

}  // namespace emu

#define CONVOY_EMU_KERNEL(fn, name) ::emu::add_kernel(::emu::Entry<decltype(&fn), &fn>::info(name))
