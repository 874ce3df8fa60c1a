"""Issue 24 item 4: llama.cpp on every CPU here. The install helper's flags per CPU kind, the child process that
turns a native crash into one error line, and llama_cpp_check.py ending with that line when llama.cpp segfaults
(a stand-in llama_cpp package whose model constructor segfaults, as the native AMX build does on its first eval)."""
import subprocess
import sys

import pytest

from utils.child import ChildFailed, run_in_child
from utils.constants import REPO

sys.path.insert(0, str(REPO / "tools"))
import install_llama_cpp  # noqa: E402

XEON_AMX = "fpu sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8"
EPYC = "fpu sse sse2 avx avx2 fma f16c avx512f avx512_bf16"
OLD_X86 = "fpu sse sse2 avx"


@pytest.mark.parametrize("flags, on, off", [
    (XEON_AMX, ["AVX", "AVX2", "FMA", "F16C", "AVX512"], []),
    (EPYC, ["AVX", "AVX2", "FMA", "F16C", "AVX512"], []),
    (OLD_X86, ["AVX"], ["AVX2", "FMA", "F16C", "AVX512"]),
])
def test_install_flags_follow_the_cpu_and_keep_amx_off(tmp_path, capsys, flags, on, off):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert install_llama_cpp.main(["--cpuinfo", str(info), "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("CMAKE_ARGS='-DGGML_NATIVE=OFF ") and "FORCE_CMAKE=1" in line
    assert "llama-cpp-python==0.3.36" in line and "--no-binary llama-cpp-python" in line
    for switch in on:
        assert f"-DGGML_{switch}=ON" in line
    for switch in off + ["AMX_TILE", "AMX_INT8", "AMX_BF16"]:
        assert f"-DGGML_{switch}=OFF" in line
    assert "-DLLAMA_BUILD_TESTS=OFF" in line and "-DLLAMA_BUILD_SERVER=OFF" in line


def test_install_flags_on_a_cpu_without_x86_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    args = install_llama_cpp.cmake_args(install_llama_cpp.cpu_flags(str(info)))
    assert args[0] == "-DGGML_NATIVE=OFF" and not any("AVX" in a for a in args)
    assert install_llama_cpp.cpu_flags(str(tmp_path / "missing")) == set()


def test_child_returns_the_result_and_reports_a_crash_or_an_error_in_one_line():
    assert run_in_child("tests.child_targets:double", [1, 2], "stand-in") == [1, 2, 1, 2]
    with pytest.raises(ChildFailed, match=r"^stand-in crashed \(SIGSEGV\) in its child process: rebuild it$"):
        run_in_child("tests.child_targets:segfault", None, "stand-in", "rebuild it")
    with pytest.raises(ChildFailed, match=r"^stand-in failed in its child process: ValueError: no good$"):
        run_in_child("tests.child_targets:fail", None, "stand-in")


@pytest.mark.slow
def test_llama_cpp_check_ends_with_one_line_when_llama_cpp_segfaults(tmp_path):
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import ctypes\n\n\nclass Llama:\n    def __init__(self, *a, **k):\n"
                                      "        ctypes.string_at(0)  # SIGSEGV, as the native AMX build on its first eval\n")
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "benchmarks/llama_cpp_check.py", "--quick", "--work_dir",
                           str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: llama.cpp crashed (SIGSEGV) in its child process: a llama.cpp built for another "
                           "CPU, or its AMX kernels") and "tools/install_llama_cpp.py" in last
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "work" / "gguf" / "W4A8KV4.gguf").is_file()  # the export before it is kept
