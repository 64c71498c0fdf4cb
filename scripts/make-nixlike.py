#!/usr/bin/env python3
"""Push a realistic Nix-layered image to a registry, for the benchmarks.

The image is laid out as nixpkgs' `dockerTools.buildLayeredImage` lays out
`nixos/nix`: one layer per store path, its tar entries named absolutely
(`/nix/store/<hash>-<name>/...`), then a last layer with the Nix database,
a profile link and a few files in /etc; a manifest list names it for
linux/amd64 and linux/arm64 (the same layers under both, as the benchmarks
only need the shape).

The store is real: Debian's `nix-instantiate` copies directories of this
machine's /usr (documentation, locales, libraries, Python modules) into a
private store under WORKDIR with `builtins.path`, and registers them in a real
database; a few small "wrapper" paths refer to the others, so the database
holds a reference graph. `nix-store --store local?root=DIR --verify
--check-contents` therefore passes on a faithful extraction of the image.

Directories are taken in a fixed order and each is between 1 MB and 80 MB,
so a smaller --mb picks a prefix of what a larger one picks: two images
made with --mb 320 and --mb 400 share most of their store paths, as an
image and its previous release do.

usage: scripts/make-nixlike.py WORKDIR REGISTRY REPO [--mb N] [--tag TAG] [--cuda]
       scripts/make-nixlike.py --list [--mb N]     (show the directories it would use)

--cuda shapes the image like a CUDA or ML toolchain instead: many more store
paths (each directory taken twice, as two versions of a package would be),
more than 150,000 files and 4 GB in all, and two store paths holding one file
of over 1 GB each (as libcudnn and libcublasLt are), made of real library
bytes from this machine so that they compress as binaries do.

REGISTRY is host:port of a registry reached over plain HTTP without auth
(the benchmarks start one on loopback). Prints one JSON object on stdout:
{"index": digest of the manifest list (tagged TAG, default latest),
 "amd64": ..., "arm64": ... (the per-platform manifest digests),
 "store_paths": N, "layers": N, "bytes": bytes the store paths hold,
 "compressed": bytes of the layers}.
Needs python3, nix-bin (nix-instantiate) and pigz.
"""

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
import urllib.request

# Where store path contents come from, in the order they are taken. Globs, so
# that the Python, Perl, GCC and multiarch directories of any Debian release
# match; a root this machine lacks is skipped.
SOURCE_ROOTS = [
    "/usr/lib/python3.*",
    "/usr/lib/python3/dist-packages",
    "/usr/share/perl/*",
    "/usr/lib/*-linux-gnu/perl/*",
    "/usr/lib/gcc/*-linux-gnu/*",
    "/usr/lib/*-linux-gnu",
    "/usr/share/zoneinfo",
    "/usr/share/i18n",
    "/usr/share/man",
    "/usr/share/locale",
    "/usr/share/doc",
]
MIN_SOURCE = 1_000_000
MAX_SOURCE = 80_000_000
MAX_SOURCES = 90
# --cuda takes from all of /usr, directories of 0.2 to 400 MB, 1.5 GB of them.
CUDA_ROOTS = SOURCE_ROOTS + [
    "/usr/share", "/usr/lib", "/usr/include", "/usr/lib/*-linux-gnu/*", "/usr/src", "/usr/libexec",
]
CUDA_SOURCES = dict(roots=CUDA_ROOTS, budget=1_500_000_000, max_sources=600,
                    min_size=200_000, max_size=400_000_000)
WRAPPER_FANOUT = 7  # each wrapper path refers to this many source paths

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
PLATFORMS = ["amd64", "arm64"]


def say(msg):
    print("make-nixlike: " + msg, file=sys.stderr, flush=True)


# --- choosing what goes into the store --------------------------------------


def measure(top):
    """Bytes under `top`, or None if Nix could not copy it as it is: an
    unreadable entry, a device, FIFO or socket, or a mount point inside."""
    dev = os.lstat(top).st_dev
    total = 0
    for here, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            if st.st_dev != dev:
                return None
            if stat.S_ISLNK(st.st_mode):
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return None
            if not os.access(path, os.R_OK):
                return None
            total += st.st_size
    return total


