#!/usr/bin/env python3
"""The Dockerfile's CPU target built and run without a container engine: every instruction of
the `build-cpu` and `cpu` stages executed in clean Debian 12 roots, then the image started.

1. Base image: `debian:bookworm-slim` stands for a minimal Debian 12 root made by mmdebstrap
   (`--variant=minbase`: the Essential and `required` packages plus apt, as the slim image is)
   from this machine's apt sources. It is made once and kept as a tarball in the cache folder;
   each stage starts from a fresh copy of it.
2. Each stage runs its instructions in order, as a builder does: RUN through `/bin/sh -c` in
   the stage's root (chroot, private mount namespace, /proc and /dev as a container gets them,
   network on for apt), as USER, in WORKDIR, with ENV; COPY from the build context (the
   repository less .dockerignore) or from the earlier stage's root; WORKDIR creates the folder.
   The RUN steps are the Dockerfile's own: apt-get update and install from the archive, the
   CMake build of sieved and sieve, useradd. An instruction this script does not know fails.
3. The `cpu` stage's root is then run as its image (dockerfile_check.run_image, in a private
   mount and network namespace, the root read-only but for a fresh /tmp, as the Kubernetes base
   runs it): ENTRYPOINT + CMD as uid 65532, HEALTHCHECK until SERVING, a
   generation through the image's CLI, the metrics port, STOPSIGNAL drains to exit status 0.

Opt-in, not in CI: it downloads the packages from the apt mirror (about 150 MB for the build
stage) and compiles the daemon from scratch (tens of minutes on two cores). Run it as root:

    tests/deploy/dockerfile_build.py [--cache DIR] [--keep] [--jobs N] [--ccache]

--jobs N caps the build's parallelism (CMAKE_BUILD_PARALLEL_LEVEL, read by `cmake --build`).
--ccache installs ccache in the build stage and lends it this machine's cache (the compile
commands are unchanged; hits give the objects a compile would). A recorded run:
deploy/README.md, "Checks".
"""
import argparse
import fcntl
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dockerfile_check as dc  # noqa: E402

REPO = dc.REPO
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCES = "/etc/apt/sources.list.d/debian.sources"
t0 = time.time()


def log(msg):
    print(f"[{time.time() - t0:7.1f} s] {msg}", flush=True)


def base_tarball(cache, base):
    if not base.startswith("debian:bookworm"):
        sys.exit(f"dockerfile_build: base image {base} is not Debian 12; only that is emulated")
    tar = cache / "debian-bookworm-minbase.tar"
    if tar.exists():
        log(f"base: {tar} (cached; delete it to make a fresh one)")
        return tar
    if not shutil.which("mmdebstrap"):
        sys.exit("dockerfile_build: mmdebstrap is not installed (apt-get install mmdebstrap)")
    sources = SOURCES if os.path.exists(SOURCES) else "/etc/apt/sources.list"
    log(f"base: mmdebstrap --variant=minbase bookworm from {sources}")
    tmp = tar.with_suffix(".tmp")
    subprocess.run(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "bookworm",
                    str(tmp), sources], check=True, stdin=subprocess.DEVNULL)
    tmp.rename(tar)
    return tar


def fresh_root(tar, where):
    mounted = [l.split()[1] for l in open("/proc/mounts") if l.split()[1].startswith(str(where))]
    if mounted:
        sys.exit(f"dockerfile_build: {mounted[0]} is mounted: not removing {where}")
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    subprocess.run(["tar", "-xpf", str(tar), "-C", str(where), "--numeric-owner"], check=True)
    return where


def context_files():
    """The build context: every file of the repository's folder that .dockerignore keeps."""
    for top, dirs, files in os.walk(REPO):
        rel_top = os.path.relpath(top, REPO)
        rel = (lambda n: n) if rel_top == "." else (lambda n: f"{rel_top}/{n}")
        dirs[:] = [d for d in dirs if not dc.dockerignore_excludes(rel(d))]
        for f in files:
            if not dc.dockerignore_excludes(rel(f)):
                yield rel(f)


def copy_into(src, dest):
    """COPY semantics for one source: a folder's contents go into DEST, a file into DEST/ (when
    DEST ends with /) or to DEST; owned by root, modes kept."""
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        for top, dirs, files in os.walk(dest):
            for n in dirs + files:
                os.lchown(os.path.join(top, n), 0, 0)
    else:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / src.name)
        os.lchown(dest / src.name, 0, 0)


def in_root(root, argv, env, net=True, ccache_dir=None):
    """Runs ARGV (already chrooted by the caller's argv) in a private mount namespace with
    /proc and /dev as a container runtime gives them (and this machine's ccache folder at
    /ccache with --ccache; the mounts end with the namespace)."""
    setup = ('mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
             'mount --make-rslave "$0/dev" && ')
    if ccache_dir:
        setup += f'mkdir -p "$0/ccache" && mount --bind {shlex.quote(ccache_dir)} "$0/ccache" && '
    setup += 'exec "$@"'
    ns = ["unshare", "--mount", "--propagation", "private"] + ([] if net else ["--net"])
    return subprocess.run(ns + ["--", "/bin/sh", "-c", setup, str(root)] + argv, env=env)


class Stage:
    def __init__(self, name, spec, root):
        self.name, self.spec, self.root = name, spec, root
        self.env = {"PATH": DOCKER_PATH, "HOME": "/root", "HOSTNAME": name}
        self.workdir, self.user = "/", None

    def chrooted(self, argv):
        who = []
        if self.user:
            uid, _, gid = self.user.partition(":")
            who = ["setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups", "--"]
        return ["chroot", str(self.root)] + who + ["env", "-C", self.workdir] + argv


