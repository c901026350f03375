#!/usr/bin/env python3
"""CTest deploy_dockerfile: the Dockerfile checked without a container engine.

1. Parse: the stages (build-cpu, cpu, build-cuda, cuda) and their bases; each runtime stage
   runs as a non-root user, exposes 50051 and 9090, has a HEALTHCHECK through `sieve health`.
2. Context: every COPY source is in the build context (present, not excluded by
   .dockerignore); every COPY --from source is a file the build stage makes (the binaries this
   build tree made from the same CMake targets, or collect-libs.sh's output folder).
3. Libraries: the CPU runtime stage's apt packages, with their dependencies and Debian's
   `required` base, provide every shared library that ldd lists for sieved and sieve, each
   listed package provides at least one, and each exists in the archive. The build stage's
   packages are all in scripts/install-deps.sh (the list CI builds with).
4. Run: the CPU runtime stage executed in a root file system made only of the files of its
   packages (those of 3, from this machine's installed copies, read-only) plus what a container
   runtime adds (/etc/hosts, /proc, /dev), chrooted in a private mount and network namespace:
   COPY instructions fill a tmpfs /opt (then read-only, as the Kubernetes base's
   readOnlyRootFilesystem makes it), ENV, WORKDIR and USER apply, ENTRYPOINT + CMD start
   the daemon, the HEALTHCHECK command must report SERVING, a generation through the image's
   CLI must stream text, the metrics port must answer, the Kubernetes base's preStop command
   must run in the image, and STOPSIGNAL must drain the daemon to exit status 0.
Not covered (no container engine, no Ubuntu archive here): the RUN steps themselves (apt in a
fresh image, the CMake build in it) and the CUDA target; deploy/README.md says so.

    dockerfile_check.py SIEVED SIEVE_CLI
"""
import fnmatch
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
STAGES = ["build-cpu", "cpu", "build-cuda", "cuda"]
problems = []


def problem(msg):
    problems.append(msg)


def parse():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args, stages, current = {}, {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "ARG" and current is None:
            k, _, v = rest.partition("=")
            args[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), v)
        elif op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), m.group(1))
            current = stages[m.group(2)] = {"base": base, "ins": []}
        else:
            current["ins"].append((op, rest))
    return args, stages


def instr(stage, op):
    return [rest for o, rest in stage["ins"] if o == op]


def exec_form(rest):
    return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]


def dockerignore_excludes(rel):
    excluded = False
    for pat in (REPO / ".dockerignore").read_text().splitlines():
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        parts = rel.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pat) or
                  fnmatch.fnmatch("/".join(parts[:i]), pat.replace("**/", "")) or
                  (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:]))
                  for i in range(1, len(parts) + 1))
        if hit:
            excluded = not neg
    return excluded


def copies(stage):
    """(from_stage or None, [sources], dest) of each COPY."""
    out = []
    for rest in instr(stage, "COPY"):
        words = shlex.split(rest)
        frm = None
        while words[0].startswith("--"):
            if words[0].startswith("--from="):
                frm = words[0].split("=", 1)[1]
            words = words[1:]
        out.append((frm, words[:-1], words[-1]))
    return out


