"""Build C sources into a shared library on first use, into a per-user cache (torch-free).

One home for what the fused training scan (`dmm_train.fused_scan`) and the native policy
backend (`runtime.native_backend`) both need: find the system C compiler, pick an
instruction-set level, compile into a cache folder keyed by everything that changes the
result, and never let a concurrent process load a half-written library.

Cache: ``$DMM_CACHE_DIR``, else ``$XDG_CACHE_HOME/dmm-deploy``, else ``~/.cache/dmm-deploy``;
a build lives in ``<cache>/<subdir>/<key>/`` where the key is a hash of the sources (and
the headers they include), the compiler's path and ``--version``, every flag, the OS and
the machine. The library is written under a temporary name and renamed into place, and its
sha256 beside it (``<library>.sha256``, written atomically). A library is loaded only when its
bytes match that record: one that does not (planted, damaged, or from before the records) is
rebuilt, never loaded.

Instruction set: never ``-march=native`` (a cached library must not carry the build
machine's quirks beyond a named level). On x86-64 the highest of the portable levels
x86-64-v2/v3/v4 that /proc/cpuinfo shows is chosen (v3 = AVX2 + FMA, v4 = AVX-512); an
environment variable named by the caller (e.g. ``DMM_SCAN_ISA``) set to ``baseline`` or a
level name overrides the choice. Elsewhere (aarch64 included) the compiler's default
target is used.

Compiler: ``$CC``, else gcc, cc or clang on PATH; none is a `DMMError` saying what to install.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from contract.errors import DMMError, describe_error
from contract.files import atomic_write_text, sha256_bytes, sha256_file

CACHE_ENV = "DMM_CACHE_DIR"
COMPILE_TIMEOUT_S = 300
COMPILER_CANDIDATES = ("gcc", "cc", "clang")
# x86-64 micro-architecture levels and the /proc/cpuinfo flags each needs beyond the last.
X86_LEVELS = (
    ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
)
ISA_LEVELS = ("baseline", *(name for name, _ in X86_LEVELS))


def cache_dir() -> Path:
    """Per-user folder of built libraries: $DMM_CACHE_DIR, else $XDG_CACHE_HOME/dmm-deploy, else ~/.cache."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmm-deploy"


def find_compiler() -> str:
    """The C compiler to use: $CC if set (it must run), else the first of gcc, cc, clang on PATH."""
    requested = os.environ.get("CC")
    if requested:
        return requested
    for candidate in COMPILER_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise DMMError(f"no C compiler found (looked for $CC, {', '.join(COMPILER_CANDIDATES)})",
                   "a C compiler to build the C code on first use",
                   "install one (e.g. apt-get install gcc) or set $CC")


def cpu_flags() -> set[str]:
    """The feature flags of /proc/cpuinfo's first processor (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_level(env_var: str) -> str:
    """The instruction-set level to build for: "baseline" or an x86-64-vN name (``env_var`` overrides)."""
    requested = os.environ.get(env_var, "auto")
    if requested != "auto":
        if requested not in ISA_LEVELS:
            raise DMMError(f"{env_var}={requested!r}", f"auto or one of {', '.join(ISA_LEVELS)}",
                           f"set {env_var} to one of them, or unset it")
        return requested
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "baseline"
    flags, level, needed = cpu_flags(), "baseline", set()
    for name, extra in X86_LEVELS:
        needed |= extra
        if not needed <= flags:
            break
        level = name
    return level


def isa_flags(level: str) -> tuple[str, ...]:
    """Compiler flags of an `isa_level` result: none for the baseline, else -march=LEVEL."""
    return () if level == "baseline" else (f"-march={level}",)


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                timeout=COMPILE_TIMEOUT_S, check=True)
    except (OSError, subprocess.SubprocessError) as error:
        raise DMMError(f"C compiler {compiler!r} does not run ({describe_error(error)})", "a working C compiler",
                       "install one (e.g. apt-get install gcc) or fix $CC") from None
    return result.stdout


def build_key(compiler: str, inputs: Sequence[bytes], flags: Sequence[str]) -> str:
    """Hash of everything that changes the built library."""
    digest = hashlib.sha256()
    for part in (*inputs, compiler.encode(), _compiler_version(compiler).encode(), " ".join(flags).encode(),
                 sys.platform.encode(), platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_shared_library(sources: Sequence[str | Path], *, library_name: str, subdir: str,
                         flags: Sequence[str], link_flags: Sequence[str] = ("-shared",),
                         headers: Sequence[str | Path] = (), compiler: str | None = None) -> Path:
    """Compile ``sources`` into ``<cache>/<subdir>/<key>/<library_name>`` unless it is there; returns its path.

    headers: files the sources include (hashed into the key; their folders go on the include
    path). A failed compilation raises DMMError with the compiler's first error line.
    """
    compiler = compiler or find_compiler()
    sources = [Path(source) for source in sources]
    headers = [Path(header) for header in headers]
    contents = [path.read_bytes() for path in (*sources, *headers)]
    all_flags = (*flags, *link_flags)
    target_dir = cache_dir() / subdir / build_key(compiler, contents, all_flags)
    library = target_dir / library_name
    if _matches_record(library):
        return library
    target_dir.mkdir(parents=True, exist_ok=True)
    include_dirs = dict.fromkeys(f"-I{path.resolve().parent}" for path in (*sources, *headers))
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as work:
        staged = Path(work) / library_name
        # Absolute source paths: a file named "-x.c" must never reach the compiler as an option.
        command = [compiler, *flags, *include_dirs, *(str(path.absolute()) for path in sources), "-o", str(staged),
                   *link_flags]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            raise DMMError(f"C compiler {compiler!r} could not be run ({describe_error(error)})",
                           "a working C compiler", "install one (e.g. apt-get install gcc) or fix $CC") from None
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or result.stderr.splitlines()
            first = errors[0].strip() if errors else f"exit status {result.returncode}"
            raise DMMError(f"compiling {', '.join(p.name for p in sources)} failed ({first}) (command: "
                           f"{' '.join(command)})", f"C that {Path(compiler).name} accepts",
                           "re-export the C file with 'cli.py export --target c', or set $CC to another compiler")
        # The record first: a reader that sees the new library finds its hash, and one that sees a
        # record of other bytes than the library rebuilds.
        atomic_write_text(_record_path(library), sha256_bytes(staged.read_bytes()) + "\n")
        os.replace(staged, library)  # atomic: a reader sees no file or the whole file
    return library


def _record_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _matches_record(library: Path) -> bool:
    """The cached library is a regular file whose sha256 is the one recorded when it was built."""
    try:
        recorded = _record_path(library).read_text().strip()
        return library.is_file() and not library.is_symlink() and sha256_file(library) == recorded
    except OSError:  # no library, or no record: build
        return False
