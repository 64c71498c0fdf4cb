# Sourced by the benchmark scripts: the images they time, pushed to the
# registry of scripts/bench-common.sh ($reg), built under $work.
#   full: make-nixlike.py --mb 400 (about 100 layers, 400 MB in 90 directories of /usr)
#   half: make-nixlike.py --mb 200
#   big:  one 2 GB layer (real files from /usr/lib under one store path)
#   cuda: make-nixlike.py --cuda (600 store paths, 5 GB, about 200,000 files,
#         two files of 1.1 GB; needs about 45 GB of disk to benchmark)
# shellcheck shell=bash

push_blob() { # file -> digest
    local digest loc
    digest=sha256:$(sha256sum "$1" | cut -d' ' -f1)
    loc=$(curl -fsSi -X POST "http://$reg/v2/$2/blobs/uploads/" | tr -d '\r' | sed -n 's/^[Ll]ocation: //p')
    case $loc in /*) loc=http://$reg$loc ;; esac
    case $loc in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' -T "$1" "$loc" >/dev/null
    echo "$digest"
}

make_big() { # one 2 GB layer: real files under one store path, plus the db dir
    local dir=$work/big root=$work/big/root store
    store=$root/nix/store/00000000000000000000000000000000-big-2g
    mkdir -p "$store" "$root/nix/var/nix/db"
    local total=0
    for d in /usr/lib/*/; do
        [ -L "${d%/}" ] && continue
        size=$(du -sb "$d" 2>/dev/null | cut -f1)
        [ "$size" -gt 0 ] || continue
        [ $((total + size)) -gt 2100000000 ] && continue
        cp -a "$d" "$store/" 2>/dev/null || true
        total=$((total + size))
        [ "$total" -gt 1900000000 ] && break
    done
    find "$store" \( -type b -o -type c -o -type p -o -type s \) -delete
    printf 'not a real db\n' > "$root/nix/var/nix/db/db.sqlite"
    tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$dir/layer.tar" nix
    local diff_id size_raw
    diff_id=sha256:$(sha256sum "$dir/layer.tar" | cut -d' ' -f1)
    size_raw=$(stat -c %s "$dir/layer.tar")
    pigz -6 < "$dir/layer.tar" > "$dir/layer.tar.gz"
    rm -f "$dir/layer.tar"
    local layer config cfg_digest manifest
    layer=$(push_blob "$dir/layer.tar.gz" nixos/big)
    printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["%s"]}}' "$diff_id" > "$dir/config.json"
    cfg_digest=$(push_blob "$dir/config.json" nixos/big)
    manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"%s","size":%s}]}' \
        "$cfg_digest" "$(stat -c %s "$dir/config.json")" "$layer" "$(stat -c %s "$dir/layer.tar.gz")")
    curl -fsS -X PUT -H 'Content-Type: application/vnd.docker.distribution.manifest.v2+json' --data "$manifest" "http://$reg/v2/nixos/big/manifests/latest" >/dev/null
    rm -rf "$root"
    echo "big: 1 layer, $size_raw bytes uncompressed" >&2
    echo "nixos/big@sha256:$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)"
}

push_image() { # image name -> repo@digest of its amd64 manifest
    local shape out
    case $1 in
        full) shape=(--mb 400) ;;
        half) shape=(--mb 200) ;;
        cuda) shape=(--cuda) ;;
        big) make_big; return ;;
        *) echo "unknown image $1 (full, half, big or cuda)" >&2; exit 2 ;;
    esac
    out=$(python3 "$here/scripts/make-nixlike.py" "$work/$1" "$reg" "nixos/$1" "${shape[@]}")
    rm -rf "${work:?}/$1"
    echo "nixos/$1@$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["amd64"])' "$out")"
}