def run_stage(stage, stages_done, args, ccache):
    root = stage.root
    for f in ("/etc/resolv.conf", "/etc/hosts"):   # what a runtime mounts into every container
        shutil.copy2(f, root / f.lstrip("/"))
    for op, rest in stage.spec["ins"]:
        if op == "RUN":
            log(f"{stage.name}: RUN {rest[:110]}{'...' if len(rest) > 110 else ''}")
            env = dict(stage.env)
            if args.jobs:
                env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(args.jobs)
            use_ccache = ccache and "cmake" in rest
            if use_ccache:
                # This machine's ccache settings (base_dir, sloppiness), for the root's paths.
                env.update(CMAKE_CXX_COMPILER_LAUNCHER="ccache", CMAKE_C_COMPILER_LAUNCHER="ccache",
                           CCACHE_DIR="/ccache", CCACHE_BASEDIR="/src", CCACHE_NOHASHDIR="1",
                           CCACHE_SLOPPINESS="include_file_ctime,include_file_mtime")
            r = in_root(root, stage.chrooted(dc.exec_form(rest)), env,
                        ccache_dir=ccache if use_ccache else None)
            if r.returncode != 0:
                sys.exit(f"dockerfile_build: {stage.name}: RUN failed with status {r.returncode}")
        elif op == "COPY":
            for frm, sources, dest in dc.copies({"ins": [(op, rest)]}):
                target = root / dest.lstrip("/")
                for src in sources:
                    if frm:
                        copy_into(stages_done[frm].root / src.lstrip("/"), target)
                    elif src == ".":
                        n = 0
                        for rel in context_files():
                            out = target / rel
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(REPO / rel, out, follow_symlinks=False)
                            n += 1
                        log(f"{stage.name}: COPY . {dest}: {n} files of the context")
                    else:
                        copy_into(REPO / src.rstrip("/"), target)
                        log(f"{stage.name}: COPY {src} {dest}")
        elif op == "WORKDIR":
            stage.workdir = rest
            (root / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif op == "ENV":
            for kv in shlex.split(rest):
                k, _, v = kv.partition("=")
                stage.env[k] = v
        elif op == "USER":
            stage.user = rest
        elif op in ("EXPOSE", "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD", "LABEL"):
            pass    # image metadata: used when the image runs
        else:
            sys.exit(f"dockerfile_build: {stage.name}: instruction {op} is not emulated")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="/var/tmp/sieve-dockerfile-build", type=pathlib.Path)
    ap.add_argument("--keep", action="store_true", help="keep the stage roots afterwards")
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--ccache", action="store_true")
    ap.add_argument("--inside", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    _, stages = dc.parse()
    if args.inside:     # the image run, already in its namespaces
        root = args.inside[0]
        env = {"HOME": "/opt/sieve"}
        for rest in dc.instr(stages["cpu"], "ENV"):
            for kv in shlex.split(rest):
                k, _, v = kv.partition("=")
                env[k] = v
        dc.run_image(root, stages["cpu"], env)
        return
    if os.geteuid() != 0:
        sys.exit("dockerfile_build: needs root (chroot, mounts, namespaces)")
    args.cache.mkdir(parents=True, exist_ok=True)
    lock = open(args.cache / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # one run per cache folder
    except BlockingIOError:
        sys.exit(f"dockerfile_build: another run holds {args.cache}/lock")
    work = args.cache / "roots"
    done = {}
    ccache_dir = None
    for name in ("build-cpu", "cpu"):
        spec = stages[name]
        base = spec["base"]
        if base in done:
            sys.exit(f"dockerfile_build: {name} builds on stage {base}: not emulated")
        root = fresh_root(base_tarball(args.cache, base), work / name)
        log(f"{name}: FROM {base} -> {root}")
        stage = Stage(name, spec, root)
        if args.ccache and name.startswith("build"):
            ccache_dir = subprocess.run(["ccache", "-k", "cache_dir"], capture_output=True,
                                        text=True, check=True).stdout.strip()
            r = in_root(root, stage.chrooted(["/bin/sh", "-c", "apt-get update -qq && "
                        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ccache"]), stage.env)
            if r.returncode:
                sys.exit("dockerfile_build: installing ccache in the build stage failed")
        run_stage(stage, done, args, ccache_dir if name.startswith("build") else None)
        done[name] = stage
        log(f"{name}: done ({subprocess.run(['du', '-sh', str(root)], capture_output=True, text=True).stdout.split()[0]})")
    if args.ccache:
        subprocess.run(["ccache", "-s"])
    cpu = done["cpu"]
    log("cpu: running the image (private mount and network namespace)")
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--", "/bin/sh",
                        "-c", 'ip link set lo up && mount --bind "$0" "$0" && '
                        'mount -o remount,bind,ro "$0" && mount -t tmpfs tmpfs "$0/tmp" && '
                        'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && '
                        'mount --make-rslave "$0/dev" && exec "$@"',
                        str(cpu.root), sys.executable, __file__, "--inside", str(cpu.root)],
                       text=True)
    if not args.keep:
        shutil.rmtree(work)
    if r.returncode != 0:
        sys.exit("dockerfile_build: FAIL: the cpu image did not serve")
    log("dockerfile_build: the cpu target's build and run steps pass in clean Debian 12 roots")


if __name__ == "__main__":
    main()
