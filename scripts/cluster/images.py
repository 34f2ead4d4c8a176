"""Container images built locally with podman: the Debian base, simcal, the Dask operator's
controller and the pause image.

Shared by tests/test_image.py (which builds and runs the simcal image) and ``make cluster``
(which saves the images to an archive that the cluster's containerd imports; there is no
registry here). No registry image is pulled: the base is ``debootstrap --variant=minbase`` with
python3 and python3-venv, ``podman import``-ed; the operator's controller is that simcal image
plus ``pip install dask-kubernetes==<constraints.txt pin>``; the pause image is a static Go
binary ``FROM scratch``.

Kept between runs under ``$SIMCAL_IMAGE_CACHE`` (default /var/tmp/simcal-image-cache): the
Debian base tarball (keyed by suite, packages and mirror) and a podman store of its own, whose
layer cache keys the dependency layers by the Dockerfile, pyproject.toml and constraints.txt.

    python scripts/cluster/images.py --pause BIN --archive OUT.tar   # prints the tags as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SIMCAL_IMAGE_CACHE", "/var/tmp/simcal-image-cache"))
SUITE, PACKAGES = "bookworm", ("python3", "python3-venv")
# pip in the build trusts the host's CA bundle (a TLS-intercepting proxy's CA, if any): passed
# as a build secret, so it is in no image layer.
CA_BUNDLE = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
SIMCAL_TAG = "localhost/simcal:local"
OPERATOR_TAG = "localhost/dask-kubernetes-operator:local"
PAUSE_TAG = "localhost/pause:local"


class ImageError(RuntimeError):
    """A podman, debootstrap or build step failed; the message carries its output."""


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """An exclusive lock under the cache (concurrent runs share it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _ulimit(name: str, which: int) -> str:
    """``--ulimit name=N:N``, N = 4096 or the host's hard limit if lower."""
    hard = resource.getrlimit(which)[1]
    limit = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    return f"--ulimit={name}={limit}:{limit}"


class Podman:
    """podman with flags that need no systemd, Docker or podman config: runc, cgroupfs, file
    events, a store under the cache, and ulimits within the host's hard limits (podman's
    defaults exceed them, and runc cannot raise them)."""

    def __init__(self, driver: str) -> None:
        self.flags = [
            "--root", str(CACHE / f"storage-{driver}"),
            "--runroot", f"/run/simcal-image-test/{driver}",
            "--storage-driver", driver,
            "--runtime", "runc",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]
        self.ulimits = [_ulimit("nofile", resource.RLIMIT_NOFILE),
                        _ulimit("nproc", resource.RLIMIT_NPROC)]

    def argv(self, *args: str) -> list[str]:
        return ["podman", *self.flags, *args]

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ImageError(
                f"podman {' '.join(args[:2])} failed:\n{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def succeeds(self, *args: str) -> bool:
        return subprocess.run(self.argv(*args), capture_output=True, timeout=120).returncode == 0

    def run_args(self, image: str, *args: str, options: tuple[str, ...] = ()) -> list[str]:
        """``podman run`` hardened like the chart's pods, on the host network."""
        return [
            "run", "--rm", "--network=host", *self.ulimits,
            "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges",
            "--user=1000:1000", "--tmpfs=/home/simcal:U", *options, image, *args,
        ]

    def build(self, context: Path, tag: str, *build_args: str, timeout: float = 1800) -> str:
        """``podman build`` (host network, the CA bundle as a secret): the image ID."""
        secret = [f"--secret=id=ca-bundle,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
        iidfile = CACHE / f"iid-{uuid.uuid4().hex}"
        with locked("build"):
            self(
                "build", "--network=host", *self.ulimits, *secret,
                *(f"--build-arg={arg}" for arg in build_args), f"--iidfile={iidfile}",
                f"--tag={tag}", str(context), timeout=timeout,
            )
        image_id = iidfile.read_text(encoding="utf-8").strip()
        iidfile.unlink()
        return image_id


def missing_tools() -> list[str]:
    """What the image build needs and this host lacks."""
    missing = [tool for tool in ("podman", "runc", "debootstrap", "tar") if not shutil.which(tool)]
    if os.geteuid() != 0:
        missing.append("root (debootstrap, podman storage)")
    return missing


def podman() -> Podman:
    """podman on overlay storage, or on vfs where overlay does not work."""
    for driver in ("overlay", "vfs"):
        if (candidate := Podman(driver)).succeeds("info"):
            return candidate
    raise ImageError("podman works with neither the overlay nor the vfs storage driver")


def apt_mirror() -> str:
    """The Debian mirror apt uses (deb822 or one-line sources), else deb.debian.org."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        found = re.search(r"^(?:URIs:|deb(?:\s+\[[^]]*\])?)\s+(\S+/debian)/?\s", text, re.M)
        if found:
            return found.group(1)
    return "http://deb.debian.org/debian"


def _debootstrap(tarball: Path, mirror: str) -> None:
    """A minbase Debian root filesystem with python3 and python3-venv, as a tarball."""
    rootfs = tarball.with_suffix(".rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         SUITE, str(rootfs), mirror],
        capture_output=True, text=True, timeout=1800,
    )
    if result.returncode != 0:
        raise ImageError("debootstrap failed:\n" + result.stdout[-3000:] + result.stderr)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(rootfs)


def base_image(pm: Podman) -> str:
    """localhost/simcal-base:<key>, imported from the (cached) debootstrap tarball."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {PACKAGES} {mirror}".encode()).hexdigest()[:12]
    tag = f"localhost/simcal-base:{key}"
    tarball = CACHE / f"debian-{SUITE}-minbase-{key}.tar"
    with locked("base"):
        if not tarball.exists():
            _debootstrap(tarball, mirror)
        if not pm.succeeds("image", "exists", tag):
            pm("import", str(tarball), tag, timeout=600)
    return tag


def simcal_image(pm: Podman, base: str, tag: str = SIMCAL_TAG) -> str:
    """The simcal image built from this checkout's Dockerfile (layer-cached): its ID."""
    return pm.build(REPO, tag, f"BASE_IMAGE={base}")


def _pin(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").split():
        if line.split("==")[0].lower() == name:
            return line.split("==")[1]
    raise ImageError(f"{name} is not pinned in constraints.txt")


OPERATOR_CONTAINERFILE = """\
FROM {simcal}
USER 0:0
RUN --mount=type=secret,id=ca-bundle \\
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \\
 && /opt/venv/bin/pip install --no-cache-dir dask-kubernetes=={version} \\
 && /opt/venv/bin/pip check
USER 1000:1000
# The operator chart passes kopf's flags (--liveness, --all-namespaces) as args.
ENTRYPOINT ["kopf", "run", "-m", "dask_kubernetes.operator.controller"]
"""


def operator_image(pm: Podman, simcal: str, tag: str = OPERATOR_TAG) -> str:
    """The Dask operator's controller: the simcal image + dask-kubernetes from PyPI."""
    with tempfile.TemporaryDirectory() as context:
        Path(context, "Containerfile").write_text(
            OPERATOR_CONTAINERFILE.format(simcal=simcal, version=_pin("dask-kubernetes")),
            encoding="utf-8",
        )
        return pm.build(Path(context), tag)


def pause_image(pm: Podman, binary: Path, tag: str = PAUSE_TAG) -> str:
    """The pod sandbox image: a static pause binary FROM scratch."""
    with tempfile.TemporaryDirectory() as context:
        shutil.copy(binary, Path(context, "pause"))
        Path(context, "Containerfile").write_text(
            'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n',
            encoding="utf-8",
        )
        return pm.build(Path(context), tag)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=Path, required=True, help="the static pause binary")
    parser.add_argument("--archive", type=Path, required=True, help="docker-archive to write")
    args = parser.parse_args(argv)
    if missing := missing_tools():
        print(f"images: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        pm = podman()
        simcal = simcal_image(pm, base_image(pm))
        operator_image(pm, simcal)
        pause_image(pm, args.pause)
        tags = [SIMCAL_TAG, OPERATOR_TAG, PAUSE_TAG]
        partial = args.archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        pm("save", "--format=docker-archive", "-m", "-o", str(partial), *tags, timeout=900)
        partial.rename(args.archive)
    except (ImageError, subprocess.SubprocessError) as error:
        print(f"images: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"simcal": SIMCAL_TAG, "operator": OPERATOR_TAG, "pause": PAUSE_TAG}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