def check_structure(args, stages, binaries):
    if list(stages) != STAGES:
        problem(f"stages {list(stages)} != {STAGES}")
        return
    if not stages["cpu"]["base"].startswith("debian:bookworm") or \
            stages["build-cpu"]["base"] != stages["cpu"]["base"]:
        problem(f"the CPU target is not built and run on the same Debian 12 base: "
                f"{stages['build-cpu']['base']}, {stages['cpu']['base']}")
    for s in ("build-cuda", "cuda"):
        if not stages[s]["base"].startswith("nvidia/cuda:"):
            problem(f"{s} is not on an NVIDIA CUDA base image: {stages[s]['base']}")
    for name in ("cpu", "cuda"):
        st = stages[name]
        user = instr(st, "USER")
        if not user or user[-1].split(":")[0] in ("0", "root"):
            problem(f"{name}: does not run as a non-root user")
        if set(" ".join(instr(st, "EXPOSE")).split()) != {"50051", "9090"}:
            problem(f"{name}: EXPOSE is not 50051 9090")
        hc = instr(st, "HEALTHCHECK")
        if not hc or "CMD" not in hc[0] or "health" not in hc[0]:
            problem(f"{name}: no HEALTHCHECK through `sieve health`")
        dests = [dest for _, _, dest in copies(st)]
        for want in ("/opt/sieve/configs/", "/opt/sieve/models/embedded/", "/opt/sieve/bin/"):
            if want not in dests:
                problem(f"{name}: nothing copied to {want}")
    # Context and stage outputs.
    for name, st in stages.items():
        for frm, sources, dest in copies(st):
            for src in sources:
                if frm is None:
                    rel = src.rstrip("/")
                    if rel == ".":
                        for need in ("CMakeLists.txt", "configs", "models/embedded", "server", "engine"):
                            if dockerignore_excludes(need):
                                problem(f".dockerignore excludes {need}, which the build needs")
                        if not dockerignore_excludes("build") or not dockerignore_excludes(".git"):
                            problem(".dockerignore lets build/ or .git into the context")
                        continue
                    if not (REPO / rel).exists():
                        problem(f"{name}: COPY {src}: not in the repository")
                    elif dockerignore_excludes(rel):
                        problem(f"{name}: COPY {src}: excluded by .dockerignore")
                elif frm not in stages:
                    problem(f"{name}: COPY --from={frm}: no such stage")
                elif src.startswith("/src/build/"):
                    target = src[len("/src/build/"):]
                    if target not in binaries:
                        problem(f"{name}: COPY --from={frm} {src}: not a binary this build makes")
                    targets = re.search(r"--target ([\w ]+)", " ".join(instr(stages[frm], "RUN")))
                    if not targets or binaries[target].name not in targets.group(1).split():
                        problem(f"{name}: {frm} does not build {binaries[target].name}")
                elif src.rstrip("/") == "/opt/sieve/lib":
                    if "collect-libs.sh /opt/sieve/lib" not in " ".join(instr(stages[frm], "RUN")):
                        problem(f"{name}: {frm} does not fill /opt/sieve/lib")
                else:
                    problem(f"{name}: COPY --from={frm} {src}: unknown stage output")


def apt_packages(stage):
    run = " ".join(instr(stage, "RUN"))
    m = re.search(r"apt-get install ((?:-\S+\s+)*)(.*?)(?:&&|$)", run)
    return [w for w in m.group(2).split() if not w.startswith("-")] if m else []


_owners = {}


def owner(path):
    """The installed Debian package that ships PATH (dpkg's file lists; /lib is /usr/lib)."""
    if not _owners:
        for lst in pathlib.Path("/var/lib/dpkg/info").glob("*.list"):
            pkg = lst.stem.split(":")[0]
            for f in lst.read_text(errors="replace").splitlines():
                if ".so" in f:
                    _owners[f] = pkg
    for p in (path, os.path.realpath(path)):
        for q in (p, p.replace("/usr/lib/", "/lib/", 1), p.replace("/lib/", "/usr/lib/", 1)):
            if q in _owners:
                return _owners[q]
    return None