def pick_sources(budget, max_sources=MAX_SOURCES, roots=SOURCE_ROOTS,
                 min_size=MIN_SOURCE, max_size=MAX_SOURCE):
    """(path, bytes) of directories to turn into store paths, up to `budget` bytes."""
    picked, total = [], 0
    for pattern in roots:
        for root in sorted(glob.glob(pattern)):
            if not os.path.isdir(root) or os.path.islink(root):
                continue
            for name in sorted(os.listdir(root)):
                path = os.path.join(root, name)
                if os.path.islink(path) or not os.path.isdir(path):
                    continue
                if any(path == p for p, _ in picked):
                    continue
                size = measure(path)
                if size is None or not min_size <= size <= max_size:
                    continue
                picked.append((path, size))
                total += size
                if total >= budget or len(picked) >= max_sources:
                    return picked, total
    return picked, total


def store_name(i, path):
    """A valid Nix store path name for the i-th source (letters, digits, -._+?=)."""
    base = "".join(c if c.isalnum() or c in "-._" else "-" for c in os.path.basename(path))
    return ("src%02d-%s" % (i, base.lstrip(".")))[:48]


def make_big_files(work, count, size):
    """`count` directories under WORK/big, each holding one file `lib/libbig-N.so`
    of `size` bytes: this machine's shared libraries end to end, each file
    starting at another library so that no two are alike. Returns (path, bytes)."""
    libs = []
    for here, dirs, files in os.walk("/usr/lib"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(here, name)
            if ".so" in name and not os.path.islink(path) and os.path.isfile(path):
                if os.access(path, os.R_OK) and os.path.getsize(path) >= 100_000:
                    libs.append(path)
    if not libs:
        sys.exit("make-nixlike: found no shared library under /usr/lib for --cuda")
    made = []
    for n in range(count):
        top = os.path.join(work, "big", "libbig-%d" % n)
        os.makedirs(os.path.join(top, "lib"), exist_ok=True)
        written, k = 0, n * 7
        with open(os.path.join(top, "lib", "libbig-%d.so" % n), "wb") as out:
            while written < size:
                with open(libs[k % len(libs)], "rb") as f:
                    chunk = f.read(size - written)
                out.write(chunk)
                written += len(chunk)
                k += 1
        made.append((top, written))
    return made


def nix_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def build_store(root, sources, names=None):
    """Copy `sources` into a Nix store under `root` (ROOT/nix/store and its
    database) and add the wrapper paths; returns every store path, sources first.
    `names` gives each source's store name (default: from its path)."""
    bindings = []
    for i, (path, _) in enumerate(sources):
        name = names[i] if names else store_name(i, path)
        bindings.append(
            "s%d = builtins.path { path = %s; name = %s; };"
            % (i, nix_string(path), nix_string(name))
        )
    wrappers = []
    for start in range(0, len(sources), WRAPPER_FANOUT):
        group = range(start, min(start + WRAPPER_FANOUT, len(sources)))
        body = "#!/bin/sh\\n" + "".join("# uses ${s%d}\\n" % i for i in group)
        wrappers.append('builtins.toFile "wrapper-%02d" "%s"' % (start // WRAPPER_FANOUT, body))
    items = ["s%d" % i for i in range(len(sources))] + ["(%s)" % w for w in wrappers]
    expr = "let\n  %s\nin [\n  %s\n]\n" % ("\n  ".join(bindings), "\n  ".join(items))
    nix_file = os.path.join(os.path.dirname(root), "store.nix")
    with open(nix_file, "w") as f:
        f.write(expr)
    home = os.path.join(os.path.dirname(root), "nix-home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ, HOME=home, XDG_CACHE_HOME=os.path.join(home, "cache"))
    out = subprocess.run(
        ["nix-instantiate", "--store", "local?root=" + root, "--read-write-mode",
         "--eval", "--strict", "--json", nix_file],
        env=env, check=False, capture_output=True, text=True,
    )
    if out.returncode != 0:
        sys.exit("make-nixlike: nix-instantiate failed:\n" + out.stderr)
    # The database goes into the image as one file: fold its WAL into it.
    db = sqlite3.connect(os.path.join(root, "nix/var/nix/db/db.sqlite"))
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()
    return json.loads(out.stdout)


# --- layers -----------------------------------------------------------------


class Tee:
    """A write-only stream that hashes and counts what passes on to `sink`."""

    def __init__(self, sink):
        self.sink, self.sha, self.size = sink, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def entry(name, st=None, kind=tarfile.DIRTYPE, mode=0o755):
    """A tar header owned by root, dated as the Nix store dates files (1 s)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = kind, (stat.S_IMODE(st.st_mode) if st else mode)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 1
    return ti


def add_tree(tar, disk_root, name):
    """`disk_root` and everything under it, named `name`... in sorted order.
    (TarFile.add would strip the leading '/' of an absolute name.)"""
    st = os.lstat(disk_root)
    if stat.S_ISLNK(st.st_mode):
        ti = entry(name, st, tarfile.SYMTYPE)
        ti.linkname = os.readlink(disk_root)
        tar.addfile(ti)
    elif stat.S_ISDIR(st.st_mode):
        tar.addfile(entry(name, st))
        for child in sorted(os.listdir(disk_root)):
            add_tree(tar, os.path.join(disk_root, child), name + "/" + child)
    else:
        ti = entry(name, st, tarfile.REGTYPE)
        ti.size = st.st_size
        with open(disk_root, "rb") as f:
            tar.addfile(ti, f)


def gzip_layer(dest, fill):
    """Write the tar made by fill(tar) through pigz into `dest`; returns its diff_id."""
    with open(dest, "wb") as out:
        pigz = subprocess.Popen(["pigz", "-n", "-6"], stdin=subprocess.PIPE, stdout=out)
        tee = Tee(pigz.stdin)
        with tarfile.open(fileobj=tee, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            fill(tar)
        pigz.stdin.close()
        if pigz.wait() != 0:
            sys.exit("make-nixlike: pigz failed on " + dest)
    return "sha256:" + tee.sha.hexdigest()


def store_layer(root, store_path):
    def fill(tar):
        tar.addfile(entry("/nix"))
        tar.addfile(entry("/nix/store"))
        add_tree(tar, root + store_path, store_path)
    return fill


def customisation_layer(root, profile):
    """The last layer, as in nixos/nix: the database, a profile, /etc, /tmp."""
    def fill(tar):
        for d in ["nix", "nix/var", "nix/var/nix", "nix/var/nix/db", "nix/var/nix/gcroots",
                  "nix/var/nix/profiles", "etc", "root"]:
            tar.addfile(entry("./" + d))
        tar.addfile(entry("./tmp", mode=0o1777))
        for f in ["db.sqlite", "schema"]:
            disk = os.path.join(root, "nix/var/nix/db", f)
            ti = entry("./nix/var/nix/db/" + f, os.lstat(disk), tarfile.REGTYPE)
            ti.size = os.path.getsize(disk)
            with open(disk, "rb") as src:
                tar.addfile(ti, src)
        link = entry("./nix/var/nix/profiles/default", kind=tarfile.SYMTYPE, mode=0o777)
        link.linkname = profile
        tar.addfile(link)
        for name, text in [("passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("group", "root:x:0:\n")]:
            data = text.encode()
            ti = entry("./etc/" + name, kind=tarfile.REGTYPE, mode=0o644)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return fill


# --- the registry -----------------------------------------------------------


class Registry:
    """Just enough of the distribution API to push: monolithic blob uploads, manifest PUTs."""

    def __init__(self, host, repo):
        self.origin = "http://" + host
        self.repo = repo

    def push_file(self, path):
        """Upload the blob in `path`; returns its descriptor fields (digest, size)."""
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digest, size = "sha256:" + sha.hexdigest(), os.path.getsize(path)
        start = urllib.request.Request(
            "%s/v2/%s/blobs/uploads/" % (self.origin, self.repo), method="POST")
        location = urllib.request.urlopen(start).headers["Location"]
        if location.startswith("/"):
            location = self.origin + location
        location += ("&" if "?" in location else "?") + "digest=" + digest
        with open(path, "rb") as body:
            put = urllib.request.Request(location, data=body, method="PUT", headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size)})
            urllib.request.urlopen(put).close()
        return {"digest": digest, "size": size}

    def push_json(self, path, doc):
        with open(path, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
        return self.push_file(path)

    def put_manifest(self, ref, doc, media_type):
        body = json.dumps(doc, indent=3).encode()
        put = urllib.request.Request(
            "%s/v2/%s/manifests/%s" % (self.origin, self.repo, ref),
            data=body, method="PUT", headers={"Content-Type": media_type})
        urllib.request.urlopen(put).close()
        return {"digest": "sha256:" + hashlib.sha256(body).hexdigest(), "size": len(body)}


def push_image(registry, work, root, store_paths, tag):
    layers, diff_ids = [], []
    blobs = os.path.join(work, "blobs")
    os.makedirs(blobs, exist_ok=True)
    fills = [store_layer(root, p) for p in store_paths]
    fills.append(customisation_layer(root, store_paths[-1]))
    for n, fill in enumerate(fills, 1):
        tmp = os.path.join(blobs, "layer.tar.gz")
        diff_ids.append(gzip_layer(tmp, fill))
        layers.append(dict(mediaType=DOCKER_LAYER, **registry.push_file(tmp)))
        os.unlink(tmp)
        if n % 20 == 0 or n == len(fills):
            say("pushed %d/%d layers" % (n, len(fills)))
    result, entries = {}, []
    for arch in PLATFORMS:
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/nix/var/nix/profiles/default/bin"], "User": "0:0"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cfg = registry.push_json(os.path.join(blobs, "config-" + arch), config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": dict(mediaType=DOCKER_CONFIG, **cfg),
            "layers": layers,
        }
        # A manifest named by its digest: the registry checks it as it stores it.
        digest = "sha256:" + hashlib.sha256(json.dumps(manifest, indent=3).encode()).hexdigest()
        desc = registry.put_manifest(digest, manifest, DOCKER_MANIFEST)
        result[arch] = desc["digest"]
        entries.append(dict(mediaType=DOCKER_MANIFEST, platform={"architecture": arch, "os": "linux"}, **desc))
    index = {"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}
    result["index"] = registry.put_manifest(tag, index, DOCKER_LIST)["digest"]
    result["layers"] = len(layers)
    result["compressed"] = sum(layer["size"] for layer in layers)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="?", help="scratch directory (its store is left there)")
    ap.add_argument("registry", nargs="?", help="host:port, plain HTTP")
    ap.add_argument("repo", nargs="?")
    ap.add_argument("--mb", type=int, default=400, help="store size to aim for, MB (default 400)")
    ap.add_argument("--tag", default="latest", help="tag of the manifest list (default latest)")
    ap.add_argument("--list", action="store_true", help="print the directories it would use, and stop")
    ap.add_argument("--cuda", action="store_true",
                    help="a CUDA-sized image: over 4 GB and 150,000 files, two files over 1 GB")
    a = ap.parse_args()
    if a.cuda:
        sources, total = pick_sources(**CUDA_SOURCES)
    else:
        sources, total = pick_sources(a.mb * 1_000_000)
    if a.list:
        for path, size in sources:
            print("%8.1f MB  %s" % (size / 1e6, path))
        print("%8.1f MB  in %d directories" % (total / 1e6, len(sources)))
        return
    if not (a.work and a.registry and a.repo):
        ap.error("WORKDIR, REGISTRY and REPO are needed (or --list)")
    for tool, package in [("nix-instantiate", "nix-bin"), ("pigz", "pigz")]:
        if shutil.which(tool) is None:
            sys.exit("make-nixlike: needs %s (apt-get install %s)" % (tool, package))
    if not sources:
        sys.exit("make-nixlike: found no directory of 1 to 80 MB under " + ", ".join(SOURCE_ROOTS))
    root = os.path.join(os.path.abspath(a.work), "root")
    os.makedirs(root, exist_ok=True)
    names = None
    if a.cuda:
        # Two versions of every package, and two libraries of 1.1 GB.
        names = [store_name(i, p) for i, (p, _) in enumerate(sources)]
        names += [("v2-" + n)[:48] for n in names]
        sources = sources + sources
        big = make_big_files(os.path.abspath(a.work), 2, 1_100_000_000)
        names += [os.path.basename(p) for p, _ in big]
        sources += big
        total = sum(size for _, size in sources)
    say("copying %d directories (%.0f MB) into a Nix store" % (len(sources), total / 1e6))
    store_paths = build_store(root, sources, names)
    result = push_image(Registry(a.registry, a.repo), a.work, root, store_paths, a.tag)
    result.update(store_paths=len(store_paths), bytes=total)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
