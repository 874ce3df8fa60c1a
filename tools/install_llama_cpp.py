"""Install llama-cpp-python (for benchmarks/llama_cpp_check.py) built for this CPU with flags that run on it.

    python tools/install_llama_cpp.py            # pip install llama-cpp-python==0.3.36 from source, 7-30 min
    python tools/install_llama_cpp.py --print    # only print the command and CMAKE_ARGS it would run

Why: there is no binary wheel here, and pip's default native build (GGML_NATIVE=ON) segfaults on its first eval on
the project's Intel Xeon with AMX (measured: our GGUF and the untouched SmolLM2 Q4_1 GGUF alike). A build with
GGML_NATIVE=OFF, the x86 SIMD levels this CPU reports (AVX, AVX2, FMA, F16C, AVX-512) switched on one by one and
llama.cpp's AMX kernels off runs on it and on the AMD EPYC. Tests, examples and the server are not built. The flags
come from /proc/cpuinfo (--cpuinfo for another file); on a non-x86 CPU only GGML_NATIVE=OFF is set.
"""
import argparse
import os
import shlex
import subprocess
import sys

VERSION = "0.3.36"
# /proc/cpuinfo flag -> llama.cpp's CMake switch (ggml/CMakeLists.txt)
SIMD = (("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
        ("avx512f", "GGML_AVX512"))
OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16",  # the kernels that crash the native build on AMX CPUs
       "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER")


def cpu_flags(path="/proc/cpuinfo"):
    """The first processor's flags (empty when the file has none, e.g. not Linux x86)."""
    try:
        with open(path) as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cmake_args(flags):
    """GGML_NATIVE off; each SIMD level the CPU has on (the others off); AMX kernels, tests, examples, server off."""
    args = ["-DGGML_NATIVE=OFF"]
    if flags & {name for name, _ in SIMD}:  # x86
        args += [f"-D{switch}={'ON' if name in flags else 'OFF'}" for name, switch in SIMD]
    return args + [f"-D{switch}=OFF" for switch in OFF]


def command(version=VERSION):
    return [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "--no-cache-dir",
            "--force-reinstall", "--no-deps", f"llama-cpp-python=={version}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpuinfo", default="/proc/cpuinfo")
    p.add_argument("--version", default=VERSION)
    p.add_argument("--print", action="store_true", help="print CMAKE_ARGS and the pip command, install nothing")
    args = p.parse_args(argv)
    env = {"CMAKE_ARGS": " ".join(cmake_args(cpu_flags(args.cpuinfo))), "FORCE_CMAKE": "1"}
    cmd = command(args.version)
    print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(cmd), flush=True)
    if args.print:
        return 0
    # llama-cpp-python's own dependencies (numpy, jinja2, diskcache, typing-extensions) come from the index first
    subprocess.run([sys.executable, "-m", "pip", "install", "numpy", "jinja2", "diskcache", "typing-extensions"],
                   check=True)
    return subprocess.run(cmd, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