def check_libraries(stages, binaries):
    pkgs = apt_packages(stages["cpu"])
    if not pkgs:
        problem("cpu: no apt-get install of runtime libraries")
        return set()
    # Debian's `required` packages are what debian:bookworm-slim is made of (with their
    # dependencies); those installed here stand for them.
    required = set(subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Priority}\n"],
                                  capture_output=True, text=True).stdout.split("\n"))
    required = {l.split()[0] for l in required if l.endswith(" required")}
    deps = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                           "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances"]
                          + pkgs + sorted(required), capture_output=True, text=True)
    if deps.returncode != 0:
        problem(f"apt-cache depends failed (run apt-get update): {deps.stderr}")
        return set()
    closure = {l.strip() for l in deps.stdout.splitlines() if l and not l.startswith(" ") and not l.startswith("<")}
    provided_by_listed = set()
    libs = 0
    for b in binaries.values():
        for line in subprocess.run(["ldd", str(b)], capture_output=True, text=True).stdout.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if not m:
                continue
            libs += 1
            pkg = owner(m.group(2))
            if pkg is None and m.group(2).startswith(CUDA_TOOLKIT):
                # A CUDA-enabled local build (scripts/test.sh builds with CUDA where nvcc is)
                # links the toolkit's runtime; the image's CPU build is configured without CUDA
                # (checked below), so its binaries don't. The run check lends the library to the
                # root so that these local binaries start there.
                TOOLKIT_LIBS[m.group(1)] = m.group(2)
            elif pkg is None:
                problem(f"{b.name}: {m.group(1)} ({m.group(2)}) belongs to no Debian package")
            elif pkg in pkgs:
                provided_by_listed.add(pkg)
            elif pkg not in closure and pkg not in required:
                problem(f"{b.name}: {m.group(1)} is in {pkg}, which the cpu stage does not install")
    if TOOLKIT_LIBS and "-DSIEVE_CUDA=OFF" not in " ".join(instr(stages["build-cpu"], "RUN")):
        problem("build-cpu must configure with -DSIEVE_CUDA=OFF (the cpu stage has no CUDA "
                f"runtime, yet the binaries link {sorted(TOOLKIT_LIBS)} when built with CUDA)")
    policy = subprocess.run(["apt-cache", "policy"] + pkgs, capture_output=True, text=True).stdout
    # A package exists in Debian if the archive offers it or this machine has it installed
    # (apt's lists may be absent where nothing needed installing).
    versions = {name: {inst, cand} - {"(none)"} for name, inst, cand in re.findall(
        r"^(\S+):\n\s+Installed: (\S+)\n\s+Candidate: (\S+)", policy, re.M)}
    for p in pkgs:
        if p not in provided_by_listed:
            problem(f"cpu: installs {p}, which provides none of the binaries' libraries")
        if not versions.get(p):
            problem(f"cpu: package {p} is not in the archive (apt-cache policy: no candidate)")
    script = (REPO / "scripts" / "install-deps.sh").read_text()
    for stage in ("build-cpu", "build-cuda"):
        for p in apt_packages(stages[stage]):
            if not re.search(rf"(^|\s){re.escape(p)}(\s|$)", script, re.M):
                problem(f"{stage}: build package {p} is not in scripts/install-deps.sh")
    print(f"libraries: {libs} resolved for {len(binaries)} binaries, covered by {len(pkgs)} packages")
    return set(pkgs) | closure | required


CUDA_TOOLKIT = "/usr/local/cuda"
TOOLKIT_LIBS = {}  # soname -> path: CUDA runtime libraries of a CUDA-enabled local build


