"""Reproducible installs (issue 15).

The lock files in requirements/ (compiled by ``scripts/lock`` with uv) must agree with
pyproject.toml: every declared dependency pinned at a version its specifier allows, every
pin with hashes, nothing pinned that no declared requirement pulls in, and runtime/build
at dev's versions.  ``scripts/lock`` run on a copy of the checkout must reproduce them
byte for byte (it keeps existing pins), so a dependency added without relocking fails here.

Then a wheel built from this checkout, with the locked setuptools and no build isolation,
must carry the package data, install into a clean venv from the hash-pinned runtime lock
(``--require-hashes``, the wheel's own hash included) and with pipx (PIPX_HOME in a
temporary folder, the lock's versions as constraints: pipx cannot pass hashes through),
and ``hbmon --version`` and ``hbmon demo --duration 5`` must work from each installed
copy run outside the checkout.  These need the package index, as scripts/setup does.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from helpers import free_port_pair, http_get, wait_for
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
LOCKS = ("dev.txt", "runtime.txt", "build.txt")
PIP_TIMEOUT = 300.0  # a cold install from the index on a slow link
DEMO_TIMEOUT = 60.0  # --duration 5 plus the demo's etcd cluster start (about 3 s here)
# Where a lock says a root requirement comes from (uv's "# via" annotations).
FROM_PYPROJECT = "hbmon (pyproject.toml)"
FROM_BUILD_IN = "-r requirements/build.in"


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]
    via: frozenset[str]


def read_lock(path: Path) -> list[Pin]:
    """The entries of a lock file as uv writes it (``name==version ; marker \\``, hash
    continuation lines, then ``# via`` lines)."""
    pins: list[Pin] = []
    head: re.Match[str] | None = None
    hashes: list[str] = []
    via: list[str] = []
    in_via = False

    def flush() -> None:
        if head is not None:
            marker = Marker(head[3]) if head[3] else None
            pins.append(
                Pin(canonicalize_name(head[1]), head[2], marker, tuple(hashes), frozenset(via))
            )

    for raw in path.read_text().splitlines():
        line = raw.rstrip("\\").strip()
        if line and not raw.startswith((" ", "#")):
            flush()
            head = re.fullmatch(r"([A-Za-z0-9._-]+)==([^ ;]+)\s*(?:;\s*(.+?))?\s*", line)
            assert head, f"{path.name}: not a pinned requirement: {raw!r}"
            hashes, via, in_via = [], [], False
        elif head is not None and line.startswith("--hash="):
            hashes.append(line.removeprefix("--hash="))
        elif head is not None and line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            if rest:
                via.append(rest)
            in_via = not rest
        elif head is not None and in_via and line.startswith("#   "):
            via.append(line.removeprefix("#").strip())
    flush()
    return pins


def by_name(pins: list[Pin]) -> dict[str, list[Pin]]:
    out: dict[str, list[Pin]] = {}
    for pin in pins:
        out.setdefault(pin.name, []).append(pin)
    return out


def declared(project: dict[str, Any], *groups: str) -> list[Requirement]:
    """Requirements of a pyproject.toml: "runtime", "dev" (the extra) and "build"."""
    reqs: list[str] = []
    for group in groups:
        if group == "runtime":
            reqs += project["project"]["dependencies"]
        elif group == "dev":
            reqs += project["project"]["optional-dependencies"]["dev"]
        else:
            reqs += project["build-system"]["requires"]
    return [Requirement(r) for r in reqs]


def build_in(req_dir: Path) -> list[Requirement]:
    lines = (req_dir / "build.in").read_text().splitlines()
    return [Requirement(s) for s in (ln.split("#")[0].strip() for ln in lines) if s]


# What each lock must cover; scripts/setup installs dev.txt, scripts/demo runtime + build.
LOCK_GROUPS = {"dev.txt": ("runtime", "dev", "build"), "runtime.txt": ("runtime",),
               "build.txt": ("build",)}  # fmt: skip


def lock_problems(project: dict[str, Any], req_dir: Path) -> list[str]:
    """Every way the locks in ``req_dir`` disagree with ``project`` (a parsed
    pyproject.toml), one message each; empty when they agree."""
    problems: list[str] = []
    locks = {name: read_lock(req_dir / name) for name in LOCKS}
    for lock, groups in LOCK_GROUPS.items():
        pins = by_name(locks[lock])
        wanted = declared(project, *groups)
        roots = {canonicalize_name(r.name) for r in wanted}
        # every declared requirement pinned, within its specifier
        for req in wanted:
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{req} is not pinned in requirements/{lock}")
            for pin in pins.get(name, []):
                if not req.specifier.contains(pin.version, prereleases=True):
                    problems.append(f"requirements/{lock} pins {name}=={pin.version}, not {req}")
        # every pin hashed and pulled in by a declared requirement, directly or through
        # another pin of the same lock (nothing stale)
        if not locks[lock]:
            problems.append(f"requirements/{lock} pins nothing")
        for pin in locks[lock]:
            if not pin.hashes or not all(h.startswith("sha256:") for h in pin.hashes):
                problems.append(f"requirements/{lock}: {pin.name} has no sha256 hash")
            if not pin.via:
                problems.append(f"requirements/{lock}: nothing pulls in {pin.name}")
            for source in pin.via:
                if source in (FROM_PYPROJECT, FROM_BUILD_IN):
                    if pin.name not in roots:
                        problems.append(
                            f"requirements/{lock} pins {pin.name} for {source}, "
                            "which no longer declares it"
                        )
                elif source != "-c requirements/dev.txt":
                    parent = canonicalize_name(re.sub(r"\[.*\]$", "", source))
                    if parent not in pins:
                        problems.append(
                            f"requirements/{lock}: {pin.name} comes from {source}, not pinned"
                        )

    # build.in is build-system.requires
    def key(reqs: list[Requirement]) -> set[tuple[str, str]]:
        return {(canonicalize_name(r.name), str(r.specifier)) for r in reqs}

    if key(build_in(req_dir)) != key(declared(project, "build")):
        problems.append("requirements/build.in is not build-system.requires of pyproject.toml")
    # runtime and build at dev's versions, and disjoint (scripts/demo installs both at once)
    dev = {(p.name, p.version) for p in locks["dev.txt"]}
    for lock in ("runtime.txt", "build.txt"):
        other = {(p.name, p.version) for p in locks[lock]}
        if not other <= dev:
            problems.append(f"requirements/{lock} differs from dev.txt: {sorted(other - dev)}")
    # the locks are resolved from the oldest Python that requires-python allows
    floor = re.fullmatch(r">=\s*([0-9.]+)", project["project"]["requires-python"])
    used = re.search(r"--python-version (\S+)", (ROOT / "scripts" / "lock").read_text())
    if not floor or not used or floor[1] != used[1]:
        problems.append("scripts/lock's --python-version is not the floor of requires-python")
    both = {p.name for p in locks["runtime.txt"]} & {p.name for p in locks["build.txt"]}
    if both:
        problems.append(f"runtime.txt and build.txt both pin {sorted(both)}")
    return problems


def test_the_locks_agree_with_pyproject() -> None:
    problems = lock_problems(PYPROJECT, REQ)
    assert not problems, "\n".join([*problems, "run scripts/lock and commit requirements/"])


def test_a_dependency_added_or_dropped_without_relocking_is_found() -> None:
    """lock_problems on pyprojects changed in the ways that need scripts/lock: each
    change adds exactly its own problems to those of the real pyproject (none)."""
    base = set(lock_problems(PYPROJECT, REQ))

    def new_problems(edit: Callable[[dict[str, Any]], None]) -> set[str]:
        project = copy.deepcopy(PYPROJECT)
        edit(project)
        return set(lock_problems(project, REQ)) - base

    deps = PYPROJECT["project"]["dependencies"]
    first = canonicalize_name(Requirement(deps[0]).name)
    assert new_problems(lambda p: p["project"]["dependencies"].append("no-such-dist>=1.0")) == {
        "no-such-dist>=1.0 is not pinned in requirements/dev.txt",
        "no-such-dist>=1.0 is not pinned in requirements/runtime.txt",
    }
    assert new_problems(lambda p: p["project"]["optional-dependencies"]["dev"].append("nsd")) == {
        "nsd is not pinned in requirements/dev.txt"
    }

    def raise_first(p: dict[str, Any]) -> None:
        p["project"]["dependencies"][0] = f"{first}>=999"

    raised = new_problems(raise_first)
    assert {m.split(" pins ")[0] for m in raised} == {
        "requirements/dev.txt",
        "requirements/runtime.txt",
    }
    assert all(m.endswith(f", not {first}>=999") for m in raised), raised

    def drop_first(p: dict[str, Any]) -> None:
        del p["project"]["dependencies"][0]

    stale = {m for m in new_problems(drop_first) if "no longer declares it" in m}
    assert (
        f"requirements/runtime.txt pins {first} for hbmon (pyproject.toml), which no "
        "longer declares it" in stale
    )

    def newer_python(p: dict[str, Any]) -> None:
        p["project"]["requires-python"] = ">=3.12"

    assert new_problems(newer_python) == {
        "scripts/lock's --python-version is not the floor of requires-python"
    }

    def build_with_wheel(p: dict[str, Any]) -> None:
        p["build-system"]["requires"].append("wheel")

    assert new_problems(build_with_wheel) == {
        "wheel is not pinned in requirements/dev.txt",
        "wheel is not pinned in requirements/build.txt",
        "requirements/build.in is not build-system.requires of pyproject.toml",
    }


def uv_bin() -> Path:
    path = Path(sys.executable).parent / "uv"
    need(path.exists(), f"{path} is missing: run scripts/setup (uv is in the dev extra)")
    return path


@pytest.mark.slow
def test_scripts_lock_reproduces_the_committed_locks(tmp_path: Path) -> None:
    """scripts/lock keeps every pin that still fits: on an unchanged pyproject.toml it
    rewrites the locks unchanged; --upgrade-package P moves P alone."""
    copy = tmp_path / "checkout"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", copy)
    shutil.copytree(REQ, copy / "requirements")
    shutil.copy2(ROOT / "scripts" / "lock", copy / "scripts")
    env = clean_env()
    env["PATH"] = f"{uv_bin().parent}{os.pathsep}{env['PATH']}"

    def lock(*args: str) -> None:
        res = subprocess.run(
            [copy / "scripts" / "lock", *args],
            env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False,
        )  # fmt: skip
        assert res.returncode == 0, f"scripts/lock {' '.join(args)}:\n{res.stderr}"

    lock()
    for name in LOCKS:
        assert (copy / "requirements" / name).read_text() == (REQ / name).read_text(), (
            f"requirements/{name} is not what scripts/lock makes of pyproject.toml: "
            "run scripts/lock and commit the result"
        )
    (setuptools,) = by_name(read_lock(REQ / "build.txt"))["setuptools"]
    older = "80.9.0" if setuptools.version != "80.9.0" else "80.8.0"
    lock("--upgrade-package", f"setuptools=={older}")
    for name in ("dev.txt", "build.txt"):
        before = {(p.name, p.version) for p in read_lock(REQ / name)}
        after = {(p.name, p.version) for p in read_lock(copy / "requirements" / name)}
        assert before ^ after == {("setuptools", setuptools.version), ("setuptools", older)}


def clean_env() -> dict[str, str]:
    """The environment of an operator's shell: nothing of this checkout's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith(("PIPX_", "UV_", "PYTEST_"))
    }
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != venv_bin
    )
    return env


def run(cmd: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT, check=False,
    )  # fmt: skip
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n" + (
        res.stdout[-3000:] + res.stderr[-3000:]
    )
    return res.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of this checkout (no stale build/ can leak into it) by the
    setuptools of the running venv (the lock's, after scripts/setup), without isolation."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    junk = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "test-output"
    )
    shutil.copytree(ROOT, src, ignore=junk)
    out = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", out, src], cwd=tmp, env=clean_env())  # fmt: skip
    (built,) = out.glob("hbmon-*.whl")
    return built


def test_wheel_carries_every_module_the_package_data_and_the_command(wheel: Path) -> None:
    assert wheel.name == f"hbmon-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"hbmon-{VERSION}.dist-info/METADATA").decode()
        entry_points = zf.read(f"hbmon-{VERSION}.dist-info/entry_points.txt").decode()
        page = zf.read("hbmon/static/status.html")
    wanted = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "hbmon").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert any(w.startswith("hbmon/static/") for w in wanted)
    assert wanted <= names, f"missing from the wheel: {sorted(wanted - names)}"
    assert page == (ROOT / "hbmon/static/status.html").read_bytes()
    assert re.search(r"^hbmon = hbmon\.cli:main$", entry_points, re.M)
    requires = {Requirement(m) for m in re.findall(r"^Requires-Dist: (.+)$", meta, re.M)}
    runtime = {str(r) for r in requires if r.marker is None}
    assert runtime == {str(r) for r in declared(PYPROJECT, "runtime")}


def check_installed(hbmon: Path, prefix: Path, cwd: Path, env: dict[str, str]) -> None:
    """``hbmon --version`` and a 5-second demo from the copy installed under ``prefix``,
    run from ``cwd`` (outside the checkout): its /status page is the packaged file, and
    the demo exits 0 leaving nothing in its TMPDIR."""
    assert run([hbmon, "--version"], cwd, env).strip() == f"hbmon {VERSION}"
    python = hbmon.resolve().parent / "python"
    where = run([python, "-c", "import hbmon; print(hbmon.__file__)"], cwd, env).strip()
    assert Path(where).resolve().is_relative_to(prefix.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT), where

    tmpdir = cwd / "demo-tmp"
    tmpdir.mkdir()
    port = free_port_pair()
    out, err = cwd / "demo.stdout", cwd / "demo.stderr"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            [hbmon, "demo", "--duration", "5", "--listen", f"127.0.0.1:{port}"],
            cwd=cwd, env={**env, "TMPDIR": str(tmpdir)}, stdout=fo, stderr=fe,
            start_new_session=True,
        )  # fmt: skip
    try:

        def page() -> str | None:
            if proc.poll() is not None:
                pytest.fail(f"the installed demo exited {proc.returncode}:\n{err.read_text()}")
            try:
                status, body = http_get(f"http://127.0.0.1:{port + 1}/status")
            except OSError:
                return None
            return body if status == 200 else None

        body = wait_for(page, DEMO_TIMEOUT, "the installed demo's /status page")
        assert body == (ROOT / "hbmon/static/status.html").read_text()
        rc = proc.wait(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert rc == 0, err.read_text()
    assert "hbmon demo: sites osaka and tokyo" in out.read_text()
    assert list(tmpdir.iterdir()) == [], "the demo left files behind"


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_from_the_hashed_lock(wheel: Path, tmp_path: Path) -> None:
    """What an operator does (docs/operations.md): a venv of its own, the locked runtime
    dependencies with --require-hashes, the wheel pinned by its hash too."""
    env = clean_env()
    target = tmp_path / "opt-hbmon"
    venv.create(target, with_pip=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(
        (REQ / "runtime.txt").read_text() + f"hbmon @ {wheel.as_uri()} --hash=sha256:{digest}\n"
    )
    # Without --no-deps: pip fails here if the wheel needs a package the lock lacks.
    run([target / "bin" / "pip", "install", "-q", "--require-hashes", "-r", reqs],
        tmp_path, env)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check_installed(target / "bin" / "hbmon", target, elsewhere, env)


@pytest.mark.slow
def test_wheel_installs_with_pipx(wheel: Path, tmp_path: Path) -> None:
    """``pipx install hbmon-*.whl`` with PIPX_HOME in a temporary folder and the pip
    backend; the lock's versions as constraints (pipx's own pip steps cannot take hashes)."""
    env = clean_env()
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env.update(PIPX_HOME=str(home), PIPX_BIN_DIR=str(bin_dir), PIPX_MAN_DIR=str(tmp_path / "man"))
    pins = tmp_path / "constraints.txt"
    pins.write_text("".join(f"{p.name}=={p.version}\n" for p in read_lock(REQ / "runtime.txt")))
    pipx = Path(sys.executable).parent / "pipx"
    need(pipx.exists(), f"{pipx} is missing: run scripts/setup (pipx is in the dev extra)")
    run([sys.executable, "-m", "pipx", "install", "--backend", "pip",
         "--pip-args", f"-c {pins}", wheel], tmp_path, env)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    hbmon = bin_dir / "hbmon"
    assert hbmon.is_symlink() or hbmon.exists()
    check_installed(hbmon, home / "venvs" / "hbmon", elsewhere, env)
    python = home / "venvs" / "hbmon" / "bin" / "python"
    listed = run([python, "-m", "pip", "list", "--format=freeze"], elsewhere, env)
    installed = {
        canonicalize_name(name): version
        for name, _, version in (line.partition("==") for line in listed.split())
    }
    for pin in read_lock(REQ / "runtime.txt"):
        if pin.marker is None or pin.marker.evaluate():
            got = installed.get(pin.name)
            assert got == pin.version, f"pipx installed {pin.name} {got}, the lock: {pin.version}"
