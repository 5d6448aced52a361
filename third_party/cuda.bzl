"""cuda_library: compile .cu files with nvcc and wrap them in a cc_library.

Usage (in a BUILD file):

    load("//third_party:cuda.bzl", "cuda_library")

    cuda_library(
        name = "attention_cuda",
        srcs = ["attention.cu"],         # .cu files (compiled by nvcc)
        hdrs = ["attention_cuda.h"],     # host-visible headers (also seen by nvcc)
        deps = ["//core:dtype", "@absl//:absl"],
        copts = ["-lineinfo"],           # extra nvcc flags
    )

    cc_test(name = "...", srcs = [...], deps = [":attention_cuda", ...])

How it works:
  * Each .cu file is compiled by /usr/local/cuda/bin/nvcc (not the Bazel C++
    toolchain) with
        -std=c++17 -O3 -Xcompiler -fPIC
        -gencode=arch=compute_90,code=sm_90
        -gencode=arch=compute_90,code=compute_90
    (or the target's `gencode`) plus `copts`. Include path: the workspace
    root (-I.), the genfiles/bin
    dirs, and the include dirs/defines of `deps` (e.g. @absl, @eigen), so .cu
    files may `#include "core/dtype.h"`. nvcc sees exactly the headers in
    `hdrs`, `cu_hdrs` and the transitive headers of `deps` (Bazel sandbox);
    a header used only by the .cu file must be listed in `cu_hdrs` (or `hdrs`).
  * Each .cu becomes one PIC object named `<f>.o`. Bazel treats a plain `.o`
    in cc_library srcs as usable for BOTH its PIC links (test .so's, dynamic
    mode) and non-PIC links (`-c opt` cc_binary); do not also emit a
    `.pic.o` (it is linked in addition -> duplicate symbols).
  * Sanitizer/debug flags from --copt (e.g. --config=asan) are NOT passed to
    nvcc; host code in .cu files is not instrumented. nvcc always uses -O3.
  * The wrapping cc_library depends on @cuda//:cudart (shared libcudart,
    rpath /usr/local/cuda/lib64) and defaults to alwayslink = True, so
    objects are never dropped from static links (e.g. a .cu file holding only
    static registrations); pass alwayslink = False to change that.
  * No relocatable device code (-rdc): device functions cannot be called
    across .cu files.
"""

_NVCC = "/usr/local/cuda/bin/nvcc"

_NVCC_BASE_FLAGS = [
    "-std=c++17",
    "-O3",
    "-Xcompiler",
    "-fPIC",
]

# The targets a .cu file is built for unless its cuda_library names others.
_DEFAULT_GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

def _cu_objects_impl(ctx):
    cc_info = cc_common.merge_cc_infos(
        cc_infos = [d[CcInfo] for d in ctx.attr.deps],
    )
    cctx = cc_info.compilation_context
    headers = depset(ctx.files.hdrs, transitive = [cctx.headers])

    include_flags = ["-I.", "-I" + ctx.bin_dir.path]
    if ctx.genfiles_dir.path != ctx.bin_dir.path:
        include_flags.append("-I" + ctx.genfiles_dir.path)
    for d in cctx.quote_includes.to_list():
        include_flags += ["-I" + d]
    for d in cctx.includes.to_list():
        include_flags += ["-I" + d]
    for d in cctx.system_includes.to_list():
        include_flags += ["-isystem", d]
    define_flags = ["-D" + d for d in cctx.defines.to_list()]

    outputs = []
    for src in ctx.files.srcs:
        stem = src.basename[:-len(src.extension) - 1]
        prefix = "_cu_objs/%s/%s" % (ctx.attr.name, stem)
        obj = ctx.actions.declare_file(prefix + ".o")
        args = ctx.actions.args()
        args.add_all(_NVCC_BASE_FLAGS)
        args.add_all(ctx.attr.gencode or _DEFAULT_GENCODE)
        args.add_all(ctx.attr.copts)
        args.add_all(include_flags)
        args.add_all(define_flags)
        args.add("-c", src)
        args.add("-o", obj)
        ctx.actions.run(
            executable = _NVCC,
            arguments = [args],
            inputs = depset([src], transitive = [headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "Compiling CUDA %s" % src.short_path,
            # PATH (for the host g++) comes from the default shell env.
            use_default_shell_env = True,
        )
        outputs.append(obj)
    return [DefaultInfo(files = depset(outputs))]

_cu_objects = rule(
    implementation = _cu_objects_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"]),
        "hdrs": attr.label_list(allow_files = True),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "gencode": attr.string_list(),
    },
    output_to_genfiles = True,
)

def cuda_library(name, srcs, hdrs = [], deps = [], copts = [], cu_hdrs = [], gencode = [], **kwargs):
    """A cc_library whose .cu `srcs` are compiled by nvcc.

    Args:
      name: target name (use it in deps like any cc_library).
      srcs: .cu files.
      hdrs: public headers (exported by the cc_library, visible to nvcc).
      deps: cc_library deps (headers/includes/defines passed to nvcc and
        linked in); @cuda//:cudart is added automatically.
      copts: extra nvcc flags (e.g.
        "-lineinfo", "--use_fast_math"); NOT passed to the host C++ compiler.
      cu_hdrs: private headers only the .cu files include.
      gencode: the -gencode flags, replacing the default sm_90 machine code
        plus compute_90 PTX (e.g. ["-gencode=arch=compute_90a,code=sm_90a"]
        for wgmma and setmaxnreg, which exist only on the sm_90a target).
      **kwargs: passed to the cc_library (visibility, testonly, tags,
        alwayslink (default True), ...).
    """
    kwargs.setdefault("alwayslink", True)
    all_deps = deps + ["@cuda//:cudart"]
    _cu_objects(
        name = name + "_cu_objs",
        srcs = srcs,
        hdrs = hdrs + cu_hdrs,
        deps = all_deps,
        copts = copts,
        gencode = gencode,
        testonly = kwargs.get("testonly", False),
        visibility = ["//visibility:private"],
        tags = kwargs.get("tags", []),
    )
    native.cc_library(
        name = name,
        srcs = [":" + name + "_cu_objs"],
        hdrs = hdrs,
        deps = all_deps,
        **kwargs
    )