def build_root(root, packages):
    """A root file system made of the installed files of PACKAGES only (hard links to this
    machine's copies, or copies across file systems): the CPU runtime image's packages, their
    dependencies and Debian's required base, and nothing else of this machine."""
    os.chmod(root, 0o755)
    for top in ("bin", "sbin", "lib", "lib64"):         # Debian 12 merges /usr
        if os.path.islink(f"/{top}"):
            target = os.readlink(f"/{top}")
            (root / top).parent.joinpath(target).mkdir(parents=True, exist_ok=True)
            os.symlink(target, root / top)
    files, skipped = 0, []
    for pkg in sorted(packages):
        lists = list(pathlib.Path("/var/lib/dpkg/info").glob(f"{pkg}.list")) + \
            list(pathlib.Path("/var/lib/dpkg/info").glob(f"{pkg}:*.list"))
        if not lists:
            # An alternative of some dependency (a | b) that this machine satisfied with another.
            skipped.append(pkg)
            continue
        for path in lists[0].read_text().splitlines():
            if path in ("", "/.") or path.rstrip("/") in ("/bin", "/sbin", "/lib", "/lib64"):
                continue
            dest = root / path.lstrip("/")
            if os.path.islink(path):
                if not os.path.lexists(dest):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(path), dest)
            elif os.path.isdir(path):
                dest.mkdir(parents=True, exist_ok=True)
            elif os.path.isfile(path) and not os.path.lexists(dest):
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copy2(path, dest)
                files += 1
    for d in ("opt", "tmp", "proc", "dev", "etc"):
        (root / d).mkdir(mode=0o1777 if d == "tmp" else 0o755, exist_ok=True)
    for soname, path in TOOLKIT_LIBS.items():  # see check_libraries
        dest = root / "usr" / "lib" / "x86_64-linux-gnu" / soname
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        print(f"image root: lent {soname} from {path} (CUDA-enabled local build)")
    # What a container runtime writes into every container (no package ships /etc/hosts).
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (root / "etc" / "hostname").write_text("sieve\n")
    print(f"image root: {files} files of {len(packages) - len(skipped)} packages "
          f"({len(skipped)} alternatives not installed here left out)")


def run_in_namespace(stages, binaries, packages):
    """Runs the image's steps in a root of its packages' files, inside a private mount and
    network namespace (needs root)."""
    if os.geteuid() != 0:
        problem("the run check needs root (unshare --mount --net, chroot): run CTest as root, as CI does")
        return
    root = pathlib.Path(tempfile.mkdtemp(prefix="sieve-image-root."))
    try:
        build_root(root, packages)
        r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "--",
                            sys.executable, __file__, "--inside", str(root)] +
                           [str(binaries[k]) for k in sorted(binaries)],
                           text=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(root)
    print(r.stdout, end="")
    if r.returncode != 0:
        problem(f"run check failed:\n{r.stdout}{r.stderr}")


def inside(root, stages, binaries):
    def sh(*cmd):
        subprocess.run(list(cmd), check=True)
    sh("ip", "link", "set", "lo", "up")
    # The package files are hard links to this machine's: read-only, so nothing run can change
    # them. /opt (the COPY destinations) and /tmp are fresh tmpfs; /proc and /dev as a runtime gives.
    sh("mount", "--bind", root, root)
    sh("mount", "-o", "remount,bind,ro", root)
    sh("mount", "-t", "tmpfs", "tmpfs", f"{root}/opt")
    sh("mount", "-t", "tmpfs", "tmpfs", f"{root}/tmp")
    sh("mount", "-t", "proc", "proc", f"{root}/proc")
    sh("mount", "--rbind", "/dev", f"{root}/dev")
    st = stages["cpu"]
    for frm, sources, dest in copies(st):
        for src in sources:
            local = binaries[src[len("/src/build/"):]] if frm else REPO / src
            target = pathlib.Path(root + dest)
            if local.is_dir():
                shutil.copytree(local, target, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, target / local.name)
    # The image then runs with all of its root read-only except /tmp, as the Kubernetes base
    # runs it (readOnlyRootFilesystem, an emptyDir at /tmp): a daemon that writes elsewhere fails.
    sh("mount", "-o", "remount,ro", f"{root}/opt")
    env = {"HOME": "/opt/sieve"}
    for rest in instr(st, "ENV"):
        for kv in shlex.split(rest):
            k, _, v = kv.partition("=")
            env[k] = v
    run_image(root, st, env)


def run_image(root, st, env):
    """Runs stage ST's image in ROOT (this process is already in a private mount and network
    namespace with /proc and /dev in ROOT): ENTRYPOINT + CMD as USER in WORKDIR with ENV, the
    HEALTHCHECK command until SERVING, a generation through the image's CLI, the metrics port,
    the Kubernetes Deployment's preStop command, STOPSIGNAL to exit status 0. Exits 1 on
    failure. Also used by dockerfile_build.py."""
    uid, _, gid = instr(st, "USER")[-1].partition(":")
    workdir = instr(st, "WORKDIR")[-1]
    # chroot into the image root, drop to USER, enter WORKDIR: all with the root's own tools.
    asuser = ["chroot", root, "setpriv", f"--reuid={uid}", f"--regid={gid or uid}", "--clear-groups",
              "--", "env", "-C", workdir]
    cmd = exec_form(instr(st, "ENTRYPOINT")[-1]) + exec_form(instr(st, "CMD")[-1])
    print("run:", " ".join(cmd), f"(uid {uid}, workdir {workdir}, in the image root)")
    daemon = subprocess.Popen(asuser + cmd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    hc = instr(st, "HEALTHCHECK")[-1]
    hc_cmd = exec_form(hc[hc.index("CMD") + 3:].strip())
    start = float(re.search(r"--start-period=(\d+)s", hc).group(1))
    deadline, healthy = time.time() + min(start, 60), False
    while time.time() < deadline and daemon.poll() is None:
        r = subprocess.run(asuser + hc_cmd, env=env, capture_output=True, text=True)
        if r.returncode == 0 and "SERVING" in r.stdout:
            healthy = True
            break
        time.sleep(0.3)
    ok = healthy
    print("healthcheck:", "SERVING" if healthy else "never healthy")
    if healthy:
        gen = subprocess.run(asuser + ["/opt/sieve/bin/sieve", "generate", "--temperature", "0",
                                       "--max-tokens", "8", "The scheduler admits"],
                             env=env, capture_output=True, text=True, timeout=60)
        print("generate:", repr(gen.stdout[:60]), "exit", gen.returncode)
        if gen.returncode != 0:
            print(gen.stderr[-2000:])
        ok &= gen.returncode == 0 and len(gen.stdout.strip()) > 0
        metrics = urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=5).read().decode()
        ok &= "sieve_requests_total" in metrics
        print("metrics: sieve_requests_total", "present" if "sieve_requests_total" in metrics else "missing")
        # The Kubernetes base's preStop hook runs in this image as the container's user.
        import yaml
        dep = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
        pre = dep["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        r = subprocess.run(asuser + pre, env=env, capture_output=True, text=True, timeout=60)
        print(f"preStop {pre}: exit status {r.returncode}")
        ok &= r.returncode == 0
    stopsig = getattr(signal, instr(st, "STOPSIGNAL")[-1])
    daemon.send_signal(stopsig)
    try:
        out, _ = daemon.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        out, _ = daemon.communicate()
    print(f"STOPSIGNAL {stopsig.name}: exit status {daemon.returncode}")
    if not ok or daemon.returncode != 0:
        print(out[-3000:])
        sys.exit(1)


def main():
    args, stages = parse()
    if sys.argv[1] == "--inside":
        paths = [pathlib.Path(p) for p in sys.argv[3:]]
    else:
        paths = [pathlib.Path(p) for p in sys.argv[1:3]]
    binaries = {}
    for p in paths:
        rel = {"sieved": "server/sieved", "sieve": "cli/sieve"}[p.name]
        binaries[rel] = p
    if sys.argv[1] == "--inside":
        inside(sys.argv[2], stages, binaries)
        return
    check_structure(args, stages, binaries)
    packages = check_libraries(stages, binaries)
    if packages:
        run_in_namespace(stages, binaries, packages)
    if problems:
        for p in problems:
            print("FAIL:", p)
        sys.exit(1)
    print("deploy_dockerfile: stages, context, runtime libraries and the CPU image's run steps check out")


if __name__ == "__main__":
    main()
